//! `rollout-proxy ctl` end to end against a running proxy.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use support::{pools_of, ConfigBuilder, ProxyBuilder, ProxyHandle, Upstream};

const TOKEN: &str = "ctl-test-token";

/// A proxy with one upstream per pool, the admin token in `dir/token`, loaded from
/// `dir/rollout.yaml` (so `ctl reload` works), its config adjusted by `adjust`.
async fn proxy(dir: &Path, adjust: impl FnOnce(ConfigBuilder) -> ConfigBuilder) -> ProxyHandle {
    let v1 = Upstream::new("v1-a").spawn().await;
    let v2 = Upstream::new("v2-a").spawn().await;
    std::fs::write(dir.join("token"), TOKEN).unwrap();
    let config = adjust(ConfigBuilder::one_each(v1, v2).admin_token_file(&dir.join("token")));
    std::fs::write(dir.join("rollout.yaml"), config.render()).unwrap();
    ProxyBuilder::from_file(&dir.join("rollout.yaml")).spawn().await
}

/// Runs `ctl` with `args` against `proxy`; returns (exit code, stdout, stderr).
async fn ctl(proxy: &ProxyHandle, token_file: Option<&Path>, args: &[&str]) -> (i32, String, String) {
    ctl_at(proxy.admin_addr, token_file, args).await
}

