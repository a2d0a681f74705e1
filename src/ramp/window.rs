//! The analysis window: both pools' traffic over the last `window`, as differences of the
//! proxy's own cumulative counters, read once per analysis interval.
//!
//! No Prometheus is needed: the counters are the ones `/metrics` shows
//! (`rollout_requests_total`, `rollout_request_duration_seconds`,
//! `rollout_sessions_started_total`). In a fleet every replica's counters count: each replica
//! publishes its totals and the driving replica keeps readings per replica
//! ([`FleetReadings`]); a replica that restarts comes back under a new name, so each one's
//! counters only grow. Judging the window is [`super::guard`]'s job.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::guard::{PoolSample, Sample};
use crate::clock::UnixMillis;
use crate::config::PoolName;
use crate::metrics::Metrics;

/// The counters at one moment, cumulative since the process started.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    pub at: UnixMillis,
    pub v1: PoolSample,
    pub v2: PoolSample,
    /// New sessions pinned to v2.
    pub v2_sessions: u64,
}

impl Totals {
    /// The proxy's counters as of `at`.
    pub fn read(metrics: &Metrics, at: UnixMillis) -> Totals {
        let pool = |pool| {
            let (requests, errors, latency) = metrics.pool_totals(pool);
            PoolSample { requests, errors, latency }
        };
        Totals {
            at,
            v1: pool(PoolName::V1),
            v2: pool(PoolName::V2),
            v2_sessions: metrics.sessions_started.get(PoolName::V2).get(),
        }
    }
}

/// The readings of the last window and a little more.
#[derive(Debug, Default)]
pub struct Readings {
    readings: VecDeque<Totals>,
}

fn minus(now: &PoolSample, then: &PoolSample) -> PoolSample {
    let mut latency = now.latency;
    for (bucket, earlier) in latency.iter_mut().zip(then.latency) {
        *bucket = bucket.saturating_sub(earlier);
    }
    PoolSample {
        requests: now.requests.saturating_sub(then.requests),
        errors: now.errors.saturating_sub(then.errors),
        latency,
    }
}

impl Readings {
    /// Adds a reading, keeping those the next window of `window` needs.
    pub fn record(&mut self, totals: Totals, window: Duration) {
        let since = totals.at.saturating_sub(window.as_millis() as u64);
        self.readings.push_back(totals);
        // Keep the newest reading at or before the window's start: it is the window's base.
        while self.readings.len() > 1 && self.readings[1].at <= since {
            self.readings.pop_front();
        }
    }

    /// The traffic over the last `window` (or since the oldest reading, if the readings do not
    /// reach back that far), with v2's new sessions counted from `step_sessions`, the v2
    /// session count when the step began. `None` before two readings.
    pub fn window(&self, window: Duration, step_sessions: u64) -> Option<Sample> {
        let latest = self.readings.back()?;
        let since = latest.at.saturating_sub(window.as_millis() as u64);
        let base = self.readings.iter().rev().find(|r| r.at <= since).or(self.readings.front())?;
        if base.at == latest.at {
            return None;
        }
        Some(Sample {
            v1: minus(&latest.v1, &base.v1),
            v2: minus(&latest.v2, &base.v2),
            new_v2_sessions: latest.v2_sessions.saturating_sub(step_sessions),
        })
    }

    /// The latest reading's v2 session count.
    #[cfg(test)]
    fn v2_sessions(&self) -> u64 {
        self.readings.back().map_or(0, |r| r.v2_sessions)
    }

    fn latest_at(&self) -> Option<UnixMillis> {
        self.readings.back().map(|r| r.at)
    }

    /// Forgets every reading (a new ramp, or a step retried, judges only what follows).
    pub fn clear(&mut self) {
        self.readings.clear();
    }
}

/// The readings of every replica that serves (one, unless in a fleet), and where each one's
/// count of new v2 sessions in the current step starts.
#[derive(Debug, Default)]
pub struct FleetReadings {
    replicas: HashMap<String, Replica>,
}

#[derive(Debug, Default)]
struct Replica {
    readings: Readings,
    /// Its v2 session count when the step began, or when it was first read in the step.
    step_base: Option<u64>,
}

fn add(sum: &mut PoolSample, more: &PoolSample) {
    sum.requests += more.requests;
    sum.errors += more.errors;
    for (bucket, more) in sum.latency.iter_mut().zip(more.latency) {
        *bucket += more;
    }
}

impl FleetReadings {
    /// Adds `replica`'s reading, unless it is no newer than the last one.
    pub fn record(&mut self, replica: &str, totals: Totals, window: Duration) {
        let entry = self.replicas.entry(replica.to_owned()).or_default();
        if entry.readings.latest_at().is_some_and(|at| totals.at <= at) {
            return;
        }
        entry.step_base.get_or_insert(totals.v2_sessions);
        entry.readings.record(totals, window);
    }

    /// The fleet's traffic over the last `window`: every replica's, added up. `None` until some
    /// replica has two readings.
    pub fn window(&self, window: Duration) -> Option<Sample> {
        let mut sum: Option<Sample> = None;
        for replica in self.replicas.values() {
            // No reading yet in this step: none of its sessions are the step's.
            let base = replica.step_base.unwrap_or(u64::MAX);
            let Some(sample) = replica.readings.window(window, base) else { continue };
            let sum = sum.get_or_insert_with(Sample::default);
            add(&mut sum.v1, &sample.v1);
            add(&mut sum.v2, &sample.v2);
            sum.new_v2_sessions += sample.new_v2_sessions;
        }
        sum
    }

