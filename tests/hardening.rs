//! The request path against hostile clients and upstreams: one test per defect an audit found
//! (response splitting, clients ejecting upstreams, idle and amplified HTTP/2, stale framing
//! headers, slow readers, bad Host, underscore look-alikes, invalid response heads, the admin
//! listener's limits and JSON), and the rules where the two internal paths had drifted apart
//! (retries with a body, `Connection` tokens, `#fragment`). Clients and upstreams are raw
//! sockets or real HTTP stacks, never the proxy's own code.

mod support;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::{
    eventually, get, metric, raw_upstream, try_get, ClientSettings, ConfigBuilder, Ejection, Pool,
    ProxyBuilder, Upstream, UpstreamSettings,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Makes the proxy hand the connection to its hyper path: a `Connection` header naming another
/// field is left to hyper, and so is every later request on that connection.
const TO_HYPER: &str = "GET /prime HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, x-h\r\nX-H: 1\r\n\r\n";

/// Reads one request head (and a Content-Length body) from `stream`; its request line.
async fn read_request(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<String> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end + 4]).into_owned();
            let length = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_owned())
                })
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(0);
            if buf.len() >= end + 4 + length {
                buf.drain(..end + 4 + length);
                return Some(head.lines().next().unwrap_or_default().to_owned());
            }
        }
        let mut chunk = [0u8; 4096];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// A clean answer naming the request's target.
fn clean(line: &str) -> String {
    let target = line.split(' ').nth(1).unwrap_or_default();
    let body = format!("clean {target}");
    format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}", body.len())
}

/// An upstream that answers requests for `/first` with `bytes` (then `later`, 300 ms on, on the
/// same socket) and every other request cleanly.
async fn scripted_upstream(bytes: &'static str, later: &'static str) -> SocketAddr {
    scripted_upstream_counted(bytes, later).await.0
}

/// Like [`scripted_upstream`], also counting the times it has written `later`.
async fn scripted_upstream_counted(
    bytes: &'static str,
    later: &'static str,
) -> (SocketAddr, Arc<AtomicUsize>) {
    let written_later = Arc::new(AtomicUsize::new(0));
    let counter = written_later.clone();
    let (addr, _) = raw_upstream(move |mut s| {
        let counter = counter.clone();
        async move {
            let mut buf = Vec::new();
            while let Some(line) = read_request(&mut s, &mut buf).await {
                if line.contains(" /first") {
                    let _ = s.write_all(bytes.as_bytes()).await;
                    // The late bytes are the misbehaviour under test: a response nobody asked for.
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    let _ = s.write_all(later.as_bytes()).await;
                    counter.fetch_add(1, Ordering::SeqCst);
                } else if s.write_all(clean(&line).as_bytes()).await.is_err() {
                    return;
                }
            }
        }
    })
    .await;
    (addr, written_later)
}

/// A proxy whose v1 pool is the one upstream at `v1`, its config adjusted by `adjust`.
async fn proxy_to(
    v1: SocketAddr,
    adjust: impl FnOnce(ConfigBuilder) -> ConfigBuilder,
) -> support::ProxyHandle {
    let v2 = Upstream::new("v2-a").spawn().await;
    ProxyBuilder::new(&adjust(ConfigBuilder::one_each(v1, v2))).spawn().await
}

fn with_client(client: ClientSettings) -> impl FnOnce(ConfigBuilder) -> ConfigBuilder {
    move |config| config.client(client)
}

fn with_upstream(settings: UpstreamSettings) -> impl FnOnce(ConfigBuilder) -> ConfigBuilder {
    move |config| config.upstream_settings(settings)
}

/// Writes `bytes` and reads until `done` says the text is complete, the peer closes, or 3 s
/// pass; returns the text and whether the peer closed.
async fn exchange(stream: &mut TcpStream, bytes: &str, done: impl Fn(&str) -> bool) -> (String, bool) {
    stream.write_all(bytes.as_bytes()).await.unwrap();
    let mut text = Vec::new();
    let mut chunk = [0u8; 8192];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    loop {
        if done(&String::from_utf8_lossy(&text)) {
            return (String::from_utf8_lossy(&text).into_owned(), false);
        }
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (String::from_utf8_lossy(&text).into_owned(), true),
            Ok(Ok(n)) => text.extend_from_slice(&chunk[..n]),
            Err(_) => return (String::from_utf8_lossy(&text).into_owned(), false),
        }
    }
}

