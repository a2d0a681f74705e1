//! Fleet mode at run time: several replicas sharing pins through the fleet store
//! ([`crate::store::fleet`], on Redis).
//!
//! Each replica keeps its full local copy of the pins (the pin table, and the embedded store in
//! `state_dir` under it), so a request for a known session never waits for the network. What
//! the fleet adds:
//! - a new session's pin is claimed in the fleet store before the request is forwarded
//!   ([`Fleet::claim`]): the first writer wins, and a replica that lost a race adopts the winner
//!   and forwards there. (Forwarding first and claiming alongside, as the embedded store's
//!   durability wait does, could send the first request of a session to the version that then
//!   loses the race: a write to the wrong database.)
//! - [`follow`] applies what other replicas change (pins made, refreshed, ended) to the local
//!   copy, from the fleet store's change stream, within about a second;
//! - [`mirror_refreshes`] sends this replica's refreshes to the fleet store in batches, once per
//!   1 % of the idle timeout of a study's activity ([`PinPolicy::from_config`]);
//! - [`share_drain_clock`] shares the drain clock and removes ended pins from the store.
//!
//! When the fleet store cannot be reached, known sessions are served from the local copy as
//! always; a new session is pinned locally by the split (`on_store_error: degrade`) or refused
//! (`fail_closed`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{FleetConfig, OnStoreError, PoolName};
use crate::metrics::Metrics;
use crate::session::{FleetTouch, PinPolicy};
use crate::shared::Shared;
use crate::store::fleet::{
    Change, Changes, Claimed, FleetError, FleetOverrides, FleetStore, Lease, Published, RampRecord, RampWrite,
};
use crate::store::{SplitSalt, StoredPin};

/// How long joining the fleet may take before the replica starts without it.
const JOIN_WAIT: Duration = Duration::from_secs(5);
/// A replica that has not reported for this long is no longer listed in `GET /status`.
const REPLICA_FORGOTTEN_AFTER: Duration = Duration::from_secs(60);
/// How often a replica that started without the fleet store tries to join.
const JOIN_RETRY: Duration = Duration::from_secs(1);
/// How long a new session's claim may take before the store counts as unreachable for it.
const CLAIM_WAIT: Duration = Duration::from_secs(2);
/// How long one read of the change stream waits for something new.
const FOLLOW_WAIT: Duration = Duration::from_millis(500);
/// Pause after a failed read of the change stream.
const FOLLOW_RETRY: Duration = Duration::from_millis(250);
/// Most changes applied per read.
const FOLLOW_BATCH: usize = 10_000;
/// About how many stored pins each replica looks at per second for ended ones to remove: each
/// replica passes over a million pins in under 17 minutes.
const SWEEP_PAGE: usize = 1_000;

/// This replica's link to the fleet store.
pub(crate) struct Fleet {
    store: FleetStore,
    on_error: OnStoreError,
    /// How long the ramp lease lasts without renewal.
    leader_lease: Duration,
    /// Where the change stream stood when this replica read every pin: [`follow`] starts there.
    /// `None` until this replica has joined (it may start while the store is unreachable).
    joined_at: std::sync::Mutex<Option<String>>,
    /// The store's incarnation marker as this replica knows it.
    incarnation: std::sync::Mutex<String>,
    /// Whether the last call to the fleet store succeeded.
    up: AtomicBool,
    /// This process's name in the fleet store.
    replica: String,
    /// The fleet revision this replica has applied, reported to the store every second.
    applied: std::sync::atomic::AtomicU64,
    /// `rollout_store_errors_total`, by operation.
    errors: prometheus::IntCounterVec,
    /// Pins made here while the store was unreachable (`degrade`): written to it, first writer
    /// still winning, once it is back.
    unpublished: std::sync::Mutex<Vec<StoredPin>>,
    /// Bumped each time the store is found to have lost its data, for the control plane to
    /// write the overrides back.
    data_lost: tokio::sync::watch::Sender<u64>,
    /// The latest overrides another replica published, for the control plane to adopt.
    overrides_seen: tokio::sync::watch::Sender<Option<FleetOverrides>>,
}

