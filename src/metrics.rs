//! Prometheus metrics (§6), with label handles resolved once so the request path never looks a
//! label set up by name.
//!
//! Labels are bounded: pool, upstream (from the config), route, decision, status class, reason.
//! Never a path or a session key. Gauges that describe state (live pins, drain) are refreshed
//! when scraped, by [`crate::admin`]; counters are incremented where things happen.

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

use crate::config::{ByPool, PoolName};
use crate::router::Decision;

const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Upper bounds, in seconds, of `rollout_request_duration_seconds`'s buckets; past the last is
/// one more, unbounded.
pub(crate) const LATENCY_BUCKETS: [f64; 13] =
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Why a pin ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EndReason {
    Idle,
    MaxDuration,
    Admin,
}

impl EndReason {
    pub(crate) const ALL: [EndReason; 3] = [EndReason::Idle, EndReason::MaxDuration, EndReason::Admin];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            EndReason::Idle => "idle",
            EndReason::MaxDuration => "max_duration",
            EndReason::Admin => "admin",
        }
    }
}

/// Index into [`CLASSES`] for a status code.
fn class_index(status: u16) -> usize {
    usize::from(status / 100).clamp(1, 5) - 1
}

/// What went wrong talking to an upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum UpstreamErrorKind {
    Connect,
    Timeout,
    Io,
}

impl UpstreamErrorKind {
    const ALL: [UpstreamErrorKind; 3] =
        [UpstreamErrorKind::Connect, UpstreamErrorKind::Timeout, UpstreamErrorKind::Io];

    fn as_str(self) -> &'static str {
        match self {
            UpstreamErrorKind::Connect => "connect",
            UpstreamErrorKind::Timeout => "timeout",
            UpstreamErrorKind::Io => "io",
        }
    }
}

/// Per-upstream counters, resolved when the upstream is built.
#[derive(Debug, Clone)]
pub struct UpstreamStats {
    requests: [IntCounter; 5],
    errors: [IntCounter; 3],
}

impl UpstreamStats {
    /// Counters that belong to no registry, for upstreams built outside a running proxy.
    pub fn unregistered() -> Self {
        let counter = || IntCounter::new("unregistered", "unregistered").expect("valid metric name");
        UpstreamStats {
            requests: std::array::from_fn(|_| counter()),
            errors: std::array::from_fn(|_| counter()),
        }
    }

    pub(crate) fn response(&self, status: u16) {
        self.requests[class_index(status)].inc();
    }

    pub(crate) fn error(&self, kind: UpstreamErrorKind) {
        self.errors[kind as usize].inc();
    }
}

/// Counters of `rollout_client_rejected_total`, one per reason.
#[derive(Debug, Clone)]
pub struct ClientRejections {
    pub max_connections: IntCounter,
    pub header_timeout: IntCounter,
    /// A response made no progress towards the client for `client.send_timeout`.
    pub send_timeout: IntCounter,
    pub headers_too_large: IntCounter,
    pub bad_request: IntCounter,
}

/// Values only known when scraped.
#[derive(Debug, Clone)]
pub(crate) struct ScrapeState {
    pub sessions_active: ByPool<usize>,
    pub legacy_v1_percent: f64,
    pub v1_last_request_seconds: f64,
    pub v1_quiet_seconds: f64,
    pub quiet_window_seconds: f64,
    pub drained: bool,
    /// (pool, upstream, healthy, weight) for every configured upstream.
    pub upstreams: Vec<(PoolName, String, bool, u32)>,
    pub state_last_commit_seconds: f64,
    pub state_commits: u64,
    pub state_write_errors: u64,
    /// Whether the store this replica answers from is reachable: in fleet mode the fleet store,
    /// else the embedded one, which always is.
    pub store_up: bool,
}