/// One request on a fresh connection (after `prefix`, whose answer is read and dropped first);
/// the full answer text once the connection closes or 3 s pass.
async fn one_request(proxy: SocketAddr, prefix: Option<&str>, request: &str) -> String {
    let mut stream = TcpStream::connect(proxy).await.unwrap();
    if let Some(prefix) = prefix {
        let (text, _) =
            exchange(&mut stream, prefix, |t| t.contains("\r\n\r\n") && t.contains("clean")).await;
        assert!(text.starts_with("HTTP/1.1 200"), "priming request failed: {text}");
    }
    exchange(&mut stream, request, |_| false).await.0
}

async fn metrics_text(proxy: &support::ProxyHandle) -> String {
    String::from_utf8(get(&proxy.admin_url("/metrics")).await.body.to_vec()).unwrap()
}

// 1. Response splitting through chunk extensions and trailers on the fast path.
#[tokio::test]
async fn a_bare_lf_in_chunk_framing_cannot_split_a_response() {
    const INJECTED: &str = "HTTP/1.1 200 OK\r\nX-Injected: 1\r\nContent-Length: 13\r\n\r\ninjected body";
    for framing in ["0;\n\r\n", "0\r\nX: a\n\r\n", "5;a\nb\r\nhello\r\n0\r\n\r\n"] {
        let head = format!("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{framing}");
        let (v1, injected) = scripted_upstream_counted(Box::leak(head.into_boxed_str()), INJECTED).await;
        let proxy = proxy_to(v1, |c| c).await;
        let mut client = TcpStream::connect(proxy.addr).await.unwrap();
        let (first, closed) =
            exchange(&mut client, "GET /first HTTP/1.1\r\nHost: a\r\n\r\n", |t| t.contains("\r\n\r\n")).await;
        assert!(first.starts_with("HTTP/1.1 502 "), "{framing:?}: {first}");
        assert!(first.contains("x-rollout-error: upstream_invalid"), "{framing:?}: {first}");
        eventually(Duration::from_secs(5), "the upstream sends its injected response", || async {
            injected.load(Ordering::SeqCst) == 1
        })
        .await;
        // Reusing the client connection, as curl would: never the injected response.
        let mut rest = String::new();
        if !closed {
            rest = exchange(&mut client, "GET /second HTTP/1.1\r\nHost: a\r\n\r\n", |t| {
                t.ends_with("clean /second")
            })
            .await
            .0;
        }
        assert!(!first.contains("X-Injected") && !rest.contains("X-Injected"), "{framing:?}: {first}{rest}");
        assert!(rest.is_empty() || rest.ends_with("clean /second"), "{framing:?}: {rest}");
        proxy.shutdown().await;
    }
}

