//! Property tests of the HTTP/1.1 fast path's codec ([`rollout_proxy::h1`]) against hyper,
//! which the other path uses: any byte sequence, split at any point, is either framed exactly
//! as hyper frames it or refused. Two parts of the codec decide framing:
//!
//! - the request head parser: a head the fast path accepts must read the same in hyper's server
//!   (method, target, fields, body length) and end at the same byte, so the request after it is
//!   the same request for both;
//! - the chunked-body re-framer: where it finds the end of an upstream's chunked body, hyper's
//!   client finds it too (not a byte earlier or later), with the same data, and what it writes
//!   for the client is a chunked body hyper decodes to that data.
//!
//! hyper runs over in-memory pipes; inputs are generated from the grammar's alphabet with
//! mutations, so most are near-misses of valid messages.

use std::mem::MaybeUninit;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use proptest::prelude::*;
use rollout_proxy::h1;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// The body hyper's client decodes from a chunked response whose body bytes are `body`, the
/// connection closing after them.
async fn hyper_decodes(body: &[u8]) -> Result<Vec<u8>, String> {
    let (client_io, mut server_io) = tokio::io::duplex(1 << 20);
    let mut answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    answer.extend_from_slice(body);
    let server = async move {
        let mut seen = Vec::new();
        let mut chunk = [0u8; 1024];
        while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
            match server_io.read(&mut chunk).await {
                Ok(0) | Err(_) => return server_io,
                Ok(n) => seen.extend_from_slice(&chunk[..n]),
            }
        }
        let _ = server_io.write_all(&answer).await;
        let _ = server_io.shutdown().await;
        server_io
    };
    let client = async move {
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(client_io))
            .await
            .map_err(|e| e.to_string())?;
        let request = async move {
            let req = http::Request::get("/").header("host", "a").body(Empty::<Bytes>::new()).unwrap();
            let response = sender.send_request(req).await.map_err(|e| e.to_string())?;
            let collected = response.into_body().collect().await.map_err(|e| e.to_string())?;
            Ok::<_, String>(collected.to_bytes().to_vec())
        };
        let (_, decoded) = tokio::join!(connection, request);
        decoded
    };
    let (_server_io, decoded) = tokio::join!(server, async {
        tokio::time::timeout(Duration::from_secs(2), client).await.map_err(|_| "hyper hung".to_owned())?
    });
    decoded
}

/// What the fast path's re-framer makes of `body` fed in two reads split at `split`: the end of
/// the body and the bytes written for the client; `Ok(None)` if the body is not complete.
fn reframe(body: &[u8], split: usize) -> Result<Option<(usize, Vec<u8>)>, h1::ChunkError> {
    let mut chunked = h1::Chunked::default();
    let mut out = Vec::new();
    let (first, second) = body.split_at(split.min(body.len()));
    let used = chunked.reframe(first, &mut out)?;
    if chunked.is_done() {
        return Ok(Some((used, out)));
    }
    let used = first.len() + chunked.reframe(second, &mut out)?;
    Ok(chunked.is_done().then_some((used, out)))
}

/// A chunked body built from the grammar: chunks with optional extensions, the last chunk,
/// optional trailer fields; then damaged by a few random edits.
fn chunked_body() -> impl Strategy<Value = Vec<u8>> {
    let chunk = (
        prop::collection::vec(any::<u8>(), 1..24),
        prop_oneof![
            6 => prop::sample::select(vec!["", "", ";a", ";a=b", "; a = \"q\"", " ", "\t;x"]),
            1 => prop::sample::select(vec![";\u{1}", ";a\nb", ";\r"]),
        ],
        prop::sample::select(vec!["", "0", "00"]),
        any::<bool>(),
    )
        .prop_map(|(data, ext, zeros, upper)| {
            let size =
                if upper { format!("{zeros}{:X}", data.len()) } else { format!("{zeros}{:x}", data.len()) };
            let mut out = format!("{size}{ext}\r\n").into_bytes();
            out.extend_from_slice(&data);
            out.extend_from_slice(b"\r\n");
            out
        });
    let trailer = prop_oneof![
        6 => prop::sample::select(vec!["", "", "X: a\r\n", "X:a\r\nY: b c\r\n", "X-\u{e9}: \u{e9}\r\n"]),
        1 => prop::sample::select(vec!["X: a\n", " X: a\r\n", "X : a\r\n", "X: \u{7f}\r\n", "X\r\n"]),
    ];
    let edit = (any::<prop::sample::Index>(), prop::sample::select(b"\r\n ;:0aZ\t\x00".to_vec()), 0..3u8);
    (
        prop::collection::vec(chunk, 0..4),
        prop::sample::select(vec!["0", "000", "0;e"]),
        trailer,
        prop_oneof![2 => Just(Vec::new()), 1 => prop::collection::vec(edit, 1..3)],
    )
        .prop_map(|(chunks, last, trailer, edits)| {
            let mut body: Vec<u8> = chunks.concat();
            body.extend_from_slice(format!("{last}\r\n{trailer}\r\n").as_bytes());
            for (at, byte, kind) in edits {
                let i = at.index(body.len() + 1);
                match kind {
                    0 => body.insert(i, byte),
                    1 if i < body.len() => {
                        body.remove(i);
                    }
                    _ if i < body.len() => body[i] = byte,
                    _ => {}
                }
            }
            body
        })
}

