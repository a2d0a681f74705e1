//! The hyper path: requests hyper parsed (HTTP/2, TLS, HTTP/1.0, streamed and chunked uploads,
//! protocol switches, whatever the fast path hands over), forwarded with hyper's client.
//!
//! Its steps are the fast path's ([`super::fast`]) one for one, calling the same rules; only
//! the representation differs (a [`http::HeaderMap`] here, bytes there).

use std::time::Instant;

use http::header::{HeaderValue, HOST};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Either;
use hyper::body::{Body as _, Incoming};
use hyper_util::rt::TokioIo;
use tracing::debug;

use super::{
    error_response, is_resendable, may_retry, pick, pool_value, Body, LogLine, Logged, Peer, Proxy,
    ProxyError, Routed, X_ROLLOUT_POOL,
};
use crate::config::{PoolName, UpstreamName};
use crate::headers;
use crate::snapshot::Snapshot;
use crate::upstream::{
    ClientBodyWatch, OpenConnection, SendError, UpstreamBody, UpstreamError, UpstreamResponseBody,
};
use crate::ErrorChain;

/// What it takes to send a request again after an attempt failed: the request head, for a
/// request without a body ([`is_resendable`]).
type Replay = Option<(Method, http::Uri, http::HeaderMap)>;

impl Proxy {
    /// Answers one client request. Infallible: failures come back as proxy-made responses.
    pub(crate) async fn handle(&self, req: Request<Incoming>, peer: &Peer) -> Response<Body> {
        let started = Instant::now();
        let snapshot = self.snapshot();
        let mut logged = LogLine::wanted(&snapshot, req.method().as_str(), req.uri().path());
        let version = req.version();
        let mut routed = None;
        let response = match self.forward(&snapshot, req, peer, &mut routed, &mut logged).await {
            Ok(response) => response,
            Err(err) => {
                let pool = routed.map(|r: Routed| r.pool);
                self.log_failure(peer, pool, &err);
                error_response(&err, pool.filter(|_| snapshot.pool_header), version)
            }
        };
        self.account(peer, routed, response.status().as_u16(), started, logged);
        response
    }

    async fn forward(
        &self,
        snapshot: &Snapshot,
        req: Request<Incoming>,
        peer: &Peer,
        routed: &mut Option<Routed>,
        line: &mut Logged,
    ) -> Result<Response<Body>, ProxyError> {
        if req.method() == Method::CONNECT {
            return Err(ProxyError::BadRequest("CONNECT is not supported"));
        }
        if !req.uri().path().starts_with('/') {
            return Err(ProxyError::BadRequest("the request target must be a path"));
        }
        let host_fields =
            headers::HostFields::of(req.headers().get_all(HOST).into_iter().map(HeaderValue::as_bytes));
        let host = headers::request_host(req.uri().authority().map(|a| a.as_str().as_bytes()), host_fields)?;
        let host = HeaderValue::from_bytes(host).expect("a valid authority is a valid header value");
        let size = headers::head_size(req.uri(), req.headers());
        if size > snapshot.max_header_bytes {
            return Err(ProxyError::HeadersTooLarge { size, limit: snapshot.max_header_bytes });
        }

        let classified = self.classify(snapshot, req.uri().path(), req.uri().query(), req.headers());
        if let Some(line) = line.as_mut() {
            line.session = self.session_digest(line, &classified);
        }
        let mut choice = self.choose_pool(snapshot, classified);
        *routed = Some(choice.routed);
        let drain_ahead = self.admit(&mut choice).await?;
        *routed = Some(choice.routed);

        let mut req = req;
        let client_upgrade = headers::is_upgrade(req.headers()).then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        headers::prepare_request(&mut parts.headers, host, &peer.ip, self.proto, snapshot.allow_underscores);
        let (body, watch) = if body.is_end_stream() {
            (UpstreamBody::Empty, None)
        } else {
            let (body, watch) = UpstreamBody::from_client(body);
            (body, Some(watch))
        };
        let replay = (is_resendable(&parts.method, watch.is_some()) && client_upgrade.is_none())
            .then(|| (parts.method.clone(), parts.uri.clone(), parts.headers.clone()));
        let req = Request::from_parts(parts, body);

        let pool = choice.routed.pool;
        let exchange = self.exchange(snapshot, pool, req, replay, watch, client_upgrade.is_some());
        let (mut response, upstream) = self.while_persisting(exchange, &choice, drain_ahead).await?;
        if let Some(line) = line.as_mut() {
            line.upstream = Some(upstream);
        }

        if response.status() == StatusCode::SWITCHING_PROTOCOLS {
            if let Some(client) = client_upgrade {
                let upstream = hyper::upgrade::on(&mut response);
                // The upstream connection stays under its cap while the tunnel is open.
                let open = response.extensions_mut().remove::<OpenConnection>();
                let closing = self.closing.clone();
                self.tunnels.spawn(async move {
                    let _open = open;
                    tokio::select! {
                        _ = tunnel(client, upstream) => {}
                        _ = closing.cancelled() => debug!("tunnel closed at the end of the grace period"),
                    }
                });
            }
        }
        if snapshot.pool_header {
            response.headers_mut().insert(X_ROLLOUT_POOL.clone(), pool_value(pool));
        }
        Ok(response.map(Either::Left))
    }

