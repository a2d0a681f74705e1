//! Raw → validated: checks every value of a [`RawConfig`] and builds the runtime [`Config`].
//!
//! Every problem is collected under the key path it concerns, so `check` reports them all at
//! once. Rules that one value follows on its own live with its newtype in the parent module
//! ([`Percent::try_from_f64`], [`UpstreamUrl::try_parse`], ...); this is where values meet each
//! other and the bounds of each setting are decided. Finding a problem's line and column in the
//! text is `locate.rs`'s job.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use http::header::HeaderName;

use super::ramp::Plan;
use super::raw::{RawBackend, RawConfig, RawOnStoreError, RawPool, RawSessionKey, RawSessions, RawStore};
use super::{
    ByPool, ClientConfig, Config, Ejection, FleetConfig, HealthCheck, KeyPath, OnStoreError, Percent,
    PoolConfig, Prefix, Problem, RoutesConfig, SessionKeySpec, SessionsConfig, StoreConfig, TlsFiles,
    UpstreamConfig, UpstreamName, UpstreamSettings, UpstreamUrl, MAX_WEIGHT,
};

/// Collects problems during validation, each under its key path.
#[derive(Default)]
struct Problems(Vec<Problem>);

impl Problems {
    fn add(&mut self, path: KeyPath, message: impl Into<String>) {
        self.0.push(Problem { path, message: message.into(), line: None, column: None });
    }

    fn check<T>(&mut self, path: KeyPath, result: Result<T, String>) -> Option<T> {
        match result {
            Ok(v) => Some(v),
            Err(message) => {
                self.add(path, message);
                None
            }
        }
    }
}

fn socket_addr(value: &str) -> Result<SocketAddr, String> {
    value.parse().map_err(|_| format!("{value:?} is not an IP:port address (e.g. 0.0.0.0:8080)"))
}

/// Longest duration accepted anywhere: ten years, far below where time arithmetic could wrap.
const MAX_DURATION: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

fn positive(value: Duration) -> Result<Duration, String> {
    if value.is_zero() {
        Err("must be longer than 0s".to_owned())
    } else {
        bounded(value)
    }
}

fn bounded(value: Duration) -> Result<Duration, String> {
    if value > MAX_DURATION {
        Err(format!("{} is longer than the maximum of 10 years", humantime::format_duration(value)))
    } else {
        Ok(value)
    }
}

/// Shortest and longest passive ejection. A shorter one barely spares the upstream a request, so
/// it is more likely a slip (`30ms` for `30s`) than a choice. A longer one outlives its cause:
/// without active health checks nothing brings the upstream back early, so it quietly takes
/// capacity out; keeping an upstream out on purpose is what weight 0 is for.
const MIN_EJECTION: Duration = Duration::from_secs(1);
const MAX_EJECTION: Duration = Duration::from_secs(3600);

fn ejection_duration(value: Duration) -> Result<Duration, String> {
    let show = humantime::format_duration;
    if value < MIN_EJECTION {
        Err(format!("{} is shorter than the minimum of {}", show(value), show(MIN_EJECTION)))
    } else if value > MAX_EJECTION {
        Err(format!("{} is longer than the maximum of {}", show(value), show(MAX_EJECTION)))
    } else {
        Ok(value)
    }
}

