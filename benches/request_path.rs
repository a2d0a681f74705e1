//! Micro-benchmarks of the per-request pieces of the proxy that do not touch the network: the
//! v2-prefix decision, the legacy split, the weighted pick inside a pool and the header rewrite.
//!
//! They exist to catch regressions in work done on every request; the end-to-end comparison
//! against other proxies is a separate load benchmark.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use http::{HeaderMap, HeaderValue, Uri};
use rollout_proxy::balancer::Balancer;
use rollout_proxy::config::{Percent, Prefix, UpstreamConfig, UpstreamName, UpstreamUrl};
use rollout_proxy::headers;
use rollout_proxy::metrics::UpstreamStats;
use rollout_proxy::router::Router;
use rollout_proxy::upstream::{Upstream, UpstreamState};

fn routing(c: &mut Criterion) {
    let router = Router::new(
        vec![Prefix::try_new("/api/v2").unwrap(), Prefix::try_new("/api/v3").unwrap()],
        Percent::try_from_f64(30.0).unwrap(),
    );
    c.bench_function("route v2 path", |b| b.iter(|| router.route(black_box("/api/v2/studies/42/contents"))));
    c.bench_function("route legacy path", |b| b.iter(|| router.route(black_box("/api/studies/42/contents"))));
    c.bench_function("legacy split", |b| b.iter(|| router.split()));
}

fn balancing(c: &mut Criterion) {
    let upstreams = (0..4)
        .map(|i| {
            Arc::new(Upstream::new(
                &UpstreamConfig {
                    name: UpstreamName::try_new(&format!("was-{i}")).unwrap(),
                    url: UpstreamUrl::try_parse(&format!("http://10.0.1.{i}:8080")).unwrap(),
                    weight: i + 1,
                },
                UpstreamStats::unregistered(),
                UpstreamState::new(&Default::default()),
            ))
        })
        .collect();
    let balancer = Balancer::new(upstreams);
    c.bench_function("weighted pick of 4", |b| b.iter(|| balancer.pick().map(|u| u.weight())));
}

fn header_rewrite(c: &mut Criterion) {
    let mut template = HeaderMap::new();
    for (k, v) in [
        ("host", "study.example"),
        ("user-agent", "Mozilla/5.0 (X11; Linux x86_64)"),
        ("accept", "application/json"),
        ("accept-encoding", "gzip, deflate, br"),
        ("cookie", "session=abc123"),
        ("connection", "keep-alive"),
    ] {
        template.insert(k, HeaderValue::from_static(v));
    }
    let uri = Uri::from_static("/api/studies/42/contents");
    let client = headers::ClientIp::new("192.0.2.10".parse().unwrap());
    c.bench_function("prepare request headers", |b| {
        b.iter_batched_ref(
            || template.clone(),
            |h| headers::prepare_request(h, &uri, &client, "http"),
            criterion::BatchSize::SmallInput,
        )
    });
}

criterion_group!(benches, routing, balancing, header_rewrite);
criterion_main!(benches);
