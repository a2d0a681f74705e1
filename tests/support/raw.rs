//! Raw-socket HTTP/1.1 for the request-smuggling corpus (`tests/smuggling.rs`).
//!
//! - A strict parser of the test's own for requests, responses and chunked bodies, written from
//!   RFC 9112 and RFC 9110 rather than from any implementation the proxy uses: CRLF line ends
//!   only, no obs-fold, field names are tokens (no whitespace before the colon), no control
//!   bytes in field values, exactly one framing header, chunk sizes 1*HEXDIG, chunk extensions
//!   by their grammar, trailers as field lines.
//! - [`spawn_recording_upstream`]: an upstream that parses what the proxy forwards with that
//!   parser (plus the proxy's own rules: exactly one valid `Host`, no `_` in names, no
//!   hop-by-hop fields, origin-form targets), records every request or violation, and answers
//!   each request `seen <method> <target>`.
//! - [`spawn_scripted_upstream`]: an upstream that answers chosen requests with scripted bytes
//!   (and more bytes later on the same socket) and every other request cleanly.
//! - [`RawConn`]: a client that writes bytes and reads back strictly parsed responses.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

/// The result of parsing a prefix of a buffer.
#[derive(Debug)]
pub enum Parse<T> {
    Done(T),
    /// More bytes are needed.
    Partial,
    /// The bytes can never become a valid message; the reason names the rule broken.
    Bad(String),
}

macro_rules! step {
    ($parse:expr) => {
        match $parse {
            Parse::Done(value) => value,
            Parse::Partial => return Parse::Partial,
            Parse::Bad(reason) => return Parse::Bad(reason),
        }
    };
}

/// Largest head the parsers wait for before calling it invalid.
const HEAD_LIMIT: usize = 256 * 1024;

/// `tchar` (RFC 9110 §5.6.2).
pub fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn is_token(s: &[u8]) -> bool {
    !s.is_empty() && s.iter().all(|&b| is_tchar(b))
}

/// A byte allowed in a field value: HTAB, SP, VCHAR or obs-text (RFC 9110 §5.5).
fn is_field_byte(b: u8) -> bool {
    b == b'\t' || b == b' ' || (0x21..=0x7e).contains(&b) || b >= 0x80
}

fn trim_ows(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

/// Printable form of bytes for failure messages, cut to `max` bytes.
pub fn show(bytes: &[u8], max: usize) -> String {
    let mut out = String::new();
    for &b in bytes.iter().take(max) {
        match b {
            b'\r' => out.push_str("\\r"),
            b'\n' => out.push_str("\\n"),
            b'\t' => out.push_str("\\t"),
            b'\\' => out.push_str("\\\\"),
            b'"' => out.push_str("\\\""),
            0x20..=0x7e => out.push(b as char),
            _ => out.push_str(&format!("\\x{b:02x}")),
        }
    }
    if bytes.len() > max {
        out.push('…');
    }
    out
}

/// One line starting at `start`: its bytes without the CRLF, and where the next line starts.
/// A LF without CR before it, or a CR without LF after it, is invalid (RFC 9112 §2.2 lets a
/// recipient accept them; this parser does not, so anything the proxy sends on must not have
/// them).
fn line(buf: &[u8], start: usize) -> Parse<(&[u8], usize)> {
    let rest = &buf[start.min(buf.len())..];
    for (i, &b) in rest.iter().enumerate() {
        match b {
            b'\n' => return Parse::Bad("bare LF".to_owned()),
            b'\r' => {
                return match rest.get(i + 1) {
                    None => Parse::Partial,
                    Some(b'\n') => Parse::Done((&rest[..i], start + i + 2)),
                    Some(_) => Parse::Bad("bare CR".to_owned()),
                }
            }
            _ => {}
        }
    }
    Parse::Partial
}

/// A field line: name as sent, value without surrounding whitespace.
#[derive(Debug, Clone)]
pub struct Field {
    pub name: String,
    pub value: Vec<u8>,
}

impl Field {
    pub fn is(&self, name: &str) -> bool {
        self.name.eq_ignore_ascii_case(name)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.value).into_owned()
    }
}

