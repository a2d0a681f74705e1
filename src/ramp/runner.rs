//! Runs the ramp in a running proxy: every analysis interval it reads the proxy's counters,
//! judges the window, moves the machine, applies the share of new sessions through the control
//! plane (audited as the actor `ramp`), and stores the ramp, so a restart resumes it where it
//! was.
//!
//! In a fleet the ramp lives in the fleet store and one replica drives it: the holder of the
//! ramp lease ([`crate::store::fleet::Lease`]), renewed every second. Its writes (the ramp and
//! the share) are fenced by the lease, so a leader that stalled while another took over cannot
//! write any more. The other replicas follow the stored ramp, and take the lease over when the
//! leader stops renewing it; an operator's command on any replica writes the ramp by
//! compare-and-set. Time held in a step counts only while some replica leads, so a takeover
//! never skips a hold.
//!
//! The admin API ([`crate::admin`]) hands it the operator's plan and commands; the judgement is
//! [`super::guard`]'s and the states are [`super::machine`]'s.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::gates::{Answer, Gates};
use super::guard::judge;
use super::machine::{Progress, Refused, State};
use super::window::{FleetReadings, Totals};
use crate::clock::UnixMillis;
use crate::config::ramp::{GateOn, Plan, PlanError, RawPlan};
use crate::config::Percent;
use crate::control::{Actor, Control, ControlError};
use crate::fleet::Fleet;
use crate::shared::Shared;
use crate::store::fleet::{Lease, RampWrite};
use crate::store::Op;

/// How many judgements `GET /ramp` shows.
const SHOWN_JUDGEMENTS: usize = 10;

/// How often an operator's command is tried again when the leader wrote the ramp meanwhile.
const COMMAND_ATTEMPTS: usize = 3;

/// What is stored: the plan as written, where the ramp is, and its last judgements.
#[derive(Debug, Serialize, Deserialize)]
struct Record {
    plan: RawPlan,
    progress: Progress,
    /// Newest first, as `GET /ramp` shows them.
    #[serde(default)]
    analyses: VecDeque<Value>,
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
    #[error("the ramp kept changing on another replica meanwhile; read it and try again")]
    Moved,
    #[error(transparent)]
    Control(#[from] ControlError),
}

#[derive(Clone)]
struct Current {
    plan: Plan,
    progress: Progress,
    analyses: VecDeque<Value>,
    judged_at: Option<UnixMillis>,
    /// The stored record's version in the fleet store (0 on one replica).
    version: u64,
    /// The record as last read from or written to the fleet store.
    stored: Vec<u8>,
    /// The step the gates last let the ramp move on to, and in which epoch.
    gates_open_for: Option<(u64, usize)>,
    /// The gates' last answers about moving on from this step.
    gate_answers: Option<GateAnswers>,
}

#[derive(Clone, Serialize)]
struct GateAnswers {
    to_step: usize,
    open: bool,
    answers: Vec<Answer>,
}

/// What an analysis leaves to do once the ramp is unlocked: calls to gates, which may take a
/// while.
enum FollowUp {
    /// The step is done: ask the step gates whether to move on to step `to`.
    AskGates { plan: Plan, to: usize, epoch: u64 },
    /// The ramp aborted: tell the abort gates.
    TellAbort { plan: Plan, step: usize, why: String },
}

impl Current {
    fn new(plan: Plan, progress: Progress) -> Current {
        Current {
            plan,
            progress,
            analyses: VecDeque::new(),
            judged_at: None,
            version: 0,
            stored: Vec::new(),
            gates_open_for: None,
            gate_answers: None,
        }
    }

    /// Whether the gates let the ramp move on from its step (or it has none to ask).
    fn gates_open(&self) -> bool {
        self.plan.gates(GateOn::Step).next().is_none()
            || self.gates_open_for == Some((self.progress.epoch, self.progress.step + 1))
    }

    /// A stored record, read back; `None` (reported) if this build cannot read it.
    fn read(json: &[u8]) -> Option<Current> {
        let record: Record = serde_json::from_slice(json)
            .map_err(|error| warn!(%error, "the stored ramp cannot be read; leaving it alone"))
            .ok()?;
        let plan = Plan::try_from_raw(record.plan, "ramp")
            .map_err(|error| warn!(%error, "the stored ramp's plan is not valid; leaving it alone"))
            .ok()?;
        if record.progress.step >= plan.steps().len() {
            warn!(
                step = record.progress.step,
                "the stored ramp is at a step its plan does not have; leaving it alone"
            );
            return None;
        }
        let mut current = Current::new(plan, record.progress);
        current.analyses = record.analyses;
        current.stored = json.to_vec();
        Some(current)
    }

