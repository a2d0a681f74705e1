//! The HTTP/1.1 fast path: a plain keep-alive HTTP/1.1 request parsed in place
//! ([`crate::h1`]), routed, written upstream as bytes and answered as bytes.
//!
//! Each step has its twin on the hyper path ([`super::hyper`]) and calls the same rule;
//! `src/proxy/LIFECYCLE.md` lists them side by side. What the fast path does not serve it hands
//! to hyper whole ([`H1Plan::Unsupported`]), before anything of the request has been acted on.

use std::mem::MaybeUninit;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use http::{Method, StatusCode};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::{
    is_resendable, may_retry, pick, write_error_response, Choice, LogLine, Logged, Peer, Proxy, ProxyError,
};
use crate::config::PoolName;
use crate::h1;
use crate::snapshot::Snapshot;
use crate::upstream::{H1SendError, RelayError, Upstream, UpstreamConn, UpstreamError};
use crate::ErrorChain;

/// A client connection served on the HTTP/1.1 fast path, with buffers reused from one request
/// to the next.
pub(crate) struct ClientConn {
    pub stream: h1::ClientStream,
    /// Bytes read from the client and not used yet.
    pub buf: BytesMut,
    pub peer: Peer,
    /// The upstream request, head and body, kept until the exchange is over for a retry.
    request: Vec<u8>,
    /// The response head (and chunk framing) being written to the client.
    out: Vec<u8>,
    /// `client.send_timeout`: the longest a write to this client may make no progress.
    send_timeout: Duration,
    /// The buffers were given back while the connection waited ([`ClientConn::release_buffers`]).
    released: bool,
}

impl ClientConn {
    /// `stream` must be in non-blocking mode.
    pub(crate) fn new(stream: std::net::TcpStream, peer: Peer, send_timeout: Duration) -> Self {
        ClientConn {
            send_timeout,
            stream: h1::ClientStream::new(stream),
            buf: BytesMut::with_capacity(8 * 1024),
            peer,
            request: Vec::with_capacity(1024),
            out: Vec::with_capacity(1024),
            released: false,
        }
    }

    /// Gives the buffers back while the connection waits for its next request, which may be
    /// long: an idle keep-alive connection then holds little more than its task. The next read
    /// takes a read buffer again; the request and response buffers grow as they are written.
    pub(crate) fn release_buffers(&mut self) {
        debug_assert!(self.buf.is_empty(), "bytes read and not used yet");
        self.buf = BytesMut::new();
        self.request = Vec::new();
        self.out = Vec::new();
        self.released = true;
    }

    /// Whether [`ClientConn::release_buffers`] ran, and nothing has been read since.
    pub(crate) fn released(&self) -> bool {
        self.released
    }

    /// Reads more from the client; 0 when it has closed its side.
    pub(crate) async fn fill(&mut self) -> std::io::Result<usize> {
        let stream = self.stream.registered()?;
        if self.released {
            // Without its buffers until the client sends: a read would take them at once.
            stream.readable().await?;
        }
        let read = h1::fill(stream, &mut self.buf, 2048, 8 * 1024).await;
        self.released = false;
        read
    }

    /// Reads what the client has already sent, without waiting and without asking the runtime:
    /// a new connection's first request has usually arrived by the time it is accepted, and the
    /// runtime would report the socket readable only after another turn of its event loop (with
    /// the connection's timers and cancellation registered meanwhile). Nothing read is nothing
    /// lost: [`ClientConn::fill`] then waits as usual.
    pub(crate) fn read_now(&mut self) {
        self.stream.read_now(&mut self.buf);
    }
}

/// What [`Proxy::plan_h1`] made of the bytes a fast-path connection has read.
pub(crate) enum H1Plan {
    /// The request head is not complete yet.
    Partial,
    /// A request for hyper's path: the connection is handed over.
    Unsupported,
    Ready(H1Request),
}

/// A fast-path request whose head has been read and routed, and whose upstream head is written.
pub(crate) struct H1Request {
    head_len: usize,
    body_len: usize,
    /// The client asked to close the connection after this exchange.
    close: bool,
    head_request: bool,
    /// May be sent again after it reached an upstream ([`is_resendable`]).
    resendable: bool,
    choice: Choice,
    started: Instant,
    logged: Logged,
}

/// Reads a request's `len` body bytes into `conn.buf`, all within `limit`: one deadline for the
/// whole body, so a client trickling it byte by byte does not reset it. The clock is read only
/// when the body is not all here yet (most requests have none).
async fn read_body(conn: &mut ClientConn, len: usize, limit: Duration) -> Result<(), ProxyError> {
    let mut deadline = None;
    while conn.buf.len() < len {
        let deadline = *deadline.get_or_insert_with(|| tokio::time::Instant::now() + limit);
        match tokio::time::timeout_at(deadline, conn.fill()).await {
            Ok(Ok(n)) if n > 0 => {}
            Ok(Ok(_)) => {
                return Err(ProxyError::ClientBody("the client closed before the end of its body".into()))
            }
            Ok(Err(err)) => return Err(ProxyError::ClientBody(err.into())),
            Err(_) => return Err(ProxyError::ClientTimeout),
        }
    }
    conn.request.extend_from_slice(&conn.buf[..len]);
    conn.buf.advance(len);
    Ok(())
}

