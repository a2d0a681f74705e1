//! The YAML configuration file, and the validated [`Config`] the rest of the proxy runs on.
//!
//! Parsing happens in two phases. Serde reads the file into raw structs that deny unknown keys
//! and fill every default; validation then turns them into a [`Config`] made of checked newtypes
//! ([`PoolName`], [`UpstreamName`], [`Percent`], ...). Every problem of either phase is reported
//! with the file, line and column it comes from, so `rollout-proxy check` can point at the exact
//! spot.
//!
//! - this file: the validated types, [`Config::load`], and [`ConfigError`];
//! - `raw.rs`: the file format as serde reads (and `check` prints) it;
//! - `validate.rs`: raw → validated, collecting every problem under its key path;
//! - `locate.rs`: the line and column of a key path in the text, for the error report.
//!
//! YAML parsing stays inside this module (`yaml` below is the only reference to the YAML crate), so
//! moving to a maintained fork is a one-line change. This module does not apply a config to the
//! running proxy; that is [`crate::snapshot`]'s job.

mod locate;
pub mod ramp;
mod raw;
mod validate;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use http::header::HeaderName;
use http::uri::{Authority, Scheme};
use serde::{Deserialize, Serialize};
use serde_yaml_ng as yaml;

pub(crate) use self::locate::KeyPath;
use self::raw::{RawConfig, RawUpstreamSettings};

/// Why a config file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {}", file.display())]
    Read {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}", position(file, source.at()))]
    Syntax {
        file: PathBuf,
        #[source]
        source: SyntaxError,
    },
    #[error("{}", invalid_message(file, problems))]
    Invalid { file: PathBuf, problems: Vec<Problem> },
}

/// `file:line:column`, or just the file when the parser gave no position.
fn position(file: &Path, at: Option<(usize, usize)>) -> String {
    match at {
        Some((line, column)) => format!("{}:{line}:{column}", file.display()),
        None => file.display().to_string(),
    }
}

/// A YAML syntax or type error; its position is shown by [`ConfigError::Syntax`], not repeated.
#[derive(Debug)]
pub struct SyntaxError {
    error: yaml::Error,
    /// Where the error is, when that is not where the parser says (a duplicate key, which
    /// it places at the start of the mapping).
    at: Option<(usize, usize)>,
}

impl SyntaxError {
    /// `text`'s error `error`, placed at the duplicate key it names, if it names one.
    fn new(error: yaml::Error, text: &str) -> SyntaxError {
        let at = locate::duplicate(text, &error.to_string());
        SyntaxError { error, at }
    }

    fn at(&self) -> Option<(usize, usize)> {
        self.at.or_else(|| self.error.location().map(|at| (at.line(), at.column())))
    }
}

impl fmt::Display for SyntaxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The parser names the error's own position inside its message (at the end, or before
        // ", while ..."); other positions it names (where a scalar began) stay.
        let text = self.error.to_string();
        match self.error.location() {
            Some(at) => {
                f.write_str(&text.replacen(&format!(" at line {} column {}", at.line(), at.column()), "", 1))
            }
            None => f.write_str(&text),
        }
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

/// The two pools of a rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PoolName {
    V1,
    V2,
}

impl PoolName {
    pub(crate) const ALL: [PoolName; 2] = [PoolName::V1, PoolName::V2];

    pub(crate) fn as_str(self) -> &'static str {
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
    pub(crate) fn get(&self, pool: PoolName) -> &T {
        match pool {
            PoolName::V1 => &self.v1,
            PoolName::V2 => &self.v2,
        }
    }

    pub(crate) fn get_mut(&mut self, pool: PoolName) -> &mut T {
        match pool {
            PoolName::V1 => &mut self.v1,
            PoolName::V2 => &mut self.v2,
        }
    }