    fn to_json(&self) -> Vec<u8> {
        let record = Record {
            plan: self.plan.to_raw(),
            progress: self.progress.clone(),
            analyses: self.analyses.clone(),
        };
        serde_json::to_vec(&record).expect("the ramp serializes")
    }

    fn is_active(&self) -> bool {
        matches!(self.progress.state, State::Progressing | State::Paused(_))
    }

    /// Starts counting the step's window, sessions and time afresh on this replica, when it
    /// starts driving the ramp: what it read and counted so far was not the driver's.
    fn restart_step_counts(&mut self, readings: &mut FleetReadings) {
        readings.restart_step(true);
        self.progress.counted_at = None;
        self.judged_at = None;
    }
}

/// This replica's part in driving a fleet's ramp.
#[derive(Default)]
struct Leading {
    /// The ramp lease while this replica holds it, and until when it surely does.
    held: Option<(Lease, Instant)>,
    /// The replica the store last said holds the lease.
    holder: Option<String>,
}

impl Leading {
    /// The lease, while this replica surely still holds it.
    fn current(&self) -> Option<Lease> {
        self.held.as_ref().filter(|(_, until)| Instant::now() < *until).map(|(lease, _)| lease.clone())
    }
}

/// The ramp of one proxy (or of its fleet): none, or one plan and where it is.
pub(crate) struct Ramp {
    shared: Arc<Shared>,
    control: Arc<Control>,
    state: tokio::sync::Mutex<(Option<Current>, FleetReadings)>,
    /// The config file's plan, to start once the proxy serves, if no ramp was stored.
    from_file: std::sync::Mutex<Option<RawPlan>>,
    leading: std::sync::Mutex<Leading>,
    gates: Arc<Gates>,
    /// Whether a round of asking the step gates is under way.
    asking: std::sync::atomic::AtomicBool,
}

impl Ramp {
    /// The ramp as stored (`stored`: the record's JSON, from the embedded store), resumed where
    /// it was; a record this build cannot read is reported and left alone. Without a stored
    /// ramp, `from_file` (the config file's plan) starts once the proxy serves ([`run`]). In a
    /// fleet, `stored` is ignored: the fleet store's ramp is read every second.
    pub(crate) fn new(
        shared: Arc<Shared>,
        control: Arc<Control>,
        stored: Option<&[u8]>,
        from_file: Option<&Plan>,
    ) -> Ramp {
        let stored = stored.filter(|_| shared.fleet().is_none());
        let from_file = std::sync::Mutex::new(from_file.filter(|_| stored.is_none()).map(Plan::to_raw));
        let current = stored.and_then(Current::read);
        if let Some(current) = &current {
            info!(state = current.progress.state.as_str(), step = current.progress.step, "resuming the ramp");
        }
        let ramp = Ramp {
            shared,
            control,
            state: tokio::sync::Mutex::new((current, FleetReadings::default())),
            from_file,
            leading: std::sync::Mutex::new(Leading::default()),
            gates: Arc::new(Gates::new()),
            asking: std::sync::atomic::AtomicBool::new(false),
        };
        if let Ok(state) = ramp.state.try_lock() {
            ramp.show(state.0.as_ref());
        }
        ramp
    }

    /// Whether a ramp is progressing or paused: the operator's own percentage changes then
    /// need `force`.
    pub(crate) async fn is_active(&self) -> bool {
        let mut state = self.state.lock().await;
        self.refresh(&mut state).await;
        state.0.as_ref().is_some_and(Current::is_active)
    }

