//! The running routing state, built from a validated config and published through one `ArcSwap`.
//!
//! A request loads the current snapshot once (`load_full`, since the request awaits) and uses it
//! to the end, so a swap never changes the rules half-way through a request. Building a snapshot
//! does no I/O; reading and validating the file is [`crate::config`]'s job.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

use crate::balancer::Balancer;
use crate::config::{ByPool, Config, PoolName};
use crate::router::Router;
use crate::upstream::Upstream;

#[derive(Debug)]
pub struct Snapshot {
    pub router: Router,
    pub pools: ByPool<Balancer>,
    /// Whether responses carry `x-rollout-pool`.
    pub pool_header: bool,
    pub max_header_bytes: usize,
    pub response_timeout: Duration,
}

impl Snapshot {
    pub fn build(config: &Config) -> Snapshot {
        let pools = config.pools.map(|_, pool| {
            Balancer::new(pool.upstreams.iter().map(|u| Arc::new(Upstream::new(u))).collect())
        });
        Snapshot {
            router: Router::new(config.routes.v2_prefixes.clone(), config.routes.legacy_v1_percent),
            pools,
            pool_header: config.routes.pool_header,
            max_header_bytes: config.client.max_header_bytes,
            response_timeout: config.upstream.response_timeout,
        }
    }

    pub fn pool(&self, pool: PoolName) -> &Balancer {
        self.pools.get(pool)
    }
}

/// The handle every request reads the current snapshot from.
pub type SharedSnapshot = Arc<ArcSwap<Snapshot>>;

pub fn shared(config: &Config) -> SharedSnapshot {
    Arc::new(ArcSwap::from_pointee(Snapshot::build(config)))
}
