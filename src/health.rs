//! Whether an upstream may get new requests: active checks and passive ejection.
//!
//! Active checks (`pools.*.health`) probe each upstream's health path on an interval; an
//! upstream goes down after `unhealthy_threshold` failed probes in a row and comes back after
//! `healthy_threshold` good ones. Passive ejection watches real traffic: after
//! `ejection.consecutive_failures` connect errors or 5xx answers in a row the upstream is skipped
//! for `ejection.duration`. Probes go straight to the upstream, never through the proxy, so they
//! are not v1 traffic for the drain signal. Choosing among healthy upstreams is
//! [`crate::balancer`]'s job.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use http::Request;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{HealthCheck, PoolName};
use crate::proxy::Proxy;

/// Milliseconds on a monotonic clock that starts with the process; never 0.
fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

/// Health of one upstream, shared by every snapshot that has it.
#[derive(Debug)]
pub struct Health {
    /// Result of active checks (true when there are none).
    probed_up: AtomicBool,
    /// Monotonic milliseconds until which passive ejection keeps the upstream out; 0 = not ejected.
    ejected_until: AtomicU64,
    /// Failed exchanges in a row on real traffic.
    failures: AtomicU32,
    /// Probe results in a row: positive = successes, negative = failures.
    streak: std::sync::atomic::AtomicI32,
    /// When the next probe is due (monotonic milliseconds).
    next_probe: AtomicU64,
    probing: AtomicBool,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            probed_up: AtomicBool::new(true),
            ejected_until: AtomicU64::new(0),
            failures: AtomicU32::new(0),
            streak: std::sync::atomic::AtomicI32::new(0),
            next_probe: AtomicU64::new(0),
            probing: AtomicBool::new(false),
        }
    }
}

impl Health {
    pub fn is_healthy(&self) -> bool {
        if !self.probed_up.load(Ordering::Relaxed) {
            return false;
        }
        let until = self.ejected_until.load(Ordering::Relaxed);
        until == 0 || now_ms() >= until
    }

    /// Forces the probed state (tests and operators' tooling).
    pub fn set_probed(&self, up: bool) {
        self.probed_up.store(up, Ordering::Relaxed);
    }

    /// A real exchange succeeded.
    pub fn record_success(&self) {
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
    }

    /// A real exchange failed (connect error or 5xx). Returns true if this ejected the upstream.
    pub fn record_failure(&self, threshold: u32, duration: Duration) -> bool {
        if threshold == 0 {
            return false;
        }
        let failures = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures < threshold {
            return false;
        }
        self.failures.store(0, Ordering::Relaxed);
        self.ejected_until.store(now_ms() + duration.as_millis() as u64, Ordering::Relaxed);
        true
    }

    /// Applies one probe result; returns the new probed state if it changed.
    fn record_probe(&self, ok: bool, check: &HealthCheck) -> Option<bool> {
        let streak = self.streak.load(Ordering::Relaxed);
        let streak = match (ok, streak > 0) {
            (true, true) => streak.saturating_add(1),
            (true, false) => 1,
            (false, true) => -1,
            (false, false) => streak.saturating_sub(1),
        };
        self.streak.store(streak, Ordering::Relaxed);
        let up = self.probed_up.load(Ordering::Relaxed);
        if !up && streak >= check.healthy_threshold as i32 {
            self.probed_up.store(true, Ordering::Relaxed);
            // Back in service: forget an ejection too, the probe just proved it answers.
            self.ejected_until.store(0, Ordering::Relaxed);
            return Some(true);
        }
        if up && -streak >= check.unhealthy_threshold as i32 {
            self.probed_up.store(false, Ordering::Relaxed);
            return Some(false);
        }
        None
    }
}

/// Runs active checks for every upstream of every pool that has `health` configured, following
/// snapshot swaps, until `stop` fires.
pub async fn run_checks(proxy: Arc<Proxy>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let snapshot = proxy.snapshot();
        let now = now_ms();
        for pool in PoolName::ALL {
            let Some(check) = snapshot.health_checks.get(pool).clone() else {
                // Checks removed by a reload: nothing will ever probe these again.
                snapshot.pool(pool).upstreams().iter().for_each(|u| u.health().set_probed(true));
                continue;
            };
            for upstream in snapshot.pool(pool).upstreams() {
                let health = upstream.health();
                if health.next_probe.load(Ordering::Relaxed) > now
                    || health.probing.swap(true, Ordering::Relaxed)
                {
                    continue;
                }
                health.next_probe.store(now + check.interval.as_millis() as u64, Ordering::Relaxed);
                let (upstream, proxy, check) = (upstream.clone(), proxy.clone(), check.clone());
                tokio::spawn(async move {
                    let _probing = ProbeGuard(&upstream);
                    // The whole probe, body included, is bounded: a hung one counts as failed. One
                    // the proxy could not send (its own connection cap, no descriptors) says
                    // nothing about the upstream and is not counted.
                    let ok = match tokio::time::timeout(check.timeout, probe(&proxy, &upstream, &check)).await
                    {
                        Ok(None) => return,
                        Ok(Some(ok)) => ok,
                        Err(_) => false,
                    };
                    match upstream.health().record_probe(ok, &check) {
                        Some(true) => {
                            info!(pool = %pool, upstream = %upstream.name(), "upstream healthy again")
                        }
                        Some(false) => {
                            warn!(pool = %pool, upstream = %upstream.name(), "upstream failed its health checks")
                        }
                        None => {}
                    }
                });
            }
        }
    }
}

/// Clears the upstream's "probe running" mark however the probe task ends.
struct ProbeGuard<'a>(&'a crate::upstream::Upstream);

impl Drop for ProbeGuard<'_> {
    fn drop(&mut self) {
        self.0.health().probing.store(false, Ordering::Relaxed);
    }
}

/// Whether the upstream answered the probe with a success or a redirect; `None` when the failure
/// was the proxy's own, not the upstream's ([`crate::upstream::UpstreamError::is_local`]).
async fn probe(proxy: &Proxy, upstream: &crate::upstream::Upstream, check: &HealthCheck) -> Option<bool> {
    let req = Request::get(check.path.as_str())
        .header(http::header::HOST, upstream.authority().as_str())
        .header(http::header::USER_AGENT, "rollout-proxy health check")
        .body(crate::upstream::UpstreamBody::Empty)
        .expect("a path and static headers form a request");
    match proxy.client().send(upstream, req, check.timeout).await {
        Ok(response) => {
            let ok = response.status().is_success() || response.status().is_redirection();
            // Read the body to the end so the connection goes back to the pool.
            let _ = http_body_util::BodyExt::collect(response.into_body()).await;
            Some(ok)
        }
        Err(err) => (!err.error.is_local()).then_some(false),
    }
}
