//! Starts the proxy: binds the data-plane and admin listeners, tracks readiness, stops gracefully.
//!
//! Start-up opens the state store before binding anything, so a second process on the same
//! `state_dir` fails before it takes a port. A stop (SIGTERM, SIGINT or [`Server::stop`]) first
//! turns `/readyz` to 503, then stops accepting, lets in-flight requests finish within
//! `shutdown.grace_period`, writes the last pin activity and drain clock, releases the store,
//! and only then closes the admin listener, so an orchestrator sees "not ready" for the whole
//! drain.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::admin::{self, AdminState, Readiness, Token, TokenError};
use crate::clock::{SharedClock, SystemClock};
use crate::config::{Config, PoolName};
use crate::control::{Actor, Control, Overrides};
use crate::drain::DrainClock;
use crate::handover;
use crate::listener;
use crate::metrics::Metrics;
use crate::proxy::{Gate, Proxy};
use crate::session::{PinPolicy, Sessions};
use crate::snapshot;
use crate::state::{Loaded, StateError, Store};
use crate::tls::CertStore;
use crate::upstream::UpstreamClient;

/// How often pins are expired and flushed and the drain clock is persisted; §4 asks for at least
/// once a second.
pub const UPKEEP_INTERVAL: std::time::Duration = crate::drain::FLUSH_INTERVAL;

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
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error(transparent)]
    Handover(#[from] handover::HandoverError),
    #[error("admin.listen {addr} is not a loopback address and no admin token is configured; set admin.token_file or ROLLOUT_ADMIN_TOKEN")]
    AdminWithoutToken { addr: SocketAddr },
    #[error("the admin overrides stored in {} do not parse; refusing to start rather than silently dropping them", dir.display())]
    Overrides {
        dir: std::path::PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// Runs [`Proxy::maintain`] every second until `stop` fires, and grows the pin table ahead of
/// need ([`crate::session::Sessions::reserve`]).
async fn upkeep(proxy: Arc<Proxy>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(UPKEEP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let scanning = proxy.clone();
        // A scan of a large pin table is blocking work; keep it off the request threads' hot path.
        let sent = tokio::task::spawn_blocking(move || {
            let sent = scanning.maintain();
            scanning.sessions().reserve();
            sent
        })
        .await
        .unwrap_or(None);
        proxy.confirm_upkeep(sent).await;
    }
}

/// How a server starts, beyond its config.
pub struct StartOptions {
    /// The clock pins and the drain signal read; tests move a [`crate::clock::ManualClock`].
    pub clock: SharedClock,
    /// Holds back every state commit, as a slow disk would (tests).
    pub commit_delay: Duration,
    /// Take over from the process running on the same `state_dir` (hitless restart): take its
    /// listening sockets, serve at once, and let requests wait up to this long for the store.
    pub takeover: Option<Duration>,
}

impl Default for StartOptions {
    fn default() -> Self {
        StartOptions { clock: Arc::new(SystemClock), commit_delay: Duration::ZERO, takeover: None }
    }
}

/// Opens the store, retrying while another process holds it, for at most `patience`. Opening
/// reads every pin: blocking work, kept off the threads already serving connections.
async fn wait_for_store(dir: &std::path::Path, patience: Duration) -> Result<(Store, Loaded), StartError> {
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        let path = dir.to_owned();
        let opened = tokio::task::spawn_blocking(move || Store::open(&path))
            .await
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic.into_panic()));
        match opened {
            Err(StateError::Locked { .. }) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => return Ok(other?),
        }
    }
}

/// A running proxy.
pub struct Server {
    /// Where the data plane listens (the bound address, so port 0 is resolved).
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    proxy: Arc<Proxy>,
    control: Arc<Control>,
    shutdown: CancellationToken,
    stopped: JoinHandle<()>,
}

impl Server {
    /// Binds both listeners and starts serving.
    pub async fn start(config: Config) -> Result<Server, StartError> {
        Server::start_with(config, StartOptions::default()).await
    }

