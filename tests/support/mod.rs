//! Shared test fixtures: stub upstreams on real sockets, an in-process proxy, an HTTP client.
#![allow(dead_code)]

pub mod browser;
pub mod config;
pub mod raw;
pub mod redis;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
#[allow(unused_imports)] // each test binary uses some
pub use config::{
    edit, ClientSettings, ConfigBuilder, Ejection, Health, Pool, SessionKey, Sessions, UpstreamSettings,
};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
#[allow(unused_imports)]
pub use rollout_proxy::clock::ManualClock;
use rollout_proxy::clock::{Clock, SharedClock, SystemClock};
use rollout_proxy::config::{Config, PoolName};
use rollout_proxy::server::{Server, StartOptions};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;

/// A stub application server. Paths with special meaning:
/// - `/__stall`: never answers;
/// - `/__slow/{ms}`: answers after `ms` milliseconds;
/// - `/__big/{bytes}`: streams `bytes` bytes of [`pattern`] in 64 KiB chunks;
/// - a path ending in `/__status/{code}` (after any prefix): answers `code`, empty;
/// - anything else: a JSON [`Echo`] of what arrived (headers, body length and SHA-256).
///
/// Every answer carries `x-upstream: NAME`.
pub struct Upstream {
    name: String,
}

/// Requests a stub has received, by path (counted as soon as the head arrives).
type Seen = Arc<Mutex<BTreeMap<String, usize>>>;

impl Upstream {
    pub fn new(name: &str) -> Self {
        Upstream { name: name.to_owned() }
    }

    pub async fn spawn(self) -> SocketAddr {
        let stub = self.spawn_killable().await;
        let addr = stub.addr;
        std::mem::forget(stub); // serves for the rest of the test process
        addr
    }

    /// Like [`Upstream::spawn`], with a handle that can kill the server (listener and every open
    /// connection, as a crashed process would), bring it back on the same address, and tell
    /// what requests reached it.
    pub async fn spawn_killable(self) -> Stub {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Seen::default();
        let kill = serve_stub(listener, self.name.clone(), seen.clone());
        Stub { addr, name: self.name, kill, seen }
    }
}

/// A running stub upstream; see [`Upstream::spawn_killable`].
pub struct Stub {
    pub addr: SocketAddr,
    name: String,
    kill: tokio_util::sync::CancellationToken,
    seen: Seen,
}

impl Stub {
    /// Closes the listener and every connection at once.
    pub fn kill(&self) {
        self.kill.cancel();
    }

    /// Serves again on the same address after [`Stub::kill`].
    pub async fn restart(&mut self) {
        let listener = TcpListener::bind(self.addr).await.unwrap();
        self.kill = serve_stub(listener, self.name.clone(), self.seen.clone());
    }

    /// How many requests for `path` (without the query) arrived, over every life of the stub.
    pub fn requests(&self, path: &str) -> usize {
        self.seen.lock().unwrap().get(path).copied().unwrap_or(0)
    }
}

impl Drop for Stub {
    fn drop(&mut self) {
        self.kill.cancel();
    }
}

fn serve_stub(listener: TcpListener, name: String, seen: Seen) -> tokio_util::sync::CancellationToken {
    let kill = tokio_util::sync::CancellationToken::new();
    let stop = kill.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = tokio::select! {
                _ = stop.cancelled() => return,
                accepted = listener.accept() => match accepted { Ok(a) => a, Err(_) => continue },
            };
            let (name, stop, seen) = (name.clone(), stop.clone(), seen.clone());
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<Incoming>| {
                    *seen.lock().unwrap().entry(req.uri().path().to_owned()).or_insert(0) += 1;
                    answer(name.clone(), req)
                });
                let connection = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service);
                tokio::select! {
                    _ = connection => {}
                    _ = stop.cancelled() => {}
                }
            });
        }
    });
    kill
}

