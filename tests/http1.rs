//! The HTTP/1.1 fast path, byte by byte: pipelining, every response framing, upstream
//! connection reuse and replacement, and the hand-over to hyper part-way through a connection.
//! Clients and upstreams here are raw sockets so the exact bytes are under the test's control.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use support::{raw_upstream, ClientSettings, ConfigBuilder, ProxyBuilder, Upstream, UpstreamSettings};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads one request head from `stream` (bodies are not used by these upstreams).
async fn read_head(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<String> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end + 4]).into_owned();
            buf.drain(..end + 4);
            return Some(head);
        }
        let mut chunk = [0u8; 4096];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Answers each request on a connection with `answer(request line)`, keeping it open.
async fn answering(mut stream: TcpStream, answer: fn(&str) -> String) {
    let mut buf = Vec::new();
    while let Some(head) = read_head(&mut stream, &mut buf).await {
        let line = head.lines().next().unwrap_or_default().to_owned();
        if stream.write_all(answer(&line).as_bytes()).await.is_err() {
            return;
        }
    }
}

async fn proxy_to(v1: SocketAddr) -> support::ProxyHandle {
    let v2 = Upstream::new("v2-a").spawn().await;
    ProxyBuilder::new(&ConfigBuilder::one_each(v1, v2)).spawn().await
}

