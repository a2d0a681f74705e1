//! The drain signal: has v1 been quiet long enough to switch it off?
//!
//! `drained = (live v1 pins == 0) && (now - last_v1_request_at >= quiet_window)`. The time of the
//! last request forwarded to a v1 upstream is kept here and persisted by the background upkeep
//! at least every second and at shutdown. After a restart it is read back pessimistically (the
//! stored value plus one flush interval and the time a commit may take; with nothing stored, the process start time), so a
//! restart can delay the signal but never advance it. Counting live pins is
//! [`crate::session`]'s job.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, UNIX_EPOCH};

use serde::Serialize;

use crate::clock::UnixMillis;

/// How often the drain clock is written to the store.
pub(crate) const FLUSH_INTERVAL: Duration = Duration::from_secs(1);

/// How much older than the truth a stored time can be: one flush interval plus the time that
/// flush may take to commit. Times read back after a restart are moved this much later.
pub(crate) const READ_BACK_SLACK: Duration = Duration::from_secs(2);

#[derive(Debug)]
pub(crate) struct DrainClock {
    last_v1_request: AtomicU64,
    /// The last value sent to the store.
    stored: AtomicU64,
    /// The last value the store confirmed.
    durable: AtomicU64,
    /// True until something is stored: a restart would then start the clock at its own start,
    /// which is later than any request of this process, so nothing needs writing ahead.
    nothing_stored: AtomicBool,
}

/// The answer of `GET /drain`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub(crate) struct DrainStatus {
    pub drained: bool,
    pub v1_active_pins: usize,
    /// RFC 3339.
    pub last_v1_request_at: String,
    pub quiet_for_seconds: f64,
    pub quiet_window_seconds: f64,
    /// When the signal turns on if no further v1 traffic arrives (RFC 3339); in the past once
    /// drained.
    pub drained_eta: String,
    /// Why the signal cannot be given at all for now, whatever the numbers say (in fleet mode:
    /// the fleet store is unreachable, so other replicas' v1 traffic is unknown).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub withheld: Option<&'static str>,
}

impl DrainClock {
    /// `stored` is what the store had; `now` is the process start.
    pub(crate) fn new(stored: Option<UnixMillis>, now: UnixMillis) -> Self {
        let start = match stored {
            Some(ms) => ms.saturating_add(READ_BACK_SLACK.as_millis() as u64),
            None => now,
        };
        // A read-back value counts as stored: writing it back would add the slack again at every
        // restart. With nothing stored, the first flush writes the start time.
        let stored_marker = if stored.is_some() { start } else { 0 };
        DrainClock {
            last_v1_request: AtomicU64::new(start),
            stored: AtomicU64::new(stored_marker),
            durable: AtomicU64::new(stored.unwrap_or(0)),
            nothing_stored: AtomicBool::new(stored.is_none()),
        }
    }

    /// Records a request forwarded to a v1 upstream. Returns `Some(now)` when what the store
    /// holds would not cover this request after a crash (the first v1 request after a quiet
    /// spell): the caller must store it, and have it committed, before answering.
    pub(crate) fn record_v1(&self, now: UnixMillis) -> Option<UnixMillis> {
        if self.last_v1_request.load(Ordering::Relaxed) < now {
            self.last_v1_request.fetch_max(now, Ordering::Relaxed);
        }
        if self.nothing_stored.load(Ordering::Relaxed) {
            return None;
        }
        let covered = self.durable.load(Ordering::Relaxed).saturating_add(READ_BACK_SLACK.as_millis() as u64);
        (covered < now).then_some(now)
    }

    /// Another replica's last v1 request, as the fleet store has it: the fleet is as quiet as
    /// its busiest replica, so the clock moves to it if it is later. Never moves back.
    pub(crate) fn observe_fleet(&self, last_v1_request: UnixMillis) {
        self.last_v1_request.fetch_max(last_v1_request, Ordering::Relaxed);
    }

