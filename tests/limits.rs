//! Client misbehaviour and resource pressure: slow request heads, running out of descriptors.

mod support;

use std::time::{Duration, Instant};

use http::StatusCode;
use support::{
    eventually, eventually_some, get, try_get, ClientSettings, ConfigBuilder, ProxyBuilder, ProxyProcess,
    Upstream,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn a_trickled_request_head_is_cut_off_while_others_are_served() {
    let v1 = Upstream::new("v1-a").spawn().await;
    let v2 = Upstream::new("v2-a").spawn().await;
    let client =
        ClientSettings { header_read_timeout: Some(Duration::from_millis(500)), ..ClientSettings::default() };
    let proxy = ProxyBuilder::new(&ConfigBuilder::one_each(v1, v2).client(client)).spawn().await;

    let mut slow = TcpStream::connect(proxy.addr).await.unwrap();
    slow.write_all(b"GET /api/studies/1 HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let started = Instant::now();
    let mut closed = false;
    for i in 0..40 {
        // One header line every 100 ms (the slow client under test): never a complete head.
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
    let text = String::from_utf8(get(&proxy.admin_url("/metrics")).await.body.to_vec()).unwrap();
    let counted = support::metric(&text, "rollout_client_rejected_total", &[("reason", "header_timeout")]);
    assert!(counted.unwrap_or(0.0) >= 1.0, "the cut-off connection was not counted");
    proxy.shutdown().await;
}

#[tokio::test]
async fn running_out_of_descriptors_does_not_stop_the_accept_loop() {
    let v1 = Upstream::new("v1-a").spawn().await;
    let v2 = Upstream::new("v2-a").spawn().await;
    let dir = tempfile::tempdir().unwrap();
    let file = support::write_config(dir.path(), &ConfigBuilder::one_each(v1, v2).workers(1));
    let command =
        format!("ulimit -n 48 && exec {} run --config {}", env!("CARGO_BIN_EXE_rollout-proxy"), file);
    let proxy = ProxyProcess::start_shell(&command).await;

    // Hold more connections than the process has descriptors for.
    let mut held = Vec::new();
    for _ in 0..80 {
        held.push(TcpStream::connect(proxy.addr).await.unwrap());
    }
    eventually(Duration::from_secs(5), "descriptors run out", || async {
        proxy.stderr.lock().unwrap().contains("accept failed")
    })
    .await;
    drop(held);

    // Once descriptors are free again, the same process serves.
    let url = proxy.url("/api/studies/1");
    let status = eventually_some(Duration::from_secs(20), "the proxy answers again", || async {
        let answered = tokio::time::timeout(Duration::from_secs(1), try_get(&url)).await;
        answered.ok().flatten().map(|reply| reply.status)
    })
    .await;
    assert_eq!(status, StatusCode::OK);
}

/// Sends one GET on `stream` and reads the answer's head; returns the status line.
async fn exchange(stream: &mut TcpStream) -> String {
    stream.write_all(b"GET /api/members/me HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await.unwrap().unwrap();
    String::from_utf8_lossy(&buf[..n]).lines().next().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn connections_over_the_limit_get_503_and_an_idle_keep_alive_is_closed() {
    let v1 = Upstream::new("v1-a").spawn().await;
    let v2 = Upstream::new("v2-a").spawn().await;
    let client = ClientSettings {
        max_connections: Some(3),
        header_read_timeout: Some(Duration::from_secs(1)),
        // The connection over the limit sends nothing: it is to be answered at once, not after
        // the kernel has held it back for a second.
        defer_accept: Some(false),
        ..ClientSettings::default()
    };
    let proxy = ProxyBuilder::new(&ConfigBuilder::one_each(v1, v2).client(client)).spawn().await;

    let mut held = Vec::new();
    for _ in 0..3 {
        let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
        assert_eq!(exchange(&mut stream).await, "HTTP/1.1 200 OK");
        held.push(stream);
    }
    let mut extra_conn = TcpStream::connect(proxy.addr).await.unwrap();
    let mut answer = String::new();
    extra_conn.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 503 Service Unavailable"), "{answer}");
    assert!(answer.contains("x-rollout-error: too_many_connections"), "{answer}");
    let text = String::from_utf8(get(&proxy.admin_url("/metrics")).await.body.to_vec()).unwrap();
    assert_eq!(
        support::metric(&text, "rollout_client_rejected_total", &[("reason", "max_connections")]),
        Some(1.0)
    );

    // An idle keep-alive connection is closed once it has waited header_read_timeout for a
    // next request, which frees its slot.
    let started = Instant::now();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), held[0].read_to_end(&mut rest)).await;
    assert!(matches!(read, Ok(Ok(0))), "idle connection still open: {read:?}");
    assert!(started.elapsed() < Duration::from_secs(3));
    drop(held);
    eventually(Duration::from_secs(5), "the closed connections' slots come free", || async {
        get(&proxy.url("/api/members/me")).await.status == StatusCode::OK
    })
    .await;
    proxy.shutdown().await;
}

/// `client.defer_accept` is Linux's `TCP_DEFER_ACCEPT`; elsewhere it does nothing.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn a_connection_that_has_sent_nothing_takes_no_place_under_the_limit() {
    let v1 = Upstream::new("v1-a").spawn().await;
    let v2 = Upstream::new("v2-a").spawn().await;
    let limited = |defer_accept| ClientSettings {
        max_connections: Some(1),
        header_read_timeout: Some(Duration::from_secs(1)),
        defer_accept,
        ..ClientSettings::default()
    };
    let config = ConfigBuilder::one_each(v1, v2).client(limited(None));
    let proxy = ProxyBuilder::new(&config).spawn().await;

    // By default the kernel holds a connection back until it sends something: the one place
    // goes to the client that asks.
    let mut silent = TcpStream::connect(proxy.addr).await.unwrap();
    let mut speaking = TcpStream::connect(proxy.addr).await.unwrap();
    assert_eq!(exchange(&mut speaking).await, "HTTP/1.1 200 OK");
    drop(speaking);
    // The silent one is handed over after about a second, and closed once it has been silent
    // for header_read_timeout.
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), silent.read_to_end(&mut rest)).await;
    assert!(matches!(read, Ok(Ok(0))), "silent connection still open: {read:?}");
    proxy.shutdown().await;

    // Without it, the silent connection takes the place at once.
    let config = ConfigBuilder::one_each(v1, v2).client(limited(Some(false)));
    let proxy = ProxyBuilder::new(&config).spawn().await;
    let _silent = TcpStream::connect(proxy.addr).await.unwrap();
    let mut speaking = TcpStream::connect(proxy.addr).await.unwrap();
    assert_eq!(exchange(&mut speaking).await, "HTTP/1.1 503 Service Unavailable");
    proxy.shutdown().await;
}