/// A WebSocket echo server (a real WebSocket implementation, not the proxy's code).
pub async fn spawn_websocket_echo() -> SocketAddr {
    use futures_util::{SinkExt, StreamExt};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else { return };
                while let Some(Ok(message)) = ws.next().await {
                    if (message.is_text() || message.is_binary()) && ws.send(message).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// What a stub upstream saw.
#[derive(Debug, serde::Deserialize, serde::Serialize)]
pub struct Echo {
    pub upstream: String,
    pub method: String,
    pub path: String,
    pub headers: BTreeMap<String, Vec<String>>,
    pub body_len: usize,
    pub body_sha256: String,
}

type StubBody = http_body_util::Either<Full<Bytes>, Pattern>;

async fn answer(name: String, req: Request<Incoming>) -> Result<Response<StubBody>, Infallible> {
    let path = req.uri().path().to_owned();
    let reply = |body: StubBody| Response::builder().header("x-upstream", name.as_str()).body(body).unwrap();
    if path == "/__stall" {
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
    if let Some(ms) = path.strip_prefix("/__slow/") {
        tokio::time::sleep(Duration::from_millis(ms.parse().unwrap())).await;
    }
    if let Some(n) = path.strip_prefix("/__big/") {
        return Ok(reply(http_body_util::Either::Right(Pattern::new(n.parse().unwrap()))));
    }
    if let Some((_, code)) = path.rsplit_once("/__status/") {
        let mut response = reply(http_body_util::Either::Left(Full::new(Bytes::new())));
        *response.status_mut() = StatusCode::from_u16(code.parse().unwrap()).unwrap();
        return Ok(response);
    }
    let method = req.method().to_string();
    let path = req.uri().to_string();
    let mut headers = BTreeMap::<String, Vec<String>>::new();
    for (k, v) in req.headers() {
        headers.entry(k.to_string()).or_default().push(v.to_str().unwrap_or("<binary>").to_owned());
    }
    let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let echo = Echo {
        upstream: name.clone(),
        method,
        path,
        headers,
        body_len: body.len(),
        body_sha256: sha256(&body),
    };
    Ok(reply(http_body_util::Either::Left(Full::new(Bytes::from(serde_json::to_vec(&echo).unwrap())))))
}

pub fn sha256(data: &[u8]) -> String {
    Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

/// Deterministic bytes: byte `i` is `(i * 31 + 7) % 251`.
pub fn pattern_bytes(len: usize) -> Vec<u8> {
    (0..len).map(|i| ((i * 31 + 7) % 251) as u8).collect()
}

/// A streamed body of [`pattern_bytes`], produced chunk by chunk.
pub struct Pattern {
    offset: usize,
    len: usize,
}

impl Pattern {
    fn new(len: usize) -> Self {
        Pattern { offset: 0, len }
    }
}

impl Body for Pattern {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.offset >= self.len {
            return Poll::Ready(None);
        }
        let end = (self.offset + 64 * 1024).min(self.len);
        let chunk: Vec<u8> = (self.offset..end).map(|i| ((i * 31 + 7) % 251) as u8).collect();
        self.offset = end;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(chunk)))))
    }
}

/// An address where nothing listens: connections to it are refused. The port stays bound (but
/// not listening) while the returned socket lives, so no other test can take it meanwhile.
pub fn refused_addr() -> (SocketAddr, tokio::net::TcpSocket) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    (socket.local_addr().unwrap(), socket)
}

/// Writes `config` as `dir/rollout.yaml` with its state in `dir/state`, for a proxy run as a
/// child process; returns the file's path.
pub fn write_config(dir: &Path, config: &ConfigBuilder) -> String {
    let file = dir.join("rollout.yaml");
    std::fs::write(&file, config.clone().state_dir(&dir.join("state")).render()).unwrap();
    file.to_str().unwrap().to_owned()
}

/// A clock stopped `offset` from the system's time when it was made: a run of the proxy "some
/// seconds ago" or "some seconds from now", for a test that cannot wait that long.
#[derive(Debug, Clone, Copy)]
pub struct StoppedClock(u64);

impl StoppedClock {
    pub fn in_the_past(offset: Duration) -> Self {
        StoppedClock(SystemClock.now() - offset.as_millis() as u64)
    }

    pub fn in_the_future(offset: Duration) -> Self {
        StoppedClock(SystemClock.now() + offset.as_millis() as u64)
    }
}

impl Clock for StoppedClock {
    fn now(&self) -> u64 {
        self.0
    }
}

/// Where a [`ProxyBuilder`] reads its config.
#[derive(Clone)]
enum ConfigSource {
    Text(String),
    /// Read at every start, and by the proxy itself on reload.
    File(PathBuf),
}

/// Starts a proxy inside the test process: `ProxyBuilder::new(&config).spawn().await`. Its
/// listeners are those of the config (tests use `127.0.0.1:0`); its state goes to a fresh
/// temporary directory unless [`ProxyBuilder::state_dir`] hands it one.
pub struct ProxyBuilder {
    source: ConfigSource,
    clock: SharedClock,
    commit_delay: Duration,
    state_dir: Option<tempfile::TempDir>,
}