    /// Starts `plan` at its first step; with `expected`, only if the running configuration is
    /// still that revision (`If-Match`).
    pub(crate) async fn start(
        &self,
        raw: RawPlan,
        expected: Option<u64>,
        actor: &Actor,
    ) -> Result<Value, RampError> {
        let plan = Plan::try_from_raw(raw, "ramp")?;
        let mut state = self.state.lock().await;
        self.refresh(&mut state).await;
        let (current, readings) = &mut *state;
        if let Some(current) = current.as_ref().filter(|c| c.is_active()) {
            return Err(RampError::Running(current.progress.state.as_str()));
        }
        self.control.expect_revision(expected).await?;
        let now = self.shared.now();
        let (progress, percent) = Progress::start(&plan, now);
        readings.restart_step(true);
        self.read_own(readings, now, plan.analysis().window);
        let mut next = Current::new(plan, progress);
        next.judged_at = Some(now);
        next.version = current.as_ref().map_or(0, |c| c.version);
        self.commit(&mut next, Some(percent), None, actor).await?;
        *current = Some(next);
        info!(actor = %actor.0, "ramp started");
        self.shared.journal(
            &actor.0,
            "ramp_start",
            format!("{} steps", current.as_ref().map_or(0, |c| c.plan.steps().len())),
        );
        Ok(self.describe(current.as_ref(), now))
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
        let mut state = self.state.lock().await;
        self.refresh(&mut state).await;
        self.describe(state.0.as_ref(), self.shared.now())
    }

    /// An operator's command: pause, resume, abort, promote or retry.
    pub(crate) async fn command(&self, command: &str, actor: &Actor) -> Result<Value, RampError> {
        let mut state = self.state.lock().await;
        for _ in 0..COMMAND_ATTEMPTS {
            self.refresh(&mut state).await;
            let (current, readings) = &mut *state;
            let now = self.shared.now();
            let ramp = current.as_ref().ok_or(RampError::NoRamp)?;
            let mut next = ramp.clone();
            let percent = match command {
                "pause" => next.progress.pause(now).map(|()| None)?,
                "resume" => next.progress.resume(now).map(|()| None)?,
                "abort" => Some(next.progress.abort(now)?),
                "promote" => Some(next.progress.promote(&ramp.plan, now)?),
                "retry" => Some(next.progress.retry(&ramp.plan, now)?),
                _ => unreachable!("the admin API routes only these commands"),
            };
            if next.progress.step != ramp.progress.step || command == "retry" {
                readings.restart_step(true);
                self.read_own(readings, now, ramp.plan.analysis().window);
            }
            next.gates_open_for = None;
            next.gate_answers = None;
            match self.commit(&mut next, percent, None, actor).await {
                Err(RampError::Moved) => continue,
                committed => committed?,
            }
            info!(actor = %actor.0, command, state = next.progress.state.as_str(), step = next.progress.step, "ramp command");
            self.shared.journal(
                &actor.0,
                &format!("ramp_{command}"),
                format!("{} at step {}", next.progress.state.as_str(), next.progress.step + 1),
            );
            if command == "abort" {
                self.tell_abort(next.plan.clone(), next.progress.step, format!("aborted by {}", actor.0));
            }
            *current = Some(next);
            return Ok(self.describe(current.as_ref(), now));
        }
        Err(RampError::Moved)
    }

    /// The operator is about to set the percentage by hand (forced, during a ramp): the ramp
    /// pauses first, so it does not put its own share back. If it cannot pause, the hand-set
    /// share must not go ahead either.
    pub(crate) async fn overridden(&self, actor: &Actor) -> Result<(), RampError> {
        match self.command("pause", actor).await {
            // Paused meanwhile by someone else: as good.
            Ok(_) | Err(RampError::Refused(_)) => {
                info!(actor = %actor.0, "ramp paused: the legacy percentage is set by hand");
                Ok(())
            }
            Err(error) => Err(error),
        }
    }

    /// Starts the config file's plan, once; the first replica of a fleet to write it wins.
    async fn start_from_file(&self) {
        let from_file = self.from_file.lock().unwrap_or_else(|p| p.into_inner()).take();
        let Some(plan) = from_file else { return };
        match self.start(plan, None, &Actor("config file".to_owned())).await {
            Ok(_) | Err(RampError::Moved) => {}
            Err(error) => warn!(%error, "the config file's ramp did not start"),
        }
    }

