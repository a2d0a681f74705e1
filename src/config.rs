//! The YAML configuration file: raw serde structs, validation, and the validated [`Config`].
//!
//! Parsing happens in two phases. Serde reads the file into `Raw*` structs that deny unknown keys
//! and fill every default; [`RawConfig::validate`] then turns them into a [`Config`] made of
//! checked newtypes. Every problem of either phase is reported with the file, line and column it
//! comes from, so `rollout-proxy check` can point at the exact spot.
//!
//! YAML parsing stays inside this module (`yaml` below is the only reference to the YAML crate), so
//! moving to a maintained fork is a one-line change. This module does not apply a config to the
//! running proxy; that is [`crate::snapshot`]'s job.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use http::header::HeaderName;
use http::uri::{Authority, Scheme};
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use serde_yaml as yaml;

/// Why a config file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {}", file.display())]
    Read {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}", position(file, source.0.location()))]
    Syntax {
        file: PathBuf,
        #[source]
        source: SyntaxError,
    },
    #[error("{}", invalid_message(file, problems))]
    Invalid { file: PathBuf, problems: Vec<Problem> },
}

/// `file:line:column`, or just the file when the parser gave no position.
fn position(file: &Path, at: Option<yaml::Location>) -> String {
    match at {
        Some(at) => format!("{}:{}:{}", file.display(), at.line(), at.column()),
        None => file.display().to_string(),
    }
}

/// A YAML syntax or type error; its position is shown by [`ConfigError::Syntax`], not repeated.
#[derive(Debug)]
pub struct SyntaxError(yaml::Error);

impl fmt::Display for SyntaxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = self.0.to_string();
        let suffix = self.0.location().map(|at| format!(" at line {} column {}", at.line(), at.column()));
        f.write_str(suffix.and_then(|s| text.strip_suffix(&s).map(str::to_owned)).as_deref().unwrap_or(&text))
    }
}

impl std::error::Error for SyntaxError {}

fn invalid_message(file: &Path, problems: &[Problem]) -> String {
    let lines: Vec<String> = problems
        .iter()
        .map(|p| match p.line {
            Some(line) => {
                format!("{}:{}:{}: {}: {}", file.display(), line, p.column.unwrap_or(1), p.path, p.message)
            }
            None => format!("{}: {}: {}", file.display(), p.path, p.message),
        })
        .collect();
    lines.join("\n")
}

/// One thing wrong with a config value, located in the file when the value appears there.
#[derive(Debug, Clone)]
pub struct Problem {
    /// Dotted key path, e.g. `pools.v1.upstreams[0].url`.
    pub path: KeyPath,
    pub message: String,
    pub line: Option<usize>,
    pub column: Option<usize>,
}

/// A path of mapping keys and sequence indexes into the config document.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyPath(Vec<Segment>);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Key(String),
    Index(usize),
}

impl KeyPath {
    fn key(&self, key: &str) -> KeyPath {
        let mut next = self.clone();
        next.0.push(Segment::Key(key.to_owned()));
        next
    }

    fn index(&self, index: usize) -> KeyPath {
        let mut next = self.clone();
        next.0.push(Segment::Index(index));
        next
    }
}

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, seg) in self.0.iter().enumerate() {
            match seg {
                Segment::Key(k) if i == 0 => write!(f, "{k}")?,
                Segment::Key(k) => write!(f, ".{k}")?,
                Segment::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Raw file format. Every section has container-level defaults, so the parsed value *is* the
// effective configuration that `check` prints.

/// The config file as written, with defaults filled in.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// Data-plane listen address.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Worker threads of the runtime; 0 means one per CPU core.
    #[serde(default)]
    pub workers: usize,
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// TLS on the data-plane listener; plain HTTP when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<RawTls>,
    #[serde(default)]
    pub admin: RawAdmin,
    pub pools: RawPools,
    #[serde(default)]
    pub routes: RawRoutes,
    #[serde(default)]
    pub sessions: RawSessions,
    #[serde(default)]
    pub drain: RawDrain,
    #[serde(default)]
    pub client: RawClient,
    #[serde(default)]
    pub upstream: RawUpstreamSettings,
    #[serde(default)]
    pub shutdown: RawShutdown,
}

fn default_listen() -> String {
    "0.0.0.0:8080".to_owned()
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/rollout-proxy")
}

/// PEM files of the served certificate chain and its private key.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawAdmin {
    pub listen: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
}

