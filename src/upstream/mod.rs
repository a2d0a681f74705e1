//! Upstream servers and the client that talks to them.
//!
//! Each upstream keeps its own connections ([`pool`]): idle keep-alive HTTP/1.1 connections of
//! both paths, and a cap on how many may be open at once. A connection is taken from the pool
//! (or made) *before* the request is handed over, so a connect failure gives the request back
//! untouched and [`crate::proxy`] can retry it on another upstream of the same pool, body and
//! all. A connection goes back to the pool when its response body has been read to the end.
//! The hyper path sends with [`UpstreamClient::send`], the fast path with
//! [`UpstreamClient::send_h1`] ([`fast`]); both classify failures the same way
//! ([`UpstreamError`]), and [`crate::proxy`] turns them into responses. Which upstream to use is
//! [`crate::balancer`]'s choice; header rewriting is [`crate::headers`]'; whether an upstream is
//! healthy is [`crate::health`]'s.

mod fast;
mod pool;

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery};
use http::{Request, Response, Uri, Version};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio_rustls::TlsConnector;
use tracing::debug;

pub(crate) use fast::{H1SendError, RelayError, UpstreamConn};
use pool::{ConnPool, HyperConn, Slot};

use crate::config::{UpstreamConfig, UpstreamName, UpstreamSettings, UpstreamUrl};
use crate::health::Health;
use crate::metrics::{UpstreamErrorKind, UpstreamStats};
use crate::tls::TlsError;

/// How long a pooled connection may take to be ready for a new request before another is used.
const READY_WAIT: Duration = Duration::from_millis(100);

/// Largest upstream response head accepted, on either path.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;

/// What the proxy sends upstream on the hyper path: nothing (which can be sent again), or the
/// client's streamed body, watched so that a client's failure is told apart from the upstream's.
#[derive(Debug)]
pub(crate) enum UpstreamBody {
    Empty,
    Client { inner: Incoming, watch: Arc<BodyState> },
}

/// How a client's streamed body is doing, as the upstream client reads it.
#[derive(Debug, Default)]
pub(crate) struct BodyState {
    failed: AtomicBool,
    /// The last read of the body found nothing yet: it waits on the client.
    waiting: AtomicBool,
}

impl UpstreamBody {
    /// The client's body, and the watch that tells afterwards whether the client failed it.
    pub(crate) fn from_client(inner: Incoming) -> (Self, ClientBodyWatch) {
        let watch = Arc::new(BodyState::default());
        (UpstreamBody::Client { inner, watch: watch.clone() }, ClientBodyWatch(watch))
    }
}

/// Says whether a client's body failed while it was sent upstream (malformed chunked framing,
/// the client gone mid-upload) or was still awaited from the client: either way the client's
/// doing, not the upstream's.
#[derive(Debug)]
pub(crate) struct ClientBodyWatch(Arc<BodyState>);

impl ClientBodyWatch {
    pub(crate) fn failed(&self) -> bool {
        self.0.failed.load(Ordering::Acquire)
    }

    /// The upstream was ready for more of the body and the client had not sent it.
    pub(crate) fn is_waiting_on_client(&self) -> bool {
        self.0.waiting.load(Ordering::Acquire)
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            UpstreamBody::Empty => Poll::Ready(None),
            UpstreamBody::Client { inner, watch } => {
                let polled = Pin::new(inner).poll_frame(cx);
                watch.waiting.store(polled.is_pending(), Ordering::Release);
                if let Poll::Ready(Some(Err(_))) = &polled {
                    watch.failed.store(true, Ordering::Release);
                }
                polled
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Empty => true,
            UpstreamBody::Client { inner, .. } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Empty => SizeHint::with_exact(0),
            UpstreamBody::Client { inner, .. } => inner.size_hint(),
        }
    }
}

/// State of one upstream that outlives snapshots: its health and its connections.
#[derive(Debug)]
pub struct UpstreamState {
    pub health: Health,
    pool: ConnPool,
}