    /// What the background task does every second: in a fleet, takes or renews the lease and
    /// reads the fleet's ramp; then one analysis, if one is due and this replica drives.
    pub(crate) async fn tick(self: &Arc<Self>) {
        let mut state = self.state.lock().await;
        if let Some(fleet) = self.shared.fleet() {
            let was = self.lease();
            let lease = self.renew(fleet, was.as_ref()).await;
            if self.refresh(&mut state).await == Some(false) && self.has_plan_from_file() {
                drop(state);
                self.start_from_file().await;
                state = self.state.lock().await;
            }
            self.publish_own(fleet, state.0.as_ref()).await;
            let (current, readings) = &mut *state;
            if lease.is_some() && lease != was {
                // Counted from here, on this replica's own counters.
                if let Some(ramp) = current.as_mut() {
                    ramp.restart_step_counts(readings);
                    info!(
                        state = ramp.progress.state.as_str(),
                        step = ramp.progress.step,
                        "this replica now drives the ramp"
                    );
                }
            }
        }
        let follow_up = self.analyse(&mut state).await;
        self.settle_share(state.0.as_ref()).await;
        self.show(state.0.as_ref());
        drop(state);
        match follow_up {
            Some(FollowUp::AskGates { plan, to, epoch }) => self.ask_gates(plan, to, epoch),
            Some(FollowUp::TellAbort { plan, step, why }) => self.tell_abort(plan, step, why),
            None => {}
        }
    }

    /// Asks the step gates about moving on to step `to`, in the background (one round at a
    /// time): gates may take a while, and meanwhile the lease is renewed and the step judged
    /// on. If they all say yes, the next tick judges at once and moves the ramp on if the window
    /// still passes; answers about an `epoch` the ramp has left are dropped.
    fn ask_gates(self: &Arc<Self>, plan: Plan, to: usize, epoch: u64) {
        if self.asking.swap(true, std::sync::atomic::Ordering::AcqRel) {
            return;
        }
        let ramp = self.clone();
        tokio::spawn(async move {
            let answers = ramp.gates.ask(&plan, to, ramp.shared.now(), ramp.shared.metrics()).await;
            for answer in &answers {
                let said = answer.said();
                ramp.shared.journal(
                    "ramp",
                    "ramp_gate",
                    format!("{} before step {}: {said}", answer.gate, to + 1),
                );
            }
            let mut state = ramp.state.lock().await;
            ramp.asking.store(false, std::sync::atomic::Ordering::Release);
            let Some(current) = state.0.as_mut() else { return };
            if current.progress.epoch != epoch || current.progress.step + 1 != to {
                return;
            }
            let open = answers.iter().all(|answer| answer.open);
            current.gate_answers = Some(GateAnswers { to_step: to, open, answers });
            if open {
                current.gates_open_for = Some((epoch, to));
                current.judged_at = None;
            } else {
                info!(to_step = to, "the ramp's gates hold the step");
            }
        });
    }

    /// Tells the abort gates, in the background: an abort never waits for them.
    fn tell_abort(&self, plan: Plan, step: usize, why: String) {
        if plan.gates(GateOn::Abort).next().is_none() {
            return;
        }
        let (gates, shared) = (self.gates.clone(), self.shared.clone());
        tokio::spawn(async move {
            for answer in gates.tell_abort(&plan, step, &why, shared.now(), shared.metrics()).await {
                let said = answer.said();
                shared.journal("ramp", "ramp_gate", format!("{} told of the abort: {said}", answer.gate));
            }
        });
    }

