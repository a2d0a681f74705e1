//! The two request paths, side by side: every case runs once on the HTTP/1.1 fast path and once
//! on the hyper path (the same request, sent after one that makes the proxy hand the connection
//! to hyper), against one raw upstream that records the exact bytes it receives and answers with
//! scripted bytes. The upstream must receive equivalent requests and the client equivalent
//! responses: same method, target, header fields (names compared case-insensitively, in any
//! order) and body; same status, header fields and decoded body. Only what each path frames its
//! own way is left out of the comparison: `content-length`, `transfer-encoding`, `connection`.
//! This is how drift between the two codecs is caught.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::{ConfigBuilder, ProxyBuilder, Upstream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A request as the upstream received it, or as the client received a response.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Message {
    /// `METHOD target` or the status code.
    first: String,
    /// Lower-case names with their values, sorted; framing fields left out.
    fields: Vec<(String, String)>,
    body: Vec<u8>,
}

/// Fields each path frames its own way.
const FRAMING: [&str; 3] = ["content-length", "transfer-encoding", "connection"];

fn fields_of(headers: &[httparse::Header<'_>], skip: &[&str]) -> Vec<(String, String)> {
    let mut fields: Vec<(String, String)> = headers
        .iter()
        .map(|h| (h.name.to_ascii_lowercase(), String::from_utf8_lossy(h.value).into_owned()))
        .filter(|(name, _)| !FRAMING.contains(&name.as_str()) && !skip.contains(&name.as_str()))
        .collect();
    fields.sort();
    fields
}

/// Decodes a chunked body at the start of `buf`: the data and the bytes used, `None` if
/// incomplete or malformed.
fn dechunk(buf: &[u8]) -> Option<(Vec<u8>, usize)> {
    let mut at = 0;
    let mut data = Vec::new();
    loop {
        let line_end = at + buf[at..].windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&buf[at..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        at = line_end + 2;
        if size == 0 {
            // Trailer lines, up to the blank line.
            loop {
                let end = at + buf[at..].windows(2).position(|w| w == b"\r\n")?;
                let empty = end == at;
                at = end + 2;
                if empty {
                    return Some((data, at));
                }
            }
        }
        if buf.len() < at + size + 2 {
            return None;
        }
        data.extend_from_slice(&buf[at..at + size]);
        at += size + 2;
    }
}

/// What the recording upstream saw: each request by the value of its `x-case` header.
type Seen = Arc<Mutex<BTreeMap<String, Message>>>;

/// The recording upstream: parses each request (Content-Length or chunked body), records it,
/// and answers with `RESPONSES[name]` for a target `/r/<name>`, closing the connection after an
/// answer that is not keep-alive material.
async fn recording_upstream() -> (SocketAddr, Seen) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Seen = Arc::default();
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let record = record.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    let Some((message, case, used)) = next_request(&mut stream, &mut buf).await else {
                        return;
                    };
                    buf.drain(..used);
                    let target = message.first.split(' ').nth(1).unwrap_or_default().to_owned();
                    if let Some(case) = case {
                        record.lock().unwrap().insert(case, message);
                    }
                    let name = target.strip_prefix("/r/").unwrap_or("ok");
                    let name = name.split(['?', '/']).next().unwrap_or_default();
                    let (answer, keep) = response(name);
                    if stream.write_all(answer.as_bytes()).await.is_err() || !keep {
                        return;
                    }
                }
            });
        }
    });
    (addr, seen)
}

