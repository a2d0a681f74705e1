//! The admin listener: liveness, readiness, metrics and the drain signal.
//!
//! It runs on its own address (`admin.listen`, loopback by default) so the data plane never
//! exposes it. It reports on the proxy; it does not route traffic (that is [`crate::proxy`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Json;
use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::proxy::Proxy;

/// Whether the data plane is serving: false while starting and once a stop has begun.
#[derive(Debug, Default)]
pub struct Readiness(AtomicBool);

impl Readiness {
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::SeqCst);
    }

    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// What the handlers share.
#[derive(Clone)]
pub struct AdminState {
    pub proxy: Arc<Proxy>,
    pub readiness: Arc<Readiness>,
}

pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/drain", get(drain))
        .with_state(state)
}

/// Serves the admin API on `listener` until `stop` fires.
pub async fn serve(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    readiness: Arc<Readiness>,
    stop: CancellationToken,
) {
    let app = router(AdminState { proxy, readiness });
    if let Err(err) = axum::serve(listener, app).with_graceful_shutdown(stop.cancelled_owned()).await {
        warn!(error = %err, "admin listener stopped with an error");
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(state): State<AdminState>) -> (StatusCode, &'static str) {
    if state.readiness.is_ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

async fn metrics(State(state): State<AdminState>) -> impl IntoResponse {
    let text = state.proxy.metrics().render(&state.proxy.scrape_state());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text)
}

/// 200 when drained, 503 when not, so a deploy script can poll it with `curl --fail`.
async fn drain(State(state): State<AdminState>) -> impl IntoResponse {
    let status = state.proxy.drain_status();
    let code = if status.drained { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (code, Json(status))
}