// 2. A client's broken or aborted upload is the client's error, not the upstream's.
#[tokio::test]
async fn a_clients_broken_upload_ejects_no_upstream() {
    let a = Upstream::new("v1-a").spawn().await;
    let b = Upstream::new("v1-b").spawn().await;
    let v2 = Upstream::new("v2-a").spawn().await;
    let config = ConfigBuilder::new()
        .v1("v1-a", a, 1)
        .v1("v1-b", b, 1)
        .v2("v2-a", v2, 1)
        .ejection(Pool::V1, Ejection::after(3, Duration::from_secs(30)));
    let proxy = ProxyBuilder::new(&config).spawn().await;
    // Every request here ends in a 400 the proxy answers itself (to a client that may be gone).
    let refused = || async {
        let text = metrics_text(&proxy).await;
        let answered_4xx = text.lines().filter(|l| l.starts_with("rollout_requests_total{"));
        answered_4xx.filter(|l| l.contains("code_class=\"4xx\"")).map(value_of).sum::<f64>()
    };
    for _ in 0..8 {
        let answer = one_request(
            proxy.addr,
            None,
            "POST /api/members HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n",
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
        assert!(answer.contains("x-rollout-error: bad_request"), "{answer}");
    }
    // Clients that go away in the middle of a large upload.
    for aborted in 1..=8 {
        let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
        stream
            .write_all(b"POST /api/members HTTP/1.1\r\nHost: a\r\nContent-Length: 100000\r\n\r\n0123456789")
            .await
            .unwrap();
        drop(stream);
        eventually(Duration::from_secs(5), "the proxy gives up on the aborted upload", || async {
            refused().await == f64::from(8 + aborted)
        })
        .await;
    }
    let status = get(&proxy.admin_url("/status")).await.json();
    for upstream in status["pools"]["v1"]["upstreams"].as_array().unwrap() {
        assert_eq!(upstream["healthy"], true, "{upstream}");
    }
    let counts = support::count_upstreams(&proxy.url("/api/members/me"), 8).await;
    assert_eq!(counts.get("v1-a"), Some(&4), "{counts:?}");
    assert_eq!(counts.get("v1-b"), Some(&4), "{counts:?}");
    proxy.shutdown().await;
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// An empty SETTINGS frame: length 0, type 4, no flags, stream 0.
const EMPTY_SETTINGS: &[u8] = &[0, 0, 0, 4, 0, 0, 0, 0, 0];

// 3. An HTTP/2 connection that goes quiet is closed, and frees its slot.
#[tokio::test]
async fn silent_http2_connections_are_closed_and_free_their_slots() {
    let v1 = Upstream::new("v1-a").spawn().await;
    let proxy = proxy_to(
        v1,
        with_client(ClientSettings {
            max_connections: Some(4),
            header_read_timeout: Some(Duration::from_millis(300)),
            ..ClientSettings::default()
        }),
    )
    .await;
    let mut silent = Vec::new();
    for _ in 0..4 {
        let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
        stream.write_all(H2_PREFACE).await.unwrap();
        stream.write_all(EMPTY_SETTINGS).await.unwrap();
        silent.push(stream);
    }
    for mut stream in silent {
        let mut sink = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(3), stream.read_to_end(&mut sink)).await;
        assert!(
            matches!(read, Ok(Ok(_)) | Ok(Err(_))),
            "a silent HTTP/2 connection was still open after 3 s"
        );
    }
    eventually(Duration::from_secs(5), "the closed connections' slots come free", || async {
        try_get(&proxy.url("/api/members/me")).await.is_some_and(|r| r.status == StatusCode::OK)
    })
    .await;
    proxy.shutdown().await;
}

#[tokio::test]
async fn an_http2_connection_idle_after_a_request_is_closed() {
    let v1 = Upstream::new("v1-a").spawn().await;
    let proxy = proxy_to(
        v1,
        with_client(ClientSettings {
            header_read_timeout: Some(Duration::from_millis(300)),
            ..ClientSettings::default()
        }),
    )
    .await;
    let stream = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await.unwrap();
    let connection = tokio::spawn(connection);
    let req = Request::get(proxy.url("/api/members/me")).body(Full::<Bytes>::default()).unwrap();
    let response = sender.send_request(req).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    response.into_body().collect().await.unwrap();
    // The client answers PINGs (hyper does), so only the idle limit can end the connection.
    let started = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(5), connection).await;
    assert!(ended.is_ok(), "an idle HTTP/2 connection stayed open");
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "closed before it was idle: {:?}",
        started.elapsed()
    );
}

/// An HTTP/1.1 upstream (hyper's server) that answers after `delay`, counting the connections
/// it accepted and the most it had open at once.
async fn counting_upstream(delay: Duration) -> (SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (accepted, peak) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let open = Arc::new(AtomicUsize::new(0));
    let (counter, most) = (accepted.clone(), peak.clone());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            let now = open.fetch_add(1, Ordering::SeqCst) + 1;
            most.fetch_max(now, Ordering::SeqCst);
            let open = open.clone();
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| async move {
                        let _ = req.into_body().collect().await;
                        // A slow upstream, so that requests overlap.
                        tokio::time::sleep(delay).await;
                        Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from_static(b"slow"))))
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
                open.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    (addr, accepted, peak)
}

