//! The binary as an operator runs it: graceful stop on SIGTERM, and the demo.

mod support;

use std::time::Duration;

use http::StatusCode;
use support::{eventually, get, ConfigBuilder, ProxyProcess, Upstream};

#[tokio::test]
async fn sigterm_lets_an_in_flight_request_finish_then_exits_0() {
    let v1 = Upstream::new("v1-a").spawn_killable().await;
    let v2 = Upstream::new("v2-a").spawn().await;
    let dir = tempfile::tempdir().unwrap();
    let config = ConfigBuilder::one_each(v1.addr, v2).grace_period(Duration::from_secs(20));
    let file = support::write_config(dir.path(), &config);
    let mut proxy = ProxyProcess::start(&["run", "--config", &file]).await;
    assert_eq!(get(&proxy.admin_url("/readyz")).await.status, StatusCode::OK);

    let slow_url = proxy.url("/__slow/1500");
    let slow = tokio::spawn(async move { get(&slow_url).await });
    eventually(Duration::from_secs(5), "the slow request reaches v1-a", || async {
        v1.requests("/__slow/1500") == 1
    })
    .await;
    proxy.signal(libc::SIGTERM);

    // Draining: not ready, no new connections, the old request still running.
    eventually(Duration::from_secs(5), "/readyz says not ready", || async {
        get(&proxy.admin_url("/readyz")).await.status == StatusCode::SERVICE_UNAVAILABLE
    })
    .await;
    eventually(Duration::from_secs(5), "the listener closes", || async {
        tokio::net::TcpStream::connect(proxy.addr).await.is_err()
    })
    .await;
    assert!(!slow.is_finished());

    let reply = slow.await.unwrap();
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.header("x-upstream"), Some("v1-a"));
    let status = proxy.exit_status(Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(0), "{}", proxy.stderr.lock().unwrap());
}

