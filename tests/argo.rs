//! Argo Rollouts driving rollout-proxy, with the test in Argo's place: the shipped
//! `AnalysisTemplate` (deploy/argo) is read and its web metric called as Argo's web provider
//! would, and a traffic-router plugin's calls (`PUT /routes/legacy` with `100 - weight`) move
//! the split, abort included.

mod support;

use std::time::Duration;

use http::StatusCode;
use serde_json::Value;
use support::{
    admin_call, get, pools_of, ConfigBuilder, ManualClock, ProxyBuilder, ProxyHandle, Sessions, Upstream,
};

const TOKEN: &str = "argo-admin-token";
const MINUTE: Duration = Duration::from_secs(60);

/// The shipped template's web metric: its URL (with `{{args.admin-url}}` still in it), its
/// JSON path as a key, and its success condition.
fn web_metric() -> (String, String, String) {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/argo/analysis-template.yaml"))
            .unwrap();
    let template: Value = serde_yaml_ng::from_str(&text).unwrap();
    assert_eq!(template["kind"], "AnalysisTemplate");
    let metric = &template["spec"]["metrics"][0];
    let web = &metric["provider"]["web"];
    let path = web["jsonPath"].as_str().unwrap();
    let key = path.strip_prefix("{$.").and_then(|p| p.strip_suffix('}')).expect("a top-level key");
    (
        web["url"].as_str().unwrap().to_owned(),
        key.to_owned(),
        metric["successCondition"].as_str().unwrap().to_owned(),
    )
}

/// Argo's measurement: the web provider's GET (any status but 2xx is an error), then the
/// JSON path; the result as the success condition `result == true` sees it.
async fn measure(proxy: &ProxyHandle, url: &str, key: &str) -> bool {
    let url = url.replace("{{args.admin-url}}", &proxy.admin_url(""));
    let reply = get(&url).await;
    assert!(reply.status.is_success(), "Argo would count {} as an error", reply.status);
    let body: Value = serde_json::from_slice(&reply.body).unwrap();
    body[key].as_bool().expect("the JSON path gives a boolean")
}

/// A traffic-router plugin's SetWeight: v2's share of new sessions.
async fn set_weight(proxy: &ProxyHandle, weight: f64) {
    let body = format!(r#"{{"v1_percent": {}}}"#, 100.0 - weight);
    let reply = admin_call("PUT", &proxy.admin_url("/routes/legacy"), Some(TOKEN), None, Some(&body)).await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
}

async fn new_studies(proxy: &ProxyHandle, from: usize) -> Vec<String> {
    pools_of((from..from + 40).map(|id| proxy.url(&format!("/api/studies/{id}"))).collect()).await
}

#[tokio::test]
async fn argo_rollouts_moves_the_split_and_waits_for_the_drain_signal() {
    let (url, key, success) = web_metric();
    assert_eq!(success, format!("result == true"));
    assert!(url.contains("/drain"), "{url}");

    let (v1, v2) = (Upstream::new("v1-a").spawn().await, Upstream::new("v2-a").spawn().await);
    let token = tempfile::NamedTempFile::new().unwrap().into_temp_path().keep().unwrap();
    std::fs::write(&token, TOKEN).unwrap();
    let config = ConfigBuilder::one_each(v1, v2)
        .legacy_v1_percent(100.0)
        .admin_token_file(&token)
        .quiet_window(60 * MINUTE)
        .sessions(Sessions {
            idle_timeout: Some(120 * MINUTE),
            max_duration: Some(640 * MINUTE),
            ..Sessions::default()
        });
    let clock = ManualClock::starting_now();
    let proxy = ProxyBuilder::new(&config).clock(&clock).spawn().await;

    // Weight 0: a study starts on v1.
    set_weight(&proxy, 0.0).await;
    let on_v1 = proxy.url("/api/studies/started-on-v1");
    assert_eq!(pools_of(vec![on_v1.clone()]).await, ["v1"]);
    assert!(!measure(&proxy, &url, &key).await, "not drained: v1 is serving");
    assert_eq!(get(&proxy.admin_url("/drain")).await.status, StatusCode::SERVICE_UNAVAILABLE, "plain /drain");
    assert_eq!(get(&proxy.admin_url("/drain?always_ok=yes")).await.status, StatusCode::BAD_REQUEST);

    // The steps: every new session to v2 at 100; the v1 study stays on v1.
    set_weight(&proxy, 50.0).await;
    let half = new_studies(&proxy, 0).await;
    assert!(half.iter().any(|p| p == "v1") && half.iter().any(|p| p == "v2"), "{half:?}");
    set_weight(&proxy, 100.0).await;
    assert!(new_studies(&proxy, 100).await.iter().all(|p| p == "v2"));
    assert_eq!(pools_of(vec![on_v1.clone()]).await, ["v1"], "a pinned study keeps its version");

    // Argo aborts: weight 0. New sessions go to v1 again; v2's studies stay on v2.
    let on_v2 = proxy.url("/api/studies/100");
    set_weight(&proxy, 0.0).await;
    assert!(new_studies(&proxy, 200).await.iter().all(|p| p == "v1"));
    assert_eq!(pools_of(vec![on_v2.clone()]).await, ["v2"], "an abort strands no v2 study");

    // Promoted again; the analysis step waits until v1 has been quiet for its window.
    set_weight(&proxy, 100.0).await;
    proxy.maintain();
    clock.advance(61 * MINUTE);
    proxy.maintain();
    assert!(!measure(&proxy, &url, &key).await, "v1 studies are still live");
    clock.advance(121 * MINUTE);
    proxy.maintain();
    assert!(measure(&proxy, &url, &key).await, "drained: v1 may be scaled down");
    proxy.shutdown().await;
}
