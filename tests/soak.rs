//! A bounded soak: 20 seconds of mixed traffic through the binary while v1 upstreams are killed
//! and restarted in turn. Expects zero failed requests and a flat memory figure.

mod support;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use support::{ConfigBuilder, Ejection, Health, Pool, ProxyProcess, Upstream, UpstreamSettings};

const SOAK: Duration = Duration::from_secs(20);

fn resident_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test]
async fn twenty_seconds_of_mixed_traffic_with_upstream_kills() {
    let mut v1 = [Upstream::new("v1-a").spawn_killable().await, Upstream::new("v1-b").spawn_killable().await];
    let v2 = Upstream::new("v2-a").spawn().await;
    let dir = tempfile::tempdir().unwrap();
    let config = ConfigBuilder::new()
        .v1("v1-a", v1[0].addr, 1)
        .v1("v1-b", v1[1].addr, 1)
        .v2("v2-a", v2, 1)
        .legacy_v1_percent(50.0)
        .upstream_settings(UpstreamSettings {
            retries: Some(2),
            connect_timeout: Some(Duration::from_millis(500)),
            ..UpstreamSettings::default()
        })
        .health(Pool::V1, Health::fast())
        .ejection(Pool::V1, Ejection::after(3, Duration::from_secs(1)));
    let file = support::write_config(dir.path(), &config);
    let proxy = ProxyProcess::start(&["run", "--config", &file]).await;
    let pid = proxy.pid();

    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut workers = Vec::new();
    for worker in 0..6usize {
        let (stop, sent, failures, base) = (stop.clone(), sent.clone(), failures.clone(), proxy.url(""));
        workers.push(tokio::spawn(async move {
            let client = support::http1_client();
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let (method, path) = match (worker + i) % 5 {
                    0 => (Method::GET, format!("/api/studies/soak-{}/contents", i % 500)),
                    1 => (Method::GET, format!("/api/progress?studyId=soak-{}", i % 500)),
                    2 => (Method::GET, "/api/members/me".to_owned()),
                    3 => (Method::GET, format!("/api/v2/studies/{i}")),
                    _ => (Method::GET, format!("/__big/{}", 64 * 1024)),
                };
                let req = Request::builder()
                    .method(method)
                    .uri(format!("{base}{path}"))
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                let outcome = match client.request(req).await {
                    Ok(response) if response.status() == StatusCode::OK => {
                        response.into_body().collect().await.map(|_| ()).map_err(|e| format!("body: {e}"))
                    }
                    Ok(response) => Err(format!(
                        "HTTP {} {:?}",
                        response.status(),
                        response.headers().get("x-rollout-error")
                    )),
                    Err(err) => Err(format!("{err:?}")),
                };
                if let Err(problem) = outcome {
                    failures.lock().unwrap().push(format!("{path}: {problem}"));
                }
                sent.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
        }));
    }

    // Kill and restart each v1 upstream in turn while the load runs; sample memory meanwhile.
    let started = Instant::now();
    let mut samples = Vec::new();
    let mut turn = 0;
    while started.elapsed() < SOAK {
        // The soak's schedule: 1.5 s of traffic with both upstreams up, then 1.5 s with one down.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        samples.push(resident_kib(pid));
        let victim = &mut v1[turn % 2];
        victim.kill();
        // The outage.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        victim.restart().await;
        turn += 1;
    }
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        worker.await.unwrap();
    }

    let sent = sent.load(Ordering::Relaxed);
    let failures = failures.lock().unwrap();
    eprintln!(
        "soak: {sent} requests in {:?}, {} failed; resident memory (KiB) over time: {samples:?}",
        started.elapsed(),
        failures.len()
    );
    assert!(sent > 2000, "only {sent} requests");
    assert!(
        failures.is_empty(),
        "{} of {sent} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(10)]
    );
    // Flat memory: after the warm-up, resident memory stays within 20 % (and 16 MiB) of where it was.
    let warm = samples[1];
    let last = *samples.last().unwrap();
    assert!(
        last <= warm + (warm / 5).max(16 * 1024),
        "memory grew from {warm} KiB to {last} KiB: {samples:?}"
    );
}