impl UpstreamState {
    pub fn new(settings: &UpstreamSettings) -> Arc<Self> {
        Arc::new(UpstreamState {
            health: Health::default(),
            pool: ConnPool::new(
                settings.max_idle_per_upstream,
                settings.idle_timeout,
                settings.max_connections_per_upstream,
            ),
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

    pub(crate) fn name(&self) -> &UpstreamName {
        &self.name
    }

    pub(crate) fn url(&self) -> &UpstreamUrl {
        &self.url
    }

    pub(crate) fn authority(&self) -> &Authority {
        &self.authority
    }

    pub fn weight(&self) -> u32 {
        self.weight
    }

    pub(crate) fn is_healthy(&self) -> bool {
        self.state.health.is_healthy()
    }

    pub(crate) fn health(&self) -> &Health {
        &self.state.health
    }

    /// The long-lived state, to carry into the next snapshot.
    pub(crate) fn state(&self) -> &Arc<UpstreamState> {
        &self.state
    }
}

/// Why an upstream produced no usable response head.
#[derive(Debug, thiserror::Error)]
pub(crate) enum UpstreamError {
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
    #[error("upstream {upstream} sent an invalid response")]
    Invalid {
        upstream: UpstreamName,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("upstream {upstream} has max_connections_per_upstream open; none came free within {after:?}")]
    Busy { upstream: UpstreamName, after: Duration },
}

impl UpstreamError {
    /// The `kind` label of `rollout_upstream_errors_total`; `None` for the proxy's own limit.
    pub(crate) fn kind(&self) -> Option<UpstreamErrorKind> {
        match self {
            UpstreamError::Connect { .. } | UpstreamError::Tls { .. } => Some(UpstreamErrorKind::Connect),
            UpstreamError::ConnectTimeout { .. } | UpstreamError::Timeout { .. } => {
                Some(UpstreamErrorKind::Timeout)
            }
            UpstreamError::Closed { .. } | UpstreamError::Invalid { .. } => Some(UpstreamErrorKind::Io),
            UpstreamError::Busy { .. } => None,
        }
    }

    /// Whether the upstream caused the failure, so it counts towards passive ejection. Not a
    /// response timeout (possibly a slow client's upload), and not one of the proxy's own
    /// ([`UpstreamError::is_local`]).
    pub(crate) fn is_upstream_fault(&self) -> bool {
        !self.is_local() && !matches!(self, UpstreamError::Timeout { .. })
    }

    /// Whether the proxy itself stopped the request before the upstream had a say: its own
    /// connection cap, or no descriptor or memory for the socket.
    pub(crate) fn is_local(&self) -> bool {
        match self {
            UpstreamError::Connect { source, .. } => is_local_shortage(source),
            UpstreamError::Busy { .. } => true,
            _ => false,
        }
    }
}

/// A socket error that says this host is short of something, whatever the upstream does.
fn is_local_shortage(err: &std::io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::EADDRNOTAVAIL)
    )
}

/// A failed send. `request` is the request itself when it never left the proxy, so it can be
/// sent elsewhere.
#[derive(Debug)]
pub(crate) struct SendError {
    pub error: UpstreamError,
    pub request: Option<Request<UpstreamBody>>,
}

/// An upstream connection's place under `upstream.max_connections_per_upstream`. A response that
/// switches protocols carries it in its extensions: the tunnel that takes the connection over
/// holds it until the tunnel closes.
#[derive(Debug, Clone)]
pub(crate) struct OpenConnection {
    _held: Arc<OwnedSemaphorePermit>,
}

/// A response body from an upstream; returns its connection to the pool once read to the end.
pub(crate) struct UpstreamResponseBody {
    inner: Incoming,
    /// The connection and its pool, until the body ends.
    give_back: Option<(HyperConn, Arc<UpstreamState>)>,
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
        loop {
            let polled = Pin::new(&mut self.inner).poll_frame(cx);
            match &polled {
                Poll::Ready(None) => self.finish(),
                // Trailer fields are not forwarded, the same as on the fast path ([`crate::h1::Chunked`]).
                Poll::Ready(Some(Ok(frame))) if frame.is_trailers() => {
                    if self.inner.is_end_stream() {
                        self.finish();
                    }
                    continue;
                }
                Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.finish(),
                // An error leaves the connection in an unknown state: it is not reused.
                Poll::Ready(Some(Err(_))) => self.give_back = None,
                _ => {}
            }
            return polled;
        }
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
pub(crate) struct UpstreamClient {
    connect_timeout: Duration,
    tls: TlsConnector,
}

impl UpstreamClient {
    /// Fails only when `upstream.ca_file` cannot be used.
    pub(crate) fn new(settings: &UpstreamSettings) -> Result<Self, TlsError> {
        let tls = TlsConnector::from(crate::tls::client_config(settings.ca_file.as_deref())?);
        Ok(UpstreamClient { connect_timeout: settings.connect_timeout, tls })
    }