impl RawConfig {
    /// Checks every value and builds the runtime [`Config`]; returns all problems found.
    pub(crate) fn validate(&self) -> Result<Config, Vec<Problem>> {
        let root = KeyPath::default();
        let mut p = Problems::default();

        let listen = p.check(root.key("listen"), socket_addr(&self.listen));
        let admin_listen = p.check(root.key("admin").key("listen"), socket_addr(&self.admin.listen));
        if self.workers > 1024 {
            p.add(root.key("workers"), format!("{} worker threads is more than 1024", self.workers));
        }

        let pools_path = root.key("pools");
        let v1 = validate_pool(&self.pools.v1, &pools_path.key("v1"), &mut p);
        let v2 = validate_pool(&self.pools.v2, &pools_path.key("v2"), &mut p);

        let routes_path = root.key("routes");
        let mut v2_prefixes = Vec::new();
        for (i, prefix) in self.routes.v2_prefixes.iter().enumerate() {
            if let Some(prefix) = p.check(routes_path.key("v2_prefixes").index(i), Prefix::try_new(prefix)) {
                v2_prefixes.push(prefix);
            }
        }
        let legacy_v1_percent = p.check(
            routes_path.key("legacy_v1_percent"),
            Percent::try_from_f64(self.routes.legacy_v1_percent),
        );

        let sessions = validate_sessions(&self.sessions, &root.key("sessions"), &mut p);
        if !self.client.allow_underscores_in_headers {
            for (i, key) in self.sessions.keys.iter().enumerate() {
                if let Some(name) = key.header.as_deref().filter(|name| name.contains('_')) {
                    p.add(
                        root.key("sessions").key("keys").index(i).key("header"),
                        format!(
                            "{name:?} contains '_', and request headers with '_' are dropped; \
                             rename it or set client.allow_underscores_in_headers: true"
                        ),
                    );
                }
            }
        }
        // Zero would call v1 drained the moment its last pin ended, with no wait for a straggler.
        p.check(root.key("drain").key("quiet_window"), positive(self.drain.quiet_window));
        p.check(root.key("shutdown").key("grace_period"), bounded(self.shutdown.grace_period));
        p.check(root.key("upstream").key("idle_timeout"), bounded(self.upstream.idle_timeout));

        let client_path = root.key("client");
        p.check(client_path.key("header_read_timeout"), positive(self.client.header_read_timeout));
        p.check(client_path.key("send_timeout"), positive(self.client.send_timeout));
        if !(1..=10_000).contains(&self.client.max_concurrent_streams) {
            p.add(
                client_path.key("max_concurrent_streams"),
                format!("{} is outside 1..=10000", self.client.max_concurrent_streams),
            );
        }
        if !(1024..=1024 * 1024).contains(&self.client.max_header_bytes) {
            p.add(
                client_path.key("max_header_bytes"),
                format!("{} is outside 1024..=1048576 bytes", self.client.max_header_bytes),
            );
        }
        if self.client.max_connections == 0 {
            p.add(client_path.key("max_connections"), "must be at least 1");
        }
        let upstream_path = root.key("upstream");
        p.check(upstream_path.key("connect_timeout"), positive(self.upstream.connect_timeout));
        p.check(upstream_path.key("response_timeout"), positive(self.upstream.response_timeout));
        if self.upstream.max_connections_per_upstream == 0 {
            p.add(upstream_path.key("max_connections_per_upstream"), "must be at least 1");
        }
        if self.upstream.retries > 10 {
            p.add(upstream_path.key("retries"), format!("{} retries is more than 10", self.upstream.retries));
        }

        let store = validate_store(&self.store, &root.key("store"), &mut p);
        let ramp = self.ramp.clone().and_then(|plan| match Plan::try_from_raw(plan, "ramp") {
            Ok(plan) => Some(plan),
            Err(problem) => {
                p.add(key_path(&problem.field), problem.problem);
                None
            }
        });

        match (listen, admin_listen, legacy_v1_percent, sessions, p.0.is_empty()) {
            (Some(listen), Some(admin_listen), Some(legacy_v1_percent), Some(sessions), true) => Ok(Config {
                listen,
                workers: self.workers,
                state_dir: self.state_dir.clone(),
                admin_listen,
                admin_token_file: self.admin.token_file.clone(),
                admin_tls: self
                    .admin
                    .tls
                    .as_ref()
                    .map(|t| TlsFiles { cert: t.cert.clone(), key: t.key.clone() }),
                pools: ByPool { v1, v2 },
                routes: RoutesConfig { v2_prefixes, legacy_v1_percent, pool_header: self.routes.pool_header },
                sessions,
                quiet_window: self.drain.quiet_window,
                client: ClientConfig {
                    header_read_timeout: self.client.header_read_timeout,
                    send_timeout: self.client.send_timeout,
                    max_header_bytes: self.client.max_header_bytes,
                    max_connections: self.client.max_connections,
                    max_concurrent_streams: self.client.max_concurrent_streams,
                    allow_underscores_in_headers: self.client.allow_underscores_in_headers,
                    defer_accept: self.client.defer_accept,
                },
                upstream: UpstreamSettings {
                    connect_timeout: self.upstream.connect_timeout,
                    response_timeout: self.upstream.response_timeout,
                    idle_timeout: self.upstream.idle_timeout,
                    max_idle_per_upstream: self.upstream.max_idle_per_upstream,
                    max_connections_per_upstream: self.upstream.max_connections_per_upstream,
                    retries: self.upstream.retries,
                    ca_file: self.upstream.ca_file.clone(),
                },
                tls: self.tls.as_ref().map(|t| TlsFiles { cert: t.cert.clone(), key: t.key.clone() }),
                grace_period: self.shutdown.grace_period,
                access_log: self.log.access,
                store,
                ramp,
                source: None,
            }),
            _ => Err(p.0),
        }
    }
}