fn field_line(l: &[u8]) -> Result<Field, String> {
    if matches!(l.first(), Some(b' ' | b'\t')) {
        return Err(format!("obs-fold or whitespace-led line {:?}", show(l, 40)));
    }
    let Some(colon) = l.iter().position(|&b| b == b':') else {
        return Err(format!("field line without a colon {:?}", show(l, 40)));
    };
    let name = &l[..colon];
    if !is_token(name) {
        return Err(format!("invalid field name {:?}", show(name, 40)));
    }
    let value = trim_ows(&l[colon + 1..]);
    if let Some(b) = value.iter().find(|&&b| !is_field_byte(b)) {
        return Err(format!("control byte 0x{b:02x} in the value of {}", String::from_utf8_lossy(name)));
    }
    Ok(Field { name: String::from_utf8_lossy(name).into_owned(), value: value.to_vec() })
}

/// Field lines from `at` up to and including the empty line; returns them and the end.
fn field_lines(buf: &[u8], mut at: usize) -> Parse<(Vec<Field>, usize)> {
    let mut fields = Vec::new();
    loop {
        let (l, next) = match line(buf, at) {
            Parse::Done(x) => x,
            Parse::Partial if buf.len() > HEAD_LIMIT => {
                return Parse::Bad(format!("head over {HEAD_LIMIT} bytes"))
            }
            Parse::Partial => return Parse::Partial,
            Parse::Bad(reason) => return Parse::Bad(reason),
        };
        at = next;
        if l.is_empty() {
            return Parse::Done((fields, at));
        }
        match field_line(l) {
            Ok(field) => fields.push(field),
            Err(reason) => return Parse::Bad(reason),
        }
    }
}

/// A start line and its field lines.
#[derive(Debug, Clone)]
pub struct Head {
    pub start: Vec<u8>,
    pub fields: Vec<Field>,
    /// Bytes up to and including the empty line.
    pub len: usize,
}

pub fn parse_head(buf: &[u8]) -> Parse<Head> {
    let (start, at) = match line(buf, 0) {
        Parse::Partial if buf.len() > HEAD_LIMIT => {
            return Parse::Bad(format!("start line over {HEAD_LIMIT} bytes"))
        }
        other => step!(other),
    };
    let (fields, len) = step!(field_lines(buf, at));
    Parse::Done(Head { start: start.to_vec(), fields, len })
}

fn values<'f>(fields: &'f [Field], name: &'f str) -> impl Iterator<Item = &'f Field> + 'f {
    fields.iter().filter(move |f| f.is(name))
}

/// `host [ ":" port ]` with host an IP-literal in brackets or a reg-name (unreserved,
/// pct-encoded, sub-delims; which includes IPv4), port 1*DIGIT (RFC 3986 §3.2.2, RFC 9112 §3.2).
pub fn is_valid_authority(a: &[u8]) -> bool {
    let port = if a.first() == Some(&b'[') {
        let Some(close) = a.iter().position(|&b| b == b']') else { return false };
        let inner = &a[1..close];
        if inner.is_empty() || !inner.iter().all(|&b| b.is_ascii_hexdigit() || b == b':' || b == b'.') {
            return false;
        }
        &a[close + 1..]
    } else {
        let end = a.iter().position(|&b| b == b':').unwrap_or(a.len());
        let host = &a[..end];
        let mut i = 0;
        while i < host.len() {
            let b = host[i];
            if b == b'%' {
                if !(host.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
                    && host.get(i + 2).is_some_and(u8::is_ascii_hexdigit))
                {
                    return false;
                }
                i += 3;
                continue;
            }
            if !(b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=".contains(&b)) {
                return false;
            }
            i += 1;
        }
        if host.is_empty() {
            return false;
        }
        &a[end..]
    };
    match port {
        // `port = *DIGIT` (RFC 3986 §3.2.3): an empty port after the colon is allowed.
        [] => true,
        [b':', digits @ ..] => digits.iter().all(u8::is_ascii_digit),
        _ => false,
    }
}

