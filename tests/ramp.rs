//! The automated ramp in a running proxy, on a manual clock (hours simulated, not waited): it
//! walks a healthy v2 through every step, holding each; aborts to v1 on v2's errors without
//! moving a pin; resumes after a restart with what was left of the hold; and yields to an
//! operator who forces the percentage.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use http::StatusCode;
use rollout_proxy::config::Config;
use support::{
    admin_call, eventually, get, metric, pools_of, ConfigBuilder, Hook, ManualClock, ProxyBuilder,
    ProxyHandle, Upstream,
};

const TOKEN: &str = "ramp-admin-token";

/// Ten minutes at 99 %, ten at 50 %, then 0 %; judged every minute over five, on small numbers.
const PLAN: &str = r#"{
  "steps": [ { "v1_percent": 99, "hold": "10m" }, { "v1_percent": 50, "hold": "10m" }, { "v1_percent": 0 } ],
  "analysis": { "interval": "1m", "window": "5m", "min_requests": 40, "min_new_sessions": 1,
                "min_latency_samples": 40, "failure_limit": 3, "inconclusive_timeout": "30m" }
}"#;

fn config(v1: SocketAddr, v2: SocketAddr) -> ConfigBuilder {
    let token = tempfile::NamedTempFile::new().unwrap().into_temp_path().keep().unwrap();
    std::fs::write(&token, TOKEN).unwrap();
    ConfigBuilder::one_each(v1, v2).legacy_v1_percent(100.0).admin_token_file(&token)
}

async fn ramp(proxy: &ProxyHandle) -> serde_json::Value {
    get(&proxy.admin_url("/ramp")).await.json()
}

async fn command(proxy: &ProxyHandle, command: &str) -> support::Reply {
    admin_call("POST", &proxy.admin_url(&format!("/ramp/{command}")), Some(TOKEN), None, None).await
}

/// One simulated minute of traffic: 40 v2 API requests (answering `v2_status`) and 100 new
/// studies (numbered from `*next`), then the clock moves a minute and the ramp judges.
async fn minute(proxy: &ProxyHandle, clock: &ManualClock, next: &mut usize, v2_status: u16) {
    let v2_path = format!("/api/v2/items/__status/{v2_status}");
    for _ in 0..40 {
        let status = get(&proxy.url(&v2_path)).await.status;
        assert_eq!(status.as_u16(), v2_status);
    }
    let studies = (*next..*next + 100).map(|id| proxy.url(&format!("/api/studies/{id}"))).collect();
    pools_of(studies).await;
    *next += 100;
    clock.advance(Duration::from_secs(60));
    proxy.analyse_ramp().await;
}

#[tokio::test]
async fn a_healthy_v2_goes_through_every_step_holding_each() {
    let (v1, v2) = (Upstream::new("v1-a").spawn().await, Upstream::new("v2-a").spawn().await);
    let clock = ManualClock::starting_now();
    let proxy = ProxyBuilder::new(&config(v1, v2)).clock(&clock).spawn().await;
    assert_eq!(ramp(&proxy).await["state"], "none");

    let started = admin_call("PUT", &proxy.admin_url("/ramp"), Some(TOKEN), None, Some(PLAN)).await;
    assert_eq!(started.status, StatusCode::OK, "{started:?}");
    assert_eq!(started.json()["v1_percent"], 99.0);
    let mut next = 0;
    let mut percents = Vec::new();
    for _ in 0..25 {
        minute(&proxy, &clock, &mut next, 200).await;
        let now = ramp(&proxy).await;
        percents.push(now["v1_percent"].as_f64().unwrap());
    }
    // Ten minutes of 99 %, ten of 50 %, then 0 % and completed.
    assert_eq!(&percents[..9], &[99.0; 9], "{percents:?}");
    assert_eq!(percents[9], 50.0, "{percents:?}");
    assert_eq!(&percents[10..19], &[50.0; 9], "{percents:?}");
    assert_eq!(percents[19], 0.0, "{percents:?}");
    let done = ramp(&proxy).await;
    assert_eq!(done["state"], "completed", "{done}");
    let status: serde_json::Value = get(&proxy.admin_url("/status")).await.json();
    assert_eq!(status["routes"]["legacy_v1_percent"], 0.0);
    assert_eq!(done["analyses"][0]["judgement"]["verdict"], "pass", "{done}");
    let text = proxy.metrics().await;
    assert_eq!(metric(&text, "rollout_ramp_state", &[("state", "completed")]), Some(1.0), "{text}");
    assert_eq!(metric(&text, "rollout_ramp_state", &[("state", "progressing")]), Some(0.0));
    assert_eq!(metric(&text, "rollout_ramp_step", &[]), Some(2.0));
    assert!(metric(&text, "rollout_ramp_analysis_total", &[("result", "pass")]).unwrap() >= 2.0);
    assert_eq!(metric(&text, "rollout_ramp_analysis_total", &[("result", "fail")]), Some(0.0));
    assert_eq!(metric(&text, "rollout_ramp_v2_error_ratio", &[]), Some(0.0));
    assert_eq!(metric(&text, "rollout_ramp_leader", &[]), Some(1.0));
    proxy.shutdown().await;
}