async fn next_request(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<(Message, Option<String>, usize)> {
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        if let Ok(httparse::Status::Complete(len)) = req.parse(buf) {
            let value = |name: &str| {
                req.headers.iter().find(|h| h.name.eq_ignore_ascii_case(name)).map(|h| h.value.to_vec())
            };
            let body = if value("transfer-encoding").is_some() {
                dechunk(&buf[len..]).map(|(data, used)| (data, len + used))
            } else {
                let n: usize =
                    value("content-length").map_or(0, |v| String::from_utf8_lossy(&v).parse().unwrap());
                (buf.len() >= len + n).then(|| (buf[len..len + n].to_vec(), len + n))
            };
            if let Some((body, used)) = body {
                let case = value("x-case").map(|v| String::from_utf8_lossy(&v).into_owned());
                let first = format!("{} {}", req.method.unwrap(), req.path.unwrap());
                let message = Message { first, fields: fields_of(req.headers, &["x-case"]), body };
                return Some((message, case, used));
            }
        }
        let mut chunk = [0u8; 8192];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// The upstream's scripted answers, and whether the connection stays open after them.
fn response(name: &str) -> (&'static str, bool) {
    match name {
        "ok" => ("HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-App: 1\r\n\r\nok", true),
        "chunked" => (
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-App: 2\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n",
            true,
        ),
        "te-and-cl" => (
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            true,
        ),
        "until-close" => ("HTTP/1.1 200 OK\r\nX-App: 3\r\n\r\nuntil the end", false),
        "no-content" => ("HTTP/1.1 204 No Content\r\nX-App: 4\r\n\r\n", true),
        "repeated-length" => ("HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok", true),
        "hop-by-hop" => (
            "HTTP/1.1 200 OK\r\nConnection: keep-alive, x-hop, a, b, c, d, e, f, g, x-ninth\r\nX-Hop: 1\r\n\
             X-Ninth: 9\r\nKeep-Alive: timeout=5\r\nProxy-Authenticate: Basic\r\nContent-Length: 2\r\n\r\nok",
            true,
        ),
        "interim" => ("HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", true),
        "forged-pool" => ("HTTP/1.1 200 OK\r\nX-Rollout-Pool: v9\r\nContent-Length: 2\r\n\r\nok", true),
        "error" => ("HTTP/1.1 503 Service Unavailable\r\nRetry-After: 5\r\nContent-Length: 4\r\n\r\nbusy", true),
        "status-000" => ("HTTP/1.1 000 Zero\r\nContent-Length: 0\r\n\r\n", false),
        "status-600" => ("HTTP/1.1 600 Six\r\nContent-Length: 0\r\n\r\n", false),
        "te-gzip" => ("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nxx", false),
        "te-twice" => ("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n", false),
        "length-differs" => ("HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok", false),
        "obs-fold" => ("HTTP/1.1 200 OK\r\nX-A: 1\r\n 2\r\nContent-Length: 0\r\n\r\n", false),
        "bad-chunk" => ("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n", false),
        "bare-lf-chunk" => ("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0;\n\r\n", false),
        "switch" => ("HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n", false),
        other => panic!("no scripted response {other}"),
    }
}

/// What the client got: a response read to its end, or why there was none.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Response(Message),
    /// The proxy refused to relay an invalid upstream response: 502 `upstream_invalid`, or the
    /// connection closed before a complete response.
    Refused,
}

/// Reads one response (after skipping interim ones) from `stream`.
async fn read_response(stream: &mut TcpStream, head_request: bool) -> Outcome {
    let mut buf = Vec::new();
    let mut closed = false;
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut res = httparse::Response::new(&mut headers);
        if let Ok(httparse::Status::Complete(len)) = res.parse(&buf) {
            let status = res.code.unwrap();
            if (100..200).contains(&status) {
                buf.drain(..len);
                continue;
            }
            let value = |name: &str| {
                res.headers.iter().find(|h| h.name.eq_ignore_ascii_case(name)).map(|h| h.value.to_vec())
            };
            if status == 502 && value("x-rollout-error").as_deref() == Some(b"upstream_invalid") {
                return Outcome::Refused;
            }
            let body = if head_request || status == 204 || status == 304 {
                Some(Vec::new())
            } else if value("transfer-encoding").is_some() {
                dechunk(&buf[len..]).map(|(data, _)| data)
            } else if let Some(n) = value("content-length") {
                let n: usize = String::from_utf8_lossy(&n).parse().unwrap();
                (buf.len() >= len + n).then(|| buf[len..len + n].to_vec())
            } else {
                closed.then(|| buf[len..].to_vec())
            };
            if let Some(body) = body {
                let fields = fields_of(res.headers, &["date"]);
                return Outcome::Response(Message { first: status.to_string(), fields, body });
            }
        }
        if closed {
            return Outcome::Refused;
        }
        let mut chunk = [0u8; 8192];
        match tokio::time::timeout(Duration::from_secs(3), stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => closed = true,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => panic!("no complete response within 3 s: {:?}", String::from_utf8_lossy(&buf)),
        }
    }
}