// 4a. One HTTP/2 connection cannot open an upstream connection per stream without bound.
#[tokio::test]
async fn http2_streams_per_connection_are_capped() {
    let (v1, _, peak) = counting_upstream(Duration::from_millis(400)).await;
    let proxy = proxy_to(
        v1,
        with_client(ClientSettings { max_concurrent_streams: Some(8), ..ClientSettings::default() }),
    )
    .await;
    let stream = TcpStream::connect(proxy.addr).await.unwrap();
    let (sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await.unwrap();
    tokio::spawn(connection);
    let mut requests = Vec::new();
    for i in 0..40 {
        let mut sender = sender.clone();
        let url = proxy.url(&format!("/api/members/{i}"));
        requests.push(tokio::spawn(async move {
            let req = Request::get(url).body(Full::<Bytes>::default()).unwrap();
            sender.send_request(req).await.map(|r| r.status())
        }));
    }
    for request in requests {
        // Streams past the limit wait on the client side (or are refused): none may get through.
        if let Ok(status) = request.await.unwrap() {
            assert_eq!(status, StatusCode::OK);
        }
    }
    let peak = peak.load(Ordering::SeqCst);
    assert!(peak <= 8, "{peak} upstream connections open at once for one client connection");
    proxy.shutdown().await;
}

// 4b. Connections per upstream are capped; requests past the cap wait, then get 503.
#[tokio::test]
async fn connections_per_upstream_are_capped() {
    let (v1, accepted, peak) = counting_upstream(Duration::from_millis(200)).await;
    let proxy = proxy_to(
        v1,
        with_upstream(UpstreamSettings {
            max_connections_per_upstream: Some(3),
            connect_timeout: Some(Duration::from_secs(5)),
            ..UpstreamSettings::default()
        }),
    )
    .await;
    let client = support::http1_client();
    let mut requests = Vec::new();
    for i in 0..12 {
        let req = Request::get(proxy.url(&format!("/api/members/{i}"))).body(Full::default()).unwrap();
        let client = client.clone();
        requests.push(tokio::spawn(async move { support::send(&client, req).await.status }));
    }
    for request in requests {
        assert_eq!(request.await.unwrap(), StatusCode::OK, "a request past the cap waited and was served");
    }
    assert!(peak.load(Ordering::SeqCst) <= 3, "peak {} > 3", peak.load(Ordering::SeqCst));
    assert!(accepted.load(Ordering::SeqCst) <= 3);
    proxy.shutdown().await;

    let (v1, accepted, _) = counting_upstream(Duration::from_millis(1500)).await;
    let one_connection = UpstreamSettings {
        max_connections_per_upstream: Some(1),
        connect_timeout: Some(Duration::from_millis(200)),
        retries: Some(0),
        ..UpstreamSettings::default()
    };
    let proxy = proxy_to(v1, with_upstream(one_connection)).await;
    let url = proxy.url("/api/members/1");
    let first = tokio::spawn(async move { get(&url).await });
    eventually(Duration::from_secs(5), "the first request holds the one connection", || async {
        accepted.load(Ordering::SeqCst) == 1
    })
    .await;
    let second = get(&proxy.url("/api/members/2")).await;
    assert_eq!(second.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(second.header("x-rollout-error"), Some("upstream_busy"));
    assert_eq!(first.await.unwrap().status, StatusCode::OK);
    let status = get(&proxy.admin_url("/status")).await.json();
    assert_eq!(status["pools"]["v1"]["upstreams"][0]["healthy"], true, "the cap ejects nobody");
    proxy.shutdown().await;
}

// 5. With Transfer-Encoding, an upstream's Content-Length is dropped (hyper path).
#[tokio::test]
async fn a_content_length_next_to_transfer_encoding_is_dropped_on_both_paths() {
    let v1 = scripted_upstream(
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        "",
    )
    .await;
    let proxy = proxy_to(v1, |c| c).await;
    for prefix in [None, Some(TO_HYPER)] {
        let answer =
            one_request(proxy.addr, prefix, "GET /first HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
                .await;
        let (head, body) = answer.split_once("\r\n\r\n").unwrap();
        assert!(!head.to_ascii_lowercase().contains("content-length"), "{prefix:?}: {answer}");
        assert!(head.to_ascii_lowercase().contains("transfer-encoding: chunked"), "{prefix:?}: {answer}");
        assert_eq!(body, "5\r\nhello\r\n0\r\n\r\n", "{prefix:?}");
    }
    // An HTTP/2 client gets the whole body too.
    let reply = support::send(
        &support::h2c_client(),
        Request::get(proxy.url("/first")).body(Full::default()).unwrap(),
    )
    .await;
    assert_eq!(reply.body, "hello");
    assert!(reply.header("content-length").is_none());
    proxy.shutdown().await;
}

/// A client socket with a small receive buffer that never reads: the proxy's writes stall.
async fn not_reading(proxy: SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(proxy).await.unwrap()
}

// 6. A client that stops reading is cut off after client.send_timeout, on both paths.
#[tokio::test]
async fn a_client_that_stops_reading_is_cut_off_after_send_timeout() {
    let v1 = Upstream::new("v1-a").spawn().await;
    let proxy = proxy_to(
        v1,
        with_client(ClientSettings {
            send_timeout: Some(Duration::from_millis(400)),
            ..ClientSettings::default()
        }),
    )
    .await;
    const BIG: usize = 64 * 1024 * 1024;
    for prefix in [None, Some(TO_HYPER)] {
        let mut stream = not_reading(proxy.addr).await;
        if let Some(prefix) = prefix {
            let (text, _) = exchange(&mut stream, prefix, is_whole_response).await;
            assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        }
        let cut_off_before = send_timeouts(&proxy).await;
        stream.write_all(format!("GET /__big/{BIG} HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes()).await.unwrap();
        eventually(Duration::from_secs(10), "the proxy gives up on the client", || async {
            send_timeouts(&proxy).await > cut_off_before
        })
        .await;
        // Now read everything: the connection must end well short of the whole body.
        let mut total = 0;
        let mut buf = vec![0u8; 1 << 20];
        let ended = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => total += n,
                }
            }
        })
        .await;
        assert!(ended.is_ok(), "{prefix:?}: the connection was still open");
        assert!(total < BIG, "{prefix:?}: the whole body arrived");
    }
    assert_eq!(send_timeouts(&proxy).await, 2.0);
    proxy.shutdown().await;
}

/// The value of one line of Prometheus text.
fn value_of(line: &str) -> f64 {
    line.rsplit_once(' ').and_then(|(_, v)| v.parse().ok()).unwrap_or_else(|| panic!("not a sample: {line}"))
}

/// `rollout_client_rejected_total{reason="send_timeout"}`.
async fn send_timeouts(proxy: &support::ProxyHandle) -> f64 {
    let text = metrics_text(proxy).await;
    metric(&text, "rollout_client_rejected_total", &[("reason", "send_timeout")]).expect("the series exists")
}

/// Whether `text` holds a whole response head and as much body as its `Content-Length` says.
fn is_whole_response(text: &str) -> bool {
    let Some((head, body)) = text.split_once("\r\n\r\n") else { return false };
    let length = head.lines().find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.eq_ignore_ascii_case("content-length").then(|| value.trim().parse::<usize>().ok())?
    });
    length.is_some_and(|length| body.len() >= length)
}