impl ProxyBuilder {
    pub fn new(config: &ConfigBuilder) -> ProxyBuilder {
        ProxyBuilder::with_source(ConfigSource::Text(config.render()))
    }

    /// A proxy that loads `file` (so `POST /reload` re-reads it); its `state_dir` is replaced.
    pub fn from_file(file: &Path) -> ProxyBuilder {
        ProxyBuilder::with_source(ConfigSource::File(file.to_owned()))
    }

    fn with_source(source: ConfigSource) -> ProxyBuilder {
        ProxyBuilder { source, clock: Arc::new(SystemClock), commit_delay: Duration::ZERO, state_dir: None }
    }

    /// Pins and the drain signal read `clock` instead of the system's.
    pub fn clock(mut self, clock: &(impl Clock + Clone + 'static)) -> Self {
        self.clock = Arc::new(clock.clone());
        self
    }

    /// Starts on the state another proxy left ([`ProxyHandle::shutdown`] returns it).
    pub fn state_dir(mut self, dir: tempfile::TempDir) -> Self {
        self.state_dir = Some(dir);
        self
    }

    /// Holds back every state commit this long, as a slow disk would.
    pub fn commit_delay(mut self, delay: Duration) -> Self {
        self.commit_delay = delay;
        self
    }

    /// Starts the proxy; panics with the error if it does not start.
    pub async fn spawn(self) -> ProxyHandle {
        self.try_spawn().await.unwrap_or_else(|e| panic!("{e}"))
    }

    /// Starts the proxy, or returns why it did not start (the whole error chain).
    pub async fn try_spawn(self) -> Result<ProxyHandle, String> {
        let state_dir = match self.state_dir {
            Some(dir) => dir,
            None => tempfile::tempdir().unwrap(),
        };
        let mut handle = ProxyHandle {
            addr: "0.0.0.0:0".parse().unwrap(),
            admin_addr: "0.0.0.0:0".parse().unwrap(),
            server: None,
            state_dir,
            source: self.source,
            clock: self.clock,
            commit_delay: self.commit_delay,
        };
        handle.start().await?;
        Ok(handle)
    }
}

/// A proxy running inside the test process. Tests reach its internals only through the methods
/// here, so a change to how the crate holds its state touches this file alone.
pub struct ProxyHandle {
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    server: Option<Server>,
    /// Removed when the handle is dropped.
    state_dir: tempfile::TempDir,
    source: ConfigSource,
    clock: SharedClock,
    commit_delay: Duration,
}

/// What the pin table did with a key offered by [`ProxyHandle::offer_key`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyOutcome {
    /// The key already had a live pin.
    Pinned,
    /// The key got a new pin.
    NewPin,
    /// The table is full: the key was routed without a pin.
    TableFull,
}

