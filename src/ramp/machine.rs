//! The ramp's states and what moves it between them: time held in a step, the verdicts of its
//! analyses, and the operator's commands.
//!
//! Pure: it is handed the time and each verdict, and answers with the share of new sessions v1
//! should get. Applying that share, storing the progress and running the analyses is the ramp
//! runner's job. The progress is what is stored, so a ramp resumes after a restart where it was;
//! time the ramp was not running is not counted as held, so a restart never skips a hold.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::guard::Verdict;
use crate::clock::UnixMillis;
use crate::config::ramp::Plan;
use crate::config::Percent;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Moving through the steps.
    Progressing,
    /// Holding the current step's share until resumed.
    Paused(PauseReason),
    /// `failure_limit` analyses in a row failed: v1 gets every new session again, every pin
    /// stays where it is, until the operator retries.
    Aborted,
    /// The last step is reached (and held, if it has a hold): the drain signal takes over.
    Completed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PauseReason {
    Operator,
    /// The step stayed inconclusive for `inconclusive_timeout`.
    Inconclusive,
}

/// Where a ramp is: what is stored, and all a restart needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub state: State,
    /// Index into the plan's steps.
    pub step: usize,
    /// Time held in the current step so far, in milliseconds.
    pub held_ms: u64,
    /// Failed analyses in a row.
    pub failures: u32,
    /// How long the current step has been inconclusive in a row, in milliseconds.
    pub inconclusive_ms: u64,
    /// Counts changes of state or step: readings, session counts and gates' answers belong to
    /// one epoch, so a replica can tell a ramp that moved on from one that was only judged.
    #[serde(default)]
    pub epoch: u64,
    /// When time was last counted; not stored, so time while the ramp was not running is
    /// never counted as held.
    #[serde(skip)]
    pub counted_at: Option<UnixMillis>,
}

/// A command that does not apply in the ramp's state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot {command} a ramp that is {state}")]
pub struct Refused {
    pub command: &'static str,
    pub state: &'static str,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Progressing => "progressing",
            State::Paused(_) => "paused",
            State::Aborted => "aborted",
            State::Completed => "completed",
        }
    }
}

impl Progress {
    /// A ramp starting at its first step; returns the share to apply.
    pub fn start(plan: &Plan, now: UnixMillis) -> (Progress, Percent) {
        let mut progress = Progress {
            state: State::Progressing,
            step: 0,
            held_ms: 0,
            failures: 0,
            inconclusive_ms: 0,
            epoch: 0,
            counted_at: Some(now),
        };
        progress.complete_if_done(plan);
        (progress, plan.steps()[0].v1_percent)
    }

    /// The share of new sessions v1 gets in this state.
    pub fn v1_percent(&self, plan: &Plan) -> Percent {
        match self.state {
            State::Aborted => Percent::HUNDRED,
            _ => plan.steps()[self.step.min(plan.steps().len() - 1)].v1_percent,
        }
    }

    /// Time left in the current step's hold.
    pub fn hold_left(&self, plan: &Plan) -> Duration {
        plan.steps()[self.step].hold.saturating_sub(Duration::from_millis(self.held_ms))
    }

    /// Counts the time since the last call as held (while progressing), then acts on the
    /// window's verdict. Returns the share to apply if it changed. A step whose hold is done
    /// and whose window passes moves on only if `gates_open` (its gates said yes, or it has
    /// none; see [`Progress::awaits_gates`]).
    pub fn judged(
        &mut self,
        plan: &Plan,
        now: UnixMillis,
        verdict: Verdict,
        gates_open: bool,
    ) -> Option<Percent> {
        let elapsed = self.count_time(now);
        if self.state != State::Progressing {
            return None;
        }
        let analysis = plan.analysis();
        match verdict {
            Verdict::Fail => {
                self.failures += 1;
                self.inconclusive_ms = 0;
                if self.failures >= analysis.failure_limit {
                    self.enter(State::Aborted);
                    return Some(Percent::HUNDRED);
                }
                None
            }
            Verdict::Inconclusive => {
                self.failures = 0;
                self.inconclusive_ms += elapsed;
                if Duration::from_millis(self.inconclusive_ms) >= analysis.inconclusive_timeout {
                    self.enter(State::Paused(PauseReason::Inconclusive));
                }
                None
            }
            Verdict::Pass => {
                self.failures = 0;
                self.inconclusive_ms = 0;
                let last = self.step + 1 == plan.steps().len();
                (self.hold_left(plan).is_zero() && (gates_open || last)).then(|| self.advance(plan))
            }
        }
    }

