//! The per-request service: route, pick an upstream, forward, stream the answer back.
//!
//! [`Proxy::handle`] never fails: every error of the request path becomes its response in
//! [`error_response`], the one place that maps failures to status codes. Listening and connection
//! handling are [`crate::listener`]'s; the routing rules live in [`crate::router`] and
//! [`crate::balancer`].

use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{Either, Full};
use hyper::body::{Body as _, Incoming};
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::balancer::Balancer;
use crate::clock::{SharedClock, UnixMillis};
use crate::config::Ejection;
use crate::config::{ByPool, PoolName};
use crate::drain::{DrainClock, DrainStatus};
use crate::h1;
use crate::headers::{self, ClientIp};
use crate::metrics::{Metrics, ScrapeState};
use crate::router::Decision;
use crate::router::Route;
use crate::session::{HeaderSource, KeyOutcome, Located, Resolution, Sessions};
use crate::snapshot::{SharedSnapshot, Snapshot};
use crate::state::Op;
use crate::upstream::{
    empty_body, H1SendError, SendError, Upstream, UpstreamBody, UpstreamClient, UpstreamConn, UpstreamError,
    UpstreamResponseBody,
};
use crate::ErrorChain;

/// Response body: the upstream's streamed body, or a short body the proxy wrote itself.
pub type Body = Either<UpstreamResponseBody, Full<Bytes>>;

pub static X_ROLLOUT_POOL: HeaderName = HeaderName::from_static("x-rollout-pool");
pub static X_ROLLOUT_ERROR: HeaderName = HeaderName::from_static("x-rollout-error");

/// The proxy once it is ready. During a takeover the listeners accept before the state store is
/// free; requests wait here (up to `patience`) instead of failing.
pub struct Gate {
    proxy: std::sync::OnceLock<Arc<Proxy>>,
    opened: tokio::sync::Notify,
    patience: std::time::Duration,
}

impl Gate {
    pub fn new(patience: std::time::Duration) -> Arc<Gate> {
        Arc::new(Gate { proxy: std::sync::OnceLock::new(), opened: tokio::sync::Notify::new(), patience })
    }

    pub fn patience(&self) -> std::time::Duration {
        self.patience
    }

    pub fn open(&self, proxy: Arc<Proxy>) {
        let _ = self.proxy.set(proxy);
        self.opened.notify_waiters();
    }

    /// The proxy if it is ready.
    pub fn proxy_now(&self) -> Option<&Arc<Proxy>> {
        self.proxy.get()
    }

    /// The proxy, waiting for it while it starts; `None` if it did not come in time.
    pub async fn proxy(&self) -> Option<&Arc<Proxy>> {
        if let Some(proxy) = self.proxy.get() {
            return Some(proxy);
        }
        let wait = async {
            loop {
                let opened = self.opened.notified();
                tokio::pin!(opened);
                opened.as_mut().enable();
                if let Some(proxy) = self.proxy.get() {
                    return proxy;
                }
                opened.await;
            }
        };
        tokio::time::timeout(self.patience, wait).await.ok()
    }

    /// Answers `req` with the proxy, or with 503 `starting` if it is not ready in time.
    pub async fn handle(&self, req: Request<Incoming>, peer: &Peer) -> Response<Body> {
        match self.proxy().await {
            Some(proxy) => proxy.handle(req, peer).await,
            None => error_response(&ProxyError::Starting, None),
        }
    }
}

/// The client end of a connection, worked out once per connection.
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    pub ip: ClientIp,
}

impl Peer {
    pub fn new(addr: SocketAddr) -> Self {
        Peer { addr, ip: ClientIp::new(addr.ip()) }
    }
}

/// A client connection served on the HTTP/1.1 fast path ([`crate::h1`]), with buffers reused
/// from one request to the next.
pub struct ClientConn {
    pub stream: TcpStream,
    /// Bytes read from the client and not used yet.
    pub buf: BytesMut,
    pub peer: Peer,
    /// The upstream request, head and body, kept until the exchange is over for a retry.
    request: Vec<u8>,
    /// The response head being written to the client.
    out: Vec<u8>,
}

