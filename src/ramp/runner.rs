//! Runs the ramp in a running proxy: every analysis interval it reads the proxy's counters,
//! judges the window, moves the machine, applies the share of new sessions through the control
//! plane (audited as the actor `ramp`), and stores the ramp, so a restart resumes it where it
//! was.
//!
//! The admin API ([`crate::admin`]) hands it the operator's plan and commands; the judgement is
//! [`super::guard`]'s and the states are [`super::machine`]'s.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::guard::{judge, Judgement};
use super::machine::{Progress, Refused, State};
use super::window::{Readings, Totals};
use crate::clock::UnixMillis;
use crate::config::ramp::{Plan, PlanError, RawPlan};
use crate::config::Percent;
use crate::control::{Actor, Control, ControlError};
use crate::shared::Shared;
use crate::store::Op;

/// How many judgements `GET /ramp` shows.
const SHOWN_JUDGEMENTS: usize = 10;

/// What is stored: the plan as written and where the ramp is.
#[derive(Debug, Serialize, Deserialize)]
struct Record {
    plan: RawPlan,
    progress: Progress,
    /// v2's session count when the current step began.
    step_sessions: u64,
}

/// Why a ramp request was refused. Nothing was changed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RampError {
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Refused(#[from] Refused),
    #[error("a ramp is {0}; abort it before starting another")]
    Running(&'static str),
    #[error("no ramp has been started")]
    NoRamp,
    #[error("the ramp runs on one replica only for now; fleet mode does not drive it yet")]
    Fleet,
    #[error(transparent)]
    Control(#[from] ControlError),
}

struct Current {
    plan: Plan,
    progress: Progress,
    step_sessions: u64,
    judgements: VecDeque<(UnixMillis, Judgement)>,
    judged_at: Option<UnixMillis>,
}

/// The ramp of one proxy: none, or one plan and where it is.
pub(crate) struct Ramp {
    shared: Arc<Shared>,
    control: Arc<Control>,
    state: tokio::sync::Mutex<(Option<Current>, Readings)>,
    /// The config file's plan, to start once the proxy serves, if no ramp was stored.
    from_file: std::sync::Mutex<Option<RawPlan>>,
}

impl Ramp {
    /// The ramp as stored (`stored`: the record's JSON), resumed where it was; a record this
    /// build cannot read is reported and left alone. Without a stored ramp, `from_file` (the
    /// config file's plan) starts once the proxy serves ([`run`]).
    pub(crate) fn new(
        shared: Arc<Shared>,
        control: Arc<Control>,
        stored: Option<&[u8]>,
        from_file: Option<&Plan>,
    ) -> Ramp {
        let from_file = std::sync::Mutex::new(from_file.filter(|_| stored.is_none()).map(Plan::to_raw));
        let current = stored.and_then(|json| {
            let record: Record = serde_json::from_slice(json)
                .map_err(|error| warn!(%error, "the stored ramp cannot be read; starting without it"))
                .ok()?;
            let plan = Plan::try_from_raw(record.plan, "ramp")
                .map_err(|error| warn!(%error, "the stored ramp's plan is not valid; starting without it"))
                .ok()?;
            info!(state = record.progress.state.as_str(), step = record.progress.step, "resuming the ramp");
            Some(Current {
                plan,
                progress: record.progress,
                step_sessions: record.step_sessions,
                judgements: VecDeque::new(),
                judged_at: None,
            })
        });
        let ramp = Ramp {
            shared,
            control,
            state: tokio::sync::Mutex::new((current, Readings::default())),
            from_file,
        };
        if let Ok(state) = ramp.state.try_lock() {
            ramp.show(state.0.as_ref());
        }
        ramp
    }

    /// Whether a ramp is progressing or paused: the operator's own percentage changes then
    /// need `force`.
    pub(crate) async fn is_active(&self) -> bool {
        let state = self.state.lock().await;
        state.0.as_ref().is_some_and(|c| matches!(c.progress.state, State::Progressing | State::Paused(_)))
    }

    /// Starts `plan` at its first step; with `expected`, only if the running configuration is
    /// still that revision (`If-Match`).
    pub(crate) async fn start(
        &self,
        raw: RawPlan,
        expected: Option<u64>,
        actor: &Actor,
    ) -> Result<Value, RampError> {
        if self.shared.fleet().is_some() {
            return Err(RampError::Fleet);
        }
        let plan = Plan::try_from_raw(raw, "ramp")?;
        let mut state = self.state.lock().await;
        if let Some(current) = &state.0 {
            if matches!(current.progress.state, State::Progressing | State::Paused(_)) {
                return Err(RampError::Running(current.progress.state.as_str()));
            }
        }
        self.control.expect_revision(expected).await?;
        let now = self.shared.now();
        let (progress, percent) = Progress::start(&plan, now);
        self.apply(percent, actor).await?;
        let (current, readings) = &mut *state;
        readings.clear();
        readings.record(Totals::read(self.shared.metrics(), now), plan.analysis().window);
        let step_sessions = readings.v2_sessions();
        *current = Some(Current {
            plan,
            progress,
            step_sessions,
            judgements: VecDeque::new(),
            judged_at: Some(now),
        });
        info!(actor = %actor.0, "ramp started");
        self.store(current.as_ref()).await?;
        Ok(describe(current.as_ref(), now))
    }

    /// The ramp in brief, for `GET /status`: state, step and share.
    pub(crate) async fn summary(&self) -> Value {
        let state = self.state.lock().await;
        match state.0.as_ref() {
            None => json!({ "state": "none" }),
            Some(ramp) => json!({
                "state": ramp.progress.state.as_str(),
                "step": ramp.progress.step,
                "steps": ramp.plan.steps().len(),
                "v1_percent": ramp.progress.v1_percent(&ramp.plan).as_f64(),
            }),
        }
    }

    /// `GET /ramp`.
    pub(crate) async fn status(&self) -> Value {
        let state = self.state.lock().await;
        describe(state.0.as_ref(), self.shared.now())
    }

    /// An operator's command: pause, resume, abort, promote or retry.
    pub(crate) async fn command(&self, command: &str, actor: &Actor) -> Result<Value, RampError> {
        let mut state = self.state.lock().await;
        let (current, readings) = &mut *state;
        let now = self.shared.now();
        let ramp = current.as_mut().ok_or(RampError::NoRamp)?;
        let mut progress = ramp.progress.clone();
        let percent = match command {
            "pause" => progress.pause(now).map(|()| None)?,
            "resume" => progress.resume(now).map(|()| None)?,
            "abort" => Some(progress.abort(now)?),
            "promote" => Some(progress.promote(&ramp.plan, now)?),
            "retry" => Some(progress.retry(&ramp.plan, now)?),
            _ => unreachable!("the admin API routes only these commands"),
        };
        if let Some(percent) = percent {
            self.apply(percent, actor).await?;
        }
        if progress.step != ramp.progress.step || command == "retry" {
            readings.clear();
            readings.record(Totals::read(self.shared.metrics(), now), ramp.plan.analysis().window);
            ramp.step_sessions = readings.v2_sessions();
        }
        ramp.progress = progress;
        info!(actor = %actor.0, command, state = ramp.progress.state.as_str(), step = ramp.progress.step, "ramp command");
        self.store(current.as_ref()).await?;
        Ok(describe(current.as_ref(), now))
    }

    /// The operator set the percentage by hand (forced, during a ramp): the ramp pauses, so it
    /// does not undo the change at its next step.
    pub(crate) async fn overridden(&self, actor: &Actor) {
        let mut state = self.state.lock().await;
        let now = self.shared.now();
        if let Some(ramp) = state.0.as_mut() {
            if ramp.progress.pause(now).is_ok() {
                info!(actor = %actor.0, "ramp paused: the legacy percentage was set by hand");
                let _ = self.store(state.0.as_ref()).await;
            }
        }
    }

    /// One analysis, if one is due: reads the counters, judges the window and moves the ramp.
    pub(crate) async fn analyse(&self) {
        let mut state = self.state.lock().await;
        let (current, readings) = &mut *state;
        let Some(ramp) = current.as_mut() else { return };
        let now = self.shared.now();
        let analysis = ramp.plan.analysis().clone();
        readings.record(Totals::read(self.shared.metrics(), now), analysis.window);
        let due =
            ramp.judged_at.is_none_or(|at| now.saturating_sub(at) >= analysis.interval.as_millis() as u64);
        if ramp.progress.state != State::Progressing || !due {
            // Time paused, or between analyses, is counted (or not) by the machine.
            return;
        }
        let Some(sample) = readings.window(analysis.window, ramp.step_sessions) else {
            ramp.judged_at = Some(now);
            return;
        };
        let judgement = judge(&sample, &analysis);
        self.shared.metrics().ramp_analysed(
            judgement.verdict.as_str(),
            judgement.v2_error_ratio,
            judgement.v2_p99_range.map(|(_, upper)| upper),
        );
        let mut progress = ramp.progress.clone();
        let percent = progress.judged(&ramp.plan, now, judgement.verdict);
        if let Some(percent) = percent {
            if let Err(error) = self.apply(percent, &Actor("ramp".to_owned())).await {
                // Tried again at the next analysis; the ramp has not moved.
                warn!(%error, "the ramp could not apply its next share of new sessions");
                return;
            }
        }
        if progress.step != ramp.progress.step {
            readings.clear();
            readings.record(Totals::read(self.shared.metrics(), now), analysis.window);
            ramp.step_sessions = readings.v2_sessions();
        }
        if progress.state != ramp.progress.state || progress.step != ramp.progress.step {
            info!(state = progress.state.as_str(), step = progress.step, verdict = ?judgement.verdict, "ramp moved");
        }
        ramp.progress = progress;
        ramp.judged_at = Some(now);
        ramp.judgements.push_front((now, judgement));
        ramp.judgements.truncate(SHOWN_JUDGEMENTS);
        if let Err(error) = self.store(current.as_ref()).await {
            warn!(%error, "the ramp's progress could not be stored");
        }
    }

    async fn apply(&self, percent: Percent, actor: &Actor) -> Result<(), RampError> {
        if self.shared.snapshot().router.legacy_v1_percent() != percent {
            self.control.set_legacy_percent(percent, None, actor).await?;
        }
        Ok(())
    }

    /// Shows the ramp in the metrics and stores it.
    async fn store(&self, current: Option<&Current>) -> Result<(), RampError> {
        self.show(current);
        let Some(current) = current else { return Ok(()) };
        let record = Record {
            plan: current.plan.to_raw(),
            progress: current.progress.clone(),
            step_sessions: current.step_sessions,
        };
        let store = self.shared.store();
        store.send(Op::Ramp(serde_json::to_vec(&record).expect("the ramp serializes")));
        if store.flush().await {
            Ok(())
        } else {
            Err(RampError::Control(ControlError::Store))
        }
    }
}

impl Ramp {
    fn show(&self, current: Option<&Current>) {
        let (state, step) = current.map_or(("none", 0), |c| (c.progress.state.as_str(), c.progress.step));
        // One replica drives ramps: this one, unless it is one of a fleet.
        self.shared.metrics().ramp(state, step, self.shared.fleet().is_none());
    }
}

/// The ramp as `GET /ramp` shows it.
fn describe(current: Option<&Current>, now: UnixMillis) -> Value {
    let Some(ramp) = current else { return json!({ "state": "none" }) };
    let steps = ramp.plan.steps();
    let judgements: Vec<Value> = ramp
        .judgements
        .iter()
        .map(|(at, judgement)| json!({ "at_unix_ms": at, "ago_seconds": now.saturating_sub(*at) as f64 / 1000.0, "judgement": judgement }))
        .collect();
    json!({
        "state": ramp.progress.state.as_str(),
        "paused_by": match ramp.progress.state { State::Paused(reason) => json!(reason), _ => Value::Null },
        "step": ramp.progress.step,
        "steps": steps.len(),
        "v1_percent": ramp.progress.v1_percent(&ramp.plan).as_f64(),
        "hold_left_seconds": ramp.progress.hold_left(&ramp.plan).as_secs_f64(),
        "failures_in_a_row": ramp.progress.failures,
        "inconclusive_seconds": Duration::from_millis(ramp.progress.inconclusive_ms).as_secs_f64(),
        "plan": ramp.plan.to_raw(),
        "analyses": judgements,
    })
}

/// Starts the config file's ramp if there is one to start, then runs an analysis every second
/// (each judges only when its interval is due) until `stop`.
pub(crate) async fn run(ramp: Arc<Ramp>, stop: CancellationToken) {
    let from_file = ramp.from_file.lock().unwrap_or_else(|p| p.into_inner()).take();
    if let Some(plan) = from_file {
        if let Err(error) = ramp.start(plan, None, &Actor("config file".to_owned())).await {
            warn!(%error, "the config file's ramp did not start");
        }
    }
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => ramp.analyse().await,
        }
    }
}
