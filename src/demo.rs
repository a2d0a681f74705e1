//! `rollout-proxy demo`: a self-contained tour on loopback.
//!
//! Starts one stub application server per upstream of the demo config (each answers with its pool
//! and name), then the proxy and its admin listener, and prints commands to try. When the config
//! has a ramp, a few visitors a second give it traffic to judge. The stubs and visitors exist
//! only for the tour; the proxy itself is the same [`crate::server::Server`] that `run` starts.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::config::{Config, ConfigError, PoolName, UpstreamName, UpstreamUrl};
use crate::server::{self, Server, StartError};

/// The demo configuration, embedded so the demo needs no files.
pub(crate) const DEMO_CONFIG: &str = include_str!("../config/demo.yaml");

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("demo upstream {name} has url {url}; the demo needs an IP:port it can listen on")]
    StubAddress { name: UpstreamName, url: UpstreamUrl },
    #[error("cannot start demo upstream {name} on {addr}")]
    Stub {
        name: UpstreamName,
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Start(#[from] StartError),
    #[error("cannot write the demo's admin token to {}", file.display())]
    Token {
        file: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Writes `text` to a new file only its owner may read.
fn write_private(file: &Path, text: &str) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(file)?
        .write_all(text.as_bytes())
}

/// What the command line may change about the demo.
#[derive(Debug, Default)]
pub struct DemoOptions {
    /// A config file to use instead of the embedded one.
    pub config: Option<PathBuf>,
    pub listen: Option<SocketAddr>,
    pub admin_listen: Option<SocketAddr>,
}

/// Runs the demo until SIGINT or SIGTERM.
pub async fn run(options: DemoOptions) -> Result<(), DemoError> {
    let stop = server::stop_signal()?;
    let mut config = match &options.config {
        Some(file) => Config::load(file)?,
        None => Config::from_yaml(DEMO_CONFIG, Path::new("config/demo.yaml"))?,
    };
    let listen = options.listen.unwrap_or(config.listen);
    let admin_listen = options.admin_listen.unwrap_or(config.admin_listen);
    // Each demo run starts from empty state of its own, removed when it stops.
    let state_dir = std::env::temp_dir().join(format!("rollout-proxy-demo-{}", std::process::id()));
    config = config.with_listeners(listen, admin_listen).with_state_dir(&state_dir);
    // An admin token of the run's own, so the tour can show changes being made with it.
    // A new directory only this user can enter: one left by someone else is refused.
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&state_dir)
            .map_err(|source| DemoError::Token { file: state_dir.clone(), source })?;
    }
    let token_file = state_dir.join("admin.token");
    let token: String = (0..24).map(|_| fastrand::alphanumeric()).collect();
    write_private(&token_file, &token)
        .map_err(|source| DemoError::Token { file: token_file.clone(), source })?;
    config.admin_token_file = Some(token_file.clone());

    for pool in PoolName::ALL {
        let upstreams = config.pools.get(pool).upstreams.clone();
        for (index, upstream) in upstreams.into_iter().enumerate() {
            let addr: SocketAddr = upstream.url.authority.as_str().parse().map_err(|_| {
                DemoError::StubAddress { name: upstream.name.clone(), url: upstream.url.clone() }
            })?;
            let listener = TcpListener::bind(addr)
                .await
                .and_then(|l| l.local_addr().map(|bound| (l, bound)))
                .map_err(|source| DemoError::Stub { name: upstream.name.clone(), addr, source });
            let (listener, bound) = listener?;
            tokio::spawn(serve_stub(listener, pool, upstream.name.clone()));
            let url =
                UpstreamUrl::try_parse(&format!("http://{bound}")).expect("a bound address is a valid URL");
            config = config.with_upstream_url(pool, index, url);
        }
    }

    let server = Server::start(config.clone()).await?;
    println!("{}", tour(&config, server.addr, server.admin_addr, &token, &token_file));
    if config.ramp.is_some() {
        tokio::spawn(visit(server.addr));
    }
    let token = server.shutdown_token();
    tokio::spawn(async move {
        stop.await;
        token.cancel();
    });
    server.wait().await;
    let _ = std::fs::remove_dir_all(&state_dir);
    Ok(())
}