impl ClientConn {
    pub fn new(stream: TcpStream, peer: Peer) -> Self {
        ClientConn {
            stream,
            buf: BytesMut::with_capacity(8 * 1024),
            peer,
            request: Vec::with_capacity(1024),
            out: Vec::with_capacity(1024),
        }
    }

    /// Reads more from the client; 0 when it has closed its side.
    pub async fn fill(&mut self) -> std::io::Result<usize> {
        h1::fill(&mut self.stream, &mut self.buf, 2048, 8 * 1024).await
    }
}

/// What [`Proxy::plan_h1`] made of the bytes a fast-path connection has read.
pub enum H1Plan {
    /// The request head is not complete yet.
    Partial,
    /// A request for hyper's path: the connection is handed over.
    Unsupported,
    Ready(H1Request),
}

/// A fast-path request whose head has been read and routed, and whose upstream head is written.
pub struct H1Request {
    head_len: usize,
    body_len: usize,
    /// The client asked to close the connection after this exchange.
    close: bool,
    head_request: bool,
    /// Idempotent: may be sent again after it reached an upstream.
    replayable: bool,
    routed: Routed,
    pending: Option<u64>,
    write_ahead: bool,
    started: Instant,
    /// Method and path, when request lines are logged.
    logged: Option<(String, String)>,
}

/// Why the proxy answered a request itself.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    #[error("request head of {size} bytes is over the limit of {limit}")]
    HeadersTooLarge { size: usize, limit: usize },
    #[error("pool {pool} has no usable upstream")]
    NoUpstream { pool: PoolName },
    #[error("the proxy is still starting")]
    Starting,
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
}

/// Everything a request needs, shared by all connections.
pub struct Proxy {
    snapshot: SharedSnapshot,
    client: UpstreamClient,
    sessions: Arc<Sessions>,
    drain: Arc<DrainClock>,
    metrics: Arc<Metrics>,
    clock: SharedClock,
    /// Upgraded connections (WebSocket) being relayed; a graceful stop waits for them.
    tunnels: TaskTracker,
    /// Fired when a stop's grace period is over: open tunnels are closed.
    closing: CancellationToken,
    /// `X-Forwarded-Proto` of this listener.
    proto: &'static str,
}

/// A request as routing first sees it ([`Proxy::classify`]); only a keyed one needs its pin.
enum Classified<'r> {
    Prefix,
    Unkeyed,
    Keyed(Located<'r>),
}

/// What the routing step decided, kept for the response's metrics and log line.
#[derive(Debug, Clone, Copy)]
struct Routed {
    pool: PoolName,
    decision: Decision,
}

impl Proxy {
    pub fn new(
        snapshot: SharedSnapshot,
        client: UpstreamClient,
        sessions: Arc<Sessions>,
        drain: Arc<DrainClock>,
        metrics: Arc<Metrics>,
        clock: SharedClock,
        proto: &'static str,
    ) -> Self {
        Proxy {
            snapshot,
            client,
            sessions,
            drain,
            metrics,
            clock,
            tunnels: TaskTracker::new(),
            closing: CancellationToken::new(),
            proto,
        }
    }

