//! The admin listener: health, readiness, metrics, the drain signal, and the operator's API.
//!
//! It runs on its own address (`admin.listen`, loopback by default) so the data plane never
//! exposes it. Reading endpoints are open; changing ones need `Authorization: Bearer <token>`
//! (compared in constant time) and accept `If-Match: "<revision>"`. Bad input answers 400 with a
//! JSON `{"error": ...}` naming the field. What a change does is [`crate::control`]'s business;
//! this module only speaks HTTP.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, FromRequestParts, Path as UrlPath, Query, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::json;
use std::time::Duration;
use subtle::ConstantTimeEq;

use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::debug;

use crate::config::ramp::RawPlan;
use crate::config::{Percent, PoolName};
use crate::control::{Actor, Applied, Control, ControlError};
use crate::drain::rfc3339;
use crate::ramp::runner::{Ramp, RampError};
use crate::shared::Shared;

/// Environment variable that may hold the admin token instead of `admin.token_file`.
pub(crate) const TOKEN_ENV: &str = "ROLLOUT_ADMIN_TOKEN";

/// Whether the data plane is serving: false while starting and once a stop has begun.
#[derive(Debug, Default)]
pub(crate) struct Readiness(AtomicBool);

impl Readiness {
    pub(crate) fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::SeqCst);
    }

    pub(crate) fn is_ready(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// The bearer token that guards changing endpoints.
pub(crate) struct Token(Vec<u8>);

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("cannot read admin.token_file {}", file.display())]
    Read {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("admin.token_file {} is empty", file.display())]
    Empty { file: PathBuf },
}

/// The systemd credential holding the admin token (`LoadCredential=admin-token:FILE`): read
/// from `$CREDENTIALS_DIRECTORY`, so a unit with `DynamicUser=yes` needs no readable file.
const CREDENTIAL: &str = "admin-token";

impl Token {
    /// The token from `file` if set, else from the systemd credential [`CREDENTIAL`], else from
    /// [`TOKEN_ENV`]; surrounding whitespace is ignored.
    pub(crate) fn load(file: Option<&Path>) -> Result<Option<Token>, TokenError> {
        let credential = std::env::var_os("CREDENTIALS_DIRECTORY")
            .map(|dir| Path::new(&dir).join(CREDENTIAL))
            .filter(|file| file.exists());
        let Some(file) = file.map(Path::to_owned).or(credential) else {
            let env = std::env::var(TOKEN_ENV).unwrap_or_default();
            let env = env.trim();
            return Ok((!env.is_empty()).then(|| Token(env.as_bytes().to_vec())));
        };
        let file = file.as_path();
        let text = std::fs::read_to_string(file)
            .map_err(|source| TokenError::Read { file: file.to_owned(), source })?;
        let text = text.trim();
        if text.is_empty() {
            return Err(TokenError::Empty { file: file.to_owned() });
        }
        Ok(Some(Token(text.as_bytes().to_vec())))
    }

    fn matches(&self, presented: &[u8]) -> bool {
        // Lengths may differ; only equal-length contents are compared, in constant time.
        self.0.ct_eq(presented).into()
    }
}

/// What the handlers share.
#[derive(Clone)]
pub(crate) struct AdminState {
    pub shared: Arc<Shared>,
    pub control: Arc<Control>,
    pub ramp: Arc<Ramp>,
    pub readiness: Arc<Readiness>,
    pub token: Option<Arc<Token>>,
}

pub(crate) fn router(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/drain", get(drain))
        .route("/status", get(status))
        .route("/routes/legacy", put(put_legacy))
        .route("/pools/{pool}/upstreams/{name}", put(put_weight))
        .route("/sessions", get(list_sessions))
        .route("/sessions/{key}", get(get_session).delete(delete_session))
        .route("/reload", post(reload))
        .route("/overrides", delete(delete_overrides))
        .route("/log-level", get(get_log_level).put(put_log_level))
        .route("/ramp", get(get_ramp).put(put_ramp))
        .route("/ramp/{command}", post(ramp_command))
        .route("/", get(crate::console::index))
        .route("/console.js", get(crate::console::script))
        .route("/console.css", get(crate::console::style))
        .route("/history", get(crate::console::history))
        .route("/audit", get(crate::console::audit))
        .fallback(|| async { AdminError::NotFound("no such admin endpoint".to_owned()) })
        .with_state(state)
}