/// Runs `ctl` with `args` against the admin API at `admin`.
async fn ctl_at(admin: SocketAddr, token_file: Option<&Path>, args: &[&str]) -> (i32, String, String) {
    let mut command = support::binary();
    command.args(["ctl", "--admin", &format!("http://{admin}")]);
    if let Some(file) = token_file {
        command.arg("--token-file").arg(file);
    }
    command.args(args).env_remove("ROLLOUT_ADMIN_TOKEN");
    let out = tokio::task::spawn_blocking(move || command.output().unwrap()).await.unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[tokio::test]
async fn every_command_works_against_a_running_proxy() {
    let dir = tempfile::tempdir().unwrap();
    let proxy = proxy(dir.path(), |c| c).await;
    let token = dir.path().join("token");
    let token = Some(token.as_path());

    let (code, out, err) = ctl(&proxy, None, &["status"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("legacy traffic to v1: 100.0% (config; file says 100.0%)"), "{out}");
    assert!(out.contains("v1    v1-a"), "{out}");

    let (code, out, err) = ctl(&proxy, token, &["legacy-percent", "30"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("legacy traffic to v1: 100.0% -> 30.0% (revision 1)"), "{out}");

    let (code, out, err) = ctl(&proxy, token, &["weight", "v1/v1-a", "4"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("v1/v1-a weight: 1 -> 4 (revision 2)"), "{out}");

    pools_of((0..10).map(|i| proxy.url(&format!("/api/studies/s{i}"))).collect()).await;
    let (code, out, err) = ctl(&proxy, token, &["sessions", "--limit", "3"]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().filter(|l| l.starts_with('s')).count(), 3, "{out}");
    assert!(out.contains("live pins: v1"), "{out}");
    // Key order, and the command for the next page.
    assert!(out.lines().filter(|l| l.starts_with('s')).map(|l| &l[..2]).eq(["s0", "s1", "s2"]), "{out}");
    assert!(out.contains("more: ctl sessions --after s2"), "{out}");
    let (code, out, err) = ctl(&proxy, token, &["sessions", "--limit", "3", "--after", "s2"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.lines().filter(|l| l.starts_with('s')).map(|l| &l[..2]).eq(["s3", "s4", "s5"]), "{out}");
    let (code, out, err) = ctl(&proxy, token, &["session", "s7"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("session s7: on v") && out.contains("sessions.idle_timeout ends it"), "{out}");
    // A key is sent whole: `s7?x` is no session, and s7 is untouched.
    let (code, _, err) = ctl(&proxy, token, &["end-session", "s7?x"]).await;
    assert_eq!(code, 1, "{err}");
    assert_eq!(ctl(&proxy, token, &["session", "s7"]).await.0, 0, "s7 still has its pin");
    let (code, _, err) = ctl(&proxy, token, &["session", "nobody"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("no live session \"nobody\" (HTTP 404"), "{err}");

    let (code, out, _) = ctl(&proxy, token, &["--json", "status"]).await;
    assert_eq!(code, 0);
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(status["routes"]["legacy_v1_percent"], 30.0);
    assert_eq!(status["pools"]["v1"]["upstreams"][0]["weight"], 4);

    let (code, out, _) = ctl(&proxy, token, &["end-session", "s3"]).await;
    assert_eq!(code, 0);
    assert!(out.contains("session s3 on"), "{out}");

    let (code, out, err) = ctl(&proxy, token, &["reload"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("config reloaded (revision 3)"), "{out}");

    let (code, _, err) = ctl(&proxy, token, &["--if-match", "1", "legacy-percent", "0"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("revision 1 is stale; the current revision is 3 (HTTP 412"), "{err}");

    let (code, out, _) = ctl(&proxy, token, &["reset-overrides"]).await;
    assert_eq!(code, 0);
    assert!(out.contains("overrides dropped"), "{out}");
    proxy.shutdown().await;
}

#[tokio::test]
async fn ramp_commands_start_show_and_steer_a_ramp() {
    let dir = tempfile::tempdir().unwrap();
    let proxy = proxy(dir.path(), |c| c).await;
    let token = dir.path().join("token");
    let token = Some(token.as_path());
    let (code, out, _) = ctl(&proxy, None, &["ramp", "status"]).await;
    assert_eq!(code, 0);
    assert!(out.contains("no ramp has been started"), "{out}");

    // The plan as a config file's section, in YAML.
    let plan = dir.path().join("plan.yaml");
    std::fs::write(&plan, "ramp:\n  steps:\n    - { v1_percent: 90, hold: 1h }\n    - { v1_percent: 0 }\n")
        .unwrap();
    let (code, out, err) = ctl(&proxy, token, &["ramp", "start", plan.to_str().unwrap()]).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("ramp: progressing, step 1 of 2: v1 gets 90.0% of new sessions; 1h left in the hold"),
        "{out}"
    );

    // Setting the percentage by hand during a ramp: refused, unless forced, which pauses it.
    let (code, _, err) = ctl(&proxy, token, &["legacy-percent", "50"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("add ?force=true") && err.contains("(HTTP 409"), "{err}");
    let (code, _, err) = ctl(&proxy, token, &["legacy-percent", "--force", "50"]).await;
    assert_eq!(code, 0, "{err}");
    let (_, out, _) = ctl(&proxy, None, &["ramp", "status"]).await;
    assert!(out.contains("ramp: paused (by operator), step 1 of 2"), "{out}");

    let (code, out, err) = ctl(&proxy, token, &["ramp", "abort"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("ramp: aborted, step 1 of 2: v1 gets 100.0% of new sessions"), "{out}");
    let (code, out, _) = ctl(&proxy, None, &["ramp", "status", "--watch", "--interval", "1s"]).await;
    assert_eq!(code, 4, "watching an aborted ramp: {out}");

    // A plan with a mistake: the server's message, naming the field.
    std::fs::write(&plan, "steps: []\n").unwrap();
    let (code, _, err) = ctl(&proxy, token, &["ramp", "start", plan.to_str().unwrap()]).await;
    assert_eq!(code, 1);
    assert!(err.contains("ramp.steps: a ramp needs at least one step (HTTP 400"), "{err}");
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_bad_token_or_bad_input_exits_non_zero_with_the_servers_message() {
    let dir = tempfile::tempdir().unwrap();
    let proxy = proxy(dir.path(), |c| c).await;
    std::fs::write(dir.path().join("wrong"), "not-the-token").unwrap();
    let (code, _, err) = ctl(&proxy, Some(&dir.path().join("wrong")), &["legacy-percent", "10"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("missing or wrong bearer token; the token given is not the proxy's"), "{err}");

    let token = dir.path().join("token");
    let (code, _, err) = ctl(&proxy, Some(&token), &["legacy-percent", "150"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("v1_percent: 150 is not a percentage between 0 and 100 (HTTP 400"), "{err}");
    let (code, _, err) = ctl(&proxy, Some(&token), &["weight", "v1/nobody", "1"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("pool v1 has no upstream named \"nobody\" (HTTP 404"), "{err}");
    let (code, _, err) = ctl(&proxy, Some(&token), &["weight", "v1-a", "1"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("is not POOL/UPSTREAM"), "{err}");
    proxy.shutdown().await;

    // An address where nothing listens.
    let (gone, _reserved) = support::refused_addr();
    let (code, _, err) = ctl_at(gone, Some(&token), &["status"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("cannot reach the admin API"), "{err}");
}

#[tokio::test]
async fn drain_wait_returns_when_the_signal_turns_on() {
    let dir = tempfile::tempdir().unwrap();
    // Legacy traffic all to v2, and a 2-second quiet window counted from the start.
    let proxy = proxy(dir.path(), |c| c.legacy_v1_percent(0.0).quiet_window(Duration::from_secs(2))).await;
    let (code, out, _) = ctl(&proxy, None, &["drain"]).await;
    assert_eq!(code, 3, "not drained yet: {out}");
    assert!(out.starts_with("not drained"), "{out}");

    let started = Instant::now();
    let (code, out, err) =
        ctl(&proxy, None, &["drain", "--wait", "--interval", "200ms", "--timeout", "30s"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(started.elapsed() < Duration::from_secs(20));
    // Not a terminal: a plain progress line per poll, then the verdict.
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines.last().unwrap().starts_with("drained"), "{out}");
    assert!(
        lines.len() >= 2
            && lines[..lines.len() - 1].iter().all(|l| l.starts_with("waiting: 0 live v1 pins; quiet ")),
        "{out}"
    );
    assert!(lines[0].contains(" / 2s (") && lines[0].contains("%); ETA 20"), "{out}");
    let (code, _, err) = ctl(&proxy, None, &["drain", "--wait", "--interval", "0s"]).await;
    assert_eq!(code, 2, "a zero interval is refused: {err}");
    assert!(err.contains("must be longer than 0s"), "{err}");

    // Timing out while not drained exits 3.
    pools_of(vec![proxy.url("/api/v2/x")]).await;
    let busy = proxy_with_v1_traffic(&proxy).await;
    let (code, _, _) =
        ctl(&proxy, None, &["drain", "--wait", "--interval", "100ms", "--timeout", "300ms"]).await;
    assert_eq!(code, 3, "v1 traffic {busy} ms ago");
    proxy.shutdown().await;
}

/// Sends a v1 request (by pinning a study to v1 through the admin API's percentage) and returns
/// how long ago it was, in milliseconds.
async fn proxy_with_v1_traffic(proxy: &ProxyHandle) -> u128 {
    let token = std::env::temp_dir().join(format!("ctl-token-{}", std::process::id()));
    std::fs::write(&token, TOKEN).unwrap();
    let (code, _, err) = ctl(proxy, Some(&token), &["legacy-percent", "100"]).await;
    assert_eq!(code, 0, "{err}");
    let at = Instant::now();
    assert_eq!(pools_of(vec![proxy.url("/api/members/me")]).await, ["v1"]);
    let _ = std::fs::remove_file(token);
    at.elapsed().as_millis()
}

/// `--config` takes the admin URL and token file from the proxy's config; without a token a
/// change is refused with how to pass one; a URL that is neither http nor https is named.
#[tokio::test]
async fn ctl_finds_the_proxy_and_its_token_through_the_config_and_says_how_to_pass_a_token() {
    let dir = tempfile::tempdir().unwrap();
    // A fixed admin port, so the config file names where the proxy listens.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let admin = format!("127.0.0.1:{port}");
    let proxy = proxy(dir.path(), |c| c.admin_listen(&admin)).await;
    let run = |args: Vec<String>| async move {
        let mut command = support::binary();
        command.arg("ctl").args(args).env_remove("ROLLOUT_ADMIN_TOKEN").env_remove("ROLLOUT_ADMIN_URL");
        let out = tokio::task::spawn_blocking(move || command.output().unwrap()).await.unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8(out.stdout).unwrap(),
            String::from_utf8(out.stderr).unwrap(),
        )
    };
    let config = dir.path().join("rollout.yaml").to_str().unwrap().to_owned();
    let (code, out, err) =
        run(vec!["--config".into(), config.clone(), "legacy-percent".into(), "40".into()]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("100.0% -> 40.0%"), "{out}");

    let (code, _, err) = ctl(&proxy, None, &["legacy-percent", "30"]).await;
    assert_ne!(code, 0);
    assert!(
        err.contains("(HTTP 401 Unauthorized)")
            && err.contains("pass the admin token with --token-file FILE"),
        "{err}"
    );

    let (code, _, err) = run(vec!["--admin".into(), format!("ftp://{admin}"), "status".into()]).await;
    assert_ne!(code, 0);
    assert!(err.contains("is not an admin URL like http://127.0.0.1:9901 or https://"), "{err}");
}

/// `status --watch` shows the status again every interval: on a pipe, one block after
/// another, each headed by the time.
#[tokio::test]
async fn status_watch_shows_the_status_again_every_interval() {
    let dir = tempfile::tempdir().unwrap();
    let proxy = proxy(dir.path(), |c| c).await;
    let mut command = support::binary();
    command
        .args([
            "ctl",
            "--admin",
            &format!("http://{}", proxy.admin_addr),
            "status",
            "--watch",
            "--interval",
            "200ms",
        ])
        .stdout(std::process::Stdio::piped());
    let mut child = command.spawn().unwrap();
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    child.kill().unwrap();
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap()).await.unwrap();
    let out = String::from_utf8(out.stdout).unwrap();
    let blocks = out.lines().filter(|l| l.starts_with("--- ")).count();
    assert!(blocks >= 3, "{blocks} blocks:\n{out}");
    assert_eq!(out.matches("legacy traffic to v1").count(), blocks, "{out}");
    proxy.shutdown().await;
}