impl ProxyHandle {
    async fn start(&mut self) -> Result<(), String> {
        let chain = |e: &dyn std::error::Error| rollout_proxy::ErrorChain(e).to_string();
        let config = match &self.source {
            ConfigSource::Text(yaml) => Config::from_yaml(yaml, Path::new("test.yaml"))
                .map_err(|e| format!("{}\n{yaml}", chain(&e)))?,
            ConfigSource::File(file) => Config::load(file).map_err(|e| chain(&e))?,
        };
        let config = config.with_state_dir(self.state_dir.path());
        let options = StartOptions {
            clock: self.clock.clone(),
            commit_delay: self.commit_delay,
            ..StartOptions::default()
        };
        let server = Server::start_with(config, options).await.map_err(|e| chain(&e))?;
        (self.addr, self.admin_addr) = (server.addr, server.admin_addr);
        self.server = Some(server);
        Ok(())
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin_addr, path)
    }

    /// The text of `GET /metrics`.
    pub async fn metrics(&self) -> String {
        String::from_utf8(get(&self.admin_url("/metrics")).await.body.to_vec()).unwrap()
    }

    pub fn state_path(&self) -> &Path {
        self.state_dir.path()
    }

    fn shared(&self) -> &Arc<rollout_proxy::shared::Shared> {
        self.server.as_ref().expect("a running proxy").shared()
    }

    /// One run of the ramp's analysis (which otherwise runs every second), judging if the plan's
    /// interval is due by the proxy's clock.
    pub async fn analyse_ramp(&self) {
        self.server.as_ref().expect("a running proxy").analyse_ramp().await;
    }

    /// One pass of the background upkeep's pin expiry (which otherwise runs every second).
    pub fn maintain(&self) {
        let _ = self.shared().maintain();
    }

    /// Live pins on `pool`, as the pin table counts them.
    pub fn live_pins(&self, pool: Pool) -> usize {
        self.shared().sessions().live(pool_name(pool))
    }

    /// Waits until everything sent to the state store so far is committed; false if that
    /// commit failed.
    pub async fn flush_store(&self) -> bool {
        self.shared().sessions().store().flush().await
    }

    /// Whether every pin made so far is committed to the state store.
    pub fn all_pins_settled(&self) -> bool {
        self.shared().sessions().store().is_all_settled()
    }

    /// Hands `key` straight to the pin table, as a keyed legacy request would, without the
    /// HTTP path around it (which waits for a new pin to be durable; this does not).
    pub fn offer_key(&self, key: &str) -> KeyOutcome {
        use rollout_proxy::session::Resolution;
        let shared = self.shared();
        let (sessions, snapshot) = (shared.sessions(), shared.snapshot());
        match sessions
            .resolve(sessions.locate(key), &snapshot.pin_policy, |roll| snapshot.router.split_session(roll))
        {
            Resolution::Pinned { .. } => KeyOutcome::Pinned,
            Resolution::NewPin { .. } => KeyOutcome::NewPin,
            Resolution::Full { .. } => KeyOutcome::TableFull,
        }
    }

    /// Takes the listening sockets over as a successor process would, then drops them without
    /// confirming, as a successor that crashes would. Returns the addresses the sockets had.
    pub async fn take_over_and_vanish(&self) -> (SocketAddr, SocketAddr) {
        let (data, admin, confirm) = rollout_proxy::handover::take(self.state_path())
            .await
            .unwrap()
            .expect("the running proxy offers its sockets");
        let addrs = (data.local_addr().unwrap(), admin.local_addr().unwrap());
        drop((data, admin, confirm));
        addrs
    }

    /// Stops gracefully and starts again on the same state (and config file, re-read). The
    /// listeners are new: `addr` and `admin_addr` change.
    pub async fn restart(&mut self) {
        if let Some(server) = self.server.take() {
            server.stop().await;
        }
        self.start().await.unwrap_or_else(|e| panic!("{e}"));
    }

    /// Stops gracefully; returns the state directory for a restart.
    pub async fn shutdown(mut self) -> tempfile::TempDir {
        if let Some(server) = self.server.take() {
            server.stop().await;
        }
        self.state_dir
    }
}

fn pool_name(pool: Pool) -> PoolName {
    match pool {
        Pool::V1 => PoolName::V1,
        Pool::V2 => PoolName::V2,
    }
}

/// Polls `condition` every 20 ms until it holds; panics saying what did not happen once `limit`
/// has passed (a check still running then counts as failed). For waiting on something the test
/// can observe, instead of sleeping for long enough.
pub async fn eventually<F, Fut>(limit: Duration, what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    eventually_some(limit, what, || {
        let check = condition();
        async move { check.await.then_some(()) }
    })
    .await
}

/// Waits until `count` has grown by `n` from its value now: windows of traffic counted in
/// requests, not waited out.
pub async fn grows_by(count: &std::sync::atomic::AtomicUsize, n: usize, what: &str) {
    use std::sync::atomic::Ordering;
    let target = count.load(Ordering::Relaxed) + n;
    let what = format!("{n} more {what}");
    eventually(Duration::from_secs(20), &what, || async { count.load(Ordering::Relaxed) >= target }).await
}

/// Like [`eventually`], for a check that produces a value once it holds.
pub async fn eventually_some<T, F, Fut>(limit: Duration, what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    poll_until(limit, check).await.unwrap_or_else(|| panic!("not within {limit:?}: {what}"))
}

/// Runs `check` every 20 ms until it produces a value, for at most `limit`.
async fn poll_until<T, F, Fut>(limit: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, check()).await {
            Ok(Some(value)) => return Some(value),
            Ok(None) if tokio::time::Instant::now() < deadline => {}
            _ => return None,
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A response read to the end.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn echo(&self) -> Echo {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not an echo ({e}): {} {:?}", self.status, self.body))
    }
}