fn tour(config: &Config, addr: SocketAddr, admin: SocketAddr, token: &str, token_file: &Path) -> String {
    let mut out = String::new();
    out += "rollout-proxy demo\n\n";
    out += &format!("  proxy   http://{addr}\n  admin   http://{admin}\n  console http://{admin}/   (open it in a browser)\n");
    out += &format!(
        "  token   {token}   (the admin token, in {}; type it into the console to make changes)\n",
        token_file.display()
    );
    for pool in PoolName::ALL {
        for u in &config.pools.get(pool).upstreams {
            out += &format!("  {pool}      {} at {} (weight {})\n", u.name, u.url, u.weight);
        }
    }
    let percent = config.routes.legacy_v1_percent;
    let prefixes: Vec<&str> = config.routes.v2_prefixes.iter().map(|p| p.as_str()).collect();
    out += &format!("\n  v2 prefixes: {}   legacy requests to v1: {percent}\n\n", prefixes.join(", "));
    out += "Try:\n";
    out += "  # a version-prefixed path always reaches the v2 pool\n";
    out += &format!("  curl -si http://{addr}/api/v2/studies/42\n\n");
    out += &format!(
        "  # a legacy study is pinned to the pool it started on ({percent} of new studies start on v1)\n"
    );
    out += &format!("  for i in $(seq 5); do curl -s http://{addr}/api/studies/42/progress; done\n");
    out += &format!("  curl -s 'http://{addr}/api/progress?studyId=42'   # same study, same pool\n\n");
    out += "  # ten studies: each starts on a pool by the percentage, then stays there\n";
    out += &format!("  for i in $(seq 10); do curl -s http://{addr}/api/studies/$i/progress; done\n");
    out += &format!("  for i in $(seq 10); do curl -s http://{addr}/api/studies/$i/progress; done   # same pools again\n\n");
    out += "  # legacy requests without a study id are split per request\n";
    out += &format!("  for i in $(seq 6); do curl -s http://{addr}/api/members/me; done\n\n");
    out += "  # /api/v2x is not under /api/v2: it is a legacy path\n";
    out += &format!("  curl -s http://{addr}/api/v2x\n\n");
    out += &format!(
        "  # the drain signal: 200 once v1 has no pins and was quiet for {:?}\n",
        config.quiet_window
    );
    out += &format!("  curl -s http://{admin}/drain; echo\n");
    out += &format!("  curl -s http://{admin}/metrics | grep ^rollout_sessions\n\n");
    if config.ramp.is_some() {
        out += "  # an automated ramp runs on the demo's own visitors; it moves v1's share of new\n";
        out += "  # sessions step by step as v2 passes each analysis (pins stay where they are)\n";
        out += &format!("  curl -s http://{admin}/ramp; echo\n");
        out += &format!("  rollout-proxy ctl --admin http://{admin} ramp status --watch\n\n");
    }
    let ctl = format!("rollout-proxy ctl --admin http://{admin} --token-file {}", token_file.display());
    out += "  # the operator's loop, with the token (cargo run --release -- ctl ... from the source tree)\n";
    out += &format!("  {ctl} status\n");
    out += &format!("  {ctl} sessions --limit 5\n");
    out += &format!("  {ctl} session 3\n");
    out += &format!("  {ctl} end-session 3          # its next request starts a new pin\n");
    out += &format!(
        "  {ctl} legacy-percent 100     # new studies to v1 again (add --force while the ramp runs)\n"
    );
    out += &format!("  {ctl} drain --wait --timeout 2m   # progress until v1 is drained\n\n");
    out += "  # liveness and readiness\n";
    out += &format!("  curl -s http://{admin}/healthz; curl -s http://{admin}/readyz\n\n");
    out += "Ctrl-C stops the demo.";
    out
}

/// The demo's visitors, so its ramp has traffic to judge: ten new studies and ten v2 API calls a
/// second, on loopback, each on a connection of its own.
async fn visit(proxy: SocketAddr) {
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(100));
    for visitor in 0u64.. {
        tick.tick().await;
        let _ = visit_once(proxy, &format!("/api/studies/visitor-{visitor}/progress")).await;
        let _ = visit_once(proxy, "/api/v2/studies/visitor").await;
    }
}

async fn visit_once(proxy: SocketAddr, path: &str) -> io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(proxy).await?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await?;
    Ok(())
}

/// A stand-in application server: answers every request with its pool, name, method and path.
async fn serve_stub(listener: TcpListener, pool: PoolName, name: UpstreamName) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let name = name.clone();
        let service = service_fn(move |req: Request<Incoming>| {
            let body = format!("{pool} {name}: {} {}\n", req.method(), req.uri());
            let response = Response::builder()
                .header("content-type", "text/plain; charset=utf-8")
                .header("x-upstream", name.as_str())
                .body(Full::new(Bytes::from(body)))
                .expect("static headers are valid");
            async move { Ok::<_, Infallible>(response) }
        });
        tokio::spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