/// A chunked body, decoded.
#[derive(Debug, Clone, Default)]
pub struct Chunked {
    pub data: Vec<u8>,
    /// Some chunk line carried an extension (valid by the grammar).
    pub extensions: bool,
    pub trailers: Vec<Field>,
    /// Bytes of the chunked body, the final CRLF included.
    pub len: usize,
}

/// `*( BWS ";" BWS chunk-ext-name [ BWS "=" BWS chunk-ext-val ] )` (RFC 9112 §7.1.1).
fn check_chunk_ext(ext: &[u8]) -> Result<(), String> {
    let bad = || Err(format!("invalid chunk extension {:?}", show(ext, 40)));
    let ws = |i: &mut usize| {
        while matches!(ext.get(*i), Some(b' ' | b'\t')) {
            *i += 1;
        }
    };
    let token = |i: &mut usize| {
        let start = *i;
        while ext.get(*i).is_some_and(|&b| is_tchar(b)) {
            *i += 1;
        }
        *i > start
    };
    // BWS is allowed only before a ";" or an "=": a size line ending in whitespace, or an
    // extension name followed by whitespace and nothing else, is not chunk-ext.
    let mut i = 0;
    loop {
        if i == ext.len() {
            return Ok(());
        }
        ws(&mut i);
        if ext.get(i) != Some(&b';') {
            return bad();
        }
        i += 1;
        ws(&mut i);
        if !token(&mut i) {
            return bad();
        }
        let after_name = i;
        ws(&mut i);
        if ext.get(i) != Some(&b'=') {
            i = after_name;
        } else {
            i += 1;
            ws(&mut i);
            if ext.get(i) == Some(&b'"') {
                i += 1;
                loop {
                    match ext.get(i) {
                        None => return bad(),
                        Some(b'"') => {
                            i += 1;
                            break;
                        }
                        Some(b'\\') => {
                            if !ext.get(i + 1).is_some_and(|&b| is_field_byte(b)) {
                                return bad();
                            }
                            i += 2;
                        }
                        Some(&b) if is_field_byte(b) => i += 1,
                        Some(_) => return bad(),
                    }
                }
            } else if !token(&mut i) {
                return bad();
            }
        }
    }
}

/// Parses a chunked body (RFC 9112 §7.1) at the start of `buf`.
pub fn parse_chunked(buf: &[u8]) -> Parse<Chunked> {
    let mut out = Chunked::default();
    let mut at = 0;
    loop {
        let (l, next) = step!(line(buf, at));
        let digits = l.iter().take_while(|b| b.is_ascii_hexdigit()).count();
        if digits == 0 {
            return Parse::Bad(format!("chunk size line {:?} does not start with a hex digit", show(l, 30)));
        }
        if digits > 16 {
            return Parse::Bad(format!("chunk size {:?} over 64 bits", show(&l[..digits], 30)));
        }
        let size = u64::from_str_radix(std::str::from_utf8(&l[..digits]).unwrap(), 16).unwrap();
        let ext = &l[digits..];
        if !ext.is_empty() {
            if let Err(reason) = check_chunk_ext(ext) {
                return Parse::Bad(reason);
            }
            out.extensions = true;
        }
        at = next;
        if size == 0 {
            let (trailers, end) = step!(field_lines(buf, at));
            out.trailers = trailers;
            out.len = end;
            return Parse::Done(out);
        }
        let size = usize::try_from(size).unwrap_or(usize::MAX);
        let Some(data_end) = at.checked_add(size) else { return Parse::Partial };
        if buf.len() < data_end.saturating_add(2) {
            // What has arrived of the line end must already be right.
            if buf.len() > data_end && buf[data_end] != b'\r' {
                return Parse::Bad("chunk data not followed by CRLF".to_owned());
            }
            return Parse::Partial;
        }
        if &buf[data_end..data_end + 2] != b"\r\n" {
            return Parse::Bad(format!(
                "chunk data not followed by CRLF but {:?}",
                show(&buf[data_end..(data_end + 8).min(buf.len())], 8)
            ));
        }
        out.data.extend_from_slice(&buf[at..data_end]);
        at = data_end + 2;
    }
}

