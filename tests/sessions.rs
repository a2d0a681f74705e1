//! Legacy sessions stay on the pool they started on: across percentage changes, restarts,
//! expiry, a full pin table and an emptied pool.

mod support;

use std::time::Duration;

use http::StatusCode;
use support::{
    get, metric, pools_of, ConfigBuilder, KeyOutcome, ManualClock, Pool, ProxyBuilder, ProxyHandle, Sessions,
    Upstream,
};

struct Pools {
    v1: std::net::SocketAddr,
    v2: std::net::SocketAddr,
}

async fn pools() -> Pools {
    Pools { v1: Upstream::new("v1-a").spawn().await, v2: Upstream::new("v2-a").spawn().await }
}

fn config(p: &Pools, percent: f64) -> ConfigBuilder {
    ConfigBuilder::one_each(p.v1, p.v2).legacy_v1_percent(percent)
}

fn by_path(proxy: &ProxyHandle, ids: impl Iterator<Item = usize>) -> Vec<String> {
    ids.map(|id| proxy.url(&format!("/api/studies/{id}/contents"))).collect()
}

fn by_query(proxy: &ProxyHandle, ids: impl Iterator<Item = usize>) -> Vec<String> {
    ids.map(|id| proxy.url(&format!("/api/progress?studyId={id}"))).collect()
}

async fn metrics_text(proxy: &ProxyHandle) -> String {
    proxy.metrics().await
}