/// What joining the fleet read: the split salt, every pin, and where the change stream stood
/// before the pins were read (following from there misses nothing).
pub(crate) struct Joined {
    /// The store's incarnation marker when this replica joined.
    pub(crate) incarnation: String,
    pub(crate) salt: SplitSalt,
    pub(crate) pins: Vec<StoredPin>,
    pub(crate) position: String,
    /// The operator's overrides, unless nobody changed any yet.
    pub(crate) overrides: Option<FleetOverrides>,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet").field("store", &self.store).finish_non_exhaustive()
    }
}

impl Fleet {
    /// A link to the fleet store, not yet used: connecting happens on the first call.
    pub(crate) async fn new(config: &FleetConfig, metrics: &Metrics) -> Result<Fleet, FleetError> {
        let store = FleetStore::connect(&config.url, &config.namespace).await?;
        Ok(Fleet {
            store,
            on_error: config.on_store_error,
            leader_lease: config.leader_lease,
            joined_at: std::sync::Mutex::new(None),
            incarnation: std::sync::Mutex::new(String::new()),
            up: AtomicBool::new(false),
            replica: random_id(),
            applied: std::sync::atomic::AtomicU64::new(0),
            errors: metrics.store_errors.clone(),
            unpublished: std::sync::Mutex::new(Vec::new()),
            overrides_seen: tokio::sync::watch::Sender::new(None),
            data_lost: tokio::sync::watch::Sender::new(0),
        })
    }

    /// Reads what a replica starts from: the split salt, every pin, the overrides, and where
    /// the change stream stands.
    pub(crate) async fn join(&self) -> Result<Joined, FleetError> {
        let store = &self.store;
        let joining = async {
            let incarnation = store.incarnation(&random_id()).await?;
            let salt = store.split_salt().await?;
            let position = store.position().await?;
            let pins = store.pins().await?;
            let overrides = store.overrides().await?;
            Ok::<_, FleetError>(Joined { incarnation, salt, pins, position, overrides })
        };
        let joined = tokio::time::timeout(JOIN_WAIT, joining).await.unwrap_or_else(|_| {
            Err(FleetError::Timeout { location: store.location().to_owned(), what: "joining the fleet" })
        });
        let joined = self.note("join", joined)?;
        info!(store = ?store, pins = joined.pins.len(), "joined the fleet");
        *self.incarnation.lock().unwrap_or_else(|p| p.into_inner()) = joined.incarnation.clone();
        *self.joined_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(joined.position.clone());
        Ok(joined)
    }

    /// Whether this replica has joined (read the fleet's state) yet.
    fn has_joined(&self) -> bool {
        self.joined_at.lock().unwrap_or_else(|p| p.into_inner()).is_some()
    }

    pub(crate) fn on_error(&self) -> OnStoreError {
        self.on_error
    }

    pub(crate) fn leader_lease(&self) -> Duration {
        self.leader_lease
    }

    pub(crate) fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Notes how a call to the fleet store (`op`, one of [`crate::metrics::FLEET_OPERATIONS`]) went: counts a
    /// failure, and logs when the store becomes unreachable or reachable again.
    fn note<T>(&self, op: &'static str, result: Result<T, FleetError>) -> Result<T, FleetError> {
        if result.is_err() {
            self.errors.with_label_values(&[op]).inc();
        }
        let was_up = self.up.swap(result.is_ok(), Ordering::Relaxed);
        match &result {
            Err(err) if was_up => warn!(error = %crate::ErrorChain(err), "the fleet store is unreachable"),
            Ok(_) if !was_up => info!("the fleet store is reachable again"),
            _ => {}
        }
        result
    }

