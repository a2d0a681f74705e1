//! Whether an upstream may get new requests: active checks and passive ejection.
//!
//! Active checks (`pools.*.health`) probe each upstream's health path on an interval; an
//! upstream goes down after `unhealthy_threshold` failed probes in a row and comes back after
//! `healthy_threshold` good ones. Passive ejection watches real traffic: after
//! `ejection.consecutive_failures` connect errors or 5xx answers in a row the upstream is skipped
//! for `ejection.duration`, unless it is the last usable upstream of its pool. This module holds
//! each upstream's [`Health`] and those rules, and does no I/O; [`checks`] runs the probes.
//! Probes go straight to the upstream, never through the proxy, so they are not v1 traffic for
//! the drain signal. Choosing among healthy upstreams is [`crate::balancer`]'s job.

pub(crate) mod checks;

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

use crate::config::{Ejection, HealthCheck};

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
    pub(crate) fn is_healthy(&self) -> bool {
        if !self.probed_up.load(Ordering::Relaxed) {
            return false;
        }
        let until = self.ejected_until.load(Ordering::Relaxed);
        until == 0 || now_ms() >= until
    }

    /// Forces the probed state (tests and operators' tooling).
    pub(crate) fn set_probed(&self, up: bool) {
        self.probed_up.store(up, Ordering::Relaxed);
    }

    /// A real exchange succeeded.
    pub(crate) fn record_success(&self) {
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
    }

    /// A real exchange failed through the upstream's fault (a connect error, a 502/503/504).
    /// Returns true if this ejected the upstream for `ejection.duration`. The last usable
    /// upstream of a pool (`others_usable` false) is never ejected: with nowhere else to go,
    /// trying it beats answering 503 for the whole period.
    pub(crate) fn record_failure(&self, ejection: &Ejection, others_usable: bool) -> bool {
        let threshold = ejection.consecutive_failures;
        if threshold == 0 || !others_usable {
            return false;
        }
        let failures = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures < threshold {
            return false;
        }
        self.failures.store(0, Ordering::Relaxed);
        self.ejected_until.store(now_ms() + ejection.duration.as_millis() as u64, Ordering::Relaxed);
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