#[tokio::test]
async fn demo_serves_the_tour_and_stops_on_ctrl_c() {
    let mut demo =
        ProxyProcess::start(&["demo", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"]).await;
    eventually(Duration::from_secs(5), "the demo prints its tour", || async {
        demo.stdout.lock().unwrap().contains("Ctrl-C")
    })
    .await;
    let tour = demo.stdout.lock().unwrap().clone();
    assert!(tour.contains(&format!("curl -si http://{}/api/v2/studies/42", demo.addr)), "{tour}");

    let reply = get(&demo.url("/api/v2/studies/42")).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(String::from_utf8_lossy(&reply.body).starts_with("v2 v2-"), "{:?}", reply.body);
    let mut pools = std::collections::BTreeSet::new();
    for _ in 0..60 {
        let reply = get(&demo.url("/api/members/me")).await;
        pools.insert(reply.header("x-rollout-pool").unwrap().to_owned());
    }
    assert_eq!(pools.len(), 2, "the demo's 50 % split reaches both pools");
    let first = get(&demo.url("/api/studies/42/progress")).await.header("x-rollout-pool").map(str::to_owned);
    for _ in 0..10 {
        let again = get(&demo.url("/api/progress?studyId=42")).await;
        assert_eq!(again.header("x-rollout-pool").map(str::to_owned), first, "study 42 stays on its pool");
    }
    assert_eq!(get(&demo.admin_url("/drain")).await.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(get(&demo.admin_url("/healthz")).await.status, StatusCode::OK);

    // The demo's short ramp, judged on its own visitors, reaches 0 % in well under a minute.
    assert!(tour.contains("ramp status --watch"), "{tour}");
    eventually(Duration::from_secs(60), "the demo's ramp completes", || async {
        let ramp = get(&demo.admin_url("/ramp")).await.json();
        ramp["state"] == "completed" && ramp["v1_percent"] == 0.0
    })
    .await;
    let status = get(&demo.admin_url("/status")).await.json();
    assert_eq!(status["routes"]["legacy_v1_percent"], 0.0);

    // The operator's loop the tour prints: the console, and ctl with the run's own token.
    assert!(tour.contains(&format!("console http://{}/", demo.admin_addr)), "{tour}");
    // One line each starts with `proxy` and `admin`, as scripts reading the tour expect.
    assert_eq!(tour.lines().filter(|l| l.trim_start().starts_with("admin ")).count(), 1, "{tour}");
    assert_eq!(tour.lines().filter(|l| l.trim_start().starts_with("proxy ")).count(), 1, "{tour}");
    assert_eq!(get(&demo.admin_url("/")).await.status, StatusCode::OK);
    let ctl_line = tour
        .lines()
        .find(|l| {
            l.contains("ctl --admin")
                && l.ends_with(
                    " legacy-percent 100     # new studies to v1 again (add --force while the ramp runs)",
                )
        })
        .expect("the tour's legacy-percent command");
    let args: Vec<&str> = ctl_line.split('#').next().unwrap().split_whitespace().skip(1).collect();
    for wanted in ["sessions --limit 5", "session 3", "end-session 3", "drain --wait --timeout 2m"] {
        assert!(tour.contains(wanted), "{wanted:?} is not in the tour:\n{tour}");
    }
    let out = support::binary().args(&args).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("0.0% -> 100.0%"));

    demo.signal(libc::SIGINT);
    assert_eq!(demo.exit_status(Duration::from_secs(10)).await.code(), Some(0));
}

/// Under systemd: `READY=1` once serving and `STOPPING=1` at a graceful stop, on
/// `$NOTIFY_SOCKET` (`Type=notify`); the admin token from the `admin-token` credential in
/// `$CREDENTIALS_DIRECTORY` (`LoadCredential=`), with no token file in the config.
#[tokio::test]
async fn systemd_hears_ready_and_stopping_and_the_token_comes_from_a_credential() {
    let (v1, v2) = (Upstream::new("v1-a").spawn().await, Upstream::new("v2-a").spawn().await);
    let dir = tempfile::tempdir().unwrap();
    let file = support::write_config(dir.path(), &ConfigBuilder::one_each(v1, v2));
    let credentials = dir.path().join("credentials");
    std::fs::create_dir(&credentials).unwrap();
    std::fs::write(credentials.join("admin-token"), "from-a-credential\n").unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).unwrap();
    socket.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let binary = support::binary().get_program().to_owned();
    let script = format!(
        "NOTIFY_SOCKET={} CREDENTIALS_DIRECTORY={} exec {} run --config {file}",
        socket_path.display(),
        credentials.display(),
        binary.to_str().unwrap()
    );
    let mut proxy = ProxyProcess::start_shell(&script).await;
    let receive = move || {
        let mut buffer = [0u8; 256];
        let n = socket.recv(&mut buffer).expect("a notification");
        (String::from_utf8_lossy(&buffer[..n]).into_owned(), socket)
    };
    let (ready, socket) = tokio::task::spawn_blocking(receive).await.unwrap();
    assert_eq!(ready.trim(), "READY=1");
    assert_eq!(get(&proxy.admin_url("/readyz")).await.status, StatusCode::OK, "ready when systemd hears it");

    let set = support::admin_call(
        "PUT",
        &proxy.admin_url("/routes/legacy"),
        Some("from-a-credential"),
        None,
        Some(r#"{"v1_percent": 10}"#),
    )
    .await;
    assert_eq!(set.status, StatusCode::OK, "{set:?}");

    proxy.signal(libc::SIGTERM);
    let receive = move || {
        let mut buffer = [0u8; 256];
        let n = socket.recv(&mut buffer).expect("a notification");
        String::from_utf8_lossy(&buffer[..n]).into_owned()
    };
    let stopping = tokio::task::spawn_blocking(receive).await.unwrap();
    assert_eq!(stopping.trim(), "STOPPING=1");
    assert_eq!(proxy.exit_status(Duration::from_secs(10)).await.code(), Some(0));
}

/// Shell completions and the manual page come from the command line's own definitions, so they
/// name every command; a reader that stops early is not an error.
#[test]
fn completions_and_the_manual_page_name_every_command() {
    for shell in ["bash", "zsh", "fish"] {
        let out = support::binary().args(["completions", shell]).output().unwrap();
        assert!(out.status.success(), "{shell}: {}", String::from_utf8_lossy(&out.stderr));
        let script = String::from_utf8(out.stdout).unwrap();
        for word in ["run", "check", "ctl", "demo", "legacy-percent", "log-format"] {
            assert!(script.contains(word), "{shell} completions lack {word}");
        }
    }
    let out = support::binary().arg("man").output().unwrap();
    let page = String::from_utf8(out.stdout).unwrap();
    assert!(page.contains(".TH rollout-proxy 1"), "{page}");
    assert!(page.contains("completions") && page.contains("ctl"), "{page}");

    let mut child = support::binary()
        .args(["completions", "bash"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take()); // the reader is gone before anything is written
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}
