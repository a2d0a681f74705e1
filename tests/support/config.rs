//! Config files for tests, built from structured parts instead of edited text.
//!
//! A test names what it needs (upstreams with weights, a health check on one pool, an admin
//! token file...) and [`ConfigBuilder::render`] writes the YAML the proxy parses. Tests that
//! *mean* to write broken or hand-made text (`tests/check.rs`) keep their text and change it
//! with [`edit`], which fails loudly when the text it expects is not there.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Replaces every `from` in `text` with `to`, panicking if `text` has no `from`: a
/// `str::replace` whose pattern went stale would silently test the unedited text.
pub fn edit(text: &str, from: &str, to: &str) -> String {
    assert!(text.contains(from), "edit: {from:?} is not in the text:\n{text}");
    text.replace(from, to)
}

/// One of the two pools.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pool {
    V1,
    V2,
}

/// `pools.*.health`: active checks. [`Health::fast`] is what the fault tests use.
#[derive(Debug, Clone)]
pub struct Health {
    pub path: &'static str,
    pub interval: Duration,
    pub timeout: Duration,
    pub healthy_threshold: u32,
    pub unhealthy_threshold: u32,
}

impl Health {
    /// A probe of `/healthz` every 200 ms; two results in a row change an upstream's state.
    pub fn fast() -> Health {
        Health {
            path: "/healthz",
            interval: Duration::from_millis(200),
            timeout: Duration::from_millis(200),
            healthy_threshold: 2,
            unhealthy_threshold: 2,
        }
    }
}

/// `pools.*.ejection`: passive ejection after failures on real traffic.
#[derive(Debug, Clone)]
pub struct Ejection {
    pub consecutive_failures: u32,
    /// The proxy's default when `None`.
    pub duration: Option<Duration>,
}

impl Ejection {
    /// Ejected for `duration` after `failures` failures in a row.
    pub fn after(failures: u32, duration: Duration) -> Ejection {
        Ejection { consecutive_failures: failures, duration: Some(duration) }
    }

    /// Never ejected by real traffic.
    pub fn off() -> Ejection {
        Ejection { consecutive_failures: 0, duration: None }
    }
}