    /// Answers one client request. Infallible: failures come back as proxy-made responses.
    pub async fn handle(&self, req: Request<Incoming>, peer: &Peer) -> Response<Body> {
        let started = Instant::now();
        let logged =
            tracing::enabled!(tracing::Level::DEBUG).then(|| (req.method().clone(), req.uri().clone()));
        let snapshot = self.snapshot.load_full();
        let mut routed = None;
        let response = match self.forward(&snapshot, req, &peer.ip, &mut routed).await {
            Ok(response) => response,
            Err(err) => {
                let pool = routed.map(|r| r.pool);
                warn!(peer = %peer.addr, pool = pool.map(PoolName::as_str), error = %ErrorChain(&err), "request failed");
                error_response(&err, pool.filter(|_| snapshot.pool_header))
            }
        };
        let elapsed = started.elapsed();
        match routed {
            Some(Routed { pool, decision }) => {
                self.metrics.request(decision, pool, response.status().as_u16(), elapsed.as_secs_f64())
            }
            None if response.status() == StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => {
                self.metrics.client_rejected.headers_too_large.inc()
            }
            None => self.metrics.client_rejected.bad_request.inc(),
        }
        if let Some((method, uri)) = logged {
            debug!(
                peer = %peer.addr,
                method = %method,
                path = uri.path(),
                pool = routed.map(|r| r.pool.as_str()),
                decision = routed.map(|r| r.decision.as_str()),
                status = response.status().as_u16(),
                elapsed_us = elapsed.as_micros() as u64,
                "request"
            );
        }
        response
    }

    async fn forward(
        &self,
        snapshot: &Snapshot,
        req: Request<Incoming>,
        client: &ClientIp,
        routed: &mut Option<Routed>,
    ) -> Result<Response<Body>, ProxyError> {
        if req.method() == Method::CONNECT {
            return Err(ProxyError::BadRequest("CONNECT is not supported"));
        }
        if !req.uri().path().starts_with('/') {
            return Err(ProxyError::BadRequest("the request target must be a path"));
        }
        let size = headers::head_size(req.uri(), req.headers());
        if size > snapshot.max_header_bytes {
            return Err(ProxyError::HeadersTooLarge { size, limit: snapshot.max_header_bytes });
        }

        let (pool, decision, pending, write_ahead) = self.choose_pool(
            snapshot,
            self.classify(snapshot, req.uri().path(), req.uri().query(), req.headers()),
        );
        if let (Decision::Pinned, Some(seq)) = (decision, pending) {
            // A pin another request made a moment ago: follow it only once it is durable.
            self.sessions.settle(seq).await;
        }
        let chosen = Routed { pool, decision };
        *routed = Some(chosen);
        let drain_ahead = if pool == PoolName::V1 { self.drain.record_v1(self.clock.now()) } else { None };

        let mut req = req;
        let client_upgrade = headers::is_upgrade(req.headers()).then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        headers::prepare_request(&mut parts.headers, &parts.uri, client, self.proto);
        // A request without a body can be rebuilt and sent again; one with a body only while it
        // has not left the proxy.
        let body = if body.is_end_stream() { empty_body() } else { Either::Left(body) };
        let replay =
            (matches!(body, Either::Right(_)) && is_idempotent(&parts.method) && client_upgrade.is_none())
                .then(|| (parts.method.clone(), parts.uri.clone(), parts.headers.clone()));
        let req = Request::from_parts(parts, body);

        let exchange = self.exchange(snapshot, pool, req, replay);
        let mut response = self.while_persisting(exchange, chosen, pending, write_ahead, drain_ahead).await?;

        if response.status() == StatusCode::SWITCHING_PROTOCOLS {
            headers::remove_hop_by_hop_keeping_upgrade(response.headers_mut());
            if let Some(client) = client_upgrade {
                let upstream = hyper::upgrade::on(&mut response);
                let closing = self.closing.clone();
                self.tunnels.spawn(async move {
                    tokio::select! {
                        _ = tunnel(client, upstream) => {}
                        _ = closing.cancelled() => debug!("tunnel closed at the end of the grace period"),
                    }
                });
            }
        } else {
            headers::remove_hop_by_hop(response.headers_mut());
        }
        if snapshot.pool_header {
            response.headers_mut().insert(X_ROLLOUT_POOL.clone(), pool_value(pool));
        }
        Ok(response.map(Either::Left))
    }

