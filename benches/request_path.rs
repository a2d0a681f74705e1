//! Micro-benchmarks of the per-request pieces of the proxy that do not touch the network: the
//! v2-prefix decision, the legacy split, the weighted pick inside a pool, session-key
//! extraction, and the header rewrite, both on hyper's header maps and on the HTTP/1.1 fast
//! path's bytes (request head parsed and rewritten; response head parsed and rewritten).
//!
//! They exist to catch regressions in work done on every request; the end-to-end comparison
//! against other proxies is a separate load benchmark.

use std::hint::black_box;
use std::mem::MaybeUninit;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use http::{HeaderMap, HeaderValue};
use rollout_proxy::balancer::Balancer;
use rollout_proxy::config::{Percent, Prefix, SessionKeySpec, UpstreamConfig, UpstreamName, UpstreamUrl};
use rollout_proxy::metrics::UpstreamStats;
use rollout_proxy::router::Router;
use rollout_proxy::session::{KeyExtractor, KeyOutcome};
use rollout_proxy::upstream::{Upstream, UpstreamState};
use rollout_proxy::{h1, headers};

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
    let host = HeaderValue::from_static("study.example");
    let client = headers::ClientIp::new("192.0.2.10".parse().unwrap());
    c.bench_function("prepare request headers", |b| {
        b.iter_batched_ref(
            || template.clone(),
            |h| headers::prepare_request(h, host.clone(), &client, "http", false),
            criterion::BatchSize::SmallInput,
        )
    });
}

const REQUEST: &[u8] = b"GET /api/studies/42/contents?lang=en HTTP/1.1\r\nHost: study.example\r\n\
User-Agent: Mozilla/5.0 (X11; Linux x86_64)\r\nAccept: application/json\r\n\
Accept-Encoding: gzip, deflate, br\r\nCookie: session=abc123\r\nConnection: keep-alive\r\n\r\n";

const RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\nServer: app\r\nDate: Wed, 25 Nov 2026 12:00:00 GMT\r\n\
Content-Type: application/json\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\n{}";

fn fast_path(c: &mut Criterion) {
    let keys = KeyExtractor::new(vec![
        SessionKeySpec::Path {
            template: "/api/studies/{id}".into(),
            segments: vec![Some("api".into()), Some("studies".into()), None],
        },
        SessionKeySpec::Query("studyId".into()),
    ]);
    let mut out = Vec::with_capacity(1024);
    c.bench_function("h1: parse, extract key, rewrite request head", |b| {
        b.iter(|| {
            let mut headers = [const { MaybeUninit::uninit() }; h1::MAX_HEADERS];
            let h1::ParsedRequest::Complete(head) = h1::parse_request(black_box(REQUEST), &mut headers)
            else {
                panic!("benchmark request must parse")
            };
            let key = matches!(keys.extract_from(head.path(), head.query(), &head), KeyOutcome::Key("42"));
            h1::write_request(&mut out, &head, "192.0.2.10", "http", false);
            (key, out.len())
        })
    });
    let rules = h1::ResponseRules { head_request: false, pool: Some("v1") };
    c.bench_function("h1: parse and rewrite response head", |b| {
        b.iter(|| h1::rewrite_response(black_box(RESPONSE), rules, &mut out).map(|h| h.map(|h| h.len)))
    });
}

criterion_group!(benches, routing, balancing, header_rewrite, fast_path);
criterion_main!(benches);
