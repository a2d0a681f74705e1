//! The state the running proxy shares between its parts: the published snapshot, the pin table
//! and its store, the drain clock, the metrics and the clock.
//!
//! Everything that is not one request (the control plane, the admin API, active health checks,
//! the background upkeep) takes an `Arc<Shared>`; so does [`crate::proxy::Proxy`], which adds
//! only what a request needs on top (the upstream client, open tunnels). Nothing here speaks
//! HTTP or decides routing: the rules are [`crate::router`]'s and [`crate::session`]'s, making
//! changes durable is [`crate::store`]'s.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::clock::{SharedClock, UnixMillis};
use crate::config::{ByPool, PoolName};
use crate::drain::{DrainClock, DrainStatus};
use crate::fleet::Fleet;
use crate::metrics::{Metrics, ScrapeState};
use crate::session::Sessions;
use crate::snapshot::{SharedSnapshot, Snapshot};
use crate::store::{Op, Store};

/// How often pins are expired and flushed and the drain clock is persisted; §4 asks for at least
/// once a second.
pub(crate) const UPKEEP_INTERVAL: std::time::Duration = crate::drain::FLUSH_INTERVAL;

/// One handle on the proxy's shared state; see the module documentation.
pub struct Shared {
    snapshot: SharedSnapshot,
    sessions: Sessions,
    drain: DrainClock,
    metrics: Arc<Metrics>,
    clock: SharedClock,
    /// In fleet mode, the link to the fleet store.
    fleet: Option<Arc<Fleet>>,
    /// What the admin console shows that nothing else keeps.
    console: crate::console::Console,
}

impl Shared {
    /// `snapshot` must be built with `metrics`; `sessions` holds the store.
    pub(crate) fn new(
        snapshot: Snapshot,
        sessions: Sessions,
        drain: DrainClock,
        metrics: Arc<Metrics>,
        clock: SharedClock,
        fleet: Option<Arc<Fleet>>,
    ) -> Self {
        Shared {
            snapshot: Arc::new(arc_swap::ArcSwap::from_pointee(snapshot)),
            sessions,
            drain,
            metrics,
            clock,
            fleet,
            console: crate::console::Console::default(),
        }
    }

    /// The console's pin history and journal of changes.
    pub(crate) fn console(&self) -> &crate::console::Console {
        &self.console
    }

    /// Notes a change for the console's journal (`GET /audit`), next to its `audit` log line.
    pub(crate) fn journal(&self, actor: &str, kind: &str, detail: String) {
        self.console.record(self.now(), actor, kind, detail);
    }

    /// The link to the fleet store, in fleet mode.
    pub(crate) fn fleet(&self) -> Option<&Arc<Fleet>> {
        self.fleet.as_ref()
    }

    /// The running snapshot; a request or change keeps it to its end.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// The handle the snapshot is published through, for tasks that follow its swaps.
    pub(crate) fn snapshot_handle(&self) -> &SharedSnapshot {
        &self.snapshot
    }

    /// Publishes a new snapshot; the next request uses it, requests in flight finish on theirs.
    pub(crate) fn swap(&self, snapshot: Snapshot) {
        self.snapshot.store(Arc::new(snapshot));
    }

    pub fn sessions(&self) -> &Sessions {
        &self.sessions
    }

    /// The durable store behind the pins, the drain clock and the admin overrides.
    pub(crate) fn store(&self) -> &Store {
        self.sessions.store()
    }

    pub(crate) fn drain(&self) -> &DrainClock {
        &self.drain
    }

    pub(crate) fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Now, on the clock pins and the drain signal read.
    pub(crate) fn now(&self) -> UnixMillis {
        self.clock.now()
    }

    /// The drain signal as of now.
    pub(crate) fn drain_status(&self) -> DrainStatus {
        let snapshot = self.snapshot.load();
        let mut status = self.drain.status(
            self.clock.now(),
            self.sessions.live(PoolName::V1),
            self.sessions.v1_pins_end(),
            snapshot.quiet_window,
        );
        // In a fleet, the local copy holds every replica's pins and the clock every replica's
        // last v1 request, as of the last contact with the fleet store; without that contact
        // another replica may be serving v1 right now.
        if self.fleet.as_ref().is_some_and(|fleet| !fleet.is_up()) {
            status.drained = false;
            status.withheld = Some("the fleet store is unreachable: other replicas' v1 traffic is unknown");
        }
        status
    }

    /// State gauges for a metrics scrape.
    pub(crate) fn scrape_state(&self) -> ScrapeState {
        let snapshot = self.snapshot.load();
        let drain = self.drain_status();
        let mut upstreams = Vec::new();
        for pool in PoolName::ALL {
            for u in snapshot.pool(pool).upstreams() {
                upstreams.push((pool, u.name().to_string(), u.is_healthy(), u.weight()));
            }
        }
        let health = &self.store().health;
        ScrapeState {
            sessions_active: ByPool {
                v1: self.sessions.live(PoolName::V1),
                v2: self.sessions.live(PoolName::V2),
            },
            legacy_v1_percent: snapshot.router.legacy_v1_percent().as_f64(),
            v1_last_request_seconds: self.drain.last_v1_request() as f64 / 1000.0,
            v1_quiet_seconds: drain.quiet_for_seconds,
            quiet_window_seconds: drain.quiet_window_seconds,
            drained: drain.drained,
            upstreams,
            state_last_commit_seconds: health.last_commit.load(Ordering::Relaxed) as f64,
            state_commits: health.commits.load(Ordering::Relaxed),
            state_write_errors: health.write_errors.load(Ordering::Relaxed),
            store_up: self.fleet.as_ref().is_none_or(|fleet| fleet.is_up()),
        }
    }

    /// One pass of the background upkeep: pin expiry and `last_seen` flushing, and persisting
    /// the drain clock. Returns the drain clock value it sent, if any; see
    /// [`Shared::confirm_upkeep`].
    pub fn maintain(&self) -> Option<UnixMillis> {
        let snapshot = self.snapshot.load();
        self.sessions.maintain(&snapshot.pin_policy);
        let sent = self.drain.take_unstored();
        if let Some(ms) = sent {
            self.store().send(Op::LastV1Request(ms));
        }
        sent
    }

    /// Waits for the upkeep's writes to be committed (so passes never pile up in the store's
    /// queue) and records the drain clock value as durable.
    pub(crate) async fn confirm_upkeep(&self, sent: Option<UnixMillis>) {
        if self.store().flush().await {
            if let Some(ms) = sent {
                self.drain.mark_durable(ms);
            }
        }
    }
}

/// Runs [`Shared::maintain`] every [`UPKEEP_INTERVAL`] until `stop` fires, and grows the pin
/// table ahead of need ([`Sessions::reserve`]).
pub(crate) async fn run_upkeep(shared: Arc<Shared>, stop: CancellationToken) {
    let fleet = shared
        .fleet()
        .map(|fleet| tokio::spawn(crate::fleet::run(shared.clone(), fleet.clone(), stop.clone())));
    let mut tick = tokio::time::interval(UPKEEP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        let scanning = shared.clone();
        // A scan of a large pin table is blocking work; keep it off the request threads' hot path.
        let sent = tokio::task::spawn_blocking(move || {
            let sent = scanning.maintain();
            scanning.sessions().reserve();
            sent
        })
        .await
        .unwrap_or(None);
        shared.confirm_upkeep(sent).await;
        shared.console.sample(shared.now(), |pool| shared.sessions().live(pool));
    }
    if let Some(fleet) = fleet {
        let _ = fleet.await;
    }
}