    /// Sends `req` (headers already rewritten, target in any form) to `upstream`, waiting at most
    /// `response_timeout` for the response head.
    pub(crate) async fn send(
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
            let ((mut sender, open), reused) =
                match upstream.state.pool.slot(ConnPool::checkout, self.connect_timeout).await {
                    Some(Slot::Idle(conn)) => (conn, true),
                    Some(Slot::New(permit)) => match self.connect(upstream, Arc::new(permit)).await {
                        Ok(conn) => (conn, false),
                        Err(error) => return Err(SendError { error, request: Some(req) }),
                    },
                    None => return Err(SendError { error: self.busy(upstream), request: Some(req) }),
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
                Ok(Ok(mut response)) => {
                    // A switched connection belongs to its tunnel from now on, with its place
                    // under the cap.
                    let reusable = response.status() != http::StatusCode::SWITCHING_PROTOCOLS;
                    if !reusable {
                        response.extensions_mut().insert(OpenConnection { _held: open.clone() });
                    }
                    let mut give_back = reusable.then(|| ((sender, open), upstream.state.clone()));
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
                        let source = err.into_error();
                        let upstream = upstream.name.clone();
                        let error = if source.is_parse() {
                            UpstreamError::Invalid { upstream, source: source.into() }
                        } else {
                            UpstreamError::Closed { upstream, source: source.into() }
                        };
                        return Err(SendError { error, request: unsent });
                    }
                },
            }
        }
    }

    fn busy(&self, upstream: &Upstream) -> UpstreamError {
        UpstreamError::Busy { upstream: upstream.name.clone(), after: self.connect_timeout }
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
    /// within the connect timeout. `open` counts it against the cap until it closes.
    async fn connect(
        &self,
        upstream: &Upstream,
        open: Arc<OwnedSemaphorePermit>,
    ) -> Result<HyperConn, UpstreamError> {
        let started = Instant::now();
        let stream = self.connect_tcp(upstream).await?;
        if !upstream.tls {
            return self.handshake(upstream, stream, open).await;
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
            Ok(Ok(tls)) => self.handshake(upstream, tls, open).await,
        }
    }

    async fn handshake<I>(
        &self,
        upstream: &Upstream,
        io: I,
        open: Arc<OwnedSemaphorePermit>,
    ) -> Result<HyperConn, UpstreamError>
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, connection) =
            // The largest response head is the same on both paths.
            http1::Builder::new().max_buf_size(MAX_RESPONSE_HEAD).handshake(TokioIo::new(io)).await.map_err(
                |source| UpstreamError::Closed { upstream: upstream.name.clone(), source: source.into() },
            )?;
        let upstream_name = upstream.name.clone();
        let held = open.clone();
        tokio::spawn(async move {
            let _open = held;
            if let Err(err) = connection.with_upgrades().await {
                debug!(upstream = %upstream_name, error = %err, "upstream connection ended with an error");
            }
        });
        Ok((sender, open))
    }
}