/// Most connections the admin listener holds open at once; more are refused with 503. The
/// admin API has a handful of operators and one Prometheus, and must not take the data plane's
/// file descriptors.
const MAX_CONNECTIONS: usize = 64;

/// Time an admin client has to send a request head; also how long an idle keep-alive admin
/// connection stays open.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves the admin API on `listener` until `stop` fires, with its own connection cap and
/// header timeout, then lets open requests finish.
pub(crate) async fn serve(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    state: AdminState,
    stop: CancellationToken,
) {
    let app = router(state);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let connections = TaskTracker::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT).max_buf_size(64 * 1024);
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // A full descriptor table must not stop the admin API for good.
                    crate::listener::back_off(err).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tokio::spawn(crate::listener::refuse(stream, TOO_MANY_ADMIN_CONNECTIONS));
            continue;
        };
        let app = app.clone();
        let service =
            hyper::service::service_fn(move |mut req: axum::http::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(ConnectInfo(peer));
                tower::ServiceExt::oneshot(app.clone(), req)
            });
        let (http, stop, tls) = (http.clone(), stop.clone(), tls.clone());
        connections.spawn(async move {
            let _slot = slot;
            match tls {
                None => serve_connection(&http, TokioIo::new(stream), service, peer, &stop).await,
                Some(tls) => {
                    // The handshake gets as long as a request head would.
                    match tokio::time::timeout(HEADER_READ_TIMEOUT, tls.accept(stream)).await {
                        Ok(Ok(stream)) => {
                            serve_connection(&http, TokioIo::new(stream), service, peer, &stop).await
                        }
                        Ok(Err(err)) => debug!(peer = %peer, error = %err, "admin TLS handshake failed"),
                        Err(_) => debug!(peer = %peer, "admin TLS handshake timed out"),
                    }
                }
            }
        });
    }
    drop(listener);
    connections.close();
    // A request still being answered gets a moment; one stuck on a client does not hold the
    // stop up.
    let _ = tokio::time::timeout(HEADER_READ_TIMEOUT, connections.wait()).await;
}

/// Serves one admin connection (plain or TLS) until it ends, or gracefully until `stop`.
async fn serve_connection<I, S>(
    http: &hyper::server::conn::http1::Builder,
    io: I,
    service: S,
    peer: SocketAddr,
    stop: &CancellationToken,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<hyper::body::Incoming> + Send,
    S::Future: Send,
    S::ResBody: 'static,
    <S::ResBody as hyper::body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let connection = http.serve_connection(io, service);
    tokio::pin!(connection);
    tokio::select! {
        ended = connection.as_mut() => {
            if let Err(err) = ended {
                debug!(peer = %peer, error = %err, "admin connection ended with an error");
            }
            return;
        }
        _ = stop.cancelled() => connection.as_mut().graceful_shutdown(),
    }
    let _ = connection.await;
}

/// The answer to an admin connection over [`MAX_CONNECTIONS`].
const TOO_MANY_ADMIN_CONNECTIONS: &[u8] =
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
content-length: 44\r\nconnection: close\r\n\r\n{\"error\": \"too many admin connections open\"}";

/// An admin request that could not be carried out; rendered as `{"error": ...}`.
#[derive(Debug, thiserror::Error)]
enum AdminError {
    #[error("missing or wrong bearer token")]
    Unauthorized,
    #[error(
        "no admin token is configured (set admin.token_file or ROLLOUT_ADMIN_TOKEN), so changes are disabled"
    )]
    NoToken,
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Ramp(#[from] RampError),
}

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        let status = match &self {
            AdminError::Unauthorized => StatusCode::UNAUTHORIZED,
            AdminError::NoToken => StatusCode::FORBIDDEN,
            AdminError::BadRequest(_) => StatusCode::BAD_REQUEST,
            AdminError::NotFound(_) => StatusCode::NOT_FOUND,
            AdminError::Control(err) | AdminError::Ramp(RampError::Control(err)) => match err {
                ControlError::Stale { .. } => StatusCode::PRECONDITION_FAILED,
                ControlError::UnknownPool(_)
                | ControlError::UnknownUpstream { .. }
                | ControlError::UnknownSession(_) => StatusCode::NOT_FOUND,
                ControlError::Invalid { .. }
                | ControlError::NoConfigFile
                | ControlError::Reload(_)
                | ControlError::Certificate(_) => StatusCode::BAD_REQUEST,
                ControlError::Store => StatusCode::INTERNAL_SERVER_ERROR,
                ControlError::FleetUnavailable => StatusCode::SERVICE_UNAVAILABLE,
                ControlError::Fenced => StatusCode::CONFLICT,
            },
            AdminError::Conflict(_) => StatusCode::CONFLICT,
            AdminError::Ramp(err) => match err {
                RampError::Plan(_) => StatusCode::BAD_REQUEST,
                RampError::Refused(_) | RampError::Running(_) | RampError::Moved => StatusCode::CONFLICT,
                RampError::NoRamp => StatusCode::NOT_FOUND,
                // Mapped with the control plane's own errors above.
                RampError::Control(_) => StatusCode::INTERNAL_SERVER_ERROR,
            },
        };
        let mut response =
            (status, Json(json!({ "error": crate::ErrorChain(&self).to_string() }))).into_response();
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