impl Default for RawAdmin {
    fn default() -> Self {
        RawAdmin { listen: "127.0.0.1:9901".to_owned(), token_file: None }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawPools {
    pub v1: RawPool,
    pub v2: RawPool,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawPool {
    pub upstreams: Vec<RawUpstream>,
    /// Active health checks; none when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<RawHealth>,
    #[serde(default)]
    pub ejection: RawEjection,
}

/// Active health checks of a pool's upstreams.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawHealth {
    pub path: String,
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Good probes in a row that bring an upstream back.
    pub healthy_threshold: u32,
    /// Failed probes in a row that take an upstream out.
    pub unhealthy_threshold: u32,
}

impl Default for RawHealth {
    fn default() -> Self {
        RawHealth {
            path: "/healthz".to_owned(),
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(2),
            healthy_threshold: 2,
            unhealthy_threshold: 3,
        }
    }
}

/// Passive ejection: an upstream failing real requests in a row is skipped for a while.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawEjection {
    /// Connect errors, closed connections or 502/503/504 answers in a row that eject; 0 turns
    /// ejection off.
    pub consecutive_failures: u32,
    #[serde(with = "humantime_serde")]
    pub duration: Duration,
}

impl Default for RawEjection {
    fn default() -> Self {
        RawEjection { consecutive_failures: 5, duration: Duration::from_secs(30) }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    pub name: String,
    pub url: String,
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_weight() -> u32 {
    1
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawRoutes {
    pub v2_prefixes: Vec<String>,
    pub legacy_v1_percent: f64,
    pub pool_header: bool,
}

impl Default for RawRoutes {
    fn default() -> Self {
        RawRoutes { v2_prefixes: vec!["/api/v2".to_owned()], legacy_v1_percent: 100.0, pool_header: true }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawSessions {
    pub keys: Vec<RawSessionKey>,
    #[serde(with = "humantime_serde")]
    pub max_duration: Duration,
    /// Defaults to `max_duration`.
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<Duration>,
    pub max_active: usize,
}

impl Default for RawSessions {
    fn default() -> Self {
        RawSessions {
            keys: vec![
                RawSessionKey { path: Some("/api/studies/{id}".to_owned()), ..RawSessionKey::default() },
                RawSessionKey { query: Some("studyId".to_owned()), ..RawSessionKey::default() },
            ],
            max_duration: Duration::from_secs(10 * 3600 + 40 * 60),
            idle_timeout: None,
            max_active: 1_000_000,
        }
    }
}

/// One session-key extractor; exactly one of the fields is set.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawSessionKey {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cookie: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawDrain {
    #[serde(with = "humantime_serde")]
    pub quiet_window: Duration,
}

impl Default for RawDrain {
    fn default() -> Self {
        RawDrain { quiet_window: Duration::from_secs(24 * 3600) }
    }
}

/// Limits applied to client connections.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawClient {
    /// Time a client has to send a complete request head (slowloris guard). It also bounds how
    /// long an idle keep-alive connection (HTTP/1.1, or HTTP/2 with no stream open) waits for
    /// its next request.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// How long writing a response to a client may make no progress before both connections
    /// are closed (a client that stops reading).
    #[serde(with = "humantime_serde")]
    pub send_timeout: Duration,
    /// Largest request head (request line plus headers) accepted; larger answers 431.
    pub max_header_bytes: usize,
    /// Most client connections open at once; more are answered 503 and closed.
    pub max_connections: usize,
    /// Most HTTP/2 streams (requests) one client connection may have open at once.
    pub max_concurrent_streams: u32,
    /// Forward request header names that contain `_`. Off by default: backends that map `_` to
    /// `-` would read `Content_Length` or `X_Forwarded_For` as the real thing.
    pub allow_underscores_in_headers: bool,
}

impl Default for RawClient {
    fn default() -> Self {
        RawClient {
            header_read_timeout: Duration::from_secs(10),
            send_timeout: Duration::from_secs(60),
            max_header_bytes: 16 * 1024,
            max_connections: 10_000,
            max_concurrent_streams: 100,
            allow_underscores_in_headers: false,
        }
    }
}

/// Settings for the proxy's connections to upstreams.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawUpstreamSettings {
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Time from sending a request until the upstream's response head arrives.
    #[serde(with = "humantime_serde")]
    pub response_timeout: Duration,
    /// How long an idle keep-alive connection to an upstream is kept.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    pub max_idle_per_upstream: usize,
    /// Most connections open to one upstream at once, both paths together; a request past it
    /// waits up to `connect_timeout` for one to come free, then answers 503 `upstream_busy`.
    pub max_connections_per_upstream: usize,
    /// Further attempts on other upstreams of the same pool when a request could not be
    /// delivered (connect failure; or connection closed before a response head, for
    /// idempotent requests without a body).
    pub retries: u32,
    /// Extra CA certificates (PEM) trusted for `https://` upstreams, besides the Mozilla roots.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
}

impl Default for RawUpstreamSettings {
    fn default() -> Self {
        RawUpstreamSettings {
            connect_timeout: Duration::from_secs(2),
            response_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(90),
            max_idle_per_upstream: 256,
            max_connections_per_upstream: 1024,
            retries: 2,
            ca_file: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawShutdown {
    /// How long a graceful stop waits for in-flight requests before closing them.
    #[serde(with = "humantime_serde")]
    pub grace_period: Duration,
}

impl Default for RawShutdown {
    fn default() -> Self {
        RawShutdown { grace_period: Duration::from_secs(30) }
    }
}

impl From<&Config> for RawConfig {
    /// Writes a validated configuration back in the file's format, every default filled in, for
    /// `check` to print. Reading the result back gives the same [`Config`]; spellings that
    /// validation normalises (a prefix's trailing `/`, a header name's case) come out normalised.
    fn from(config: &Config) -> RawConfig {
        let pool = |pool: &PoolConfig| RawPool {
            upstreams: pool
                .upstreams
                .iter()
                .map(|u| RawUpstream { name: u.name.to_string(), url: u.url.to_string(), weight: u.weight })
                .collect(),
            health: pool.health.as_ref().map(|h| RawHealth {
                path: h.path.clone(),
                interval: h.interval,
                timeout: h.timeout,
                healthy_threshold: h.healthy_threshold,
                unhealthy_threshold: h.unhealthy_threshold,
            }),
            ejection: RawEjection {
                consecutive_failures: pool.ejection.consecutive_failures,
                duration: pool.ejection.duration,
            },
        };
        let session_key = |spec: &SessionKeySpec| match spec {
            SessionKeySpec::Path { template, .. } => {
                RawSessionKey { path: Some(template.clone()), ..RawSessionKey::default() }
            }
            SessionKeySpec::Query(name) => {
                RawSessionKey { query: Some(name.clone()), ..RawSessionKey::default() }
            }
            SessionKeySpec::Header(name) => {
                RawSessionKey { header: Some(name.as_str().to_owned()), ..RawSessionKey::default() }
            }
            SessionKeySpec::Cookie(name) => {
                RawSessionKey { cookie: Some(name.clone()), ..RawSessionKey::default() }
            }
        };
        let sessions = &config.sessions;
        RawConfig {
            listen: config.listen.to_string(),
            workers: config.workers,
            state_dir: config.state_dir.clone(),
            tls: config.tls.as_ref().map(|t| RawTls { cert: t.cert.clone(), key: t.key.clone() }),
            admin: RawAdmin {
                listen: config.admin_listen.to_string(),
                token_file: config.admin_token_file.clone(),
            },
            pools: RawPools { v1: pool(&config.pools.v1), v2: pool(&config.pools.v2) },
            routes: RawRoutes {
                v2_prefixes: config.routes.v2_prefixes.iter().map(|p| p.as_str().to_owned()).collect(),
                legacy_v1_percent: config.routes.legacy_v1_percent.as_f64(),
                pool_header: config.routes.pool_header,
            },
            sessions: RawSessions {
                keys: sessions.keys.iter().map(session_key).collect(),
                max_duration: sessions.max_duration,
                // Written out even where it defaulted to `max_duration`: it is a value in effect.
                idle_timeout: Some(sessions.idle_timeout),
                max_active: sessions.max_active,
            },
            drain: RawDrain { quiet_window: config.quiet_window },
            client: RawClient {
                header_read_timeout: config.client.header_read_timeout,
                send_timeout: config.client.send_timeout,
                max_header_bytes: config.client.max_header_bytes,
                max_connections: config.client.max_connections,
                max_concurrent_streams: config.client.max_concurrent_streams,
                allow_underscores_in_headers: config.client.allow_underscores_in_headers,
            },
            upstream: RawUpstreamSettings {
                connect_timeout: config.upstream.connect_timeout,
                response_timeout: config.upstream.response_timeout,
                idle_timeout: config.upstream.idle_timeout,
                max_idle_per_upstream: config.upstream.max_idle_per_upstream,
                max_connections_per_upstream: config.upstream.max_connections_per_upstream,
                retries: config.upstream.retries,
                ca_file: config.upstream.ca_file.clone(),
            },
            shutdown: RawShutdown { grace_period: config.grace_period },
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Validated configuration.

/// The two pools of a rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PoolName {
    V1,
    V2,
}

impl PoolName {
    pub const ALL: [PoolName; 2] = [PoolName::V1, PoolName::V2];

    pub fn as_str(self) -> &'static str {
        match self {
            PoolName::V1 => "v1",
            PoolName::V2 => "v2",
        }
    }
}

impl fmt::Display for PoolName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for PoolName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl FromStr for PoolName {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "v1" => Ok(PoolName::V1),
            "v2" => Ok(PoolName::V2),
            other => Err(format!("unknown pool {other:?} (pools are v1 and v2)")),
        }
    }
}

/// One value per pool.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ByPool<T> {
    pub v1: T,
    pub v2: T,
}

impl<T> ByPool<T> {
    pub fn get(&self, pool: PoolName) -> &T {
        match pool {
            PoolName::V1 => &self.v1,
            PoolName::V2 => &self.v2,
        }
    }

    pub fn get_mut(&mut self, pool: PoolName) -> &mut T {
        match pool {
            PoolName::V1 => &mut self.v1,
            PoolName::V2 => &mut self.v2,
        }
    }

    pub fn map<U>(&self, mut f: impl FnMut(PoolName, &T) -> U) -> ByPool<U> {
        ByPool { v1: f(PoolName::V1, &self.v1), v2: f(PoolName::V2, &self.v2) }
    }
}

/// An upstream's name: 1–64 bytes of `[A-Za-z0-9._-]`, unique inside its pool.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UpstreamName(std::sync::Arc<str>);

impl UpstreamName {
    pub fn try_new(name: &str) -> Result<Self, String> {
        let ok_len = (1..=64).contains(&name.len());
        let ok_chars = name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if ok_len && ok_chars {
            Ok(UpstreamName(name.into()))
        } else {
            Err(format!("upstream name {name:?} must be 1-64 characters of A-Z a-z 0-9 . _ -"))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Serialize for UpstreamName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl fmt::Display for UpstreamName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A share of legacy traffic, 0–100 %, kept in hundredths of a percent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Percent(u16);

impl Percent {
    pub const ZERO: Percent = Percent(0);
    pub const HUNDRED: Percent = Percent(10_000);

    pub fn try_from_f64(value: f64) -> Result<Self, String> {
        if !value.is_finite() || !(0.0..=100.0).contains(&value) {
            return Err(format!("{value} is not a percentage between 0 and 100"));
        }
        let hundredths = (value * 100.0).round();
        if (hundredths / 100.0 - value).abs() > 1e-9 {
            return Err(format!("{value} has more than two decimal places"));
        }
        Ok(Percent(hundredths as u16))
    }

    /// Hundredths of a percent, 0..=10_000.
    pub fn basis_points(self) -> u16 {
        self.0
    }

    pub fn as_f64(self) -> f64 {
        f64::from(self.0) / 100.0
    }
}

impl fmt::Display for Percent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}%", self.as_f64())
    }
}

/// Where an upstream is reached: an `http://` or `https://` URL without path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamUrl {
    pub scheme: Scheme,
    pub authority: Authority,
}

impl UpstreamUrl {
    pub fn try_parse(url: &str) -> Result<Self, String> {
        let uri: http::Uri = url.parse().map_err(|e| format!("{url:?} is not a URL: {e}"))?;
        let (Some(scheme), Some(authority)) = (uri.scheme(), uri.authority()) else {
            return Err(format!("{url:?} must be an absolute URL like http://10.0.1.11:8080"));
        };
        if scheme != &Scheme::HTTP && scheme != &Scheme::HTTPS {
            return Err(format!("{url:?}: scheme {scheme} is not supported (use http or https)"));
        }
        if authority.as_str().contains('@') {
            return Err(format!("{url:?}: credentials in upstream URLs are not supported"));
        }
        if uri.path() != "/" || uri.query().is_some() {
            return Err(format!(
                "{url:?}: an upstream URL has no path or query; requests keep their own path"
            ));
        }
        Ok(UpstreamUrl { scheme: scheme.clone(), authority: authority.clone() })
    }
}

impl UpstreamUrl {
    pub fn is_tls(&self) -> bool {
        self.scheme == Scheme::HTTPS
    }

    pub fn port(&self) -> u16 {
        self.authority.port_u16().unwrap_or(if self.is_tls() { 443 } else { 80 })
    }
}

impl fmt::Display for UpstreamUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", self.scheme, self.authority)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamConfig {
    pub name: UpstreamName,
    pub url: UpstreamUrl,
    /// Share of new traffic inside the pool; 0 = none.
    pub weight: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PoolConfig {
    pub upstreams: Vec<UpstreamConfig>,
    pub health: Option<HealthCheck>,
    pub ejection: Ejection,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    pub healthy_threshold: u32,
    pub unhealthy_threshold: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Ejection {
    /// 0 = never eject.
    pub consecutive_failures: u32,
    pub duration: Duration,
}

/// A path prefix matched on segment boundaries: `/api/v2` matches `/api/v2` and `/api/v2/x`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prefix(String);

impl Prefix {
    pub fn try_new(prefix: &str) -> Result<Self, String> {
        if !prefix.starts_with('/') {
            return Err(format!("prefix {prefix:?} must start with '/'"));
        }
        if prefix.contains(['?', '#', ' ', '{', '}']) || prefix.contains("//") {
            return Err(format!(
                "prefix {prefix:?} must be a plain path (no '?', '#', '//', spaces or braces)"
            ));
        }
        let trimmed = prefix.trim_end_matches('/');
        if trimmed.is_empty() {
            return Err(
                "prefix \"/\" would send every request to v2; set routes.legacy_v1_percent: 0 instead"
                    .to_owned(),
            );
        }
        Ok(Prefix(trimmed.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct RoutesConfig {
    pub v2_prefixes: Vec<Prefix>,
    pub legacy_v1_percent: Percent,
    pub pool_header: bool,
}

/// How a session key is found in a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionKeySpec {
    /// The segment that stands where `{id}` stands in the template; `segments` is the template
    /// split on `/`, with `None` at the `{id}` position.
    Path {
        template: String,
        segments: Vec<Option<String>>,
    },
    Query(String),
    Header(HeaderName),
    Cookie(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct SessionsConfig {
    pub keys: Vec<SessionKeySpec>,
    pub max_duration: Duration,
    pub idle_timeout: Duration,
    pub max_active: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ClientConfig {
    pub header_read_timeout: Duration,
    pub send_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_connections: usize,
    pub max_concurrent_streams: u32,
    pub allow_underscores_in_headers: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamSettings {
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_idle_per_upstream: usize,
    pub max_connections_per_upstream: usize,
    pub retries: u32,
    pub ca_file: Option<PathBuf>,
}

impl Default for UpstreamSettings {
    fn default() -> Self {
        let raw = RawUpstreamSettings::default();
        UpstreamSettings {
            connect_timeout: raw.connect_timeout,
            response_timeout: raw.response_timeout,
            idle_timeout: raw.idle_timeout,
            max_idle_per_upstream: raw.max_idle_per_upstream,
            max_connections_per_upstream: raw.max_connections_per_upstream,
            retries: raw.retries,
            ca_file: raw.ca_file,
        }
    }
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub workers: usize,
    pub state_dir: PathBuf,
    pub admin_listen: SocketAddr,
    pub admin_token_file: Option<PathBuf>,
    pub pools: ByPool<PoolConfig>,
    pub routes: RoutesConfig,
    pub sessions: SessionsConfig,
    pub quiet_window: Duration,
    pub client: ClientConfig,
    pub upstream: UpstreamSettings,
    pub grace_period: Duration,
    /// Certificate and key files when the data plane speaks TLS.
    pub tls: Option<TlsFiles>,
    /// The file this was read from, for reloads; `None` when built from text.
    pub source: Option<PathBuf>,
}

/// PEM files of the served certificate chain and its private key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(file: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(file)
            .map_err(|source| ConfigError::Read { file: file.to_owned(), source })?;
        let mut config = Config::from_yaml(&text, file)?;
        config.source = Some(file.to_owned());
        Ok(config)
    }

    /// Parses and validates config text; `file` is only used in messages.
    pub fn from_yaml(text: &str, file: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = yaml::from_str(text)
            .map_err(|e| ConfigError::Syntax { file: file.to_owned(), source: SyntaxError(e) })?;
        raw.validate().map_err(|mut problems| {
            for problem in &mut problems {
                locate(text, problem);
            }
            ConfigError::Invalid { file: file.to_owned(), problems }
        })
    }

    /// The effective configuration (defaults filled in) as YAML, in the file's own format: read
    /// back, it gives this same configuration.
    pub fn effective_yaml(&self) -> String {
        yaml::to_string(&RawConfig::from(self)).expect("config serializes")
    }

    /// A copy with different listen addresses, for the demo and tests.
    pub fn with_listeners(mut self, listen: SocketAddr, admin_listen: SocketAddr) -> Config {
        self.listen = listen;
        self.admin_listen = admin_listen;
        self
    }

    /// A copy with a different state directory, for the demo and tests.
    pub fn with_state_dir(mut self, dir: &Path) -> Config {
        self.state_dir = dir.to_owned();
        self
    }

    /// A copy with one upstream's URL replaced, for the demo's stub upstreams.
    pub fn with_upstream_url(mut self, pool: PoolName, index: usize, url: UpstreamUrl) -> Config {
        self.pools.get_mut(pool).upstreams[index].url = url;
        self
    }
}

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

impl RawConfig {
    /// Checks every value and builds the runtime [`Config`]; returns all problems found.
    pub fn validate(&self) -> Result<Config, Vec<Problem>> {
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
        p.check(root.key("drain").key("quiet_window"), bounded(self.drain.quiet_window));
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

        match (listen, admin_listen, legacy_v1_percent, sessions, p.0.is_empty()) {
            (Some(listen), Some(admin_listen), Some(legacy_v1_percent), Some(sessions), true) => Ok(Config {
                listen,
                workers: self.workers,
                state_dir: self.state_dir.clone(),
                admin_listen,
                admin_token_file: self.admin.token_file.clone(),
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
                source: None,
            }),
            _ => Err(p.0),
        }
    }
}

/// Largest weight accepted; keeps the round-robin arithmetic far from overflow.
pub const MAX_WEIGHT: u32 = 10_000;

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

// ---------------------------------------------------------------------------------------------
// Locating a key path in the document.
//
// The YAML parser attaches the position of the node it is reading to any error raised while that
// node is being visited. To find where a key path sits, the document is read once more with a
// visitor that walks the path and fails on the node it names; the error carries the position.
// If a step of the path is absent (a defaulted value), the failure is raised on the deepest
// mapping that does exist, which is the right place to add the key.

fn locate(text: &str, problem: &mut Problem) {
    let seek = Seek { path: &problem.path.0 };
    if let Err(err) = seek.deserialize(yaml::Deserializer::from_str(text)) {
        if let Some(at) = err.location() {
            problem.line = Some(at.line());
            problem.column = Some(at.column());
        }
    }
}

struct Seek<'p> {
    path: &'p [Segment],
}

impl<'de> DeserializeSeed<'de> for Seek<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        match self.path.split_first() {
            None => d.deserialize_any(Found),
            Some((Segment::Key(key), rest)) => d.deserialize_any(SeekKey { key, rest }),
            Some((Segment::Index(index), rest)) => d.deserialize_any(SeekIndex { index: *index, rest }),
        }
    }
}

/// Fails on whatever node it is given, so the error carries that node's position.
struct Found;

impl<'de> Visitor<'de> for Found {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("nothing (this visitor marks a position)")
    }
}

struct SeekKey<'p> {
    key: &'p str,
    rest: &'p [Segment],
}

impl<'de> Visitor<'de> for SeekKey<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "a mapping with key {}", self.key)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key::<yaml::Value>()? {
            if key.as_str() == Some(self.key) {
                return map.next_value_seed(Seek { path: self.rest });
            }
            map.next_value::<IgnoredAny>()?;
        }
        Err(de::Error::custom("key not present"))
    }
}

struct SeekIndex<'p> {
    index: usize,
    rest: &'p [Segment],
}