#[tokio::test]
async fn an_http2_stream_whose_client_does_not_read_is_cut_off() {
    let v1 = Upstream::new("v1-a").spawn().await;
    let proxy = proxy_to(
        v1,
        with_client(ClientSettings {
            send_timeout: Some(Duration::from_millis(400)),
            ..ClientSettings::default()
        }),
    )
    .await;
    let stream = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await.unwrap();
    tokio::spawn(connection);
    let req = Request::get(proxy.url("/__big/67108864")).body(Full::<Bytes>::default()).unwrap();
    let response = sender.send_request(req).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    // Flow control stops the proxy once the client's window is full; nobody reads.
    eventually(Duration::from_secs(10), "the proxy gives up on the stream", || async {
        send_timeouts(&proxy).await == 1.0
    })
    .await;
    let read = tokio::time::timeout(Duration::from_secs(10), response.into_body().collect()).await;
    assert!(matches!(read, Ok(Err(_))), "the stalled stream was not cut off");
    assert_eq!(send_timeouts(&proxy).await, 1.0);
    proxy.shutdown().await;
}

// 7. Exactly one valid Host, on both paths; the target's authority wins.
#[tokio::test]
async fn a_missing_repeated_or_invalid_host_is_refused_on_both_paths() {
    let v1 = Upstream::new("v1-a").spawn().await;
    let proxy = proxy_to(v1, |c| c).await;
    for (name, host_lines) in [
        ("path in host", "Host: evil.example/x?y@z\r\n"),
        ("space in host", "Host: a b\r\n"),
        ("two hosts", "Host: a\r\nHost: b\r\n"),
        ("no host", ""),
        ("empty host", "Host: \r\n"),
        ("userinfo", "Host: user@a\r\n"),
    ] {
        let request = format!("GET /api/members/me HTTP/1.1\r\n{host_lines}\r\n");
        for prefix in [None, Some(TO_HYPER)] {
            let answer = one_request(proxy.addr, prefix, &request).await;
            assert!(answer.starts_with("HTTP/1.1 400 "), "{name} {prefix:?}: {answer}");
            assert!(answer.contains("x-rollout-error: bad_request"), "{name} {prefix:?}: {answer}");
        }
    }
    // Absolute form: the target's authority becomes the Host.
    let answer = one_request(
        proxy.addr,
        None,
        "GET http://b.example/api/members/me HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    let echo: support::Echo = serde_json::from_str(answer.split_once("\r\n\r\n").unwrap().1).unwrap();
    assert_eq!(echo.headers["host"], ["b.example"]);
    assert_eq!(echo.headers["x-forwarded-host"], ["b.example"]);
    assert_eq!(echo.path, "/api/members/me");
    proxy.shutdown().await;
}

// 8. Header names with '_' are dropped unless allowed.
#[tokio::test]
async fn underscore_look_alikes_never_reach_the_upstream() {
    let request = "GET /api/members/me HTTP/1.1\r\nHost: a\r\nX_Forwarded_For: 6.6.6.6\r\nX_Forwarded_Proto: https\r\n\
                   Content_Length: 5\r\nTransfer_Encoding: chunked\r\nX-Kept: yes\r\nConnection: close\r\n\r\n";
    for allowed in [false, true] {
        let v1 = Upstream::new("v1-a").spawn().await;
        // The default, then the setting turned on.
        let client = ClientSettings {
            allow_underscores_in_headers: allowed.then_some(true),
            ..ClientSettings::default()
        };
        let proxy = proxy_to(v1, with_client(client)).await;
        for prefix in [None, Some(TO_HYPER)] {
            let answer = one_request(proxy.addr, prefix, request).await;
            let echo: support::Echo = serde_json::from_str(answer.split_once("\r\n\r\n").unwrap().1).unwrap();
            let underscored: Vec<&String> = echo.headers.keys().filter(|k| k.contains('_')).collect();
            assert_eq!(underscored.len(), if allowed { 4 } else { 0 }, "{prefix:?}: {:?}", echo.headers);
            assert_eq!(echo.headers["x-kept"], ["yes"]);
            assert_eq!(echo.headers["x-forwarded-for"], ["127.0.0.1"]);
        }
        proxy.shutdown().await;
    }
}

// 9. Invalid response heads are refused, duplicate lengths merged (fast path).
#[tokio::test]
async fn invalid_response_heads_are_refused_and_repeated_lengths_merged() {
    let v1 =
        scripted_upstream("HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok", "").await;
    let proxy = proxy_to(v1, |c| c).await;
    let answer =
        one_request(proxy.addr, None, "GET /first HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").await;
    assert_eq!(answer.to_ascii_lowercase().matches("content-length").count(), 1, "{answer}");
    assert!(answer.ends_with("\r\n\r\nok"), "{answer}");
    proxy.shutdown().await;
    for head in
        ["HTTP/1.1 000 Zero\r\nContent-Length: 0\r\n\r\n", "HTTP/1.1 600 Six\r\nContent-Length: 0\r\n\r\n"]
    {
        let v1 = scripted_upstream(head, "").await;
        let proxy = proxy_to(v1, |c| c).await;
        for prefix in [None, Some(TO_HYPER)] {
            let answer = one_request(proxy.addr, prefix, "GET /first HTTP/1.1\r\nHost: a\r\n\r\n").await;
            assert!(answer.starts_with("HTTP/1.1 502 "), "{head:?} {prefix:?}: {answer}");
            assert!(answer.contains("x-rollout-error: upstream_invalid"), "{head:?} {prefix:?}: {answer}");
        }
        proxy.shutdown().await;
    }
}

// 10. The admin listener has its own header timeout and connection cap.
#[tokio::test]
async fn the_admin_listener_bounds_half_sent_heads_and_connections() {
    let v1 = Upstream::new("v1-a").spawn().await;
    let proxy = proxy_to(v1, |c| c).await;
    let mut half = Vec::new();
    for _ in 0..64 {
        let mut stream = TcpStream::connect(proxy.admin_addr).await.unwrap();
        stream.write_all(b"GET /status HTTP/1.1\r\nHost: a\r\n").await.unwrap();
        half.push(stream);
    }
    // Connections are accepted in the order they were made: this one comes after all 64.
    let mut over = TcpStream::connect(proxy.admin_addr).await.unwrap();
    let mut answer = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), over.read_to_string(&mut answer)).await;
    assert!(answer.starts_with("HTTP/1.1 503 "), "the 65th admin connection: {answer:?}");
    // The half-sent heads are closed once the admin header timeout passes.
    let started = Instant::now();
    for mut stream in half {
        let mut sink = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(8), stream.read_to_end(&mut sink)).await;
        assert!(read.is_ok(), "a half-sent admin head was open after {:?}", started.elapsed());
    }
    assert_eq!(get(&proxy.admin_url("/healthz")).await.status, StatusCode::OK);
    proxy.shutdown().await;
}