/// A request, with `{target}` and `{case}` to fill in.
const REQUESTS: &[(&str, &str)] = &[
    ("plain", "GET {target} HTTP/1.1\r\nHost: app.example\r\nX-Case: {case}\r\nAccept: */*\r\nCookie: a=1\r\n\r\n"),
    (
        "hop-by-hop",
        "GET {target} HTTP/1.1\r\nHost: app.example:8080\r\nX-Case: {case}\r\nKeep-Alive: 5\r\nTE: trailers\r\n\
         Proxy-Authorization: Basic eA==\r\nProxy-Connection: keep-alive\r\nX-Forwarded-Proto: https\r\n\
         X-Forwarded-Host: evil\r\nX-Forwarded-For: 1.1.1.1\r\nX-Forwarded-For: 2.2.2.2\r\n\r\n",
    ),
    (
        "underscores",
        "GET {target} HTTP/1.1\r\nHost: a\r\nX-Case: {case}\r\nX_Forwarded_For: 6.6.6.6\r\nContent_Length: 3\r\n\
         Transfer_Encoding: chunked\r\nX-Kept: 1\r\n\r\n",
    ),
    ("fragment", "GET {target}#frag HTTP/1.1\r\nHost: a\r\nX-Case: {case}\r\n\r\n"),
    ("query", "GET {target}?studyId=42&x=%20 HTTP/1.1\r\nHost: a\r\nX-Case: {case}\r\n\r\n"),
    ("post", "POST {target} HTTP/1.1\r\nHost: a\r\nX-Case: {case}\r\nContent-Type: text/plain\r\nContent-Length: 11\r\n\r\nhello world"),
    ("put-empty", "PUT {target} HTTP/1.1\r\nHost: a\r\nX-Case: {case}\r\nContent-Length: 0\r\n\r\n"),
    ("head", "HEAD {target} HTTP/1.1\r\nHost: a\r\nX-Case: {case}\r\n\r\n"),
    ("delete", "DELETE {target} HTTP/1.1\r\nHost: [::1]:443\r\nX-Case: {case}\r\n\r\n"),
];

/// Responses every request shape is tried against.
const COMMON: &[&str] = &["ok", "chunked", "hop-by-hop", "forged-pool", "error"];

/// Responses tried with the plain GET only.
const SPECIAL: &[&str] = &[
    "te-and-cl",
    "until-close",
    "no-content",
    "repeated-length",
    "interim",
    "status-000",
    "status-600",
    "te-gzip",
    "te-twice",
    "length-differs",
    "obs-fold",
    "bad-chunk",
    "bare-lf-chunk",
    "switch",
];

/// Makes the proxy hand the connection to its hyper path (a `Connection` header naming another
/// field is hyper's to handle), and so every later request on it.
const TO_HYPER: &str = "GET /r/ok HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, x-h\r\nX-H: 1\r\n\r\n";

async fn run(proxy: SocketAddr, request: &str, hyper_path: bool) -> Outcome {
    let mut stream = TcpStream::connect(proxy).await.unwrap();
    if hyper_path {
        stream.write_all(TO_HYPER.as_bytes()).await.unwrap();
        let primed = read_response(&mut stream, false).await;
        assert!(matches!(&primed, Outcome::Response(m) if m.first == "200"), "priming failed: {primed:?}");
    }
    stream.write_all(request.as_bytes()).await.unwrap();
    read_response(&mut stream, request.starts_with("HEAD")).await
}