    /// Claims `key`'s pin on `proposed` (what this replica's split chose) as of `now`; the
    /// answer is the fleet's pin, which may be another replica's.
    pub(crate) async fn claim(
        &self,
        key: &str,
        proposed: PoolName,
        now: u32,
        policy: &PinPolicy,
    ) -> Result<Claimed, FleetError> {
        let claim = self.store.claim(key, proposed, now, policy);
        let result = tokio::time::timeout(CLAIM_WAIT, claim).await.unwrap_or_else(|_| {
            Err(FleetError::Timeout { location: self.store.location().to_owned(), what: "claiming a pin" })
        });
        self.note("claim", result)
    }

    /// The control plane applied fleet revision `revision`.
    pub(crate) fn applied(&self, revision: u64) {
        self.applied.store(revision, Ordering::Relaxed);
    }

    /// The fleet's replicas as they last reported: (replica, revision applied, Unix ms), this
    /// one included; replicas silent for a minute are left out (and forgotten by the store).
    pub(crate) async fn replicas(&self, now_ms: u64) -> Result<Vec<(String, u64, u64)>, FleetError> {
        let result = self.store.replicas(now_ms, REPLICA_FORGOTTEN_AFTER.as_millis() as u64).await;
        self.note("replicas", result)
    }

    pub(crate) fn replica(&self) -> &str {
        &self.replica
    }

    /// Keeps a pin made while the store was unreachable, to publish once it is back.
    pub(crate) fn remember_unpublished(&self, pin: StoredPin) {
        self.unpublished.lock().unwrap_or_else(|p| p.into_inner()).push(pin);
    }

    /// Makes `json` the fleet's overrides if the fleet revision is still `expected` (and, with
    /// `lease`, while the ramp lease is still that one).
    pub(crate) async fn publish_overrides(
        &self,
        expected: u64,
        json: &[u8],
        lease: Option<&Lease>,
    ) -> Result<Published, FleetError> {
        let result = self.store.publish_overrides(expected, json, lease).await;
        self.note("overrides", result)
    }

    /// Takes or renews the ramp lease for this replica; the lease the store holds then.
    pub(crate) async fn lease(&self, ttl: Duration, held: Option<&Lease>) -> Result<Lease, FleetError> {
        let result = self.store.lease(&self.replica, ttl, held).await;
        self.note("ramp_lease", result)
    }

    /// Gives the ramp lease up.
    pub(crate) async fn release(&self, held: &Lease) -> Result<(), FleetError> {
        let result = self.store.release(held).await;
        self.note("ramp_lease", result)
    }

    /// Publishes this replica's counters for the ramp's analyses.
    pub(crate) async fn publish_totals(&self, json: &[u8]) -> Result<(), FleetError> {
        let result = self.store.publish_totals(&self.replica, json).await;
        self.note("ramp", result)
    }

    /// Every replica's counters for the ramp's analyses: (replica, JSON).
    pub(crate) async fn ramp_totals(&self) -> Result<Vec<(String, Vec<u8>)>, FleetError> {
        let result = self.store.ramp_totals().await;
        self.note("ramp", result)
    }

    /// Forgets the counters of replicas that are gone.
    pub(crate) async fn forget_totals(&self, replicas: &[String]) -> Result<(), FleetError> {
        let result = self.store.forget_totals(replicas).await;
        self.note("ramp", result)
    }

    /// The fleet's ramp record.
    pub(crate) async fn ramp(&self) -> Result<Option<RampRecord>, FleetError> {
        let result = self.store.ramp().await;
        self.note("ramp", result)
    }

    /// Writes the fleet's ramp record over version `expected`, fenced by `lease` if given.
    pub(crate) async fn write_ramp(
        &self,
        expected: u64,
        json: &[u8],
        lease: Option<&Lease>,
    ) -> Result<RampWrite, FleetError> {
        let result = self.store.write_ramp(expected, json, lease, &self.replica).await;
        self.note("ramp", result)
    }

    /// Changes each time the fleet store is found to have lost its data.
    pub(crate) fn data_lost(&self) -> tokio::sync::watch::Receiver<u64> {
        self.data_lost.subscribe()
    }

