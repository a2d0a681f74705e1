//! Starts the proxy: binds the data-plane and admin listeners, tracks readiness, stops gracefully.
//!
//! A stop (SIGTERM, SIGINT or [`Server::stop`]) first turns `/readyz` to 503, then stops
//! accepting, lets in-flight requests finish within `shutdown.grace_period`, and only then closes
//! the admin listener, so an orchestrator sees "not ready" for the whole drain.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::admin::{self, Readiness};
use crate::config::Config;
use crate::listener;
use crate::proxy::Proxy;
use crate::snapshot;
use crate::upstream::UpstreamClient;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr} ({key})")]
    Bind {
        key: &'static str,
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("cannot install the signal handlers")]
    Signals(#[source] io::Error),
}

/// A running proxy.
pub struct Server {
    /// Where the data plane listens (the bound address, so port 0 is resolved).
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    shutdown: CancellationToken,
    stopped: JoinHandle<()>,
}

impl Server {
    /// Binds both listeners and starts serving. Returns once both accept connections.
    pub async fn start(config: Config) -> Result<Server, StartError> {
        let admin_listener = bind(config.admin_listen, "admin.listen").await?;
        let data_listener = bind(config.listen, "listen").await?;
        let addr =
            data_listener.local_addr().map_err(|source| bind_error("listen", config.listen, source))?;
        let admin_addr = admin_listener
            .local_addr()
            .map_err(|source| bind_error("admin.listen", config.admin_listen, source))?;

        let readiness = Arc::new(Readiness::default());
        let admin_stop = CancellationToken::new();
        let admin_task = tokio::spawn(admin::serve(admin_listener, readiness.clone(), admin_stop.clone()));

        let proxy = Arc::new(Proxy::new(snapshot::shared(&config), UpstreamClient::new(&config.upstream)));
        let shutdown = CancellationToken::new();
        let stopping = shutdown.clone();
        let stopped = tokio::spawn(async move {
            let not_ready = async {
                stopping.cancelled().await;
                readiness.set(false);
            };
            readiness.set(true);
            info!(listen = %addr, admin = %admin_addr, "serving");
            tokio::join!(
                listener::serve(data_listener, proxy, &config.client, stopping.clone(), config.grace_period),
                not_ready
            );
            admin_stop.cancel();
            let _ = admin_task.await;
            info!("stopped");
        });
        Ok(Server { addr, admin_addr, shutdown, stopped })
    }

    /// A token that starts a graceful stop when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Waits until the proxy has stopped.
    pub async fn wait(self) {
        let _ = self.stopped.await;
    }

    /// Starts a graceful stop and waits for it to finish.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.wait().await;
    }
}

async fn bind(addr: SocketAddr, key: &'static str) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr).await.map_err(|source| bind_error(key, addr, source))
}

fn bind_error(key: &'static str, addr: SocketAddr, source: io::Error) -> StartError {
    StartError::Bind { key, addr, source }
}

/// Serves until SIGTERM or SIGINT, then stops gracefully.
pub async fn run(config: Config) -> Result<(), StartError> {
    let stop = stop_signal()?;
    let server = Server::start(config).await?;
    let token = server.shutdown_token();
    tokio::spawn(async move {
        stop.await;
        token.cancel();
    });
    server.wait().await;
    Ok(())
}

/// Resolves on the first SIGTERM or SIGINT. Handlers are installed before this returns, so a
/// signal that arrives while the server starts is not lost.
pub fn stop_signal() -> Result<impl std::future::Future<Output = ()>, StartError> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(StartError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(StartError::Signals)?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => info!(signal = "SIGTERM", "stopping gracefully"),
            _ = int.recv() => info!(signal = "SIGINT", "stopping gracefully"),
        }
    })
}
