//! The per-request service: route, pick an upstream, forward, stream the answer back.
//!
//! A request arrives on one of two codecs: the HTTP/1.1 fast path ([`fast`], plain keep-alive
//! HTTP/1.1 parsed in place) or hyper ([`hyper`], everything else: HTTP/2, TLS, HTTP/1.0,
//! streamed and chunked uploads, protocol switches). The rules both follow live once, here and
//! in [`crate::headers`]: routing and pins ([`Proxy::classify`], [`Proxy::choose_pool`]), what
//! the store must hold before the answer ([`Proxy::while_persisting`]), which failures count
//! against an upstream ([`Proxy::note_error`]), what may be sent again ([`may_retry`],
//! [`is_resendable`]), how a failure becomes an answer ([`error_parts`], the one place that maps
//! failures to status codes) and how a request is counted and logged ([`Proxy::account`]). A
//! codec only parses and writes bytes; `src/proxy/LIFECYCLE.md` maps each step of the fast path
//! to its hyper twin. Listening and connection handling are [`crate::listener`]'s; the routing
//! rules live in [`crate::router`] and [`crate::balancer`].

mod fast;
mod hyper;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONNECTION, CONTENT_TYPE};
use http::{Method, Response, StatusCode};
use http_body_util::{Either, Full};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

pub(crate) use fast::{ClientConn, H1Plan};

use crate::balancer::Balancer;
use crate::clock::UnixMillis;
use crate::config::{Ejection, OnStoreError, PoolName};
use crate::h1;
use crate::headers::{ClientIp, HostError};
use crate::router::{Decision, Route};
use crate::session::{HeaderSource, KeyOutcome, Located, Resolution};
use crate::shared::Shared;
use crate::snapshot::Snapshot;
use crate::store::{Op, StoredPin};
use crate::upstream::{Upstream, UpstreamClient, UpstreamError, UpstreamResponseBody};
use crate::ErrorChain;

/// Response body: the upstream's streamed body, or a short body the proxy wrote itself.
pub(crate) type Body = Either<UpstreamResponseBody, Full<Bytes>>;

pub(crate) static X_ROLLOUT_POOL: HeaderName = HeaderName::from_static("x-rollout-pool");
pub(crate) static X_ROLLOUT_ERROR: HeaderName = HeaderName::from_static("x-rollout-error");

/// The client end of a connection, worked out once per connection.
#[derive(Debug, Clone)]
pub(crate) struct Peer {
    pub addr: SocketAddr,
    pub ip: ClientIp,
}

impl Peer {
    pub(crate) fn new(addr: SocketAddr) -> Self {
        Peer { addr, ip: ClientIp::new(addr.ip()) }
    }
}