/// Reads from `stream` until `done` says the text so far is complete, or the peer closes.
async fn read_until(stream: &mut TcpStream, done: impl Fn(&str) -> bool) -> (String, bool) {
    let mut text = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        if done(&String::from_utf8_lossy(&text)) {
            return (String::from_utf8_lossy(&text).into_owned(), false);
        }
        match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (String::from_utf8_lossy(&text).into_owned(), true),
            Ok(Ok(n)) => text.extend_from_slice(&chunk[..n]),
            Err(_) => panic!("no answer within 5 s; got so far: {:?}", String::from_utf8_lossy(&text)),
        }
    }
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order_on_one_upstream_connection() {
    let (v1, accepted) = raw_upstream(|s| {
        answering(s, |line| {
            let path = line.split(' ').nth(1).unwrap_or_default().to_owned();
            format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{path}", path.len())
        })
    })
    .await;
    let proxy = proxy_to(v1).await;
    let mut client = TcpStream::connect(proxy.addr).await.unwrap();
    client
        .write_all(
            b"GET /one HTTP/1.1\r\nHost: a\r\n\r\nGET /two HTTP/1.1\r\nHost: a\r\n\r\n\
              GET /three HTTP/1.1\r\nHost: a\r\n\r\n",
        )
        .await
        .unwrap();
    let (text, closed) = read_until(&mut client, |t| t.ends_with("/three")).await;
    assert!(!closed);
    let bodies: Vec<&str> =
        text.split("\r\n\r\n").skip(1).map(|part| part.split("HTTP/1.1").next().unwrap()).collect();
    assert_eq!(bodies, ["/one", "/two", "/three"], "{text}");
    assert_eq!(text.matches("x-rollout-pool: v1").count(), 3, "{text}");
    assert_eq!(accepted.load(Ordering::SeqCst), 1, "the upstream connection was reused");
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_chunked_response_is_reframed_and_both_connections_are_reused() {
    let (v1, accepted) = raw_upstream(|s| {
        answering(s, |_| {
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n\
             5\r\nhello\r\n6;ext=x\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n"
                .to_owned()
        })
    })
    .await;
    let proxy = proxy_to(v1).await;
    let mut client = TcpStream::connect(proxy.addr).await.unwrap();
    for _ in 0..3 {
        client.write_all(b"GET /chunks HTTP/1.1\r\nHost: a\r\n\r\n").await.unwrap();
        let (text, closed) = read_until(&mut client, |t| t.ends_with("0\r\n\r\n")).await;
        assert!(!closed);
        assert!(text.contains("transfer-encoding: chunked\r\n"), "{text}");
        assert!(!text.to_ascii_lowercase().contains("connection:"), "hop-by-hop header passed: {text}");
        // The chunks are re-framed by the proxy: data intact, no extension or trailer passed on.
        assert!(text.ends_with("\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"), "{text}");
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_response_without_length_ends_with_the_connection() {
    let (v1, accepted) = raw_upstream(|mut s| async move {
        let mut buf = Vec::new();
        if read_head(&mut s, &mut buf).await.is_some() {
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end").await;
        }
    })
    .await;
    let proxy = proxy_to(v1).await;
    let mut client = TcpStream::connect(proxy.addr).await.unwrap();
    client.write_all(b"GET /eof HTTP/1.1\r\nHost: a\r\n\r\n").await.unwrap();
    let (text, closed) = read_until(&mut client, |_| false).await;
    assert!(closed, "the client connection must end with the body");
    assert!(text.contains("connection: close\r\n"), "{text}");
    assert!(text.ends_with("\r\n\r\nuntil the end"), "{text}");

    // The next client gets a fresh upstream connection.
    let mut client = TcpStream::connect(proxy.addr).await.unwrap();
    client.write_all(b"GET /eof HTTP/1.1\r\nHost: a\r\n\r\n").await.unwrap();
    assert!(read_until(&mut client, |_| false).await.0.ends_with("until the end"));
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
    proxy.shutdown().await;
}

#[tokio::test]
async fn head_and_no_content_responses_carry_no_body_and_keep_the_connection() {
    let (v1, accepted) = raw_upstream(|s| {
        answering(s, |line| {
            if line.starts_with("HEAD") {
                "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n".to_owned()
            } else {
                "HTTP/1.1 204 No Content\r\n\r\n".to_owned()
            }
        })
    })
    .await;
    let proxy = proxy_to(v1).await;
    let mut client = TcpStream::connect(proxy.addr).await.unwrap();
    client.write_all(b"HEAD /h HTTP/1.1\r\nHost: a\r\n\r\n").await.unwrap();
    let (text, _) = read_until(&mut client, |t| t.ends_with("\r\n\r\n")).await;
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n") && text.contains("Content-Length: 5\r\n"), "{text}");
    client.write_all(b"DELETE /d HTTP/1.1\r\nHost: a\r\n\r\n").await.unwrap();
    let (text, closed) = read_until(&mut client, |t| t.ends_with("\r\n\r\n")).await;
    assert!(text.starts_with("HTTP/1.1 204 No Content\r\n"), "{text}");
    assert!(!closed);
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    proxy.shutdown().await;
}

/// Three requests (GET, POST, POST), `pause` apart, on one client connection, to an upstream
/// that answers one request per connection with `answer` and closes the socket `close_after`
/// later whatever it said: each must succeed, on an upstream connection of its own.
async fn each_request_gets_a_live_upstream_connection(
    answer: &'static [u8],
    close_after: Duration,
    pause: Duration,
) {
    let (v1, accepted) = raw_upstream(move |mut s| async move {
        let mut buf = Vec::new();
        if read_head(&mut s, &mut buf).await.is_some() {
            let _ = s.write_all(answer).await;
            // The upstream's own timing: it closes this long after answering, whatever it said.
            tokio::time::sleep(close_after).await;
        }
    })
    .await;
    let proxy = proxy_to(v1).await;
    let mut client = TcpStream::connect(proxy.addr).await.unwrap();
    for method in ["GET", "POST", "POST"] {
        let request = format!("{method} /x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc");
        client.write_all(request.as_bytes()).await.unwrap();
        let (text, closed) = read_until(&mut client, |t| t.ends_with("\r\n\r\nok")).await;
        assert!(text.starts_with("HTTP/1.1 200 OK"), "{method}: {text}");
        assert!(!closed, "the client connection stays open: the upstream's close is its own hop");
        // The client's own timing: an idle spell before its next request (in which, with
        // `pause` longer than `close_after`, the upstream closes while the proxy holds it idle).
        tokio::time::sleep(pause).await;
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 3);
    proxy.shutdown().await;
}

#[tokio::test]
async fn an_upstream_connection_closed_while_idle_is_replaced_even_for_a_post() {
    // Keep-alive by default, but the socket closes after 30 ms; the next request comes 200 ms on.
    let answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
    each_request_gets_a_live_upstream_connection(
        answer,
        Duration::from_millis(30),
        Duration::from_millis(200),
    )
    .await;
}

#[tokio::test]
async fn an_upstream_connection_that_announced_close_is_not_reused_for_a_post() {
    // The socket is still open when the next request comes: only the header says it is done.
    let answer = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok";
    each_request_gets_a_live_upstream_connection(answer, Duration::from_millis(50), Duration::ZERO).await;
}

#[tokio::test]
async fn a_body_sent_after_its_head_arrives_whole_and_close_is_honoured() {
    let v1 = Upstream::new("v1-a").spawn().await;
    let proxy = proxy_to(v1).await;
    let mut client = TcpStream::connect(proxy.addr).await.unwrap();
    client
        .write_all(b"POST /api/studies/4/contents HTTP/1.1\r\nHost: a\r\nConnection: close\r\nContent-Length: 10\r\n\r\n01234")
        .await
        .unwrap();
    // The client's own timing: the rest of the body comes after a pause.
    tokio::time::sleep(Duration::from_millis(100)).await;
    client.write_all(b"56789").await.unwrap();
    let (text, closed) = read_until(&mut client, |_| false).await;
    assert!(closed, "Connection: close was not honoured");
    assert!(text.contains("connection: close\r\n"), "{text}");
    let echo: support::Echo = serde_json::from_str(text.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(echo.body_len, 10);
    assert_eq!(echo.body_sha256, support::sha256(b"0123456789"));
    assert_eq!(echo.method, "POST");
    proxy.shutdown().await;
}

/// The body has one deadline (`response_timeout`) for all of it: a client sending a byte every
/// 150 ms, each within the deadline of the one before, is still cut off with 408, and nothing of
/// its request reaches the upstream.
#[tokio::test]
async fn a_body_trickled_byte_by_byte_is_cut_off_at_one_deadline() {
    let (v1, accepted) =
        raw_upstream(|stream| answering(stream, |_| "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n".into()))
            .await;
    let v2 = Upstream::new("v2-a").spawn().await;
    let config = ConfigBuilder::one_each(v1, v2).upstream_settings(UpstreamSettings {
        response_timeout: Some(Duration::from_millis(500)),
        ..UpstreamSettings::default()
    });
    let proxy = ProxyBuilder::new(&config).spawn().await;
    let mut client = TcpStream::connect(proxy.addr).await.unwrap();
    client
        .write_all(b"POST /api/studies/4/contents HTTP/1.1\r\nHost: a\r\nContent-Length: 20\r\n\r\n")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let mut sent = 0;
    for _ in 0..20 {
        // The slow client under test: one byte every 150 ms.
        tokio::time::sleep(Duration::from_millis(150)).await;
        if client.write_all(b"x").await.is_err() {
            break;
        }
        sent += 1;
    }
    let (text, closed) = read_until(&mut client, |_| false).await;
    assert!(closed, "the connection stayed open: {text:?}");
    assert!(text.starts_with("HTTP/1.1 408 "), "expected 408, got {text:?}");
    assert!(text.contains("x-rollout-error: client_timeout"), "{text:?}");
    assert!(sent < 20, "the whole trickled body was accepted");
    assert!(started.elapsed() < Duration::from_millis(2900), "cut off only after {:?}", started.elapsed());
    assert_eq!(accepted.load(Ordering::SeqCst), 0, "the request reached the upstream");
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_connection_moves_to_hyper_for_a_chunked_upload_after_plain_requests() {
    let v1 = Upstream::new("v1-a").spawn().await;
    let proxy = proxy_to(v1).await;
    let mut client = TcpStream::connect(proxy.addr).await.unwrap();
    client.write_all(b"GET /api/members/me HTTP/1.1\r\nHost: a\r\n\r\n").await.unwrap();
    let (first, _) = read_until(&mut client, |t| t.ends_with('}')).await;
    assert!(first.starts_with("HTTP/1.1 200 OK"), "{first}");
    // Chunked uploads are hyper's; this one arrives together with the next plain request.
    client
        .write_all(
            b"POST /api/studies/5/contents HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n\
              3\r\nabc\r\n0\r\n\r\nGET /api/v2/studies/5 HTTP/1.1\r\nHost: a\r\n\r\n",
        )
        .await
        .unwrap();
    let (text, closed) =
        read_until(&mut client, |t| t.matches("HTTP/1.1 200 OK").count() == 2 && t.ends_with('}')).await;
    assert!(!closed);
    let echoes: Vec<support::Echo> = text
        .split("HTTP/1.1 200 OK")
        .skip(1)
        .map(|r| serde_json::from_str(r.split("\r\n\r\n").nth(1).unwrap()).unwrap())
        .collect();
    assert_eq!((echoes[0].body_len, echoes[0].body_sha256.as_str()), (3, support::sha256(b"abc").as_str()));
    assert_eq!(echoes[1].upstream, "v2-a");
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_failed_head_request_gets_a_head_without_body_and_the_connection_goes_on() {
    let (refused, _socket) = support::refused_addr();
    let v2 = Upstream::new("v2-a").spawn().await;
    let proxy = ProxyBuilder::new(&ConfigBuilder::one_each(refused, v2)).spawn().await;
    let mut client = TcpStream::connect(proxy.addr).await.unwrap();
    client.write_all(b"HEAD /api/members/me HTTP/1.1\r\nHost: a\r\n\r\n").await.unwrap();
    let (text, _) = read_until(&mut client, |t| t.ends_with("\r\n\r\n")).await;
    assert!(text.starts_with("HTTP/1.1 502 Bad Gateway\r\n"), "{text}");
    assert!(text.contains("x-rollout-error: upstream_connect\r\n"), "{text}");
    // Had the error body been written, it would now be read as the start of this answer.
    client.write_all(b"GET /api/v2/studies/1 HTTP/1.1\r\nHost: a\r\n\r\n").await.unwrap();
    let (text, closed) = read_until(&mut client, |t| t.ends_with('}')).await;
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert!(!closed);
    proxy.shutdown().await;
}

/// A proxy whose v1 answers "ok", and a client connection that has had one answer from it and
/// is now idle.
async fn idle_after_one_answer(client: ClientSettings) -> (support::ProxyHandle, TcpStream) {
    let (v1, _) =
        raw_upstream(|s| answering(s, |_| "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_owned())).await;
    let v2 = Upstream::new("v2-a").spawn().await;
    let proxy = ProxyBuilder::new(&ConfigBuilder::one_each(v1, v2).client(client)).spawn().await;
    let mut client = TcpStream::connect(proxy.addr).await.unwrap();
    client.write_all(b"GET /api/members/me HTTP/1.1\r\nHost: a\r\n\r\n").await.unwrap();
    let (text, closed) = read_until(&mut client, |t| t.ends_with("\r\n\r\nok")).await;
    assert!(!closed && text.starts_with("HTTP/1.1 200"), "{text}");
    (proxy, client)
}

/// Checks that the proxy closes `client`'s idle connection from its end, and that a request the
/// client sends just then sees the connection closed, not reset.
async fn assert_closed_not_reset(mut client: TcpStream) {
    let mut rest = [0u8; 256];
    let read = tokio::time::timeout(Duration::from_secs(5), client.read(&mut rest)).await;
    assert!(matches!(read, Ok(Ok(0))), "the proxy closes its end first: {read:?}");
    // The client reuses the connection before it notices, as a keep-alive client may. The
    // request is lost either way; what it must see is the connection closed (an idempotent
    // request is then retried, RFC 9112 §9.3.1), not a reset, which clients report as an error.
    client.write_all(b"GET /api/members/me HTTP/1.1\r\nHost: a\r\n\r\n").await.unwrap();
    // Nothing to wait for: time for a reset to come back, which must not happen. Had the proxy
    // let go of the socket, the request would have drawn one, and this second write would fail.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let again = client.write_all(b"GET /api/members/me HTTP/1.1\r\nHost: a\r\n\r\n").await;
    assert!(again.is_ok(), "the connection was reset: {again:?}");
    let after = client.read(&mut rest).await;
    assert!(matches!(after, Ok(0)), "the connection was reset: {after:?}");
}

#[tokio::test]
async fn a_request_sent_as_a_stop_closes_the_idle_connection_sees_a_close_not_a_reset() {
    let (proxy, client) = idle_after_one_answer(ClientSettings::default()).await;
    // A graceful stop closes the now idle connection.
    let stopping = tokio::spawn(proxy.shutdown());
    assert_closed_not_reset(client).await;
    stopping.await.unwrap();
}

#[tokio::test]
async fn a_request_sent_as_the_idle_timeout_closes_the_connection_sees_a_close_not_a_reset() {
    let (proxy, client) = idle_after_one_answer(ClientSettings {
        header_read_timeout: Some(Duration::from_millis(300)),
        ..ClientSettings::default()
    })
    .await;
    // The keep-alive connection waits header_read_timeout for its next request, then is closed.
    assert_closed_not_reset(client).await;
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_connection_back_from_a_long_idle_spell_is_served_whole() {
    let (proxy, mut client) = idle_after_one_answer(ClientSettings {
        header_read_timeout: Some(Duration::from_secs(10)),
        ..ClientSettings::default()
    })
    .await;
    // Past the second after which an idle connection gives its buffers back.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // Three pipelined requests, one with a body and one with a head larger than the read
    // buffer a connection starts with, all in one write.
    let big = "b".repeat(12 * 1024);
    let requests = format!(
        "POST /api/members/me HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello\
         GET /api/members/me HTTP/1.1\r\nHost: a\r\nX-Big: {big}\r\n\r\n\
         GET /api/members/me HTTP/1.1\r\nHost: a\r\n\r\n"
    );
    client.write_all(requests.as_bytes()).await.unwrap();
    let (text, closed) = read_until(&mut client, |t| t.matches("\r\n\r\nok").count() == 3).await;
    assert!(!closed, "{text}");
    assert_eq!(text.matches("HTTP/1.1 200 OK\r\n").count(), 3, "{text}");
    // And again, after another idle spell.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    client.write_all(b"GET /api/members/me HTTP/1.1\r\nHost: a\r\n\r\n").await.unwrap();
    let (text, closed) = read_until(&mut client, |t| t.ends_with("\r\n\r\nok")).await;
    assert!(!closed && text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_head_started_after_a_long_idle_spell_still_has_header_read_timeout() {
    let (proxy, mut client) = idle_after_one_answer(ClientSettings {
        header_read_timeout: Some(Duration::from_secs(2)),
        ..ClientSettings::default()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // Half a head, and no more: the connection is cut off when its wait is over.
    client.write_all(b"GET /api/members/me HTTP/1.1\r\nHost: a\r\n").await.unwrap();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut rest)).await;
    assert!(matches!(read, Ok(Ok(0))), "still open: {read:?}");
    let text = String::from_utf8(support::get(&proxy.admin_url("/metrics")).await.body.to_vec()).unwrap();
    let counted = support::metric(&text, "rollout_client_rejected_total", &[("reason", "header_timeout")]);
    assert_eq!(counted, Some(1.0), "the cut-off head was counted");
    proxy.shutdown().await;
}