    /// Whether the step is done (held, and its window passed) and only waits for the gates
    /// before the next one.
    pub fn awaits_gates(&self, plan: &Plan, verdict: Verdict) -> bool {
        self.state == State::Progressing
            && verdict == Verdict::Pass
            && self.hold_left(plan).is_zero()
            && self.step + 1 < plan.steps().len()
    }

    /// Counts the time since the last count as held, if progressing; returns it (ms).
    fn count_time(&mut self, now: UnixMillis) -> u64 {
        let elapsed = self.counted_at.map_or(0, |then| now.saturating_sub(then));
        self.counted_at = Some(now);
        if self.state == State::Progressing {
            self.held_ms += elapsed;
            elapsed
        } else {
            0
        }
    }

    /// The next step; past the last one (held, if it has a hold), the ramp is completed.
    fn advance(&mut self, plan: &Plan) -> Percent {
        if self.step + 1 == plan.steps().len() {
            self.enter(State::Completed);
            return plan.steps()[self.step].v1_percent;
        }
        self.step += 1;
        self.epoch += 1;
        self.held_ms = 0;
        self.inconclusive_ms = 0;
        self.complete_if_done(plan);
        plan.steps()[self.step].v1_percent
    }

    fn enter(&mut self, state: State) {
        self.state = state;
        self.epoch += 1;
    }

    /// The last step without a hold completes the ramp as soon as it is reached.
    fn complete_if_done(&mut self, plan: &Plan) {
        let last = plan.steps().len() - 1;
        if self.step == last && plan.steps()[last].hold.is_zero() {
            self.enter(State::Completed);
        }
    }

    fn refuse(&self, command: &'static str) -> Refused {
        Refused { command, state: self.state.as_str() }
    }

    pub fn pause(&mut self, now: UnixMillis) -> Result<(), Refused> {
        self.count_time(now);
        match self.state {
            State::Progressing => {
                self.enter(State::Paused(PauseReason::Operator));
                Ok(())
            }
            _ => Err(self.refuse("pause")),
        }
    }

    pub fn resume(&mut self, now: UnixMillis) -> Result<(), Refused> {
        self.count_time(now);
        match self.state {
            State::Paused(_) => {
                self.enter(State::Progressing);
                self.inconclusive_ms = 0;
                Ok(())
            }
            _ => Err(self.refuse("resume")),
        }
    }

    /// Sends every new session to v1 again; pins stay where they are.
    pub fn abort(&mut self, now: UnixMillis) -> Result<Percent, Refused> {
        self.count_time(now);
        match self.state {
            State::Progressing | State::Paused(_) => {
                self.enter(State::Aborted);
                Ok(Percent::HUNDRED)
            }
            _ => Err(self.refuse("abort")),
        }
    }

    /// Moves to the next step now, whatever is left of the hold or the analyses say.
    pub fn promote(&mut self, plan: &Plan, now: UnixMillis) -> Result<Percent, Refused> {
        self.count_time(now);
        match self.state {
            State::Progressing | State::Paused(_) => {
                self.enter(State::Progressing);
                self.failures = 0;
                Ok(self.advance(plan))
            }
            _ => Err(self.refuse("promote")),
        }
    }

