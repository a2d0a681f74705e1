//! The admin API: every endpoint's success path, authentication, validation, optimistic
//! concurrency, persistence of overrides, reloads, and the metrics it exposes.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use http::StatusCode;
use serde_json::Value;
use support::{
    admin_call, get, grows_by, metric, pools_of, ConfigBuilder, ProxyBuilder, ProxyHandle, Reply, Upstream,
};

const TOKEN: &str = "s3cret-admin-token";

/// A proxy started from a config *file* (so reloads work), with the admin token configured.
struct Fixture {
    proxy: ProxyHandle,
    dir: tempfile::TempDir,
    v1: SocketAddr,
    v2: SocketAddr,
}

impl Fixture {
    async fn start() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let v1 = Upstream::new("v1-a").spawn().await;
        let v2 = Upstream::new("v2-a").spawn().await;
        std::fs::write(dir.path().join("token"), format!("{TOKEN}\n")).unwrap();
        let file = dir.path().join("rollout.yaml");
        write_config(&file, &dir, v1, v2, 100.0);
        let proxy = ProxyBuilder::from_file(&file).spawn().await;
        Fixture { proxy, dir, v1, v2 }
    }

    fn config_file(&self) -> PathBuf {
        self.dir.path().join("rollout.yaml")
    }

    fn write_config(&self, percent: f64) {
        write_config(&self.config_file(), &self.dir, self.v1, self.v2, percent);
    }

    async fn call(&self, method: &str, path: &str, body: Option<&str>) -> Reply {
        admin_call(method, &self.proxy.admin_url(path), Some(TOKEN), None, body).await
    }

    async fn status(&self) -> Value {
        get(&self.proxy.admin_url("/status")).await.json()
    }
}

/// Two v1 upstreams (both at `v1`), one v2, the token file in `dir`.
fn write_config(file: &Path, dir: &tempfile::TempDir, v1: SocketAddr, v2: SocketAddr, percent: f64) {
    let config = ConfigBuilder::new()
        .v1("v1-a", v1, 1)
        .v1("v1-b", v1, 1)
        .v2("v2-a", v2, 1)
        .legacy_v1_percent(percent)
        .admin_token_file(&dir.path().join("token"));
    std::fs::write(file, config.render()).unwrap();
}

