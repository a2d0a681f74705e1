//! Upstream servers and the client that talks to them.
//!
//! One [`UpstreamClient`] is shared by every request: pooled keep-alive HTTP/1.1 connections with
//! a connect timeout and a response-head timeout. Errors are classified here
//! ([`UpstreamError`]) and turned into responses by [`crate::proxy`]. Which upstream to use is
//! [`crate::balancer`]'s choice; header rewriting is [`crate::headers`]'.

use std::error::Error as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::uri::{Authority, Parts, PathAndQuery, Scheme};
use http::{Request, Response, Uri, Version};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::config::{UpstreamConfig, UpstreamName, UpstreamSettings};
use crate::metrics::{UpstreamErrorKind, UpstreamStats};

/// One application server inside a pool.
#[derive(Debug)]
pub struct Upstream {
    name: UpstreamName,
    scheme: Scheme,
    authority: Authority,
    weight: u32,
    /// Cleared by health checking; an unhealthy upstream gets no new requests. Shared with the
    /// same upstream in later snapshots, so a reload or an admin change keeps what was learnt.
    healthy: Arc<AtomicBool>,
    pub stats: UpstreamStats,
}

impl Upstream {
    /// `healthy` is the shared health flag; pass the previous snapshot's flag for the same
    /// upstream to keep its state.
    pub fn new(config: &UpstreamConfig, stats: UpstreamStats, healthy: Arc<AtomicBool>) -> Self {
        Upstream {
            stats,
            healthy,
            name: config.name.clone(),
            scheme: config.url.scheme.clone(),
            authority: config.url.authority.clone(),
            weight: config.weight,
        }
    }

    pub fn name(&self) -> &UpstreamName {
        &self.name
    }

    pub fn weight(&self) -> u32 {
        self.weight
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    pub fn set_healthy(&self, healthy: bool) {
        self.healthy.store(healthy, Ordering::Relaxed);
    }

    /// A health flag for an upstream seen for the first time: healthy until checks say otherwise.
    pub fn new_health() -> Arc<AtomicBool> {
        Arc::new(AtomicBool::new(true))
    }

    /// The shared health flag, to carry into the next snapshot.
    pub fn health(&self) -> &Arc<AtomicBool> {
        &self.healthy
    }

    /// The URI of `path_and_query` on this upstream.
    fn uri_for(&self, path_and_query: PathAndQuery) -> Uri {
        let mut parts = Parts::default();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(self.authority.clone());
        parts.path_and_query = Some(path_and_query);
        Uri::from_parts(parts).expect("scheme, authority and path always form a URI")
    }
}

/// Why an upstream produced no response head.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("could not connect to upstream {upstream}")]
    Connect {
        upstream: UpstreamName,
        #[source]
        source: hyper_util::client::legacy::Error,
    },
    #[error("upstream {upstream} did not accept a connection in time")]
    ConnectTimeout {
        upstream: UpstreamName,
        #[source]
        source: hyper_util::client::legacy::Error,
    },
    #[error("upstream {upstream} sent no response head within {after:?}")]
    Timeout { upstream: UpstreamName, after: Duration },
    #[error("upstream {upstream} closed the connection before a response head")]
    Closed {
        upstream: UpstreamName,
        #[source]
        source: hyper_util::client::legacy::Error,
    },
}

/// The shared client for all upstreams.
#[derive(Clone)]
pub struct UpstreamClient {
    client: Client<HttpConnector, Incoming>,
}

impl UpstreamClient {
    pub fn new(settings: &UpstreamSettings) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(settings.connect_timeout));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(settings.idle_timeout)
            .pool_max_idle_per_host(settings.max_idle_per_upstream)
            .build(connector);
        UpstreamClient { client }
    }

    /// Sends `req` to `upstream`, waiting at most `response_timeout` for the response head.
    /// The request keeps its path and query; its headers must already be rewritten.
    pub async fn send(
        &self,
        upstream: &Upstream,
        mut req: Request<Incoming>,
        response_timeout: Duration,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let path_and_query =
            req.uri().path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/"));
        *req.uri_mut() = upstream.uri_for(path_and_query);
        // Upstream connections are HTTP/1.1 whatever the client spoke.
        *req.version_mut() = Version::HTTP_11;
        match tokio::time::timeout(response_timeout, self.client.request(req)).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(source)) => Err(classify(upstream, source)),
            Err(_) => {
                Err(UpstreamError::Timeout { upstream: upstream.name.clone(), after: response_timeout })
            }
        }
    }
}

impl UpstreamError {
    /// The `kind` label of `rollout_upstream_errors_total`.
    pub fn kind(&self) -> UpstreamErrorKind {
        match self {
            UpstreamError::Connect { .. } => UpstreamErrorKind::Connect,
            UpstreamError::ConnectTimeout { .. } | UpstreamError::Timeout { .. } => {
                UpstreamErrorKind::Timeout
            }
            UpstreamError::Closed { .. } => UpstreamErrorKind::Io,
        }
    }
}

fn classify(upstream: &Upstream, source: hyper_util::client::legacy::Error) -> UpstreamError {
    let upstream = upstream.name.clone();
    if !source.is_connect() {
        return UpstreamError::Closed { upstream, source };
    }
    let mut cause = source.source();
    while let Some(err) = cause {
        if err.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut) {
            return UpstreamError::ConnectTimeout { upstream, source };
        }
        cause = err.source();
    }
    UpstreamError::Connect { upstream, source }
}