/// Why the proxy answered a request itself.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ProxyError {
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    #[error("bad Host")]
    Host(#[from] HostError),
    /// The client's body failed while it was being sent upstream: malformed chunked framing, or
    /// the client went away mid-upload. The client's error, not the upstream's.
    #[error("the client's request body failed")]
    ClientBody(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The client did not send its body within `upstream.response_timeout`.
    #[error("the client did not send its request body in time")]
    ClientTimeout,
    #[error("request head of {size} bytes is over the limit of {limit}")]
    HeadersTooLarge { size: usize, limit: usize },
    #[error("pool {pool} has no usable upstream")]
    NoUpstream { pool: PoolName },
    #[error("the proxy is still starting")]
    Starting,
    /// A new session could not be claimed in the fleet store, and `on_store_error` is
    /// `fail_closed`.
    #[error("the fleet store is unreachable; new sessions are refused")]
    StoreUnavailable,
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
}

/// Everything a request needs, shared by all connections: the shared state plus the upstream
/// client and the tunnels a graceful stop waits for.
pub(crate) struct Proxy {
    shared: Arc<Shared>,
    client: UpstreamClient,
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

/// The outcome of routing one request ([`Proxy::choose_pool`]).
#[derive(Debug, Clone)]
struct Choice {
    routed: Routed,
    /// In fleet mode, the session key of a pin the fleet store has not confirmed yet: the one
    /// this request made, claimed before the request goes anywhere, or one another request
    /// made a moment ago, whose confirmation this one waits for ([`Proxy::admit`]).
    fleet_key: Option<Box<str>>,
    /// Store sequence number of the pin followed or made, while it is not durable yet.
    pending: Option<u64>,
    /// The pin's activity was sent to the store ahead of the response.
    write_ahead: bool,
}

/// What a request's log line says beyond its routing and status, gathered while it is served;
/// `None` when no line is written (no access log, and debug is off).
type Logged = Option<Box<LogLine>>;

struct LogLine {
    method: String,
    path: String,
    /// A digest of the session key (never the key): keyed with the fleet's secret split salt,
    /// so log readers can follow a session without learning, or guessing, its study id.
    session: Option<String>,
    upstream: Option<crate::config::UpstreamName>,
    /// `log.access` is on: the line goes to the `access` target at info.
    access: bool,
}

impl LogLine {
    fn wanted(snapshot: &Snapshot, method: &str, path: &str) -> Logged {
        (snapshot.access_log || tracing::enabled!(tracing::Level::DEBUG)).then(|| {
            Box::new(LogLine {
                method: method.to_owned(),
                path: path.to_owned(),
                session: None,
                upstream: None,
                access: snapshot.access_log,
            })
        })
    }
}

impl Proxy {
    pub(crate) fn new(shared: Arc<Shared>, client: UpstreamClient, proto: &'static str) -> Self {
        Proxy { shared, client, tunnels: TaskTracker::new(), closing: CancellationToken::new(), proto }
    }

    /// Counts and logs one answered request, whichever path served it. A request that was
    /// never routed was refused: it counts as a rejected client request.
    fn account(&self, peer: &Peer, routed: Option<Routed>, status: u16, started: Instant, logged: Logged) {
        let elapsed = started.elapsed();
        match routed {
            Some(Routed { pool, decision }) => {
                self.shared.metrics().request(decision, pool, status, elapsed.as_secs_f64())
            }
            None if status == StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE.as_u16() => {
                self.shared.metrics().client_rejected.headers_too_large.inc()
            }
            None => self.shared.metrics().client_rejected.bad_request.inc(),
        }
        let Some(line) = logged else { return };
        let (pool, decision) = (routed.map(|r| r.pool.as_str()), routed.map(|r| r.decision.as_str()));
        let upstream = line.upstream.as_ref().map(|u| u.as_str());
        if line.access {
            // No path or query: they may carry the session key in clear.
            info!(
                target: "access",
                peer = %peer.addr,
                method = %line.method,
                pool,
                upstream,
                decision,
                session = line.session.as_deref(),
                status,
                duration_ms = elapsed.as_secs_f64() * 1000.0,
                "request"
            );
        } else {
            debug!(
                peer = %peer.addr,
                method = %line.method,
                path = %line.path,
                pool,
                upstream,
                decision,
                status,
                elapsed_us = elapsed.as_micros() as u64,
                "request"
            );
        }
    }

    /// The access log's digest of a keyed request's session key (only the access line shows it).
    fn session_digest(&self, line: &LogLine, classified: &Classified<'_>) -> Option<String> {
        match classified {
            Classified::Keyed(located) if line.access => {
                Some(self.shared.sessions().key_digest(located.key()))
            }
            _ => None,
        }
    }

    /// Logs a request the proxy answered itself.
    fn log_failure(&self, peer: &Peer, pool: Option<PoolName>, err: &ProxyError) {
        match err {
            ProxyError::BadRequest(_)
            | ProxyError::Host(_)
            | ProxyError::ClientBody(_)
            | ProxyError::ClientTimeout => {
                debug!(peer = %peer.addr, error = %ErrorChain(err), "bad request")
            }
            _ => {
                warn!(peer = %peer.addr, pool = pool.map(PoolName::as_str), error = %ErrorChain(err), "request failed")
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

    /// Records a failed exchange for the metrics and, if the upstream caused it
    /// ([`UpstreamError::is_upstream_fault`]), for passive ejection.
    fn note_error(&self, snapshot: &Snapshot, pool: PoolName, upstream: &Upstream, error: &UpstreamError) {
        if let Some(kind) = error.kind() {
            upstream.stats.error(kind);
        }
        if error.is_upstream_fault() {
            self.note_failure(pool, snapshot.pool(pool), upstream, snapshot.ejection.get(pool));
        }
    }

    /// Counts a failure towards passive ejection ([`crate::health::Health::record_failure`]).
    fn note_failure(&self, pool: PoolName, balancer: &Balancer, upstream: &Upstream, ejection: &Ejection) {
        if upstream.health().record_failure(ejection, balancer.has_other_usable(upstream)) {
            warn!(pool = %pool, upstream = %upstream.name(), for_ = ?ejection.duration, "upstream ejected after consecutive failures");
        }
    }

    /// What the request's route and session key say, before any pin is looked up; a keyed
    /// request's pin slot starts loading here ([`Sessions::locate`](crate::session::Sessions::locate)). Both paths give it the
    /// path and query as the client sent them, without a `#fragment`, and the request's own
    /// header fields.
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
            KeyOutcome::Key(key) => Classified::Keyed(self.shared.sessions().locate(key)),
            KeyOutcome::Invalid => {
                self.shared.metrics().keys_rejected_invalid.inc();
                Classified::Unkeyed
            }
            KeyOutcome::Absent => Classified::Unkeyed,
        }
    }

    /// The pool for a request and how it was decided.
    fn choose_pool(&self, snapshot: &Snapshot, classified: Classified<'_>) -> Choice {
        let plain = |pool, decision| Choice {
            routed: Routed { pool, decision },
            fleet_key: None,
            pending: None,
            write_ahead: false,
        };
        let key = match classified {
            Classified::Prefix => return plain(PoolName::V2, Decision::Prefix),
            Classified::Unkeyed => return plain(snapshot.router.split(), Decision::Unkeyed),
            Classified::Keyed(key) => key,
        };
        let split = |roll| snapshot.router.split_session(roll);
        match self.shared.sessions().resolve(key, &snapshot.pin_policy, split) {
            Resolution::Pinned { pool, seq, write_ahead } => {
                let pending = (!self.shared.store().is_settled(seq)).then_some(seq);
                Choice {
                    routed: Routed { pool, decision: Decision::Pinned },
                    fleet_key: pending.and(self.shared.fleet()).map(|_| key.key().into()),
                    pending,
                    write_ahead,
                }
            }
            Resolution::NewPin { pool, seq } => Choice {
                routed: Routed { pool, decision: Decision::NewPin },
                fleet_key: self.shared.fleet().map(|_| key.key().into()),
                pending: Some(seq),
                write_ahead: false,
            },
            Resolution::Full { pool } => plain(pool, Decision::Unkeyed),
        }
    }

    /// What both paths do between routing and sending: in fleet mode, claim a new pin in the
    /// fleet store (the pool may change to the one another replica pinned first); wait until a
    /// pin another request made a moment ago is durable before following it; and note v1 traffic
    /// for the drain clock. Returns the drain clock value to make durable with the answer, if
    /// any.
    async fn admit(&self, choice: &mut Choice) -> Result<Option<UnixMillis>, ProxyError> {
        if let Some(key) = choice.fleet_key.take() {
            match (choice.routed.decision, choice.pending) {
                (Decision::NewPin, Some(seq)) => self.claim_in_fleet(&key, seq, choice).await?,
                // Another request's pin, not confirmed yet: once it is, follow what it became.
                (Decision::Pinned, Some(seq)) => {
                    self.shared.sessions().settle(seq).await;
                    if let Some((pool, _)) = self.shared.sessions().pin_of(&key) {
                        choice.routed.pool = pool;
                    }
                }
                _ => {}
            }
        }
        if let (Decision::Pinned, Some(seq)) = (choice.routed.decision, choice.pending) {
            self.shared.sessions().settle(seq).await;
        }
        Ok(if choice.routed.pool == PoolName::V1 {
            self.shared.drain().record_v1(self.shared.now())
        } else {
            None
        })
    }

    /// Claims the pin this request made for `key` in the fleet store. If another replica pinned
    /// the key first, its pin replaces this one in the local copy and the request follows it.
    /// If the store cannot be reached, `on_store_error` decides: keep the local pin (`degrade`)
    /// or refuse the new session (`fail_closed`).
    async fn claim_in_fleet(&self, key: &str, seq: u64, choice: &mut Choice) -> Result<(), ProxyError> {
        let (Some(fleet), sessions) = (self.shared.fleet(), self.shared.sessions()) else { return Ok(()) };
        // The pool this request was routed to. The local copy may say otherwise by now (another
        // replica's pin for the key can arrive from the change stream meanwhile): the fleet
        // store's answer decides, not the table.
        let proposed = choice.routed.pool;
        let first_seen =
            sessions.pin_of(key).map_or_else(|| (self.shared.now() / 1000) as u32, |(_, first)| first);
        let policy = self.shared.snapshot().pin_policy;
        match fleet.claim(key, proposed, first_seen, &policy).await {
            Ok(claimed) => {
                let (first_seen, last_seen) = (claimed.first_seen, claimed.last_seen);
                let pin = StoredPin { key: key.into(), pool: claimed.pool, first_seen, last_seen };
                sessions.confirm_claim(key, seq, Some(&pin));
                if claimed.pool != proposed {
                    self.shared.metrics().pin_conflicts.inc();
                    // The fleet already holds that pin durably: nothing to wait for.
                    choice.routed = Routed { pool: claimed.pool, decision: Decision::Pinned };
                    choice.pending = None;
                }
                Ok(())
            }
            Err(_) if fleet.on_error() == OnStoreError::FailClosed => {
                sessions.unmake(key, first_seen);
                sessions.confirm_claim(key, seq, None);
                Err(ProxyError::StoreUnavailable)
            }
            Err(_) => {
                // `degrade`: served on the local pin, written to the store once it is back.
                sessions.confirm_claim(key, seq, None);
                let pin = StoredPin { key: key.into(), pool: proposed, first_seen, last_seen: first_seen };
                fleet.remember_unpublished(pin);
                Ok(())
            }
        }
    }

    /// Runs `exchange` while what the request changed (the pin it made, a pin's activity written
    /// ahead, the drain clock from [`Proxy::admit`]) is made durable; the answer waits for both.
    async fn while_persisting<T>(
        &self,
        exchange: impl std::future::Future<Output = T>,
        choice: &Choice,
        drain_ahead: Option<UnixMillis>,
    ) -> T {
        let new_pin = choice.routed.decision == Decision::NewPin;
        if !new_pin && !choice.write_ahead && drain_ahead.is_none() {
            return exchange.await;
        }
        let made = if new_pin { choice.pending } else { None };
        let (result, durable) = tokio::join!(exchange, self.persist(made, drain_ahead));
        if !durable {
            warn!(pool = %choice.routed.pool, "session or drain state not confirmed durable; answering anyway");
        }
        result
    }

    /// Commits everything this request sent to the store (the pin `new_pin` it made, a pin's
    /// activity, and the drain clock if `drain_ahead`), within a bound. False if that could not
    /// be confirmed.
    async fn persist(&self, new_pin: Option<u64>, drain_ahead: Option<UnixMillis>) -> bool {
        let store = self.shared.store();
        if let Some(at) = drain_ahead {
            store.send(Op::LastV1Request(at));
        }
        let flushed = tokio::time::timeout(std::time::Duration::from_secs(5), store.flush()).await;
        // The flush reports its own commit; a new pin may have been in an earlier one that failed.
        let pin_durable = match new_pin {
            Some(seq) => self.shared.sessions().settle(seq).await,
            None => true,
        };
        let durable = matches!(flushed, Ok(true)) && pin_durable;
        if let (true, Some(at)) = (durable, drain_ahead) {
            self.shared.drain().mark_durable(at);
        }
        durable
    }

    /// Waits up to `grace` for open tunnels to end, then closes the rest.
    pub(crate) async fn close_tunnels(&self, grace: std::time::Duration) {
        self.tunnels.close();
        if tokio::time::timeout(grace, self.tunnels.wait()).await.is_err() {
            warn!(open = self.tunnels.len(), "grace period over; closing open tunnels");
            self.closing.cancel();
            self.tunnels.wait().await;
        }
    }

    pub(crate) fn snapshot(&self) -> Arc<Snapshot> {
        self.shared.snapshot()
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

/// Whether a failed attempt may go to another upstream of the same pool (the same rule on both
/// paths): always when the request never left the proxy (`sent` false: no connection, or the
/// pool's connection cap); when it did and the connection closed before a response, only if it
/// can be sent again ([`is_resendable`]). A response timeout is never retried (the upstream may
/// still be working on the request), nor an invalid response (it may have acted on it).
fn may_retry(snapshot: &Snapshot, attempt: u32, error: &UpstreamError, sent: bool, resendable: bool) -> bool {
    attempt < snapshot.retries
        && !matches!(error, UpstreamError::Timeout { .. } | UpstreamError::Invalid { .. })
        && (!sent || resendable)
}

/// Whether a request that reached an upstream may be sent to another one: an idempotent method
/// (RFC 9110 §9.2.2) without a body. A body is the client's stream on hyper's path and cannot be
/// read twice, so neither path resends one.
fn is_resendable(method: &Method, has_body: bool) -> bool {
    !has_body
        && matches!(
            *method,
            Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
        )
}

fn pool_value(pool: PoolName) -> HeaderValue {
    HeaderValue::from_static(pool.as_str())
}

/// Status, `x-rollout-error` cause and body text for a request the proxy could not forward:
/// the one place failures are mapped to answers. Details stay in the log, not in the client's
/// answer.
fn error_parts(err: &ProxyError) -> (StatusCode, &'static str, &'static str) {
    match err {
        ProxyError::BadRequest(_) | ProxyError::Host(_) | ProxyError::ClientBody(_) => {
            (StatusCode::BAD_REQUEST, "bad_request", "bad request")
        }
        ProxyError::ClientTimeout => {
            (StatusCode::REQUEST_TIMEOUT, "client_timeout", "request body not received in time")
        }
        ProxyError::HeadersTooLarge { .. } => {
            (StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, "headers_too_large", "request headers too large")
        }
        ProxyError::NoUpstream { .. } => {
            (StatusCode::SERVICE_UNAVAILABLE, "no_upstream", "no upstream available")
        }
        ProxyError::Starting => (StatusCode::SERVICE_UNAVAILABLE, "starting", "starting, try again"),
        ProxyError::StoreUnavailable => {
            (StatusCode::SERVICE_UNAVAILABLE, "store_unavailable", "session store unavailable, try again")
        }
        ProxyError::Upstream(UpstreamError::Connect { .. } | UpstreamError::Tls { .. }) => {
            (StatusCode::BAD_GATEWAY, "upstream_connect", "upstream connection failed")
        }
        ProxyError::Upstream(UpstreamError::Closed { .. }) => {
            (StatusCode::BAD_GATEWAY, "upstream_closed", "upstream closed the connection")
        }
        ProxyError::Upstream(UpstreamError::Invalid { .. }) => {
            (StatusCode::BAD_GATEWAY, "upstream_invalid", "upstream sent an invalid response")
        }
        ProxyError::Upstream(UpstreamError::Busy { .. }) => {
            (StatusCode::SERVICE_UNAVAILABLE, "upstream_busy", "upstream busy")
        }
        ProxyError::Upstream(UpstreamError::ConnectTimeout { .. } | UpstreamError::Timeout { .. }) => {
            (StatusCode::GATEWAY_TIMEOUT, "upstream_timeout", "upstream timed out")
        }
    }
}

/// Whether the connection closes after the proxy answers `err`: a client whose request was
/// refused (400, 408, 431) may have left the connection's framing in doubt, so nothing more is read
/// from it.
fn closes_connection(err: &ProxyError) -> bool {
    error_parts(err).0.is_client_error()
}

/// The response for a request the proxy could not forward: status, `x-rollout-error` naming the
/// cause, and a one-line plain-text body; on HTTP/1 a refused request also closes the
/// connection.
pub(crate) fn error_response(
    err: &ProxyError,
    pool: Option<PoolName>,
    version: http::Version,
) -> Response<Body> {
    let (status, cause, text) = error_parts(err);
    let mut response = Response::new(Either::Right(Full::from(format!("{text}\n"))));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    headers.insert(X_ROLLOUT_ERROR.clone(), HeaderValue::from_static(cause));
    if let Some(pool) = pool {
        headers.insert(X_ROLLOUT_POOL.clone(), pool_value(pool));
    }
    if closes_connection(err) && version < http::Version::HTTP_2 {
        headers.insert(CONNECTION, HeaderValue::from_static("close"));
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
    h1::write_simple_response(out, status, &headers, text, head_request, close || closes_connection(err));
    status
}
