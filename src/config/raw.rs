//! The file format as serde reads it: one struct per section, unknown keys refused and every
//! default filled in, so a parsed [`RawConfig`] *is* the effective configuration.
//!
//! Nothing here checks a value beyond what its Rust type enforces; `validate.rs` turns a
//! [`RawConfig`] into the runtime [`Config`]. The structs also serve the other way round: `check`
//! prints a validated [`Config`] written back through them.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{Config, OnStoreError, PoolConfig, SessionKeySpec, StoreConfig};

/// The config file as written, with defaults filled in.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConfig {
    /// Data-plane listen address.
    #[serde(default = "default_listen")]
    pub(crate) listen: String,
    /// Worker threads of the runtime; 0 means one per CPU core.
    #[serde(default)]
    pub(crate) workers: usize,
    #[serde(default = "default_state_dir")]
    pub(crate) state_dir: PathBuf,
    /// TLS on the data-plane listener; plain HTTP when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) tls: Option<RawTls>,
    #[serde(default)]
    pub(crate) admin: RawAdmin,
    pub(crate) pools: RawPools,
    #[serde(default)]
    pub(crate) routes: RawRoutes,
    #[serde(default)]
    pub(crate) sessions: RawSessions,
    #[serde(default)]
    pub(crate) drain: RawDrain,
    #[serde(default)]
    pub(crate) client: RawClient,
    #[serde(default)]
    pub(crate) upstream: RawUpstreamSettings,
    #[serde(default)]
    pub(crate) shutdown: RawShutdown,
    #[serde(default)]
    pub(crate) store: RawStore,
    #[serde(default)]
    pub(crate) log: RawLog,
    /// An automated ramp to start when the proxy starts with none stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) ramp: Option<super::ramp::RawPlan>,
}

/// What the proxy logs beyond its own events.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct RawLog {
    /// One line per request, target `access`, at info.
    pub(crate) access: bool,
}

/// Where pins, the drain clock and operator changes are kept: `embedded` (one replica, redb in
/// `state_dir`) or `redis` (a fleet of replicas sharing one Redis or Valkey).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct RawStore {
    pub(crate) backend: RawBackend,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) url: Option<String>,
    pub(crate) namespace: String,
    pub(crate) on_store_error: RawOnStoreError,
    /// How long a replica leads the fleet's ramp without renewing its lease.
    #[serde(with = "humantime_serde")]
    pub(crate) leader_lease: Duration,
}