/// Hop-by-hop fields (RFC 9110 §7.6.1 and the rules' R4) a proxy must not forward; `x-h` and
/// `x-hop-*` are the names the corpus lists in `Connection`.
fn is_forbidden_upstream_field(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    ["keep-alive", "proxy-connection", "te", "upgrade", "proxy-authorization", "x-h"]
        .contains(&lower.as_str())
        || lower.starts_with("x-hop-")
}

/// A request as an upstream sees it.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub target: String,
    pub fields: Vec<Field>,
    pub body: Vec<u8>,
    /// `content-length`, `chunked` or `none`.
    pub framing: &'static str,
    pub len: usize,
}

impl Request {
    /// The values of `name`, in order.
    pub fn header(&self, name: &str) -> Vec<String> {
        values(&self.fields, name).map(Field::text).collect()
    }
}

/// Parses a request a proxy forwarded: everything [`parse_head`] checks, plus an origin-form
/// target, `HTTP/1.1`, exactly one valid `Host`, no `_` in field names, no hop-by-hop fields,
/// and unambiguous framing (one `Content-Length` of digits, or `Transfer-Encoding: chunked`
/// alone, never both).
pub fn parse_request(buf: &[u8]) -> Parse<Request> {
    let head = step!(parse_head(buf));
    let parts: Vec<&[u8]> = head.start.split(|&b| b == b' ').collect();
    let [method, target, version] = parts.as_slice() else {
        return Parse::Bad(format!("request line {:?} is not three parts", show(&head.start, 60)));
    };
    if !is_token(method) {
        return Parse::Bad(format!("invalid method {:?}", show(method, 30)));
    }
    if target.first() != Some(&b'/') || !target.iter().all(|&b| (0x21..=0x7e).contains(&b) && b != b'#') {
        return Parse::Bad(format!("request target {:?} is not origin-form", show(target, 60)));
    }
    if *version != b"HTTP/1.1" {
        return Parse::Bad(format!("version {:?}", show(version, 20)));
    }
    if let Some(f) = head.fields.iter().find(|f| f.name.contains('_')) {
        return Parse::Bad(format!("field name with an underscore: {}", f.name));
    }
    if let Some(f) = head.fields.iter().find(|f| is_forbidden_upstream_field(&f.name)) {
        return Parse::Bad(format!("hop-by-hop field forwarded: {}: {}", f.name, show(&f.value, 30)));
    }
    let hosts: Vec<&Field> = values(&head.fields, "host").collect();
    match hosts.as_slice() {
        [host] if is_valid_authority(&host.value) => {}
        [host] => return Parse::Bad(format!("invalid Host {:?}", show(&host.value, 40))),
        _ => return Parse::Bad(format!("{} Host fields", hosts.len())),
    }
    let te: Vec<&Field> = values(&head.fields, "transfer-encoding").collect();
    let cl: Vec<&Field> = values(&head.fields, "content-length").collect();
    let (body, framing, len) = match (te.as_slice(), cl.as_slice()) {
        ([_, ..], [_, ..]) => return Parse::Bad("both Transfer-Encoding and Content-Length".to_owned()),
        ([te], []) if te.value.eq_ignore_ascii_case(b"chunked") => {
            let chunked = step!(parse_chunked(&buf[head.len..]));
            (chunked.data, "chunked", head.len + chunked.len)
        }
        ([_, ..], []) => {
            let all: Vec<String> = te.iter().map(|f| f.text()).collect();
            return Parse::Bad(format!("Transfer-Encoding is not exactly chunked: {all:?}"));
        }
        ([], [cl]) => {
            if cl.value.is_empty() || cl.value.len() > 18 || !cl.value.iter().all(u8::is_ascii_digit) {
                return Parse::Bad(format!("Content-Length {:?}", show(&cl.value, 30)));
            }
            let n: usize = cl.text().parse().unwrap();
            if buf.len() < head.len + n {
                return Parse::Partial;
            }
            (buf[head.len..head.len + n].to_vec(), "content-length", head.len + n)
        }
        ([], [_, _, ..]) => return Parse::Bad(format!("{} Content-Length fields", cl.len())),
        ([], []) => (Vec::new(), "none", head.len),
    };
    Parse::Done(Request {
        method: String::from_utf8_lossy(method).into_owned(),
        target: String::from_utf8_lossy(target).into_owned(),
        fields: head.fields,
        body,
        framing,
        len,
    })
}