    /// Sends the request to an upstream of `pool`, moving on to another one of the same pool
    /// (never the other pool) up to `retries` times when it could not be delivered
    /// ([`may_retry`]), and checks the response head ([`headers::prepare_response`]). Feeds
    /// passive ejection and the upstream metrics; a failure of the client's own body (`watch`)
    /// is the client's, and counts against no upstream.
    async fn exchange(
        &self,
        snapshot: &Snapshot,
        pool: PoolName,
        mut req: Request<UpstreamBody>,
        replay: Replay,
        watch: Option<ClientBodyWatch>,
        upgrade: bool,
    ) -> Result<(Response<UpstreamResponseBody>, UpstreamName), ProxyError> {
        let balancer = snapshot.pool(pool);
        let mut failed = None;
        let mut attempt = 0;
        loop {
            let upstream = pick(balancer, failed).ok_or(ProxyError::NoUpstream { pool })?;
            let sent = self.client.send(upstream, req, snapshot.response_timeout).await;
            let (error, unsent) = match sent {
                Ok(mut response) => {
                    let status = response.status().as_u16();
                    let checked = if status == 101 && !upgrade {
                        Err(headers::InvalidResponse::Status(status))
                    } else {
                        headers::prepare_response(status, response.headers_mut())
                    };
                    match checked {
                        Ok(()) => {
                            self.note_response(snapshot, pool, upstream, status);
                            return Ok((response, upstream.name().clone()));
                        }
                        Err(invalid) => {
                            let error = UpstreamError::Invalid {
                                upstream: upstream.name().clone(),
                                source: invalid.into(),
                            };
                            self.note_error(snapshot, pool, upstream, &error);
                            return Err(error.into());
                        }
                    }
                }
                Err(SendError { error, request }) => (error, request),
            };
            // The client's body failed, or the response timed out while the upstream waited for
            // more of it: the client's doing, counted against no upstream.
            if watch.as_ref().is_some_and(ClientBodyWatch::failed) {
                return Err(ProxyError::ClientBody(error.into()));
            }
            if matches!(error, UpstreamError::Timeout { .. })
                && watch.as_ref().is_some_and(ClientBodyWatch::is_waiting_on_client)
            {
                return Err(ProxyError::ClientTimeout);
            }
            self.note_error(snapshot, pool, upstream, &error);
            let sent = unsent.is_none();
            let again = unsent.or_else(|| {
                replay.as_ref().map(|(method, uri, headers)| {
                    let mut rebuilt = Request::new(UpstreamBody::Empty);
                    *rebuilt.method_mut() = method.clone();
                    *rebuilt.uri_mut() = uri.clone();
                    *rebuilt.headers_mut() = headers.clone();
                    rebuilt
                })
            });
            match again {
                Some(again) if may_retry(snapshot, attempt, &error, sent, replay.is_some()) => {
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