impl Default for RawStore {
    fn default() -> Self {
        RawStore {
            backend: RawBackend::Embedded,
            url: None,
            namespace: "rollout".to_owned(),
            on_store_error: RawOnStoreError::Degrade,
            leader_lease: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum RawBackend {
    Embedded,
    Redis,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum RawOnStoreError {
    Degrade,
    FailClosed,
}

fn default_listen() -> String {
    "0.0.0.0:8080".to_owned()
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/rollout-proxy")
}

/// PEM files of the served certificate chain and its private key.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTls {
    pub(crate) cert: PathBuf,
    pub(crate) key: PathBuf,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct RawAdmin {
    pub(crate) listen: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) token_file: Option<PathBuf>,
    /// Serve the admin API (and console) over TLS with this certificate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) tls: Option<RawTls>,
}

impl Default for RawAdmin {
    fn default() -> Self {
        RawAdmin { listen: "127.0.0.1:9901".to_owned(), token_file: None, tls: None }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPools {
    pub(crate) v1: RawPool,
    pub(crate) v2: RawPool,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPool {
    pub(crate) upstreams: Vec<RawUpstream>,
    /// Active health checks; none when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) health: Option<RawHealth>,
    #[serde(default)]
    pub(crate) ejection: RawEjection,
}

/// Active health checks of a pool's upstreams.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct RawHealth {
    pub(crate) path: String,
    #[serde(with = "humantime_serde")]
    pub(crate) interval: Duration,
    #[serde(with = "humantime_serde")]
    pub(crate) timeout: Duration,
    /// Good probes in a row that bring an upstream back.
    pub(crate) healthy_threshold: u32,
    /// Failed probes in a row that take an upstream out.
    pub(crate) unhealthy_threshold: u32,
}

impl Default for RawHealth {
    fn default() -> Self {
        RawHealth {
            path: "/healthz".to_owned(),
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(2),
            healthy_threshold: 2,
            unhealthy_threshold: 3,
        }
    }
}

/// Passive ejection: an upstream failing real requests in a row is skipped for a while.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct RawEjection {
    /// Connect errors, closed connections or 502/503/504 answers in a row that eject; 0 turns
    /// ejection off.
    pub(crate) consecutive_failures: u32,
    /// How long an ejected upstream is skipped, 1s to 1h.
    #[serde(with = "humantime_serde")]
    pub(crate) duration: Duration,
}

impl Default for RawEjection {
    fn default() -> Self {
        RawEjection { consecutive_failures: 5, duration: Duration::from_secs(30) }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawUpstream {
    pub(crate) name: String,
    pub(crate) url: String,
    #[serde(default = "default_weight")]
    pub(crate) weight: u32,
}

fn default_weight() -> u32 {
    1
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct RawRoutes {
    pub(crate) v2_prefixes: Vec<String>,
    pub(crate) legacy_v1_percent: f64,
    pub(crate) pool_header: bool,
}

impl Default for RawRoutes {
    fn default() -> Self {
        RawRoutes { v2_prefixes: vec!["/api/v2".to_owned()], legacy_v1_percent: 100.0, pool_header: true }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct RawSessions {
    pub(crate) keys: Vec<RawSessionKey>,
    #[serde(with = "humantime_serde")]
    pub(crate) max_duration: Duration,
    /// Defaults to `max_duration`.
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub(crate) idle_timeout: Option<Duration>,
    pub(crate) max_active: usize,
}

impl Default for RawSessions {
    fn default() -> Self {
        RawSessions {
            keys: vec![
                RawSessionKey { path: Some("/api/studies/{id}".to_owned()), ..RawSessionKey::default() },
                RawSessionKey { query: Some("studyId".to_owned()), ..RawSessionKey::default() },
            ],
            max_duration: Duration::from_secs(10 * 3600 + 40 * 60),
            idle_timeout: None,
            max_active: 1_000_000,
        }
    }
}

/// One session-key extractor; exactly one of the fields is set.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSessionKey {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) query: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) header: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) cookie: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct RawDrain {
    #[serde(with = "humantime_serde")]
    pub(crate) quiet_window: Duration,
}

impl Default for RawDrain {
    fn default() -> Self {
        RawDrain { quiet_window: Duration::from_secs(24 * 3600) }
    }
}

/// Limits applied to client connections.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct RawClient {
    /// Time a client has to send a complete request head (slowloris guard). It also bounds how
    /// long an idle keep-alive connection (HTTP/1.1, or HTTP/2 with no stream open) waits for
    /// its next request.
    #[serde(with = "humantime_serde")]
    pub(crate) header_read_timeout: Duration,
    /// How long writing a response to a client may make no progress before both connections
    /// are closed (a client that stops reading).
    #[serde(with = "humantime_serde")]
    pub(crate) send_timeout: Duration,
    /// Largest request head (request line plus headers) accepted; larger answers 431.
    pub(crate) max_header_bytes: usize,
    /// Most client connections open at once; more are answered 503 and closed.
    pub(crate) max_connections: usize,
    /// Most HTTP/2 streams (requests) one client connection may have open at once.
    pub(crate) max_concurrent_streams: u32,
    /// Forward request header names that contain `_`. Off by default: backends that map `_` to
    /// `-` would read `Content_Length` or `X_Forwarded_For` as the real thing.
    pub(crate) allow_underscores_in_headers: bool,
    /// Have the kernel hand over a new connection only once its first bytes have arrived
    /// (Linux's `TCP_DEFER_ACCEPT`); one that sends nothing is handed over after about a second.
    pub(crate) defer_accept: bool,
}

impl Default for RawClient {
    fn default() -> Self {
        RawClient {
            header_read_timeout: Duration::from_secs(10),
            send_timeout: Duration::from_secs(60),
            max_header_bytes: 16 * 1024,
            max_connections: 10_000,
            max_concurrent_streams: 100,
            allow_underscores_in_headers: false,
            defer_accept: true,
        }
    }
}

/// Settings for the proxy's connections to upstreams.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct RawUpstreamSettings {
    #[serde(with = "humantime_serde")]
    pub(crate) connect_timeout: Duration,
    /// Time from sending a request until the upstream's response head arrives.
    #[serde(with = "humantime_serde")]
    pub(crate) response_timeout: Duration,
    /// How long an idle keep-alive connection to an upstream is kept.
    #[serde(with = "humantime_serde")]
    pub(crate) idle_timeout: Duration,
    pub(crate) max_idle_per_upstream: usize,
    /// Most connections open to one upstream at once, both paths together; a request past it
    /// waits up to `connect_timeout` for one to come free, then answers 503 `upstream_busy`.
    pub(crate) max_connections_per_upstream: usize,
    /// Further attempts on other upstreams of the same pool when a request could not be
    /// delivered (connect failure; or connection closed before a response head, for
    /// idempotent requests without a body).
    pub(crate) retries: u32,
    /// Extra CA certificates (PEM) trusted for `https://` upstreams, besides the Mozilla roots.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) ca_file: Option<PathBuf>,
}

impl Default for RawUpstreamSettings {
    fn default() -> Self {
        RawUpstreamSettings {
            connect_timeout: Duration::from_secs(2),
            response_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(90),
            max_idle_per_upstream: 256,
            max_connections_per_upstream: 1024,
            retries: 2,
            ca_file: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct RawShutdown {
    /// How long a graceful stop waits for in-flight requests before closing them.
    #[serde(with = "humantime_serde")]
    pub(crate) grace_period: Duration,
}

impl Default for RawShutdown {
    fn default() -> Self {
        RawShutdown { grace_period: Duration::from_secs(30) }
    }
}

impl From<&Config> for RawConfig {
    /// Writes a validated configuration back in the file's format, every default filled in, for
    /// `check` to print. Reading the result back gives the same [`Config`]; spellings that
    /// validation normalises (a prefix's trailing `/`, a header name's case) come out normalised.
    fn from(config: &Config) -> RawConfig {
        let pool = |pool: &PoolConfig| RawPool {
            upstreams: pool
                .upstreams
                .iter()
                .map(|u| RawUpstream { name: u.name.to_string(), url: u.url.to_string(), weight: u.weight })
                .collect(),
            health: pool.health.as_ref().map(|h| RawHealth {
                path: h.path.clone(),
                interval: h.interval,
                timeout: h.timeout,
                healthy_threshold: h.healthy_threshold,
                unhealthy_threshold: h.unhealthy_threshold,
            }),
            ejection: RawEjection {
                consecutive_failures: pool.ejection.consecutive_failures,
                duration: pool.ejection.duration,
            },
        };
        let session_key = |spec: &SessionKeySpec| match spec {
            SessionKeySpec::Path { template, .. } => {
                RawSessionKey { path: Some(template.clone()), ..RawSessionKey::default() }
            }
            SessionKeySpec::Query(name) => {
                RawSessionKey { query: Some(name.clone()), ..RawSessionKey::default() }
            }
            SessionKeySpec::Header(name) => {
                RawSessionKey { header: Some(name.as_str().to_owned()), ..RawSessionKey::default() }
            }
            SessionKeySpec::Cookie(name) => {
                RawSessionKey { cookie: Some(name.clone()), ..RawSessionKey::default() }
            }
        };
        let sessions = &config.sessions;
        RawConfig {
            listen: config.listen.to_string(),
            workers: config.workers,
            state_dir: config.state_dir.clone(),
            tls: config.tls.as_ref().map(|t| RawTls { cert: t.cert.clone(), key: t.key.clone() }),
            admin: RawAdmin {
                listen: config.admin_listen.to_string(),
                token_file: config.admin_token_file.clone(),
                tls: config.admin_tls.as_ref().map(|t| RawTls { cert: t.cert.clone(), key: t.key.clone() }),
            },
            pools: RawPools { v1: pool(&config.pools.v1), v2: pool(&config.pools.v2) },
            routes: RawRoutes {
                v2_prefixes: config.routes.v2_prefixes.iter().map(|p| p.as_str().to_owned()).collect(),
                legacy_v1_percent: config.routes.legacy_v1_percent.as_f64(),
                pool_header: config.routes.pool_header,
            },
            sessions: RawSessions {
                keys: sessions.keys.iter().map(session_key).collect(),
                max_duration: sessions.max_duration,
                // Written out even where it defaulted to `max_duration`: it is a value in effect.
                idle_timeout: Some(sessions.idle_timeout),
                max_active: sessions.max_active,
            },
            drain: RawDrain { quiet_window: config.quiet_window },
            client: RawClient {
                header_read_timeout: config.client.header_read_timeout,
                send_timeout: config.client.send_timeout,
                max_header_bytes: config.client.max_header_bytes,
                max_connections: config.client.max_connections,
                max_concurrent_streams: config.client.max_concurrent_streams,
                allow_underscores_in_headers: config.client.allow_underscores_in_headers,
                defer_accept: config.client.defer_accept,
            },
            upstream: RawUpstreamSettings {
                connect_timeout: config.upstream.connect_timeout,
                response_timeout: config.upstream.response_timeout,
                idle_timeout: config.upstream.idle_timeout,
                max_idle_per_upstream: config.upstream.max_idle_per_upstream,
                max_connections_per_upstream: config.upstream.max_connections_per_upstream,
                retries: config.upstream.retries,
                ca_file: config.upstream.ca_file.clone(),
            },
            shutdown: RawShutdown { grace_period: config.grace_period },
            store: match &config.store {
                StoreConfig::Embedded => RawStore::default(),
                StoreConfig::Redis(fleet) => RawStore {
                    backend: RawBackend::Redis,
                    url: Some(fleet.url.clone()),
                    namespace: fleet.namespace.clone(),
                    on_store_error: match fleet.on_store_error {
                        OnStoreError::Degrade => RawOnStoreError::Degrade,
                        OnStoreError::FailClosed => RawOnStoreError::FailClosed,
                    },
                    leader_lease: fleet.leader_lease,
                },
            },
            log: RawLog { access: config.access_log },
            ramp: config.ramp.as_ref().map(super::ramp::Plan::to_raw),
        }
    }
}