// 11. Admin JSON bodies are one document, nothing after it.
#[tokio::test]
async fn admin_json_with_trailing_bytes_is_refused_and_changes_nothing() {
    let v1 = Upstream::new("v1-a").spawn().await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "secret\n").unwrap();
    let v2 = Upstream::new("v2-a").spawn().await;
    let config = ConfigBuilder::one_each(v1, v2).admin_token_file(&token_file);
    let proxy = ProxyBuilder::new(&config).spawn().await;
    for body in [r#"{"v1_percent": 7}xyz"#, r#"{"v1_percent": 7}{"v1_percent": 8}"#, r#"{"v1_percent": 7} x"#]
    {
        let url = proxy.admin_url("/routes/legacy");
        let reply = support::admin_call("PUT", &url, Some("secret"), None, Some(body)).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{body}: {reply:?}");
        assert!(reply.json()["error"].as_str().unwrap().contains("JSON"), "{reply:?}");
    }
    let status = get(&proxy.admin_url("/status")).await.json();
    assert_eq!(status["routes"]["legacy_v1_percent"], 100.0, "{status}");
    let url = proxy.admin_url("/routes/legacy");
    let reply = support::admin_call("PUT", &url, Some("secret"), None, Some("{\"v1_percent\": 7}\n")).await;
    assert_eq!(reply.status, StatusCode::OK, "trailing whitespace is fine: {reply:?}");
    proxy.shutdown().await;
}

