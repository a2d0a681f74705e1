//! Upstream failures under load, and WebSocket pass-through.

mod support;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use http::StatusCode;
use support::{
    eventually, get, grows_by, ConfigBuilder, Ejection, Health, Pool, ProxyBuilder, Upstream,
    UpstreamSettings,
};
use tokio_tungstenite::tungstenite::Message;

/// Retries on another upstream, and a short connect timeout.
fn resilient(config: ConfigBuilder) -> ConfigBuilder {
    config.upstream_settings(UpstreamSettings {
        retries: Some(2),
        connect_timeout: Some(Duration::from_millis(500)),
        ..UpstreamSettings::default()
    })
}

/// Health checks and fast ejection on the v1 pool.
fn with_checks(config: ConfigBuilder) -> ConfigBuilder {
    config.health(Pool::V1, Health::fast()).ejection(Pool::V1, Ejection::after(3, Duration::from_secs(1)))
}

/// The health of a v1 upstream as `GET /status` on `admin` reports it.
async fn v1_health_at(admin: &str, name: &str) -> bool {
    let status = get(&format!("{admin}/status")).await.json();
    let upstreams = status["pools"]["v1"]["upstreams"].as_array().unwrap().clone();
    upstreams.iter().find(|u| u["name"] == name).unwrap()["healthy"].as_bool().unwrap()
}

async fn wait_for_health_at(admin: &str, name: &str, healthy: bool) {
    let what = format!("{name} becomes healthy={healthy}");
    eventually(Duration::from_secs(10), &what, || async { v1_health_at(admin, name).await == healthy }).await;
}