/// How a parsed response's body was framed.
#[derive(Debug, Clone)]
pub enum Framing {
    /// HEAD, 1xx, 204, 304.
    NoBody,
    Length,
    Chunked(Chunked),
    UntilClose,
}

/// A response as a client sees it.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub fields: Vec<Field>,
    pub body: Vec<u8>,
    pub framing: Framing,
    pub len: usize,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<String> {
        values(&self.fields, name).next().map(Field::text)
    }

    pub fn count(&self, name: &str) -> usize {
        values(&self.fields, name).count()
    }

    /// The connection ends after this response (`Connection: close`, or a body until close).
    pub fn closes(&self) -> bool {
        matches!(self.framing, Framing::UntilClose)
            || values(&self.fields, "connection")
                .any(|f| f.text().split(',').any(|t| t.trim().eq_ignore_ascii_case("close")))
    }

    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Parses a response at the start of `buf`; `head_request` says it answers a HEAD, `at_eof`
/// that no more bytes will come (a body without length ends there).
pub fn parse_response(buf: &[u8], head_request: bool, at_eof: bool) -> Parse<Response> {
    let head = step!(parse_head(buf));
    let start = &head.start;
    let Some(rest) = start.strip_prefix(b"HTTP/1.1 ").or_else(|| start.strip_prefix(b"HTTP/1.0 ")) else {
        return Parse::Bad(format!("status line {:?}", show(start, 60)));
    };
    if rest.len() < 4 || !rest[..3].iter().all(u8::is_ascii_digit) || rest[3] != b' ' {
        return Parse::Bad(format!("status line {:?}", show(start, 60)));
    }
    if let Some(b) = rest[4..].iter().find(|&&b| !is_field_byte(b)) {
        return Parse::Bad(format!("control byte 0x{b:02x} in the reason phrase"));
    }
    let status: u16 = std::str::from_utf8(&rest[..3]).unwrap().parse().unwrap();
    if !(100..=599).contains(&status) {
        return Parse::Bad(format!("status {status}"));
    }
    let te: Vec<&Field> = values(&head.fields, "transfer-encoding").collect();
    let cl: Vec<&Field> = values(&head.fields, "content-length").collect();
    if !te.is_empty() && !cl.is_empty() {
        return Parse::Bad("both Transfer-Encoding and Content-Length".to_owned());
    }
    if cl.len() > 1 {
        return Parse::Bad(format!("{} Content-Length fields", cl.len()));
    }
    if let [cl] = cl.as_slice() {
        if cl.value.is_empty() || cl.value.len() > 18 || !cl.value.iter().all(u8::is_ascii_digit) {
            return Parse::Bad(format!("Content-Length {:?}", show(&cl.value, 30)));
        }
    }
    if te.len() > 1 || te.first().is_some_and(|f| !f.value.eq_ignore_ascii_case(b"chunked")) {
        let all: Vec<String> = te.iter().map(|f| f.text()).collect();
        return Parse::Bad(format!("Transfer-Encoding is not exactly chunked: {all:?}"));
    }
    let rest = &buf[head.len..];
    let (body, framing, len) = if head_request || status < 200 || status == 204 || status == 304 {
        (Vec::new(), Framing::NoBody, head.len)
    } else if !te.is_empty() {
        let chunked = step!(parse_chunked(rest));
        let len = head.len + chunked.len;
        (chunked.data.clone(), Framing::Chunked(chunked), len)
    } else if let [cl] = cl.as_slice() {
        let n: usize = cl.text().parse().unwrap();
        if rest.len() < n {
            return Parse::Partial;
        }
        (rest[..n].to_vec(), Framing::Length, head.len + n)
    } else if at_eof {
        (rest.to_vec(), Framing::UntilClose, buf.len())
    } else {
        return Parse::Partial;
    };
    Parse::Done(Response { status, fields: head.fields, body, framing, len })
}

