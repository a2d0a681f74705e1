//! Hitless restart: a second process takes the sockets and the state over under load.

mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use support::{eventually, grows_by, ConfigBuilder, ProxyBuilder, ProxyProcess, Upstream};

#[tokio::test]
async fn a_takeover_under_load_fails_no_request_and_keeps_every_pin() {
    let v1 = Upstream::new("v1-a").spawn().await;
    let v2 = Upstream::new("v2-a").spawn().await;
    let dir = tempfile::tempdir().unwrap();
    let config =
        ConfigBuilder::one_each(v1, v2).legacy_v1_percent(50.0).grace_period(Duration::from_secs(10));
    let file = support::write_config(dir.path(), &config);
    let mut old = ProxyProcess::start(&["run", "--config", &file]).await;
    let base = old.url("");

    let stop = Arc::new(AtomicBool::new(false));
    let (sent, failures) = (Arc::new(AtomicUsize::new(0)), Arc::new(Mutex::new(Vec::new())));
    let retried = Arc::new(AtomicUsize::new(0));
    let pools: Arc<Mutex<HashMap<String, String>>> = Arc::default();
    let mut workers = Vec::new();
    for worker in 0..4 {
        let (stop, sent, failures, pools, base) =
            (stop.clone(), sent.clone(), failures.clone(), pools.clone(), base.clone());
        let retried = retried.clone();
        workers.push(tokio::spawn(async move {
            // Workers 0 and 1 keep their connections alive; 2 and 3 open one per request.
            let keep_alive = worker < 2;
            let shared = support::http1_client();
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let study = format!("s{}", (worker * 1000 + i) % 40);
                let path = if i.is_multiple_of(3) {
                    "/api/members/me".to_owned()
                } else {
                    format!("/api/studies/{study}")
                };
                let mut req = Request::get(format!("{base}{path}")).body(Full::default()).unwrap();
                if !keep_alive {
                    req.headers_mut().insert("connection", "close".parse().unwrap());
                }
                let client = if keep_alive { shared.clone() } else { support::http1_client() };
                let mut result = client.request(req).await;
                // A server may close an idle keep-alive connection just as the client reuses it;
                // HTTP clients retry an idempotent request once in that case (RFC 9112 §9.3.1).
                // Only the keep-alive workers may do so; a fresh connection must never fail.
                if keep_alive && matches!(&result, Err(e) if is_closed_before_response(e)) {
                    retried.fetch_add(1, Ordering::Relaxed);
                    let again = Request::get(format!("{base}{path}")).body(Full::default()).unwrap();
                    result = client.request(again).await;
                }
                match result {
                    Ok(response) if response.status() == StatusCode::OK => {
                        let pool = response.headers()["x-rollout-pool"].to_str().unwrap().to_owned();
                        let _ = response.into_body().collect().await;
                        if path.starts_with("/api/studies/") {
                            let mut pools = pools.lock().unwrap();
                            let first = pools.entry(study.clone()).or_insert_with(|| pool.clone());
                            if *first != pool {
                                failures
                                    .lock()
                                    .unwrap()
                                    .push(format!("study {study} moved from {first} to {pool}"));
                            }
                        }
                    }
                    Ok(response) => {
                        failures.lock().unwrap().push(format!("{path}: HTTP {}", response.status()))
                    }
                    Err(err) => failures
                        .lock()
                        .unwrap()
                        .push(format!("worker {worker} (keep-alive: {keep_alive}) {path}: {err:?}")),
                }
                sent.fetch_add(1, Ordering::Relaxed);
                i += 1;
                // The load's pace: steady traffic, not a flood.
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }

    // Load before the takeover, until every study has its pin.
    grows_by(&sent, 150, "requests are sent").await;
    eventually(Duration::from_secs(20), "every study is pinned", || async {
        pools.lock().unwrap().len() == 40
    })
    .await;
    let before = sent.load(Ordering::Relaxed);
    let new = ProxyProcess::start(&["run", "--config", &file, "--takeover"]).await;
    assert_eq!(new.addr, old.addr, "the new process serves on the same socket");
    let status = old.exit_status(Duration::from_secs(15)).await;
    assert_eq!(status.code(), Some(0), "the old process drained and exited: {}", old.stderr.lock().unwrap());
    // Then load on the new process alone.
    grows_by(&sent, 150, "requests are sent").await;
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        worker.await.unwrap();
    }

    let sent = sent.load(Ordering::Relaxed);
    assert!(before > 100 && sent > before + 100, "too little load: {before} before, {sent} in all");
    let failures = failures.lock().unwrap();
    assert!(
        failures.is_empty(),
        "{} of {sent} requests failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(10)]
    );
    assert_eq!(pools.lock().unwrap().len(), 40);
    eprintln!(
        "{sent} requests, {} keep-alive requests retried once after an idle close",
        retried.load(Ordering::Relaxed)
    );
    drop(new);
}

fn is_closed_before_response(err: &hyper_util::client::legacy::Error) -> bool {
    use std::error::Error as _;
    err.source()
        .and_then(|e| e.downcast_ref::<hyper::Error>())
        .is_some_and(hyper::Error::is_incomplete_message)
}

#[tokio::test]
async fn a_successor_that_dies_before_confirming_leaves_the_old_process_serving() {
    let v1 = Upstream::new("v1-a").spawn().await;
    let v2 = Upstream::new("v2-a").spawn().await;
    let proxy = ProxyBuilder::new(&ConfigBuilder::one_each(v1, v2)).spawn().await;
    for _ in 0..2 {
        // Take the sockets, then vanish without a word, as a crashing successor would.
        let (data, admin) = proxy.take_over_and_vanish().await;
        assert_eq!(data, proxy.addr);
        assert_eq!(admin, proxy.admin_addr);
        // Nothing to wait for: the old process must *not* stop, as it would on a confirmation.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(support::get(&proxy.url("/api/studies/1")).await.status, StatusCode::OK);
        assert_eq!(support::get(&proxy.admin_url("/readyz")).await.status, StatusCode::OK);
    }
    proxy.shutdown().await;
}

/// A ramp half-way through a hold goes on in the successor with what was left of the hold:
/// neither started over nor skipped. (The ramp comes from the config file; the stored one wins
/// over it in the successor.)
#[tokio::test]
async fn a_takeover_mid_hold_keeps_the_ramps_hold() {
    let v1 = Upstream::new("v1-a").spawn().await;
    let v2 = Upstream::new("v2-a").spawn().await;
    let dir = tempfile::tempdir().unwrap();
    let plan = r#"{ "steps": [ { "v1_percent": 90, "hold": "60s" }, { "v1_percent": 0 } ],
                    "analysis": { "interval": "1s", "window": "5s", "inconclusive_timeout": "10m" } }"#;
    let config = ConfigBuilder::one_each(v1, v2).section("ramp", plan);
    let file = support::write_config(dir.path(), &config);
    let mut old = ProxyProcess::start(&["run", "--config", &file]).await;
    let hold_left = |admin: String| async move {
        let ramp = support::get(&admin).await.json();
        assert_eq!(ramp["state"], "progressing", "{ramp}");
        ramp["hold_left_seconds"].as_f64().unwrap()
    };
    eventually(Duration::from_secs(10), "the ramp has held a few seconds", || async {
        support::get(&old.admin_url("/ramp")).await.json()["hold_left_seconds"]
            .as_f64()
            .is_some_and(|s| s <= 56.0)
    })
    .await;
    let before = hold_left(old.admin_url("/ramp")).await;

    let new = ProxyProcess::start(&["run", "--config", &file, "--takeover"]).await;
    let status = old.exit_status(Duration::from_secs(15)).await;
    assert_eq!(status.code(), Some(0), "{}", old.stderr.lock().unwrap());
    let after = hold_left(new.admin_url("/ramp")).await;
    assert!(after <= before, "the hold started over: {before} s left before, {after} s after");
    assert!(after > before - 10.0, "the hold skipped ahead: {before} s left before, {after} s after");
    eventually(Duration::from_secs(5), "the successor goes on holding", || async {
        support::get(&new.admin_url("/ramp")).await.json()["hold_left_seconds"]
            .as_f64()
            .is_some_and(|s| s < after)
    })
    .await;
    drop(new);
}
