//! The process's logs: JSON lines with `--log-format json`, and the filter changed while it
//! runs through `PUT /log-level`.

mod support;

use std::io::{BufRead, BufReader};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::StatusCode;
use serde_json::Value;
use support::{admin_call, eventually, get, ConfigBuilder, Upstream};

const TOKEN: &str = "logging-test-token";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_lines_and_a_log_filter_changed_at_run_time() {
    let (v1, v2) = (Upstream::new("v1-a").spawn().await, Upstream::new("v2-a").spawn().await);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token"), TOKEN).unwrap();
    let (listen, admin) = (format!("127.0.0.1:{}", free_port()), format!("127.0.0.1:{}", free_port()));
    let config = ConfigBuilder::one_each(v1, v2)
        .listen(&listen)
        .admin_listen(&admin)
        .admin_token_file(&dir.path().join("token"))
        .state_dir(&dir.path().join("state"));
    let file = dir.path().join("rollout.yaml");
    std::fs::write(&file, config.render()).unwrap();
    let mut child = support::binary()
        .args(["--log-format", "json", "run", "--config"])
        .arg(&file)
        .env_remove("RUST_LOG")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let reader = {
        let (stderr, lines) = (child.stderr.take().unwrap(), lines.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(line);
            }
        })
    };
    let logged = |message: &'static str| {
        let lines = lines.clone();
        move || {
            let lines = lines.clone();
            async move {
                lines
                    .lock()
                    .unwrap()
                    .iter()
                    .any(|l| serde_json::from_str::<Value>(l).is_ok_and(|v| v["message"] == message))
            }
        }
    };
    eventually(Duration::from_secs(20), "the proxy logs that it serves", logged("serving")).await;
    let admin_url = |path: &str| format!("http://{admin}{path}");
    assert_eq!(
        get(&admin_url("/log-level")).await.json(),
        serde_json::json!({ "filter": "info", "adjustable": true })
    );

    get(&format!("http://{listen}/api/v2/first")).await;
    let changed = admin_call(
        "PUT",
        &admin_url("/log-level"),
        Some(TOKEN),
        None,
        Some(r#"{"filter": "info,rollout_proxy=debug"}"#),
    )
    .await;
    assert_eq!(changed.status, StatusCode::OK, "{changed:?}");
    assert_eq!(changed.json()["old"], "info");
    get(&format!("http://{listen}/api/v2/second")).await;
    eventually(Duration::from_secs(5), "a request line at debug", logged("request")).await;
    let bad =
        admin_call("PUT", &admin_url("/log-level"), Some(TOKEN), None, Some(r#"{"filter": "info,=="}"#))
            .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST, "{bad:?}");
    let anonymous =
        admin_call("PUT", &admin_url("/log-level"), None, None, Some(r#"{"filter": "trace"}"#)).await;
    assert_eq!(anonymous.status, StatusCode::UNAUTHORIZED);

    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    child.wait().unwrap();
    reader.join().unwrap();
    let lines = lines.lock().unwrap();
    for line in lines.iter().filter(|l| !l.is_empty()) {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v["level"].is_string() && v["timestamp"].is_string(), "{line}");
    }
    let requests: Vec<&String> = lines.iter().filter(|l| l.contains("\"message\":\"request\"")).collect();
    assert!(requests.iter().all(|l| !l.contains("/api/v2/first")), "the first request came before debug");
    assert!(requests.iter().any(|l| l.contains("/api/v2/second")), "{requests:?}");
    assert!(lines.iter().any(|l| l.contains("\"kind\":\"log_level\"")), "the change is audited");
}

/// `log.access: true`: one line per request, on either request path (HTTP/1.1 and h2c), with
/// pool, upstream, decision, status and duration, and the session key only as a digest: the
/// same for every request of a session, never the key itself, and no path that could hold it.
#[tokio::test]
async fn the_access_log_has_a_line_per_request_and_never_the_session_key() {
    let (v1, v2) = (Upstream::new("v1-a").spawn().await, Upstream::new("v2-a").spawn().await);
    let dir = tempfile::tempdir().unwrap();
    let config = ConfigBuilder::one_each(v1, v2).legacy_v1_percent(100.0).section("log", "{ access: true }");
    let file = support::write_config(dir.path(), &config);
    let proxy = support::ProxyProcess::start(&["run", "--config", &file]).await;
    get(&proxy.url("/api/studies/study-73915/progress")).await;
    get(&proxy.url("/api/progress?studyId=study-73915")).await;
    get(&proxy.url("/api/v2/items")).await;
    let h2 = support::h2c_client();
    let request = http::Request::get(proxy.url("/api/studies/study-80000")).body(Default::default()).unwrap();
    assert_eq!(h2.request(request).await.unwrap().status(), StatusCode::OK);

    let access_lines = || {
        let log = proxy.stderr.lock().unwrap().clone();
        log.lines().filter(|l| l.contains(" access: ")).map(str::to_owned).collect::<Vec<_>>()
    };
    eventually(Duration::from_secs(5), "four access lines", || async { access_lines().len() == 4 }).await;
    let lines = access_lines();
    for line in &lines {
        assert!(!line.contains("study-73915") && !line.contains("study-80000"), "a key in clear: {line}");
        assert!(line.contains("status=200") && line.contains("duration_ms="), "{line}");
    }
    let session = |line: &str| {
        line.split("session=")
            .nth(1)
            .map(|s| s.split_whitespace().next().unwrap().trim_matches('"').to_owned())
    };
    let first = session(&lines[0]).expect("a keyed request has a session digest");
    assert_eq!(first.len(), 16, "{first}");
    assert_eq!(session(&lines[1]), Some(first.clone()), "the same session, the same digest");
    assert!(
        lines[0].contains("decision=\"new_pin\"") || lines[0].contains("decision=new_pin"),
        "{}",
        lines[0]
    );
    assert!(lines[0].contains("upstream=\"v1-a\"") || lines[0].contains("upstream=v1-a"), "{}", lines[0]);
    assert_eq!(session(&lines[2]), None, "a prefix request has no session");
    assert!(lines[2].contains("v2-a"), "{}", lines[2]);
    let h2_line = &lines[3];
    assert!(session(h2_line).is_some_and(|s| s != first) && h2_line.contains("v1-a"), "{h2_line}");
    proxy.signal(libc::SIGTERM);
}
