//! HTTP/1.1 on the hot path: message heads parsed in place and rewritten straight into bytes,
//! chunked bodies re-framed, and the hand-over of a connection to hyper.
//!
//! Most client traffic is plain keep-alive HTTP/1.1 with small or no bodies. For that traffic
//! [`crate::listener`] serves the connection itself with this codec: no header map, no second
//! task per upstream connection, one read and one write each way per request. Anything else —
//! HTTP/2, HTTP/1.0, protocol switches, `Expect`, chunked or large uploads, absolute-form
//! targets, malformed or oversized heads, a `Host` that is missing or invalid — is handed to hyper
//! with the bytes already read ([`Rewind`]), so every unusual case keeps hyper's handling and the
//! refusals of [`crate::proxy`]. This module only parses and writes bytes: which fields go, what a
//! valid `Host` is and how a response must be framed are [`crate::headers`]' rules, the same ones
//! the hyper path calls. `src/proxy/LIFECYCLE.md` maps each step to its hyper twin.

use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use crate::headers::{self, ResponseFraming};

/// Most header lines a head may have here; a request with more goes to hyper, a response with
/// more is refused.
pub const MAX_HEADERS: usize = 100;

/// Largest request body read into memory on the fast path; a larger one goes to hyper, which
/// streams it.
pub(crate) const MAX_BUFFERED_BODY: u64 = 64 * 1024;

/// A client request head the fast path can serve.
#[derive(Debug)]
pub struct RequestHead<'b> {
    pub method: &'b str,
    /// Origin-form target, path and query, without a `#fragment` (which hyper's parser cuts off
    /// too: it never reaches routing, the session key or the upstream).
    pub target: &'b str,
    headers: &'b [httparse::Header<'b>],
    /// The one valid `Host` ([`headers::request_host`]).
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

    /// The header fields as they came, in order.
    pub fn fields(&self) -> impl Iterator<Item = (&'b str, &'b [u8])> + '_ {
        self.headers.iter().map(|h| (h.name, h.value))
    }
}