pub fn http1_client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

pub fn h2c_client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).http2_only(true).build_http()
}

pub async fn send(client: &Client<HttpConnector, Full<Bytes>>, req: Request<Full<Bytes>>) -> Reply {
    let response = client.request(req).await.expect("request reaches the proxy");
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("body arrives whole").to_bytes();
    Reply { status: parts.status, headers: parts.headers, body }
}

pub async fn get(url: &str) -> Reply {
    let req = Request::builder().method(Method::GET).uri(url).body(Full::default()).unwrap();
    send(&http1_client(), req).await
}

/// Like [`get`], but `None` when no whole answer comes back (refused, reset, closed early).
pub async fn try_get(url: &str) -> Option<Reply> {
    let req = Request::builder().method(Method::GET).uri(url).body(Full::default()).unwrap();
    let response = http1_client().request(req).await.ok()?;
    let (parts, body) = response.into_parts();
    let body = body.collect().await.ok()?.to_bytes();
    Some(Reply { status: parts.status, headers: parts.headers, body })
}

/// Sends `n` GETs to `url`, up to 16 at a time, and counts the answers by `x-upstream`.
pub async fn count_upstreams(url: &str, n: usize) -> BTreeMap<String, usize> {
    let client = http1_client();
    let mut counts = BTreeMap::new();
    let mut sent = 0;
    while sent < n {
        let batch = (n - sent).min(16);
        let mut tasks = Vec::new();
        for _ in 0..batch {
            let client = client.clone();
            let req = Request::builder().uri(url).body(Full::default()).unwrap();
            tasks.push(tokio::spawn(async move { send(&client, req).await }));
        }
        for task in tasks {
            let reply = task.await.unwrap();
            assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
            *counts.entry(reply.header("x-upstream").unwrap().to_owned()).or_insert(0) += 1;
        }
        sent += batch;
    }
    counts
}

/// The `rollout-proxy` binary running as a child process, with its stderr collected.
pub struct ProxyProcess {
    child: std::process::Child,
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub stdout: std::sync::Arc<std::sync::Mutex<String>>,
    pub stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

pub fn binary() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_rollout-proxy"))
}

/// Collects a child's output stream into a string, line by line, on a thread.
fn collect(stream: impl std::io::Read + Send + 'static) -> std::sync::Arc<std::sync::Mutex<String>> {
    use std::io::BufRead;
    let out = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let sink = out.clone();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stream).lines().map_while(Result::ok) {
            let mut s = sink.lock().unwrap();
            s.push_str(&line);
            s.push('\n');
        }
    });
    out
}

fn field(log: &str, key: &str) -> Option<SocketAddr> {
    let line = log.lines().find(|l| l.contains(" serving "))?;
    let start = line.find(key)? + key.len();
    line[start..].split_whitespace().next()?.parse().ok()
}

impl ProxyProcess {
    /// Starts the binary with `args` and waits until it logs that it is serving.
    pub async fn start(args: &[&str]) -> ProxyProcess {
        let mut command = binary();
        command.args(args);
        Self::start_command(command).await
    }

    /// Starts the binary through `sh -c SCRIPT` (for `ulimit` and the like).
    pub async fn start_shell(script: &str) -> ProxyProcess {
        let mut command = std::process::Command::new("sh");
        command.args(["-c", script]);
        Self::start_command(command).await
    }

