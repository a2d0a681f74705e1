//! The control plane: the config file, the operator's overrides on top of it, and the revision
//! that names their combination.
//!
//! Every change (an admin mutation, a reload, dropping the overrides) is serialised here: it is
//! checked against the caller's expected revision, made durable in the store, and only then
//! published as a new [`crate::snapshot::Snapshot`], so a failed change leaves nothing behind and
//! the very next request sees a successful one. Each change is logged as one audit line.
//! Speaking HTTP is [`crate::admin`]'s job; this module does not know about requests.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::Mutex;
use tracing::{info, warn};

use crate::config::{ByPool, Config, ConfigError, Percent, PoolName, MAX_WEIGHT};
use crate::fleet::Fleet;
use crate::session::is_valid_key;
use crate::shared::Shared;
use crate::snapshot::Snapshot;
use crate::store::fleet::{FleetOverrides, Lease, Published};
use crate::store::Op;
use crate::tls::{CertStore, TlsError};
use crate::ErrorChain;

/// Values an operator set through the admin API; they win over the config file until dropped.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Overrides {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub legacy_v1_percent: Option<f64>,
    /// Upstream name → weight, per pool.
    #[serde(default)]
    pub weights: ByPool<BTreeMap<String, u32>>,
}

impl Overrides {
    pub(crate) fn is_empty(&self) -> bool {
        self.legacy_v1_percent.is_none() && self.weights.v1.is_empty() && self.weights.v2.is_empty()
    }

    /// `config` with these overrides applied. Overrides naming upstreams the file no longer has
    /// are dropped (and logged).
    fn apply(&mut self, config: &Config) -> Config {
        let mut effective = config.clone();
        if let Some(percent) = self.legacy_v1_percent.and_then(|p| Percent::try_from_f64(p).ok()) {
            effective.routes.legacy_v1_percent = percent;
        }
        for pool in PoolName::ALL {
            let upstreams = &mut effective.pools.get_mut(pool).upstreams;
            let weights = self.weights.get_mut(pool);
            weights.retain(|name, weight| match upstreams.iter_mut().find(|u| u.name.as_str() == name) {
                Some(upstream) => {
                    upstream.weight = *weight;
                    true
                }
                None => {
                    warn!(pool = %pool, upstream = %name, "dropping the weight override of an upstream no longer in the config");
                    false
                }
            });
        }
        effective
    }
}