// Drift: a request with a body that reached an upstream is not sent again, on either path.
#[tokio::test]
async fn an_idempotent_request_with_a_body_is_not_sent_twice() {
    // v1-a reads the request and closes without answering; v1-b counts what reaches it.
    let (a, _) = raw_upstream(|mut s| async move {
        let mut buf = Vec::new();
        let _ = read_request(&mut s, &mut buf).await;
    })
    .await;
    let b_seen = Arc::new(AtomicUsize::new(0));
    let seen = b_seen.clone();
    let (b, _) = raw_upstream(move |mut s| {
        let seen = seen.clone();
        async move {
            let mut buf = Vec::new();
            while let Some(line) = read_request(&mut s, &mut buf).await {
                if line.starts_with("PUT") {
                    seen.fetch_add(1, Ordering::SeqCst);
                }
                let _ = s.write_all(clean(&line).as_bytes()).await;
            }
        }
    })
    .await;
    let v2 = Upstream::new("v2-a").spawn().await;
    let config = ConfigBuilder::new().v1("v1-a", a, 1).v1("v1-b", b, 1).v2("v2-a", v2, 1);
    let proxy = ProxyBuilder::new(&config).spawn().await;
    let put =
        "PUT /api/members/me HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello";
    let get_req = "GET /api/members/me HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n";
    let mut outcomes = Vec::new();
    for _ in 0..4 {
        outcomes.push(one_request(proxy.addr, None, put).await.lines().next().unwrap_or_default().to_owned());
    }
    // Round-robin sends two of the four PUTs to v1-a first: those fail, and are not resent.
    assert_eq!(outcomes.iter().filter(|o| o.starts_with("HTTP/1.1 502")).count(), 2, "{outcomes:?}");
    assert_eq!(b_seen.load(Ordering::SeqCst), 2, "v1-b took only its own two PUTs");
    // A GET without a body may be sent again: all succeed.
    for _ in 0..4 {
        let answer = one_request(proxy.addr, None, get_req).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }
    proxy.shutdown().await;
}