impl AdminState {
    /// Checks the bearer token; returns who is asking, for the audit line.
    fn authorize(&self, headers: &HeaderMap, peer: SocketAddr) -> Result<Actor, AdminError> {
        let token = self.token.as_ref().ok_or(AdminError::NoToken)?;
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
            .ok_or(AdminError::Unauthorized)?;
        if !token.matches(presented) {
            return Err(AdminError::Unauthorized);
        }
        Ok(Actor(peer.to_string()))
    }
}

/// What every changing endpoint checks first: the bearer token (who is asking, for the audit
/// line) and the revision `If-Match` expects.
struct Mutation {
    actor: Actor,
    expected: Option<u64>,
}

impl FromRequestParts<AdminState> for Mutation {
    type Rejection = AdminError;

    async fn from_request_parts(parts: &mut Parts, state: &AdminState) -> Result<Self, AdminError> {
        let peer = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|ConnectInfo(peer)| *peer)
            .expect("the admin listener is served with connect info");
        let actor = state.authorize(&parts.headers, peer)?;
        let expected = if_match(&parts.headers)?;
        Ok(Mutation { actor, expected })
    }
}

/// The revision an `If-Match` header asks for: `"7"` (or `W/"7"`); `*` or no header means any.
fn if_match(headers: &HeaderMap) -> Result<Option<u64>, AdminError> {
    let Some(value) = headers.get(header::IF_MATCH) else { return Ok(None) };
    let text = value.to_str().unwrap_or_default().trim();
    if text == "*" {
        return Ok(None);
    }
    let tag = text.strip_prefix("W/").unwrap_or(text).trim_matches('"');
    tag.parse().map(Some).map_err(|_| {
        AdminError::BadRequest(format!(
            "If-Match: {text:?} is not a revision like \"7\" (see the ETag of GET /status)"
        ))
    })
}

/// Parses a JSON body; errors name the field (`weight: invalid type: ...`).
fn parse_body<T: DeserializeOwned>(body: &Bytes) -> Result<T, AdminError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner();
        let message = if inner.is_syntax() || inner.is_eof() {
            format!("malformed JSON body: {inner}")
        } else if path == "." {
            inner.to_string()
        } else {
            format!("{path}: {inner}")
        };
        AdminError::BadRequest(message)
    })?;
    // One JSON document and nothing after it: `{"v1_percent": 7}xyz` is not a request for 7.
    de.end().map_err(|err| AdminError::BadRequest(format!("malformed JSON body: {err}")))?;
    Ok(value)
}

fn etag(revision: u64) -> [(header::HeaderName, HeaderValue); 1] {
    let value = HeaderValue::from_str(&format!("\"{revision}\"")).expect("digits are a valid header value");
    [(header::ETAG, value)]
}

fn applied(applied: Applied) -> Response {
    (etag(applied.revision), Json(applied)).into_response()
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
    let text = state.shared.metrics().render(&state.shared.scrape_state());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text)
}