    /// A new step (or ramp, or driving replica): new v2 sessions count from each replica's
    /// next reading; with `clear`, the window starts afresh too.
    pub fn restart_step(&mut self, clear: bool) {
        for replica in self.replicas.values_mut() {
            replica.step_base = None;
            if clear {
                replica.readings.clear();
            }
        }
    }

    /// Forgets replicas with no reading since `before` (stopped, or restarted under a new
    /// name); answers their names.
    pub fn forget_before(&mut self, before: UnixMillis) -> Vec<String> {
        let gone: Vec<String> = self
            .replicas
            .iter()
            .filter(|(_, r)| r.readings.latest_at().is_none_or(|at| at < before))
            .map(|(name, _)| name.clone())
            .collect();
        for name in &gone {
            self.replicas.remove(name);
        }
        gone
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn totals(minute: u64, v2_requests: u64, v2_errors: u64) -> Totals {
        let pool = |requests, errors| {
            let mut latency = [0; super::super::guard::LATENCY_BUCKETS.len() + 1];
            latency[4] = requests;
            PoolSample { requests, errors, latency }
        };
        Totals {
            at: minute * 60_000,
            v1: pool(minute * 1_000, 0),
            v2: pool(v2_requests, v2_errors),
            v2_sessions: minute * 10,
        }
    }

    #[test]
    fn totals_are_the_proxys_own_counters() {
        use crate::router::Decision;
        let metrics = Metrics::new();
        metrics.request(Decision::NewPin, PoolName::V2, 200, 0.003);
        // The proxy's own 502 (an upstream that failed) counts as v2's error.
        metrics.request(Decision::Pinned, PoolName::V2, 502, 0.5);
        metrics.request(Decision::Prefix, PoolName::V2, 503, 20.0);
        metrics.request(Decision::Unkeyed, PoolName::V1, 404, 0.02);
        metrics.sessions_started.get(PoolName::V2).inc();
        let totals = Totals::read(&metrics, 5);
        assert_eq!((totals.v2.requests, totals.v2.errors), (3, 2));
        assert_eq!(
            (totals.v2.latency[2], totals.v2.latency[8], totals.v2.latency[13]),
            (1, 1, 1),
            "2.5–5 ms, 0.25–0.5 s, over 10 s"
        );
        assert_eq!(totals.v2.latency.iter().sum::<u64>(), 3);
        assert_eq!((totals.v1.requests, totals.v1.errors, totals.v1.latency[4]), (1, 0, 1));
        assert_eq!(totals.v2_sessions, 1);
    }

    #[test]
    fn a_window_is_the_difference_from_the_reading_at_its_start() {
        let window = Duration::from_secs(10 * 60);
        let mut readings = Readings::default();
        readings.record(totals(0, 0, 0), window);
        assert_eq!(readings.window(window, 0), None, "one reading is no window");
        for minute in 1..=30u64 {
            // v2 answers 100 requests a minute; from minute 21 on, all of them 5xx.
            let errors = minute.saturating_sub(20) * 100;
            readings.record(totals(minute, minute * 100, errors), window);
        }
        let sample = readings.window(window, readings.v2_sessions() - 25).unwrap();
        assert_eq!((sample.v2.requests, sample.v2.errors), (1_000, 1_000), "minutes 21–30 only");
        assert_eq!(sample.v1.requests, 10_000);
        assert_eq!(sample.v2.latency[4], 1_000);
        assert_eq!(sample.new_v2_sessions, 25);
        assert!(readings.readings.len() <= 12, "old readings are dropped: {}", readings.readings.len());

        // Readings that do not reach back a whole window give what they have.
        readings.clear();
        readings.record(totals(40, 4_000, 0), window);
        readings.record(totals(43, 4_300, 30), window);
        let sample = readings.window(window, 0).unwrap();
        assert_eq!((sample.v2.requests, sample.v2.errors), (300, 30));
    }

    /// Each replica's window counts; a restarted replica (a new name) starts its own, so its
    /// counters starting again from zero take nothing off the fleet's numbers.
    #[test]
    fn the_fleets_window_adds_up_every_replicas() {
        let window = Duration::from_secs(10 * 60);
        let mut fleet = FleetReadings::default();
        fleet.record("a", totals(0, 0, 0), window);
        assert_eq!(fleet.window(window), None);
        fleet.record("b", totals(1, 5_000, 100), window);
        fleet.record("a", totals(2, 200, 0), window);
        fleet.record("a", totals(2, 999, 999), window);
        // B restarted as "c": its counters begin again.
        fleet.record("c", totals(3, 0, 0), window);
        fleet.record("b", totals(3, 5_100, 110), window);
        fleet.record("c", totals(4, 50, 50), window);
        let sample = fleet.window(window).unwrap();
        assert_eq!((sample.v2.requests, sample.v2.errors), (200 + 100 + 50, 10 + 50));
        assert_eq!(sample.v2.latency[4], 350);
        // Sessions from each replica's first reading in the step: a 20, b 20, c 10.
        assert_eq!(sample.new_v2_sessions, 50);

        fleet.restart_step(false);
        fleet.record("a", totals(5, 300, 0), window);
        let sample = fleet.window(window).unwrap();
        assert_eq!(sample.new_v2_sessions, 0, "counted from the new step's first readings");
        assert_eq!(sample.v2.requests, 300 + 100 + 50, "the window goes on");
        assert_eq!(fleet.forget_before(4 * 60_000), vec!["b".to_owned()]);
        fleet.restart_step(true);
        assert_eq!(fleet.window(window), None, "cleared");
    }
}