    /// Writes `json` (at `revision`) back as the fleet's overrides unless the store has some;
    /// returns what it holds then.
    pub(crate) async fn restore_overrides(
        &self,
        revision: u64,
        json: &[u8],
    ) -> Result<FleetOverrides, FleetError> {
        let result = self.store.restore_overrides(revision, json).await;
        self.note("overrides", result)
    }

    /// Overrides other replicas publish, as they arrive.
    pub(crate) fn overrides_seen(&self) -> tokio::sync::watch::Receiver<Option<FleetOverrides>> {
        self.overrides_seen.subscribe()
    }

    /// Ends `key`'s pin fleet-wide; the pool it had, if any.
    pub(crate) async fn end(&self, key: &str) -> Result<Option<PoolName>, FleetError> {
        let result = self.store.end(key, None).await;
        self.note("end", result)
    }
}

/// Runs the fleet's background work until `stop`: joining late if the replica started without
/// the store, then [`follow`], [`mirror_refreshes`] and [`share_drain_clock`] side by side.
pub(crate) async fn run(shared: Arc<Shared>, fleet: Arc<Fleet>, stop: CancellationToken) {
    let (to_fleet, batches) = mpsc::unbounded_channel();
    shared.sessions().mirror_refreshes(to_fleet);
    let work = async {
        // Started while the store was unreachable: join once it answers.
        let mut retry = tokio::time::interval(JOIN_RETRY);
        while !fleet.has_joined() {
            retry.tick().await;
            if let Ok(joined) = fleet.join().await {
                join_late(&shared, &fleet, joined).await;
            }
        }
        let position = fleet.joined_at.lock().unwrap_or_else(|p| p.into_inner()).clone().unwrap_or_default();
        tokio::join!(
            follow(shared.clone(), fleet.clone(), position, stop.clone()),
            mirror_refreshes(shared.clone(), fleet.clone(), batches, stop.clone()),
            share_drain_clock(shared.clone(), fleet.clone(), stop.clone()),
        )
    };
    // A stop cuts short calls to an unreachable store (each may wait seconds), rather than
    // holding up the shutdown for them.
    tokio::select! {
        _ = stop.cancelled() => {}
        _ = work => {}
    }
}

/// Brings a replica that started without the fleet store in step with it: the fleet's salt
/// from now on, every pin the fleet holds (first writer wins over pins made here meanwhile,
/// which are then written to the store), and the fleet's overrides, or this replica's if the
/// fleet has none yet.
async fn join_late(shared: &Shared, fleet: &Fleet, joined: Joined) {
    let sessions = shared.sessions();
    sessions.use_split_salt(joined.salt);
    let adopted = joined.pins.iter().filter(|pin| sessions.adopt(pin)).count();
    info!(pins = joined.pins.len(), adopted, "caught up with the fleet after starting without it");
    match joined.overrides {
        Some(overrides) => {
            fleet.overrides_seen.send_replace(Some(overrides));
        }
        // The control plane writes this replica's overrides back, as after a data loss.
        None => fleet.data_lost.send_modify(|times| *times += 1),
    }
    publish_degraded(shared, fleet).await;
}

/// Every second: checks that the fleet store still has its data, records this replica's last v1
/// request there and moves the local drain clock to the fleet's latest, so `/drain` on any
/// replica answers for the fleet; and removes a page of ended pins from the store.
async fn share_drain_clock(shared: Arc<Shared>, fleet: Arc<Fleet>, stop: CancellationToken) {
    let replica = fleet.replica.clone();
    let mut sweep_cursor = 0;
    let mut tick = tokio::time::interval(crate::shared::UPKEEP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Ok(current) = fleet.note("incarnation", fleet.store.incarnation(&random_id()).await) {
            let known = std::mem::replace(
                &mut *fleet.incarnation.lock().unwrap_or_else(|p| p.into_inner()),
                current.clone(),
            );
            if known != current {
                restore(&shared, &fleet, &replica).await;
            }
        }
        let local = shared.drain().last_v1_request();
        let applied = fleet.applied.load(Ordering::Relaxed);
        let shared_clock = async {
            fleet.store.report_replica(&replica, applied, shared.now()).await?;
            fleet.store.record_last_v1(&replica, local).await?;
            fleet.store.last_v1().await
        };
        if let Ok(Some(latest)) = fleet.note("drain_clock", shared_clock.await) {
            shared.drain().observe_fleet(latest);
        }
        let now = u32::try_from(shared.now() / 1000).unwrap_or(u32::MAX);
        let policy = shared.snapshot().pin_policy;
        if let Ok((next, _)) =
            fleet.note("sweep", fleet.store.sweep(now, &policy, sweep_cursor, SWEEP_PAGE).await)
        {
            sweep_cursor = next;
        }
    }
}