/// Bytes from the chunked grammar's alphabet, in any order.
fn chunk_noise() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(prop::sample::select(b"0123456789aAfFgx;= \t\r\n:\"\x00\x7f".to_vec()), 0..40)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn the_chunked_reframer_ends_where_hyper_does(
        body in prop_oneof![3 => chunked_body(), 1 => chunk_noise()],
        split in any::<prop::sample::Index>(),
    ) {
        let split = split.index(body.len() + 1);
        let whole = reframe(&body, body.len());
        let in_two = reframe(&body, split);
        prop_assert_eq!(format!("{whole:?}"), format!("{in_two:?}"), "a split at {} changed the result", split);
        let rt = runtime();
        match whole {
            // Refused: nothing was relayed; no constraint.
            Err(_) => {}
            Ok(None) => {
                // Not complete for the fast path: hyper must not find an end either.
                prop_assert!(rt.block_on(hyper_decodes(&body)).is_err(), "hyper found an end the fast path did not");
            }
            Ok(Some((end, out))) => {
                let upstream = rt.block_on(hyper_decodes(&body[..end]));
                prop_assert!(upstream.is_ok(), "hyper refused what the fast path relayed: {:?}", upstream);
                if end > 0 {
                    prop_assert!(rt.block_on(hyper_decodes(&body[..end - 1])).is_err(), "hyper ends earlier");
                }
                let relayed = rt.block_on(hyper_decodes(&out));
                prop_assert_eq!(relayed, upstream, "the client would read other data");
            }
        }
    }
}

/// What hyper's server read: each request's method, target, fields (lower-case names, sorted)
/// and body.
type Read = (String, String, Vec<(String, Vec<u8>)>, Vec<u8>);

/// The requests hyper's server reads from `bytes`, the client closing after them.
async fn hyper_reads(bytes: Vec<u8>) -> Vec<Read> {
    let (mut client_io, server_io) = tokio::io::duplex(1 << 20);
    let seen: Arc<Mutex<Vec<Read>>> = Arc::default();
    let record = seen.clone();
    let service = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
        let record = record.clone();
        async move {
            let (parts, body) = req.into_parts();
            let body = body.collect().await.map(|c| c.to_bytes().to_vec()).unwrap_or_default();
            let mut fields: Vec<(String, Vec<u8>)> =
                parts.headers.iter().map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec())).collect();
            fields.sort();
            let target = parts.uri.path_and_query().map(|pq| pq.as_str().to_owned()).unwrap_or_default();
            record.lock().unwrap().push((parts.method.to_string(), target, fields, body));
            Ok::<_, std::convert::Infallible>(http::Response::new(Empty::<Bytes>::new()))
        }
    });
    let server =
        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(server_io), service);
    let client = async move {
        let _ = client_io.write_all(&bytes).await;
        // Stay open until both answers are in: a client closing early would end the exchange.
        let mut answers = Vec::new();
        let mut chunk = [0u8; 1024];
        while answers.windows(9).filter(|w| w == b"HTTP/1.1 ").count() < 2 {
            match client_io.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answers.extend_from_slice(&chunk[..n]),
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        tokio::select! { _ = server => {}, _ = client => {} }
    })
    .await;
    let read = seen.lock().unwrap().clone();
    read
}