    /// One analysis, if one is due and this replica drives the ramp: reads the counters,
    /// judges the window and moves the ramp. Answers what is left to do unlocked.
    async fn analyse(&self, state: &mut (Option<Current>, FleetReadings)) -> Option<FollowUp> {
        let (current, readings) = state;
        let ramp = current.as_mut()?;
        let now = self.shared.now();
        let analysis = ramp.plan.analysis().clone();
        self.read_own(readings, now, analysis.window);
        let lease = self.lease();
        if let Some(fleet) = self.shared.fleet() {
            // Only the driving replica judges.
            lease.as_ref()?;
            if ramp.progress.state == State::Progressing {
                self.read_fleet(fleet, readings, now, analysis.window).await;
            }
        }
        let due =
            ramp.judged_at.is_none_or(|at| now.saturating_sub(at) >= analysis.interval.as_millis() as u64);
        if ramp.progress.state != State::Progressing || !due {
            // Time paused, or between analyses, is counted (or not) by the machine.
            return None;
        }
        let Some(sample) = readings.window(analysis.window) else {
            ramp.judged_at = Some(now);
            return None;
        };
        let judgement = judge(&sample, &analysis);
        self.shared.metrics().ramp_analysed(
            judgement.verdict.as_str(),
            judgement.v2_error_ratio,
            judgement.v2_p99_range.map(|(_, upper)| upper),
        );
        let mut next = ramp.clone();
        let verdict = judgement.verdict;
        let percent = next.progress.judged(&ramp.plan, now, verdict, ramp.gates_open());
        if next.progress.step != ramp.progress.step {
            next.gate_answers = None;
            readings.restart_step(true);
            self.read_own(readings, now, analysis.window);
        }
        next.judged_at = Some(now);
        next.analyses.push_front(json!({ "at_unix_ms": now, "judgement": judgement }));
        next.analyses.truncate(SHOWN_JUDGEMENTS);
        if let Err(error) = self.commit(&mut next, percent, lease.as_ref(), &Actor("ramp".to_owned())).await {
            // The ramp has not moved: judged again at the next analysis (or, fenced, by the
            // replica that now drives it).
            warn!(error = %crate::ErrorChain(&error), "the ramp's progress could not be stored");
            return None;
        }
        if next.progress.state != ramp.progress.state || next.progress.step != ramp.progress.step {
            info!(state = next.progress.state.as_str(), step = next.progress.step, verdict = ?verdict, "ramp moved");
            self.shared.journal(
                "ramp",
                "ramp_moved",
                format!(
                    "{} at step {} ({})",
                    next.progress.state.as_str(),
                    next.progress.step + 1,
                    verdict.as_str()
                ),
            );
        }
        let aborted = next.progress.state == State::Aborted && ramp.progress.state != State::Aborted;
        *ramp = next;
        let step = ramp.progress.step;
        if aborted {
            let why = format!("{} failed analyses in a row", analysis.failure_limit);
            return Some(FollowUp::TellAbort { plan: ramp.plan.clone(), step, why });
        }
        (ramp.progress.awaits_gates(&ramp.plan, verdict) && !ramp.gates_open()).then(|| FollowUp::AskGates {
            plan: ramp.plan.clone(),
            to: step + 1,
            epoch: ramp.progress.epoch,
        })
    }

    /// While the ramp progresses, keeps the share at its step's: after a takeover, or when
    /// applying a stored step's share failed.
    async fn settle_share(&self, current: Option<&Current>) {
        let lease = self.lease();
        if self.shared.fleet().is_some() && lease.is_none() {
            return;
        }
        let Some(ramp) = current.filter(|c| c.progress.state == State::Progressing) else { return };
        let percent = ramp.progress.v1_percent(&ramp.plan);
        if let Err(error) = self.apply(percent, lease.as_ref(), &Actor("ramp".to_owned())).await {
            warn!(error = %crate::ErrorChain(&error), "the ramp could not apply its share of new sessions; trying again");
        }
    }

    /// Stores `next` and applies `percent`, the share it decided on, in the order that leaves
    /// the two agreeing when either fails. A progressing ramp is stored first: its share is
    /// applied again every second until it holds ([`Ramp::settle_share`]). An aborted or
    /// completed one gets its share first, and is stored only once the share holds; if
    /// storing then fails, the ramp is as it was, and a ramp still progressing puts its own
    /// share back.
    async fn commit(
        &self,
        next: &mut Current,
        percent: Option<Percent>,
        lease: Option<&Lease>,
        actor: &Actor,
    ) -> Result<(), RampError> {
        let kept_up = next.progress.state == State::Progressing;
        if let (Some(percent), false) = (percent, kept_up) {
            self.apply(percent, lease, actor).await?;
        }
        self.write(next, lease).await?;
        if let (Some(percent), true) = (percent, kept_up) {
            if let Err(error) = self.apply(percent, lease, actor).await {
                warn!(error = %crate::ErrorChain(&error), "the ramp's share of new sessions is applied again shortly");
            }
        }
        Ok(())
    }

    async fn apply(&self, percent: Percent, lease: Option<&Lease>, actor: &Actor) -> Result<(), RampError> {
        if self.shared.snapshot().router.legacy_v1_percent() != percent {
            self.control.set_legacy_percent_leading(percent, lease, actor).await?;
        }
        Ok(())
    }