/// Why a change was refused. Nothing was changed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ControlError {
    #[error("revision {expected} is stale; the current revision is {current}")]
    Stale { expected: u64, current: u64 },
    #[error("unknown pool {0:?} (pools are v1 and v2)")]
    UnknownPool(String),
    #[error("pool {pool} has no upstream named {name:?}")]
    UnknownUpstream { pool: PoolName, name: String },
    #[error("no live session {0:?}")]
    UnknownSession(String),
    #[error("{field}: {message}")]
    Invalid { field: &'static str, message: String },
    #[error("this proxy was started without a config file, so there is nothing to reload")]
    NoConfigFile,
    #[error("config reload failed; the running config is unchanged")]
    Reload(#[source] ConfigError),
    #[error("certificate reload failed; the running config and certificate are unchanged")]
    Certificate(#[source] TlsError),
    #[error("could not store the change; nothing was changed")]
    Store,
    #[error("the fleet store is unreachable; nothing was changed")]
    FleetUnavailable,
    #[error("this replica no longer leads the ramp; nothing was changed")]
    Fenced,
}

/// Who asked for a change, for the audit line.
#[derive(Debug, Clone)]
pub(crate) struct Actor(pub String);

/// The outcome of an accepted change.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Applied {
    pub revision: u64,
    pub old: Value,
    pub new: Value,
    /// Config keys a reload found changed that only take effect after a restart.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub restart_required: Vec<&'static str>,
}

struct Running {
    /// The config file as last loaded successfully.
    file: Config,
    overrides: Overrides,
    revision: u64,
}

pub(crate) struct Control {
    shared: Arc<Shared>,
    running: Mutex<Running>,
    /// The served certificates (data plane, admin listener), re-read on every reload.
    certs: Vec<Arc<CertStore>>,
    /// The config this process started with: what keys a reload cannot change still have.
    started: Config,
}

impl Control {
    /// Takes over publishing `shared`'s snapshot, which must already be `file` with `overrides`
    /// applied.
    pub(crate) fn new(
        shared: Arc<Shared>,
        file: Config,
        overrides: Overrides,
        revision: u64,
        certs: Vec<Arc<CertStore>>,
    ) -> Self {
        if let Some(fleet) = shared.fleet() {
            fleet.applied(revision);
        }
        let started = file.clone();
        Control { shared, running: Mutex::new(Running { file, overrides, revision }), certs, started }
    }

    /// The file config with stored overrides applied, for the first snapshot.
    pub(crate) fn effective(file: &Config, overrides: &mut Overrides) -> Config {
        overrides.apply(file)
    }

    /// The `GET /status` document and its revision.
    pub(crate) async fn status(&self) -> (u64, Value) {
        let running = self.running.lock().await;
        let snapshot = self.shared.snapshot();
        let sessions = self.shared.sessions();
        let overrides = &running.overrides;
        let source = |overridden: bool| if overridden { "admin" } else { "config" };
        let pools: BTreeMap<&str, Value> = PoolName::ALL
            .iter()
            .map(|&pool| {
                let overridden = overrides.weights.get(pool);
                let upstreams: Vec<Value> = snapshot
                    .pool(pool)
                    .upstreams()
                    .iter()
                    .map(|u| {
                        let configured =
                            running.file.pools.get(pool).upstreams.iter().find(|c| &c.name == u.name());
                        json!({
                            "name": u.name(),
                            "url": configured.map(|c| c.url.to_string()),
                            "weight": u.weight(),
                            "weight_source": source(overridden.contains_key(u.name().as_str())),
                            "config_weight": configured.map(|c| c.weight),
                            "healthy": u.is_healthy(),
                        })
                    })
                    .collect();
                (pool.as_str(), json!({ "upstreams": upstreams, "active_pins": sessions.live(pool) }))
            })
            .collect();
        let prefixes: Vec<&str> = running.file.routes.v2_prefixes.iter().map(|p| p.as_str()).collect();
        let status = json!({
            "revision": running.revision,
            "config_file": running.file.source,
            "routes": {
                "v2_prefixes": prefixes,
                "legacy_v1_percent": snapshot.router.legacy_v1_percent().as_f64(),
                "legacy_v1_percent_source": source(overrides.legacy_v1_percent.is_some()),
                "config_legacy_v1_percent": running.file.routes.legacy_v1_percent.as_f64(),
                "pool_header": snapshot.pool_header,
            },
            "pools": pools,
            "sessions": {
                "active": { "v1": sessions.live(PoolName::V1), "v2": sessions.live(PoolName::V2) },
                "max_active": snapshot.pin_policy.max_active,
            },
            "drain": self.shared.drain_status(),
            "restart_required": restart_only_changes(&self.started, &running.file),
        });
        let mut status = status;
        if let Some(fleet) = self.shared.fleet() {
            status["fleet"] = self.fleet_status(fleet, running.revision).await;
        }
        (running.revision, status)
    }

    /// The fleet part of `GET /status`: the revision, and which replicas have applied it.
    async fn fleet_status(&self, fleet: &Fleet, revision: u64) -> Value {
        let now = self.shared.now();
        let replicas = match fleet.replicas(now).await {
            Ok(replicas) => replicas
                .into_iter()
                .map(|(name, applied, at)| {
                    json!({
                        "replica": name,
                        "this": name == fleet.replica(),
                        "revision": applied,
                        "applied": applied == revision,
                        "reported_seconds_ago": now.saturating_sub(at) as f64 / 1000.0,
                    })
                })
                .collect(),
            Err(_) => Vec::new(),
        };
        json!({ "revision": revision, "store_up": fleet.is_up(), "replicas": replicas })
    }

    /// Sets the share of new legacy sessions sent to v1.
    pub(crate) async fn set_legacy_percent(
        &self,
        percent: Percent,
        expected: Option<u64>,
        actor: &Actor,
    ) -> Result<Applied, ControlError> {
        self.legacy_percent(percent, expected, None, actor).await
    }

    /// Sets the share of new legacy sessions sent to v1 for the ramp; in a fleet only while
    /// `lease` (the ramp's) is still the store's.
    pub(crate) async fn set_legacy_percent_leading(
        &self,
        percent: Percent,
        lease: Option<&Lease>,
        actor: &Actor,
    ) -> Result<Applied, ControlError> {
        self.legacy_percent(percent, None, lease, actor).await
    }

    async fn legacy_percent(
        &self,
        percent: Percent,
        expected: Option<u64>,
        lease: Option<&Lease>,
        actor: &Actor,
    ) -> Result<Applied, ControlError> {
        let mut running = self.running.lock().await;
        check_revision(&running, expected)?;
        let old = self.shared.snapshot().router.legacy_v1_percent().as_f64();
        let mut overrides = running.overrides.clone();
        overrides.legacy_v1_percent = Some(percent.as_f64());
        let change = Change::overrides(overrides, "legacy_percent", json!(old), json!(percent.as_f64()));
        self.commit(&mut running, change, lease, actor).await
    }

    /// Sets one upstream's weight.
    pub(crate) async fn set_weight(
        &self,
        pool: &str,
        name: &str,
        weight: u32,
        expected: Option<u64>,
        actor: &Actor,
    ) -> Result<Applied, ControlError> {
        let pool: PoolName = pool.parse().map_err(|_| ControlError::UnknownPool(pool.to_owned()))?;
        if weight > MAX_WEIGHT {
            return Err(ControlError::Invalid {
                field: "weight",
                message: format!("{weight} is over the maximum {MAX_WEIGHT}"),
            });
        }
        let mut running = self.running.lock().await;
        let snapshot = self.shared.snapshot();
        let Some(upstream) = snapshot.pool(pool).upstreams().iter().find(|u| u.name().as_str() == name)
        else {
            return Err(ControlError::UnknownUpstream { pool, name: name.to_owned() });
        };
        check_revision(&running, expected)?;
        let old = upstream.weight();
        let mut overrides = running.overrides.clone();
        overrides.weights.get_mut(pool).insert(name.to_owned(), weight);
        let what = |w: u32| json!({ "pool": pool, "upstream": name, "weight": w });
        self.commit(
            &mut running,
            Change::overrides(overrides, "weight", what(old), what(weight)),
            None,
            actor,
        )
        .await
    }

    /// Drops every override: the config file's values apply again.
    pub(crate) async fn reset_overrides(
        &self,
        expected: Option<u64>,
        actor: &Actor,
    ) -> Result<Applied, ControlError> {
        let mut running = self.running.lock().await;
        check_revision(&running, expected)?;
        let old = serde_json::to_value(&running.overrides).unwrap_or(Value::Null);
        let change = Change::overrides(Overrides::default(), "overrides_reset", old, json!({}));
        self.commit(&mut running, change, None, actor).await
    }

    /// Re-reads the config file. An invalid file changes nothing.
    pub(crate) async fn reload(&self, expected: Option<u64>, actor: &Actor) -> Result<Applied, ControlError> {
        let mut running = self.running.lock().await;
        check_revision(&running, expected)?;
        let result = match &running.file.source {
            None => Err(ControlError::NoConfigFile),
            Some(file) => Config::load(file).map_err(ControlError::Reload),
        };
        // The certificate files are read again too; a bad pair refuses the whole reload.
        let result = result.and_then(|file| {
            self.certs
                .iter()
                .try_for_each(|certs| certs.reload())
                .map(|()| file)
                .map_err(ControlError::Certificate)
        });
        let metrics = self.shared.metrics();
        let file = match result {
            Ok(file) => file,
            Err(err) => {
                metrics.config_reloads.with_label_values(&["error"]).inc();
                warn!(actor = %actor.0, error = %ErrorChain(&err), "config reload refused");
                return Err(err);
            }
        };
        // Against what this process runs, not the file before: a key changed two reloads ago
        // still waits for the restart.
        let restart_required = restart_only_changes(&self.started, &file);
        if !restart_required.is_empty() {
            warn!(keys = ?restart_required, "these config changes take effect only after a restart");
        }
        let source = json!(file.source);
        let change = Change {
            file: Some(file),
            overrides: running.overrides.clone(),
            kind: "reload",
            old: source.clone(),
            new: source,
        };
        let mut applied = self.commit(&mut running, change, None, actor).await;
        let outcome = if applied.is_ok() { "ok" } else { "error" };
        metrics.config_reloads.with_label_values(&[outcome]).inc();
        if let Ok(applied) = &mut applied {
            applied.restart_required = restart_required;
        }
        applied
    }

    /// Ends one session pin.
    pub(crate) async fn delete_session(
        &self,
        key: &str,
        expected: Option<u64>,
        actor: &Actor,
    ) -> Result<Applied, ControlError> {
        if !is_valid_key(key) {
            return Err(ControlError::Invalid {
                field: "key",
                message: format!("{key:?} is not a session key (1-128 of A-Z a-z 0-9 . _ ~ -)"),
            });
        }
        let running = self.running.lock().await;
        check_revision(&running, expected)?;
        // In a fleet the store ends it for every replica (each hears of it from the change
        // stream); the local copy goes at once, as does a pin only this replica knows.
        let in_fleet = match self.shared.fleet() {
            Some(fleet) => fleet.end(key).await.map_err(|_| ControlError::FleetUnavailable)?,
            None => None,
        };
        let pool = self
            .shared
            .sessions()
            .remove(key)
            .or(in_fleet)
            .ok_or_else(|| ControlError::UnknownSession(key.to_owned()))?;
        self.shared.metrics().admin_changes.with_label_values(&["session_delete"]).inc();
        info!(target: "audit", actor = %actor.0, kind = "session_delete", session = key, pool = %pool, revision = running.revision, "admin change");
        // GET /audit needs no token, so the study id stays out of it: the access log's digest.
        let digest = self.shared.sessions().key_digest(key);
        self.shared.journal(&actor.0, "session_delete", format!("session {digest} (was on {pool})"));
        Ok(Applied {
            revision: running.revision,
            old: json!({ "key": key, "pool": pool }),
            new: Value::Null,
            restart_required: Vec::new(),
        })
    }

    /// Stores the change's overrides (and file, if it has one) as the next revision, then
    /// publishes them.
    async fn commit(
        &self,
        running: &mut Running,
        change: Change,
        lease: Option<&Lease>,
        actor: &Actor,
    ) -> Result<Applied, ControlError> {
        let Change { file, mut overrides, kind, old, new } = change;
        let file = file.unwrap_or_else(|| running.file.clone());
        let effective = overrides.apply(&file);
        let json = serde_json::to_vec(&overrides).expect("overrides serialize");
        // In a fleet the change is the fleet's: it goes to the fleet store first, by
        // compare-and-set on the revision, and only then applies here.
        let revision = match self.shared.fleet() {
            None => running.revision + 1,
            Some(fleet) => match fleet.publish_overrides(running.revision, &json, lease).await {
                Ok(Published::Done(revision)) => revision,
                Ok(Published::Fenced) => return Err(ControlError::Fenced),
                // The store lost its data and the replicas have not written theirs back yet
                // (they do within a second): try again then.
                Ok(Published::Stale(current)) if current.revision == 0 => {
                    return Err(ControlError::FleetUnavailable)
                }
                Ok(Published::Stale(current)) => {
                    let expected = running.revision;
                    self.adopt_fleet_overrides(running, current)?;
                    return Err(ControlError::Stale { expected, current: running.revision });
                }
                Err(_) => return Err(ControlError::FleetUnavailable),
            },
        };
        let store = self.shared.store();
        store.send(Op::Overrides { json, revision });
        if !store.flush().await {
            return Err(ControlError::Store);
        }
        let previous = self.shared.snapshot();
        self.shared.swap(Snapshot::build(&effective, self.shared.metrics(), Some(&previous)));
        running.file = file;
        running.overrides = overrides;
        running.revision = revision;
        if let Some(fleet) = self.shared.fleet() {
            fleet.applied(revision);
        }
        self.shared.metrics().admin_changes.with_label_values(&[kind]).inc();
        info!(target: "audit", actor = %actor.0, kind, old = %old, new = %new, revision, "admin change");
        self.shared.journal(&actor.0, kind, format!("{old} -> {new} (revision {revision})"));
        Ok(Applied { revision, old, new, restart_required: Vec::new() })
    }
}

impl Control {
    /// Applies overrides another replica published, and writes this replica's back when the
    /// fleet store lost its data, until `stop`.
    pub(crate) async fn follow_fleet(
        self: Arc<Self>,
        fleet: Arc<Fleet>,
        stop: tokio_util::sync::CancellationToken,
    ) {
        let (mut seen, mut lost) = (fleet.overrides_seen(), fleet.data_lost());
        loop {
            let overrides = tokio::select! {
                _ = stop.cancelled() => return,
                changed = seen.changed() => match changed {
                    Ok(()) => seen.borrow_and_update().clone(),
                    Err(_) => return,
                },
                changed = lost.changed() => match changed {
                    Ok(()) => self.restore_fleet_overrides(&fleet).await,
                    Err(_) => return,
                },
            };
            let Some(overrides) = overrides else { continue };
            let mut running = self.running.lock().await;
            if overrides.revision > running.revision {
                if let Err(err) = self.adopt_fleet_overrides(&mut running, overrides) {
                    warn!(error = %crate::ErrorChain(&err), "could not apply another replica's change");
                }
            }
        }
    }

    /// Writes this replica's overrides and revision back to a fleet store that lost its data,
    /// unless another replica already did; returns what the store holds then.
    async fn restore_fleet_overrides(&self, fleet: &Fleet) -> Option<FleetOverrides> {
        let running = self.running.lock().await;
        let json = serde_json::to_vec(&running.overrides).expect("overrides serialize");
        match fleet.restore_overrides(running.revision, &json).await {
            Ok(held) => Some(held),
            Err(err) => {
                warn!(error = %crate::ErrorChain(&err), "could not write the overrides back to the fleet store");
                None
            }
        }
    }

    /// Makes the fleet's overrides (and revision) this replica's: kept in the local store for a
    /// restart, and published in the snapshot.
    fn adopt_fleet_overrides(
        &self,
        running: &mut Running,
        fleet: FleetOverrides,
    ) -> Result<(), ControlError> {
        let mut overrides: Overrides =
            serde_json::from_slice(&fleet.json).map_err(|e| ControlError::Invalid {
                field: "overrides",
                message: format!("the fleet store holds overrides this version cannot read: {e}"),
            })?;
        let effective = overrides.apply(&running.file);
        self.shared.store().send(Op::Overrides { json: fleet.json, revision: fleet.revision });
        let previous = self.shared.snapshot();
        self.shared.swap(Snapshot::build(&effective, self.shared.metrics(), Some(&previous)));
        let new = serde_json::to_string(&overrides).unwrap_or_default();
        info!(target: "audit", actor = "fleet", kind = "fleet_change", new = %new, revision = fleet.revision, "admin change made on another replica");
        self.shared.journal("fleet", "fleet_change", format!("{new} (revision {})", fleet.revision));
        running.overrides = overrides;
        running.revision = fleet.revision;
        if let Some(link) = self.shared.fleet() {
            link.applied(fleet.revision);
        }
        Ok(())
    }
}

/// One change to the running config, and how its audit line describes it.
struct Change {
    /// A new config file (a reload); `None` keeps the running one.
    file: Option<Config>,
    /// The complete set of overrides after the change.
    overrides: Overrides,
    /// The `kind` label of `rollout_admin_changes_total` and the audit line.
    kind: &'static str,
    old: Value,
    new: Value,
}

impl Change {
    /// A change of the overrides only.
    fn overrides(overrides: Overrides, kind: &'static str, old: Value, new: Value) -> Change {
        Change { file: None, overrides, kind, old, new }
    }
}

impl Control {
    /// Refuses (412) unless the current revision is `expected` (any, if `None`).
    pub(crate) async fn expect_revision(&self, expected: Option<u64>) -> Result<(), ControlError> {
        check_revision(&*self.running.lock().await, expected)
    }
}

fn check_revision(running: &Running, expected: Option<u64>) -> Result<(), ControlError> {
    match expected {
        Some(expected) if expected != running.revision => {
            Err(ControlError::Stale { expected, current: running.revision })
        }
        _ => Ok(()),
    }
}

/// Keys whose new value a reload cannot apply to a running process.
fn restart_only_changes(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut keys = Vec::new();
    let mut check = |changed: bool, key: &'static str| {
        if changed {
            keys.push(key);
        }
    };
    check(old.listen != new.listen, "listen");
    check(old.admin_listen != new.admin_listen, "admin.listen");
    check(old.state_dir != new.state_dir, "state_dir");
    check(old.workers != new.workers, "workers");
    check(old.store != new.store, "store");
    check(old.tls != new.tls, "tls (file paths; the files themselves are re-read)");
    check(old.admin_tls != new.admin_tls, "admin.tls (file paths; the files themselves are re-read)");
    check(
        old.client.header_read_timeout != new.client.header_read_timeout
            || old.client.send_timeout != new.client.send_timeout
            || old.client.max_connections != new.client.max_connections
            || old.client.max_concurrent_streams != new.client.max_concurrent_streams
            || old.client.defer_accept != new.client.defer_accept,
        "client (header_read_timeout, send_timeout, max_connections, max_concurrent_streams, defer_accept)",
    );
    check(old.grace_period != new.grace_period, "shutdown.grace_period");
    check(
        old.upstream.connect_timeout != new.upstream.connect_timeout
            || old.upstream.idle_timeout != new.upstream.idle_timeout
            || old.upstream.max_idle_per_upstream != new.upstream.max_idle_per_upstream
            || old.upstream.max_connections_per_upstream != new.upstream.max_connections_per_upstream,
        "upstream (connect_timeout, idle_timeout, max_idle_per_upstream, max_connections_per_upstream)",
    );
    keys
}