    /// Like [`Server::start`], with a different clock or store behaviour (tests) or a takeover.
    pub async fn start_with(config: Config, options: StartOptions) -> Result<Server, StartError> {
        let token = Token::load(config.admin_token_file.as_deref())?;
        if token.is_none() && !config.admin_listen.ip().is_loopback() {
            return Err(StartError::AdminWithoutToken { addr: config.admin_listen });
        }
        let Some(patience) = options.takeover else {
            // A plain start opens the store first: a second process on the same directory fails
            // before it takes any port.
            let (store, loaded) = Store::open_with_delay(&config.state_dir, options.commit_delay)?;
            let store = Arc::new(store);
            let listeners = async {
                let admin = bind(config.admin_listen, "admin.listen").await?;
                let data = bind(config.listen, "listen").await?;
                Ok::<_, StartError>((data, admin))
            };
            let (data, admin) = match listeners.await {
                Ok(listeners) => listeners,
                Err(err) => {
                    store.close().await;
                    return Err(err);
                }
            };
            let gate = Gate::new(Duration::ZERO);
            let metrics = Arc::new(Metrics::new());
            return Server::launch(
                config,
                options.clock,
                Some((store, loaded)),
                data,
                admin,
                gate,
                metrics,
                token,
                None,
            )
            .await;
        };
        // A takeover gets the running process's sockets (or binds its own if none is running)
        // and serves at once; requests wait at the gate until the store is free.
        let (data, admin, predecessor) = match handover::take(&config.state_dir).await? {
            Some((data, admin, predecessor)) => (data, admin, Some(predecessor)),
            None => {
                (bind(config.listen, "listen").await?, bind(config.admin_listen, "admin.listen").await?, None)
            }
        };
        let gate = Gate::new(patience);
        let metrics = Arc::new(Metrics::new());
        Server::launch(config, options.clock, None, data, admin, gate, metrics, token, predecessor).await
    }

    /// Serves on `data` (at once, through `gate`) and `admin` (once the proxy is ready). With no
    /// `opened` store, the store is opened here, waiting as long as the gate's patience for the
    /// process being taken over to release it.
    #[allow(clippy::too_many_arguments)]
    async fn launch(
        config: Config,
        clock: SharedClock,
        opened: Option<(Arc<Store>, Loaded)>,
        data_listener: TcpListener,
        admin_listener: TcpListener,
        gate: Arc<Gate>,
        metrics: Arc<Metrics>,
        token: Option<Token>,
        predecessor: Option<std::os::unix::net::UnixStream>,
    ) -> Result<Server, StartError> {
        let addr =
            data_listener.local_addr().map_err(|source| bind_error("listen", config.listen, source))?;
        let admin_addr = admin_listener
            .local_addr()
            .map_err(|source| bind_error("admin.listen", config.admin_listen, source))?;
        let certs = match &config.tls {
            Some(tls) => Some(CertStore::load(&tls.cert, &tls.key)?),
            None => None,
        };
        let acceptor =
            certs.clone().map(|store| tokio_rustls::TlsAcceptor::from(crate::tls::server_config(store)));
        let client = UpstreamClient::new(&config.upstream)?;

        let shutdown = CancellationToken::new();
        let data_socket = handover::duplicate(&data_listener)
            .map_err(|source| bind_error("listen", config.listen, source))?;
        let mut serve_data = Some({
            let (gate, metrics, client_config, stop) =
                (gate.clone(), metrics.clone(), config.client.clone(), shutdown.clone());
            let grace = config.grace_period;
            move || {
                tokio::spawn(async move {
                    info!(listen = %addr, "accepting");
                    listener::serve(data_listener, acceptor, gate, metrics, &client_config, stop, grace)
                        .await;
                })
            }
        });
        let mut start_data_plane =
            || serve_data.take().map(|serve| serve()).expect("the data plane starts once");

        // With the store in hand, the proxy is built before the first connection is accepted.
        // In a takeover, connections are accepted first and wait at the gate for the store.
        let (data_plane, store, loaded) = match opened {
            Some((store, loaded)) => (None, store, loaded),
            None => {
                let data_plane = start_data_plane();
                if let Some(predecessor) = predecessor {
                    handover::acknowledge(predecessor);
                }
                match wait_for_store(&config.state_dir, gate.patience()).await {
                    Ok((store, loaded)) => (Some(data_plane), Arc::new(store), loaded),
                    Err(err) => {
                        shutdown.cancel();
                        let _ = data_plane.await;
                        return Err(err);
                    }
                }
            }
        };
        let prepared = Server::prepare(&config, &clock, &metrics, store.clone(), loaded, client, certs);
        let (proxy, control) = match prepared {
            Ok(prepared) => prepared,
            Err(err) => {
                shutdown.cancel();
                if let Some(data_plane) = data_plane {
                    let _ = data_plane.await;
                }
                store.close().await;
                return Err(err);
            }
        };
        gate.open(proxy.clone());
        let data_plane = data_plane.unwrap_or_else(start_data_plane);

        let readiness = Arc::new(Readiness::default());
        let admin_stop = CancellationToken::new();
        let admin_state = AdminState {
            proxy: proxy.clone(),
            control: control.clone(),
            readiness: readiness.clone(),
            token: token.map(Arc::new),
        };
        // A successor started with --takeover gets these sockets; this process then stops, and
        // leaves the shared admin socket to the successor at once.
        let handed_over = CancellationToken::new();
        let offered = handover::offer(
            &config.state_dir,
            data_socket,
            &admin_listener,
            handed_over.clone(),
            shutdown.clone(),
        );
        if let Err(err) = &offered {
            tracing::warn!(error = %crate::ErrorChain(err), "hitless restart is unavailable for this process");
        }
        {
            let (shutdown, admin_stop) = (shutdown.clone(), admin_stop.clone());
            tokio::spawn(async move {
                tokio::select! {
                    _ = handed_over.cancelled() => {
                        admin_stop.cancel();
                        shutdown.cancel();
                    }
                    _ = shutdown.cancelled() => {}
                }
            });
        }
        let admin_task = tokio::spawn(admin::serve(admin_listener, admin_state, admin_stop.clone()));
        let upkeep_stop = CancellationToken::new();
        let upkeep = tokio::spawn(upkeep(proxy.clone(), upkeep_stop.clone()));
        let checks = tokio::spawn(crate::health::checks::run_checks(
            proxy.snapshot_handle(),
            proxy.client().clone(),
            shutdown.clone(),
        ));

        let stopping = shutdown.clone();
        let proxy_handle = proxy.clone();
        let grace = config.grace_period;
        let stopped = tokio::spawn(async move {
            readiness.set(true);
            info!(listen = %addr, admin = %admin_addr, "serving");
            stopping.cancelled().await;
            readiness.set(false);
            let _ = data_plane.await;
            // Pin activity and the drain clock kept being flushed during the drain; stop now,
            // write the last of both and release the state directory (a successor waits for
            // it). Tunnels still open need no state.
            upkeep_stop.cancel();
            let _ = upkeep.await;
            let _ = checks.await;
            let _ = proxy.maintain();
            proxy.sessions().store().close().await;
            // Upgraded connections (WebSocket) are no longer HTTP connections the listener
            // tracks; they get a grace period of their own.
            proxy.close_tunnels(grace).await;
            admin_stop.cancel();
            let _ = admin_task.await;
            info!("stopped");
        });
        Ok(Server { addr, admin_addr, proxy: proxy_handle, control, shutdown, stopped })
    }