    /// After an abort: the aborted step again, from the start of its hold.
    pub fn retry(&mut self, plan: &Plan, now: UnixMillis) -> Result<Percent, Refused> {
        self.count_time(now);
        match self.state {
            State::Aborted => {
                self.enter(State::Progressing);
                self.failures = 0;
                self.held_ms = 0;
                self.inconclusive_ms = 0;
                Ok(plan.steps()[self.step].v1_percent)
            }
            _ => Err(self.refuse("retry")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ramp::RawPlan;

    const MINUTE: u64 = 60_000;

    fn plan() -> Plan {
        let raw: RawPlan = serde_json::from_str(
            r#"{"steps": [{"v1_percent": 99, "hold": "30m"}, {"v1_percent": 50, "hold": "1h"}, {"v1_percent": 0}],
                "analysis": {"interval": "1m", "failure_limit": 3, "inconclusive_timeout": "20m"}}"#,
        )
        .unwrap();
        Plan::try_from_raw(raw, "ramp").unwrap()
    }

    fn percent(value: f64) -> Percent {
        Percent::try_from_f64(value).unwrap()
    }

    /// Judges every minute from `from` for `minutes`, with `verdict`; returns the shares applied.
    fn run(
        progress: &mut Progress,
        plan: &Plan,
        from: u64,
        minutes: u64,
        verdict: Verdict,
    ) -> Vec<(u64, Percent)> {
        (1..=minutes)
            .filter_map(|m| {
                let now = from + m * MINUTE;
                progress.judged(plan, now, verdict, true).map(|p| (m, p))
            })
            .collect()
    }

    #[test]
    fn a_healthy_ramp_holds_each_step_then_completes() {
        let plan = plan();
        let (mut progress, first) = Progress::start(&plan, 0);
        assert_eq!(first, percent(99.0));
        let applied = run(&mut progress, &plan, 0, 200, Verdict::Pass);
        // 30 minutes at 99 %, then 60 at 50 %, then 0 % and done.
        assert_eq!(applied, vec![(30, percent(50.0)), (90, percent(0.0))]);
        assert_eq!(progress.state, State::Completed);
    }

    #[test]
    fn failures_in_a_row_abort_to_v1_and_retry_starts_the_step_again() {
        let plan = plan();
        let (mut progress, _) = Progress::start(&plan, 0);
        run(&mut progress, &plan, 0, 30, Verdict::Pass);
        assert_eq!(progress.step, 1);
        // Two failures, a pass, two failures: never three in a row.
        for (m, verdict) in [Verdict::Fail, Verdict::Fail, Verdict::Pass, Verdict::Fail, Verdict::Fail]
            .into_iter()
            .enumerate()
        {
            assert_eq!(progress.judged(&plan, (31 + m as u64) * MINUTE, verdict, true), None);
        }
        assert_eq!(progress.judged(&plan, 36 * MINUTE, Verdict::Fail, true), Some(Percent::HUNDRED));
        assert_eq!(progress.state, State::Aborted);
        assert_eq!(progress.v1_percent(&plan), Percent::HUNDRED);
        assert_eq!(
            run(&mut progress, &plan, 36 * MINUTE, 100, Verdict::Pass),
            vec![],
            "aborted stays aborted"
        );
        assert_eq!(
            progress.resume(200 * MINUTE).unwrap_err().to_string(),
            "cannot resume a ramp that is aborted"
        );

        assert_eq!(progress.retry(&plan, 200 * MINUTE), Ok(percent(50.0)));
        assert_eq!(progress.hold_left(&plan), Duration::from_secs(3600), "the step's whole hold again");
    }

    #[test]
    fn an_inconclusive_step_holds_then_pauses_at_the_timeout() {
        let plan = plan();
        let (mut progress, _) = Progress::start(&plan, 0);
        // 25 minutes pass, then 20 are inconclusive: the 30-minute hold is over, but the step
        // does not advance, and after 20 inconclusive minutes the ramp pauses.
        assert_eq!(run(&mut progress, &plan, 0, 25, Verdict::Pass), vec![]);
        assert_eq!(run(&mut progress, &plan, 25 * MINUTE, 20, Verdict::Inconclusive), vec![]);
        assert_eq!(progress.state, State::Paused(PauseReason::Inconclusive));
        assert_eq!(progress.step, 0);
        progress.resume(45 * MINUTE).unwrap();
        assert_eq!(run(&mut progress, &plan, 45 * MINUTE, 1, Verdict::Pass), vec![(1, percent(50.0))]);
    }

    #[test]
    fn time_paused_or_not_running_is_not_held() {
        let plan = plan();
        let (mut progress, _) = Progress::start(&plan, 0);
        run(&mut progress, &plan, 0, 10, Verdict::Pass);
        progress.pause(10 * MINUTE).unwrap();
        run(&mut progress, &plan, 10 * MINUTE, 60, Verdict::Pass);
        progress.resume(70 * MINUTE).unwrap();
        assert_eq!(progress.hold_left(&plan), Duration::from_secs(20 * 60), "the pause did not count");

        // Stored and read back after a restart an hour later: the hour does not count either.
        let stored = serde_json::to_string(&progress).unwrap();
        let mut restarted: Progress = serde_json::from_str(&stored).unwrap();
        assert_eq!(restarted.judged(&plan, 130 * MINUTE, Verdict::Pass, true), None);
        assert_eq!(restarted.hold_left(&plan), Duration::from_secs(20 * 60));
        assert_eq!(run(&mut restarted, &plan, 130 * MINUTE, 20, Verdict::Pass), vec![(20, percent(50.0))]);
    }

    #[test]
    fn promote_moves_on_at_once_and_abort_keeps_the_step() {
        let plan = plan();
        let (mut progress, _) = Progress::start(&plan, 0);
        assert_eq!(progress.promote(&plan, MINUTE), Ok(percent(50.0)));
        assert_eq!(progress.abort(2 * MINUTE), Ok(Percent::HUNDRED));
        assert_eq!(progress.step, 1);
        assert_eq!(progress.promote(&plan, 3 * MINUTE).unwrap_err().state, "aborted");
        progress.retry(&plan, 4 * MINUTE).unwrap();
        assert_eq!(progress.promote(&plan, 5 * MINUTE), Ok(percent(0.0)));
        assert_eq!(progress.state, State::Completed);
        assert!(progress.pause(6 * MINUTE).is_err());
    }

    /// A last step with a hold completes once held; it is not a step past the plan's end.
    #[test]
    fn a_held_last_step_completes_when_its_hold_is_done() {
        let raw: RawPlan = serde_json::from_str(
            r#"{"steps": [{"v1_percent": 50, "hold": "10m"}, {"v1_percent": 0, "hold": "10m"}],
                "analysis": {"interval": "1m"}}"#,
        )
        .unwrap();
        let plan = Plan::try_from_raw(raw, "ramp").unwrap();
        let (mut progress, _) = Progress::start(&plan, 0);
        assert_eq!(run(&mut progress, &plan, 0, 10, Verdict::Pass), vec![(10, percent(0.0))]);
        assert_eq!(run(&mut progress, &plan, 10 * MINUTE, 9, Verdict::Pass), vec![]);
        assert_eq!((progress.state, progress.step), (State::Progressing, 1));
        assert_eq!(run(&mut progress, &plan, 19 * MINUTE, 1, Verdict::Pass), vec![(1, percent(0.0))]);
        assert_eq!((progress.state, progress.step), (State::Completed, 1));
        let (mut promoted, _) = Progress::start(&plan, 0);
        promoted.promote(&plan, MINUTE).unwrap();
        assert_eq!(promoted.promote(&plan, 2 * MINUTE), Ok(percent(0.0)));
        assert_eq!((promoted.state, promoted.step), (State::Completed, 1));
    }

    /// A step that is done waits for its gates: it holds, still judged, until they open.
    #[test]
    fn a_done_step_waits_for_its_gates() {
        let plan = plan();
        let (mut progress, _) = Progress::start(&plan, 0);
        for minute in 1..=40 {
            assert_eq!(progress.judged(&plan, minute * MINUTE, Verdict::Pass, false), None);
        }
        assert!(progress.awaits_gates(&plan, Verdict::Pass));
        assert!(!progress.awaits_gates(&plan, Verdict::Inconclusive));
        assert_eq!(progress.step, 0);
        assert_eq!(progress.judged(&plan, 41 * MINUTE, Verdict::Pass, true), Some(percent(50.0)));
        assert!(!progress.awaits_gates(&plan, Verdict::Pass), "a new step's hold starts");
    }
}