    /// Stores `next` (and shows it in the metrics): in the embedded store, or in the fleet
    /// store over the version it was read at, fenced by `lease` for the driving replica's
    /// writes. Refused when the fleet's record moved on or the lease is no longer the store's.
    async fn write(&self, next: &mut Current, lease: Option<&Lease>) -> Result<(), RampError> {
        let json = next.to_json();
        match self.shared.fleet() {
            None => {
                let store = self.shared.store();
                store.send(Op::Ramp(json));
                if !store.flush().await {
                    return Err(RampError::Control(ControlError::Store));
                }
            }
            Some(fleet) => match fleet.write_ramp(next.version, &json, lease).await {
                Ok(RampWrite::Done(version)) => {
                    next.version = version;
                    next.stored = json;
                }
                Ok(RampWrite::Moved) => return Err(RampError::Moved),
                Ok(RampWrite::Fenced) => {
                    self.leading.lock().unwrap_or_else(|p| p.into_inner()).held = None;
                    return Err(RampError::Control(ControlError::Fenced));
                }
                Err(_) => return Err(RampError::Control(ControlError::FleetUnavailable)),
            },
        }
        self.show(Some(next));
        Ok(())
    }
}

/// The fleet side: the lease, and following the stored ramp.
impl Ramp {
    /// This replica's name among the readings.
    fn replica(&self) -> &str {
        self.shared.fleet().map_or("local", |fleet| fleet.replica())
    }

    /// Takes a reading of this replica's own counters.
    fn read_own(&self, readings: &mut FleetReadings, now: UnixMillis, window: Duration) {
        readings.record(self.replica(), Totals::read(self.shared.metrics(), now), window);
    }

    /// Publishes this replica's counters for the driving replica, while the ramp progresses.
    async fn publish_own(&self, fleet: &Fleet, current: Option<&Current>) {
        if current.is_some_and(|c| c.progress.state == State::Progressing) {
            let totals = Totals::read(self.shared.metrics(), self.shared.now());
            let json = serde_json::to_vec(&totals).expect("totals serialize");
            let _ = fleet.publish_totals(&json).await;
        }
    }

    /// Takes a reading of every other replica's published counters, and forgets replicas that
    /// stopped publishing a window (and a minute) ago.
    async fn read_fleet(
        &self,
        fleet: &Fleet,
        readings: &mut FleetReadings,
        now: UnixMillis,
        window: Duration,
    ) {
        let Ok(published) = fleet.ramp_totals().await else { return };
        for (replica, json) in published {
            if replica == fleet.replica() {
                continue;
            }
            match serde_json::from_slice::<Totals>(&json) {
                Ok(totals) => readings.record(&replica, totals, window),
                Err(error) => warn!(%error, replica, "a replica's ramp counters cannot be read; left out"),
            }
        }
        let horizon = window + Duration::from_secs(60);
        let gone = readings.forget_before(now.saturating_sub(horizon.as_millis() as u64));
        let _ = fleet.forget_totals(&gone).await;
    }

    /// The ramp lease, while this replica surely holds it.
    fn lease(&self) -> Option<Lease> {
        let leading = self.leading.lock().unwrap_or_else(|p| p.into_inner());
        leading.current()
    }

    /// Takes or renews the lease; the lease this replica holds afterwards, if any. A store
    /// that does not answer leaves the lease to run out.
    async fn renew(&self, fleet: &Fleet, held: Option<&Lease>) -> Option<Lease> {
        let ttl = fleet.leader_lease();
        let asked = Instant::now();
        let answer = fleet.lease(ttl, held).await;
        let mut leading = self.leading.lock().unwrap_or_else(|p| p.into_inner());
        match answer {
            Ok(lease) => {
                leading.holder = Some(lease.holder().to_owned());
                if lease.holder() == fleet.replica() {
                    // The store set its expiry after `asked`: ours ends no later than its.
                    leading.held = Some((lease, asked + ttl));
                } else {
                    if leading.held.take().is_some() {
                        info!(leader = lease.holder(), "another replica drives the ramp now");
                    }
                }
            }
            Err(_) => leading.holder = None,
        }
        leading.current()
    }

    fn has_plan_from_file(&self) -> bool {
        self.from_file.lock().unwrap_or_else(|p| p.into_inner()).is_some()
    }