    /// The store confirmed it holds `value`.
    pub(crate) fn mark_durable(&self, value: UnixMillis) {
        self.durable.fetch_max(value, Ordering::Relaxed);
        self.nothing_stored.store(false, Ordering::Relaxed);
    }

    pub(crate) fn last_v1_request(&self) -> UnixMillis {
        self.last_v1_request.load(Ordering::Relaxed)
    }

    /// The value to write to the store, if it changed since the last call.
    pub(crate) fn take_unstored(&self) -> Option<UnixMillis> {
        let current = self.last_v1_request();
        (self.stored.swap(current, Ordering::Relaxed) != current).then_some(current)
    }

    /// `v1_pins_end` is when the last live v1 pin ends without further requests (Unix seconds).
    pub(crate) fn status(
        &self,
        now: UnixMillis,
        v1_pins: usize,
        v1_pins_end: u32,
        window: Duration,
    ) -> DrainStatus {
        let last = self.last_v1_request();
        let quiet_ms = now.saturating_sub(last);
        let window_ms = window.as_millis() as u64;
        let drained = v1_pins == 0 && quiet_ms >= window_ms;
        let pins_end = if v1_pins > 0 { u64::from(v1_pins_end) * 1000 } else { 0 };
        let eta = last.saturating_add(window_ms).max(pins_end);
        DrainStatus {
            drained,
            v1_active_pins: v1_pins,
            last_v1_request_at: rfc3339(last),
            quiet_for_seconds: quiet_ms as f64 / 1000.0,
            quiet_window_seconds: window.as_secs_f64(),
            drained_eta: rfc3339(eta),
            withheld: None,
        }
    }
}

pub fn rfc3339(ms: UnixMillis) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn quiet_window_and_pins_both_gate_the_signal() {
        let t0 = 1_700_000_000_000;
        let clock = DrainClock::new(None, t0);
        assert!(!clock.status(t0, 0, 0, HOUR).drained, "no state: quiet since process start only");
        assert!(clock.status(t0 + 3_600_000, 0, 0, HOUR).drained);
        assert!(!clock.status(t0 + 3_600_000, 1, 0, HOUR).drained, "a live v1 pin holds it");
        clock.record_v1(t0 + 1_000_000);
        let status = clock.status(t0 + 3_600_000, 0, 0, HOUR);
        assert!(!status.drained);
        assert_eq!(status.drained_eta, rfc3339(t0 + 4_600_000));
    }

    #[test]
    fn a_restart_reads_the_clock_back_late_never_early() {
        let clock = DrainClock::new(Some(5_000), 99_000);
        assert_eq!(clock.last_v1_request(), 7_000);
        clock.record_v1(4_000);
        assert_eq!(clock.last_v1_request(), 7_000, "never moves backwards");
    }

    #[test]
    fn with_nothing_stored_the_start_time_is_stored_first() {
        let clock = DrainClock::new(None, 99_000);
        assert_eq!(clock.take_unstored(), Some(99_000));
        assert_eq!(clock.take_unstored(), None);
    }

    #[test]
    fn a_request_the_store_would_not_cover_must_be_written_ahead() {
        let clock = DrainClock::new(None, 10_000);
        assert_eq!(clock.record_v1(50_000), None, "nothing stored: a restart starts later anyway");
        clock.mark_durable(50_000);
        assert_eq!(clock.record_v1(51_000), None, "within the read-back slack of the stored value");
        assert_eq!(clock.record_v1(90_000), Some(90_000), "the first request after a quiet spell");
        clock.mark_durable(90_000);
        assert_eq!(clock.record_v1(90_500), None);
    }

    #[test]
    fn only_changes_are_stored() {
        let clock = DrainClock::new(Some(5_000), 99_000);
        assert_eq!(clock.take_unstored(), None, "the read-back value is not written again");
        clock.record_v1(8_000);
        assert_eq!(clock.take_unstored(), Some(8_000));
    }
}
