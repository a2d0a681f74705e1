//! Client misbehaviour and resource pressure: slow request heads, running out of descriptors.

mod support;

use std::time::{Duration, Instant};

use http::StatusCode;
use support::{config_yaml, get, spawn_proxy, ProxyProcess, Upstream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn a_trickled_request_head_is_cut_off_while_others_are_served() {
    let v1 = Upstream::new("v1-a").spawn().await;
    let v2 = Upstream::new("v2-a").spawn().await;
    let proxy = spawn_proxy(&config_yaml(
        &[("v1-a", v1, 1)],
        &[("v2-a", v2, 1)],
        "client: { header_read_timeout: 500ms }\n",
    ))
    .await;

    let mut slow = TcpStream::connect(proxy.addr).await.unwrap();
    slow.write_all(b"GET /api/studies/1 HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let started = Instant::now();
    let mut closed = false;
    for i in 0..40 {
        // One header line every 100 ms: never a complete head.
        if slow.write_all(format!("X-Trickle-{i}: y\r\n").as_bytes()).await.is_err() {
            closed = true;
            break;
        }
        assert_eq!(
            get(&proxy.url("/api/studies/2")).await.status,
            StatusCode::OK,
            "others are served meanwhile"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if !closed {
        let mut buf = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(2), slow.read_to_end(&mut buf)).await;
        closed = matches!(read, Ok(Ok(_)) | Ok(Err(_)));
    }
    assert!(closed, "the slow connection was not closed");
    assert!(started.elapsed() < Duration::from_secs(4), "closed after {:?}", started.elapsed());
    proxy.shutdown().await;
}

#[tokio::test]
async fn running_out_of_descriptors_does_not_stop_the_accept_loop() {
    let v1 = Upstream::new("v1-a").spawn().await;
    let v2 = Upstream::new("v2-a").spawn().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("rollout.yaml");
    std::fs::write(
        &file,
        config_yaml(
            &[("v1-a", v1, 1)],
            &[("v2-a", v2, 1)],
            &format!("workers: 1\nstate_dir: {}\n", dir.path().join("state").display()),
        ),
    )
    .unwrap();
    let command = format!(
        "ulimit -n 48 && exec {} run --config {}",
        env!("CARGO_BIN_EXE_rollout-proxy"),
        file.display()
    );
    let proxy = ProxyProcess::start_shell(&command).await;

    // Hold more connections than the process has descriptors for.
    let mut held = Vec::new();
    for _ in 0..80 {
        held.push(TcpStream::connect(proxy.addr).await.unwrap());
    }
    for _ in 0..100 {
        if proxy.stderr.lock().unwrap().contains("accept failed") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(proxy.stderr.lock().unwrap().contains("accept failed"), "descriptors never ran out");
    drop(held);

    // Once descriptors are free again, the same process serves.
    let mut status = None;
    for _ in 0..50 {
        if let Ok(Ok(reply)) =
            tokio::time::timeout(Duration::from_secs(1), get_checked(&proxy.url("/api/studies/1"))).await
        {
            status = Some(reply);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status, Some(StatusCode::OK));
}

async fn get_checked(url: &str) -> Result<StatusCode, ()> {
    let url = url.to_owned();
    tokio::spawn(async move { get(&url).await.status }).await.map_err(|_| ())
}