/// The key path a ramp plan's field names (`ramp.steps[1].hold`), for locating it in the file.
fn key_path(dotted: &str) -> KeyPath {
    let mut path = KeyPath::default();
    for part in dotted.split('.') {
        let (key, indexes) = part.split_once('[').map_or((part, ""), |(k, rest)| (k, rest));
        path = path.key(key);
        for index in indexes.split('[').filter_map(|i| i.trim_end_matches(']').parse().ok()) {
            path = path.index(index);
        }
    }
    path
}

/// The ramp leader's lease: renewed every second, so two seconds are the least that survive one
/// slow renewal; longer than a few minutes would leave a ramp without a driver for that long.
const MIN_LEADER_LEASE: Duration = Duration::from_secs(2);
const MAX_LEADER_LEASE: Duration = Duration::from_secs(300);

fn validate_store(raw: &RawStore, path: &KeyPath, p: &mut Problems) -> StoreConfig {
    let namespace_ok = !raw.namespace.is_empty()
        && raw.namespace.len() <= 64
        && raw.namespace.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if !namespace_ok {
        p.add(path.key("namespace"), format!("{:?} is not 1-64 characters of [A-Za-z0-9._-]", raw.namespace));
    }
    match (raw.backend, &raw.url) {
        (RawBackend::Embedded, None) => StoreConfig::Embedded,
        (RawBackend::Embedded, Some(_)) => {
            p.add(path.key("url"), "only the redis backend takes a url; set backend: redis or remove it");
            StoreConfig::Embedded
        }
        (RawBackend::Redis, None) => {
            p.add(path.key("url"), "the redis backend needs a url, e.g. redis://127.0.0.1:6379/0");
            StoreConfig::Embedded
        }
        (RawBackend::Redis, Some(url)) => {
            if let Err(problem) = check_redis_url(url) {
                p.add(path.key("url"), problem);
            }
            if !(MIN_LEADER_LEASE..=MAX_LEADER_LEASE).contains(&raw.leader_lease) {
                p.add(
                    path.key("leader_lease"),
                    format!(
                        "{} is not between {} and {}",
                        humantime::format_duration(raw.leader_lease),
                        humantime::format_duration(MIN_LEADER_LEASE),
                        humantime::format_duration(MAX_LEADER_LEASE)
                    ),
                );
            }
            StoreConfig::Redis(FleetConfig {
                url: url.clone(),
                namespace: raw.namespace.clone(),
                on_store_error: match raw.on_store_error {
                    RawOnStoreError::Degrade => OnStoreError::Degrade,
                    RawOnStoreError::FailClosed => OnStoreError::FailClosed,
                },
                leader_lease: raw.leader_lease,
            })
        }
    }
}

/// A Redis URL the client can use: `redis://` or `rediss://`, a host, a database number if any.
fn check_redis_url(url: &str) -> Result<(), String> {
    let shown = redact(url);
    let rest = url
        .strip_prefix("redis://")
        .or_else(|| url.strip_prefix("rediss://"))
        .ok_or_else(|| format!("{shown} is not a redis:// or rediss:// URL"))?;
    let host = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
    if host.is_empty() || host.starts_with('/') || host.starts_with(':') {
        return Err(format!("{shown} names no host"));
    }
    redis::Client::open(url).map(drop).map_err(|e| format!("{shown}: {e}"))
}

/// A URL as it may appear in a message: without its password.
fn redact(url: &str) -> String {
    match url.split_once("://").and_then(|(scheme, rest)| Some((scheme, rest.rsplit_once('@')?))) {
        Some((scheme, (_, host))) => format!("{scheme}://***@{host}"),
        None => url.to_owned(),
    }
}

fn validate_pool(raw: &RawPool, path: &KeyPath, p: &mut Problems) -> PoolConfig {
    let list_path = path.key("upstreams");
    if raw.upstreams.is_empty() {
        p.add(list_path.clone(), "pool has no upstreams; list at least one");
    }
    let mut seen = HashSet::new();
    let mut upstreams = Vec::new();
    for (i, u) in raw.upstreams.iter().enumerate() {
        let at = list_path.index(i);
        let name = p.check(at.key("name"), UpstreamName::try_new(&u.name));
        if !seen.insert(u.name.as_str()) {
            p.add(at.key("name"), format!("duplicate upstream name {:?} in this pool", u.name));
        }
        let url = p.check(at.key("url"), UpstreamUrl::try_parse(&u.url));
        if u.weight > MAX_WEIGHT {
            p.add(at.key("weight"), format!("weight {} is over the maximum {MAX_WEIGHT}", u.weight));
        }
        if let (Some(name), Some(url)) = (name, url) {
            upstreams.push(UpstreamConfig { name, url, weight: u.weight });
        }
    }
    let health = raw.health.as_ref().and_then(|h| {
        let at = path.key("health");
        let checked = (
            p.check(at.key("path"), health_path(&h.path)),
            p.check(at.key("interval"), positive(h.interval)),
            p.check(at.key("timeout"), positive(h.timeout)),
            p.check(at.key("healthy_threshold"), at_least_one(h.healthy_threshold)),
            p.check(at.key("unhealthy_threshold"), at_least_one(h.unhealthy_threshold)),
        );
        match checked {
            (
                Some(path),
                Some(interval),
                Some(timeout),
                Some(healthy_threshold),
                Some(unhealthy_threshold),
            ) => Some(HealthCheck { path, interval, timeout, healthy_threshold, unhealthy_threshold }),
            _ => None,
        }
    });
    p.check(path.key("ejection").key("duration"), ejection_duration(raw.ejection.duration));
    let ejection =
        Ejection { consecutive_failures: raw.ejection.consecutive_failures, duration: raw.ejection.duration };
    PoolConfig { upstreams, health, ejection }
}