    /// Reads the request head at the start of `conn.buf`, routes it and writes its upstream head
    /// into the connection's request buffer. Requests the fast path does not serve, including
    /// any that hyper's path answers with an error, are [`H1Plan::Unsupported`].
    pub fn plan_h1(&self, snapshot: &Snapshot, conn: &mut ClientConn) -> H1Plan {
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
        h1::write_request(&mut conn.request, &head, conn.peer.ip.as_str(), self.proto);
        let (pool, decision, pending, write_ahead) = self.choose_pool(snapshot, classified);
        let logged = tracing::enabled!(tracing::Level::DEBUG)
            .then(|| (head.method.to_owned(), head.path().to_owned()));
        H1Plan::Ready(H1Request {
            head_len: head.len,
            body_len: head.content_length as usize,
            close: head.close,
            head_request: head.method == "HEAD",
            replayable: Method::from_bytes(head.method.as_bytes()).is_ok_and(|m| is_idempotent(&m)),
            routed: Routed { pool, decision },
            pending,
            write_ahead,
            started,
            logged,
        })
    }

    /// Serves a request [`Proxy::plan_h1`] planned: reads its body, exchanges it with an upstream
    /// and relays the response. Once `draining` fires, the response closes the connection.
    /// Returns whether the connection can take another request.
    pub async fn serve_h1(
        &self,
        snapshot: &Snapshot,
        req: H1Request,
        conn: &mut ClientConn,
        draining: &CancellationToken,
    ) -> bool {
        conn.buf.advance(req.head_len);
        // One deadline for the whole body: a client trickling it byte by byte does not reset it.
        // Read from the clock only when the body is not all here yet (most requests have none).
        let mut deadline = None;
        while conn.buf.len() < req.body_len {
            let deadline =
                *deadline.get_or_insert_with(|| tokio::time::Instant::now() + snapshot.response_timeout);
            match tokio::time::timeout_at(deadline, conn.fill()).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => {
                    debug!(peer = %conn.peer.addr, "client left or stalled while sending its body");
                    return false;
                }
            }
        }
        conn.request.extend_from_slice(&conn.buf[..req.body_len]);
        conn.buf.advance(req.body_len);

