//! Upstream servers and the client that talks to them.
//!
//! Each upstream keeps its own pool of idle keep-alive HTTP/1.1 connections. A connection is
//! taken from the pool (or made) *before* the request is handed over, so a connect failure
//! gives the request back untouched and [`crate::proxy`] can retry it on another upstream of
//! the same pool, body and all. A connection goes back to the pool when its response body has
//! been read to the end. Errors are classified here ([`UpstreamError`]) and turned into
//! responses by [`crate::proxy`]. Which upstream to use is [`crate::balancer`]'s choice; header
//! rewriting is [`crate::headers`]'; whether an upstream is healthy is [`crate::health`]'s.

use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http::uri::{Authority, PathAndQuery};
use http::{Request, Response, Uri, Version};
use http_body_util::{Either, Empty};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tracing::debug;

use crate::config::{UpstreamConfig, UpstreamName, UpstreamSettings, UpstreamUrl};
use crate::h1;
use crate::health::Health;
use crate::metrics::{UpstreamErrorKind, UpstreamStats};
use crate::tls::TlsError;

/// How long a pooled connection may take to be ready for a new request before another is used.
const READY_WAIT: Duration = Duration::from_millis(100);

/// What the proxy sends upstream: the client's streamed body, or nothing (which can be resent).
pub type UpstreamBody = Either<Incoming, Empty<Bytes>>;

pub fn empty_body() -> UpstreamBody {
    Either::Right(Empty::new())
}

/// State of one upstream that outlives snapshots: its health and its idle connections.
#[derive(Debug)]
pub struct UpstreamState {
    pub health: Health,
    pool: ConnPool,
}

impl UpstreamState {
    pub fn new(settings: &UpstreamSettings) -> Arc<Self> {
        Arc::new(UpstreamState {
            health: Health::default(),
            pool: ConnPool {
                idle: Mutex::new(Vec::new()),
                idle_h1: Mutex::new(Vec::new()),
                max_idle: settings.max_idle_per_upstream,
                idle_timeout: settings.idle_timeout,
            },
        })
    }
}

/// One application server inside a pool.
#[derive(Debug)]
pub struct Upstream {
    name: UpstreamName,
    url: UpstreamUrl,
    authority: Authority,
    port: u16,
    /// `https://`: connections are TLS, verified against the upstream's host name.
    tls: bool,
    weight: u32,
    state: Arc<UpstreamState>,
    pub stats: UpstreamStats,
}

impl Upstream {
    /// `state` carries health and connections; pass the previous snapshot's state for the same
    /// upstream to keep them.
    pub fn new(config: &UpstreamConfig, stats: UpstreamStats, state: Arc<UpstreamState>) -> Self {
        Upstream {
            name: config.name.clone(),
            url: config.url.clone(),
            authority: config.url.authority.clone(),
            port: config.url.port(),
            tls: config.url.is_tls(),
            weight: config.weight,
            state,
            stats,
        }
    }

    pub fn name(&self) -> &UpstreamName {
        &self.name
    }

    pub fn url(&self) -> &UpstreamUrl {
        &self.url
    }

    pub fn authority(&self) -> &Authority {
        &self.authority
    }

    pub fn weight(&self) -> u32 {
        self.weight
    }

    pub fn is_tls(&self) -> bool {
        self.tls
    }

    pub fn is_healthy(&self) -> bool {
        self.state.health.is_healthy()
    }

    pub fn health(&self) -> &Health {
        &self.state.health
    }

    /// The long-lived state, to carry into the next snapshot.
    pub fn state(&self) -> &Arc<UpstreamState> {
        &self.state
    }
}