#[tokio::test]
async fn both_paths_forward_and_answer_the_same() {
    let (v1, seen) = recording_upstream().await;
    let v2 = Upstream::new("v2-a").spawn().await;
    let proxy = ProxyBuilder::new(&ConfigBuilder::one_each(v1, v2)).spawn().await;

    let mut cases = Vec::new();
    for (shape, template) in REQUESTS {
        for answer in COMMON {
            cases.push((*shape, *template, *answer));
        }
    }
    for answer in SPECIAL {
        cases.push(("plain", REQUESTS[0].1, *answer));
    }
    let mut drift = Vec::new();
    for (i, (shape, template, answer)) in cases.iter().enumerate() {
        let mut outcomes = Vec::new();
        for (path, hyper_path) in [("fast", false), ("hyper", true)] {
            let case = format!("{i}-{path}");
            let request = template.replace("{target}", &format!("/r/{answer}")).replace("{case}", &case);
            outcomes.push(run(proxy.addr, &request, hyper_path).await);
        }
        let requests: Vec<Option<Message>> = ["fast", "hyper"]
            .iter()
            .map(|p| seen.lock().unwrap().get(&format!("{i}-{p}")).cloned())
            .collect();
        let name = format!("{shape} request, {answer} response");
        if requests[0] != requests[1] {
            drift.push(format!(
                "{name}: the upstream received\n  fast:  {:?}\n  hyper: {:?}",
                requests[0], requests[1]
            ));
        }
        if requests[0].is_none() {
            drift.push(format!("{name}: the request never reached the upstream"));
        }
        if outcomes[0] != outcomes[1] {
            drift.push(format!(
                "{name}: the client received\n  fast:  {:?}\n  hyper: {:?}",
                outcomes[0], outcomes[1]
            ));
        }
        // What a well-behaved upstream answers must arrive whole; what a broken one sends must not.
        let refused = matches!(outcomes[0], Outcome::Refused);
        let invalid = matches!(
            *answer,
            "status-000"
                | "status-600"
                | "te-gzip"
                | "te-twice"
                | "length-differs"
                | "obs-fold"
                | "bad-chunk"
                | "bare-lf-chunk"
                | "switch"
        );
        if refused != invalid {
            drift.push(format!(
                "{name}: expected {}, got {:?}",
                if invalid { "a refusal" } else { "a response" },
                outcomes[0]
            ));
        }
    }
    assert!(drift.is_empty(), "{} of {} cases differ:\n{}", drift.len(), cases.len(), drift.join("\n"));
    proxy.shutdown().await;
}

#[tokio::test]
async fn the_upstream_sees_what_the_rules_say() {
    // Spot checks of the forwarded request itself, whichever path: equal is not enough if both
    // are wrong.
    let (v1, seen) = recording_upstream().await;
    let v2 = Upstream::new("v2-a").spawn().await;
    let proxy = ProxyBuilder::new(&ConfigBuilder::one_each(v1, v2)).spawn().await;
    for (path, hyper_path) in [("fast", false), ("hyper", true)] {
        let request = REQUESTS[1].1.replace("{target}", "/r/ok").replace("{case}", path);
        run(proxy.addr, &request, hyper_path).await;
        let message = seen.lock().unwrap()[path].clone();
        let fields: BTreeMap<&str, Vec<&str>> =
            message.fields.iter().fold(BTreeMap::new(), |mut map, (k, v)| {
                map.entry(k.as_str()).or_default().push(v.as_str());
                map
            });
        assert_eq!(fields["host"], ["app.example:8080"], "{path}");
        assert_eq!(fields["x-forwarded-host"], ["app.example:8080"], "{path}");
        assert_eq!(fields["x-forwarded-for"], ["1.1.1.1, 2.2.2.2, 127.0.0.1"], "{path}");
        assert_eq!(fields["x-forwarded-proto"], ["http"], "{path}");
        for gone in ["keep-alive", "te", "proxy-authorization", "proxy-connection"] {
            assert!(!fields.contains_key(gone), "{path}: {gone} was forwarded");
        }
        let request =
            REQUESTS[2].1.replace("{target}", "/r/ok").replace("{case}", &format!("{path}-underscores"));
        run(proxy.addr, &request, hyper_path).await;
        let message = seen.lock().unwrap()[&format!("{path}-underscores")].clone();
        assert!(message.fields.iter().all(|(name, _)| !name.contains('_')), "{path}: {:?}", message.fields);
        assert!(
            message.fields.contains(&("x-kept".to_owned(), "1".to_owned())),
            "{path}: {:?}",
            message.fields
        );
    }
    proxy.shutdown().await;
}
