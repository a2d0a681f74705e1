//! Pool choice: v2 prefixes on segment boundaries, the legacy percentage for requests without a
//! session key, weights inside a pool.

mod support;

use support::{count_upstreams, get, ConfigBuilder, ProxyBuilder, Upstream};

async fn one_upstream_per_pool(percent: f64) -> support::ProxyHandle {
    let v1 = Upstream::new("v1-a").spawn().await;
    let v2 = Upstream::new("v2-a").spawn().await;
    let config = ConfigBuilder::one_each(v1, v2).v2_prefixes(&["/api/v2"]).legacy_v1_percent(percent);
    ProxyBuilder::new(&config).spawn().await
}

#[tokio::test]
async fn v2_prefix_matches_whole_segments_only() {
    let proxy = one_upstream_per_pool(100.0).await;
    for path in ["/api/v2", "/api/v2/", "/api/v2/studies/7/contents", "/api/v2?x=1"] {
        let reply = get(&proxy.url(path)).await;
        assert_eq!(reply.header("x-upstream"), Some("v2-a"), "{path}");
        assert_eq!(reply.header("x-rollout-pool"), Some("v2"), "{path}");
        assert_eq!(reply.echo().path, path, "the upstream sees the path unchanged");
    }
    // At 100 % every legacy request goes to v1, so reaching v1 proves these are not v2 paths.
    for path in ["/api/v2x", "/api/v20/studies", "/api/studies/7", "/"] {
        let reply = get(&proxy.url(path)).await;
        assert_eq!(reply.header("x-upstream"), Some("v1-a"), "{path}");
        assert_eq!(reply.header("x-rollout-pool"), Some("v1"), "{path}");
    }
    proxy.shutdown().await;
}

#[tokio::test]
async fn legacy_at_100_percent_all_reach_v1() {
    let proxy = one_upstream_per_pool(100.0).await;
    let counts = count_upstreams(&proxy.url("/api/members/me"), 300).await;
    assert_eq!(counts.get("v1-a"), Some(&300), "{counts:?}");
    proxy.shutdown().await;
}

#[tokio::test]
async fn legacy_at_0_percent_all_reach_v2() {
    let proxy = one_upstream_per_pool(0.0).await;
    let counts = count_upstreams(&proxy.url("/api/progress"), 300).await;
    assert_eq!(counts.get("v2-a"), Some(&300), "{counts:?}");
    proxy.shutdown().await;
}

#[tokio::test]
async fn legacy_at_30_percent_splits_within_4_points() {
    let proxy = one_upstream_per_pool(30.0).await;
    let counts = count_upstreams(&proxy.url("/api/members/me"), 2000).await;
    let v1 = *counts.get("v1-a").unwrap_or(&0) as f64;
    let share = v1 / 2000.0 * 100.0;
    assert!((26.0..=34.0).contains(&share), "v1 share {share:.1}% ({counts:?})");
    assert_eq!(counts.values().sum::<usize>(), 2000);
    proxy.shutdown().await;
}

#[tokio::test]
async fn weights_inside_a_pool_are_honoured_and_zero_gets_nothing() {
    let a = Upstream::new("v1-a").spawn().await;
    let b = Upstream::new("v1-b").spawn().await;
    let idle = Upstream::new("v1-idle").spawn().await;
    let v2 = Upstream::new("v2-a").spawn().await;
    let config =
        ConfigBuilder::new().v1("v1-a", a, 3).v1("v1-b", b, 1).v1("v1-idle", idle, 0).v2("v2-a", v2, 1);
    let proxy = ProxyBuilder::new(&config).spawn().await;
    let counts = count_upstreams(&proxy.url("/api/members/me"), 400).await;
    assert_eq!(counts.get("v1-a"), Some(&300), "{counts:?}");
    assert_eq!(counts.get("v1-b"), Some(&100), "{counts:?}");
    assert_eq!(counts.get("v1-idle"), None, "{counts:?}");
    proxy.shutdown().await;
}