    pub(crate) fn map<U>(&self, mut f: impl FnMut(PoolName, &T) -> U) -> ByPool<U> {
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

    pub(crate) fn as_str(&self) -> &str {
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
    #[cfg(test)]
    pub(crate) const ZERO: Percent = Percent(0);
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
    pub(crate) fn basis_points(self) -> u16 {
        self.0
    }

    pub(crate) fn as_f64(self) -> f64 {
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
    pub(crate) fn is_tls(&self) -> bool {
        self.scheme == Scheme::HTTPS
    }

    pub(crate) fn port(&self) -> u16 {
        self.authority.port_u16().unwrap_or(if self.is_tls() { 443 } else { 80 })
    }
}

impl fmt::Display for UpstreamUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", self.scheme, self.authority)
    }
}

/// Largest weight accepted; keeps the round-robin arithmetic far from overflow.
pub(crate) const MAX_WEIGHT: u32 = 10_000;

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

    pub(crate) fn as_str(&self) -> &str {
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
    pub defer_accept: bool,
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
    /// The admin listener's certificate: it serves HTTPS when set.
    pub admin_tls: Option<TlsFiles>,
    /// `log.access`: one log line per request (target `access`).
    pub access_log: bool,
    pub pools: ByPool<PoolConfig>,
    pub routes: RoutesConfig,
    pub sessions: SessionsConfig,
    pub quiet_window: Duration,
    pub client: ClientConfig,
    pub upstream: UpstreamSettings,
    pub grace_period: Duration,
    /// Certificate and key files when the data plane speaks TLS.
    pub tls: Option<TlsFiles>,
    pub store: StoreConfig,
    /// An automated ramp to start when the proxy starts with none stored (a stored ramp, and
    /// one sent to `PUT /ramp`, win over it).
    pub ramp: Option<ramp::Plan>,
    /// The file this was read from, for reloads; `None` when built from text.
    pub source: Option<PathBuf>,
}

/// Where pins, the drain clock and operator changes are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreConfig {
    /// One replica: redb in `state_dir`.
    Embedded,
    /// A fleet of replicas sharing one Redis (or Valkey); `state_dir` keeps the local copy.
    Redis(FleetConfig),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetConfig {
    /// `redis://` or `rediss://` (TLS), with the database number.
    pub url: String,
    /// Prefix of every key, so fleets can share one server.
    pub namespace: String,
    pub on_store_error: OnStoreError,
    /// How long a replica leads the ramp without renewing its lease in the store: when the
    /// leader dies, another replica takes the ramp over within this.
    pub leader_lease: Duration,
}

/// What a replica does with a new session while the fleet store is unreachable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnStoreError {
    /// Pin it by the split, locally; it reaches the store when the store is back.
    Degrade,
    /// Refuse it (503 `store_unavailable`); known sessions are still served.
    FailClosed,
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
            .map_err(|e| ConfigError::Syntax { file: file.to_owned(), source: SyntaxError::new(e, text) })?;
        raw.validate().map_err(|mut problems| {
            for problem in &mut problems {
                locate::problem(text, problem);
            }
            ConfigError::Invalid { file: file.to_owned(), problems }
        })
    }

    /// Reads a ramp plan for `ctl ramp start`: YAML (or JSON), the plan itself or a document
    /// with the plan under `ramp:` (a config file). The server checks it when it arrives.
    pub fn ramp_plan_from_yaml(text: &str, file: &Path) -> Result<ramp::RawPlan, ConfigError> {
        let syntax = |e| ConfigError::Syntax { file: file.to_owned(), source: SyntaxError::new(e, text) };
        let mut document: yaml::Value = yaml::from_str(text).map_err(syntax)?;
        if let Some(plan) = document.get_mut("ramp") {
            document = std::mem::replace(plan, yaml::Value::Null);
        }
        yaml::from_value(document).map_err(syntax)
    }

    /// The effective configuration (defaults filled in) as YAML, in the file's own format: read
    /// back, it gives this same configuration.
    pub fn effective_yaml(&self) -> String {
        yaml::to_string(&RawConfig::from(self)).expect("config serializes")
    }

    /// A copy with different listen addresses, for the demo and tests.
    pub(crate) fn with_listeners(mut self, listen: SocketAddr, admin_listen: SocketAddr) -> Config {
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
    pub(crate) fn with_upstream_url(mut self, pool: PoolName, index: usize, url: UpstreamUrl) -> Config {
        self.pools.get_mut(pool).upstreams[index].url = url;
        self
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
}