#[tokio::test]
async fn v2_errors_abort_the_ramp_to_v1_and_leave_every_pin_where_it_is() {
    let (v1, v2) = (Upstream::new("v1-a").spawn().await, Upstream::new("v2-a").spawn().await);
    let clock = ManualClock::starting_now();
    let proxy = ProxyBuilder::new(&config(v1, v2)).clock(&clock).spawn().await;
    let started = admin_call("PUT", &proxy.admin_url("/ramp"), Some(TOKEN), None, Some(PLAN)).await;
    assert_eq!(started.status, StatusCode::OK, "{started:?}");
    let mut next = 0;
    for _ in 0..12 {
        minute(&proxy, &clock, &mut next, 200).await;
    }
    assert_eq!(ramp(&proxy).await["v1_percent"], 50.0, "at the second step");
    // Studies that started at 50 %: some on each version.
    let studies: Vec<String> =
        (next - 100..next).map(|id| proxy.url(&format!("/api/studies/{id}"))).collect();
    let before = pools_of(studies.clone()).await;
    assert!(before.iter().any(|p| p == "v2") && before.iter().any(|p| p == "v1"));

    // v2 starts answering 500: every request of the minute fails from now on.
    let mut states = Vec::new();
    for _ in 0..6 {
        minute(&proxy, &clock, &mut next, 500).await;
        states.push(ramp(&proxy).await["state"].as_str().unwrap().to_owned());
    }
    assert!(states.contains(&"aborted".to_owned()), "{states:?}");
    let aborted = ramp(&proxy).await;
    assert_eq!(aborted["v1_percent"], 100.0, "{aborted}");
    assert_eq!(aborted["analyses"][0]["judgement"]["verdict"], "fail", "{aborted}");
    let text = proxy.metrics().await;
    assert_eq!(metric(&text, "rollout_ramp_state", &[("state", "aborted")]), Some(1.0), "{text}");
    assert_eq!(metric(&text, "rollout_ramp_analysis_total", &[("result", "fail")]), Some(3.0));
    assert!(metric(&text, "rollout_ramp_v2_error_ratio", &[]).unwrap() > 0.05);
    // New studies go to v1; studies already on v2 stay there, as do those on v1.
    let fresh = pools_of((90_000..90_050).map(|id| proxy.url(&format!("/api/studies/{id}"))).collect()).await;
    assert!(fresh.iter().all(|p| p == "v1"), "{fresh:?}");
    assert_eq!(pools_of(studies).await, before, "an abort moves no pin");

    // Aborted stays aborted until retried.
    assert_eq!(command(&proxy, "resume").await.status, StatusCode::CONFLICT);
    let retried = command(&proxy, "retry").await;
    assert_eq!(retried.status, StatusCode::OK, "{retried:?}");
    assert_eq!(retried.json()["v1_percent"], 50.0);
    proxy.shutdown().await;
}

