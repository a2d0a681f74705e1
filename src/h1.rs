//! HTTP/1.1 on the hot path: message heads parsed in place and rewritten straight into bytes,
//! and the framing of message bodies.
//!
//! Most client traffic is plain keep-alive HTTP/1.1 with small or no bodies. For that traffic
//! [`crate::listener`] serves the connection itself with this codec: no header map, no second
//! task per upstream connection, one read and one write each way per request. Anything else —
//! HTTP/2, HTTP/1.0, protocol switches, `Expect`, chunked or large uploads, malformed or oversized
//! heads — is handed to hyper with the bytes already read ([`Rewind`]), so every unusual case
//! keeps hyper's handling. The header rules are the same as [`crate::headers`]': hop-by-hop
//! fields stay behind (RFC 9110 §7.6.1), `X-Forwarded-*` are set.

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::BytesMut;
use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

use crate::headers;

/// Most header lines a head may have here; a request with more goes to hyper, a response with
/// more is refused.
pub const MAX_HEADERS: usize = 100;

/// Largest request body read into memory on the fast path; a larger one goes to hyper, which
/// streams it.
pub const MAX_BUFFERED_BODY: u64 = 64 * 1024;

/// Request headers that describe one hop (RFC 9110 §7.6.1) or that the proxy sets itself.
fn is_dropped_request_header(name: &str) -> bool {
    headers::is_hop_by_hop(name)
        || [&headers::X_FORWARDED_FOR, &headers::X_FORWARDED_PROTO, &headers::X_FORWARDED_HOST]
            .iter()
            .any(|h| h.as_str().eq_ignore_ascii_case(name))
}

/// A client request head the fast path can serve.
#[derive(Debug)]
pub struct RequestHead<'b> {
    pub method: &'b str,
    /// Origin-form target: path and query.
    pub target: &'b str,
    headers: &'b [httparse::Header<'b>],
    host: &'b [u8],
    /// Length of the head in bytes, the blank line included.
    pub len: usize,
    pub content_length: u64,
    /// The client asked to close the connection after this exchange.
    pub close: bool,
}

impl<'b> RequestHead<'b> {
    pub fn path(&self) -> &'b str {
        self.target.split_once('?').map_or(self.target, |(path, _)| path)
    }

    pub fn query(&self) -> Option<&'b str> {
        self.target.split_once('?').map(|(_, query)| query)
    }
}

impl crate::session::HeaderSource for RequestHead<'_> {
    fn values<'a>(&'a self, name: &str) -> impl Iterator<Item = &'a str> {
        self.headers
            .iter()
            .filter(move |h| h.name.eq_ignore_ascii_case(name))
            .filter_map(|h| -> Option<&'a str> { std::str::from_utf8(h.value).ok() })
    }
}

/// What a buffer holds.
#[derive(Debug)]
pub enum ParsedRequest<'b> {
    /// The head is not complete yet.
    Partial,
    /// A request the fast path leaves to hyper (see the module docs).
    Unsupported,
    Complete(RequestHead<'b>),
}

