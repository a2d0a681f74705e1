//! Active health checks: probes each upstream of a pool that has `health` configured on its
//! interval, following snapshot swaps, and feeds the results to its [`Health`](super::Health).
//!
//! What a result means (thresholds, coming back into service) is [`super`]'s; which upstreams
//! exist is the current [`crate::snapshot::Snapshot`]'s.

use std::sync::atomic::Ordering;
use std::time::Duration;

use http::Request;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::now_ms;
use crate::config::{HealthCheck, PoolName};
use crate::snapshot::SharedSnapshot;
use crate::upstream::{Upstream, UpstreamBody, UpstreamClient};

/// Runs active checks for every upstream of every pool that has `health` configured, following
/// snapshot swaps, until `stop` fires.
pub(crate) async fn run_checks(snapshot: SharedSnapshot, client: UpstreamClient, stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let snapshot = snapshot.load_full();
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
                let (upstream, client, check) = (upstream.clone(), client.clone(), check.clone());
                tokio::spawn(async move {
                    let _probing = ProbeGuard(&upstream);
                    // The whole probe, body included, is bounded: a hung one counts as failed. One
                    // the proxy could not send (its own connection cap, no descriptors) says
                    // nothing about the upstream and is not counted.
                    let ok =
                        match tokio::time::timeout(check.timeout, probe(&client, &upstream, &check)).await {
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
struct ProbeGuard<'a>(&'a Upstream);

impl Drop for ProbeGuard<'_> {
    fn drop(&mut self) {
        self.0.health().probing.store(false, Ordering::Relaxed);
    }
}

/// Whether the upstream answered the probe with a success or a redirect; `None` when the failure
/// was the proxy's own, not the upstream's ([`crate::upstream::UpstreamError::is_local`]).
async fn probe(client: &UpstreamClient, upstream: &Upstream, check: &HealthCheck) -> Option<bool> {
    let req = Request::get(check.path.as_str())
        .header(http::header::HOST, upstream.authority().as_str())
        .header(http::header::USER_AGENT, "rollout-proxy health check")
        .body(UpstreamBody::Empty)
        .expect("a path and static headers form a request");
    match client.send(upstream, req, check.timeout).await {
        Ok(response) => {
            let ok = response.status().is_success() || response.status().is_redirection();
            // Read the body to the end so the connection goes back to the pool.
            let _ = http_body_util::BodyExt::collect(response.into_body()).await;
            Some(ok)
        }
        Err(err) => (!err.error.is_local()).then_some(false),
    }
}