#[tokio::test]
async fn killing_one_of_two_v1_upstreams_fails_no_request_and_it_comes_back() {
    let a = Upstream::new("v1-a").spawn_killable().await;
    let mut b = Upstream::new("v1-b").spawn_killable().await;
    let v2 = Upstream::new("v2-a").spawn().await;
    let dir = tempfile::tempdir().unwrap();
    let config = ConfigBuilder::new().v1("v1-a", a.addr, 1).v1("v1-b", b.addr, 1).v2("v2-a", v2, 1);
    // The proxy as operators run it: the binary, in its own process.
    let file = support::write_config(dir.path(), &with_checks(resilient(config)));
    let proxy = support::ProxyProcess::start(&["run", "--config", &file]).await;
    let admin = proxy.admin_url("");

    // Four clients sending GETs back to back (keyed and unkeyed legacy, all to v1 at 100 %).
    let stop = Arc::new(AtomicBool::new(false));
    let (sent, failed, served_by_b) =
        (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut load = Vec::new();
    for worker in 0..4 {
        let (stop, sent, failed, by_b) = (stop.clone(), sent.clone(), failed.clone(), served_by_b.clone());
        let url = proxy.url(&format!("/api/studies/w{worker}/contents"));
        let unkeyed = proxy.url("/api/members/me");
        load.push(tokio::spawn(async move {
            let client = support::http1_client();
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let target = if i.is_multiple_of(2) { &url } else { &unkeyed };
                let req = http::Request::get(target.as_str()).body(Default::default()).unwrap();
                match client.request(req).await {
                    Ok(response) if response.status() == StatusCode::OK => {
                        if response.headers()["x-upstream"] == "v1-b" {
                            by_b.fetch_add(1, Ordering::Relaxed);
                        }
                        let _ = http_body_util::BodyExt::collect(response.into_body()).await;
                    }
                    _ => {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
                sent.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
        }));
    }

    let by_b = || served_by_b.load(Ordering::Relaxed);
    eventually(Duration::from_secs(10), "v1-b serves its share", || async { by_b() >= 10 }).await;
    b.kill();
    wait_for_health_at(&admin, "v1-b", false).await;
    // Marked down, v1-b gets nothing: 100 requests for those in flight to end, 100 more counted.
    grows_by(&sent, 100, "requests are sent").await;
    let by_b_while_down = by_b();
    grows_by(&sent, 100, "requests are sent").await;
    assert_eq!(by_b(), by_b_while_down, "a dead upstream served requests");

    b.restart().await;
    wait_for_health_at(&admin, "v1-b", true).await;
    eventually(Duration::from_secs(10), "v1-b returns to service", || async { by_b() > by_b_while_down })
        .await;
    stop.store(true, Ordering::Relaxed);
    for worker in load {
        worker.await.unwrap();
    }
    assert!(served_by_b.load(Ordering::Relaxed) > by_b_while_down, "v1-b never returned to service");
    let sent = sent.load(Ordering::Relaxed);
    assert!(sent > 200, "only {sent} requests sent");
    assert_eq!(failed.load(Ordering::Relaxed), 0, "failed requests out of {sent}");
    drop(a);
}

#[tokio::test]
async fn health_probes_are_not_v1_traffic() {
    let a = Upstream::new("v1-a").spawn_killable().await;
    let v2 = Upstream::new("v2-a").spawn().await;
    let config =
        ConfigBuilder::one_each(a.addr, v2).legacy_v1_percent(0.0).quiet_window(Duration::from_millis(1500));
    let proxy = ProxyBuilder::new(&with_checks(config)).spawn().await;
    let probes = || a.requests("/healthz");
    let is_drained = || async { get(&proxy.admin_url("/drain")).await.status == StatusCode::OK };

    // v1-a is probed every 200 ms from the start, and still v1 goes quiet for its whole window...
    eventually(Duration::from_secs(5), "v1-a is probed", || async { probes() >= 2 }).await;
    eventually(Duration::from_secs(10), "v1 counts as quiet while its upstream is probed", is_drained).await;
    // ...and stays quiet while the probes go on.
    let seen = probes();
    eventually(Duration::from_secs(5), "probes go on", || async { probes() >= seen + 3 }).await;
    let drain = get(&proxy.admin_url("/drain")).await;
    assert_eq!(drain.status, StatusCode::OK, "{:?}", drain.body);
    let text = proxy.metrics().await;
    assert_eq!(
        support::metric(&text, "rollout_upstream_healthy", &[("pool", "v1"), ("upstream", "v1-a")]),
        Some(1.0),
        "{text}"
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn all_v1_upstreams_down_answers_503_no_upstream_quickly() {
    let a = Upstream::new("v1-a").spawn_killable().await;
    let b = Upstream::new("v1-b").spawn_killable().await;
    let v2 = Upstream::new("v2-a").spawn().await;
    let config = ConfigBuilder::new().v1("v1-a", a.addr, 1).v1("v1-b", b.addr, 1).v2("v2-a", v2, 1);
    let proxy = ProxyBuilder::new(&with_checks(resilient(config))).spawn().await;
    assert_eq!(get(&proxy.url("/api/studies/1")).await.status, StatusCode::OK);
    a.kill();
    b.kill();
    wait_for_health_at(&proxy.admin_url(""), "v1-a", false).await;
    wait_for_health_at(&proxy.admin_url(""), "v1-b", false).await;
    let started = Instant::now();
    let reply = get(&proxy.url("/api/studies/1")).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.header("x-rollout-error"), Some("no_upstream"));
    assert!(started.elapsed() < Duration::from_millis(500), "took {:?}", started.elapsed());
    // The v2 pool is untouched, and a v1 study never crosses to it.
    assert_eq!(get(&proxy.url("/api/v2/x")).await.status, StatusCode::OK);
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_failed_connection_is_retried_on_another_upstream_of_the_same_pool_with_its_body() {
    let (dead, _reserved) = support::refused_addr();
    let alive = Upstream::new("v1-alive").spawn().await;
    let v2 = Upstream::new("v2-a").spawn().await;
    let config = ConfigBuilder::new().v1("v1-dead", dead, 1).v1("v1-alive", alive, 1).v2("v2-a", v2, 1);
    let proxy = ProxyBuilder::new(&resilient(config)).spawn().await;
    let body = support::pattern_bytes(200_000);
    for _ in 0..6 {
        let req = http::Request::post(proxy.url("/api/studies/9/contents"))
            .body(http_body_util::Full::new(bytes::Bytes::from(body.clone())))
            .unwrap();
        let echo = support::send(&support::http1_client(), req).await.echo();
        assert_eq!(echo.upstream, "v1-alive");
        assert_eq!(echo.body_sha256, support::sha256(&body), "the body survived the retry");
    }
    let text = String::from_utf8(get(&proxy.admin_url("/metrics")).await.body.to_vec()).unwrap();
    let errors = support::metric(
        &text,
        "rollout_upstream_errors_total",
        &[("pool", "v1"), ("upstream", "v1-dead"), ("kind", "connect")],
    );
    assert!(errors.unwrap_or(0.0) >= 1.0, "the dead upstream was tried");
    proxy.shutdown().await;
}

#[tokio::test]
async fn websocket_echo_passes_through_and_a_graceful_stop_waits_for_the_tunnel() {
    let echo = support::spawn_websocket_echo().await;
    let v1 = Upstream::new("v1-a").spawn().await;
    let config =
        ConfigBuilder::new().v1("v1-a", v1, 1).v2("ws", echo, 1).grace_period(Duration::from_secs(10));
    let proxy = ProxyBuilder::new(&config).spawn().await;

    let (mut ws, response) =
        tokio_tungstenite::connect_async(format!("ws://{}/api/v2/live", proxy.addr)).await.unwrap();
    assert_eq!(response.headers()["x-rollout-pool"], "v2");
    ws.send(Message::text("hello through the proxy")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("hello through the proxy"));

    // Stop while the tunnel is open: the stop waits for it.
    let stopped = Arc::new(AtomicBool::new(false));
    let stopping = {
        let stopped = stopped.clone();
        tokio::spawn(async move {
            proxy.shutdown().await;
            stopped.store(true, Ordering::SeqCst);
        })
    };
    // Nothing to wait for: the stop must *not* finish while the tunnel is open.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!stopped.load(Ordering::SeqCst), "the stop did not wait for the open tunnel");
    ws.send(Message::binary(vec![1u8, 2, 3])).await.unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::binary(vec![1u8, 2, 3]),
        "the tunnel still works while draining"
    );
    ws.close(None).await.unwrap();
    while let Some(Ok(_)) = ws.next().await {}
    drop(ws);
    tokio::time::timeout(Duration::from_secs(5), stopping)
        .await
        .expect("the stop finished once the tunnel closed")
        .unwrap();
}