pub struct Metrics {
    registry: Registry,
    /// Indexed by decision, pool, status class; `None` where the combination cannot happen
    /// (prefix routes only ever reach v2).
    requests: Vec<Option<IntCounter>>,
    durations: ByPool<Histogram>,
    upstream_requests: IntCounterVec,
    upstream_errors: IntCounterVec,
    upstream_healthy: IntGaugeVec,
    upstream_weight: IntGaugeVec,
    legacy_v1_percent: Gauge,
    sessions_active: IntGaugeVec,
    pub sessions_started: ByPool<IntCounter>,
    sessions_ended: Vec<IntCounter>,
    pub keys_rejected_invalid: IntCounter,
    /// Client connections or requests refused by a limit, by reason.
    pub client_rejected: ClientRejections,
    pub keys_rejected_full: IntCounter,
    v1_last_request: Gauge,
    v1_quiet: Gauge,
    quiet_window: Gauge,
    drained: IntGauge,
    pub config_reloads: IntCounterVec,
    pub admin_changes: IntCounterVec,
    state_last_commit: Gauge,
    state_commits: IntCounter,
    state_write_errors: IntCounter,
    store_up: IntGauge,
    /// Failed calls to the fleet store, by operation ([`FLEET_OPERATIONS`]).
    pub store_errors: IntCounterVec,
    /// New pins this replica made that the fleet store held on another pool: a race for a new
    /// session lost to another replica.
    pub pin_conflicts: IntCounter,
    /// The ramp as its runner last saw it ([`Metrics::ramp`]).
    ramp_state: IntGaugeVec,
    ramp_step: IntGauge,
    ramp_analyses: IntCounterVec,
    ramp_v2_error_ratio: Gauge,
    ramp_v2_p99: Gauge,
    ramp_leader: IntGauge,
    /// `rollout_ramp_gate_calls_total{result}`: calls to the ramp's gates.
    pub(crate) ramp_gate_calls: IntCounterVec,
}

/// The ramp's states as `rollout_ramp_state` labels them.
pub(crate) const RAMP_STATES: [&str; 5] = ["none", "progressing", "paused", "aborted", "completed"];
/// Verdicts of the ramp's analyses as `rollout_ramp_analysis_total` labels them.
pub(crate) const RAMP_VERDICTS: [&str; 3] = ["pass", "fail", "inconclusive"];
/// How calls to the ramp's gates ended, as `rollout_ramp_gate_calls_total` labels them: a 2xx,
/// another status, or no answer (refused, timed out).
pub(crate) const GATE_RESULTS: [&str; 3] = ["open", "closed", "error"];

/// Operations on the fleet store, pre-created so every series exists from the start.
pub(crate) const FLEET_OPERATIONS: [&str; 14] = [
    "join",
    "claim",
    "refresh",
    "end",
    "follow",
    "overrides",
    "drain_clock",
    "reread",
    "incarnation",
    "restore",
    "replicas",
    "sweep",
    "ramp_lease",
    "ramp",
];

/// Kinds of admin change, pre-created so every series exists from the start.
pub(crate) const ADMIN_CHANGE_KINDS: [&str; 5] =
    ["legacy_percent", "weight", "session_delete", "reload", "overrides_reset"];