// Drift: every field a response's Connection names stays behind, however many it names.
#[tokio::test]
async fn a_field_named_ninth_in_connection_is_not_forwarded() {
    let v1 = scripted_upstream(
        "HTTP/1.1 200 OK\r\nConnection: a, b, c, d, e, f, g, h, x-ninth\r\nX-Ninth: secret\r\nContent-Length: 2\r\n\r\nok",
        "",
    )
    .await;
    let proxy = proxy_to(v1, |c| c).await;
    for prefix in [None, Some(TO_HYPER)] {
        let answer =
            one_request(proxy.addr, prefix, "GET /first HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
                .await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(!answer.to_ascii_lowercase().contains("x-ninth"), "{prefix:?}: {answer}");
    }
    proxy.shutdown().await;
}

// Drift: a #fragment is never forwarded and never part of the session key, on either path.
#[tokio::test]
async fn a_fragment_is_cut_off_before_routing_on_both_paths() {
    let v1 = Upstream::new("v1-a").spawn().await;
    let proxy = proxy_to(v1, |c| c).await;
    for (i, prefix) in [None, Some(TO_HYPER)].into_iter().enumerate() {
        let request =
            format!("GET /api/studies/frag{i}#part HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
        let answer = one_request(proxy.addr, prefix, &request).await;
        let echo: support::Echo = serde_json::from_str(answer.split_once("\r\n\r\n").unwrap().1).unwrap();
        assert_eq!(echo.path, format!("/api/studies/frag{i}"), "{prefix:?}");
    }
    let text = metrics_text(&proxy).await;
    assert_eq!(metric(&text, "rollout_session_keys_rejected_total", &[("reason", "invalid")]), Some(0.0));
    assert_eq!(metric(&text, "rollout_sessions_started_total", &[("pool", "v1")]), Some(2.0));
    proxy.shutdown().await;
}

// A client that stalls while sending its body is the client's error on both paths: 408, and
// the upstream is not blamed.
#[tokio::test]
async fn a_body_that_stops_arriving_is_408_on_both_paths() {
    let v1 = Upstream::new("v1-a").spawn().await;
    let proxy = proxy_to(
        v1,
        with_upstream(UpstreamSettings {
            response_timeout: Some(Duration::from_millis(300)),
            ..UpstreamSettings::default()
        }),
    )
    .await;
    for (path, request) in [
        ("fast", "POST /api/members HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n01234"),
        (
            "hyper",
            "POST /api/members HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n01234\r\n",
        ),
    ] {
        let answer = one_request(proxy.addr, None, request).await;
        assert!(answer.starts_with("HTTP/1.1 408 "), "{path}: {answer}");
        assert!(answer.contains("x-rollout-error: client_timeout"), "{path}: {answer}");
    }
    let text = metrics_text(&proxy).await;
    assert_eq!(
        metric(
            &text,
            "rollout_upstream_errors_total",
            &[("pool", "v1"), ("upstream", "v1-a"), ("kind", "timeout")]
        ),
        Some(0.0),
        "the upstream was blamed"
    );
    proxy.shutdown().await;
}

/// A client socket whose first write stops after 12 bytes for 100 ms: the HTTP/2 preface
/// arrives in two pieces.
struct SplitFirstWrite {
    inner: TcpStream,
    pause: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    written: usize,
}

impl tokio::io::AsyncRead for SplitFirstWrite {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for SplitFirstWrite {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if self.written == 0 {
            let n = buf.len().min(12);
            let polled = std::pin::Pin::new(&mut self.inner).poll_write(cx, &buf[..n]);
            if let std::task::Poll::Ready(Ok(n)) = polled {
                self.written = n;
                // The client under test: its preface arrives in two pieces.
                self.pause = Some(Box::pin(tokio::time::sleep(Duration::from_millis(100))));
            }
            return polled;
        }
        if let Some(pause) = self.pause.as_mut() {
            std::task::ready!(pause.as_mut().poll(cx));
            self.pause = None;
        }
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

// The HTTP/2 preface sent in pieces still makes the connection known as HTTP/2, and so bounded
// when idle, even for a client that answers every PING.
#[tokio::test]
async fn an_http2_preface_sent_in_pieces_is_still_bounded() {
    let v1 = Upstream::new("v1-a").spawn().await;
    let proxy = proxy_to(
        v1,
        with_client(ClientSettings {
            header_read_timeout: Some(Duration::from_millis(300)),
            ..ClientSettings::default()
        }),
    )
    .await;
    let stream =
        SplitFirstWrite { inner: TcpStream::connect(proxy.addr).await.unwrap(), pause: None, written: 0 };
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await.unwrap();
    let connection = tokio::spawn(connection);
    let req = Request::get(proxy.url("/api/members/me")).body(Full::<Bytes>::default()).unwrap();
    let response = sender.send_request(req).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    response.into_body().collect().await.unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(5), connection).await;
    assert!(ended.is_ok(), "an HTTP/2 connection whose preface came in pieces stayed open when idle");
    proxy.shutdown().await;
}

// A WebSocket tunnel keeps its upstream connection under max_connections_per_upstream.
#[tokio::test]
async fn an_open_tunnel_counts_against_the_upstream_connection_cap() {
    use futures_util::{SinkExt, StreamExt};
    let echo = support::spawn_websocket_echo().await;
    let v1 = Upstream::new("v1-a").spawn().await;
    let one_connection = UpstreamSettings {
        max_connections_per_upstream: Some(1),
        connect_timeout: Some(Duration::from_millis(300)),
        retries: Some(0),
        ..UpstreamSettings::default()
    };
    let config = ConfigBuilder::new().v1("v1-a", v1, 1).v2("ws", echo, 1).upstream_settings(one_connection);
    let proxy = ProxyBuilder::new(&config).spawn().await;
    let url = format!("ws://{}/api/v2/live", proxy.addr);
    let (mut first, _) = tokio_tungstenite::connect_async(url.as_str()).await.unwrap();
    first.send(tokio_tungstenite::tungstenite::Message::text("open")).await.unwrap();
    assert!(first.next().await.unwrap().is_ok(), "the first tunnel carries messages");
    match tokio_tungstenite::connect_async(url.as_str()).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(response.headers()["x-rollout-error"], "upstream_busy");
        }
        other => panic!("a second tunnel got past the cap: {:?}", other.map(|(_, r)| r.status())),
    }
    first.send(tokio_tungstenite::tungstenite::Message::text("still here")).await.unwrap();
    assert!(first.next().await.unwrap().is_ok());
    first.close(None).await.unwrap();
    while let Some(Ok(_)) = first.next().await {}
    drop(first);
    eventually(Duration::from_secs(5), "the closed tunnel's place comes free", || async {
        tokio_tungstenite::connect_async(url.as_str()).await.is_ok()
    })
    .await;
    proxy.shutdown().await;
}