/// Where a session key comes from (`sessions.keys`).
#[derive(Debug, Clone)]
pub enum SessionKey {
    /// A path template with one `{id}`-style placeholder.
    Path(&'static str),
    Query(&'static str),
    Header(&'static str),
    Cookie(&'static str),
}

/// `sessions`; fields left `None`/empty keep the proxy's defaults.
#[derive(Debug, Clone, Default)]
pub struct Sessions {
    pub keys: Vec<SessionKey>,
    pub idle_timeout: Option<Duration>,
    pub max_duration: Option<Duration>,
    pub max_active: Option<usize>,
}

/// `client`; fields left `None` keep the proxy's defaults.
#[derive(Debug, Clone, Default)]
pub struct ClientSettings {
    pub header_read_timeout: Option<Duration>,
    pub send_timeout: Option<Duration>,
    pub max_header_bytes: Option<usize>,
    pub max_connections: Option<usize>,
    pub max_concurrent_streams: Option<u32>,
    pub allow_underscores_in_headers: Option<bool>,
    pub defer_accept: Option<bool>,
}

/// `upstream` (settings for every upstream); fields left `None` keep the proxy's defaults.
#[derive(Debug, Clone, Default)]
pub struct UpstreamSettings {
    pub connect_timeout: Option<Duration>,
    pub response_timeout: Option<Duration>,
    pub max_connections_per_upstream: Option<usize>,
    pub retries: Option<u32>,
    pub ca_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Default)]
struct PoolSpec {
    /// (name, url, weight)
    upstreams: Vec<(String, String, u32)>,
    health: Option<Health>,
    ejection: Option<Ejection>,
}

/// A proxy config: both listeners on `127.0.0.1:0` and empty pools until told otherwise.
#[derive(Debug, Clone)]
pub struct ConfigBuilder {
    listen: String,
    admin_listen: String,
    token_file: Option<PathBuf>,
    v1: PoolSpec,
    v2: PoolSpec,
    v2_prefixes: Option<Vec<String>>,
    legacy_v1_percent: Option<f64>,
    pool_header: Option<bool>,
    sessions: Option<Sessions>,
    quiet_window: Option<Duration>,
    client: Option<ClientSettings>,
    upstream: Option<UpstreamSettings>,
    grace_period: Option<Duration>,
    workers: Option<usize>,
    tls: Option<(PathBuf, PathBuf)>,
    admin_tls: Option<(PathBuf, PathBuf)>,
    state_dir: Option<PathBuf>,
    /// Top-level sections written as given, after the others.
    extra: Vec<(String, String)>,
}

impl Default for ConfigBuilder {
    fn default() -> Self {
        ConfigBuilder::new()
    }
}

impl ConfigBuilder {
    pub fn new() -> ConfigBuilder {
        ConfigBuilder {
            listen: "127.0.0.1:0".to_owned(),
            admin_listen: "127.0.0.1:0".to_owned(),
            token_file: None,
            v1: PoolSpec::default(),
            v2: PoolSpec::default(),
            v2_prefixes: None,
            legacy_v1_percent: None,
            pool_header: None,
            sessions: None,
            quiet_window: None,
            client: None,
            upstream: None,
            grace_period: None,
            workers: None,
            tls: None,
            admin_tls: None,
            state_dir: None,
            extra: Vec::new(),
        }
    }

    /// The common shape: one upstream in each pool, `v1-a` at `v1` and `v2-a` at `v2`.
    pub fn one_each(v1: SocketAddr, v2: SocketAddr) -> ConfigBuilder {
        ConfigBuilder::new().v1("v1-a", v1, 1).v2("v2-a", v2, 1)
    }

    fn pool(&mut self, pool: Pool) -> &mut PoolSpec {
        match pool {
            Pool::V1 => &mut self.v1,
            Pool::V2 => &mut self.v2,
        }
    }

    /// Adds a plain-HTTP upstream at `addr` to the v1 pool.
    pub fn v1(self, name: &str, addr: SocketAddr, weight: u32) -> Self {
        self.upstream(Pool::V1, name, &format!("http://{addr}"), weight)
    }

    /// Adds a plain-HTTP upstream at `addr` to the v2 pool.
    pub fn v2(self, name: &str, addr: SocketAddr, weight: u32) -> Self {
        self.upstream(Pool::V2, name, &format!("http://{addr}"), weight)
    }

    /// Adds an upstream with any URL (an `https://` one, say) to `pool`.
    pub fn upstream(mut self, pool: Pool, name: &str, url: &str, weight: u32) -> Self {
        self.pool(pool).upstreams.push((name.to_owned(), url.to_owned(), weight));
        self
    }

    pub fn health(mut self, pool: Pool, health: Health) -> Self {
        self.pool(pool).health = Some(health);
        self
    }

    pub fn ejection(mut self, pool: Pool, ejection: Ejection) -> Self {
        self.pool(pool).ejection = Some(ejection);
        self
    }

    pub fn legacy_v1_percent(mut self, percent: f64) -> Self {
        self.legacy_v1_percent = Some(percent);
        self
    }

    /// Whether answers carry `x-rollout-pool`.
    pub fn pool_header(mut self, on: bool) -> Self {
        self.pool_header = Some(on);
        self
    }

    pub fn v2_prefixes(mut self, prefixes: &[&str]) -> Self {
        self.v2_prefixes = Some(prefixes.iter().map(|p| (*p).to_owned()).collect());
        self
    }

    pub fn sessions(mut self, sessions: Sessions) -> Self {
        self.sessions = Some(sessions);
        self
    }

    pub fn quiet_window(mut self, window: Duration) -> Self {
        self.quiet_window = Some(window);
        self
    }

    pub fn client(mut self, client: ClientSettings) -> Self {
        self.client = Some(client);
        self
    }

    pub fn upstream_settings(mut self, settings: UpstreamSettings) -> Self {
        self.upstream = Some(settings);
        self
    }

    pub fn grace_period(mut self, grace: Duration) -> Self {
        self.grace_period = Some(grace);
        self
    }

    pub fn workers(mut self, workers: usize) -> Self {
        self.workers = Some(workers);
        self
    }

    /// The data-plane listener's address (a process started by a test needs a known one).
    pub fn listen(mut self, listen: &str) -> Self {
        self.listen = listen.to_owned();
        self
    }

    pub fn admin_listen(mut self, listen: &str) -> Self {
        self.admin_listen = listen.to_owned();
        self
    }

    pub fn admin_token_file(mut self, file: &Path) -> Self {
        self.token_file = Some(file.to_owned());
        self
    }

    /// Serves the admin API over TLS with these PEM files.
    pub fn admin_tls(mut self, cert: &Path, key: &Path) -> Self {
        self.admin_tls = Some((cert.to_owned(), key.to_owned()));
        self
    }

    /// Terminates TLS on the data-plane listener with these PEM files.
    pub fn tls(mut self, cert: &Path, key: &Path) -> Self {
        self.tls = Some((cert.to_owned(), key.to_owned()));
        self
    }

    /// Where the proxy keeps its state. [`crate::support::ProxyBuilder`] replaces it with a
    /// directory of its own; a proxy run as a child process needs it set.
    pub fn state_dir(mut self, dir: &Path) -> Self {
        self.state_dir = Some(dir.to_owned());
        self
    }

    /// A top-level section this builder has no method for, written as `key: value`.
    pub fn section(mut self, key: &str, value: &str) -> Self {
        self.extra.push((key.to_owned(), value.to_owned()));
        self
    }

    /// The config as YAML.
    pub fn render(&self) -> String {
        let mut out = Vec::<(String, String)>::new();
        let mut put = |key: &str, value: String| out.push((key.to_owned(), value));
        put("listen", quote(&self.listen));
        let mut admin = vec![("listen", quote(&self.admin_listen))];
        if let Some(file) = &self.token_file {
            admin.push(("token_file", quote_path(file)));
        }
        if let Some((cert, key)) = &self.admin_tls {
            admin.push(("tls", flow(&[("cert", quote_path(cert)), ("key", quote_path(key))])));
        }
        put("admin", flow(&admin));
        let pools = format!("\n  v1:\n{}  v2:\n{}", render_pool(&self.v1), render_pool(&self.v2));
        put("pools", pools.trim_end().to_owned());
        let mut routes = Vec::new();
        if let Some(prefixes) = &self.v2_prefixes {
            let list: Vec<String> = prefixes.iter().map(|p| quote(p)).collect();
            routes.push(("v2_prefixes", format!("[{}]", list.join(", "))));
        }
        if let Some(percent) = self.legacy_v1_percent {
            routes.push(("legacy_v1_percent", percent.to_string()));
        }
        optional(&mut routes, "pool_header", self.pool_header);
        if !routes.is_empty() {
            put("routes", flow(&routes));
        }
        if let Some(sessions) = &self.sessions {
            let mut fields = Vec::new();
            if !sessions.keys.is_empty() {
                let keys: Vec<String> = sessions
                    .keys
                    .iter()
                    .map(|key| match key {
                        SessionKey::Path(t) => format!("{{ path: {} }}", quote(t)),
                        SessionKey::Query(n) => format!("{{ query: {} }}", quote(n)),
                        SessionKey::Header(n) => format!("{{ header: {} }}", quote(n)),
                        SessionKey::Cookie(n) => format!("{{ cookie: {} }}", quote(n)),
                    })
                    .collect();
                fields.push(("keys", format!("[{}]", keys.join(", "))));
            }
            optional(&mut fields, "idle_timeout", sessions.idle_timeout.map(duration));
            optional(&mut fields, "max_duration", sessions.max_duration.map(duration));
            optional(&mut fields, "max_active", sessions.max_active);
            put("sessions", flow(&fields));
        }
        if let Some(window) = self.quiet_window {
            put("drain", flow(&[("quiet_window", duration(window))]));
        }
        if let Some(client) = &self.client {
            let mut fields = Vec::new();
            optional(&mut fields, "header_read_timeout", client.header_read_timeout.map(duration));
            optional(&mut fields, "send_timeout", client.send_timeout.map(duration));
            optional(&mut fields, "max_header_bytes", client.max_header_bytes);
            optional(&mut fields, "max_connections", client.max_connections);
            optional(&mut fields, "max_concurrent_streams", client.max_concurrent_streams);
            optional(&mut fields, "allow_underscores_in_headers", client.allow_underscores_in_headers);
            optional(&mut fields, "defer_accept", client.defer_accept);
            put("client", flow(&fields));
        }
        if let Some(upstream) = &self.upstream {
            let mut fields = Vec::new();
            optional(&mut fields, "connect_timeout", upstream.connect_timeout.map(duration));
            optional(&mut fields, "response_timeout", upstream.response_timeout.map(duration));
            optional(&mut fields, "max_connections_per_upstream", upstream.max_connections_per_upstream);
            optional(&mut fields, "retries", upstream.retries);
            optional(&mut fields, "ca_file", upstream.ca_file.as_deref().map(quote_path));
            put("upstream", flow(&fields));
        }
        if let Some(grace) = self.grace_period {
            put("shutdown", flow(&[("grace_period", duration(grace))]));
        }
        if let Some(workers) = self.workers {
            put("workers", workers.to_string());
        }
        if let Some((cert, key)) = &self.tls {
            put("tls", flow(&[("cert", quote_path(cert)), ("key", quote_path(key))]));
        }
        if let Some(dir) = &self.state_dir {
            put("state_dir", quote_path(dir));
        }
        for (key, value) in &self.extra {
            put(key, value.clone());
        }
        let mut text = String::new();
        for (i, (key, value)) in out.iter().enumerate() {
            // A duplicate key would be a YAML error, or worse, one value silently winning.
            assert!(!out[..i].iter().any(|(k, _)| k == key), "section {key:?} is set twice");
            let gap = if value.starts_with('\n') { "" } else { " " };
            text.push_str(&format!("{key}:{gap}{value}\n"));
        }
        text
    }
}

fn render_pool(pool: &PoolSpec) -> String {
    let mut out = String::from("    upstreams:");
    if pool.upstreams.is_empty() {
        out.push_str(" []");
    }
    out.push('\n');
    for (name, url, weight) in &pool.upstreams {
        out.push_str(&format!(
            "      - {{ name: {}, url: {}, weight: {weight} }}\n",
            quote(name),
            quote(url)
        ));
    }
    if let Some(h) = &pool.health {
        let fields = [
            ("path", quote(h.path)),
            ("interval", duration(h.interval)),
            ("timeout", duration(h.timeout)),
            ("healthy_threshold", h.healthy_threshold.to_string()),
            ("unhealthy_threshold", h.unhealthy_threshold.to_string()),
        ];
        out.push_str(&format!("    health: {}\n", flow(&fields)));
    }
    if let Some(e) = &pool.ejection {
        let mut fields = vec![("consecutive_failures", e.consecutive_failures.to_string())];
        optional(&mut fields, "duration", e.duration.map(duration));
        out.push_str(&format!("    ejection: {}\n", flow(&fields)));
    }
    out
}

fn optional<T: ToString>(fields: &mut Vec<(&'static str, String)>, key: &'static str, value: Option<T>) {
    if let Some(value) = value {
        fields.push((key, value.to_string()));
    }
}

/// `{ a: 1, b: 2 }`
fn flow(fields: &[(&str, String)]) -> String {
    let inner: Vec<String> = fields.iter().map(|(k, v)| format!("{k}: {v}")).collect();
    if inner.is_empty() {
        "{}".to_owned()
    } else {
        format!("{{ {} }}", inner.join(", "))
    }
}

/// A YAML double-quoted scalar (JSON's string syntax is a subset of it).
fn quote(text: &str) -> String {
    serde_json::to_string(text).unwrap()
}

fn quote_path(path: &Path) -> String {
    quote(path.to_str().expect("a UTF-8 path"))
}

/// A duration as the config writes it: `1500ms`, `30s`, `10m`, `2h`.
fn duration(d: Duration) -> String {
    let ms = d.as_millis();
    assert_eq!(Duration::from_millis(ms as u64), d, "config durations are whole milliseconds");
    match ms {
        0 => "0s".to_owned(),
        ms if ms % 3_600_000 == 0 => format!("{}h", ms / 3_600_000),
        ms if ms % 60_000 == 0 => format!("{}m", ms / 60_000),
        ms if ms % 1000 == 0 => format!("{}s", ms / 1000),
        ms => format!("{ms}ms"),
    }
}