fn register<T: prometheus::core::Collector + Clone + 'static>(registry: &Registry, metric: T) -> T {
    registry.register(Box::new(metric.clone())).expect("metric names are unique");
    metric
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let r = Registry::new();
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            register(&r, IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"))
        };
        let gauge = |name: &str, help: &str| register(&r, Gauge::new(name, help).expect("valid metric"));

        let requests_vec = counter_vec(
            "rollout_requests_total",
            "Client requests by route, pool, routing decision and status class.",
            &["route", "pool", "decision", "code_class"],
        );
        let mut requests = Vec::new();
        for decision in Decision::ALL {
            for pool in PoolName::ALL {
                for class in CLASSES {
                    let possible = decision != Decision::Prefix || pool == PoolName::V2;
                    requests.push(possible.then(|| {
                        requests_vec.with_label_values(&[
                            decision.route().as_str(),
                            pool.as_str(),
                            decision.as_str(),
                            class,
                        ])
                    }));
                }
            }
        }
        let durations_vec = register(
            &r,
            HistogramVec::new(
                HistogramOpts::new(
                    "rollout_request_duration_seconds",
                    "Time from request to response head, by pool.",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
                &["pool"],
            )
            .expect("valid metric"),
        );
        let sessions_started_vec =
            counter_vec("rollout_sessions_started_total", "Session pins created, by pool.", &["pool"]);
        let sessions_ended_vec = counter_vec(
            "rollout_sessions_ended_total",
            "Session pins ended, by pool and reason.",
            &["pool", "reason"],
        );
        let mut sessions_ended = Vec::new();
        for pool in PoolName::ALL {
            for reason in EndReason::ALL {
                sessions_ended.push(sessions_ended_vec.with_label_values(&[pool.as_str(), reason.as_str()]));
            }
        }
        let rejected = counter_vec(
            "rollout_session_keys_rejected_total",
            "Session keys not pinned: invalid key, or the pin table was full.",
            &["reason"],
        );
        let config_reloads =
            counter_vec("rollout_config_reloads_total", "Config reloads by result.", &["result"]);
        for result in ["ok", "error"] {
            config_reloads.with_label_values(&[result]);
        }
        let admin_changes =
            counter_vec("rollout_admin_changes_total", "Changes made through the admin API.", &["kind"]);
        for kind in ADMIN_CHANGE_KINDS {
            admin_changes.with_label_values(&[kind]);
        }
        let build_info = register(
            &r,
            IntGaugeVec::new(Opts::new("rollout_build_info", "Build information."), &["version"])
                .expect("valid"),
        );
        build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);

        Metrics {
            requests,
            durations: ByPool {
                v1: durations_vec.with_label_values(&["v1"]),
                v2: durations_vec.with_label_values(&["v2"]),
            },
            upstream_requests: counter_vec(
                "rollout_upstream_requests_total",
                "Responses from upstreams, by status class.",
                &["pool", "upstream", "code_class"],
            ),
            upstream_errors: counter_vec(
                "rollout_upstream_errors_total",
                "Failed upstream exchanges, by kind.",
                &["pool", "upstream", "kind"],
            ),
            upstream_healthy: register(
                &r,
                IntGaugeVec::new(
                    Opts::new("rollout_upstream_healthy", "1 when the upstream may get traffic."),
                    &["pool", "upstream"],
                )
                .expect("valid"),
            ),
            upstream_weight: register(
                &r,
                IntGaugeVec::new(
                    Opts::new("rollout_upstream_weight", "Current weight of the upstream."),
                    &["pool", "upstream"],
                )
                .expect("valid"),
            ),
            legacy_v1_percent: gauge("rollout_legacy_v1_percent", "Share of new legacy sessions sent to v1."),
            sessions_active: register(
                &r,
                IntGaugeVec::new(
                    Opts::new("rollout_sessions_active", "Live session pins, by pool."),
                    &["pool"],
                )
                .expect("valid"),
            ),
            sessions_started: ByPool {
                v1: sessions_started_vec.with_label_values(&["v1"]),
                v2: sessions_started_vec.with_label_values(&["v2"]),
            },
            sessions_ended,
            keys_rejected_invalid: rejected.with_label_values(&["invalid"]),
            client_rejected: {
                let vec = counter_vec(
                    "rollout_client_rejected_total",
                    "Client connections or requests refused by a limit, by reason.",
                    &["reason"],
                );
                ClientRejections {
                    max_connections: vec.with_label_values(&["max_connections"]),
                    header_timeout: vec.with_label_values(&["header_timeout"]),
                    send_timeout: vec.with_label_values(&["send_timeout"]),
                    headers_too_large: vec.with_label_values(&["headers_too_large"]),
                    bad_request: vec.with_label_values(&["bad_request"]),
                }
            },
            keys_rejected_full: rejected.with_label_values(&["table_full"]),
            v1_last_request: gauge(
                "rollout_v1_last_request_timestamp_seconds",
                "Unix time of the last request forwarded to a v1 upstream.",
            ),
            v1_quiet: gauge("rollout_v1_quiet_seconds", "Seconds since the last request forwarded to v1."),
            quiet_window: gauge(
                "rollout_drain_quiet_window_seconds",
                "Quiet time required before v1 counts as drained.",
            ),
            drained: register(
                &r,
                IntGauge::new(
                    "rollout_v1_drained",
                    "1 when no v1 pin is live and v1 was quiet for the window.",
                )
                .expect("valid"),
            ),
            config_reloads,
            admin_changes,
            state_last_commit: gauge(
                "rollout_state_last_commit_timestamp_seconds",
                "Unix time of the last successful commit to the state store.",
            ),
            state_commits: register(
                &r,
                IntCounter::new("rollout_state_commits_total", "Successful commits to the state store.")
                    .expect("valid"),
            ),
            state_write_errors: register(
                &r,
                IntCounter::new("rollout_state_write_errors_total", "Failed commits to the state store.")
                    .expect("valid"),
            ),
            store_up: register(
                &r,
                IntGauge::new(
                    "rollout_store_up",
                    "1 when the store this replica answers from is reachable (in fleet mode, the fleet store).",
                )
                .expect("valid"),
            ),
            store_errors: {
                let vec = counter_vec("rollout_store_errors_total", "Failed calls to the fleet store, by operation.", &["op"]);
                for op in FLEET_OPERATIONS {
                    vec.with_label_values(&[op]);
                }
                vec
            },
            pin_conflicts: register(
                &r,
                IntCounter::new(
                    "rollout_pin_conflicts_total",
                    "New pins this replica made that the fleet store held on another pool.",
                )
                .expect("valid"),
            ),
            ramp_state: {
                let vec = register(
                    &r,
                    IntGaugeVec::new(
                        Opts::new("rollout_ramp_state", "1 for the state the automated ramp is in."),
                        &["state"],
                    )
                    .expect("valid"),
                );
                for state in RAMP_STATES {
                    vec.with_label_values(&[state]).set(i64::from(state == "none"));
                }
                vec
            },
            ramp_step: register(
                &r,
                IntGauge::new("rollout_ramp_step", "The ramp's current step, counted from 0.").expect("valid"),
            ),
            ramp_analyses: {
                let vec = counter_vec(
                    "rollout_ramp_analysis_total",
                    "The ramp's analyses of v2 against v1, by verdict.",
                    &["result"],
                );
                for verdict in RAMP_VERDICTS {
                    vec.with_label_values(&[verdict]);
                }
                vec
            },
            ramp_v2_error_ratio: {
                let ratio = gauge(
                    "rollout_ramp_v2_error_ratio",
                    "v2's 5xx ratio over the ramp's last analysis window (NaN before one).",
                );
                ratio.set(f64::NAN);
                ratio
            },
            ramp_v2_p99: {
                let p99 = gauge(
                    "rollout_ramp_v2_p99_seconds",
                    "Upper bound of the bucket holding v2's p99 in the ramp's last analysis window (NaN before one; +Inf past the last bucket).",
                );
                p99.set(f64::NAN);
                p99
            },
            ramp_leader: register(
                &r,
                IntGauge::new("rollout_ramp_leader", "1 when this replica drives the automated ramp.")
                    .expect("valid"),
            ),
            ramp_gate_calls: {
                let vec = counter_vec(
                    "rollout_ramp_gate_calls_total",
                    "Calls to the ramp's gates (webhooks), by result: open (2xx), closed (another status), error (no answer).",
                    &["result"],
                );
                for result in GATE_RESULTS {
                    vec.with_label_values(&[result]);
                }
                vec
            },
            registry: r,
        }
    }

    /// Shows the ramp's state (one of [`RAMP_STATES`]) and step, and whether this replica
    /// drives it.
    pub(crate) fn ramp(&self, state: &str, step: usize, leader: bool) {
        for name in RAMP_STATES {
            self.ramp_state.with_label_values(&[name]).set(i64::from(name == state));
        }
        self.ramp_step.set(step as i64);
        self.ramp_leader.set(i64::from(leader));
    }

    /// Counts one analysis of the ramp (`verdict` one of [`RAMP_VERDICTS`]) and shows its numbers.
    pub(crate) fn ramp_analysed(
        &self,
        verdict: &str,
        v2_error_ratio: Option<f64>,
        v2_p99_upper: Option<f64>,
    ) {
        self.ramp_analyses.with_label_values(&[verdict]).inc();
        self.ramp_v2_error_ratio.set(v2_error_ratio.unwrap_or(f64::NAN));
        self.ramp_v2_p99.set(v2_p99_upper.unwrap_or(f64::NAN));
    }

    /// Counts a finished client request.
    pub(crate) fn request(&self, decision: Decision, pool: PoolName, status: u16, seconds: f64) {
        let index = (decision as usize * 2 + pool as usize) * CLASSES.len() + class_index(status);
        if let Some(counter) = &self.requests[index] {
            counter.inc();
        }
        self.durations.get(pool).observe(seconds);
    }

    /// A pool's finished requests since the start: how many, how many answered 5xx (the
    /// proxy's own 502, 503 and 504 included), and how many per duration bucket
    /// ([`LATENCY_BUCKETS`], then the unbounded one).
    pub(crate) fn pool_totals(&self, pool: PoolName) -> (u64, u64, [u64; LATENCY_BUCKETS.len() + 1]) {
        let (mut requests, mut errors) = (0, 0);
        for decision in Decision::ALL {
            for (class, name) in CLASSES.iter().enumerate() {
                let index = (decision as usize * 2 + pool as usize) * CLASSES.len() + class;
                if let Some(counter) = &self.requests[index] {
                    requests += counter.get();
                    if *name == "5xx" {
                        errors += counter.get();
                    }
                }
            }
        }
        let histogram = self.durations.get(pool);
        let metric = prometheus::core::Metric::metric(histogram);
        let mut latency = [0; LATENCY_BUCKETS.len() + 1];
        let mut below = 0;
        for (count, bucket) in latency.iter_mut().zip(metric.get_histogram().get_bucket()) {
            *count = bucket.cumulative_count().saturating_sub(below);
            below = bucket.cumulative_count();
        }
        latency[LATENCY_BUCKETS.len()] = histogram.get_sample_count().saturating_sub(below);
        (requests, errors, latency)
    }

    pub(crate) fn session_ended(&self, pool: PoolName, reason: EndReason) {
        self.sessions_ended[pool as usize * EndReason::ALL.len() + reason as usize].inc();
    }

    /// Counter handles for one upstream.
    pub(crate) fn upstream_stats(&self, pool: PoolName, upstream: &str) -> UpstreamStats {
        UpstreamStats {
            requests: CLASSES
                .map(|c| self.upstream_requests.with_label_values(&[pool.as_str(), upstream, c])),
            errors: UpstreamErrorKind::ALL
                .map(|k| self.upstream_errors.with_label_values(&[pool.as_str(), upstream, k.as_str()])),
        }
    }

    /// Refreshes the state gauges and renders everything in the Prometheus text format.
    pub(crate) fn render(&self, state: &ScrapeState) -> String {
        for pool in PoolName::ALL {
            self.sessions_active
                .with_label_values(&[pool.as_str()])
                .set(*state.sessions_active.get(pool) as i64);
        }
        self.legacy_v1_percent.set(state.legacy_v1_percent);
        self.v1_last_request.set(state.v1_last_request_seconds);
        self.v1_quiet.set(state.v1_quiet_seconds);
        self.quiet_window.set(state.quiet_window_seconds);
        self.drained.set(i64::from(state.drained));
        self.upstream_healthy.reset();
        self.upstream_weight.reset();
        for (pool, name, healthy, weight) in &state.upstreams {
            self.upstream_healthy.with_label_values(&[pool.as_str(), name]).set(i64::from(*healthy));
            self.upstream_weight.with_label_values(&[pool.as_str(), name]).set(i64::from(*weight));
        }
        self.state_last_commit.set(state.state_last_commit_seconds);
        // The store counts; these counters follow it.
        self.state_commits.inc_by(state.state_commits.saturating_sub(self.state_commits.get()));
        self.state_write_errors
            .inc_by(state.state_write_errors.saturating_sub(self.state_write_errors.get()));
        self.store_up.set(i64::from(state.store_up));

        let mut out = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut out).expect("text encoding does not fail");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}