/// Names embedded in targets so that recordings can be tied to the case that sent them.
pub const MARKERS: [&str; 6] = ["/case-", "/canary-", "/smuggled-", "/prime-", "/first-", "/second-"];

/// Every `(marker, number)` in `bytes`, e.g. `("/case-", 17)` for `/case-17`.
pub fn markers(bytes: &[u8]) -> Vec<(&'static str, usize)> {
    let mut found = Vec::new();
    for marker in MARKERS {
        let m = marker.as_bytes();
        let mut i = 0;
        while i + m.len() <= bytes.len() {
            if &bytes[i..i + m.len()] == m {
                let digits: Vec<u8> =
                    bytes[i + m.len()..].iter().copied().take_while(u8::is_ascii_digit).take(9).collect();
                if let Ok(n) = std::str::from_utf8(&digits).unwrap().parse() {
                    if !found.contains(&(marker, n)) {
                        found.push((marker, n));
                    }
                }
                i += m.len();
            } else {
                i += 1;
            }
        }
    }
    found
}

/// What a recording upstream saw.
#[derive(Debug, Clone)]
pub enum Seen {
    Request(Request),
    /// Bytes the strict parser refused; the upstream answered 400 and closed.
    Violation(String),
    /// The connection closed with part of a request unread (e.g. a body the proxy gave up on).
    Aborted,
}

#[derive(Debug, Clone)]
pub struct Recorded {
    /// Upstream connection number.
    pub conn: usize,
    pub seen: Seen,
    /// The bytes of the request, or the unparsed rest of the connection's input.
    pub raw: Vec<u8>,
    /// Target of the request before it on the same connection.
    pub previous: Option<String>,
}

impl Recorded {
    /// The cases this recording belongs to: by the request target's marker for a request, by
    /// every marker in the bytes (or, when they name none, the request before them) otherwise.
    pub fn case_numbers(&self) -> Vec<usize> {
        match &self.seen {
            Seen::Request(req) => markers(req.target.as_bytes()).into_iter().map(|(_, n)| n).collect(),
            _ => {
                // The request before on the same connection only when the bytes name none: a
                // pooled connection carries other cases' requests.
                let mut all: Vec<usize> = markers(&self.raw).into_iter().map(|(_, n)| n).collect();
                if let (true, Some(prev)) = (all.is_empty(), &self.previous) {
                    all.extend(markers(prev.as_bytes()).into_iter().map(|(_, n)| n));
                }
                all.sort_unstable();
                all.dedup();
                all
            }
        }
    }
}

/// Everything a recording upstream saw, in order.
#[derive(Debug, Default)]
pub struct Recording {
    events: Mutex<Vec<Recorded>>,
    connections: AtomicUsize,
    /// Connections whose input is not read to its end yet.
    open: AtomicUsize,
}