    /// Reads the fleet's ramp and makes it this replica's, if it changed. Answers whether the
    /// fleet has a ramp, `None` if the store did not answer (or on one replica).
    async fn refresh(&self, state: &mut (Option<Current>, FleetReadings)) -> Option<bool> {
        let fleet = self.shared.fleet()?;
        let record = fleet.ramp().await.ok()?;
        let (current, readings) = state;
        let exists = record.is_some();
        match record {
            Some(record) => {
                let changed =
                    current.as_ref().is_none_or(|c| c.stored != record.json || c.version != record.version);
                if changed {
                    if let Some(mut read) = Current::read(&record.json) {
                        read.version = record.version;
                        if self.lease().is_some() {
                            // Changed by a command on another replica. Time is counted afresh
                            // (it may have been paused meanwhile); the step's readings and
                            // gates' answers stand if the step is the same.
                            let same_step = current.as_ref().filter(|c| {
                                (c.progress.epoch, c.progress.step)
                                    == (read.progress.epoch, read.progress.step)
                            });
                            match same_step {
                                Some(was) => {
                                    (read.gates_open_for, read.gate_answers) =
                                        (was.gates_open_for, was.gate_answers.clone());
                                }
                                None => readings.restart_step(true),
                            }
                        }
                        *current = Some(read);
                    }
                }
            }
            None => {
                if let Some(ramp) = current.as_mut() {
                    // The store lost its data: the driving replica writes the ramp back.
                    if ramp.version > 0 && self.lease().is_some() {
                        let mut restored = ramp.clone();
                        restored.version = 0;
                        if self.write(&mut restored, self.lease().as_ref()).await.is_ok() {
                            info!("wrote the ramp back to the fleet store, which had lost it");
                            *ramp = restored;
                        }
                    }
                }
            }
        }
        Some(exists)
    }

    /// Gives the lease up at shutdown, so another replica takes the ramp over at once.
    async fn step_down(&self) {
        let Some(fleet) = self.shared.fleet() else { return };
        let held = self.leading.lock().unwrap_or_else(|p| p.into_inner()).held.take();
        if let Some((lease, _)) = held {
            if fleet.release(&lease).await.is_ok() {
                info!("gave up driving the ramp");
            }
        }
    }

    fn show(&self, current: Option<&Current>) {
        let (state, step) = current.map_or(("none", 0), |c| (c.progress.state.as_str(), c.progress.step));
        let leads = self.shared.fleet().is_none() || self.lease().is_some();
        self.shared.metrics().ramp(state, step, leads);
    }

    /// The ramp as `GET /ramp` shows it.
    fn describe(&self, current: Option<&Current>, now: UnixMillis) -> Value {
        let leader = self.shared.fleet().map(|fleet| {
            let holder = self.leading.lock().unwrap_or_else(|p| p.into_inner()).holder.clone();
            json!({ "replica": holder, "this": holder.as_deref() == Some(fleet.replica()) })
        });
        // Without a driver nothing moves and no time counts as held: as good as paused.
        let stalled = leader
            .as_ref()
            .filter(|leader| leader["replica"].is_null())
            .map(|_| "no replica can reach the fleet store to drive the ramp; it stands still");
        let Some(ramp) = current else { return json!({ "state": "none", "leader": leader }) };
        let analyses: Vec<Value> = ramp
            .analyses
            .iter()
            .map(|analysis| {
                let mut analysis = analysis.clone();
                if let Some(at) = analysis["at_unix_ms"].as_u64() {
                    analysis["ago_seconds"] = json!(now.saturating_sub(at) as f64 / 1000.0);
                }
                analysis
            })
            .collect();
        json!({
            "state": ramp.progress.state.as_str(),
            "paused_by": match ramp.progress.state { State::Paused(reason) => json!(reason), _ => Value::Null },
            "step": ramp.progress.step,
            "steps": ramp.plan.steps().len(),
            "v1_percent": ramp.progress.v1_percent(&ramp.plan).as_f64(),
            "hold_left_seconds": ramp.progress.hold_left(&ramp.plan).as_secs_f64(),
            "failures_in_a_row": ramp.progress.failures,
            "inconclusive_seconds": Duration::from_millis(ramp.progress.inconclusive_ms).as_secs_f64(),
            "leader": leader,
            "stalled": stalled,
            "gates": ramp.gate_answers,
            "plan": ramp.plan.to_raw(),
            "analyses": analyses,
        })
    }
}

/// Starts the config file's ramp if there is one to start (in a fleet, once the store says the
/// fleet has none), then ticks ([`Ramp::tick`]) every second until `stop`; in a fleet, then
/// gives the lease up.
pub(crate) async fn run(ramp: Arc<Ramp>, stop: CancellationToken) {
    if ramp.shared.fleet().is_none() {
        ramp.start_from_file().await;
    }
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => ramp.tick().await,
        }
    }
    ramp.step_down().await;
}
