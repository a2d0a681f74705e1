//! What reaches the upstream and what comes back: bodies, headers, HTTP/2, proxy-made errors.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::Full;
use support::{
    get, h2c_client, http1_client, send, ClientSettings, ConfigBuilder, ProxyBuilder, Upstream,
    UpstreamSettings,
};

const FIVE_MIB: usize = 5 * 1024 * 1024;

/// A proxy with one upstream per pool, its config adjusted by `adjust`.
async fn proxy_to_one_v1(adjust: impl FnOnce(ConfigBuilder) -> ConfigBuilder) -> support::ProxyHandle {
    let v1 = Upstream::new("v1-a").spawn().await;
    let v2 = Upstream::new("v2-a").spawn().await;
    ProxyBuilder::new(&adjust(ConfigBuilder::one_each(v1, v2))).spawn().await
}

#[tokio::test]
async fn five_mib_request_body_arrives_intact() {
    let proxy = proxy_to_one_v1(|c| c).await;
    let body = support::pattern_bytes(FIVE_MIB);
    let req = Request::post(proxy.url("/api/studies/9/contents"))
        .body(Full::new(Bytes::from(body.clone())))
        .unwrap();
    let echo = send(&http1_client(), req).await.echo();
    assert_eq!(echo.method, "POST");
    assert_eq!(echo.body_len, FIVE_MIB);
    assert_eq!(echo.body_sha256, support::sha256(&body));
    proxy.shutdown().await;
}

#[tokio::test]
async fn five_mib_streamed_response_arrives_intact() {
    let proxy = proxy_to_one_v1(|c| c).await;
    let reply = get(&proxy.url(&format!("/__big/{FIVE_MIB}"))).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.header("x-rollout-pool"), Some("v1"));
    assert_eq!(reply.body.len(), FIVE_MIB);
    assert_eq!(support::sha256(&reply.body), support::sha256(&support::pattern_bytes(FIVE_MIB)));
    proxy.shutdown().await;
}

#[tokio::test]
async fn hop_by_hop_headers_stay_behind_and_forwarded_headers_are_set() {
    let proxy = proxy_to_one_v1(|c| c).await;
    let req = Request::get(proxy.url("/api/studies/9"))
        .header("host", "study.example")
        .header("connection", "keep-alive, x-hop-secret")
        .header("x-hop-secret", "must not pass")
        .header("keep-alive", "timeout=5")
        .header("proxy-connection", "keep-alive")
        .header("te", "trailers")
        .header("x-forwarded-for", "203.0.113.7")
        .header("x-end-to-end", "kept")
        .body(Full::default())
        .unwrap();
    let echo = send(&http1_client(), req).await.echo();
    for gone in ["connection", "x-hop-secret", "keep-alive", "proxy-connection", "te"] {
        assert!(!echo.headers.contains_key(gone), "{gone} reached the upstream: {:?}", echo.headers);
    }
    assert_eq!(echo.headers["x-end-to-end"], ["kept"]);
    assert_eq!(echo.headers["host"], ["study.example"], "Host is preserved");
    assert_eq!(echo.headers["x-forwarded-for"], ["203.0.113.7, 127.0.0.1"], "X-Forwarded-For is appended");
    assert_eq!(echo.headers["x-forwarded-proto"], ["http"]);
    assert_eq!(echo.headers["x-forwarded-host"], ["study.example"]);
    proxy.shutdown().await;
}

#[tokio::test]
async fn pool_header_can_be_turned_off() {
    let proxy = proxy_to_one_v1(|c| c.pool_header(false)).await;
    let reply = get(&proxy.url("/api/studies/1")).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.header("x-upstream"), Some("v1-a"));
    assert_eq!(reply.header("x-rollout-pool"), None);
    proxy.shutdown().await;
}

#[tokio::test]
async fn h2c_prior_knowledge_is_served_and_forwarded_as_http1() {
    let proxy = proxy_to_one_v1(|c| c).await;
    let client = h2c_client();
    let reply =
        send(&client, Request::get(proxy.url("/api/v2/studies/3")).body(Full::default()).unwrap()).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.header("x-rollout-pool"), Some("v2"));
    let echo = reply.echo();
    assert_eq!(echo.upstream, "v2-a");
    assert_eq!(echo.headers["host"], [proxy.addr.to_string()], "the :authority becomes Host");

    let body = support::pattern_bytes(300_000);
    let req = Request::builder()
        .method(Method::PUT)
        .uri(proxy.url("/api/studies/3"))
        .body(Full::new(Bytes::from(body.clone())))
        .unwrap();
    let echo = send(&client, req).await.echo();
    assert_eq!((echo.upstream.as_str(), echo.body_sha256), ("v1-a", support::sha256(&body)));
    proxy.shutdown().await;
}

#[tokio::test]
async fn refused_upstream_answers_502_upstream_connect() {
    let (dead, _reserved) = support::refused_addr();
    let v2 = Upstream::new("v2-a").spawn().await;
    let proxy =
        ProxyBuilder::new(&ConfigBuilder::new().v1("v1-dead", dead, 1).v2("v2-a", v2, 1)).spawn().await;
    let reply = get(&proxy.url("/api/studies/1")).await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
    assert_eq!(reply.header("x-rollout-error"), Some("upstream_connect"));
    assert_eq!(reply.header("x-rollout-pool"), Some("v1"));
    assert_eq!(reply.header("content-type"), Some("text/plain; charset=utf-8"));
    proxy.shutdown().await;
}

#[tokio::test]
async fn stalled_upstream_answers_504_upstream_timeout() {
    let proxy = proxy_to_one_v1(|c| {
        c.upstream_settings(UpstreamSettings {
            response_timeout: Some(Duration::from_millis(300)),
            ..UpstreamSettings::default()
        })
    })
    .await;
    let started = std::time::Instant::now();
    let reply = get(&proxy.url("/__stall")).await;
    assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(reply.header("x-rollout-error"), Some("upstream_timeout"));
    assert!(started.elapsed() < Duration::from_secs(10), "the timeout applied");
    proxy.shutdown().await;
}

#[tokio::test]
async fn oversized_headers_answer_431() {
    let proxy = proxy_to_one_v1(|c| {
        c.client(ClientSettings { max_header_bytes: Some(4096), ..ClientSettings::default() })
    })
    .await;
    let req = Request::get(proxy.url("/api/studies/1"))
        .header("x-big", "a".repeat(6000))
        .body(Full::default())
        .unwrap();
    let reply = send(&http1_client(), req).await;
    assert_eq!(reply.status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    assert_eq!(reply.header("x-rollout-error"), Some("headers_too_large"));

    // Just under the limit passes.
    let req = Request::get(proxy.url("/api/studies/1"))
        .header("x-big", "a".repeat(3000))
        .body(Full::default())
        .unwrap();
    assert_eq!(send(&http1_client(), req).await.status, StatusCode::OK);
    proxy.shutdown().await;
}

#[tokio::test]
async fn empty_pool_by_weight_answers_503_no_upstream_and_never_crosses_pools() {
    let v1 = Upstream::new("v1-a").spawn().await;
    let v2 = Upstream::new("v2-a").spawn().await;
    let proxy = ProxyBuilder::new(&ConfigBuilder::new().v1("v1-a", v1, 0).v2("v2-a", v2, 1)).spawn().await;
    let reply = get(&proxy.url("/api/studies/1")).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.header("x-rollout-error"), Some("no_upstream"));
    assert_eq!(reply.header("x-rollout-pool"), Some("v1"));
    proxy.shutdown().await;
}
