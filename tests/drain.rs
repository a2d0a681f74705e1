//! The drain signal under a controlled clock: quiet window, live v1 pins, v2 traffic, restarts.

mod support;

use std::time::Duration;

use http::StatusCode;
use serde_json::Value;
use support::{get, metric, ConfigBuilder, ManualClock, ProxyBuilder, ProxyHandle, Sessions, Upstream};

const MINUTE: Duration = Duration::from_secs(60);

async fn proxy(percent: f64, clock: &ManualClock, state: tempfile::TempDir) -> ProxyHandle {
    let v1 = Upstream::new("v1-a").spawn().await;
    let v2 = Upstream::new("v2-a").spawn().await;
    let config = ConfigBuilder::one_each(v1, v2)
        .legacy_v1_percent(percent)
        .quiet_window(60 * MINUTE)
        .sessions(Sessions {
            idle_timeout: Some(120 * MINUTE),
            max_duration: Some(640 * MINUTE),
            ..Sessions::default()
        });
    ProxyBuilder::new(&config).clock(clock).state_dir(state).spawn().await
}

/// `GET /drain`: (HTTP status, body).
async fn drain(proxy: &ProxyHandle) -> (StatusCode, Value) {
    let reply = get(&proxy.admin_url("/drain")).await;
    (reply.status, serde_json::from_slice(&reply.body).unwrap())
}

async fn drained_metric(proxy: &ProxyHandle) -> f64 {
    let text = String::from_utf8(get(&proxy.admin_url("/metrics")).await.body.to_vec()).unwrap();
    metric(&text, "rollout_v1_drained", &[]).unwrap()
}

fn unix_ms(rfc3339: &Value) -> u64 {
    let at = humantime::parse_rfc3339(rfc3339.as_str().unwrap()).unwrap();
    at.duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

#[tokio::test]
async fn with_no_state_the_window_starts_at_process_start_and_v2_traffic_does_not_disturb_it() {
    let clock = ManualClock::starting_now();
    let proxy = proxy(0.0, &clock, tempfile::tempdir().unwrap()).await;
    let (status, body) = drain(&proxy).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["drained"], false);
    assert_eq!(body["quiet_window_seconds"], 3600.0);
    assert_eq!(drained_metric(&proxy).await, 0.0);

    for _ in 0..6 {
        clock.advance(10 * MINUTE);
        // v2-prefixed, and legacy at 0 %: keyed and unkeyed, all to v2.
        for path in ["/api/v2/studies/1", "/api/studies/9", "/api/members/me"] {
            assert_eq!(get(&proxy.url(path)).await.header("x-rollout-pool"), Some("v2"));
        }
    }
    let (status, body) = drain(&proxy).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["drained"], true);
    assert_eq!(body["v1_active_pins"], 0);
    assert_eq!(drained_metric(&proxy).await, 1.0);
    proxy.shutdown().await;
}

#[tokio::test]
async fn v1_traffic_restarts_the_quiet_window() {
    let clock = ManualClock::starting_now();
    let proxy = proxy(100.0, &clock, tempfile::tempdir().unwrap()).await;
    clock.advance(2 * 60 * MINUTE);
    assert_eq!(drain(&proxy).await.0, StatusCode::OK, "quiet for two hours since start");

    let v1_at = clock.now_ms();
    assert_eq!(get(&proxy.url("/api/members/me")).await.header("x-rollout-pool"), Some("v1"));
    let (status, body) = drain(&proxy).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(unix_ms(&body["last_v1_request_at"]), v1_at);
    assert_eq!(unix_ms(&body["drained_eta"]), v1_at + 3_600_000);

    clock.advance(59 * MINUTE);
    assert_eq!(drain(&proxy).await.0, StatusCode::SERVICE_UNAVAILABLE);
    clock.advance(MINUTE);
    assert_eq!(drain(&proxy).await.0, StatusCode::OK);
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_live_v1_pin_holds_the_signal_until_it_ends() {
    let clock = ManualClock::starting_now();
    let proxy = proxy(100.0, &clock, tempfile::tempdir().unwrap()).await;
    assert_eq!(get(&proxy.url("/api/studies/77/contents")).await.header("x-rollout-pool"), Some("v1"));
    proxy.maintain();

    clock.advance(61 * MINUTE);
    proxy.maintain();
    let (status, body) = drain(&proxy).await;
    assert_eq!(
        status,
        StatusCode::SERVICE_UNAVAILABLE,
        "quiet for the window, but a v1 study is live: {body}"
    );
    assert_eq!(body["v1_active_pins"], 1);
    assert!(body["quiet_for_seconds"].as_f64().unwrap() >= 3600.0);

    clock.advance(60 * MINUTE); // the pin has been idle for its 2 h idle timeout
    proxy.maintain();
    let (status, body) = drain(&proxy).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["v1_active_pins"], 0);
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_restart_never_makes_the_signal_come_earlier() {
    let clock = ManualClock::starting_now();
    let proxy1 = proxy(100.0, &clock, tempfile::tempdir().unwrap()).await;
    let v1_at = clock.now_ms();
    get(&proxy1.url("/api/members/me")).await;
    let state = proxy1.shutdown().await;

    clock.advance(59 * MINUTE);
    let proxy2 = proxy(100.0, &clock, state).await;
    let (status, body) = drain(&proxy2).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(unix_ms(&body["last_v1_request_at"]) >= v1_at, "the clock did not move back: {body}");
    assert!(body["quiet_for_seconds"].as_f64().unwrap() <= 59.0 * 60.0);
    let state = proxy2.shutdown().await;

    // Within the read-back slack of the window's end it is still not drained; after it, it is.
    clock.advance(MINUTE);
    let proxy3 = proxy(100.0, &clock, state).await;
    assert_eq!(drain(&proxy3).await.0, StatusCode::SERVICE_UNAVAILABLE);
    clock.advance(Duration::from_secs(3));
    let (status, body) = drain(&proxy3).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "{body} v1_at={}",
        humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(v1_at))
    );
    proxy3.shutdown().await;
}

/// The drain signal's ETA follows a v1 request at once, not at the next upkeep: a study renewed
/// on v1 pushes the earliest drain out to its new end.
#[tokio::test]
async fn the_eta_moves_with_a_v1_request_before_the_next_upkeep() {
    let clock = ManualClock::starting_now();
    let proxy = proxy(100.0, &clock, tempfile::tempdir().unwrap()).await;
    assert_eq!(get(&proxy.url("/api/studies/5")).await.header("x-rollout-pool"), Some("v1"));
    proxy.maintain();
    clock.advance(100 * MINUTE);
    assert_eq!(get(&proxy.url("/api/studies/5")).await.header("x-rollout-pool"), Some("v1"));
    // No upkeep since: the pin now ends 120 minutes (its idle timeout) after this request,
    // later than the quiet window's end (60 minutes after it).
    let (_, body) = drain(&proxy).await;
    let last = unix_ms(&body["last_v1_request_at"]);
    let eta = unix_ms(&body["drained_eta"]);
    assert_eq!((eta.saturating_sub(last) + 30_000) / 60_000, 120, "{body}");
    proxy.shutdown().await;
}