impl Recording {
    pub fn events(&self) -> Vec<Recorded> {
        self.events.lock().unwrap().clone()
    }

    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// Connections still open: once there are none, nothing more can be recorded.
    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    fn push(&self, recorded: Recorded) {
        self.events.lock().unwrap().push(recorded);
    }
}

/// An upstream that parses each request strictly ([`parse_request`]), records it and answers
/// `200` with the body `seen <method> <target>`, keeping the connection open. Bytes it cannot
/// parse are recorded as a [`Seen::Violation`], answered with a 400 that names no request, and
/// the connection is closed.
pub async fn spawn_recording_upstream() -> (SocketAddr, Arc<Recording>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let recording = Arc::new(Recording::default());
    let rec = recording.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let conn = rec.connections.fetch_add(1, Ordering::SeqCst);
            rec.open.fetch_add(1, Ordering::SeqCst);
            let rec = rec.clone();
            tokio::spawn(async move {
                record_connection(stream, conn, rec.clone()).await;
                rec.open.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    (addr, recording)
}

async fn record_connection(mut stream: TcpStream, conn: usize, rec: Arc<Recording>) {
    let mut buf = Vec::new();
    let mut previous: Option<String> = None;
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        while !buf.is_empty() {
            match parse_request(&buf) {
                Parse::Done(req) => {
                    let raw = buf.drain(..req.len).collect();
                    let body = format!("seen {} {}", req.method, req.target);
                    let answer = if req.method == "HEAD" {
                        format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n",
                            body.len()
                        )
                    } else {
                        format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{body}",
                            body.len()
                        )
                    };
                    let target = req.target.clone();
                    rec.push(Recorded { conn, seen: Seen::Request(req), raw, previous: previous.clone() });
                    previous = Some(target);
                    if stream.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                }
                Parse::Partial => break,
                Parse::Bad(reason) => {
                    rec.push(Recorded {
                        conn,
                        seen: Seen::Violation(reason),
                        raw: buf.clone(),
                        previous: previous.clone(),
                    });
                    let _ = stream
                        .write_all(
                            b"HTTP/1.1 400 Bad Request\r\nx-upstream-violation: 1\r\ncontent-length: 9\r\n\
                              connection: close\r\n\r\nviolation",
                        )
                        .await;
                    let _ = stream.shutdown().await;
                    return;
                }
            }
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => {
                if !buf.is_empty() {
                    rec.push(Recorded { conn, seen: Seen::Aborted, raw: buf, previous });
                }
                return;
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// What a scripted upstream writes for one request.
#[derive(Debug, Clone)]
pub struct Script {
    /// Written at once, as the answer.
    pub answer: Vec<u8>,
    /// Written on the same socket after a pause, whatever happened meanwhile.
    pub later: Option<(Duration, Vec<u8>)>,
    /// Close the connection after the answer (and no later bytes).
    pub close: bool,
}

/// An upstream that answers each request whose target `script` knows with that script, and
/// every other request (on any connection) with `200`, `Content-Length` and the body
/// `clean <target>`. Request bodies are not read: the proxy sends these upstreams GETs only.
/// Also returns how many scripted late writes are still to come: each is counted before its
/// request is answered.
pub async fn spawn_scripted_upstream<F>(script: F) -> (SocketAddr, Arc<AtomicUsize>)
where
    F: Fn(&str) -> Option<Script> + Send + Sync + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let script = Arc::new(script);
    let late_pending = Arc::new(AtomicUsize::new(0));
    let pending = late_pending.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (script, pending) = (script.clone(), pending.clone());
            tokio::spawn(async move {
                let (mut reader, writer) = stream.into_split();
                let writer = Arc::new(tokio::sync::Mutex::new(writer));
                let mut buf = Vec::new();
                let mut chunk = [0u8; 8192];
                loop {
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head: Vec<u8> = buf.drain(..end + 4).collect();
                        let first = head.split(|&b| b == b'\r').next().unwrap_or_default();
                        let target =
                            String::from_utf8_lossy(first).split(' ').nth(1).unwrap_or_default().to_owned();
                        match script(&target) {
                            Some(s) => {
                                let later = s.later.filter(|_| !s.close);
                                if later.is_some() {
                                    pending.fetch_add(1, Ordering::SeqCst);
                                }
                                let mut w = writer.lock().await;
                                let _ = w.write_all(&s.answer).await;
                                if s.close {
                                    let _ = w.shutdown().await;
                                    return;
                                }
                                drop(w);
                                if let Some((pause, bytes)) = later {
                                    let (writer, pending) = (writer.clone(), pending.clone());
                                    tokio::spawn(async move {
                                        tokio::time::sleep(pause).await;
                                        let _ = writer.lock().await.write_all(&bytes).await;
                                        pending.fetch_sub(1, Ordering::SeqCst);
                                    });
                                }
                            }
                            None => {
                                let body = format!("clean {target}");
                                let answer = format!(
                                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                                    body.len()
                                );
                                if writer.lock().await.write_all(answer.as_bytes()).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                    match reader.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
            });
        }
    });
    (addr, late_pending)
}

/// What a [`RawConn`] read next.
#[derive(Debug, Clone)]
pub enum Answer {
    /// A complete final response (interim 1xx responses other than 101 are skipped).
    Response(Response),
    /// The peer closed with nothing pending.
    Closed,
    /// The peer closed part-way through a response; the bytes of that response so far.
    Cut(Vec<u8>),
    /// Bytes that cannot be a valid response, and why.
    Malformed(String, Vec<u8>),
    /// Nothing complete before the deadline; the bytes pending.
    Timeout(Vec<u8>),
}

/// A raw client connection.
pub struct RawConn {
    stream: TcpStream,
    buf: Vec<u8>,
    eof: bool,
    broken: bool,
    /// Every byte received so far.
    pub received: Vec<u8>,
    /// Interim responses skipped.
    pub interim: Vec<u16>,
}

impl RawConn {
    pub async fn connect(addr: SocketAddr) -> RawConn {
        let stream = TcpStream::connect(addr).await.expect("connect to the proxy");
        stream.set_nodelay(true).unwrap();
        RawConn {
            stream,
            buf: Vec::new(),
            eof: false,
            broken: false,
            received: Vec::new(),
            interim: Vec::new(),
        }
    }

    /// Writes `bytes`; false when the connection is gone.
    pub async fn send(&mut self, bytes: &[u8]) -> bool {
        self.stream.write_all(bytes).await.is_ok()
    }

    pub fn is_closed(&self) -> bool {
        (self.eof && self.buf.is_empty()) || self.broken
    }

    /// Reads the next final response, up to `deadline`.
    pub async fn next_answer(&mut self, head_request: bool, deadline: Instant) -> Answer {
        let mut chunk = [0u8; 16 * 1024];
        loop {
            if self.broken {
                return Answer::Closed;
            }
            if !self.buf.is_empty() {
                match parse_response(&self.buf, head_request, self.eof) {
                    Parse::Done(r) => {
                        self.buf.drain(..r.len);
                        if (100..200).contains(&r.status) && r.status != 101 {
                            self.interim.push(r.status);
                            continue;
                        }
                        return Answer::Response(r);
                    }
                    Parse::Bad(reason) => {
                        self.broken = true;
                        return Answer::Malformed(reason, std::mem::take(&mut self.buf));
                    }
                    Parse::Partial if self.eof => {
                        self.broken = true;
                        return Answer::Cut(std::mem::take(&mut self.buf));
                    }
                    Parse::Partial => {}
                }
            } else if self.eof {
                return Answer::Closed;
            }
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) => self.eof = true,
                Ok(Ok(n)) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    self.received.extend_from_slice(&chunk[..n]);
                }
                Err(_) => return Answer::Timeout(self.buf.clone()),
            }
        }
    }
}
