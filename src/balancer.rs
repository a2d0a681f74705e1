//! Smooth weighted round-robin inside one pool.
//!
//! Each pick adds every eligible upstream's weight to its running score, takes the highest score
//! and subtracts the total from it. Over any window of `sum(weights)` picks each upstream is chosen
//! exactly `weight` times, spread out rather than in bursts. Upstreams with weight 0 or marked
//! unhealthy are skipped. Which pool to pick from is [`crate::router`]'s decision.

use std::sync::{Arc, Mutex};

use crate::upstream::Upstream;

#[derive(Debug)]
pub struct Balancer {
    upstreams: Vec<Arc<Upstream>>,
    /// Running scores, one per upstream. A pool has a handful of upstreams, so one short lock per
    /// pick is cheaper than any lock-free scheme would be.
    scores: Mutex<Vec<i64>>,
}

impl Balancer {
    pub fn new(upstreams: Vec<Arc<Upstream>>) -> Self {
        let scores = Mutex::new(vec![0; upstreams.len()]);
        Balancer { upstreams, scores }
    }

    /// The next upstream to use, or `None` when no upstream is eligible.
    pub fn pick(&self) -> Option<&Arc<Upstream>> {
        let mut scores = self.scores.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut total = 0i64;
        let mut best: Option<usize> = None;
        for (i, upstream) in self.upstreams.iter().enumerate() {
            let weight = i64::from(upstream.weight());
            if weight == 0 || !upstream.is_healthy() {
                continue;
            }
            scores[i] += weight;
            total += weight;
            if best.is_none_or(|b| scores[i] > scores[b]) {
                best = Some(i);
            }
        }
        let chosen = best?;
        scores[chosen] -= total;
        Some(&self.upstreams[chosen])
    }

    /// Whether the pool has a usable upstream (weight above 0, healthy) other than `upstream`.
    pub(crate) fn has_other_usable(&self, upstream: &Upstream) -> bool {
        self.upstreams.iter().any(|u| !std::ptr::eq(&**u, upstream) && u.weight() > 0 && u.is_healthy())
    }

    pub(crate) fn upstreams(&self) -> &[Arc<Upstream>] {
        &self.upstreams
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{UpstreamConfig, UpstreamName, UpstreamUrl};
    use crate::upstream::UpstreamState;

    fn balancer(weights: &[u32]) -> Balancer {
        let upstreams = weights
            .iter()
            .enumerate()
            .map(|(i, &weight)| {
                Arc::new(Upstream::new(
                    &UpstreamConfig {
                        name: UpstreamName::try_new(&format!("u{i}")).unwrap(),
                        url: UpstreamUrl::try_parse(&format!("http://127.0.0.1:{}", 1000 + i)).unwrap(),
                        weight,
                    },
                    crate::metrics::UpstreamStats::unregistered(),
                    UpstreamState::new(&Default::default()),
                ))
            })
            .collect();
        Balancer::new(upstreams)
    }

    fn names(b: &Balancer, n: usize) -> Vec<String> {
        (0..n).map(|_| b.pick().unwrap().name().to_string()).collect()
    }

    #[test]
    fn weights_are_honoured_and_interleaved() {
        let b = balancer(&[5, 1, 1]);
        // The classic smooth sequence for 5:1:1.
        assert_eq!(names(&b, 7), ["u0", "u0", "u1", "u0", "u2", "u0", "u0"]);
    }

    #[test]
    fn weight_zero_and_unhealthy_are_skipped() {
        let b = balancer(&[0, 1, 1]);
        assert!(names(&b, 10).iter().all(|n| n != "u0"));
        b.upstreams()[1].health().set_probed(false);
        assert!(names(&b, 10).iter().all(|n| n == "u2"));
        b.upstreams()[2].health().set_probed(false);
        assert!(b.pick().is_none());
    }
}