        let Routed { pool, decision } = req.routed;
        if let (Decision::Pinned, Some(seq)) = (decision, req.pending) {
            // A pin another request made a moment ago: follow it only once it is durable.
            self.sessions.settle(seq).await;
        }
        let drain_ahead = if pool == PoolName::V1 { self.drain.record_v1(self.clock.now()) } else { None };
        let rules = h1::ResponseRules {
            head_request: req.head_request,
            pool: snapshot.pool_header.then(|| pool.as_str()),
        };
        let exchange = self.exchange_h1(snapshot, pool, &conn.request, req.replayable, rules, &mut conn.out);
        let result =
            self.while_persisting(exchange, req.routed, req.pending, req.write_ahead, drain_ahead).await;
        let elapsed = req.started.elapsed();
        let (status, keep) = match result {
            Ok((mut upstream, head)) => {
                let status = head.status;
                let until_close = matches!(head.framing, h1::Framing::UntilClose);
                self.metrics.request(decision, pool, status, elapsed.as_secs_f64());
                let close = req.close || draining.is_cancelled();
                h1::finish_response_head(&mut conn.out, &head.framing, close);
                let keep = match upstream.relay(head, &mut conn.out, &mut conn.stream).await {
                    Ok(reusable) => {
                        if reusable {
                            upstream.release();
                        }
                        !close && !until_close
                    }
                    Err(err) => {
                        debug!(peer = %conn.peer.addr, pool = %pool, error = %ErrorChain(&err), "response relay stopped");
                        false
                    }
                };
                (status, keep)
            }
            Err(err) => {
                warn!(peer = %conn.peer.addr, pool = %pool, error = %ErrorChain(&err), "request failed");
                let shown = snapshot.pool_header.then_some(pool);
                let close = req.close || draining.is_cancelled();
                let status =
                    write_error_response(&mut conn.out, &err, shown, req.head_request, close).as_u16();
                self.metrics.request(decision, pool, status, elapsed.as_secs_f64());
                (status, conn.stream.write_all(&conn.out).await.is_ok() && !close)
            }
        };
        if let Some((method, path)) = req.logged {
            debug!(
                peer = %conn.peer.addr,
                method = %method,
                path = %path,
                pool = pool.as_str(),
                decision = decision.as_str(),
                status,
                elapsed_us = elapsed.as_micros() as u64,
                "request"
            );
        }
        keep
    }

    /// Sends the request to an upstream of `pool`, moving on to another one of the same pool
    /// (never the other pool) up to `retries` times when it could not be delivered. Feeds passive
    /// ejection and the upstream metrics.
    async fn exchange(
        &self,
        snapshot: &Snapshot,
        pool: PoolName,
        mut req: Request<UpstreamBody>,
        replay: Option<(Method, http::Uri, http::HeaderMap)>,
    ) -> Result<Response<UpstreamResponseBody>, ProxyError> {
        let balancer = snapshot.pool(pool);
        let mut failed: Option<&Arc<Upstream>> = None;
        let mut attempt = 0;
        loop {
            let upstream = pick(balancer, failed).ok_or(ProxyError::NoUpstream { pool })?;
            match self.client.send(upstream, req, snapshot.response_timeout).await {
                Ok(response) => {
                    self.note_response(snapshot, pool, upstream, response.status().as_u16());
                    return Ok(response);
                }
                Err(SendError { error, request }) => {
                    self.note_error(snapshot, pool, upstream, &error);
                    let again = request.or_else(|| {
                        replay.as_ref().map(|(method, uri, headers)| {
                            let mut rebuilt = Request::new(empty_body());
                            *rebuilt.method_mut() = method.clone();
                            *rebuilt.uri_mut() = uri.clone();
                            *rebuilt.headers_mut() = headers.clone();
                            rebuilt
                        })
                    });
                    match again {
                        Some(again) if may_retry(snapshot, attempt, &error) => {
                            debug!(pool = %pool, upstream = %upstream.name(), error = %ErrorChain(&error), "retrying on the same pool");
                            req = again;
                            attempt += 1;
                            failed = Some(upstream);
                        }
                        _ => return Err(error.into()),
                    }
                }
            }
        }
    }

    /// [`Proxy::exchange`] on the fast path: `request` is the whole upstream request, sent again
    /// as is on a retry.
    async fn exchange_h1(
        &self,
        snapshot: &Snapshot,
        pool: PoolName,
        request: &[u8],
        replayable: bool,
        rules: h1::ResponseRules,
        out: &mut Vec<u8>,
    ) -> Result<(UpstreamConn, h1::ResponseHead), ProxyError> {
        let balancer = snapshot.pool(pool);
        let mut failed: Option<&Arc<Upstream>> = None;
        let mut attempt = 0;
        loop {
            let upstream = pick(balancer, failed).ok_or(ProxyError::NoUpstream { pool })?;
            let sent = self
                .client
                .send_h1(upstream, request, replayable, rules, out, snapshot.response_timeout)
                .await;
            match sent {
                Ok((conn, head)) => {
                    self.note_response(snapshot, pool, upstream, head.status);
                    return Ok((conn, head));
                }
                Err(H1SendError { error, written }) => {
                    self.note_error(snapshot, pool, upstream, &error);
                    if (!written || replayable) && may_retry(snapshot, attempt, &error) {
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

    /// Records an upstream's response head for the metrics and passive ejection.
    fn note_response(&self, snapshot: &Snapshot, pool: PoolName, upstream: &Upstream, status: u16) {
        upstream.stats.response(status);
        // 502/503/504 say the upstream itself is in trouble; a 500 is one request's application
        // error and ejects nothing.
        if matches!(status, 502..=504) {
            self.note_failure(pool, snapshot.pool(pool), upstream, snapshot.ejection.get(pool));
        } else {
            upstream.health().record_success();
        }
    }

    /// Records a failed send for the metrics and passive ejection.
    fn note_error(&self, snapshot: &Snapshot, pool: PoolName, upstream: &Upstream, error: &UpstreamError) {
        upstream.stats.error(error.kind());
        // A response timeout may be a slow client's upload, not the upstream's fault.
        if !matches!(error, UpstreamError::Timeout { .. }) {
            self.note_failure(pool, snapshot.pool(pool), upstream, snapshot.ejection.get(pool));
        }
    }

    /// Counts a failure towards passive ejection. The last healthy upstream of a pool is never
    /// ejected: with nowhere else to go, trying it beats answering 503 for the whole period.
    fn note_failure(&self, pool: PoolName, balancer: &Balancer, upstream: &Upstream, ejection: &Ejection) {
        let others_healthy = balancer
            .upstreams()
            .iter()
            .any(|u| !std::ptr::eq(&**u, upstream) && u.weight() > 0 && u.is_healthy());
        let threshold = if others_healthy { ejection.consecutive_failures } else { 0 };
        if upstream.health().record_failure(threshold, ejection.duration) {
            warn!(pool = %pool, upstream = %upstream.name(), for_ = ?ejection.duration, "upstream ejected after consecutive failures");
        }
    }

    /// What the request's route and session key say, before any pin is looked up; a keyed
    /// request's pin slot starts loading here ([`Sessions::locate`]).
    fn classify<'r>(
        &self,
        snapshot: &Snapshot,
        path: &'r str,
        query: Option<&'r str>,
        headers: &'r impl HeaderSource,
    ) -> Classified<'r> {
        if snapshot.router.route(path) == Route::V2Prefix {
            return Classified::Prefix;
        }
        match snapshot.keys.extract_from(path, query, headers) {
            KeyOutcome::Key(key) => Classified::Keyed(self.sessions.locate(key)),
            KeyOutcome::Invalid => {
                self.metrics.keys_rejected_invalid.inc();
                Classified::Unkeyed
            }
            KeyOutcome::Absent => Classified::Unkeyed,
        }
    }

    /// The pool for a request, how it was decided, the store sequence number of the pin followed
    /// or made (`None` when no pin is involved or it is already durable), and whether the pin's
    /// activity was sent to the store ahead of the response.
    fn choose_pool(
        &self,
        snapshot: &Snapshot,
        classified: Classified<'_>,
    ) -> (PoolName, Decision, Option<u64>, bool) {
        let key = match classified {
            Classified::Prefix => return (PoolName::V2, Decision::Prefix, None, false),
            Classified::Unkeyed => return (snapshot.router.split(), Decision::Unkeyed, None, false),
            Classified::Keyed(key) => key,
        };
        match self.sessions.resolve(key, &snapshot.pin_policy, || snapshot.router.split()) {
            Resolution::Pinned { pool, seq, write_ahead } => {
                let pending = (!self.sessions.store().is_settled(seq)).then_some(seq);
                (pool, Decision::Pinned, pending, write_ahead)
            }
            Resolution::NewPin { pool, seq } => (pool, Decision::NewPin, Some(seq), false),
            Resolution::Full { pool } => (pool, Decision::Unkeyed, None, false),
        }
    }

    /// Runs `exchange` while what the request changed (the pin it made, a pin's activity written
    /// ahead, the drain clock) is made durable; the answer waits for both. `pending` is the
    /// request's pin sequence number from [`Proxy::choose_pool`].
    async fn while_persisting<T>(
        &self,
        exchange: impl std::future::Future<Output = T>,
        routed: Routed,
        pending: Option<u64>,
        write_ahead: bool,
        drain_ahead: Option<UnixMillis>,
    ) -> T {
        let new_pin = routed.decision == Decision::NewPin;
        if !new_pin && !write_ahead && drain_ahead.is_none() {
            return exchange.await;
        }
        let made = if new_pin { pending } else { None };
        let (result, durable) = tokio::join!(exchange, self.persist(made, drain_ahead));
        if !durable {
            warn!(pool = %routed.pool, "session or drain state not confirmed durable; answering anyway");
        }
        result
    }

    /// Commits everything this request sent to the store (the pin `new_pin` it made, a pin's
    /// activity, and the drain clock if `drain_ahead`), within a bound. False if that could not
    /// be confirmed.
    async fn persist(&self, new_pin: Option<u64>, drain_ahead: Option<UnixMillis>) -> bool {
        let store = self.sessions.store();
        if let Some(at) = drain_ahead {
            store.send(Op::LastV1Request(at));
        }
        let flushed = tokio::time::timeout(std::time::Duration::from_secs(5), store.flush()).await;
        // The flush reports its own commit; a new pin may have been in an earlier one that failed.
        let pin_durable = match new_pin {
            Some(seq) => self.sessions.settle(seq).await,
            None => true,
        };
        let durable = matches!(flushed, Ok(true)) && pin_durable;
        if let (true, Some(at)) = (durable, drain_ahead) {
            self.drain.mark_durable(at);
        }
        durable
    }

    pub fn client(&self) -> &UpstreamClient {
        &self.client
    }

    /// Waits up to `grace` for open tunnels to end, then closes the rest.
    pub async fn close_tunnels(&self, grace: std::time::Duration) {
        self.tunnels.close();
        if tokio::time::timeout(grace, self.tunnels.wait()).await.is_err() {
            warn!(open = self.tunnels.len(), "grace period over; closing open tunnels");
            self.closing.cancel();
            self.tunnels.wait().await;
        }
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// Publishes a new snapshot; the next request uses it, requests in flight finish on theirs.
    pub fn swap(&self, snapshot: Snapshot) {
        self.snapshot.store(Arc::new(snapshot));
    }

    pub fn sessions(&self) -> &Arc<Sessions> {
        &self.sessions
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The drain signal as of now.
    pub fn drain_status(&self) -> DrainStatus {
        let snapshot = self.snapshot.load();
        self.drain.status(
            self.clock.now(),
            self.sessions.live(PoolName::V1),
            self.sessions.v1_pins_end(),
            snapshot.quiet_window,
        )
    }

    /// State gauges for a metrics scrape.
    pub fn scrape_state(&self) -> ScrapeState {
        let snapshot = self.snapshot.load();
        let drain = self.drain_status();
        let mut upstreams = Vec::new();
        for pool in PoolName::ALL {
            for u in snapshot.pool(pool).upstreams() {
                upstreams.push((pool, u.name().to_string(), u.is_healthy(), u.weight()));
            }
        }
        let health = &self.sessions.store().health;
        ScrapeState {
            sessions_active: ByPool {
                v1: self.sessions.live(PoolName::V1),
                v2: self.sessions.live(PoolName::V2),
            },
            legacy_v1_percent: snapshot.router.legacy_v1_percent().as_f64(),
            v1_last_request_seconds: self.drain.last_v1_request() as f64 / 1000.0,
            v1_quiet_seconds: drain.quiet_for_seconds,
            quiet_window_seconds: drain.quiet_window_seconds,
            drained: drain.drained,
            upstreams,
            state_last_commit_seconds: health.last_commit.load(Ordering::Relaxed) as f64,
            state_commits: health.commits.load(Ordering::Relaxed),
            state_write_errors: health.write_errors.load(Ordering::Relaxed),
        }
    }

    /// Background upkeep, run about once a second: pin expiry and `last_seen` flushing, and
    /// persisting the drain clock. Returns the drain clock value it sent, if any; see
    /// [`Proxy::confirm_upkeep`].
    pub fn maintain(&self) -> Option<UnixMillis> {
        let snapshot = self.snapshot.load();
        self.sessions.maintain(&snapshot.pin_policy);
        let sent = self.drain.take_unstored();
        if let Some(ms) = sent {
            self.sessions.store().send(Op::LastV1Request(ms));
        }
        sent
    }

    /// Waits for the upkeep's writes to be committed (so passes never pile up in the store's
    /// queue) and records the drain clock value as durable.
    pub async fn confirm_upkeep(&self, sent: Option<UnixMillis>) {
        if self.sessions.store().flush().await {
            if let Some(ms) = sent {
                self.drain.mark_durable(ms);
            }
        }
    }
}

/// An upstream of `balancer`, preferring one other than `failed` (a retry) when the pool has one.
fn pick<'b>(balancer: &'b Balancer, failed: Option<&Arc<Upstream>>) -> Option<&'b Arc<Upstream>> {
    let upstream = balancer.pick()?;
    if failed.is_some_and(|f| Arc::ptr_eq(f, upstream)) {
        return Some(balancer.pick().unwrap_or(upstream));
    }
    Some(upstream)
}

/// Whether a failed send may go to another upstream of the same pool. A response timeout is
/// not retried: the upstream may still be working on the request.
fn may_retry(snapshot: &Snapshot, attempt: u32, error: &UpstreamError) -> bool {
    attempt < snapshot.retries && !matches!(error, UpstreamError::Timeout { .. })
}

/// Methods whose repetition has the same effect as one request (RFC 9110 §9.2.2).
fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// Relays bytes both ways between an upgraded client connection and its upstream.
async fn tunnel(client: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade) {
    match tokio::try_join!(client, upstream) {
        Ok((client, upstream)) => {
            let (mut client, mut upstream) = (TokioIo::new(client), TokioIo::new(upstream));
            if let Err(err) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
                debug!(error = %err, "tunnel ended with an error");
            }
        }
        Err(err) => debug!(error = %err, "protocol switch did not complete"),
    }
}

fn pool_value(pool: PoolName) -> HeaderValue {
    HeaderValue::from_static(pool.as_str())
}

/// Status, `x-rollout-error` cause and body text for a request the proxy could not forward:
/// the one place failures are mapped to answers. Details stay in the log, not in the client's
/// answer.
fn error_parts(err: &ProxyError) -> (StatusCode, &'static str, &'static str) {
    match err {
        ProxyError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request", "bad request"),
        ProxyError::HeadersTooLarge { .. } => {
            (StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, "headers_too_large", "request headers too large")
        }
        ProxyError::NoUpstream { .. } => {
            (StatusCode::SERVICE_UNAVAILABLE, "no_upstream", "no upstream available")
        }
        ProxyError::Starting => (StatusCode::SERVICE_UNAVAILABLE, "starting", "starting, try again"),
        ProxyError::Upstream(UpstreamError::Connect { .. } | UpstreamError::Tls { .. }) => {
            (StatusCode::BAD_GATEWAY, "upstream_connect", "upstream connection failed")
        }
        ProxyError::Upstream(UpstreamError::Closed { .. }) => {
            (StatusCode::BAD_GATEWAY, "upstream_closed", "upstream closed the connection")
        }
        ProxyError::Upstream(UpstreamError::ConnectTimeout { .. } | UpstreamError::Timeout { .. }) => {
            (StatusCode::GATEWAY_TIMEOUT, "upstream_timeout", "upstream timed out")
        }
    }
}

/// The response for a request the proxy could not forward: status, `x-rollout-error` naming the
/// cause, and a one-line plain-text body.
pub fn error_response(err: &ProxyError, pool: Option<PoolName>) -> Response<Body> {
    let (status, cause, text) = error_parts(err);
    let mut response = Response::new(Either::Right(Full::from(format!("{text}\n"))));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    headers.insert(X_ROLLOUT_ERROR.clone(), HeaderValue::from_static(cause));
    if let Some(pool) = pool {
        headers.insert(X_ROLLOUT_POOL.clone(), pool_value(pool));
    }
    response
}

/// [`error_response`] written as bytes for the fast path; returns the status.
fn write_error_response(
    out: &mut Vec<u8>,
    err: &ProxyError,
    pool: Option<PoolName>,
    head_request: bool,
    close: bool,
) -> StatusCode {
    let (status, cause, text) = error_parts(err);
    let mut headers = vec![("content-type", "text/plain; charset=utf-8"), ("x-rollout-error", cause)];
    if let Some(pool) = pool {
        headers.push(("x-rollout-pool", pool.as_str()));
    }
    h1::write_simple_response(out, status, &headers, text, head_request, close);
    status
}