#[tokio::test]
async fn studies_keep_their_pool_when_the_percentage_moves_and_across_restarts() {
    let p = pools().await;
    let proxy = ProxyBuilder::new(&config(&p, 50.0)).spawn().await;
    let started = pools_of(by_path(&proxy, 0..500)).await;
    let v1 = started.iter().filter(|p| *p == "v1").count();
    // The split is a keyed hash under a salt made afresh for each store: 500 studies land on
    // v1 like 500 fair coin flips (sd 11). ±50 is 4.5 sd: a wrong split fails, chance almost
    // never does (about 1 run in 150,000; ±35 failed about 1 in 1,000).
    assert!((200..=300).contains(&v1), "{v1} of 500 new studies on v1 at 50 %");
    assert_eq!(pools_of(by_query(&proxy, 0..500)).await, started, "query and path name the same study");
    let mut state = proxy.shutdown().await;

    // Moving the percentage (here by restarting with a new file) only steers new studies.
    for (percent, newcomers, new_ids) in [(0.0, "v2", 1000..1100), (100.0, "v1", 2000..2100)] {
        let proxy = ProxyBuilder::new(&config(&p, percent)).state_dir(state).spawn().await;
        assert_eq!(pools_of(by_path(&proxy, 0..500)).await, started, "at {percent} % (path)");
        assert_eq!(pools_of(by_query(&proxy, 0..500)).await, started, "at {percent} % (query)");
        let fresh = pools_of(by_path(&proxy, new_ids)).await;
        assert!(
            fresh.iter().all(|p| p == newcomers),
            "new studies at {percent} % go to {newcomers}: {fresh:?}"
        );
        state = proxy.shutdown().await;
    }

    let proxy = ProxyBuilder::new(&config(&p, 0.0)).state_dir(state).spawn().await;
    let text = metrics_text(&proxy).await;
    let active = |pool| metric(&text, "rollout_sessions_active", &[("pool", pool)]).unwrap();
    assert_eq!(active("v1") + active("v2"), 700.0, "500 + 2 × 100 pins survived three restarts");
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_new_pin_is_durable_before_its_response_and_before_anyone_follows_it() {
    let p = pools().await;
    let proxy = ProxyBuilder::new(&config(&p, 50.0)).commit_delay(Duration::from_millis(400)).spawn().await;
    let handle = &proxy;
    let timed_get = |url: String| async move {
        let started = std::time::Instant::now();
        let reply = get(&url).await;
        (reply, started.elapsed(), handle.all_pins_settled())
    };

    let (reply, took, settled) = timed_get(proxy.url("/api/studies/alone")).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(
        settled && took >= Duration::from_millis(400),
        "answered after {took:?}, before its pin was committed"
    );

    // Two requests of a new study at once: one makes the pin, the other follows it; neither is
    // answered before the pin is on disk.
    let url = proxy.url("/api/studies/pair/contents");
    let ((a, a_took, a_settled), (b, b_took, b_settled)) =
        tokio::join!(timed_get(url.clone()), timed_get(url));
    assert!(a_settled && a_took >= Duration::from_millis(400), "first answered after {a_took:?}");
    assert!(b_settled && b_took >= Duration::from_millis(400), "second answered after {b_took:?}");
    assert_eq!(a.header("x-rollout-pool"), b.header("x-rollout-pool"));
    proxy.shutdown().await;
}

#[tokio::test]
async fn concurrent_new_pins_share_commits() {
    let p = pools().await;
    let proxy = ProxyBuilder::new(&config(&p, 50.0)).spawn().await;
    let before = metric(&metrics_text(&proxy).await, "rollout_state_commits_total", &[]).unwrap();
    let started = pools_of(by_path(&proxy, 0..512)).await;
    assert!(proxy.flush_store().await, "the store commits");
    let commits = metric(&metrics_text(&proxy).await, "rollout_state_commits_total", &[]).unwrap() - before;
    // Requests go 16 at a time and each waits for its pin's commit: without group commit that
    // is one commit per pin.
    assert!((1.0..=256.0).contains(&commits), "512 new pins took {commits} commits");

    // Sharing commits lost no pin: one per study, followed by its next request, and on disk.
    let on_v1 = started.iter().filter(|p| *p == "v1").count();
    let live = |proxy: &ProxyHandle| (proxy.live_pins(Pool::V1), proxy.live_pins(Pool::V2));
    let moved = |again: Vec<String>| again.iter().zip(&started).filter(|(now, then)| now != then).count();
    assert_eq!(live(&proxy), (on_v1, 512 - on_v1), "live pins (v1, v2)");
    assert_eq!(moved(pools_of(by_path(&proxy, 0..512)).await), 0, "studies that left their pin's pool");
    let state = proxy.shutdown().await;
    let proxy = ProxyBuilder::new(&config(&p, 50.0)).state_dir(state).spawn().await;
    assert_eq!(live(&proxy), (on_v1, 512 - on_v1), "pins (v1, v2) read back after a restart");
    let after_restart = pools_of(by_path(&proxy, 0..512)).await;
    assert_eq!(moved(after_restart), 0, "studies that left their pin's pool after a restart");
    proxy.shutdown().await;
}

#[tokio::test]
async fn concurrent_first_requests_of_a_study_agree_on_its_pool() {
    let p = pools().await;
    let proxy = ProxyBuilder::new(&config(&p, 50.0)).spawn().await;
    for id in 0..20 {
        let urls = (0..16).map(|_| proxy.url(&format!("/api/studies/race-{id}"))).collect();
        let seen = pools_of(urls).await;
        assert!(seen.iter().all(|p| *p == seen[0]), "study race-{id} split across pools: {seen:?}");
    }
    let text = metrics_text(&proxy).await;
    let started = |pool| metric(&text, "rollout_sessions_started_total", &[("pool", pool)]).unwrap();
    assert_eq!(started("v1") + started("v2"), 20.0, "one pin per study");
    proxy.shutdown().await;
}

#[tokio::test]
async fn pins_end_on_idle_timeout_and_max_duration_and_come_back_as_new_pins() {
    let p = pools().await;
    let clock = ManualClock::starting_now();
    let sessions = Sessions {
        idle_timeout: Some(Duration::from_secs(600)),
        max_duration: Some(Duration::from_secs(3600)),
        ..Sessions::default()
    };
    let proxy = ProxyBuilder::new(&config(&p, 100.0).sessions(sessions.clone())).clock(&clock).spawn().await;

    // "idle" studies are seen once; "busy" ones every 5 minutes until max_duration ends them.
    assert!(pools_of(by_path(&proxy, 0..10)).await.iter().all(|p| p == "v1"));
    assert!(pools_of(by_path(&proxy, 100..105)).await.iter().all(|p| p == "v1"));
    for _ in 0..11 {
        clock.advance(Duration::from_secs(300));
        pools_of(by_path(&proxy, 100..105)).await;
        proxy.maintain();
    }
    let text = metrics_text(&proxy).await;
    let ended = |reason| {
        metric(&text, "rollout_sessions_ended_total", &[("pool", "v1"), ("reason", reason)]).unwrap()
    };
    assert_eq!(ended("idle"), 10.0, "{text}");
    assert_eq!(ended("max_duration"), 0.0);
    assert_eq!(proxy.live_pins(Pool::V1), 5);

    clock.advance(Duration::from_secs(300)); // 60 minutes after the busy studies began
    proxy.maintain();
    let text = metrics_text(&proxy).await;
    let ended = |reason| {
        metric(&text, "rollout_sessions_ended_total", &[("pool", "v1"), ("reason", reason)]).unwrap()
    };
    assert_eq!(ended("max_duration"), 5.0, "{text}");
    assert_eq!(metric(&text, "rollout_sessions_active", &[("pool", "v1")]), Some(0.0));
    let state = proxy.shutdown().await;

    // Returning after expiry makes a new pin, by the current percentage.
    let proxy =
        ProxyBuilder::new(&config(&p, 0.0).sessions(sessions)).clock(&clock).state_dir(state).spawn().await;
    assert!(pools_of(by_path(&proxy, 0..10)).await.iter().all(|p| p == "v2"));
    assert!(pools_of(by_path(&proxy, 100..105)).await.iter().all(|p| p == "v2"));
    let text = metrics_text(&proxy).await;
    assert_eq!(metric(&text, "rollout_sessions_started_total", &[("pool", "v2")]), Some(15.0));
    proxy.shutdown().await;
}

#[tokio::test]
async fn an_ended_pin_is_not_followed_even_before_the_background_sweep() {
    let p = pools().await;
    let clock = ManualClock::starting_now();
    let sessions = Sessions { idle_timeout: Some(Duration::from_secs(600)), ..Sessions::default() };
    let proxy = ProxyBuilder::new(&config(&p, 100.0).sessions(sessions.clone())).clock(&clock).spawn().await;
    assert_eq!(pools_of(by_path(&proxy, 0..1)).await, ["v1"]);
    let state = proxy.shutdown().await;
    let proxy =
        ProxyBuilder::new(&config(&p, 0.0).sessions(sessions)).clock(&clock).state_dir(state).spawn().await;
    assert_eq!(pools_of(by_path(&proxy, 0..1)).await, ["v1"], "still pinned");
    clock.advance(Duration::from_secs(601));
    assert_eq!(pools_of(by_path(&proxy, 0..1)).await, ["v2"], "idle for 10 minutes: a new pin");
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_full_pin_table_routes_new_keys_unpinned_and_keeps_every_live_pin() {
    let p = pools().await;
    let sessions = Sessions { max_active: Some(100_000), ..Sessions::default() };
    let proxy = ProxyBuilder::new(&config(&p, 50.0).sessions(sessions)).spawn().await;
    let before = pools_of(by_path(&proxy, 0..200)).await;
    let rss_before = resident_bytes();

    // 200,000 random keys straight through the session table (the HTTP path adds nothing here
    // but time): the first 99,800 fill it, the rest must be turned away.
    let mut unpinned = 0;
    for _ in 0..200_000 {
        let key = format!("abuse-{:016x}", fastrand::u64(..));
        if proxy.offer_key(&key) == KeyOutcome::TableFull {
            unpinned += 1;
        }
    }
    assert_eq!(unpinned, 100_200);
    assert_eq!(proxy.live_pins(Pool::V1) + proxy.live_pins(Pool::V2), 100_000);
    let grown = resident_bytes().saturating_sub(rss_before);
    assert!(grown < 128 << 20, "100,000 pins grew the process by {} MiB", grown >> 20);

    // Over HTTP: the old studies keep their pools, a new one is served unpinned and counted.
    assert_eq!(pools_of(by_path(&proxy, 0..200)).await, before);
    assert_eq!(get(&proxy.url("/api/studies/latecomer")).await.status, StatusCode::OK);
    let text = metrics_text(&proxy).await;
    assert_eq!(
        metric(&text, "rollout_session_keys_rejected_total", &[("reason", "table_full")]),
        Some(100_201.0)
    );
    assert_eq!(
        metric(
            &text,
            "rollout_requests_total",
            &[("route", "legacy"), ("pool", "v1"), ("decision", "unkeyed"), ("code_class", "2xx")]
        )
        .unwrap_or(0.0)
            + metric(
                &text,
                "rollout_requests_total",
                &[("route", "legacy"), ("pool", "v2"), ("decision", "unkeyed"), ("code_class", "2xx")]
            )
            .unwrap_or(0.0),
        1.0
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_pinned_study_whose_pool_is_empty_gets_503_not_the_other_version() {
    let p = pools().await;
    let proxy = ProxyBuilder::new(&config(&p, 100.0)).spawn().await;
    assert_eq!(pools_of(by_path(&proxy, 7..8)).await, ["v1"]);
    let state = proxy.shutdown().await;

    let drained_v1 = ConfigBuilder::new().v1("v1-a", p.v1, 0).v2("v2-a", p.v2, 1).legacy_v1_percent(0.0);
    let proxy = ProxyBuilder::new(&drained_v1).state_dir(state).spawn().await;
    let reply = get(&proxy.url("/api/studies/7/contents")).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.header("x-rollout-error"), Some("no_upstream"));
    assert_eq!(reply.header("x-rollout-pool"), Some("v1"));
    assert_eq!(pools_of(by_path(&proxy, 8..9)).await, ["v2"], "new studies are served by v2");
    proxy.shutdown().await;
}

#[tokio::test]
async fn invalid_keys_are_served_unkeyed_and_counted() {
    let p = pools().await;
    let proxy = ProxyBuilder::new(&config(&p, 100.0)).spawn().await;
    for path in ["/api/studies/has%20space", "/api/progress?studyId=", "/api/studies/a$b"] {
        assert_eq!(get(&proxy.url(path)).await.status, StatusCode::OK, "{path}");
    }
    let text = metrics_text(&proxy).await;
    assert_eq!(metric(&text, "rollout_session_keys_rejected_total", &[("reason", "invalid")]), Some(3.0));
    assert_eq!(proxy.live_pins(Pool::V1), 0);
    proxy.shutdown().await;
}

fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}