impl crate::session::HeaderSource for RequestHead<'_> {
    fn values<'a>(&'a self, name: &str) -> impl Iterator<Item = &'a str> {
        self.headers
            .iter()
            .filter(move |h| h.name.eq_ignore_ascii_case(name))
            .filter_map(|h| headers::text_value(h.value))
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
/// Anything this accepts, hyper's parser reads the same way (method, target, fields, body
/// length); the property tests in `tests/codec.rs` hold it to that.
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
    let Some(target) = plain_target(target).filter(|_| method != "CONNECT") else {
        return ParsedRequest::Unsupported;
    };
    let mut content_length = None;
    let mut close = false;
    let mut host_fields = headers::HostFields::default();
    for header in req.headers.iter() {
        let name = header.name;
        if name.eq_ignore_ascii_case("host") {
            host_fields.add(header.value);
        } else if name.eq_ignore_ascii_case("content-length") {
            match headers::parse_length(header.value) {
                Some(n) if content_length.is_none() => content_length = Some(n),
                _ => return ParsedRequest::Unsupported,
            }
        } else if name.eq_ignore_ascii_case("connection") {
            // Only the common tokens: naming other headers for removal is left to hyper's path.
            for token in headers::connection_tokens(header.value) {
                if token.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if !token.eq_ignore_ascii_case(b"keep-alive") {
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
    let Ok(host) = headers::request_host(None, host_fields) else {
        return ParsedRequest::Unsupported;
    };
    let content_length = content_length.unwrap_or(0);
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

/// The origin-form target without its `#fragment`, if it is made only of bytes that
/// `http::Uri` (hyper's) takes as they are in a path or a query, so both paths see the same
/// target; anything else is hyper's to judge. `http::Uri` reads nothing after a `#` either.
fn plain_target(target: &str) -> Option<&str> {
    let plain = target.bytes().position(|b| !PLAIN_TARGET[usize::from(b)]);
    let end = match plain {
        None => target.len(),
        Some(i) if target.as_bytes()[i] == b'#' => i,
        Some(_) => return None,
    };
    (target.starts_with('/') && target.len() < usize::from(u16::MAX)).then(|| &target[..end])
}

/// The bytes [`plain_target`] takes as they are: visible ASCII but for `"`, `<`, `>`, `` ` ``
/// and `#` (where the fragment starts). A table, as the target is scanned on every request.
static PLAIN_TARGET: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0x21;
    while b <= 0x7e {
        table[b] = !matches!(b as u8, b'"' | b'<' | b'>' | b'`' | b'#');
        b += 1;
    }
    table
};

/// Writes the upstream request for `head`: the same method and target, the client's headers
/// without the ones [`headers::is_dropped_request_field`] refuses, and `X-Forwarded-Host`, `-For`
/// (appended to) and `-Proto`. The hyper path's twin is [`headers::prepare_request`].
pub fn write_request(
    out: &mut Vec<u8>,
    head: &RequestHead<'_>,
    client_ip: &str,
    proto: &str,
    allow_underscores: bool,
) {
    out.clear();
    out.extend_from_slice(head.method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(head.target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for header in head.headers {
        if !headers::is_dropped_request_field(header.name, allow_underscores) {
            put_header(out, header.name.as_bytes(), header.value);
        }
    }
    put_header(out, b"x-forwarded-host", head.host);
    out.extend_from_slice(b"x-forwarded-for: ");
    let mut forwarded_for = false;
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
    /// Re-framed for the client by [`Chunked`].
    Chunked(Chunked),
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

/// Why an upstream response could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ResponseError {
    #[error("malformed response head: {0}")]
    Malformed(#[from] httparse::Error),
    #[error(transparent)]
    Invalid(#[from] headers::InvalidResponse),
    #[error("a protocol switch nobody asked for")]
    UnaskedSwitch,
    #[error("response head is over {0} bytes")]
    TooLarge(usize),
    #[error(transparent)]
    Body(#[from] ChunkError),
}

/// Parses the upstream response head at the start of `buf` and writes the client's version of
/// it to `out`, all but its end: [`finish_response_head`] adds that once it is known whether the
/// client connection stays open. `Ok(None)`: not complete yet. Interim (1xx) responses are
/// skipped: the fast path never asks for them. The hyper path's twin is
/// [`headers::prepare_response`].
pub fn rewrite_response(
    buf: &[u8],
    rules: ResponseRules,
    out: &mut Vec<u8>,
) -> Result<Option<ResponseHead>, ResponseError> {
    let mut fields = [MaybeUninit::<httparse::Header<'_>>::uninit(); MAX_HEADERS];
    let mut res = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut res,
        buf,
        &mut fields,
    )? {
        httparse::Status::Complete(len) => len,
        httparse::Status::Partial => return Ok(None),
    };
    let status = res.code.unwrap_or_default();
    if !headers::is_valid_status(status) {
        return Err(headers::InvalidResponse::Status(status).into());
    }
    if (100..200).contains(&status) {
        if status == 101 {
            return Err(ResponseError::UnaskedSwitch);
        }
        // Skipped: the caller drops `len` bytes and parses again.
        return Ok(Some(ResponseHead { status, len, framing: Framing::Empty, keep_alive: true }));
    }
    let (framing_fields, connection) = read_response_fields(res.headers)?;
    let no_body = rules.head_request || status == 204 || status == 304;
    let framing = match framing_fields {
        _ if no_body => Framing::Empty,
        ResponseFraming { chunked: true, .. } => Framing::Chunked(Chunked::default()),
        ResponseFraming { length: Some(n), .. } => Framing::Length(n),
        _ => Framing::UntilClose,
    };
    write_response_head(out, &res, &framing_fields, connection, &rules);
    let keep_alive =
        if res.version == Some(0) { connection.keep_alive && !connection.close } else { !connection.close };
    Ok(Some(ResponseHead { status, len, framing, keep_alive }))
}

/// What a response's `Connection` fields say (RFC 9110 §7.6.1).
#[derive(Debug, Default, Clone, Copy)]
struct ConnectionTokens {
    close: bool,
    keep_alive: bool,
    /// Some token names another field, which then stays behind.
    names_fields: bool,
}

/// Reads the fields that decide the response's framing and its connection's fate.
#[inline]
fn read_response_fields(
    fields: &[httparse::Header<'_>],
) -> Result<(ResponseFraming, ConnectionTokens), ResponseError> {
    let mut framing = ResponseFraming::default();
    let mut connection = ConnectionTokens::default();
    for field in fields {
        framing.read_field(field.name, field.value)?;
        if field.name.eq_ignore_ascii_case("connection") {
            for token in headers::connection_tokens(field.value) {
                if token.eq_ignore_ascii_case(b"close") {
                    connection.close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    connection.keep_alive = true;
                } else {
                    connection.names_fields = true;
                }
            }
        }
    }
    Ok((framing.finish(), connection))
}

/// Writes the head the client gets into `out`: the status line and the fields that pass
/// ([`headers::is_dropped_response_field`]), the proxy's own coding line for a re-framed body,
/// and `x-rollout-pool`.
#[inline]
fn write_response_head(
    out: &mut Vec<u8>,
    res: &httparse::Response<'_, '_>,
    framing: &ResponseFraming,
    connection: ConnectionTokens,
    rules: &ResponseRules,
) {
    let fields = &*res.headers;
    let connection_values =
        || fields.iter().filter(|h| h.name.eq_ignore_ascii_case("connection")).map(|h| h.value);
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(&itoa3(res.code.unwrap_or_default()));
    out.push(b' ');
    out.extend_from_slice(res.reason.unwrap_or_default().as_bytes());
    out.extend_from_slice(b"\r\n");
    let mut length_written = false;
    for field in fields {
        let name = field.name;
        // Most responses name no field in Connection: then there is nothing to look up per field.
        let named = connection.names_fields.then(connection_values).into_iter().flatten();
        if headers::is_dropped_response_field(name, framing, named)
            || (rules.pool.is_some() && name.eq_ignore_ascii_case("x-rollout-pool"))
        {
            continue;
        }
        if name.eq_ignore_ascii_case("content-length") && std::mem::replace(&mut length_written, true) {
            continue; // a repeated identical Content-Length is merged into the first
        }
        put_header(out, name.as_bytes(), field.value);
    }
    if framing.chunked {
        // The body is re-framed by the proxy, so the coding line is the proxy's own.
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    if let Some(pool) = rules.pool {
        put_header(out, b"x-rollout-pool", pool.as_bytes());
    }
}

/// Ends a head [`rewrite_response`] wrote; `close` says the client connection ends after this
/// response (it does anyway after a body that ends with the upstream connection).
pub(crate) fn finish_response_head(out: &mut Vec<u8>, framing: &Framing, close: bool) {
    if close || matches!(framing, Framing::UntilClose) {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// Writes a short proxy-made response; `body` is followed by a line end. The answer to a HEAD
/// request (`head_request`) has the same head and no body.
pub(crate) fn write_simple_response(
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

/// Most chunk-extension bytes a body may carry, all chunks together: hyper's own limit.
const MAX_EXTENSION_BYTES: u32 = 16 * 1024 - 1;
/// Most trailer-section bytes and lines (hyper allows 16 KiB and 100 lines).
const MAX_TRAILER_BYTES: u32 = 8192;
const MAX_TRAILER_LINES: u32 = 32;

/// Re-frames a chunked response body (RFC 9112 §7.1) for the client: chunk data passes through,
/// the framing around it is written by the proxy, so no chunk extension or trailer field of the
/// upstream's reaches the client (RFC 9110 §6.5.1 lets an intermediary discard trailers; hyper's
/// path does not forward them either). Every line must end in CR LF, never a bare LF; sizes
/// are hex digits (blanks may follow, as hyper allows); trailer lines are a field name, a colon
/// and a field value. That is hyper's decoder or stricter, never looser: what this accepts,
/// hyper frames the same way (property-tested in `tests/codec.rs`), so a body cannot end in one
/// place for the proxy and in another for the client.
#[derive(Debug, Default)]
pub struct Chunked {
    state: ChunkState,
    /// Size of the chunk being read, then what is left of its data.
    size: u64,
    digits: u8,
    extension_bytes: u32,
    trailer_bytes: u32,
    trailer_lines: u32,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// Before the first digit of a chunk size.
    #[default]
    SizeStart,
    Size,
    /// Blanks after the size, before `;` or the line end.
    SizeBlank,
    Extension,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    /// At the start of a trailer line (or the final blank line).
    TrailerStart,
    TrailerName,
    TrailerValue,
    TrailerLf,
    FinalLf,
    Done,
}

/// Why a chunked body was refused.
#[derive(Debug, thiserror::Error)]
#[error("malformed chunked body: {what}")]
pub struct ChunkError {
    pub what: &'static str,
}

fn chunk_error(what: &'static str) -> ChunkError {
    ChunkError { what }
}

/// `tchar` of RFC 9110 §5.6.2.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// A field-value byte (RFC 9110 §5.5): visible, blank or obs-text.
fn is_value_byte(b: u8) -> bool {
    b == b'\t' || (b' '..=b'~').contains(&b) || b >= 0x80
}

impl Chunked {
    /// Whether the last chunk and trailer section have been read.
    pub fn is_done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// Reads the next bytes of the body and appends what the client gets to `out`. Returns how
    /// many bytes of `input` belong to the body: all of them until it ends, then the count up to
    /// its end (what follows is not the body's).
    pub fn reframe(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<usize, ChunkError> {
        let mut i = 0;
        while i < input.len() && self.state != ChunkState::Done {
            let b = input[i];
            match self.state {
                ChunkState::SizeStart | ChunkState::Size if b.is_ascii_hexdigit() => {
                    self.digits += 1;
                    if self.digits > 15 {
                        return Err(chunk_error("chunk size over 15 hex digits"));
                    }
                    let digit = (b as char).to_digit(16).unwrap_or_default();
                    self.size = self.size * 16 + u64::from(digit);
                    self.state = ChunkState::Size;
                }
                ChunkState::SizeStart => return Err(chunk_error("chunk size without a hex digit")),
                ChunkState::Size | ChunkState::SizeBlank => {
                    self.state = match b {
                        b' ' | b'\t' => ChunkState::SizeBlank,
                        b';' => ChunkState::Extension,
                        b'\r' => ChunkState::SizeLf,
                        _ => return Err(chunk_error("invalid byte in a chunk size line")),
                    }
                }
                // An extension is dropped, never relayed, so its bytes matter only for where the
                // line ends: at CR LF, never at a bare LF (which hyper refuses too).
                ChunkState::Extension => match b {
                    b'\r' => self.state = ChunkState::SizeLf,
                    b'\n' => return Err(chunk_error("bare LF in a chunk extension")),
                    _ => {
                        self.extension_bytes += 1;
                        if self.extension_bytes > MAX_EXTENSION_BYTES {
                            return Err(chunk_error("chunk extensions over the limit"));
                        }
                    }
                },
                ChunkState::SizeLf => {
                    if b != b'\n' {
                        return Err(chunk_error("chunk size line not ended by CRLF"));
                    }
                    self.digits = 0;
                    if self.size == 0 {
                        self.state = ChunkState::TrailerStart;
                    } else {
                        put_hex(out, self.size);
                        out.extend_from_slice(b"\r\n");
                        self.state = ChunkState::Data;
                    }
                }
                ChunkState::Data => {
                    let take = self.size.min((input.len() - i) as u64) as usize;
                    out.extend_from_slice(&input[i..i + take]);
                    self.size -= take as u64;
                    i += take;
                    if self.size == 0 {
                        self.state = ChunkState::DataCr;
                    }
                    continue;
                }
                ChunkState::DataCr => {
                    if b != b'\r' {
                        return Err(chunk_error("chunk data longer than its size"));
                    }
                    self.state = ChunkState::DataLf;
                }
                ChunkState::DataLf => {
                    if b != b'\n' {
                        return Err(chunk_error("chunk data not ended by CRLF"));
                    }
                    out.extend_from_slice(b"\r\n");
                    self.state = ChunkState::SizeStart;
                }
                ChunkState::TrailerStart => {
                    self.state = match b {
                        b'\r' => ChunkState::FinalLf,
                        _ if is_tchar(b) => ChunkState::TrailerName,
                        _ => return Err(chunk_error("trailer line does not start with a field name")),
                    };
                    self.count_trailer_byte()?;
                }
                ChunkState::TrailerName => {
                    match b {
                        b':' => self.state = ChunkState::TrailerValue,
                        _ if is_tchar(b) => {}
                        _ => return Err(chunk_error("invalid trailer field name")),
                    }
                    self.count_trailer_byte()?;
                }
                ChunkState::TrailerValue => {
                    match b {
                        b'\r' => self.state = ChunkState::TrailerLf,
                        _ if is_value_byte(b) => {}
                        _ => return Err(chunk_error("control character or bare LF in a trailer field")),
                    }
                    self.count_trailer_byte()?;
                }
                ChunkState::TrailerLf => {
                    if b != b'\n' {
                        return Err(chunk_error("trailer line not ended by CRLF"));
                    }
                    self.trailer_lines += 1;
                    if self.trailer_lines > MAX_TRAILER_LINES {
                        return Err(chunk_error("too many trailer fields"));
                    }
                    self.state = ChunkState::TrailerStart;
                }
                ChunkState::FinalLf => {
                    if b != b'\n' {
                        return Err(chunk_error("last chunk not ended by CRLF"));
                    }
                    out.extend_from_slice(b"0\r\n\r\n");
                    self.state = ChunkState::Done;
                }
                ChunkState::Done => unreachable!("the loop stops at the end of the body"),
            }
            i += 1;
        }
        Ok(i)
    }

    fn count_trailer_byte(&mut self) -> Result<(), ChunkError> {
        self.trailer_bytes += 1;
        if self.trailer_bytes > MAX_TRAILER_BYTES {
            return Err(chunk_error("trailer section over the limit"));
        }
        Ok(())
    }
}

/// Lower-case hexadecimal without leading zeros.
fn put_hex(out: &mut Vec<u8>, n: u64) {
    let digits = (64 - n.leading_zeros()).div_ceil(4).max(1);
    for shift in (0..digits).rev() {
        out.push(b"0123456789abcdef"[((n >> (shift * 4)) & 0xf) as usize]);
    }
}

/// A fast-path client's socket.
///
/// It joins the runtime's event loop only once something has to wait on it: a connection whose
/// request has arrived by the time it is accepted and whose response fits the socket's send
/// buffer (a new connection per request, the usual `Connection: close`) is read, written and
/// closed with plain non-blocking calls, and spends no `epoll_ctl` on being added to the loop
/// and taken off it again. A keep-alive connection joins when it waits for its second request.
///
/// Nagle's algorithm is left on for the connection's first write and turned off
/// (`TCP_NODELAY`) before any later one, as NGINX does: a first write has no unacknowledged
/// data ahead of it and leaves at once either way, so a one-response connection spends no
/// system call on the option; a second write (the rest of a streamed body, the next keep-alive
/// response) would otherwise wait for the client's delayed ACK.
pub(crate) struct ClientStream {
    socket: Socket,
    /// Written to at least once.
    wrote: bool,
    /// `TCP_NODELAY` is set.
    nodelay: bool,
}

enum Socket {
    /// Accepted (non-blocking) and not waited on yet.
    Bare(std::net::TcpStream),
    Registered(TcpStream),
    /// Joining the event loop failed; the socket is closed.
    Closed,
}

impl ClientStream {
    /// `socket` must be in non-blocking mode.
    pub(crate) fn new(socket: std::net::TcpStream) -> ClientStream {
        ClientStream { socket: Socket::Bare(socket), wrote: false, nodelay: false }
    }

    fn fd(&self) -> io::Result<BorrowedFd<'_>> {
        match &self.socket {
            Socket::Bare(socket) => Ok(socket.as_fd()),
            Socket::Registered(socket) => Ok(socket.as_fd()),
            Socket::Closed => Err(io::ErrorKind::NotConnected.into()),
        }
    }

    /// The socket on the event loop, for waiting on.
    pub(crate) fn registered(&mut self) -> io::Result<&mut TcpStream> {
        // Checked first so that a registered socket (every wait after the first) is not moved.
        if let Socket::Bare(_) = self.socket {
            if let Socket::Bare(socket) = std::mem::replace(&mut self.socket, Socket::Closed) {
                self.socket = Socket::Registered(TcpStream::from_std(socket)?);
            }
        }
        match &mut self.socket {
            Socket::Registered(socket) => Ok(socket),
            _ => Err(io::ErrorKind::NotConnected.into()),
        }
    }

    /// Appends what the client has already sent to `buf`, without waiting; nothing when it has
    /// sent nothing yet (or closed, or failed: the next read tells).
    pub(crate) fn read_now(&self, buf: &mut BytesMut) {
        let Ok(fd) = self.fd() else { return };
        buf.reserve(2048);
        if let Ok(((filled, _), _)) =
            rustix::net::recv(fd, buf.spare_capacity_mut(), rustix::net::RecvFlags::DONTWAIT)
        {
            let read = filled.len();
            // SAFETY: `recv` initialised the first `read` bytes of the spare capacity.
            unsafe { buf.set_len(buf.len() + read) };
        }
    }

    /// [`send`]s `buf`, first turning Nagle's algorithm off if this is not the first write. A
    /// socket not on the event loop is written to directly, and joins it only if the write has
    /// to wait.
    pub(crate) async fn send(&mut self, mut buf: &[u8], limit: Duration) -> io::Result<()> {
        if self.wrote {
            self.set_nodelay();
        }
        self.wrote = true;
        if let Socket::Bare(socket) = &self.socket {
            let mut socket = socket;
            while !buf.is_empty() {
                match std::io::Write::write(&mut socket, buf) {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(written) => buf = &buf[written..],
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => break,
                    Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                    Err(err) => return Err(err),
                }
            }
            if buf.is_empty() {
                return Ok(());
            }
        }
        send(self.registered()?, buf, limit).await
    }

    /// Sends a FIN: no more bytes follow.
    pub(crate) fn shutdown(&self) {
        if let Ok(fd) = self.fd() {
            let _ = rustix::net::shutdown(fd, rustix::net::Shutdown::Write);
        }
    }

    /// The socket on the event loop, for a close that waits.
    pub(crate) fn into_registered(mut self) -> io::Result<TcpStream> {
        self.registered()?;
        match self.socket {
            Socket::Registered(socket) => Ok(socket),
            _ => Err(io::ErrorKind::NotConnected.into()),
        }
    }

    /// The socket on the event loop with Nagle's algorithm off, for a codec that writes as it
    /// pleases.
    pub(crate) fn into_inner(mut self) -> io::Result<TcpStream> {
        self.set_nodelay();
        self.into_registered()
    }

    fn set_nodelay(&mut self) {
        if !self.nodelay {
            self.nodelay = true;
            if let Ok(fd) = self.fd() {
                if let Err(err) = rustix::net::sockopt::set_tcp_nodelay(fd, true) {
                    tracing::debug!(error = %err, "could not set TCP_NODELAY");
                }
            }
        }
    }
}

/// Writes all of `buf` to the client, failing with [`io::ErrorKind::TimedOut`] once no byte could
/// be written for `limit` (`client.send_timeout`): a client that stops reading does not hold its
/// connection, and the upstream connection behind it, forever. Most writes complete at once and
/// never touch a timer.
pub(crate) async fn send(stream: &mut TcpStream, mut buf: &[u8], limit: Duration) -> io::Result<()> {
    while !buf.is_empty() {
        let now = std::future::poll_fn(|cx| match Pin::new(&mut *stream).poll_write(cx, buf) {
            Poll::Pending => Poll::Ready(None),
            Poll::Ready(result) => Poll::Ready(Some(result)),
        })
        .await;
        let written = match now {
            Some(result) => result?,
            None => tokio::time::timeout(limit, stream.write(buf)).await.map_err(|_| {
                io::Error::new(io::ErrorKind::TimedOut, "client did not read within send_timeout")
            })??,
        };
        if written == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        buf = &buf[written..];
    }
    Ok(())
}

/// Reads more of `io` into `buf`, first making room for at least `room` bytes (reserving `grow`
/// when there is less); 0 when the peer has closed its side.
pub(crate) async fn fill<R: AsyncRead + Unpin>(
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
pub(crate) struct Rewind<T> {
    prefix: Bytes,
    inner: T,
}

impl<T> Rewind<T> {
    pub(crate) fn new(prefix: Bytes, inner: T) -> Self {
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
                write_request(&mut out, &head, "10.0.0.9", "http", false);
                Some((String::from_utf8(out).unwrap(), head.close, head.content_length))
            }
            _ => None,
        }
    }

    #[test]
    fn a_plain_request_is_rewritten_with_forwarded_headers() {
        let (out, close, length) = request(
            "GET /a?b=1 HTTP/1.1\r\nHost: app\r\nKeep-Alive: 5\r\nX-Forwarded-For: 1.1.1.1\r\n\
             X-Forwarded-For: 2.2.2.2\r\nX-Forwarded-Proto: evil\r\nCookie: c\r\nX_Forwarded_For: 6.6.6.6\r\n\r\n",
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
    fn a_fragment_never_leaves_the_proxy() {
        let (out, _, _) = request("GET /api/studies/7#frag?x=1 HTTP/1.1\r\nHost: a\r\n\r\n").unwrap();
        assert!(out.starts_with("GET /api/studies/7 HTTP/1.1\r\n"), "{out}");
    }

    #[test]
    fn unusual_requests_are_left_to_hyper() {
        for raw in [
            "GET / HTTP/1.0\r\nHost: a\r\n\r\n",
            "GET / HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: evil.example/x?y@z\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: \r\n\r\n",
            "GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET /a<b> HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET /caf\u{e9} HTTP/1.1\r\nHost: a\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nConnection: x-secret\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +1\r\n\r\n",
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
            "HTTP/1.1 200 OK\r\nConnection: keep-alive, a, b, c, d, e, f, g, h, x-hop\r\nX-Hop: 1\r\n\
             Keep-Alive: 5\r\nContent-Length: 2\r\nX-Rollout-Pool: forged\r\n\r\nok",
            RULES,
        );
        assert_eq!(out, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nx-rollout-pool: v1\r\n\r\n");
        assert!(matches!(head.framing, Framing::Length(2)));
        assert_eq!(head.len, 142);
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
    fn transfer_encoding_is_the_proxys_own_and_content_length_next_to_it_dropped() {
        let (out, head) =
            response("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n", RULES);
        assert_eq!(out, "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nx-rollout-pool: v1\r\n\r\n");
        assert!(matches!(head.framing, Framing::Chunked(_)));
    }

    #[test]
    fn identical_content_lengths_are_merged() {
        let (out, head) =
            response("HTTP/1.1 200 OK\r\nContent-Length: 2\r\ncontent-length: 2\r\n\r\nok", RULES);
        assert_eq!(out, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nx-rollout-pool: v1\r\n\r\n");
        assert!(matches!(head.framing, Framing::Length(2)));
    }

    #[test]
    fn invalid_response_heads_are_refused() {
        for raw in [
            "HTTP/1.1 000 Zero\r\nContent-Length: 0\r\n\r\n",
            "HTTP/1.1 999 Nine\r\nContent-Length: 0\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\nX: a\r\n b\r\nContent-Length: 0\r\n\r\n",
            "HTTP/1.1 200 OK\r\nX : a\r\nContent-Length: 0\r\n\r\n",
            "HTTP/1.1 101 Switching Protocols\r\n\r\n",
        ] {
            let mut out = Vec::new();
            assert!(rewrite_response(raw.as_bytes(), RULES, &mut out).is_err(), "{raw:?}");
        }
    }

    #[test]
    fn response_framing_follows_rfc_9112() {
        let framing = |raw: &str, rules| response(raw, rules).1.framing;
        assert!(matches!(framing("HTTP/1.1 200 OK\r\n\r\n", RULES), Framing::UntilClose));
        assert!(matches!(framing("HTTP/1.1 204 No Content\r\n\r\n", RULES), Framing::Empty));
        let head = ResponseRules { head_request: true, ..RULES };
        assert!(matches!(framing("HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n", head), Framing::Empty));
        let (out, _) = response("HTTP/1.1 200 OK\r\n\r\n", ResponseRules { pool: None, ..RULES });
        assert_eq!(out, "HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n");
        let mut out = Vec::new();
        assert!(rewrite_response(b"HTTP/1.1 200 OK\r\nContent-Le", RULES, &mut out).unwrap().is_none());
    }

    fn reframe_all(body: &[u8]) -> Result<(usize, Vec<u8>), ChunkError> {
        let mut chunked = Chunked::default();
        let mut out = Vec::new();
        let used = chunked.reframe(body, &mut out)?;
        Ok((if chunked.is_done() { used } else { usize::MAX }, out))
    }

    #[test]
    fn chunks_are_reframed_without_extensions_or_trailers_across_reads() {
        let body = b"5;ext=1\r\nhello\r\n10\r\n0123456789abcdef\r\n0\r\nTrailer: x\r\n\r\nNEXT";
        let expected = b"5\r\nhello\r\n10\r\n0123456789abcdef\r\n0\r\n\r\n".to_vec();
        for split in 0..body.len() {
            let mut chunked = Chunked::default();
            let mut out = Vec::new();
            let (a, b) = body.split_at(split);
            let mut end = chunked.reframe(a, &mut out).unwrap();
            if !chunked.is_done() {
                end = split + chunked.reframe(b, &mut out).unwrap();
            }
            assert!(chunked.is_done(), "split at {split}");
            assert_eq!(end, body.len() - 4, "split at {split}");
            assert_eq!(out, expected, "split at {split}");
        }
        assert_eq!(reframe_all(b"0\r\n\r\n").unwrap(), (5, b"0\r\n\r\n".to_vec()));
        assert_eq!(
            reframe_all(b"A \t;x\r\n0123456789\r\n0\r\n\r\n").unwrap().1,
            b"a\r\n0123456789\r\n0\r\n\r\n"
        );
        // Control bytes in an extension are read past, and dropped with it.
        assert_eq!(reframe_all(b"2;a=\x01\x00\x7f\r\nok\r\n0\r\n\r\n").unwrap().1, b"2\r\nok\r\n0\r\n\r\n");
    }

    #[test]
    fn invalid_chunk_framing_is_refused() {
        for body in [
            &b"zz\r\n"[..],
            b"0;\n\r\n",
            b"0\r\nX: a\n\r\n",
            b"0;a\nb\r\n\r\n",
            b"5\nhello\r\n0\r\n\r\n",
            b"5\r\nhelloXX0\r\n\r\n",
            b"5\r\nhello\n0\r\n\r\n",
            b"0x5\r\nhello\r\n0\r\n\r\n",
            b" 5\r\nhello\r\n0\r\n\r\n",
            b"-5\r\n",
            b"1000000000000000\r\n",
            b"0\r\n X: a\r\n\r\n",
            b"0\r\nX : a\r\n\r\n",
            b"0\r\nX: a\x00\r\n\r\n",
            b"0\r\n\r\r\n",
            b"5 6\r\n",
        ] {
            assert!(reframe_all(body).is_err(), "{:?}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn hex_sizes_are_written_without_leading_zeros() {
        for (n, text) in
            [(1u64, "1"), (15, "f"), (16, "10"), (0xabc, "abc"), (u64::MAX >> 4, "fffffffffffffff")]
        {
            let mut out = Vec::new();
            put_hex(&mut out, n);
            assert_eq!(out, text.as_bytes());
        }
    }

    #[tokio::test]
    async fn a_client_socket_turns_nagle_off_before_its_second_write_only() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        let mut stream = ClientStream::new(accepted.into_std().unwrap());
        let limit = Duration::from_secs(1);
        stream.send(b"first", limit).await.unwrap();
        assert!(matches!(stream.socket, Socket::Bare(_)), "a write that completes needs no event loop");
        assert!(!stream.registered().unwrap().nodelay().unwrap(), "one write leaves at once with Nagle on");
        stream.send(b"second", limit).await.unwrap();
        assert!(
            stream.registered().unwrap().nodelay().unwrap(),
            "a second write must not wait for a delayed ACK"
        );
        let other = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        assert!(ClientStream::new(other.into_std().unwrap()).into_inner().unwrap().nodelay().unwrap());
        drop(client);
    }

    #[tokio::test]
    async fn a_bare_client_socket_reads_what_arrived_and_joins_the_event_loop_to_wait() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        let mut stream = ClientStream::new(accepted.into_std().unwrap());
        let mut buf = BytesMut::new();
        stream.read_now(&mut buf);
        assert!(buf.is_empty(), "nothing sent yet, nothing waited for");
        client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        while buf.is_empty() {
            fill(stream.registered().unwrap(), &mut buf, 64, 64).await.unwrap();
        }
        assert_eq!(&buf[..], b"GET / HTTP/1.1\r\n");
        // A response larger than the socket's buffers goes out through the event loop.
        let big = vec![b'x'; 8 << 20];
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.unwrap();
            got.len()
        });
        stream.send(&big, Duration::from_secs(10)).await.unwrap();
        stream.shutdown();
        drop(stream);
        assert_eq!(reader.await.unwrap(), big.len());
    }
}