    /// Builds the proxy and its control plane from what the store held.
    fn prepare(
        config: &Config,
        clock: &SharedClock,
        metrics: &Arc<Metrics>,
        store: Arc<Store>,
        loaded: Loaded,
        client: UpstreamClient,
        certs: Option<Arc<CertStore>>,
    ) -> Result<(Arc<Proxy>, Arc<Control>), StartError> {
        let mut overrides: Overrides = match &loaded.overrides {
            None => Overrides::default(),
            Some(json) => serde_json::from_slice(json)
                .map_err(|source| StartError::Overrides { dir: config.state_dir.clone(), source })?,
        };
        let effective = Control::effective(config, &mut overrides);
        if !overrides.is_empty() {
            info!(overrides = %serde_json::to_string(&overrides).unwrap_or_default(), revision = loaded.revision, "admin overrides in force");
        }
        let started_pins = loaded.pins.len();
        let policy = PinPolicy::from_config(&effective.sessions);
        let sessions = Arc::new(Sessions::new(loaded.pins, &policy, store, clock.clone(), metrics.clone()));
        let drain = Arc::new(DrainClock::new(loaded.last_v1_request_ms, clock.now()));
        let live = sessions.live(PoolName::V1) + sessions.live(PoolName::V2);
        info!(state_dir = %config.state_dir.display(), pins = live, expired_while_down = started_pins - live, "state loaded");
        let proxy = Arc::new(Proxy::new(
            snapshot::shared(&effective, metrics),
            client,
            sessions,
            drain,
            metrics.clone(),
            clock.clone(),
            if certs.is_some() { "https" } else { "http" },
        ));
        let control =
            Arc::new(Control::new(proxy.clone(), config.clone(), overrides, loaded.revision, certs));
        Ok((proxy, control))
    }

    /// The running proxy: its sessions, metrics and drain signal.
    pub fn proxy(&self) -> &Arc<Proxy> {
        &self.proxy
    }

    /// The control plane: admin changes and reloads.
    pub fn control(&self) -> &Arc<Control> {
        &self.control
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

/// Serves until SIGTERM or SIGINT, then stops gracefully; SIGHUP reloads the config file.
/// With `takeover`, first takes over from the process running on the same state directory.
pub async fn run(config: Config, takeover: Option<Duration>) -> Result<(), StartError> {
    use tokio::signal::unix::{signal, SignalKind};
    let stop = stop_signal()?;
    let mut hangup = signal(SignalKind::hangup()).map_err(StartError::Signals)?;
    let server = Server::start_with(config, StartOptions { takeover, ..StartOptions::default() }).await?;
    let control = server.control().clone();
    tokio::spawn(async move {
        while hangup.recv().await.is_some() {
            info!(signal = "SIGHUP", "reloading the config file");
            // A refused reload is logged and counted by the control plane.
            let _ = control.reload(None, &Actor("SIGHUP".to_owned())).await;
        }
    });
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