/// Parses the request head at the start of `buf`; `headers` is the space for its header lines.
pub fn parse_request<'b>(
    buf: &'b [u8],
    headers: &'b mut [MaybeUninit<httparse::Header<'b>>; MAX_HEADERS],
) -> ParsedRequest<'b> {
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(buf, headers) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return ParsedRequest::Partial,
        Err(_) => return ParsedRequest::Unsupported,
    };
    let (Some(method), Some(target), Some(1)) = (req.method, req.path, req.version) else {
        return ParsedRequest::Unsupported;
    };
    if method == "CONNECT" || !target.starts_with('/') {
        return ParsedRequest::Unsupported;
    }
    let mut host = None;
    let mut content_length = None;
    let mut close = false;
    for header in req.headers.iter() {
        let name = header.name;
        if name.eq_ignore_ascii_case("host") {
            if host.replace(header.value).is_some() {
                return ParsedRequest::Unsupported;
            }
        } else if name.eq_ignore_ascii_case("content-length") {
            match parse_length(header.value) {
                Some(n) if content_length.is_none() => content_length = Some(n),
                _ => return ParsedRequest::Unsupported,
            }
        } else if name.eq_ignore_ascii_case("connection") {
            // Only the common tokens: naming other headers for removal is left to hyper's path.
            for token in header.value.split(|&b| b == b',') {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if !token.eq_ignore_ascii_case(b"keep-alive") && !token.is_empty() {
                    return ParsedRequest::Unsupported;
                }
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding")
            || name.eq_ignore_ascii_case("upgrade")
            || name.eq_ignore_ascii_case("expect")
        {
            return ParsedRequest::Unsupported;
        }
    }
    let content_length = content_length.unwrap_or(0);
    let Some(host) = host else { return ParsedRequest::Unsupported };
    if content_length > MAX_BUFFERED_BODY {
        return ParsedRequest::Unsupported;
    }
    ParsedRequest::Complete(RequestHead {
        method,
        target,
        headers: req.headers,
        host,
        len,
        content_length,
        close,
    })
}

/// Decimal digits only, as RFC 9110 §8.6 allows.
fn parse_length(value: &[u8]) -> Option<u64> {
    if value.is_empty() || value.len() > 15 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(value.iter().fold(0, |n, &d| n * 10 + u64::from(d - b'0')))
}

/// Writes the upstream request for `head`: the same method and target, the client's headers
/// without hop-by-hop ones, and `X-Forwarded-Host`, `-For` (appended to) and `-Proto`.
pub fn write_request(out: &mut Vec<u8>, head: &RequestHead<'_>, client_ip: &str, proto: &str) {
    out.clear();
    out.extend_from_slice(head.method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(head.target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut forwarded_for = false;
    for header in head.headers {
        if is_dropped_request_header(header.name) {
            continue;
        }
        put_header(out, header.name.as_bytes(), header.value);
    }
    put_header(out, b"x-forwarded-host", head.host);
    out.extend_from_slice(b"x-forwarded-for: ");
    for previous in head.headers.iter().filter(|h| h.name.eq_ignore_ascii_case("x-forwarded-for")) {
        if forwarded_for {
            out.extend_from_slice(b", ");
        }
        out.extend_from_slice(previous.value);
        forwarded_for = true;
    }
    if forwarded_for {
        out.extend_from_slice(b", ");
    }
    out.extend_from_slice(client_ip.as_bytes());
    out.extend_from_slice(b"\r\n");
    put_header(out, b"x-forwarded-proto", proto.as_bytes());
    out.extend_from_slice(b"\r\n");
}

fn put_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// How a response body ends.
#[derive(Debug)]
pub enum Framing {
    /// No body (HEAD, 204, 304).
    Empty,
    Length(u64),
    /// Passed through as is; the scanner finds the last chunk.
    Chunked(ChunkScanner),
    /// Until the upstream closes; the client connection is closed after it.
    UntilClose,
}

/// An upstream response head, rewritten for the client.
#[derive(Debug)]
pub struct ResponseHead {
    pub status: u16,
    /// Length of the upstream head in its buffer.
    pub len: usize,
    pub framing: Framing,
    /// The upstream keeps the connection open after this response (RFC 9112 §9.3): not after
    /// `Connection: close`, nor from an HTTP/1.0 server that did not ask for keep-alive.
    pub keep_alive: bool,
}

/// What the client end of an exchange asks of the response.
#[derive(Debug, Clone, Copy)]
pub struct ResponseRules {
    /// The request was HEAD: no body whatever the head says.
    pub head_request: bool,
    /// `x-rollout-pool` value, when the header is on.
    pub pool: Option<&'static str>,
}

/// Why an upstream response head could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ResponseError {
    #[error("malformed response head: {0}")]
    Malformed(#[from] httparse::Error),
    #[error("response head has an invalid {0}")]
    Invalid(&'static str),
    #[error("response head is over {0} bytes")]
    TooLarge(usize),
}

/// Parses the upstream response head at the start of `buf` and writes the client's version of
/// it to `out`, all but its end: [`finish_response_head`] adds that once it is known whether the
/// client connection stays open. `Ok(None)`: not complete yet. Interim (1xx) responses are
/// skipped: the fast path never asks for them.
pub fn rewrite_response(
    buf: &[u8],
    rules: ResponseRules,
    out: &mut Vec<u8>,
) -> Result<Option<ResponseHead>, ResponseError> {
    let mut headers = [MaybeUninit::<httparse::Header<'_>>::uninit(); MAX_HEADERS];
    let mut res = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut res,
        buf,
        &mut headers,
    )? {
        httparse::Status::Complete(len) => len,
        httparse::Status::Partial => return Ok(None),
    };
    let status = res.code.ok_or(ResponseError::Invalid("status"))?;
    if (100..200).contains(&status) {
        if status == 101 {
            return Err(ResponseError::Invalid("protocol switch"));
        }
        // Skipped: the caller drops `len` bytes and parses again.
        return Ok(Some(ResponseHead { status, len, framing: Framing::Empty, keep_alive: true }));
    }

    let mut content_length = None;
    let mut chunked = false;
    let mut encoded = false;
    let mut connection_named: [&[u8]; 8] = [b""; 8];
    let mut named = 0;
    let mut close = false;
    let mut keep_alive_token = false;
    for header in res.headers.iter() {
        if header.name.eq_ignore_ascii_case("content-length") {
            let n = parse_length(header.value).ok_or(ResponseError::Invalid("content-length"))?;
            if content_length.is_some_and(|m| m != n) {
                return Err(ResponseError::Invalid("content-length"));
            }
            content_length = Some(n);
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            encoded = true;
            let last = header.value.rsplit(|&b| b == b',').next().unwrap_or_default();
            chunked = last.trim_ascii().eq_ignore_ascii_case(b"chunked");
        } else if header.name.eq_ignore_ascii_case("connection") {
            for token in header.value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                close |= token.eq_ignore_ascii_case(b"close");
                keep_alive_token |= token.eq_ignore_ascii_case(b"keep-alive");
                if named < connection_named.len() && !token.is_empty() {
                    connection_named[named] = token;
                    named += 1;
                }
            }
        }
    }
    let framing = if rules.head_request || status == 204 || status == 304 {
        Framing::Empty
    } else if encoded {
        // RFC 9112 §6.3: Transfer-Encoding wins over Content-Length; a body whose final coding
        // is not chunked ends with the connection.
        if chunked {
            Framing::Chunked(ChunkScanner::default())
        } else {
            Framing::UntilClose
        }
    } else {
        match content_length {
            Some(n) => Framing::Length(n),
            None => Framing::UntilClose,
        }
    };

    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(itoa3(status).as_slice());
    out.push(b' ');
    out.extend_from_slice(res.reason.unwrap_or_default().as_bytes());
    out.extend_from_slice(b"\r\n");
    let named = &connection_named[..named];
    for header in res.headers.iter() {
        let name = header.name;
        // The body is relayed as it came, so its Transfer-Encoding stays; a Content-Length next
        // to it would describe the coded bytes wrongly (RFC 9112 §6.3).
        let hop = (headers::is_hop_by_hop(name) && !name.eq_ignore_ascii_case("transfer-encoding"))
            || (encoded && name.eq_ignore_ascii_case("content-length"))
            || (named.iter().any(|n| n.eq_ignore_ascii_case(name.as_bytes()))
                && !name.eq_ignore_ascii_case("content-length")
                && !name.eq_ignore_ascii_case("transfer-encoding"))
            || (rules.pool.is_some() && name.eq_ignore_ascii_case("x-rollout-pool"));
        if !hop {
            put_header(out, name.as_bytes(), header.value);
        }
    }
    if let Some(pool) = rules.pool {
        put_header(out, b"x-rollout-pool", pool.as_bytes());
    }
    let keep_alive = if res.version == Some(0) { keep_alive_token && !close } else { !close };
    Ok(Some(ResponseHead { status, len, framing, keep_alive }))
}

/// Ends a head [`rewrite_response`] wrote; `close` says the client connection ends after this
/// response (it does anyway after a body that ends with the upstream connection).
pub fn finish_response_head(out: &mut Vec<u8>, framing: &Framing, close: bool) {
    if close || matches!(framing, Framing::UntilClose) {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// Writes a short proxy-made response; `body` is followed by a line end. The answer to a HEAD
/// request (`head_request`) has the same head and no body.
pub fn write_simple_response(
    out: &mut Vec<u8>,
    status: http::StatusCode,
    headers: &[(&str, &str)],
    body: &str,
    head_request: bool,
    close: bool,
) {
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or_default().as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in headers {
        put_header(out, name.as_bytes(), value.as_bytes());
    }
    put_header(out, b"content-length", (body.len() + 1).to_string().as_bytes());
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if !head_request {
        out.extend_from_slice(body.as_bytes());
        out.push(b'\n');
    }
}

fn itoa3(status: u16) -> [u8; 3] {
    let s = status.min(999);
    [b'0' + (s / 100) as u8, b'0' + (s / 10 % 10) as u8, b'0' + (s % 10) as u8]
}

/// Finds the end of a chunked body (RFC 9112 §7.1) in bytes that pass through unchanged.
#[derive(Debug, Default)]
pub struct ChunkScanner {
    state: ChunkState,
    remaining: u64,
    digits: u8,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    #[default]
    Size,
    /// Chunk extension, up to the line end.
    Extension,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    /// At the start of a trailer line (or the final blank line).
    TrailerStart,
    TrailerLine,
    TrailerLf,
    FinalLf,
    Done,
}

#[derive(Debug, thiserror::Error)]
#[error("malformed chunked body")]
pub struct ChunkError;

impl ChunkScanner {
    /// Feeds the next bytes of the body; `Some(n)`: the body ends after `n` of them.
    pub fn scan(&mut self, data: &[u8]) -> Result<Option<usize>, ChunkError> {
        let mut i = 0;
        while i < data.len() {
            let b = data[i];
            match self.state {
                ChunkState::Size => match b {
                    b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                        self.digits += 1;
                        if self.digits > 15 {
                            return Err(ChunkError);
                        }
                        let digit = (b as char).to_digit(16).unwrap_or(0);
                        self.remaining = self.remaining * 16 + u64::from(digit);
                    }
                    b';' | b' ' | b'\t' if self.digits > 0 => self.state = ChunkState::Extension,
                    b'\r' if self.digits > 0 => self.state = ChunkState::SizeLf,
                    _ => return Err(ChunkError),
                },
                ChunkState::Extension => {
                    if b == b'\r' {
                        self.state = ChunkState::SizeLf;
                    }
                }
                ChunkState::SizeLf => {
                    if b != b'\n' {
                        return Err(ChunkError);
                    }
                    self.digits = 0;
                    self.state =
                        if self.remaining == 0 { ChunkState::TrailerStart } else { ChunkState::Data };
                }
                ChunkState::Data => {
                    let take = self.remaining.min((data.len() - i) as u64);
                    self.remaining -= take;
                    i += take as usize;
                    if self.remaining == 0 {
                        self.state = ChunkState::DataCr;
                    }
                    continue;
                }
                ChunkState::DataCr => {
                    if b != b'\r' {
                        return Err(ChunkError);
                    }
                    self.state = ChunkState::DataLf;
                }
                ChunkState::DataLf => {
                    if b != b'\n' {
                        return Err(ChunkError);
                    }
                    self.state = ChunkState::Size;
                }
                ChunkState::TrailerStart => {
                    self.state = if b == b'\r' { ChunkState::FinalLf } else { ChunkState::TrailerLine };
                }
                ChunkState::TrailerLine => {
                    if b == b'\r' {
                        self.state = ChunkState::TrailerLf;
                    }
                }
                ChunkState::TrailerLf => {
                    if b != b'\n' {
                        return Err(ChunkError);
                    }
                    self.state = ChunkState::TrailerStart;
                }
                ChunkState::FinalLf => {
                    if b != b'\n' {
                        return Err(ChunkError);
                    }
                    self.state = ChunkState::Done;
                    return Ok(Some(i + 1));
                }
                ChunkState::Done => return Ok(Some(i)),
            }
            i += 1;
        }
        Ok((self.state == ChunkState::Done).then_some(i))
    }
}

/// Reads more of `io` into `buf`, first making room for at least `room` bytes (reserving `grow`
/// when there is less); 0 when the peer has closed its side.
pub async fn fill<R: AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut BytesMut,
    room: usize,
    grow: usize,
) -> io::Result<usize> {
    if buf.capacity() - buf.len() < room {
        buf.reserve(grow);
    }
    io.read_buf(buf).await
}

/// A connection whose first bytes were already read: they are read again first. Used to hand a
/// connection to hyper part-way.
pub struct Rewind<T> {
    prefix: Bytes,
    inner: T,
}

impl<T> Rewind<T> {
    pub fn new(prefix: Bytes, inner: T) -> Self {
        Rewind { prefix, inner }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Rewind<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Rewind<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(raw: &str) -> Option<(String, bool, u64)> {
        let mut headers = [const { MaybeUninit::uninit() }; MAX_HEADERS];
        match parse_request(raw.as_bytes(), &mut headers) {
            ParsedRequest::Complete(head) => {
                let mut out = Vec::new();
                write_request(&mut out, &head, "10.0.0.9", "http");
                Some((String::from_utf8(out).unwrap(), head.close, head.content_length))
            }
            _ => None,
        }
    }

    #[test]
    fn a_plain_request_is_rewritten_with_forwarded_headers() {
        let (out, close, length) = request(
            "GET /a?b=1 HTTP/1.1\r\nHost: app\r\nKeep-Alive: 5\r\nX-Forwarded-For: 1.1.1.1\r\n\
             X-Forwarded-For: 2.2.2.2\r\nX-Forwarded-Proto: evil\r\nCookie: c\r\n\r\n",
        )
        .unwrap();
        assert_eq!(
            out,
            "GET /a?b=1 HTTP/1.1\r\nHost: app\r\nCookie: c\r\nx-forwarded-host: app\r\n\
             x-forwarded-for: 1.1.1.1, 2.2.2.2, 10.0.0.9\r\nx-forwarded-proto: http\r\n\r\n"
        );
        assert!(!close);
        assert_eq!(length, 0);
    }

    #[test]
    fn unusual_requests_are_left_to_hyper() {
        for raw in [
            "GET / HTTP/1.0\r\nHost: a\r\n\r\n",
            "GET / HTTP/1.1\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nConnection: x-secret\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 9999999\r\n\r\n",
            "CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n",
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        ] {
            assert!(request(raw).is_none(), "{raw:?}");
        }
        let (_, close, length) =
            request("POST / HTTP/1.1\r\nHost: a\r\nConnection: close\r\nContent-Length: 12\r\n\r\n").unwrap();
        assert!(close);
        assert_eq!(length, 12);
    }

    fn response(raw: &str, rules: ResponseRules) -> (String, ResponseHead) {
        let mut out = Vec::new();
        let head = rewrite_response(raw.as_bytes(), rules, &mut out).unwrap().unwrap();
        finish_response_head(&mut out, &head.framing, false);
        (String::from_utf8(out).unwrap(), head)
    }

    const RULES: ResponseRules = ResponseRules { head_request: false, pool: Some("v1") };

    #[test]
    fn response_hop_by_hop_headers_stay_behind() {
        let (out, head) = response(
            "HTTP/1.1 200 OK\r\nConnection: keep-alive, x-hop\r\nX-Hop: 1\r\nKeep-Alive: 5\r\n\
             Content-Length: 2\r\nX-Rollout-Pool: forged\r\n\r\nok",
            RULES,
        );
        assert_eq!(out, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nx-rollout-pool: v1\r\n\r\n");
        assert!(matches!(head.framing, Framing::Length(2)));
        assert_eq!(head.len, 118);
        assert!(head.keep_alive);
    }

    #[test]
    fn an_upstream_that_closes_is_not_reused() {
        let keep = |raw: &str| response(raw, RULES).1.keep_alive;
        assert!(!keep("HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"));
        assert!(!keep("HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n"));
        assert!(keep("HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n"));
        assert!(keep("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"));
    }

    #[test]
    fn transfer_encoding_is_kept_and_content_length_next_to_it_dropped() {
        let (out, head) =
            response("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n", RULES);
        assert_eq!(out, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nx-rollout-pool: v1\r\n\r\n");
        assert!(matches!(head.framing, Framing::Chunked(_)));
        let (out, head) =
            response("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nContent-Length: 5\r\n\r\n", RULES);
        assert_eq!(
            out,
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nx-rollout-pool: v1\r\nconnection: close\r\n\r\n"
        );
        assert!(matches!(head.framing, Framing::UntilClose));
    }

    #[test]
    fn response_framing_follows_rfc_9112() {
        let framing = |raw: &str, rules| response(raw, rules).1.framing;
        assert!(matches!(
            framing("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n", RULES),
            Framing::Chunked(_)
        ));
        assert!(matches!(framing("HTTP/1.1 200 OK\r\n\r\n", RULES), Framing::UntilClose));
        assert!(matches!(framing("HTTP/1.1 204 No Content\r\n\r\n", RULES), Framing::Empty));
        let head = ResponseRules { head_request: true, ..RULES };
        assert!(matches!(framing("HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n", head), Framing::Empty));
        let (out, _) = response("HTTP/1.1 200 OK\r\n\r\n", ResponseRules { pool: None, ..RULES });
        assert_eq!(out, "HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n");
        let mut out = Vec::new();
        assert!(rewrite_response(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", RULES, &mut out).is_err());
        assert!(rewrite_response(b"HTTP/1.1 200 OK\r\nContent-Le", RULES, &mut out).unwrap().is_none());
    }

    #[test]
    fn chunk_scanner_finds_the_end_across_reads() {
        let body = b"5;ext=1\r\nhello\r\n10\r\n0123456789abcdef\r\n0\r\nTrailer: x\r\n\r\nNEXT";
        for split in 0..body.len() {
            let mut scanner = ChunkScanner::default();
            let (a, b) = body.split_at(split);
            let end = match scanner.scan(a).unwrap() {
                Some(n) => n,
                None => split + scanner.scan(b).unwrap().expect("end found"),
            };
            assert_eq!(end, body.len() - 4, "split at {split}");
        }
        assert!(ChunkScanner::default().scan(b"zz\r\n").is_err());
        assert_eq!(ChunkScanner::default().scan(b"0\r\n\r\n").unwrap(), Some(5));
    }
}