impl Proxy {
    /// Reads the request head at the start of `conn.buf`, routes it and writes its upstream head
    /// into the connection's request buffer. Requests the fast path does not serve, including
    /// any that hyper's path answers with an error, are [`H1Plan::Unsupported`].
    pub(crate) fn plan_h1(&self, snapshot: &Snapshot, conn: &mut ClientConn) -> H1Plan {
        if !snapshot.plain_upstreams {
            return H1Plan::Unsupported;
        }
        let mut headers = [const { MaybeUninit::uninit() }; h1::MAX_HEADERS];
        let head = match h1::parse_request(&conn.buf, &mut headers) {
            h1::ParsedRequest::Partial => return H1Plan::Partial,
            h1::ParsedRequest::Unsupported => return H1Plan::Unsupported,
            h1::ParsedRequest::Complete(head) => head,
        };
        if head.len > snapshot.max_header_bytes {
            return H1Plan::Unsupported;
        }
        let started = Instant::now();
        // The upstream request head does not depend on the pool, so writing it gives the pin's
        // slot, asked for by `classify`, time to arrive from memory.
        let classified = self.classify(snapshot, head.path(), head.query(), &head);
        h1::write_request(
            &mut conn.request,
            &head,
            conn.peer.ip.as_str(),
            self.proto,
            snapshot.allow_underscores,
        );
        let mut logged = LogLine::wanted(snapshot, head.method, head.path());
        if let Some(line) = logged.as_mut() {
            line.session = self.session_digest(line, &classified);
        }
        let choice = self.choose_pool(snapshot, classified);
        let method = Method::from_bytes(head.method.as_bytes());
        H1Plan::Ready(H1Request {
            head_len: head.len,
            body_len: head.content_length as usize,
            close: head.close,
            head_request: head.method == "HEAD",
            resendable: method.is_ok_and(|m| is_resendable(&m, head.content_length > 0)),
            choice,
            started,
            logged,
        })
    }

    /// Serves a request [`Proxy::plan_h1`] planned: reads its body, exchanges it with an upstream
    /// and relays the response. Once `draining` fires, the response closes the connection.
    /// Returns whether the connection can take another request.
    pub(crate) async fn serve_h1(
        &self,
        snapshot: &Snapshot,
        mut req: H1Request,
        conn: &mut ClientConn,
        draining: &CancellationToken,
    ) -> bool {
        conn.buf.advance(req.head_len);
        if let Err(err) = read_body(conn, req.body_len, snapshot.response_timeout).await {
            // The client's failure, not the upstream's: a client that stalled is told so; one
            // that left is counted as its request's 400 and hears nothing.
            self.log_failure(&conn.peer, Some(req.choice.routed.pool), &err);
            let status = match err {
                ProxyError::ClientTimeout => self.answer_error(snapshot, conn, &req, err, true).await.0,
                _ => StatusCode::BAD_REQUEST.as_u16(),
            };
            self.account(&conn.peer, Some(req.choice.routed), status, req.started, req.logged);
            return false;
        }

        let drain_ahead = match self.admit(&mut req.choice).await {
            Ok(drain_ahead) => drain_ahead,
            Err(err) => {
                self.log_failure(&conn.peer, Some(req.choice.routed.pool), &err);
                let close = req.close || draining.is_cancelled();
                let (status, keep) = self.answer_error(snapshot, conn, &req, err, close).await;
                self.account(&conn.peer, Some(req.choice.routed), status, req.started, req.logged);
                return keep;
            }
        };
        let pool = req.choice.routed.pool;
        let rules = h1::ResponseRules {
            head_request: req.head_request,
            pool: snapshot.pool_header.then(|| pool.as_str()),
        };
        let exchange = self.exchange_h1(snapshot, pool, &conn.request, req.resendable, rules, &mut conn.out);
        let result = self.while_persisting(exchange, &req.choice, drain_ahead).await;
        let close = req.close || draining.is_cancelled();
        let (status, keep) = match result {
            Ok(exchanged) => {
                if let Some(line) = req.logged.as_mut() {
                    line.upstream = Some(exchanged.1.name().clone());
                }
                self.relay_h1(snapshot, conn, &req, exchanged, close).await
            }
            Err(err) => {
                self.log_failure(&conn.peer, Some(pool), &err);
                self.answer_error(snapshot, conn, &req, err, close).await
            }
        };
        self.account(&conn.peer, Some(req.choice.routed), status, req.started, req.logged);
        keep
    }