impl<'de> Visitor<'de> for SeekIndex<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "a sequence with an element {}", self.index)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut i = 0;
        while i < self.index {
            if seq.next_element::<IgnoredAny>()?.is_none() {
                return Err(de::Error::custom("element not present"));
            }
            i += 1;
        }
        match seq.next_element_seed(Seek { path: self.rest })? {
            Some(()) => Ok(()),
            None => Err(de::Error::custom("element not present")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "\
pools:
  v1:
    upstreams:
      - { name: was-1, url: \"http://127.0.0.1:8081\" }
  v2:
    upstreams:
      - name: was-3
        url: \"http://127.0.0.1:8083\"
        weight: 2
";

    fn problems(text: &str) -> String {
        match Config::from_yaml(text, Path::new("t.yaml")) {
            Ok(_) => panic!("config was accepted:\n{text}"),
            Err(e) => crate::ErrorChain(&e).to_string(),
        }
    }

    #[test]
    fn defaults_fill_everything_but_pools() {
        let c = Config::from_yaml(GOOD, Path::new("t.yaml")).unwrap();
        assert_eq!(c.listen, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(c.routes.legacy_v1_percent, Percent::HUNDRED);
        assert_eq!(c.routes.v2_prefixes, vec![Prefix("/api/v2".into())]);
        assert_eq!(c.sessions.max_duration, Duration::from_secs(38_400));
        assert_eq!(c.sessions.idle_timeout, c.sessions.max_duration);
        assert_eq!(c.quiet_window, Duration::from_secs(86_400));
        assert_eq!(c.pools.v2.upstreams[0].weight, 2);
        assert!(c.effective_yaml().contains("legacy_v1_percent: 100"));
    }

    #[test]
    fn effective_yaml_reads_back_as_the_same_config() {
        let text = format!(
            "{GOOD}tls: {{ cert: c.pem, key: k.pem }}\n\
             routes: {{ v2_prefixes: [/a/, /b], legacy_v1_percent: 2.55 }}\n\
             sessions:\n  keys: [{{ header: X-Study }}, {{ cookie: sid }}, {{ path: \"/s/{{id}}\" }}]\n  \
             idle_timeout: 5m\n"
        );
        let config = Config::from_yaml(&text, Path::new("t.yaml")).unwrap();
        let again = Config::from_yaml(&config.effective_yaml(), Path::new("t.yaml")).unwrap();
        assert_eq!(format!("{again:?}"), format!("{config:?}"));
    }

    #[test]
    fn effective_yaml_shows_what_the_with_methods_changed() {
        let url = UpstreamUrl::try_parse("http://127.0.0.1:3").unwrap();
        let config = Config::from_yaml(GOOD, Path::new("t.yaml"))
            .unwrap()
            .with_listeners("127.0.0.1:1".parse().unwrap(), "127.0.0.1:2".parse().unwrap())
            .with_state_dir(Path::new("/tmp/state"))
            .with_upstream_url(PoolName::V2, 0, url);
        let yaml = config.effective_yaml();
        for line in [
            "listen: 127.0.0.1:1\n",
            "  listen: 127.0.0.1:2\n",
            "state_dir: /tmp/state\n",
            "url: http://127.0.0.1:3\n",
        ] {
            assert!(yaml.contains(line), "{line:?} missing from:\n{yaml}");
        }
    }

    #[test]
    fn cross_field_problems_point_at_the_offending_node() {
        let text = GOOD.replace("was-3", "was-1").replace("v1:\n    upstreams:\n      - { name: was-1, url: \"http://127.0.0.1:8081\" }", "v1:\n    upstreams:\n      - { name: a, url: \"http://x:1\" }\n      - { name: a, url: \"http://x:2\" }");
        let msg = problems(&text);
        assert!(msg.contains("t.yaml:5:17: pools.v1.upstreams[1].name: duplicate upstream name"), "{msg}");
    }

    #[test]
    fn empty_pool_points_at_the_list() {
        let msg = problems(
            "pools:\n  v1: { upstreams: [] }\n  v2:\n    upstreams: [{ name: b, url: \"http://x:1\" }]\n",
        );
        assert!(msg.contains("t.yaml:2:20: pools.v1.upstreams: pool has no upstreams"), "{msg}");
    }

    #[test]
    fn absent_keys_point_at_the_enclosing_mapping() {
        let text = format!("{GOOD}sessions:\n  max_duration: 0s\n");
        let msg = problems(&text);
        assert!(msg.contains("t.yaml:11:17: sessions.max_duration: must be longer than 0s"), "{msg}");
        // idle_timeout defaults to max_duration and is not in the file: reported at `sessions`.
        assert!(msg.contains("t.yaml:11:3: sessions.idle_timeout: must be longer than 0s"), "{msg}");
    }

    #[test]
    fn percent_accepts_hundredths_only() {
        assert_eq!(Percent::try_from_f64(2.5).unwrap().basis_points(), 250);
        assert!(Percent::try_from_f64(100.5).is_err());
        assert!(Percent::try_from_f64(0.001).is_err());
        assert!(Percent::try_from_f64(f64::NAN).is_err());
    }

    #[test]
    fn prefixes_are_normalised_and_checked() {
        assert_eq!(Prefix::try_new("/api/v2/").unwrap().as_str(), "/api/v2");
        assert!(Prefix::try_new("api/v2").is_err());
        assert!(Prefix::try_new("/").is_err());
    }

    #[test]
    fn path_templates_need_one_id_segment() {
        let key = |p: &str| session_key(&RawSessionKey { path: Some(p.into()), ..Default::default() });
        assert!(key("/api/studies/{id}").is_ok());
        assert!(key("/api/studies").is_err());
        assert!(key("/api/{id}/x/{id}").is_err());
        assert!(key("/api/s{id}").is_err());
    }
}