/// The fleet store came back without its data: writes back what this replica holds. The salt
/// (so new sessions keep being split alike), every live pin (first writer still wins, so
/// replicas restoring at once agree), and the drain clock reset to now: the v1 traffic the
/// store forgot may have been recent, so the quiet time starts again, never from "long ago".
/// The control plane writes the overrides back ([`Fleet::data_lost`]).
async fn restore(shared: &Shared, fleet: &Fleet, replica: &str) {
    warn!("the fleet store lost its data; writing back this replica's pins, drain clock and overrides");
    fleet.data_lost.send_modify(|times| *times += 1);
    let now = shared.now();
    shared.drain().observe_fleet(now);
    let policy = shared.snapshot().pin_policy;
    let restoring = async {
        fleet.store.restore_salt(&shared.sessions().split_salt()).await?;
        fleet.store.record_last_v1(replica, now).await?;
        let pins = shared.sessions().list(None, &policy, usize::MAX);
        let mut refreshes = Vec::with_capacity(pins.len());
        for pin in &pins {
            // Claimed as made at its first request, then moved to its last one.
            let claimed = fleet.store.claim(&pin.key, pin.pool, pin.first_seen, &policy).await?;
            if claimed.pool != pin.pool || claimed.first_seen != pin.first_seen {
                shared.metrics().pin_conflicts.inc();
                let (first_seen, last_seen) = (claimed.first_seen, claimed.last_seen);
                let key = pin.key.as_str().into();
                shared.sessions().adopt(&StoredPin { key, pool: claimed.pool, first_seen, last_seen });
            } else {
                refreshes.push((pin.key.as_str().into(), pin.first_seen, pin.last_seen));
            }
        }
        for batch in refreshes.chunks(1_000) {
            fleet.store.touch(batch, &policy).await?;
        }
        Ok::<_, FleetError>(pins.len())
    };
    match fleet.note("restore", restoring.await) {
        Ok(restored) => info!(pins = restored, "wrote this replica's state back to the fleet store"),
        // Tried again at the next check: the marker will not match this replica's then either.
        Err(_) => *fleet.incarnation.lock().unwrap_or_else(|p| p.into_inner()) = String::new(),
    }
}

/// A random name (this process in the fleet store, an incarnation marker).
fn random_id() -> String {
    // The secure random source the split salt comes from.
    crate::store::fleet::hex(&crate::store::new_split_salt()[..8])
}

/// Applies other replicas' changes to the local copy until `stop`, from `position` on.
async fn follow(shared: Arc<Shared>, fleet: Arc<Fleet>, mut position: String, stop: CancellationToken) {
    let mut follower = None;
    loop {
        if stop.is_cancelled() {
            return;
        }
        let reader = match &mut follower {
            Some(reader) => reader,
            None => match fleet.note("follow", fleet.store.follower(FOLLOW_WAIT).await) {
                Ok(reader) => follower.insert(reader),
                Err(_) => {
                    pause(FOLLOW_RETRY, &stop).await;
                    continue;
                }
            },
        };
        let read = tokio::select! {
            _ = stop.cancelled() => return,
            read = reader.changes(&position, FOLLOW_WAIT, FOLLOW_BATCH) => read,
        };
        match fleet.note("follow", read) {
            Ok(Changes::Read { changes, position: next }) => {
                apply(&shared, &fleet, changes);
                position = next;
                publish_degraded(&shared, &fleet).await;
            }
            Ok(Changes::Trimmed { position: next }) => {
                warn!("fell behind the fleet's change stream; reading every pin again");
                match fleet.note("reread", fleet.store.pins().await) {
                    Ok(pins) => {
                        let sessions = shared.sessions();
                        let adopted = pins.iter().filter(|pin| sessions.adopt(pin)).count();
                        info!(pins = pins.len(), adopted, "caught up with the fleet");
                        position = next;
                    }
                    Err(_) => pause(FOLLOW_RETRY, &stop).await,
                }
            }
            Err(_) => {
                follower = None;
                pause(FOLLOW_RETRY, &stop).await;
            }
        }
    }
}