/// 200 when drained, 503 when not, so a deploy script can poll it with `curl --fail`.
/// Other parameters (a poller's cache buster) are ignored.
#[derive(Deserialize)]
struct DrainQuery {
    /// Answer 200 whether drained or not, for pollers that take any other status for an error
    /// rather than a "no" (Argo Rollouts' `web` metric); the body says which.
    #[serde(default)]
    always_ok: bool,
}

async fn drain(
    State(state): State<AdminState>,
    query: Result<Query<DrainQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, AdminError> {
    let Query(query) = query.map_err(|e| AdminError::BadRequest(format!("query: {}", e.body_text())))?;
    let status = state.shared.drain_status();
    let code =
        if status.drained || query.always_ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    Ok((code, Json(status)).into_response())
}

async fn status(State(state): State<AdminState>) -> impl IntoResponse {
    let (revision, mut status) = state.control.status().await;
    status["ramp"] = state.ramp.summary().await;
    (etag(revision), Json(status))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LegacyBody {
    v1_percent: f64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LegacyQuery {
    #[serde(default)]
    force: bool,
}

async fn put_legacy(
    State(state): State<AdminState>,
    Mutation { actor, expected }: Mutation,
    query: Result<Query<LegacyQuery>, axum::extract::rejection::QueryRejection>,
    body: Bytes,
) -> Result<Response, AdminError> {
    let Query(query) = query.map_err(|e| AdminError::BadRequest(format!("query: {}", e.body_text())))?;
    let body: LegacyBody = parse_body(&body)?;
    let percent = Percent::try_from_f64(body.v1_percent)
        .map_err(|message| ControlError::Invalid { field: "v1_percent", message })?;
    // A hand-set percentage during a ramp would be undone by its next step: refused unless
    // forced, and then the ramp pauses.
    let ramping = state.ramp.is_active().await;
    if ramping && !query.force {
        return Err(AdminError::Conflict(
            "a ramp is running and sets the percentage; add ?force=true to set it by hand, which pauses the ramp"
                .to_owned(),
        ));
    }
    // Paused first, so the ramp does not put its own share back in between; and only if the
    // percentage will be taken.
    if ramping {
        state.control.expect_revision(expected).await?;
        state.ramp.overridden(&actor).await?;
    }
    let applied_change = state.control.set_legacy_percent(percent, expected, &actor).await?;
    Ok(applied(applied_change))
}

async fn get_ramp(State(state): State<AdminState>) -> Json<serde_json::Value> {
    Json(state.ramp.status().await)
}

/// Starts a ramp from the plan in the body (the config file's `ramp:` document, in JSON).
async fn put_ramp(
    State(state): State<AdminState>,
    Mutation { actor, expected }: Mutation,
    body: Bytes,
) -> Result<Json<serde_json::Value>, AdminError> {
    let plan: RawPlan = parse_body(&body)?;
    Ok(Json(state.ramp.start(plan, expected, &actor).await?))
}

async fn ramp_command(
    State(state): State<AdminState>,
    UrlPath(command): UrlPath<String>,
    Mutation { actor, .. }: Mutation,
) -> Result<Json<serde_json::Value>, AdminError> {
    if !["pause", "resume", "abort", "promote", "retry"].contains(&command.as_str()) {
        return Err(AdminError::NotFound(format!(
            "no ramp command {command:?} (pause, resume, abort, promote, retry)"
        )));
    }
    Ok(Json(state.ramp.command(&command, &actor).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WeightBody {
    weight: u32,
}

async fn put_weight(
    State(state): State<AdminState>,
    UrlPath((pool, name)): UrlPath<(String, String)>,
    Mutation { actor, expected }: Mutation,
    body: Bytes,
) -> Result<Response, AdminError> {
    let body: WeightBody = parse_body(&body)?;
    Ok(applied(state.control.set_weight(&pool, &name, body.weight, expected, &actor).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SessionsQuery {
    pool: Option<String>,
    limit: Option<String>,
    /// The page starts after this key (the previous page's `next`).
    after: Option<String>,
}

/// Most pins one `GET /sessions` lists.
const MAX_LIST: usize = 10_000;

async fn list_sessions(
    State(state): State<AdminState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    query: Result<Query<SessionsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, AdminError> {
    state.authorize(&headers, peer)?;
    let Query(query) = query.map_err(|e| AdminError::BadRequest(format!("query: {}", e.body_text())))?;
    let pool = match query.pool.as_deref() {
        None | Some("") => None,
        Some(p) => Some(p.parse::<PoolName>().map_err(|m| AdminError::BadRequest(format!("pool: {m}")))?),
    };
    let limit = match query.limit.as_deref() {
        None => 100,
        Some(l) => l.parse::<usize>().ok().filter(|n| (1..=MAX_LIST).contains(n)).ok_or_else(|| {
            AdminError::BadRequest(format!("limit: {l:?} is not a number from 1 to {MAX_LIST}"))
        })?,
    };
    let snapshot = state.shared.snapshot();
    let sessions = state.shared.sessions();
    let after = query.after.as_deref().filter(|after| !after.is_empty());
    let (page, more) = sessions.page(pool, &snapshot.pin_policy, after, limit);
    let next = more.then(|| page.last().map(|p| p.key.clone())).flatten();
    let pins: Vec<serde_json::Value> = page.iter().map(describe_pin).collect();
    let active = json!({ "v1": sessions.live(PoolName::V1), "v2": sessions.live(PoolName::V2) });
    Ok(Json(json!({ "sessions": pins, "next": next, "active": active })).into_response())
}

/// A pin as the admin API shows it: pool, times, and what ends it when.
fn describe_pin(pin: &crate::session::PinInfo) -> serde_json::Value {
    json!({
        "key": pin.key,
        "pool": pin.pool,
        "first_seen": rfc3339(u64::from(pin.first_seen) * 1000),
        "last_seen": rfc3339(u64::from(pin.last_seen) * 1000),
        "expires_at": rfc3339(u64::from(pin.ends_at) * 1000),
        "ended_by": pin.ended_by.as_str(),
    })
}

/// `GET /sessions/{key}`: one session's pin.
async fn get_session(
    State(state): State<AdminState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    UrlPath(key): UrlPath<String>,
) -> Result<Response, AdminError> {
    state.authorize(&headers, peer)?;
    let snapshot = state.shared.snapshot();
    match state.shared.sessions().lookup(&key, &snapshot.pin_policy) {
        Some(pin) => Ok(Json(describe_pin(&pin)).into_response()),
        None => Err(AdminError::NotFound(format!("no live session {key:?}"))),
    }
}

async fn delete_session(
    State(state): State<AdminState>,
    UrlPath(key): UrlPath<String>,
    Mutation { actor, expected }: Mutation,
) -> Result<Response, AdminError> {
    Ok(applied(state.control.delete_session(&key, expected, &actor).await?))
}

async fn reload(
    State(state): State<AdminState>,
    Mutation { actor, expected }: Mutation,
) -> Result<Response, AdminError> {
    Ok(applied(state.control.reload(expected, &actor).await?))
}

async fn get_log_level() -> Json<serde_json::Value> {
    let filter = crate::logging::filter();
    Json(json!({ "filter": filter, "adjustable": filter.is_some() }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LogLevelBody {
    filter: String,
}

/// `PUT /log-level {"filter": "debug"}`: the log filter (`RUST_LOG` syntax) from now on, until
/// the next change or restart. Not a revision of the configuration; audited like one.
async fn put_log_level(
    State(state): State<AdminState>,
    Mutation { actor, .. }: Mutation,
    body: Bytes,
) -> Result<Response, AdminError> {
    let body: LogLevelBody = parse_body(&body)?;
    let old = crate::logging::set_filter(&body.filter).map_err(|err| match err {
        crate::logging::LogError::Invalid(..) => AdminError::BadRequest(format!("filter: {err}")),
        crate::logging::LogError::NotAdjustable => AdminError::Conflict(err.to_string()),
    })?;
    tracing::info!(target: "audit", actor = %actor.0, kind = "log_level", old = %old, new = %body.filter, "admin change");
    state.shared.journal(&actor.0, "log_level", format!("{old} -> {}", body.filter));
    Ok(Json(json!({ "old": old, "new": body.filter })).into_response())
}

async fn delete_overrides(
    State(state): State<AdminState>,
    Mutation { actor, expected }: Mutation,
) -> Result<Response, AdminError> {
    Ok(applied(state.control.reset_overrides(expected, &actor).await?))
}