/// The ramp here comes from the config file: it starts with the proxy, and after the restart
/// the stored ramp, not a fresh start of the file's plan, goes on.
#[tokio::test]
async fn a_restart_mid_hold_resumes_with_the_hold_that_was_left() {
    let (v1, v2) = (Upstream::new("v1-a").spawn().await, Upstream::new("v2-a").spawn().await);
    let clock = ManualClock::starting_now();
    let config = config(v1, v2).section("ramp", PLAN);
    let proxy = ProxyBuilder::new(&config).clock(&clock).spawn().await;
    eventually(Duration::from_secs(2), "the config file's ramp starts", || async {
        ramp(&proxy).await["state"] == "progressing"
    })
    .await;
    let mut next = 0;
    for _ in 0..6 {
        minute(&proxy, &clock, &mut next, 200).await;
    }
    assert_eq!(ramp(&proxy).await["hold_left_seconds"], 240.0);
    let state = proxy.shutdown().await;

    // Down for an hour: that hour is not held.
    clock.advance(Duration::from_secs(3600));
    let proxy = ProxyBuilder::new(&config).clock(&clock).state_dir(state).spawn().await;
    let resumed = ramp(&proxy).await;
    assert_eq!(
        (resumed["state"].as_str(), resumed["v1_percent"].as_f64()),
        (Some("progressing"), Some(99.0))
    );
    assert_eq!(resumed["hold_left_seconds"], 240.0, "{resumed}");
    let mut percents = Vec::new();
    for _ in 0..12 {
        minute(&proxy, &clock, &mut next, 200).await;
        percents.push(ramp(&proxy).await["v1_percent"].as_f64().unwrap());
    }
    // The first analysis after the start only takes a reading; four more minutes are held.
    let moved = percents.iter().position(|p| *p == 50.0).expect("the ramp moved on");
    assert!((4..=6).contains(&moved), "moved to 50 % after {} minutes: {percents:?}", moved + 1);
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_hand_set_percentage_during_a_ramp_needs_force_and_pauses_it() {
    let (v1, v2) = (Upstream::new("v1-a").spawn().await, Upstream::new("v2-a").spawn().await);
    let clock = ManualClock::starting_now();
    let proxy = ProxyBuilder::new(&config(v1, v2)).clock(&clock).spawn().await;
    admin_call("PUT", &proxy.admin_url("/ramp"), Some(TOKEN), None, Some(PLAN)).await;
    let set = |query: &'static str| {
        let url = proxy.admin_url(&format!("/routes/legacy{query}"));
        async move { admin_call("PUT", &url, Some(TOKEN), None, Some(r#"{"v1_percent": 80}"#)).await }
    };
    let refused = set("").await;
    assert_eq!(refused.status, StatusCode::CONFLICT, "{refused:?}");
    assert!(refused.json()["error"].as_str().unwrap().contains("force=true"));
    assert_eq!(ramp(&proxy).await["state"], "progressing");

    assert_eq!(set("?force=true").await.status, StatusCode::OK);
    let paused = ramp(&proxy).await;
    assert_eq!((paused["state"].as_str(), paused["paused_by"].as_str()), (Some("paused"), Some("operator")));
    let status: serde_json::Value = get(&proxy.admin_url("/status")).await.json();
    assert_eq!(status["routes"]["legacy_v1_percent"], 80.0, "the hand-set share stands");

    let status: serde_json::Value = get(&proxy.admin_url("/status")).await.json();
    assert_eq!(status["ramp"]["state"], "paused", "{status}");

    // A second ramp while this one is paused: refused. An unknown command: 404.
    let again = admin_call("PUT", &proxy.admin_url("/ramp"), Some(TOKEN), None, Some(PLAN)).await;
    assert_eq!(again.status, StatusCode::CONFLICT);
    assert_eq!(command(&proxy, "skip").await.status, StatusCode::NOT_FOUND);
    // A plan with a mistake: 400 naming it.
    assert_eq!(command(&proxy, "abort").await.status, StatusCode::OK);
    // Starting a ramp based on a revision another change has moved past: 412, nothing started.
    let current = get(&proxy.admin_url("/status")).await.header("etag").unwrap().to_owned();
    let stale = admin_call("PUT", &proxy.admin_url("/ramp"), Some(TOKEN), Some("\"1\""), Some(PLAN)).await;
    assert_eq!(stale.status, StatusCode::PRECONDITION_FAILED, "{stale:?} (current {current})");
    assert_eq!(ramp(&proxy).await["state"], "aborted");
    let matching =
        admin_call("PUT", &proxy.admin_url("/ramp"), Some(TOKEN), Some(&current), Some(PLAN)).await;
    assert_eq!(matching.status, StatusCode::OK, "{matching:?}");
    assert_eq!(command(&proxy, "abort").await.status, StatusCode::OK);
    let bad = admin_call("PUT", &proxy.admin_url("/ramp"), Some(TOKEN), None, Some(r#"{"steps": []}"#)).await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert_eq!(bad.json()["error"], "ramp.steps: a ramp needs at least one step");
    proxy.shutdown().await;
}

#[test]
fn a_plan_in_the_config_file_is_checked_with_the_rest_and_its_mistake_located() {
    let yaml = "pools:\n  v1: { upstreams: [{ name: a, url: \"http://127.0.0.1:1\" }] }\n  v2: { upstreams: [{ name: b, url: \"http://127.0.0.1:2\" }] }\nramp:\n  steps:\n    - { v1_percent: 50, hold: 1h }\n    - { v1_percent: 80 }\n";
    let error = Config::from_yaml(yaml, std::path::Path::new("rollout.yaml")).unwrap_err().to_string();
    assert!(
        error.contains("ramp.steps[1].v1_percent: 80% does not lower v1's share from the step before (50%)"),
        "{error}"
    );
    assert!(error.contains("rollout.yaml:7"), "the line of the step: {error}");
    let fine = yaml.replace("v1_percent: 80", "v1_percent: 0");
    let config = Config::from_yaml(&fine, std::path::Path::new("rollout.yaml")).unwrap();
    assert_eq!(config.ramp.unwrap().steps().len(), 2);
}

/// With too few requests the step cannot be judged: it holds past its hold time, inconclusive,
/// and the ramp pauses when `inconclusive_timeout` runs out.
#[tokio::test]
async fn too_few_requests_hold_the_step_then_pause_the_ramp() {
    let (v1, v2) = (Upstream::new("v1-a").spawn().await, Upstream::new("v2-a").spawn().await);
    let clock = ManualClock::starting_now();
    let proxy = ProxyBuilder::new(&config(v1, v2)).clock(&clock).spawn().await;
    admin_call("PUT", &proxy.admin_url("/ramp"), Some(TOKEN), None, Some(PLAN)).await;
    let mut states = Vec::new();
    for _ in 0..40 {
        // A few requests a minute: far below `min_requests`.
        get(&proxy.url("/api/v2/items")).await;
        clock.advance(Duration::from_secs(60));
        proxy.analyse_ramp().await;
        let now = ramp(&proxy).await;
        assert_eq!(now["v1_percent"], 99.0, "the step holds: {now}");
        states.push(now["state"].as_str().unwrap().to_owned());
    }
    let paused = states.iter().position(|s| s == "paused").expect("the ramp paused");
    // Inconclusive from the second analysis on; 30 minutes of it pause the ramp.
    assert!((29..=31).contains(&paused), "paused after {} minutes: {states:?}", paused + 1);
    let now = ramp(&proxy).await;
    assert_eq!(now["paused_by"], "inconclusive", "{now}");
    assert_eq!(now["analyses"][0]["judgement"]["verdict"], "inconclusive", "{now}");
    assert_eq!(command(&proxy, "resume").await.status, StatusCode::OK);
    proxy.shutdown().await;
}

/// A gate answering 500 holds a step whose hold is done (asked again at every analysis); once
/// it answers 2xx the ramp moves on. The payload is Flagger's; an abort tells the abort gate.
#[tokio::test]
async fn a_gate_answering_500_holds_the_step_and_2xx_lets_it_advance() {
    let (v1, v2) = (Upstream::new("v1-a").spawn().await, Upstream::new("v2-a").spawn().await);
    let hook = Hook::spawn(500).await;
    let plan: serde_json::Value = serde_json::from_str(PLAN).unwrap();
    let mut plan = plan.as_object().unwrap().clone();
    plan.insert(
        "gates".to_owned(),
        serde_json::json!([
            { "name": "approval", "url": hook.url("/gate/check"), "retries": 0, "timeout": "2s",
              "metadata": { "cmd": "approve" } },
            { "name": "pager", "on": "abort", "url": hook.url("/abort") },
        ]),
    );
    let plan = serde_json::Value::Object(plan).to_string();
    let clock = ManualClock::starting_now();
    let proxy = ProxyBuilder::new(&config(v1, v2)).clock(&clock).spawn().await;
    let started = admin_call("PUT", &proxy.admin_url("/ramp"), Some(TOKEN), None, Some(&plan)).await;
    assert_eq!(started.status, StatusCode::OK, "{started:?}");

    let mut next = 0;
    for _ in 0..15 {
        minute(&proxy, &clock, &mut next, 200).await;
    }
    let held = ramp(&proxy).await;
    assert_eq!((held["step"].as_u64(), held["v1_percent"].as_f64()), (Some(0), Some(99.0)), "{held}");
    assert_eq!(held["hold_left_seconds"], 0.0);
    assert_eq!(held["gates"]["open"], false, "{held}");
    assert_eq!(held["gates"]["answers"][0]["status"], 500, "{held}");
    let asked = hook.calls("/gate/check");
    assert!(asked.len() >= 5, "asked at every analysis once the hold was done: {}", asked.len());

    // Gates are asked in the background; once they say yes, the next analysis moves on.
    hook.answer(200);
    minute(&proxy, &clock, &mut next, 200).await;
    eventually(Duration::from_secs(5), "the ramp moves on", || async {
        proxy.analyse_ramp().await;
        ramp(&proxy).await["step"] == 1
    })
    .await;
    let moved = ramp(&proxy).await;
    assert_eq!((moved["step"].as_u64(), moved["v1_percent"].as_f64()), (Some(1), Some(50.0)), "{moved}");
    let payload = hook.calls("/gate/check").pop().unwrap();
    assert_eq!(payload["name"], "rollout");
    assert_eq!(payload["namespace"], "default");
    assert_eq!(payload["phase"], "Progressing");
    assert_eq!(payload["type"], "confirm-traffic-increase");
    assert_eq!(payload["metadata"]["cmd"], "approve");
    assert_eq!((payload["step"].as_u64(), payload["v1_percent"].as_f64()), (Some(1), Some(50.0)));
    let text = proxy.metrics().await;
    assert!(metric(&text, "rollout_ramp_gate_calls_total", &[("result", "closed")]).unwrap() >= 5.0);
    assert_eq!(metric(&text, "rollout_ramp_gate_calls_total", &[("result", "open")]), Some(1.0));

    assert!(hook.calls("/abort").is_empty());
    assert_eq!(command(&proxy, "abort").await.status, StatusCode::OK);
    eventually(Duration::from_secs(5), "the abort gate is told", || async {
        !hook.calls("/abort").is_empty()
    })
    .await;
    let told = &hook.calls("/abort")[0];
    assert_eq!((told["phase"].as_str(), told["type"].as_str()), (Some("Failed"), Some("event")), "{told}");
    assert!(told["metadata"]["eventMessage"].as_str().unwrap().contains("aborted by"), "{told}");
    proxy.shutdown().await;
}