/// Writes the pins made while the store was unreachable, now that it answers. The first writer
/// still wins: where another replica pinned a key meanwhile on another pool, this replica's
/// copy follows it and the conflict is counted (`rollout_pin_conflicts_total`). With the same
/// split on every replica that happens only if the percentage changed during the outage.
async fn publish_degraded(shared: &Shared, fleet: &Fleet) {
    let pending = std::mem::take(&mut *fleet.unpublished.lock().unwrap_or_else(|p| p.into_inner()));
    if pending.is_empty() {
        return;
    }
    let policy = shared.snapshot().pin_policy;
    let (mut published, mut conflicts) = (0, 0);
    for (i, pin) in pending.iter().enumerate() {
        match fleet.note("claim", fleet.store.claim(&pin.key, pin.pool, pin.first_seen, &policy).await) {
            Ok(claimed) => {
                published += 1;
                if claimed.pool != pin.pool || claimed.first_seen != pin.first_seen {
                    if claimed.pool != pin.pool {
                        conflicts += 1;
                        shared.metrics().pin_conflicts.inc();
                    }
                    let (first_seen, last_seen) = (claimed.first_seen, claimed.last_seen);
                    shared.sessions().adopt(&StoredPin {
                        key: pin.key.clone(),
                        pool: claimed.pool,
                        first_seen,
                        last_seen,
                    });
                }
            }
            Err(_) => {
                // Unreachable again: the rest waits for the next time.
                fleet
                    .unpublished
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .extend(pending[i..].iter().cloned());
                break;
            }
        }
    }
    info!(published, conflicts, "wrote the pins made while the fleet store was unreachable");
}

fn apply(shared: &Shared, fleet: &Fleet, changes: Vec<Change>) {
    let sessions = shared.sessions();
    for change in changes {
        match change {
            Change::Pin(pin) => {
                sessions.adopt(&pin);
            }
            Change::Touch(touches) => {
                for (key, first_seen, last_seen) in touches {
                    sessions.refreshed_elsewhere(&key, first_seen, last_seen);
                }
            }
            Change::End { key, first_seen } => sessions.ended_elsewhere(&key, first_seen),
            Change::Overrides(overrides) => {
                fleet.overrides_seen.send_replace(Some(overrides));
            }
        }
    }
}

/// Sends the local copy's refresh batches to the fleet store until `stop`. A batch that fails
/// is dropped: the next refresh of those pins carries a later time anyway.
async fn mirror_refreshes(
    shared: Arc<Shared>,
    fleet: Arc<Fleet>,
    mut batches: mpsc::UnboundedReceiver<Vec<FleetTouch>>,
    stop: CancellationToken,
) {
    loop {
        let batch = tokio::select! {
            _ = stop.cancelled() => return,
            batch = batches.recv() => match batch { Some(batch) => batch, None => return },
        };
        let policy = shared.snapshot().pin_policy;
        let _ = fleet.note("refresh", fleet.store.touch(&batch, &policy).await);
    }
}

async fn pause(length: Duration, stop: &CancellationToken) {
    tokio::select! {
        _ = stop.cancelled() => {}
        _ = tokio::time::sleep(length) => {}
    }
}