    async fn start_command(mut command: std::process::Command) -> ProxyProcess {
        let mut child = command
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("the binary starts");
        let stdout = collect(child.stdout.take().unwrap());
        let stderr = collect(child.stderr.take().unwrap());
        let serving = poll_until(Duration::from_secs(20), || {
            let log = stderr.lock().unwrap().clone();
            if let Ok(Some(status)) = child.try_wait() {
                panic!("rollout-proxy exited early with {status}:\n{log}");
            }
            let addrs = (field(&log, "listen="), field(&log, "admin="));
            async move { addrs.0.zip(addrs.1) }
        })
        .await;
        let Some((addr, admin_addr)) = serving else {
            let _ = child.kill();
            panic!("rollout-proxy did not start serving:\n{}", stderr.lock().unwrap());
        };
        ProxyProcess { child, addr, admin_addr, stdout, stderr }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin_addr, path)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, signal: i32) {
        let pid = i32::try_from(self.child.id()).unwrap();
        // SAFETY: kill(2) with a pid this test spawned and still owns.
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0, "signal delivered");
    }

    /// Waits up to `limit` for the process to exit.
    pub async fn exit_status(&mut self, limit: Duration) -> std::process::ExitStatus {
        let child = &mut self.child;
        let exited = poll_until(limit, || {
            let status = child.try_wait().unwrap();
            async move { status }
        })
        .await;
        exited.unwrap_or_else(|| panic!("no exit within {limit:?}:\n{}", self.stderr.lock().unwrap()))
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value of one series in Prometheus text output: `name` and its labels in any order,
/// e.g. `metric(&text, "rollout_sessions_ended_total", &[("pool", "v1"), ("reason", "idle")])`.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let (series_name, series_labels) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if series_name != name {
            return None;
        }
        let pairs: Vec<(&str, &str)> = series_labels
            .split(',')
            .filter(|p| !p.is_empty())
            .filter_map(|p| p.split_once('=').map(|(k, v)| (k, v.trim_matches('"'))))
            .collect();
        let matches = pairs.len() == labels.len() && labels.iter().all(|l| pairs.contains(l));
        matches.then(|| value.parse().ok()).flatten()
    })
}

/// GETs every URL, up to 16 at a time, and returns each answer's `x-rollout-pool` in order.
pub async fn pools_of(urls: Vec<String>) -> Vec<String> {
    let client = http1_client();
    let mut out = Vec::with_capacity(urls.len());
    for chunk in urls.chunks(16) {
        let tasks: Vec<_> = chunk
            .iter()
            .map(|url| {
                let client = client.clone();
                let req = Request::get(url.as_str()).body(Full::default()).unwrap();
                tokio::spawn(async move { send(&client, req).await })
            })
            .collect();
        for task in tasks {
            let reply = task.await.unwrap();
            assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
            out.push(reply.header("x-rollout-pool").expect("pool header").to_owned());
        }
    }
    out
}

/// One admin request: `token` as a bearer token, `if_match` as a revision, `body` as JSON text.
pub async fn admin_call(
    method: &str,
    url: &str,
    token: Option<&str>,
    if_match: Option<&str>,
    body: Option<&str>,
) -> Reply {
    let mut req = Request::builder().method(method).uri(url);
    if let Some(token) = token {
        req = req.header("authorization", format!("Bearer {token}"));
    }
    if let Some(tag) = if_match {
        req = req.header("if-match", tag);
    }
    let body = body.map(|b| Full::new(Bytes::from(b.to_owned()))).unwrap_or_default();
    send(&http1_client(), req.body(body).unwrap()).await
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {} {:?}", self.status, self.body))
    }
}

/// A raw upstream: `serve` runs once per accepted connection. Returns the address and the
/// number of connections accepted so far.
pub async fn raw_upstream<F, Fut>(serve: F) -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>)
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(serve(stream));
        }
    });
    (addr, accepted)
}

/// A webhook receiver: answers every POST with the status it is set to, and keeps each call's
/// path and JSON body.
pub struct Hook {
    pub addr: SocketAddr,
    status: Arc<std::sync::atomic::AtomicU16>,
    calls: Arc<Mutex<Vec<(String, serde_json::Value)>>>,
}

impl Hook {
    pub async fn spawn(status: u16) -> Hook {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hook = Hook {
            addr,
            status: Arc::new(std::sync::atomic::AtomicU16::new(status)),
            calls: Arc::new(Mutex::new(Vec::new())),
        };
        let (status, calls) = (hook.status.clone(), hook.calls.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (status, calls) = (status.clone(), calls.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |req: Request<Incoming>| {
                        let (status, calls) = (status.clone(), calls.clone());
                        async move {
                            let path = req.uri().path().to_owned();
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            let json = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
                            calls.lock().unwrap().push((path, json));
                            let code = status.load(std::sync::atomic::Ordering::Relaxed);
                            let mut response = Response::new(Full::new(Bytes::new()));
                            *response.status_mut() = StatusCode::from_u16(code).unwrap();
                            Ok::<_, Infallible>(response)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        hook
    }

    pub fn answer(&self, status: u16) {
        self.status.store(status, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// The bodies of the calls to `path` so far.
    pub fn calls(&self, path: &str) -> Vec<serde_json::Value> {
        self.calls.lock().unwrap().iter().filter(|(p, _)| p == path).map(|(_, body)| body.clone()).collect()
    }
}