/// Why an upstream produced no response head.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("could not connect to upstream {upstream}")]
    Connect {
        upstream: UpstreamName,
        #[source]
        source: std::io::Error,
    },
    #[error("upstream {upstream} did not accept a connection within {after:?}")]
    ConnectTimeout { upstream: UpstreamName, after: Duration },
    #[error("TLS with upstream {upstream} failed")]
    Tls {
        upstream: UpstreamName,
        #[source]
        source: std::io::Error,
    },
    #[error("upstream {upstream} sent no response head within {after:?}")]
    Timeout { upstream: UpstreamName, after: Duration },
    #[error("upstream {upstream} closed the connection before a response head")]
    Closed {
        upstream: UpstreamName,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl UpstreamError {
    /// The `kind` label of `rollout_upstream_errors_total`.
    pub fn kind(&self) -> UpstreamErrorKind {
        match self {
            UpstreamError::Connect { .. } | UpstreamError::Tls { .. } => UpstreamErrorKind::Connect,
            UpstreamError::ConnectTimeout { .. } | UpstreamError::Timeout { .. } => {
                UpstreamErrorKind::Timeout
            }
            UpstreamError::Closed { .. } => UpstreamErrorKind::Io,
        }
    }

    /// Whether the upstream itself looks broken (for passive ejection), as opposed to slow.
    pub fn is_connect(&self) -> bool {
        matches!(
            self,
            UpstreamError::Connect { .. } | UpstreamError::ConnectTimeout { .. } | UpstreamError::Tls { .. }
        )
    }
}

/// A failed send. `request` is the request itself when it never left the proxy, so it can be
/// sent elsewhere.
#[derive(Debug)]
pub struct SendError {
    pub error: UpstreamError,
    pub request: Option<Request<UpstreamBody>>,
}

#[derive(Debug)]
struct ConnPool {
    idle: Mutex<Vec<Idle>>,
    /// Connections of the HTTP/1.1 fast path, most recently used last.
    idle_h1: Mutex<Vec<(UpstreamConn, Instant)>>,
    max_idle: usize,
    idle_timeout: Duration,
}

#[derive(Debug)]
struct Idle {
    sender: http1::SendRequest<UpstreamBody>,
    since: Instant,
}

impl ConnPool {
    /// The most recently used idle connection that is still open.
    fn checkout(&self) -> Option<http1::SendRequest<UpstreamBody>> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(conn) = idle.pop() {
            if !conn.sender.is_closed() && conn.since.elapsed() < self.idle_timeout {
                return Some(conn.sender);
            }
        }
        None
    }

    fn checkin(&self, sender: http1::SendRequest<UpstreamBody>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < self.max_idle {
            idle.push(Idle { sender, since: Instant::now() });
        }
    }
}

impl ConnPool {
    /// The most recently used idle fast-path connection that is still open. The reactor has
    /// already seen any close or stray bytes on it, so checking costs no system call.
    fn checkout_h1(&self) -> Option<UpstreamConn> {
        let mut idle = self.idle_h1.lock().unwrap_or_else(|p| p.into_inner());
        while let Some((conn, since)) = idle.pop() {
            let mut cx = Context::from_waker(std::task::Waker::noop());
            if since.elapsed() < self.idle_timeout && conn.stream.poll_read_ready(&mut cx).is_pending() {
                return Some(conn);
            }
        }
        None
    }

    fn checkin_h1(&self, conn: UpstreamConn) {
        let mut idle = self.idle_h1.lock().unwrap_or_else(|p| p.into_inner());
        // The oldest connections come first; those past the idle timeout are closed now rather
        // than held until a checkout reaches them.
        let now = Instant::now();
        let expired = idle
            .iter()
            .take_while(|(_, since)| now.saturating_duration_since(*since) >= self.idle_timeout)
            .count();
        idle.drain(..expired);
        if idle.len() < self.max_idle {
            idle.push((conn, now));
        }
    }
}

/// An upstream connection of the HTTP/1.1 fast path: the socket and what was read from it.
#[derive(Debug)]
pub struct UpstreamConn {
    stream: TcpStream,
    buf: BytesMut,
    /// The upstream whose pool the connection returns to. Weak: the pool holds its idle
    /// connections, and a removed upstream's pool must be freed with its sockets.
    home: Weak<UpstreamState>,
}

/// Largest upstream response head accepted on the fast path.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;