fn error_of(reply: &Reply) -> String {
    reply.json()["error"].as_str().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn every_endpoint_works_for_an_authorised_operator() {
    let f = Fixture::start().await;
    let status = get(&f.proxy.admin_url("/status")).await;
    assert_eq!(status.status, StatusCode::OK);
    assert_eq!(status.header("etag"), Some("\"0\""));
    let body = status.json();
    assert_eq!(body["routes"]["legacy_v1_percent"], 100.0);
    assert_eq!(body["routes"]["legacy_v1_percent_source"], "config");
    assert_eq!(body["pools"]["v1"]["upstreams"][0]["weight_source"], "config");

    let reply = f.call("PUT", "/routes/legacy", Some(r#"{"v1_percent": 25}"#)).await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    assert_eq!(reply.header("etag"), Some("\"1\""));
    assert_eq!((reply.json()["old"].clone(), reply.json()["new"].clone()), (100.0.into(), 25.0.into()));

    let reply = f.call("PUT", "/pools/v1/upstreams/v1-b", Some(r#"{"weight": 0}"#)).await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    let body = f.status().await;
    assert_eq!(body["revision"], 2);
    assert_eq!(body["routes"]["legacy_v1_percent"], 25.0);
    assert_eq!(body["routes"]["legacy_v1_percent_source"], "admin");
    assert_eq!(body["pools"]["v1"]["upstreams"][1]["weight"], 0);
    assert_eq!(body["pools"]["v1"]["upstreams"][1]["weight_source"], "admin");
    assert_eq!(body["pools"]["v1"]["upstreams"][1]["config_weight"], 1);

    pools_of((0..40).map(|id| f.proxy.url(&format!("/api/studies/{id}"))).collect()).await;
    let list = f.call("GET", "/sessions?pool=v2&limit=5", None).await;
    assert_eq!(list.status, StatusCode::OK);
    let sessions = list.json()["sessions"].as_array().unwrap().clone();
    assert_eq!(sessions.len(), 5);
    assert!(sessions.iter().all(|s| s["pool"] == "v2"));
    let key = sessions[0]["key"].as_str().unwrap().to_owned();

    let reply = f.call("DELETE", &format!("/sessions/{key}"), None).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json()["old"]["pool"], "v2");
    assert_eq!(f.call("DELETE", &format!("/sessions/{key}"), None).await.status, StatusCode::NOT_FOUND);

    let reply = f.call("POST", "/reload", None).await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    assert_eq!(f.status().await["routes"]["legacy_v1_percent"], 25.0, "a reload keeps the override");

    let reply = f.call("DELETE", "/overrides", None).await;
    assert_eq!(reply.status, StatusCode::OK);
    let body = f.status().await;
    assert_eq!(body["routes"]["legacy_v1_percent"], 100.0);
    assert_eq!(body["routes"]["legacy_v1_percent_source"], "config");
    assert_eq!(body["pools"]["v1"]["upstreams"][1]["weight"], 1);

    let text = String::from_utf8(get(&f.proxy.admin_url("/metrics")).await.body.to_vec()).unwrap();
    for (kind, n) in [
        ("legacy_percent", 1.0),
        ("weight", 1.0),
        ("session_delete", 1.0),
        ("reload", 1.0),
        ("overrides_reset", 1.0),
    ] {
        assert_eq!(metric(&text, "rollout_admin_changes_total", &[("kind", kind)]), Some(n), "{kind}");
    }
    assert_eq!(metric(&text, "rollout_config_reloads_total", &[("result", "ok")]), Some(1.0));
}

/// Every changing endpoint with a body that would be accepted.
const MUTATIONS: [(&str, &str, Option<&str>); 6] = [
    ("PUT", "/routes/legacy", Some(r#"{"v1_percent": 0}"#)),
    ("PUT", "/pools/v1/upstreams/v1-a", Some(r#"{"weight": 3}"#)),
    ("GET", "/sessions", None),
    ("DELETE", "/sessions/1", None),
    ("POST", "/reload", None),
    ("DELETE", "/overrides", None),
];

#[tokio::test]
async fn changing_endpoints_need_the_right_token_and_a_refusal_changes_nothing() {
    let f = Fixture::start().await;
    pools_of(vec![f.proxy.url("/api/studies/1")]).await;
    let before = f.status().await;
    for (method, path, body) in MUTATIONS {
        let url = f.proxy.admin_url(path);
        let none = admin_call(method, &url, None, None, body).await;
        assert_eq!(none.status, StatusCode::UNAUTHORIZED, "{method} {path} without a token");
        assert_eq!(none.header("www-authenticate"), Some("Bearer"));
        let wrong = admin_call(method, &url, Some("s3cret-admin-tokeN"), None, body).await;
        assert_eq!(wrong.status, StatusCode::UNAUTHORIZED, "{method} {path} with a wrong token");
        let prefix = admin_call(method, &url, Some("s3cret"), None, body).await;
        assert_eq!(prefix.status, StatusCode::UNAUTHORIZED, "{method} {path} with a prefix of the token");
    }
    let after = f.status().await;
    assert_eq!(before["revision"], after["revision"]);
    assert_eq!(before["routes"], after["routes"]);
    assert_eq!(after["sessions"]["active"]["v1"], 1, "the session was not deleted");
}

#[tokio::test]
async fn without_a_configured_token_changes_are_refused_with_an_explanation() {
    let v1 = Upstream::new("v1-a").spawn().await;
    let v2 = Upstream::new("v2-a").spawn().await;
    let proxy = ProxyBuilder::new(&ConfigBuilder::one_each(v1, v2)).spawn().await;
    for (method, path, body) in MUTATIONS {
        let reply = admin_call(method, &proxy.admin_url(path), Some(TOKEN), None, body).await;
        assert_eq!(reply.status, StatusCode::FORBIDDEN, "{method} {path}");
        assert!(error_of(&reply).contains("no admin token is configured"), "{:?}", reply.body);
    }
    assert_eq!(get(&proxy.admin_url("/status")).await.status, StatusCode::OK, "reading stays open");
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_non_loopback_admin_address_without_a_token_refuses_to_start() {
    let config = ConfigBuilder::one_each("127.0.0.1:1".parse().unwrap(), "127.0.0.1:2".parse().unwrap())
        .admin_listen("0.0.0.0:0");
    let err = ProxyBuilder::new(&config).try_spawn().await.err().expect("refused");
    assert!(err.to_string().contains("is not a loopback address and no admin token is configured"), "{err}");
}

#[tokio::test]
async fn bad_input_answers_400_naming_the_field_and_changes_nothing() {
    let f = Fixture::start().await;
    let cases = [
        ("PUT", "/routes/legacy", r#"{"v1_percent": 101}"#, "v1_percent: 101 is not a percentage"),
        ("PUT", "/routes/legacy", r#"{"v1_percent": -1}"#, "v1_percent"),
        ("PUT", "/routes/legacy", r#"{"v1_percent": "half"}"#, "v1_percent: invalid type"),
        ("PUT", "/routes/legacy", r#"{"v1_percent": 10, "v2_percent": 90}"#, "unknown field `v2_percent`"),
        ("PUT", "/routes/legacy", r#"{}"#, "missing field `v1_percent`"),
        ("PUT", "/routes/legacy", r#"{"v1_percent": "#, "malformed JSON body"),
        ("PUT", "/routes/legacy", "", "malformed JSON body"),
        ("PUT", "/pools/v1/upstreams/v1-a", r#"{"weight": 20000}"#, "weight: 20000 is over the maximum"),
        ("PUT", "/pools/v1/upstreams/v1-a", r#"{"weight": -2}"#, "weight: invalid value"),
        ("PUT", "/pools/v1/upstreams/v1-a", r#"{"wieght": 2}"#, "unknown field `wieght`"),
        ("GET", "/sessions?pool=v3", "", "pool: unknown pool \"v3\""),
        ("GET", "/sessions?limit=0", "", "limit: \"0\" is not a number"),
        ("DELETE", "/sessions/bad%20key", "", "key: \"bad key\" is not a session key"),
    ];
    for (method, path, body, expected) in cases {
        let reply = f.call(method, path, (!body.is_empty()).then_some(body)).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{method} {path} {body}: {:?}", reply.body);
        assert!(error_of(&reply).contains(expected), "{method} {path} {body}: {:?}", reply.body);
    }
    let reply = admin_call(
        "PUT",
        &f.proxy.admin_url("/routes/legacy"),
        Some(TOKEN),
        Some("seven"),
        Some(r#"{"v1_percent": 5}"#),
    )
    .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert!(error_of(&reply).contains("If-Match"));
    let body = f.status().await;
    assert_eq!(body["revision"], 0);
    assert_eq!(body["routes"]["legacy_v1_percent"], 100.0);
    assert_eq!(body["pools"]["v1"]["upstreams"][0]["weight"], 1);
}

#[tokio::test]
async fn unknown_pools_upstreams_and_sessions_answer_404() {
    let f = Fixture::start().await;
    for (method, path, body, expected) in [
        ("PUT", "/pools/v3/upstreams/v1-a", Some(r#"{"weight": 1}"#), "unknown pool \"v3\""),
        (
            "PUT",
            "/pools/v2/upstreams/v1-a",
            Some(r#"{"weight": 1}"#),
            "pool v2 has no upstream named \"v1-a\"",
        ),
        ("DELETE", "/sessions/nobody", None, "no live session \"nobody\""),
        ("GET", "/no-such-endpoint", None, "no such admin endpoint"),
    ] {
        let reply = f.call(method, path, body).await;
        assert_eq!(reply.status, StatusCode::NOT_FOUND, "{method} {path}");
        assert!(error_of(&reply).contains(expected), "{:?}", reply.body);
    }
    assert_eq!(f.status().await["revision"], 0);
}

#[tokio::test]
async fn a_stale_if_match_answers_412_and_a_current_one_succeeds() {
    let f = Fixture::start().await;
    let url = f.proxy.admin_url("/routes/legacy");
    let first = admin_call("PUT", &url, Some(TOKEN), Some("\"0\""), Some(r#"{"v1_percent": 50}"#)).await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(first.header("etag"), Some("\"1\""));
    // A second operator still holding revision 0 loses.
    let stale = admin_call("PUT", &url, Some(TOKEN), Some("\"0\""), Some(r#"{"v1_percent": 0}"#)).await;
    assert_eq!(stale.status, StatusCode::PRECONDITION_FAILED);
    assert!(error_of(&stale).contains("revision 0 is stale; the current revision is 1"));
    let weight = f.proxy.admin_url("/pools/v1/upstreams/v1-a");
    let stale = admin_call("PUT", &weight, Some(TOKEN), Some("\"0\""), Some(r#"{"weight": 7}"#)).await;
    assert_eq!(stale.status, StatusCode::PRECONDITION_FAILED);
    let reset =
        admin_call("DELETE", &f.proxy.admin_url("/overrides"), Some(TOKEN), Some("W/\"0\""), None).await;
    assert_eq!(reset.status, StatusCode::PRECONDITION_FAILED);
    let body = f.status().await;
    assert_eq!(body["routes"]["legacy_v1_percent"], 50.0);
    assert_eq!(body["pools"]["v1"]["upstreams"][0]["weight"], 1);
    let current = admin_call("PUT", &url, Some(TOKEN), Some("\"1\""), Some(r#"{"v1_percent": 0}"#)).await;
    assert_eq!(current.status, StatusCode::OK);
}

#[tokio::test]
async fn an_invalid_config_file_is_refused_on_reload_and_changes_nothing() {
    let f = Fixture::start().await;
    std::fs::write(f.config_file(), "pools: { v1: { upstreams: [] } }\n").unwrap();
    let reply = f.call("POST", "/reload", None).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    let error = error_of(&reply);
    assert!(error.contains("config reload failed; the running config is unchanged"), "{error}");
    assert!(error.contains("missing field `v2`"), "{error}");
    assert_eq!(f.status().await["revision"], 0);
    assert_eq!(get(&f.proxy.url("/api/studies/1")).await.status, StatusCode::OK);
    let text = String::from_utf8(get(&f.proxy.admin_url("/metrics")).await.body.to_vec()).unwrap();
    assert_eq!(metric(&text, "rollout_config_reloads_total", &[("result", "error")]), Some(1.0));
}

#[tokio::test]
async fn the_percentage_moves_under_traffic_and_the_override_survives_restart_and_reload() {
    let mut f = Fixture::start().await;
    // Studies 0..50 begin on v1 (100 %).
    assert!(pools_of((0..50).map(|i| f.proxy.url(&format!("/api/studies/{i}"))).collect())
        .await
        .iter()
        .all(|p| p == "v1"));

    // Continuous traffic: pinned studies and new ones, while the operator moves the percentage.
    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicUsize::new(0));
    let traffic = {
        let (stop, answered, url) = (stop.clone(), answered.clone(), f.proxy.url(""));
        tokio::spawn(async move {
            let mut moved = Vec::new();
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let pinned = pools_of(vec![format!("{url}/api/studies/{}", i % 50)]).await;
                if pinned[0] != "v1" {
                    moved.push(i % 50);
                }
                answered.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
            moved
        })
    };
    // A round of the 50 studies before the change, and another after it.
    grows_by(&answered, 50, "study requests are answered").await;
    let reply = f.call("PUT", "/routes/legacy", Some(r#"{"v1_percent": 0}"#)).await;
    assert_eq!(reply.status, StatusCode::OK);
    // The very next new study goes to v2.
    assert_eq!(pools_of(vec![f.proxy.url("/api/studies/new-1")]).await, ["v2"]);
    grows_by(&answered, 50, "study requests are answered").await;
    stop.store(true, Ordering::Relaxed);
    assert_eq!(traffic.await.unwrap(), Vec::<usize>::new(), "pinned studies moved");

    // A restart keeps the override.
    f.proxy.restart().await;
    assert_eq!(f.status().await["routes"]["legacy_v1_percent"], 0.0);
    assert_eq!(pools_of(vec![f.proxy.url("/api/studies/new-2")]).await, ["v2"]);
    assert_eq!(pools_of(vec![f.proxy.url("/api/studies/7")]).await, ["v1"]);

    // A reload with a different file value: the override still wins...
    f.write_config(100.0);
    assert_eq!(f.call("POST", "/reload", None).await.status, StatusCode::OK);
    assert_eq!(f.status().await["routes"]["config_legacy_v1_percent"], 100.0);
    assert_eq!(pools_of(vec![f.proxy.url("/api/studies/new-3")]).await, ["v2"]);
    // ...until the overrides are dropped.
    assert_eq!(f.call("DELETE", "/overrides", None).await.status, StatusCode::OK);
    assert_eq!(pools_of(vec![f.proxy.url("/api/studies/new-4")]).await, ["v1"]);
}

#[tokio::test]
async fn metrics_carry_every_section_6_name() {
    let f = Fixture::start().await;
    pools_of(vec![f.proxy.url("/api/studies/1"), f.proxy.url("/api/v2/x")]).await;
    let reply = get(&f.proxy.admin_url("/metrics")).await;
    assert!(reply.header("content-type").unwrap().starts_with("text/plain; version=0.0.4"));
    let text = String::from_utf8(reply.body.to_vec()).unwrap();
    for name in [
        "rollout_requests_total",
        "rollout_request_duration_seconds",
        "rollout_upstream_requests_total",
        "rollout_upstream_errors_total",
        "rollout_upstream_healthy",
        "rollout_upstream_weight",
        "rollout_legacy_v1_percent",
        "rollout_sessions_active",
        "rollout_sessions_started_total",
        "rollout_sessions_ended_total",
        "rollout_session_keys_rejected_total",
        "rollout_v1_last_request_timestamp_seconds",
        "rollout_v1_quiet_seconds",
        "rollout_drain_quiet_window_seconds",
        "rollout_v1_drained",
        "rollout_config_reloads_total",
        "rollout_admin_changes_total",
        "rollout_build_info",
    ] {
        assert!(text.contains(&format!("# TYPE {name} ")), "{name} missing");
    }
    assert_eq!(
        metric(
            &text,
            "rollout_requests_total",
            &[("route", "v2_prefix"), ("pool", "v2"), ("decision", "prefix"), ("code_class", "2xx")]
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &text,
            "rollout_requests_total",
            &[("route", "legacy"), ("pool", "v1"), ("decision", "new_pin"), ("code_class", "2xx")]
        ),
        Some(1.0)
    );
    assert_eq!(metric(&text, "rollout_upstream_weight", &[("pool", "v1"), ("upstream", "v1-b")]), Some(1.0));
    assert_eq!(metric(&text, "rollout_legacy_v1_percent", &[]), Some(100.0));
    // Labels are bounded: no path or session key ever appears.
    assert!(!text.contains("/api/") && !text.contains("studies"), "a path leaked into a label");
}

async fn end_all(f: &Fixture, keys: &[String]) {
    for key in keys {
        let reply = f.call("DELETE", &format!("/sessions/{key}"), None).await;
        assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    }
}

async fn set_share(f: &Fixture, percent: f64) {
    let body = format!(r#"{{"v1_percent": {percent}}}"#);
    assert_eq!(f.call("PUT", "/routes/legacy", Some(&body)).await.status, StatusCode::OK);
}

/// A new session's pool is decided by its key (a keyed hash against the v1 share), not by a
/// die: the same key lands on the same pool after its pin ends, across a restart, and lowering
/// the share only ever moves new sessions from v1 to v2.
#[tokio::test]
async fn a_new_sessions_pool_follows_its_key_and_a_lower_share_only_moves_keys_to_v2() {
    let mut f = Fixture::start().await;
    let keys: Vec<String> = (0..200).map(|i| format!("split-{i}")).collect();
    let urls =
        |f: &Fixture| keys.iter().map(|k| f.proxy.url(&format!("/api/studies/{k}/contents"))).collect();
    set_share(&f, 50.0).await;
    let at_half = pools_of(urls(&f)).await;
    let v1_at_half = at_half.iter().filter(|p| *p == "v1").count();
    assert!((60..=140).contains(&v1_at_half), "{v1_at_half} of 200 keys on v1 at 50 %");

    end_all(&f, &keys).await;
    assert_eq!(pools_of(urls(&f)).await, at_half, "ended sessions came back on other pools");

    end_all(&f, &keys).await;
    f.proxy.restart().await;
    assert_eq!(pools_of(urls(&f)).await, at_half, "a restart moved new sessions");

    set_share(&f, 25.0).await;
    end_all(&f, &keys).await;
    let at_quarter = pools_of(urls(&f)).await;
    let moved_back = keys
        .iter()
        .zip(at_half.iter().zip(&at_quarter))
        .filter(|(_, (half, quarter))| *half == "v2" && *quarter == "v1");
    assert_eq!(
        moved_back.map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
        Vec::<&str>::new(),
        "keys moved from v2 to v1"
    );
    let v1_at_quarter = at_quarter.iter().filter(|p| *p == "v1").count();
    assert!(
        v1_at_quarter < v1_at_half && v1_at_quarter > 0,
        "{v1_at_quarter} on v1 at 25 %, {v1_at_half} at 50 %"
    );
    f.proxy.shutdown().await;
}

/// Keys a reload cannot change are reported against what the process runs: after a second
/// reload the change still waits for a restart, `/status` lists it, and changing it back
/// clears it.
#[tokio::test]
async fn keys_waiting_for_a_restart_are_reported_until_the_running_value_is_back() {
    let f = Fixture::start().await;
    assert_eq!(f.status().await["restart_required"], serde_json::json!([]));
    // The file names the state directory the test harness gave the proxy.
    let text = std::fs::read_to_string(f.config_file()).unwrap();
    let text = format!("{text}state_dir: {:?}\n", f.proxy.state_path());
    std::fs::write(f.config_file(), format!("{text}shutdown:\n  grace_period: 7s\n")).unwrap();
    let first = f.call("POST", "/reload", None).await;
    assert_eq!(first.json()["restart_required"], serde_json::json!(["shutdown.grace_period"]), "{first:?}");
    let second = f.call("POST", "/reload", None).await;
    assert_eq!(second.json()["restart_required"], serde_json::json!(["shutdown.grace_period"]), "{second:?}");
    assert_eq!(f.status().await["restart_required"], serde_json::json!(["shutdown.grace_period"]));

    std::fs::write(f.config_file(), text).unwrap();
    let back = f.call("POST", "/reload", None).await;
    assert_eq!(back.status, StatusCode::OK);
    assert_eq!(back.json().get("restart_required"), None, "{back:?}");
    assert_eq!(f.status().await["restart_required"], serde_json::json!([]));
}

/// One session's pin, by key; and the list in key order, a page at a time, through every pin
/// exactly once.
#[tokio::test]
async fn one_session_is_looked_up_and_the_list_pages_through_every_pin_in_order() {
    let f = Fixture::start().await;
    pools_of((0..250).map(|id| f.proxy.url(&format!("/api/studies/s{id:03}"))).collect()).await;

    let one = f.call("GET", "/sessions/s042", None).await;
    assert_eq!(one.status, StatusCode::OK, "{one:?}");
    let pin = one.json();
    assert_eq!((pin["key"].as_str(), pin["pool"].as_str()), (Some("s042"), Some("v1")));
    assert_eq!(pin["ended_by"], "idle", "{pin}");
    assert!(pin["expires_at"].as_str().unwrap() > pin["last_seen"].as_str().unwrap(), "{pin}");
    assert_eq!(f.call("GET", "/sessions/nobody", None).await.status, StatusCode::NOT_FOUND);
    let anonymous = admin_call("GET", &f.proxy.admin_url("/sessions/s042"), None, None, None).await;
    assert_eq!(anonymous.status, StatusCode::UNAUTHORIZED);

    let mut keys = Vec::new();
    let mut after = String::new();
    let mut pages = 0;
    loop {
        let page = f.call("GET", &format!("/sessions?limit=100&after={after}"), None).await.json();
        pages += 1;
        keys.extend(
            page["sessions"].as_array().unwrap().iter().map(|s| s["key"].as_str().unwrap().to_owned()),
        );
        match page["next"].as_str() {
            Some(next) => after = next.to_owned(),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    let expected: Vec<String> = (0..250).map(|id| format!("s{id:03}")).collect();
    assert_eq!(keys, expected, "every pin once, in key order");

    // Ending one is journalled for the console without its key (GET /audit needs no token).
    assert_eq!(f.call("DELETE", "/sessions/s042", None).await.status, StatusCode::OK);
    let audit = get(&f.proxy.admin_url("/audit")).await.json();
    let ended = &audit["events"][0];
    assert_eq!(ended["kind"], "session_delete", "{audit}");
    assert!(!ended["detail"].as_str().unwrap().contains("s042"), "{audit}");
}
