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
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery};
use http::{Request, Response, Uri, Version};
use http_body_util::{Either, Empty};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tracing::debug;

use crate::config::{UpstreamConfig, UpstreamName, UpstreamSettings, UpstreamUrl};
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
        source: hyper::Error,
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
                            source: err.into_error(),
                        };
                        return Err(SendError { error, request: unsent });
                    }
                },
            }
        }
    }

    async fn connect(&self, upstream: &Upstream) -> Result<http1::SendRequest<UpstreamBody>, UpstreamError> {
        let name = || upstream.name.clone();
        let host = upstream.authority.host();
        let connect = async {
            let stream = TcpStream::connect((host, upstream.port))
                .await
                .map_err(|source| UpstreamError::Connect { upstream: name(), source })?;
            let _ = stream.set_nodelay(true);
            if !upstream.tls {
                return Ok(Either::Left(stream));
            }
            let server_name = ServerName::try_from(host.to_owned()).map_err(|e| UpstreamError::Tls {
                upstream: name(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidInput, e),
            })?;
            let tls = self.tls.connect(server_name, stream).await;
            tls.map(Either::Right).map_err(|source| UpstreamError::Tls { upstream: name(), source })
        };
        let stream = match tokio::time::timeout(self.connect_timeout, connect).await {
            Err(_) => {
                return Err(UpstreamError::ConnectTimeout { upstream: name(), after: self.connect_timeout })
            }
            Ok(result) => result?,
        };
        match stream {
            Either::Left(tcp) => self.handshake(upstream, tcp).await,
            Either::Right(tls) => self.handshake(upstream, tls).await,
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
        let (sender, connection) = http1::Builder::new()
            .handshake(TokioIo::new(io))
            .await
            .map_err(|source| UpstreamError::Closed { upstream: upstream.name.clone(), source })?;
        let upstream_name = upstream.name.clone();
        tokio::spawn(async move {
            if let Err(err) = connection.with_upgrades().await {
                debug!(upstream = %upstream_name, error = %err, "upstream connection ended with an error");
            }
        });
        Ok(sender)
    }
}