/// A request head from pieces near the grammar's edges: mostly plausible, each piece now and
/// then odd.
fn request_head() -> impl Strategy<Value = Vec<u8>> {
    let method = prop_oneof![
        8 => prop::sample::select(vec!["GET", "POST", "PUT", "HEAD", "DELETE", "PATCH", "OPTIONS", "M-SEARCH"]),
        1 => prop::sample::select(vec!["get", "CONNECT", "G T", "GET\t", ""]),
    ];
    let piece = prop_oneof![
        8 => prop::sample::select(vec!["a", "9", "/", "api/studies/", "42", "?studyId=7", "&x=1", "%20", "-._~"]),
        1 => prop::sample::select(vec!["#", "#f?x", "%", "<", ">", "\"", "`", "{", "|", "\\", "^", "é", " ", "\u{7f}"]),
    ];
    let target = prop::collection::vec(piece, 0..6).prop_map(|parts| format!("/{}", parts.concat()));
    let target =
        prop_oneof![12 => target, 1 => Just("*".to_owned()), 1 => Just("http://a.example/x".to_owned())];
    let version = prop_oneof![8 => Just("HTTP/1.1"), 1 => prop::sample::select(vec!["HTTP/1.0", "HTTP/1.2", "http/1.1"])];
    let field = prop_oneof![
        8 => prop::sample::select(vec![
            ("Accept", "*/*"), ("X-Y", "a b"), ("X-Y", "a\tb"), ("Cookie", "a=1; b=2"), ("Content-Length", "5"),
            ("content-length", "0"), ("Connection", "keep-alive"), ("Connection", "close"), ("X-Forwarded-For", "1.1.1.1"),
            ("X_Y", "1"), ("User-Agent", "t/1"), ("X-E", "é"), ("X-Empty", ""), ("Keep-Alive", "5"),
        ]),
        1 => prop::sample::select(vec![
            ("Host", "a"), ("Content-Length", "+5"), ("Content-Length", " 5"), ("Content-Length", "5, 5"),
            ("Content-Length", "99999999"), ("Transfer-Encoding", "chunked"), ("Connection", "x-h"),
            ("Expect", "100-continue"), ("Upgrade", "websocket"), ("Host ", "a"), ("X\u{1}", "a"), ("X-Y", "\u{7f}"),
            ("", "a"), ("X-Y", "a\r\n b"), ("X-Y", "a\nZ: b"),
        ]),
    ];
    let host = prop_oneof![
        8 => prop::sample::select(vec!["a", "app.example:8080", "[::1]:80", "10.0.0.1", "a%41"]),
        1 => prop::sample::select(vec!["", "a b", "evil/x", "u@a", "a:x"]),
    ];
    let eol = prop_oneof![12 => Just("\r\n"), 1 => Just("\n")];
    (
        method,
        target,
        version,
        host,
        any::<prop::sample::Index>(),
        prop::collection::vec((field, eol.clone()), 0..5),
        eol,
    )
        .prop_map(|(method, target, version, host, at, fields, end)| {
            let mut lines: Vec<String> =
                fields.iter().map(|((name, value), eol)| format!("{name}: {value}{eol}")).collect();
            lines.insert(at.index(lines.len() + 1), format!("Host: {host}\r\n"));
            format!("{method} {target} {version}\r\n{}{end}", lines.concat()).into_bytes()
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn a_request_head_the_fast_path_takes_reads_the_same_in_hyper(head in request_head()) {
        let mut fields = [const { MaybeUninit::uninit() }; h1::MAX_HEADERS];
        let h1::ParsedRequest::Complete(parsed) = h1::parse_request(&head, &mut fields) else {
            // Partial or left to hyper: hyper alone decides; nothing to compare.
            return Ok(());
        };
        prop_assert_eq!(parsed.len, head.len(), "the head ends where its blank line does");
        for k in 0..head.len() {
            let mut fields = [const { MaybeUninit::uninit() }; h1::MAX_HEADERS];
            let prefix = h1::parse_request(&head[..k], &mut fields);
            prop_assert!(!matches!(prefix, h1::ParsedRequest::Complete(_)), "complete after {} bytes", k);
        }
        let body = vec![b'x'; parsed.content_length as usize];
        let mut bytes = head.clone();
        bytes.extend_from_slice(&body);
        bytes.extend_from_slice(b"GET /next HTTP/1.1\r\nHost: n\r\n\r\n");
        let read = runtime().block_on(hyper_reads(bytes));
        // After `Connection: close` both stop reading; otherwise the next request is read too.
        prop_assert_eq!(read.len(), if parsed.close { 1 } else { 2 }, "hyper read {:?}", read);
        let (method, target, hyper_fields, hyper_body) = &read[0];
        prop_assert_eq!(method.as_str(), parsed.method);
        prop_assert_eq!(target.as_str(), parsed.target);
        let mut ours: Vec<(String, Vec<u8>)> =
            parsed.fields().map(|(name, value)| (name.to_ascii_lowercase(), value.to_vec())).collect();
        ours.sort();
        prop_assert_eq!(hyper_fields, &ours);
        prop_assert_eq!(hyper_body, &body);
        if !parsed.close {
            prop_assert_eq!(read[1].1.as_str(), "/next", "the next request starts at the same byte");
        }
    }
}
