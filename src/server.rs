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
use tracing::{info, warn};

use std::os::unix::net::UnixStream;

use tokio_rustls::TlsAcceptor;

use crate::admin::{self, AdminState, Readiness, Token, TokenError};
use crate::clock::{SharedClock, SystemClock};
use crate::config::{ClientConfig, Config, PoolName, StoreConfig};
use crate::control::{Actor, Control, Overrides};
use crate::drain::DrainClock;
use crate::fleet::{Fleet, Joined};
use crate::handover;
use crate::health;
use crate::listener::{self, Gate};
use crate::metrics::Metrics;
use crate::proxy::Proxy;
use crate::ramp::runner::Ramp;
use crate::session::{PinPolicy, Sessions};
use crate::shared::Shared;
use crate::snapshot::Snapshot;
use crate::store::fleet::Published;
use crate::store::{Loaded, Store, StoreError};
use crate::tls::CertStore;
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
    #[error(transparent)]
    State(#[from] StoreError),
    #[error("cannot join the fleet (store.backend: redis)")]
    Fleet(#[from] crate::store::fleet::FleetError),
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
            Err(StoreError::Locked { .. }) if tokio::time::Instant::now() < deadline => {
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
    shared: Arc<Shared>,
    control: Arc<Control>,
    ramp: Arc<Ramp>,
    shutdown: CancellationToken,
    stopped: JoinHandle<()>,
}

/// What a start builds from the store: the shared state, the control plane and the ramp.
struct Planes {
    shared: Arc<Shared>,
    control: Arc<Control>,
    ramp: Arc<Ramp>,
}

/// How a start reaches the state store.
enum Storage {
    /// Opened before anything was bound (a plain start).
    Opened(Store, Loaded),
    /// Opened once the process being taken over lets it go, waiting at most `patience`;
    /// `predecessor` (if one was running) is told when this process serves its sockets.
    AfterTakeover { predecessor: Option<UnixStream>, patience: Duration },
}

/// What a start has in hand before it serves: the config, both listeners and the way to the
/// store.
struct Launch {
    config: Config,
    clock: SharedClock,
    token: Option<Token>,
    data: TcpListener,
    admin: TcpListener,
    storage: Storage,
}

/// What [`listener::serve`] needs to serve the data plane.
struct DataListener {
    listener: TcpListener,
    acceptor: Option<TlsAcceptor>,
    gate: Arc<Gate>,
    metrics: Arc<Metrics>,
    client: ClientConfig,
}

/// The data-plane listener, served through the gate once [`DataPlane::start`] is called.
struct DataPlane {
    /// The listener, until it is started.
    pending: Option<DataListener>,
    stop: CancellationToken,
    grace: Duration,
    task: Option<JoinHandle<()>>,
}

impl DataPlane {
    /// Starts accepting, unless it already does.
    fn start(&mut self) {
        let Some(DataListener { listener, acceptor, gate, metrics, client }) = self.pending.take() else {
            return;
        };
        let (stop, grace) = (self.stop.clone(), self.grace);
        self.task = Some(tokio::spawn(async move {
            let addr = listener.local_addr().ok();
            info!(listen = ?addr, "accepting");
            listener::serve(listener, acceptor, gate, metrics, &client, stop, grace).await;
        }));
    }

    /// Stops the data plane of a start that failed.
    async fn abort(&mut self) {
        self.stop.cancel();
        self.finished().await;
    }

    /// Waits until the listener has stopped and its connections are finished (or cut at the
    /// end of the grace period); the stop token must have fired.
    async fn finished(&mut self) {
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

/// The background parts of a serving proxy, which a stop takes down in order.
struct Running {
    shared: Arc<Shared>,
    proxy: Arc<Proxy>,
    data_plane: DataPlane,
    readiness: Arc<Readiness>,
    upkeep: (JoinHandle<()>, CancellationToken),
    /// The ramp's task, stopped with the upkeep; in a fleet it gives up the ramp lease.
    ramp: JoinHandle<()>,
    checks: JoinHandle<()>,
    admin: (JoinHandle<()>, CancellationToken),
    grace: Duration,
}

/// What the checks before a start load and the start keeps.
pub struct Preflight {
    token: Option<Token>,
}

/// Every check a start makes before it binds or opens anything: the admin token (and that a
/// non-loopback admin listener has one), the served certificate and key, and the upstream CA
/// file. `check` runs these too, so a config it passes is one `run` starts with.
pub fn preflight(config: &Config) -> Result<Preflight, StartError> {
    let token = Token::load(config.admin_token_file.as_deref())?;
    if !config.admin_listen.ip().is_loopback() {
        if token.is_none() {
            return Err(StartError::AdminWithoutToken { addr: config.admin_listen });
        }
        if config.admin_tls.is_none() {
            tracing::warn!(admin = %config.admin_listen, "the admin listener is not on loopback and has no admin.tls: the admin token crosses the network in clear");
        }
    }
    load_certificate(config.tls.as_ref())?;
    load_certificate(config.admin_tls.as_ref())?;
    UpstreamClient::new(&config.upstream)?;
    Ok(Preflight { token })
}

/// The certificate and key `files` name, loaded, if they name any.
fn load_certificate(files: Option<&crate::config::TlsFiles>) -> Result<Option<Arc<CertStore>>, StartError> {
    Ok(match files {
        Some(tls) => Some(CertStore::load(&tls.cert, &tls.key)?),
        None => None,
    })
}

impl Server {
    /// Binds both listeners and starts serving.
    pub(crate) async fn start(config: Config) -> Result<Server, StartError> {
        Server::start_with(config, StartOptions::default()).await
    }

    /// Like [`Server::start`], with a different clock or store behaviour (tests) or a takeover.
    pub async fn start_with(config: Config, options: StartOptions) -> Result<Server, StartError> {
        let Preflight { token } = preflight(&config)?;
        let (data, admin, storage) = match options.takeover {
            // A plain start opens the store first: a second process on the same directory fails
            // before it takes any port.
            None => {
                let (store, loaded) = Store::open_with_delay(&config.state_dir, options.commit_delay)?;
                match bind_both(&config) {
                    Ok((data, admin)) => (data, admin, Storage::Opened(store, loaded)),
                    Err(err) => {
                        store.close().await;
                        return Err(err);
                    }
                }
            }
            // A takeover gets the running process's sockets (or binds its own if none is
            // running) and serves at once; requests wait at the gate until the store is free.
            Some(patience) => match handover::take(&config.state_dir).await? {
                Some((data, admin, predecessor)) => {
                    (data, admin, Storage::AfterTakeover { predecessor: Some(predecessor), patience })
                }
                None => {
                    let (data, admin) = bind_both(&config)?;
                    (data, admin, Storage::AfterTakeover { predecessor: None, patience })
                }
            },
        };
        Server::launch(Launch { config, clock: options.clock, token, data, admin, storage }).await
    }

    /// The start half: serves the data plane (at once through the gate in a takeover, else once
    /// the proxy is ready) and the admin listener, and starts the background tasks. The stop
    /// half is [`Running::stop`].
    async fn launch(launch: Launch) -> Result<Server, StartError> {
        let Launch { config, clock, token, data, admin, storage } = launch;
        let addr = data.local_addr().map_err(|source| bind_error("listen", config.listen, source))?;
        // As soon as the socket is in hand, before it is served. A socket taken over is set too,
        // since its predecessor may have run with the other setting.
        if let Err(err) = listener::defer_accept(&data, config.client.defer_accept) {
            warn!(error = %err, "cannot set client.defer_accept on the listening socket; accepting at once");
        }
        let admin_addr =
            admin.local_addr().map_err(|source| bind_error("admin.listen", config.admin_listen, source))?;
        let certs = load_certificate(config.tls.as_ref())?;
        let acceptor = certs.clone().map(|store| TlsAcceptor::from(crate::tls::server_config(store)));
        let admin_certs = load_certificate(config.admin_tls.as_ref())?;
        let admin_acceptor =
            admin_certs.clone().map(|store| TlsAcceptor::from(crate::tls::admin_server_config(store)));
        let reloaded_certs: Vec<Arc<CertStore>> = certs.iter().chain(admin_certs.iter()).cloned().collect();
        let client = UpstreamClient::new(&config.upstream)?;
        let metrics = Arc::new(Metrics::new());
        let shutdown = CancellationToken::new();
        let data_socket =
            handover::duplicate(&data).map_err(|source| bind_error("listen", config.listen, source))?;
        let patience = match &storage {
            Storage::Opened(..) => Duration::ZERO,
            Storage::AfterTakeover { patience, .. } => *patience,
        };
        let gate = Gate::new(patience);
        let mut data_plane = DataPlane {
            pending: Some(DataListener {
                listener: data,
                acceptor,
                gate: gate.clone(),
                metrics: metrics.clone(),
                client: config.client.clone(),
            }),
            stop: shutdown.clone(),
            grace: config.grace_period,
            task: None,
        };
        let Planes { shared, control, ramp } =
            Server::open_state(&config, &clock, &metrics, storage, &mut data_plane, reloaded_certs).await?;
        let proxy = Arc::new(Proxy::new(
            shared.clone(),
            client.clone(),
            if certs.is_some() { "https" } else { "http" },
        ));
        gate.open(proxy.clone());
        data_plane.start();

        let readiness = Arc::new(Readiness::default());
        let admin_stop = CancellationToken::new();
        let admin_state = AdminState {
            shared: shared.clone(),
            control: control.clone(),
            ramp: ramp.clone(),
            readiness: readiness.clone(),
            token: token.map(Arc::new),
        };
        offer_handover(&config, data_socket, &admin, &shutdown, &admin_stop);
        let admin_task = tokio::spawn(admin::serve(admin, admin_acceptor, admin_state, admin_stop.clone()));
        let upkeep_stop = CancellationToken::new();
        let upkeep = tokio::spawn(crate::shared::run_upkeep(shared.clone(), upkeep_stop.clone()));
        let ramp_task = tokio::spawn(crate::ramp::runner::run(ramp.clone(), upkeep_stop.clone()));
        if let Some(fleet) = shared.fleet() {
            tokio::spawn(control.clone().follow_fleet(fleet.clone(), upkeep_stop.clone()));
        }
        let checks = tokio::spawn(health::checks::run_checks(
            shared.snapshot_handle().clone(),
            client,
            shutdown.clone(),
        ));
        let running = Running {
            shared: shared.clone(),
            proxy,
            data_plane,
            readiness,
            upkeep: (upkeep, upkeep_stop),
            ramp: ramp_task,
            checks,
            admin: (admin_task, admin_stop),
            grace: config.grace_period,
        };
        let stopping = shutdown.clone();
        let stopped = tokio::spawn(async move {
            running.readiness.set(true);
            info!(listen = %addr, admin = %admin_addr, "serving");
            // Under systemd (`Type=notify`), `systemctl start` returns now.
            tell_systemd(&[sd_notify::NotifyState::Ready]);
            stopping.cancelled().await;
            running.stop().await;
        });
        Ok(Server { addr, admin_addr, shared, control, ramp, shutdown, stopped })
    }

    /// Opens the store (in a takeover, serving the data plane meanwhile, once the process taken
    /// over lets go of it) and builds the shared state and the control plane from what it held.
    /// On failure the data plane is stopped and the store released.
    async fn open_state(
        config: &Config,
        clock: &SharedClock,
        metrics: &Arc<Metrics>,
        storage: Storage,
        data_plane: &mut DataPlane,
        certs: Vec<Arc<CertStore>>,
    ) -> Result<Planes, StartError> {
        let opened = match storage {
            Storage::Opened(store, loaded) => Ok((store, loaded)),
            Storage::AfterTakeover { predecessor, patience } => {
                data_plane.start();
                if let Some(predecessor) = predecessor {
                    handover::acknowledge(predecessor);
                }
                wait_for_store(&config.state_dir, patience).await
            }
        };
        let (store, loaded) = match opened {
            Ok(opened) => opened,
            Err(err) => {
                data_plane.abort().await;
                return Err(err);
            }
        };
        let store = Arc::new(store);
        let fleet = match &config.store {
            StoreConfig::Embedded => Ok(None),
            StoreConfig::Redis(fleet) => join_fleet(fleet, &loaded, metrics).await.map(Some),
        };
        let prepared = fleet
            .and_then(|fleet| Server::prepare(config, clock, metrics, store.clone(), loaded, fleet, certs));
        match prepared {
            Ok(prepared) => Ok(prepared),
            Err(err) => {
                data_plane.abort().await;
                store.close().await;
                Err(err)
            }
        }
    }

    /// Builds the shared state and the control plane from what the store held (in a fleet, what
    /// the fleet store held).
    fn prepare(
        config: &Config,
        clock: &SharedClock,
        metrics: &Arc<Metrics>,
        store: Arc<Store>,
        mut loaded: Loaded,
        fleet: Option<(Fleet, Option<Joined>)>,
        certs: Vec<Arc<CertStore>>,
    ) -> Result<Planes, StartError> {
        // In a fleet, the fleet store's pins and salt are the truth; the local ones are its copy.
        let mut fleet_salt = None;
        let fleet = fleet.map(|(fleet, joined)| {
            if let Some(joined) = joined {
                loaded.pins = joined.pins;
                fleet_salt = Some(joined.salt);
                if let Some(overrides) = joined.overrides {
                    loaded.overrides = Some(overrides.json);
                    loaded.revision = overrides.revision;
                }
            }
            Arc::new(fleet)
        });
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
        let policy = PinPolicy::from_config(&effective);
        let sessions =
            Sessions::new(loaded.pins, loaded.split_salt, &policy, store, clock.clone(), metrics.clone());
        if fleet.is_some() {
            sessions.claim_new_pins_first();
        }
        if let Some(salt) = fleet_salt {
            // Kept locally too, so a start without the fleet store splits as the fleet does.
            sessions.use_split_salt(salt);
        }
        let drain = DrainClock::new(loaded.last_v1_request_ms, clock.now());
        let live = sessions.live(PoolName::V1) + sessions.live(PoolName::V2);
        info!(state_dir = %config.state_dir.display(), pins = live, expired_while_down = started_pins - live, "state loaded");
        let snapshot = Snapshot::build(&effective, metrics, None);
        let shared = Arc::new(Shared::new(snapshot, sessions, drain, metrics.clone(), clock.clone(), fleet));
        let control =
            Arc::new(Control::new(shared.clone(), config.clone(), overrides, loaded.revision, certs));
        let ramp = Arc::new(Ramp::new(
            shared.clone(),
            control.clone(),
            loaded.ramp.as_deref(),
            config.ramp.as_ref(),
        ));
        Ok(Planes { shared, control, ramp })
    }

    /// The running proxy's shared state: its snapshot, sessions, store, metrics and drain signal.
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// The control plane: admin changes and reloads.
    pub(crate) fn control(&self) -> &Arc<Control> {
        &self.control
    }

    /// Runs the ramp's analysis now, as its background task does every second (one judges
    /// only when the plan's interval is due by the proxy's clock): for tests on a manual clock.
    pub async fn analyse_ramp(&self) {
        self.ramp.tick().await;
    }

    /// A token that starts a graceful stop when cancelled.
    pub(crate) fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Waits until the proxy has stopped.
    pub(crate) async fn wait(self) {
        let _ = self.stopped.await;
    }

    /// Starts a graceful stop and waits for it to finish.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.wait().await;
    }
}

impl Running {
    /// The stop half: "not ready" first, then the data plane drains, the last pin activity and
    /// drain clock are written and the state directory released (a successor waits for it),
    /// open tunnels get their own grace period, and the admin listener closes last.
    async fn stop(mut self) {
        self.readiness.set(false);
        tell_systemd(&[sd_notify::NotifyState::Stopping]);
        self.data_plane.finished().await;
        // Pin activity and the drain clock kept being flushed during the drain; stop now and
        // write the last of both. Tunnels still open need no state.
        let (upkeep, upkeep_stop) = self.upkeep;
        upkeep_stop.cancel();
        let _ = upkeep.await;
        let _ = self.ramp.await;
        let _ = self.checks.await;
        let _ = self.shared.maintain();
        self.shared.store().close().await;
        // Upgraded connections (WebSocket) are no longer HTTP connections the listener
        // tracks; they get a grace period of their own.
        self.proxy.close_tunnels(self.grace).await;
        let (admin, admin_stop) = self.admin;
        admin_stop.cancel();
        let _ = admin.await;
        info!("stopped");
    }
}

/// Tells systemd (through `$NOTIFY_SOCKET`, when it is set) how the service is doing.
fn tell_systemd(states: &[sd_notify::NotifyState]) {
    if std::env::var_os("NOTIFY_SOCKET").is_some() {
        if let Err(err) = sd_notify::notify(false, states) {
            tracing::warn!(error = %err, "could not notify systemd");
        }
    }
}

/// Offers this process's sockets to a successor started with `--takeover`; once it takes them,
/// this process stops and leaves the shared admin socket to the successor at once.
fn offer_handover(
    config: &Config,
    data_socket: std::os::fd::OwnedFd,
    admin: &TcpListener,
    shutdown: &CancellationToken,
    admin_stop: &CancellationToken,
) {
    let handed_over = CancellationToken::new();
    let offered =
        handover::offer(&config.state_dir, data_socket, admin, handed_over.clone(), shutdown.clone());
    if let Err(err) = &offered {
        tracing::warn!(error = %crate::ErrorChain(err), "hitless restart is unavailable for this process");
    }
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

/// Binds the data-plane and admin listeners, admin first.
fn bind_both(config: &Config) -> Result<(TcpListener, TcpListener), StartError> {
    let admin = bind(config.admin_listen, "admin.listen")?;
    let data = bind(config.listen, "listen")?;
    Ok((data, admin))
}

fn bind(addr: SocketAddr, key: &'static str) -> Result<TcpListener, StartError> {
    listener::bind(addr).map_err(|source| bind_error(key, addr, source))
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
pub(crate) fn stop_signal() -> Result<impl std::future::Future<Output = ()>, StartError> {
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

/// Joins the fleet. A replica that brings overrides into a fleet that has none yet (the first
/// replica of a single-replica deployment moved to fleet mode) publishes them as the fleet's. If
/// the store is unreachable, the replica starts from its local copy (`None`) and joins later.
async fn join_fleet(
    config: &crate::config::FleetConfig,
    local: &Loaded,
    metrics: &Metrics,
) -> Result<(Fleet, Option<Joined>), StartError> {
    let fleet = Fleet::new(config, metrics).await?;
    let mut joined = match fleet.join().await {
        Ok(joined) => joined,
        Err(err) => {
            tracing::warn!(error = %crate::ErrorChain(&err), "starting from the local copy; joining the fleet when its store answers");
            return Ok((fleet, None));
        }
    };
    if let (None, Some(json)) = (&joined.overrides, &local.overrides) {
        if let Ok(Published::Done(revision)) = fleet.publish_overrides(0, json, None).await {
            info!(revision, "published this replica's overrides as the fleet's");
            joined.overrides = Some(crate::store::fleet::FleetOverrides { revision, json: json.clone() });
        }
    }
    Ok((fleet, Some(joined)))
}
