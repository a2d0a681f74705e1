//! The per-request service: route, pick an upstream, forward, stream the answer back.
//!
//! [`Proxy::handle`] never fails: every error of the request path becomes its response in
//! [`error_response`], the one place that maps failures to status codes. Listening and connection
//! handling are [`crate::listener`]'s; the routing rules live in [`crate::router`] and
//! [`crate::balancer`].

use std::net::SocketAddr;
use std::time::Instant;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use tracing::{debug, warn};

use crate::config::PoolName;
use crate::headers;
use crate::router::Route;
use crate::snapshot::{SharedSnapshot, Snapshot};
use crate::upstream::{UpstreamClient, UpstreamError};
use crate::ErrorChain;

/// Response body: the upstream's streamed body, or a short body the proxy wrote itself.
pub type Body = Either<Incoming, Full<Bytes>>;

pub static X_ROLLOUT_POOL: HeaderName = HeaderName::from_static("x-rollout-pool");
pub static X_ROLLOUT_ERROR: HeaderName = HeaderName::from_static("x-rollout-error");

/// Why the proxy answered a request itself.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    #[error("request head of {size} bytes is over the limit of {limit}")]
    HeadersTooLarge { size: usize, limit: usize },
    #[error("pool {pool} has no usable upstream")]
    NoUpstream { pool: PoolName },
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
}

pub struct Proxy {
    snapshot: SharedSnapshot,
    client: UpstreamClient,
    /// `X-Forwarded-Proto` of this listener.
    proto: &'static str,
}

impl Proxy {
    pub fn new(snapshot: SharedSnapshot, client: UpstreamClient) -> Self {
        Proxy { snapshot, client, proto: "http" }
    }

    /// Answers one client request. Infallible: failures come back as proxy-made responses.
    pub async fn handle(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
        let started = Instant::now();
        let logged =
            tracing::enabled!(tracing::Level::DEBUG).then(|| (req.method().clone(), req.uri().clone()));
        let snapshot = self.snapshot.load_full();
        let mut pool = None;
        let response = match self.forward(&snapshot, req, peer, &mut pool).await {
            Ok(response) => response,
            Err(err) => {
                warn!(peer = %peer, pool = pool.map(PoolName::as_str), error = %ErrorChain(&err), "request failed");
                error_response(&err, pool.filter(|_| snapshot.pool_header))
            }
        };
        if let Some((method, uri)) = logged {
            debug!(
                peer = %peer,
                method = %method,
                path = uri.path(),
                pool = pool.map(PoolName::as_str),
                status = response.status().as_u16(),
                elapsed_us = started.elapsed().as_micros() as u64,
                "request"
            );
        }
        response
    }

    async fn forward(
        &self,
        snapshot: &Snapshot,
        req: Request<Incoming>,
        peer: SocketAddr,
        chosen: &mut Option<PoolName>,
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

        let pool = match snapshot.router.route(req.uri().path()) {
            Route::V2Prefix => PoolName::V2,
            // Legacy requests without a pin are split per request.
            Route::Legacy => snapshot.router.split(),
        };
        *chosen = Some(pool);
        let upstream = snapshot.pool(pool).pick().ok_or(ProxyError::NoUpstream { pool })?;

        let (mut parts, body) = req.into_parts();
        headers::prepare_request(&mut parts.headers, &parts.uri, peer.ip(), self.proto);
        let mut response =
            self.client.send(upstream, Request::from_parts(parts, body), snapshot.response_timeout).await?;

        headers::remove_hop_by_hop(response.headers_mut());
        if snapshot.pool_header {
            response.headers_mut().insert(X_ROLLOUT_POOL.clone(), pool_value(pool));
        }
        Ok(response.map(Either::Left))
    }
}

fn pool_value(pool: PoolName) -> HeaderValue {
    HeaderValue::from_static(pool.as_str())
}

/// The response for a request the proxy could not forward: status, `x-rollout-error` naming the
/// cause, and a one-line plain-text body. Details stay in the log, not in the client's answer.
pub fn error_response(err: &ProxyError, pool: Option<PoolName>) -> Response<Body> {
    let (status, cause, text) = match err {
        ProxyError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request", "bad request"),
        ProxyError::HeadersTooLarge { .. } => {
            (StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, "headers_too_large", "request headers too large")
        }
        ProxyError::NoUpstream { .. } => {
            (StatusCode::SERVICE_UNAVAILABLE, "no_upstream", "no upstream available")
        }
        ProxyError::Upstream(UpstreamError::Connect { .. }) => {
            (StatusCode::BAD_GATEWAY, "upstream_connect", "upstream connection failed")
        }
        ProxyError::Upstream(UpstreamError::Closed { .. }) => {
            (StatusCode::BAD_GATEWAY, "upstream_closed", "upstream closed the connection")
        }
        ProxyError::Upstream(UpstreamError::ConnectTimeout { .. } | UpstreamError::Timeout { .. }) => {
            (StatusCode::GATEWAY_TIMEOUT, "upstream_timeout", "upstream timed out")
        }
    };
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
