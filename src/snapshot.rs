//! The running routing state, built from a validated config and published through one `ArcSwap`.
//!
//! A request loads the current snapshot once (`load_full`, since the request awaits) and uses it
//! to the end, so a swap never changes the rules half-way through a request. Building a snapshot
//! does no I/O; reading and validating the file is [`crate::config`]'s job, deciding when to
//! swap (admin changes, reloads) is [`crate::control`]'s.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

use crate::balancer::Balancer;
use crate::config::{ByPool, Config, Ejection, HealthCheck, PoolName};
use crate::metrics::Metrics;
use crate::router::Router;
use crate::session::{KeyExtractor, PinPolicy};
use crate::upstream::{Upstream, UpstreamState};

#[derive(Debug)]
pub struct Snapshot {
    pub router: Router,
    pub pools: ByPool<Balancer>,
    /// Whether responses carry `x-rollout-pool`.
    pub pool_header: bool,
    /// `log.access`: a log line per request.
    pub access_log: bool,
    pub max_header_bytes: usize,
    /// `client.allow_underscores_in_headers`.
    pub allow_underscores: bool,
    pub response_timeout: Duration,
    pub keys: KeyExtractor,
    pub pin_policy: PinPolicy,
    pub quiet_window: Duration,
    pub health_checks: ByPool<Option<HealthCheck>>,
    pub ejection: ByPool<Ejection>,
    pub retries: u32,
    /// No upstream speaks TLS: plain HTTP/1.1 clients can be served on [`crate::h1`]'s fast path.
    pub plain_upstreams: bool,
}

impl Snapshot {
    /// Builds a snapshot of `config`. Upstreams that `previous` also has (same pool, name and
    /// URL) keep their health and their idle connections.
    pub(crate) fn build(config: &Config, metrics: &Metrics, previous: Option<&Snapshot>) -> Snapshot {
        let pools = config.pools.map(|pool, cfg| {
            let upstreams = cfg
                .upstreams
                .iter()
                .map(|u| {
                    let state = previous
                        .and_then(|p| {
                            p.pool(pool)
                                .upstreams()
                                .iter()
                                .find(|old| old.name() == &u.name && old.url() == &u.url)
                        })
                        .map_or_else(|| UpstreamState::new(&config.upstream), |old| old.state().clone());
                    Arc::new(Upstream::new(u, metrics.upstream_stats(pool, u.name.as_str()), state))
                })
                .collect();
            Balancer::new(upstreams)
        });
        Snapshot {
            router: Router::new(config.routes.v2_prefixes.clone(), config.routes.legacy_v1_percent),
            pools,
            pool_header: config.routes.pool_header,
            access_log: config.access_log,
            max_header_bytes: config.client.max_header_bytes,
            allow_underscores: config.client.allow_underscores_in_headers,
            response_timeout: config.upstream.response_timeout,
            keys: KeyExtractor::new(config.sessions.keys.clone()),
            pin_policy: PinPolicy::from_config(config),
            quiet_window: config.quiet_window,
            health_checks: config.pools.map(|_, p| p.health.clone()),
            ejection: config.pools.map(|_, p| p.ejection),
            retries: config.upstream.retries,
            plain_upstreams: config
                .pools
                .v1
                .upstreams
                .iter()
                .chain(&config.pools.v2.upstreams)
                .all(|u| !u.url.is_tls()),
        }
    }

    pub(crate) fn pool(&self, pool: PoolName) -> &Balancer {
        self.pools.get(pool)
    }
}

/// The handle every request reads the current snapshot from.
pub(crate) type SharedSnapshot = Arc<ArcSwap<Snapshot>>;
