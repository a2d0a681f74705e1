//! The binary killed without warning keeps every pin and never advances the drain clock; a second
//! process on the same state directory is refused.

mod support;

use std::path::Path;
use std::time::Duration;

use support::{
    get, metric, pools_of, ConfigBuilder, ProxyBuilder, ProxyProcess, Sessions, StoppedClock, Upstream,
};

fn write_config(
    dir: &std::path::Path,
    v1: std::net::SocketAddr,
    v2: std::net::SocketAddr,
) -> std::path::PathBuf {
    support::write_config(dir, &ConfigBuilder::one_each(v1, v2).legacy_v1_percent(50.0)).into()
}

async fn last_v1_request_ms(proxy: &ProxyProcess) -> u64 {
    let body: serde_json::Value =
        serde_json::from_slice(&get(&proxy.admin_url("/drain")).await.body).unwrap();
    let at = humantime::parse_rfc3339(body["last_v1_request_at"].as_str().unwrap()).unwrap();
    at.duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

#[tokio::test]
async fn sigkill_loses_no_pin_and_does_not_advance_the_drain_clock() {
    let v1 = Upstream::new("v1-a").spawn().await;
    let v2 = Upstream::new("v2-a").spawn().await;
    let dir = tempfile::tempdir().unwrap();
    let file = write_config(dir.path(), v1, v2);
    let args = ["run", "--config", file.to_str().unwrap()];

    let proxy = ProxyProcess::start(&args).await;
    let urls = |p: &ProxyProcess, form: &str| -> Vec<String> {
        (0..300).map(|id| p.url(&form.replace("{id}", &id.to_string()))).collect()
    };
    let started = pools_of(urls(&proxy, "/api/studies/{id}/contents")).await;
    assert!(started.iter().any(|p| p == "v1") && started.iter().any(|p| p == "v2"));
    let last_v1 = started.iter().rposition(|p| p == "v1").unwrap();
    pools_of(vec![proxy.url(&format!("/api/studies/{last_v1}"))]).await;
    let before = last_v1_request_ms(&proxy).await;
    // A brand-new study, and the kill the moment its answer is in: its pin must already be on
    // disk, and no background flush has run since the v1 request above.
    let newcomer = pools_of(vec![proxy.url("/api/studies/newcomer")]).await;
    proxy.signal(libc::SIGKILL);
    let mut proxy = proxy;
    assert_eq!(proxy.exit_status(Duration::from_secs(5)).await.code(), None, "killed by a signal");
    drop(proxy);

    let proxy = ProxyProcess::start(&args).await;
    assert_eq!(
        pools_of(urls(&proxy, "/api/studies/{id}/contents")).await,
        started,
        "every pin kept its pool"
    );
    assert_eq!(pools_of(urls(&proxy, "/api/progress?studyId={id}")).await, started);
    assert_eq!(pools_of(vec![proxy.url("/api/studies/newcomer/contents")]).await, newcomer);
    let after = last_v1_request_ms(&proxy).await;
    assert!(after >= before, "drain clock moved back by {} ms", before - after);
    let text = String::from_utf8(get(&proxy.admin_url("/metrics")).await.body.to_vec()).unwrap();
    let active = |pool| metric(&text, "rollout_sessions_active", &[("pool", pool)]).unwrap();
    assert_eq!(active("v1") + active("v2"), 301.0);
}

#[tokio::test]
async fn a_second_process_on_the_same_state_dir_is_refused() {
    let v1 = Upstream::new("v1-a").spawn().await;
    let v2 = Upstream::new("v2-a").spawn().await;
    let dir = tempfile::tempdir().unwrap();
    let file = write_config(dir.path(), v1, v2);
    let first = ProxyProcess::start(&["run", "--config", file.to_str().unwrap()]).await;
    pools_of(vec![first.url("/api/studies/1")]).await;

    let second = support::binary().args(["run", "--config", file.to_str().unwrap()]).output().unwrap();
    assert_eq!(second.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(stderr.contains("is in use by another rollout-proxy process"), "{stderr}");

    // The first one is unharmed.
    assert_eq!(get(&first.url("/api/studies/1")).await.status, http::StatusCode::OK);
}

/// Writes `config` with the legacy split at `percent` into `dir`, its state in `state`; returns
/// the file's path.
fn config_with(dir: &Path, state: &Path, config: ConfigBuilder, percent: f64) -> String {
    let file = dir.join(format!("rollout-{percent}.yaml"));
    std::fs::write(&file, config.legacy_v1_percent(percent).state_dir(state).render()).unwrap();
    file.to_str().unwrap().to_owned()
}

fn unix_now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

#[tokio::test]
async fn the_first_v1_request_after_a_quiet_spell_survives_an_immediate_kill() {
    let v1 = Upstream::new("v1-a").spawn().await;
    let v2 = Upstream::new("v2-a").spawn().await;
    let (dir, state) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let file = config_with(dir.path(), state.path(), ConfigBuilder::one_each(v1, v2), 100.0);

    // A first run, its clock 3.5 s ago (longer ago than the 2 s read-back slack), stores the
    // drain clock and stops: v1 has been quiet since.
    let first = ProxyBuilder::from_file(Path::new(&file))
        .clock(&StoppedClock::in_the_past(Duration::from_millis(3500)))
        .state_dir(state)
        .spawn()
        .await;
    let _state = first.shutdown().await; // the directory lives on for the runs below

    let second = ProxyProcess::start(&["run", "--config", &file]).await;
    let sent_at = unix_now_ms();
    assert_eq!(get(&second.url("/api/members/me")).await.header("x-rollout-pool"), Some("v1"));
    second.signal(libc::SIGKILL);
    drop(second);

    let third = ProxyProcess::start(&["run", "--config", &file]).await;
    let after = last_v1_request_ms(&third).await;
    assert!(
        after + 1000 >= sent_at,
        "the drain clock went back {} ms: a crash made v1 look quieter",
        sent_at - after
    );
}

#[tokio::test]
async fn a_pin_touched_just_before_a_kill_keeps_its_idle_time() {
    let v1 = Upstream::new("v1-a").spawn().await;
    let v2 = Upstream::new("v2-a").spawn().await;
    let (dir, state) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let idle = ConfigBuilder::one_each(v1, v2)
        .sessions(Sessions { idle_timeout: Some(Duration::from_secs(5)), ..Sessions::default() });
    let all_v1 = config_with(dir.path(), state.path(), idle.clone(), 100.0);
    let all_v2 = config_with(dir.path(), state.path(), idle, 0.0);

    // The study's first request, 3.2 s ago by the first run's clock, which then stops cleanly.
    let first = ProxyBuilder::from_file(Path::new(&all_v1))
        .clock(&StoppedClock::in_the_past(Duration::from_millis(3200)))
        .state_dir(state)
        .spawn()
        .await;
    assert_eq!(pools_of(vec![first.url("/api/studies/77")]).await, ["v1"]);
    let state = first.shutdown().await;

    // The study comes back now, and the proxy dies right after answering.
    let second = ProxyProcess::start(&["run", "--config", &all_v1]).await;
    assert_eq!(pools_of(vec![second.url("/api/studies/77")]).await, ["v1"]);
    second.signal(libc::SIGKILL);
    drop(second);

    // 4.5 s on by the next run's clock: eight seconds after the study's first request (past what
    // the first run stored, plus the read-back slack, plus the idle timeout), but under five
    // seconds after its last one. The pin must still hold, even though new studies now go to v2.
    let third = ProxyBuilder::from_file(Path::new(&all_v2))
        .clock(&StoppedClock::in_the_future(Duration::from_millis(4500)))
        .state_dir(state)
        .spawn()
        .await;
    assert_eq!(
        pools_of(vec![third.url("/api/studies/77")]).await,
        ["v1"],
        "the pin ended early after a crash"
    );
    assert_eq!(pools_of(vec![third.url("/api/studies/new")]).await, ["v2"]);
    third.shutdown().await;
}