    /// Sends the upstream's response to the client, its head rewritten in `conn.out` and ended
    /// here; returns the status and whether the client connection can take another request.
    async fn relay_h1(
        &self,
        snapshot: &Snapshot,
        conn: &mut ClientConn,
        req: &H1Request,
        (mut upstream_conn, upstream, head): (UpstreamConn, &Upstream, h1::ResponseHead),
        close: bool,
    ) -> (u16, bool) {
        let (status, pool) = (head.status, req.choice.routed.pool);
        let until_close = matches!(head.framing, h1::Framing::UntilClose);
        h1::finish_response_head(&mut conn.out, &head.framing, close);
        match upstream_conn.relay(head, &mut conn.out, &mut conn.stream, conn.send_timeout).await {
            Ok(reusable) => {
                if reusable {
                    upstream_conn.release();
                }
                (status, !close && !until_close)
            }
            Err(RelayError::Invalid { head_sent, source }) => {
                // The upstream's framing cannot be trusted: both connections close. If nothing
                // reached the client yet, it is answered 502. Like every failure after the
                // response head, it is logged, not counted for ejection (the hyper path cannot
                // tell it apart from a body cut short).
                let error =
                    UpstreamError::Invalid { upstream: upstream.name().clone(), source: source.into() };
                let error = ProxyError::from(error);
                self.log_failure(&conn.peer, Some(pool), &error);
                if head_sent {
                    (status, false)
                } else {
                    (self.answer_error(snapshot, conn, req, error, true).await.0, false)
                }
            }
            Err(err) => {
                if let RelayError::Client(e) = &err {
                    self.note_send_failure(e);
                }
                debug!(peer = %conn.peer.addr, pool = %pool, error = %ErrorChain(&err), "response relay stopped");
                (status, false)
            }
        }
    }

    /// Writes the proxy's own answer to a fast-path request; returns its status and whether the
    /// connection can take another request.
    async fn answer_error(
        &self,
        snapshot: &Snapshot,
        conn: &mut ClientConn,
        req: &H1Request,
        err: ProxyError,
        close: bool,
    ) -> (u16, bool) {
        let shown = snapshot.pool_header.then_some(req.choice.routed.pool);
        let status = write_error_response(&mut conn.out, &err, shown, req.head_request, close).as_u16();
        let written = conn.stream.send(&conn.out, conn.send_timeout).await;
        if let Err(e) = &written {
            self.note_send_failure(e);
        }
        (status, written.is_ok() && !close && !super::closes_connection(&err))
    }

    /// Counts a write to a client that gave up after `client.send_timeout`.
    fn note_send_failure(&self, err: &std::io::Error) {
        if err.kind() == std::io::ErrorKind::TimedOut {
            self.shared.metrics().client_rejected.send_timeout.inc();
        }
    }

    /// [`super::hyper`]'s `exchange` on the fast path: `request` is the whole upstream
    /// request, sent again as is on a retry. Returns the connection, the upstream it leads to
    /// and the response head.
    async fn exchange_h1<'s>(
        &self,
        snapshot: &'s Snapshot,
        pool: PoolName,
        request: &[u8],
        resendable: bool,
        rules: h1::ResponseRules,
        out: &mut Vec<u8>,
    ) -> Result<(UpstreamConn, &'s Upstream, h1::ResponseHead), ProxyError> {
        let balancer = snapshot.pool(pool);
        let mut failed: Option<&Arc<Upstream>> = None;
        let mut attempt = 0;
        loop {
            let upstream = pick(balancer, failed).ok_or(ProxyError::NoUpstream { pool })?;
            let sent = self
                .client
                .send_h1(upstream, request, resendable, rules, out, snapshot.response_timeout)
                .await;
            match sent {
                Ok((conn, head)) => {
                    self.note_response(snapshot, pool, upstream, head.status);
                    return Ok((conn, upstream, head));
                }
                Err(H1SendError { error, written }) => {
                    self.note_error(snapshot, pool, upstream, &error);
                    if may_retry(snapshot, attempt, &error, written, resendable) {
                        debug!(pool = %pool, upstream = %upstream.name(), error = %ErrorChain(&error), "retrying on the same pool");
                        attempt += 1;
                        failed = Some(upstream);
                    } else {
                        return Err(error.into());
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// A connection that gave its buffers back waits for its client without taking them again.
    #[tokio::test]
    async fn a_released_connection_waits_without_its_read_buffer() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = tokio::net::TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (accepted, peer) = listener.accept().await.unwrap();
        let mut conn = ClientConn::new(accepted.into_std().unwrap(), Peer::new(peer), Duration::from_secs(5));
        conn.release_buffers();
        let waited = tokio::time::timeout(Duration::from_millis(100), conn.fill()).await;
        assert!(waited.is_err(), "nothing was sent, nothing read");
        assert_eq!(conn.buf.capacity(), 0, "the wait took a read buffer");
        assert!(conn.released());
        client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let read = tokio::time::timeout(Duration::from_secs(5), conn.fill()).await.unwrap().unwrap();
        assert_eq!(&conn.buf[..read], b"GET / HTTP/1.1\r\n");
        assert!(!conn.released());
    }
}