fn health_path(path: &str) -> Result<String, String> {
    match path.parse::<http::uri::PathAndQuery>() {
        Ok(pq) if path.starts_with('/') => Ok(pq.as_str().to_owned()),
        _ => Err(format!("health check path {path:?} must be a path starting with '/'")),
    }
}

fn at_least_one(n: u32) -> Result<u32, String> {
    if n == 0 {
        Err("must be at least 1".to_owned())
    } else {
        Ok(n)
    }
}

fn validate_sessions(raw: &RawSessions, path: &KeyPath, p: &mut Problems) -> Option<SessionsConfig> {
    let mut keys = Vec::new();
    for (i, key) in raw.keys.iter().enumerate() {
        if let Some(spec) = p.check(path.key("keys").index(i), session_key(key)) {
            keys.push(spec);
        }
    }
    let max_duration = p.check(path.key("max_duration"), positive(raw.max_duration));
    let idle_timeout =
        p.check(path.key("idle_timeout"), positive(raw.idle_timeout.unwrap_or(raw.max_duration)));
    if raw.idle_timeout.is_some_and(|idle| idle > raw.max_duration) {
        p.add(
            path.key("idle_timeout"),
            format!(
                "{} is longer than max_duration ({}), so it would never end a session; shorten it or drop it",
                humantime::format_duration(raw.idle_timeout.unwrap_or_default()),
                humantime::format_duration(raw.max_duration)
            ),
        );
    }
    if raw.max_active == 0 {
        p.add(path.key("max_active"), "must be at least 1");
    }
    Some(SessionsConfig {
        keys,
        max_duration: max_duration?,
        idle_timeout: idle_timeout?,
        max_active: raw.max_active,
    })
}

fn session_key(raw: &RawSessionKey) -> Result<SessionKeySpec, String> {
    let set = [&raw.path, &raw.query, &raw.header, &raw.cookie].iter().filter(|v| v.is_some()).count();
    if set != 1 {
        return Err("a session key sets exactly one of path, query, header, cookie".to_owned());
    }
    if let Some(template) = &raw.path {
        if !template.starts_with('/') {
            return Err(format!("path template {template:?} must start with '/'"));
        }
        let segments: Vec<Option<String>> = template
            .trim_end_matches('/')
            .split('/')
            .skip(1)
            .map(|seg| if seg == "{id}" { None } else { Some(seg.to_owned()) })
            .collect();
        let ids = segments.iter().filter(|s| s.is_none()).count();
        if ids != 1 || segments.iter().flatten().any(|s| s.contains(['{', '}'])) {
            return Err(format!("path template {template:?} must contain exactly one whole segment {{id}}"));
        }
        return Ok(SessionKeySpec::Path { template: template.clone(), segments });
    }
    if let Some(name) = &raw.query {
        if name.is_empty() || name.contains(['&', '=', '#']) {
            return Err(format!("query parameter name {name:?} is empty or contains '&', '=' or '#'"));
        }
        return Ok(SessionKeySpec::Query(name.clone()));
    }
    if let Some(name) = &raw.header {
        let header =
            HeaderName::from_str(name).map_err(|_| format!("{name:?} is not a valid header name"))?;
        return Ok(SessionKeySpec::Header(header));
    }
    let name = raw.cookie.as_deref().unwrap_or_default();
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b))
    {
        return Err(format!("{name:?} is not a valid cookie name"));
    }
    Ok(SessionKeySpec::Cookie(name.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_templates_need_one_id_segment() {
        let key = |p: &str| session_key(&RawSessionKey { path: Some(p.into()), ..Default::default() });
        assert!(key("/api/studies/{id}").is_ok());
        assert!(key("/api/studies").is_err());
        assert!(key("/api/{id}/x/{id}").is_err());
        assert!(key("/api/s{id}").is_err());
    }
}