/// How a fast-path exchange failed, before any response head.
#[derive(Debug, thiserror::Error)]
enum ExchangeError {
    #[error("writing the request failed")]
    Write(#[source] std::io::Error),
    #[error("reading the response failed")]
    Read(#[source] std::io::Error),
    #[error("the connection closed before a response")]
    Eof,
    /// Closed or reset before the first byte of a response: on a pooled connection, most likely
    /// closed by the upstream while idle.
    #[error("the connection closed before any response byte")]
    Unanswered(#[source] Option<std::io::Error>),
    #[error(transparent)]
    Response(#[from] h1::ResponseError),
}

/// A failed fast-path send; `written` says whether the request may have reached the upstream.
#[derive(Debug)]
pub struct H1SendError {
    pub error: UpstreamError,
    pub written: bool,
}

/// Why relaying a response body stopped early.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("reading the upstream body failed")]
    Upstream(#[source] std::io::Error),
    #[error("the upstream closed before the end of the body")]
    Truncated,
    #[error(transparent)]
    Chunks(#[from] h1::ChunkError),
    #[error("writing to the client failed")]
    Client(#[source] std::io::Error),
}

impl UpstreamConn {
    fn new(stream: TcpStream, home: &Arc<UpstreamState>) -> Self {
        UpstreamConn { stream, buf: BytesMut::with_capacity(16 * 1024), home: Arc::downgrade(home) }
    }

    async fn fill(&mut self) -> std::io::Result<usize> {
        h1::fill(&mut self.stream, &mut self.buf, 4096, 16 * 1024).await
    }

    /// Writes `request` and reads the response head, writing the client's version to `out`.
    async fn exchange(
        &mut self,
        request: &[u8],
        rules: h1::ResponseRules,
        out: &mut Vec<u8>,
    ) -> Result<h1::ResponseHead, ExchangeError> {
        self.stream.write_all(request).await.map_err(ExchangeError::Write)?;
        self.buf.clear();
        loop {
            if !self.buf.is_empty() {
                match h1::rewrite_response(&self.buf, rules, out)? {
                    Some(head) if (100..200).contains(&head.status) => {
                        self.buf.advance(head.len);
                        continue;
                    }
                    Some(head) => return Ok(head),
                    None if self.buf.len() > MAX_RESPONSE_HEAD => {
                        return Err(h1::ResponseError::TooLarge(MAX_RESPONSE_HEAD).into())
                    }
                    None => {}
                }
            }
            match self.fill().await {
                Ok(0) if self.buf.is_empty() => return Err(ExchangeError::Unanswered(None)),
                Ok(0) => return Err(ExchangeError::Eof),
                Ok(_) => {}
                Err(err) if self.buf.is_empty() => return Err(ExchangeError::Unanswered(Some(err))),
                Err(err) => return Err(ExchangeError::Read(err)),
            }
        }
    }

    /// Sends the response whose head is `head` to `client`: `out` (the rewritten head, finished)
    /// with the body bytes already read, then the rest of the body as it arrives. Returns whether
    /// the connection can carry another request.
    pub async fn relay<W: AsyncWrite + Unpin>(
        &mut self,
        head: h1::ResponseHead,
        out: &mut Vec<u8>,
        client: &mut W,
    ) -> Result<bool, RelayError> {
        let keep_alive = head.keep_alive;
        let mut framing = head.framing;
        self.buf.advance(head.len);
        let (take, mut done) = body_part(&mut framing, &self.buf)?;
        if take <= 16 * 1024 {
            out.extend_from_slice(&self.buf[..take]);
            client.write_all(out).await.map_err(RelayError::Client)?;
        } else {
            client.write_all(out).await.map_err(RelayError::Client)?;
            client.write_all(&self.buf[..take]).await.map_err(RelayError::Client)?;
        }
        self.buf.advance(take);
        while !done {
            self.buf.clear();
            if self.fill().await.map_err(RelayError::Upstream)? == 0 {
                return match framing {
                    h1::Framing::UntilClose => Ok(false),
                    _ => Err(RelayError::Truncated),
                };
            }
            let take;
            (take, done) = body_part(&mut framing, &self.buf)?;
            client.write_all(&self.buf[..take]).await.map_err(RelayError::Client)?;
            self.buf.advance(take);
        }
        // Bytes after the body would be a response nobody asked for: such a connection is not
        // reused.
        Ok(keep_alive && self.buf.is_empty())
    }

    /// Returns the connection to its upstream's pool, if the upstream is still configured.
    pub fn release(self) {
        if let Some(home) = self.home.upgrade() {
            home.pool.checkin_h1(self);
        }
    }
}

/// How many of `buf`'s bytes belong to the body, and whether the body ends with them.
fn body_part(framing: &mut h1::Framing, buf: &[u8]) -> Result<(usize, bool), h1::ChunkError> {
    Ok(match framing {
        h1::Framing::Empty => (0, true),
        h1::Framing::Length(left) => {
            let take = (*left).min(buf.len() as u64);
            *left -= take;
            (take as usize, *left == 0)
        }
        h1::Framing::Chunked(scanner) => match scanner.scan(buf)? {
            Some(end) => (end, true),
            None => (buf.len(), false),
        },
        h1::Framing::UntilClose => (buf.len(), false),
    })
}

/// A response body from an upstream; returns its connection to the pool once read to the end.
pub struct UpstreamResponseBody {
    inner: Incoming,
    /// The connection and its pool, until the body ends.
    give_back: Option<(http1::SendRequest<UpstreamBody>, Arc<UpstreamState>)>,
}

impl UpstreamResponseBody {
    fn finish(&mut self) {
        if let Some((sender, state)) = self.give_back.take() {
            state.pool.checkin(sender);
        }
    }
}

impl Body for UpstreamResponseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.finish(),
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.finish(),
            // An error leaves the connection in an unknown state: it is not reused.
            Poll::Ready(Some(Err(_))) => self.give_back = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The client for all upstreams.
#[derive(Clone)]
pub struct UpstreamClient {
    connect_timeout: Duration,
    tls: TlsConnector,
}

impl UpstreamClient {
    /// Fails only when `upstream.ca_file` cannot be used.
    pub fn new(settings: &UpstreamSettings) -> Result<Self, TlsError> {
        let tls = TlsConnector::from(crate::tls::client_config(settings.ca_file.as_deref())?);
        Ok(UpstreamClient { connect_timeout: settings.connect_timeout, tls })
    }

    /// Sends `req` (headers already rewritten, target in any form) to `upstream`, waiting at most
    /// `response_timeout` for the response head.
    pub async fn send(
        &self,
        upstream: &Upstream,
        mut req: Request<UpstreamBody>,
        response_timeout: Duration,
    ) -> Result<Response<UpstreamResponseBody>, SendError> {
        // Upstream connections are HTTP/1.1 with an origin-form target, whatever the client spoke.
        let target = req.uri().path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/"));
        *req.uri_mut() = Uri::from(target);
        *req.version_mut() = Version::HTTP_11;

        loop {
            let (mut sender, reused) = match upstream.state.pool.checkout() {
                Some(sender) => (sender, true),
                None => match self.connect(upstream).await {
                    Ok(sender) => (sender, false),
                    Err(error) => return Err(SendError { error, request: Some(req) }),
                },
            };
            // A pooled connection is normally ready at once; one still busy (its last response
            // ended before its request did) or closing is dropped rather than waited on.
            if reused && !matches!(tokio::time::timeout(READY_WAIT, sender.ready()).await, Ok(Ok(()))) {
                continue;
            }
            let sent = tokio::time::timeout(response_timeout, sender.try_send_request(req)).await;
            match sent {
                Err(_) => {
                    let error =
                        UpstreamError::Timeout { upstream: upstream.name.clone(), after: response_timeout };
                    return Err(SendError { error, request: None });
                }
                Ok(Ok(response)) => {
                    // A switched connection belongs to its tunnel from now on.
                    let reusable = response.status() != http::StatusCode::SWITCHING_PROTOCOLS;
                    let mut give_back = reusable.then(|| (sender, upstream.state.clone()));
                    // An empty body (HEAD, 204, 304, Content-Length: 0) may never be polled: the
                    // connection goes back now.
                    if response.body().is_end_stream() {
                        if let Some((sender, state)) = give_back.take() {
                            state.pool.checkin(sender);
                        }
                    }
                    return Ok(response.map(|inner| UpstreamResponseBody { inner, give_back }));
                }
                Ok(Err(mut err)) => match err.take_message() {
                    // Never written: a kept-alive connection closed under us. Another one will do.
                    Some(unsent) if reused => {
                        debug!(upstream = %upstream.name, "idle upstream connection was closed; retrying on another");
                        req = unsent;
                    }
                    unsent => {
                        let error = UpstreamError::Closed {
                            upstream: upstream.name.clone(),
                            source: err.into_error().into(),
                        };
                        return Err(SendError { error, request: unsent });
                    }
                },
            }
        }
    }

    /// Sends `request` (a complete upstream request, head and body) on the HTTP/1.1 fast path
    /// and reads the response head, writing the client's version to `out`. A pooled connection
    /// that turns out closed is replaced without counting as a failure when `replayable`.
    pub async fn send_h1(
        &self,
        upstream: &Upstream,
        request: &[u8],
        replayable: bool,
        rules: h1::ResponseRules,
        out: &mut Vec<u8>,
        response_timeout: Duration,
    ) -> Result<(UpstreamConn, h1::ResponseHead), H1SendError> {
        loop {
            let (mut conn, reused) = match upstream.state.pool.checkout_h1() {
                Some(conn) => (conn, true),
                None => match self.connect_tcp(upstream).await {
                    Ok(stream) => (UpstreamConn::new(stream, &upstream.state), false),
                    Err(error) => return Err(H1SendError { error, written: false }),
                },
            };
            let error = match tokio::time::timeout(response_timeout, conn.exchange(request, rules, out)).await
            {
                Ok(Ok(head)) => return Ok((conn, head)),
                Err(_) => UpstreamError::Timeout { upstream: upstream.name.clone(), after: response_timeout },
                Ok(Err(ExchangeError::Write(_) | ExchangeError::Unanswered(_))) if reused && replayable => {
                    debug!(upstream = %upstream.name, "idle upstream connection was closed; retrying on another");
                    continue;
                }
                Ok(Err(err)) => UpstreamError::Closed { upstream: upstream.name.clone(), source: err.into() },
            };
            return Err(H1SendError { error, written: true });
        }
    }

    /// A plain TCP connection to `upstream`, within the connect timeout.
    async fn connect_tcp(&self, upstream: &Upstream) -> Result<TcpStream, UpstreamError> {
        let connect = TcpStream::connect((upstream.authority.host(), upstream.port));
        let stream = match tokio::time::timeout(self.connect_timeout, connect).await {
            Err(_) => {
                let after = self.connect_timeout;
                return Err(UpstreamError::ConnectTimeout { upstream: upstream.name.clone(), after });
            }
            Ok(result) => {
                result.map_err(|source| UpstreamError::Connect { upstream: upstream.name.clone(), source })?
            }
        };
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }

    /// A connection for hyper's client, TLS for `https://` upstreams; TCP and TLS together
    /// within the connect timeout.
    async fn connect(&self, upstream: &Upstream) -> Result<http1::SendRequest<UpstreamBody>, UpstreamError> {
        let started = Instant::now();
        let stream = self.connect_tcp(upstream).await?;
        if !upstream.tls {
            return self.handshake(upstream, stream).await;
        }
        let name = || upstream.name.clone();
        let server_name =
            ServerName::try_from(upstream.authority.host().to_owned()).map_err(|e| UpstreamError::Tls {
                upstream: name(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidInput, e),
            })?;
        let left = self.connect_timeout.saturating_sub(started.elapsed());
        match tokio::time::timeout(left, self.tls.connect(server_name, stream)).await {
            Err(_) => Err(UpstreamError::ConnectTimeout { upstream: name(), after: self.connect_timeout }),
            Ok(Err(source)) => Err(UpstreamError::Tls { upstream: name(), source }),
            Ok(Ok(tls)) => self.handshake(upstream, tls).await,
        }
    }

    async fn handshake<I>(
        &self,
        upstream: &Upstream,
        io: I,
    ) -> Result<http1::SendRequest<UpstreamBody>, UpstreamError>
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, connection) =
            http1::Builder::new().handshake(TokioIo::new(io)).await.map_err(|source| {
                UpstreamError::Closed { upstream: upstream.name.clone(), source: source.into() }
            })?;
        let upstream_name = upstream.name.clone();
        tokio::spawn(async move {
            if let Err(err) = connection.with_upgrades().await {
                debug!(upstream = %upstream_name, error = %err, "upstream connection ended with an error");
            }
        });
        Ok(sender)
    }
}
