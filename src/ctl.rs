//! `rollout-proxy ctl`: the operator's client for the admin API.
//!
//! Human-readable output by default, the server's JSON with `--json`. Exit codes: 0 success,
//! 1 failure (the server's error message is printed), 3 for `drain` when v1 is not drained (or
//! `--wait` timed out), 4 for `ramp status --watch` when the ramp aborted. The API itself is
//! [`crate::admin`].

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};

use crate::admin::TOKEN_ENV;
use crate::config::{Config, ConfigError};

/// Exit code of `drain` when v1 is not drained.
pub(crate) const NOT_DRAINED: u8 = 3;
/// Exit code of `ramp status --watch` when the ramp aborted.
pub(crate) const RAMP_ABORTED: u8 = 4;

#[derive(Debug, Clone)]
pub struct CtlOptions {
    /// Base URL of the admin listener, e.g. `http://127.0.0.1:9901`; from `config`, or the
    /// default, if not given.
    pub admin: Option<String>,
    pub token_file: Option<PathBuf>,
    /// The proxy's config file, for the admin URL and token file not given.
    pub config: Option<PathBuf>,
    /// A CA to trust for an `https://` admin URL, besides the public web roots.
    pub ca_file: Option<PathBuf>,
    pub json: bool,
    /// Send `If-Match` with this revision on changes.
    pub if_match: Option<u64>,
}

#[derive(Debug, Clone)]
pub enum CtlCommand {
    /// With `Some(interval)`, again every interval until interrupted.
    Status {
        watch: Option<Duration>,
    },
    Drain {
        wait: bool,
        timeout: Duration,
        interval: Duration,
    },
    /// `force`: during a ramp, set it anyway (the ramp pauses).
    LegacyPercent {
        percent: f64,
        force: bool,
    },
    /// `POOL/UPSTREAM`.
    Weight {
        target: String,
        weight: u32,
    },
    Sessions {
        pool: Option<String>,
        limit: usize,
        after: Option<String>,
    },
    Session(String),
    EndSession(String),
    Reload,
    ResetOverrides,
    /// Start a ramp from a plan file (YAML or JSON; the plan, or a config file's `ramp:`).
    RampStart(PathBuf),
    /// The ramp's state; with `watch`, again every `interval` until it completes or aborts.
    RampStatus {
        watch: bool,
        interval: Duration,
    },
    /// `pause`, `resume`, `abort`, `promote` or `retry`.
    Ramp(RampCommand),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RampCommand {
    Pause,
    Resume,
    Abort,
    Promote,
    Retry,
}

impl RampCommand {
    fn as_str(self) -> &'static str {
        match self {
            RampCommand::Pause => "pause",
            RampCommand::Resume => "resume",
            RampCommand::Abort => "abort",
            RampCommand::Promote => "promote",
            RampCommand::Retry => "retry",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error("cannot read the token file {}", file.display())]
    TokenFile {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0:?} is not an admin URL like http://127.0.0.1:9901 or https://proxy.example:9901")]
    BadUrl(String),
    #[error("cannot use the TLS settings for the admin URL")]
    Tls(#[source] crate::tls::TlsError),
    #[error("{0:?} is not POOL/UPSTREAM (e.g. v1/was-1)")]
    BadTarget(String),
    #[error("cannot reach the admin API at {url}")]
    Unreachable {
        url: String,
        #[source]
        source: hyper_util::client::legacy::Error,
    },
    #[error("reading the answer from {url} failed")]
    Body {
        url: String,
        #[source]
        source: hyper::Error,
    },
    #[error("{message} (HTTP {status})")]
    Server { status: StatusCode, message: String },
    #[error("cannot read the ramp plan")]
    Plan(#[source] ConfigError),
    #[error("cannot read the proxy's config for its admin URL and token")]
    Config(#[source] ConfigError),
}

struct Api {
    client: crate::tls::HttpsClient,
    base: String,
    token: Option<String>,
    if_match: Option<u64>,
}

impl Api {
    /// Sends one request; returns the status and the body parsed as JSON (or as a string).
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<(StatusCode, Value), CtlError> {
        let url = format!("{}{path}", self.base);
        let mut req = Request::builder().method(method.clone()).uri(&url);
        if let Some(token) = &self.token {
            req = req.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        if let (Some(revision), false) = (self.if_match, method == Method::GET) {
            req = req.header(http::header::IF_MATCH, format!("\"{revision}\""));
        }
        let body = match body {
            Some(json) => {
                req = req.header(http::header::CONTENT_TYPE, "application/json");
                Full::new(Bytes::from(json.to_string()))
            }
            None => Full::default(),
        };
        let req = req.body(body).map_err(|_| CtlError::BadUrl(self.base.clone()))?;
        let response = self
            .client
            .request(req)
            .await
            .map_err(|source| CtlError::Unreachable { url: url.clone(), source })?;
        let status = response.status();
        let bytes =
            response.into_body().collect().await.map_err(|source| CtlError::Body { url, source })?.to_bytes();
        let value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).trim().to_owned()));
        Ok((status, value))
    }

    /// Like [`Api::call`], but a non-2xx answer is an error carrying the server's message.
    async fn expect_ok(&self, method: Method, path: &str, body: Option<Value>) -> Result<Value, CtlError> {
        let (status, value) = self.call(method, path, body).await?;
        if status.is_success() {
            return Ok(value);
        }
        let mut message =
            value.get("error").and_then(Value::as_str).map_or_else(|| value.to_string(), str::to_owned);
        if status == StatusCode::UNAUTHORIZED {
            message += if self.token.is_some() {
                "; the token given is not the proxy's (admin.token_file on the proxy's side)"
            } else {
                "; pass the admin token with --token-file FILE (under systemd: the file given to LoadCredential=), --config (its admin.token_file) or ROLLOUT_ADMIN_TOKEN"
            };
        }
        Err(CtlError::Server { status, message })
    }
}

/// Where the admin API is when nothing says otherwise.
const DEFAULT_ADMIN: &str = "http://127.0.0.1:9901";

/// The URL of an admin listener bound to `listen`: reached on loopback when it listens on
/// every address.
fn admin_url(listen: std::net::SocketAddr, tls: bool) -> String {
    let ip = match listen.ip() {
        ip if ip.is_unspecified() && ip.is_ipv4() => std::net::Ipv4Addr::LOCALHOST.into(),
        ip if ip.is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
        ip => ip,
    };
    let scheme = if tls { "https" } else { "http" };
    format!("{scheme}://{}", std::net::SocketAddr::new(ip, listen.port()))
}

fn read_token(file: Option<&PathBuf>) -> Result<Option<String>, CtlError> {
    match file {
        Some(file) => std::fs::read_to_string(file)
            .map(|t| Some(t.trim().to_owned()))
            .map_err(|source| CtlError::TokenFile { file: file.clone(), source }),
        None => Ok(std::env::var(TOKEN_ENV).ok().map(|t| t.trim().to_owned()).filter(|t| !t.is_empty())),
    }
}

/// Runs one command, printing its result. Returns the process exit code.
pub async fn run(options: &CtlOptions, command: CtlCommand) -> Result<u8, CtlError> {
    let config = options.config.as_deref().map(Config::load).transpose().map_err(CtlError::Config)?;
    let admin = match (&options.admin, &config) {
        (Some(admin), _) => admin.clone(),
        (None, Some(config)) => admin_url(config.admin_listen, config.admin_tls.is_some()),
        (None, None) => DEFAULT_ADMIN.to_owned(),
    };
    let base = admin.trim_end_matches('/').to_owned();
    if !(base.starts_with("http://") || base.starts_with("https://")) {
        return Err(CtlError::BadUrl(admin));
    }
    let token_file =
        options.token_file.clone().or_else(|| config.as_ref().and_then(|c| c.admin_token_file.clone()));
    let api = Api {
        client: crate::tls::https_client(options.ca_file.as_deref()).map_err(CtlError::Tls)?,
        base,
        token: read_token(token_file.as_ref())?,
        if_match: options.if_match,
    };
    let print = |value: &Value, human: String| {
        if options.json {
            println!("{}", serde_json::to_string_pretty(value).unwrap_or_default());
        } else {
            println!("{human}");
        }
    };
    match command {
        CtlCommand::Status { watch } => {
            let terminal = std::io::stdout().is_terminal() && !options.json;
            loop {
                let status = api.expect_ok(Method::GET, "/status", None).await?;
                match watch {
                    // Redrawn in place: cursor home, clear the screen.
                    Some(_) if terminal => print!("\x1b[H\x1b[2J"),
                    Some(_) => {
                        println!("--- {}", humantime::format_rfc3339_seconds(std::time::SystemTime::now()))
                    }
                    None => {}
                }
                print(&status, render_status(&status));
                let Some(interval) = watch else { break };
                tokio::time::sleep(interval).await;
            }
        }
        CtlCommand::Drain { wait, timeout, interval } => {
            let started = Instant::now();
            // On a terminal one line, redrawn in place; otherwise a plain line per poll.
            let progress = wait && std::io::stdout().is_terminal() && !options.json;
            loop {
                let (code, body) = api.call(Method::GET, "/drain", None).await?;
                if code != StatusCode::OK && code != StatusCode::SERVICE_UNAVAILABLE {
                    return Err(CtlError::Server { status: code, message: body.to_string() });
                }
                let drained = body["drained"].as_bool().unwrap_or(false);
                if drained || !wait || started.elapsed() >= timeout {
                    if progress {
                        print!("\r\x1b[2K");
                    }
                    print(&body, render_drain(&body));
                    return Ok(if drained { 0 } else { NOT_DRAINED });
                }
                let line = render_progress(&body);
                if progress {
                    print!("\r\x1b[2K{line}");
                    let _ = std::io::Write::flush(&mut std::io::stdout());
                } else if !options.json {
                    println!("{line}");
                }
                tokio::time::sleep(interval.min(timeout.saturating_sub(started.elapsed()))).await;
            }
        }
        CtlCommand::LegacyPercent { percent, force } => {
            let path = if force { "/routes/legacy?force=true" } else { "/routes/legacy" };
            let applied = api.expect_ok(Method::PUT, path, Some(json!({ "v1_percent": percent }))).await?;
            let human = format!(
                "legacy traffic to v1: {}% -> {}% (revision {})",
                applied["old"], applied["new"], applied["revision"]
            );
            print(&applied, human);
        }
        CtlCommand::Weight { target, weight } => {
            let (pool, name) = target.split_once('/').ok_or_else(|| CtlError::BadTarget(target.clone()))?;
            let path = format!("/pools/{pool}/upstreams/{name}");
            let applied = api.expect_ok(Method::PUT, &path, Some(json!({ "weight": weight }))).await?;
            let human = format!(
                "{target} weight: {} -> {} (revision {})",
                applied["old"]["weight"], applied["new"]["weight"], applied["revision"]
            );
            print(&applied, human);
        }
        CtlCommand::Sessions { pool, limit, after } => {
            let mut path = format!("/sessions?limit={limit}");
            if let Some(pool) = pool {
                path += &format!("&pool={pool}");
            }
            if let Some(after) = after {
                path += &format!("&after={}", query_escape(&after));
            }
            let list = api.expect_ok(Method::GET, &path, None).await?;
            print(&list, render_sessions(&list));
        }
        CtlCommand::Session(key) => {
            let pin = api.expect_ok(Method::GET, &format!("/sessions/{}", query_escape(&key)), None).await?;
            let human = format!(
                "session {key}: on {}\nfirst request {}\nlast request  {}\nends at       {} ({} ends it, unless a request comes first)",
                pin["pool"].as_str().unwrap_or("?"),
                pin["first_seen"].as_str().unwrap_or("?"),
                pin["last_seen"].as_str().unwrap_or("?"),
                pin["expires_at"].as_str().unwrap_or("?"),
                match pin["ended_by"].as_str() {
                    Some("max_duration") => "sessions.max_duration",
                    _ => "sessions.idle_timeout",
                },
            );
            print(&pin, human);
        }
        CtlCommand::EndSession(key) => {
            let applied =
                api.expect_ok(Method::DELETE, &format!("/sessions/{}", query_escape(&key)), None).await?;
            print(
                &applied,
                format!("session {key} on {} ended", applied["old"]["pool"].as_str().unwrap_or("?")),
            );
        }
        CtlCommand::Reload => {
            let applied = api.expect_ok(Method::POST, "/reload", None).await?;
            let mut human = format!("config reloaded (revision {})", applied["revision"]);
            if let Some(keys) = applied["restart_required"].as_array() {
                let keys: Vec<&str> = keys.iter().filter_map(Value::as_str).collect();
                human += &format!("\nthese changes take effect only after a restart: {}", keys.join(", "));
            }
            print(&applied, human);
        }
        CtlCommand::ResetOverrides => {
            let applied = api.expect_ok(Method::DELETE, "/overrides", None).await?;
            print(
                &applied,
                format!("overrides dropped; config file values apply (revision {})", applied["revision"]),
            );
        }
        CtlCommand::RampStart(file) => {
            let text = std::fs::read_to_string(&file)
                .map_err(|source| CtlError::Plan(ConfigError::Read { file: file.clone(), source }))?;
            let plan = Config::ramp_plan_from_yaml(&text, &file).map_err(CtlError::Plan)?;
            let plan = serde_json::to_value(plan).expect("a plan serializes");
            let ramp = api.expect_ok(Method::PUT, "/ramp", Some(plan)).await?;
            print(&ramp, format!("ramp started\n{}", render_ramp(&ramp)));
        }
        CtlCommand::RampStatus { watch, interval } => loop {
            let ramp = api.expect_ok(Method::GET, "/ramp", None).await?;
            print(&ramp, render_ramp(&ramp));
            match ramp["state"].as_str() {
                Some("aborted") => return Ok(if watch { RAMP_ABORTED } else { 0 }),
                Some("progressing" | "paused") if watch => tokio::time::sleep(interval).await,
                _ => break,
            }
        },
        CtlCommand::Ramp(command) => {
            let path = format!("/ramp/{}", command.as_str());
            let ramp = api.expect_ok(Method::POST, &path, None).await?;
            print(&ramp, render_ramp(&ramp));
        }
    }
    Ok(0)
}

/// `GET /ramp` for people: the state, the step and its share, the hold left, the last analysis.
fn render_ramp(r: &Value) -> String {
    let state = r["state"].as_str().unwrap_or("?");
    if state == "none" {
        return "no ramp has been started".to_owned();
    }
    let mut out = format!(
        "ramp: {state}{}, step {} of {}: v1 gets {}% of new sessions",
        r["paused_by"].as_str().map(|by| format!(" (by {by})")).unwrap_or_default(),
        r["step"].as_u64().unwrap_or(0) + 1,
        r["steps"],
        r["v1_percent"],
    );
    if matches!(state, "progressing" | "paused") {
        let left = Duration::from_secs(r["hold_left_seconds"].as_f64().unwrap_or(0.0) as u64);
        out += &format!("; {} left in the hold", humantime::format_duration(left));
    }
    if let Some(last) = r["analyses"].get(0) {
        let judgement = &last["judgement"];
        out += &format!(
            "\nlast analysis {}s ago: {}",
            last["ago_seconds"].as_f64().unwrap_or(0.0).round(),
            judgement["verdict"].as_str().unwrap_or("?")
        );
        for reason in judgement["reasons"].as_array().into_iter().flatten() {
            out += &format!("\n  {}", reason.as_str().unwrap_or_default());
        }
    }
    let gates = &r["gates"];
    if gates["open"] == false {
        out += &format!("\nthe gates hold the move to step {}:", gates["to_step"].as_u64().unwrap_or(0) + 1);
        for answer in gates["answers"].as_array().into_iter().flatten().filter(|a| a["open"] == false) {
            let said = match answer["status"].as_u64() {
                Some(status) => format!("answered {status}"),
                None => answer["error"].as_str().unwrap_or("no answer").to_owned(),
            };
            out += &format!("\n  {}: {said}", answer["gate"].as_str().unwrap_or("?"));
        }
    }
    if let Some(stalled) = r["stalled"].as_str() {
        out += &format!("\n{stalled}");
    }
    if let Some(replica) = r["leader"]["replica"].as_str() {
        let this = if r["leader"]["this"] == true { " (the one asked)" } else { "" };
        out += &format!("\ndriven by replica {replica}{this}");
    }
    out
}

fn render_status(s: &Value) -> String {
    let routes = &s["routes"];
    let mut out =
        format!("revision {}   config {}\n", s["revision"], s["config_file"].as_str().unwrap_or("(none)"));
    let prefixes: Vec<&str> =
        routes["v2_prefixes"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
    out += &format!(
        "v2 prefixes: {}\nlegacy traffic to v1: {}% ({}; file says {}%)\n\n",
        prefixes.join(", "),
        routes["legacy_v1_percent"],
        routes["legacy_v1_percent_source"].as_str().unwrap_or("?"),
        routes["config_legacy_v1_percent"]
    );
    let mut upstreams = table(&["POOL", "UPSTREAM", "URL", "WEIGHT", "SOURCE", "HEALTHY"]);
    for pool in ["v1", "v2"] {
        for u in s["pools"][pool]["upstreams"].as_array().into_iter().flatten() {
            upstreams.add_row(vec![
                pool.to_owned(),
                u["name"].as_str().unwrap_or("?").to_owned(),
                u["url"].as_str().unwrap_or("?").to_owned(),
                u["weight"].to_string(),
                u["weight_source"].as_str().unwrap_or("?").to_owned(),
                if u["healthy"].as_bool() == Some(true) { "yes" } else { "no" }.to_owned(),
            ]);
        }
    }
    right_align(&mut upstreams, 3);
    out += &lines(&upstreams);
    if let Some(keys) = s["restart_required"].as_array().filter(|keys| !keys.is_empty()) {
        let keys: Vec<&str> = keys.iter().filter_map(Value::as_str).collect();
        out += &format!("\nchanged in the file, waiting for a restart: {}\n", keys.join(", "));
    }
    let active = &s["sessions"]["active"];
    out += &format!(
        "\nlive pins: v1 {}, v2 {} (max {})\n",
        active["v1"], active["v2"], s["sessions"]["max_active"]
    );
    out += &render_drain(&s["drain"]);
    out
}

/// One line of `drain --wait` progress: live v1 pins, quiet time against the window, ETA.
fn render_progress(d: &Value) -> String {
    let quiet = d["quiet_for_seconds"].as_f64().unwrap_or(0.0);
    let window = d["quiet_window_seconds"].as_f64().unwrap_or(0.0);
    let period =
        |secs: f64| humantime::format_duration(Duration::from_secs(secs.max(0.0) as u64)).to_string();
    let share = if window > 0.0 { (100.0 * quiet / window).min(100.0) } else { 0.0 };
    format!(
        "waiting: {} live v1 pins; quiet {} / {} ({share:.0}%); ETA {}",
        d["v1_active_pins"],
        period(quiet),
        period(window),
        d["drained_eta"].as_str().unwrap_or("unknown")
    )
}

fn render_drain(d: &Value) -> String {
    let quiet = d["quiet_for_seconds"].as_f64().unwrap_or(0.0);
    let window = d["quiet_window_seconds"].as_f64().unwrap_or(0.0);
    let period =
        |secs: f64| humantime::format_duration(Duration::from_secs(secs.max(0.0) as u64)).to_string();
    if d["drained"].as_bool() == Some(true) {
        format!("drained: no live v1 pins, v1 quiet for {} (window {})", period(quiet), period(window))
    } else {
        format!(
            "not drained: {} live v1 pins, v1 quiet for {} of {}; drained at {} at the earliest",
            d["v1_active_pins"],
            period(quiet),
            period(window),
            d["drained_eta"].as_str().unwrap_or("?")
        )
    }
}

fn render_sessions(list: &Value) -> String {
    let mut sessions = table(&["KEY", "POOL", "FIRST SEEN", "LAST SEEN", "ENDS AT"]);
    for s in list["sessions"].as_array().into_iter().flatten() {
        sessions.add_row(
            ["key", "pool", "first_seen", "last_seen", "expires_at"]
                .map(|field| s[field].as_str().unwrap_or("?").to_owned()),
        );
    }
    let mut out =
        format!("{}live pins: v1 {}, v2 {}", lines(&sessions), list["active"]["v1"], list["active"]["v2"]);
    if let Some(next) = list["next"].as_str() {
        out += &format!("\nmore: ctl sessions --after {next}");
    }
    out
}

/// `text` made safe for a URL path segment or query value: anything but unreserved characters
/// is percent-encoded.
fn query_escape(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A plain table: a header, columns as wide as their widest cell, two spaces between them, no
/// borders.
fn table(header: &[&str]) -> comfy_table::Table {
    let mut table = comfy_table::Table::new();
    table.load_preset(comfy_table::presets::NOTHING).set_header(header.to_vec());
    for column in table.column_iter_mut() {
        column.set_padding((0, 2));
    }
    table
}

/// A table's lines, without the padding after the last column.
fn lines(table: &comfy_table::Table) -> String {
    table.lines().map(|line| line.trim_end().to_owned() + "\n").collect()
}

fn right_align(table: &mut comfy_table::Table, column: usize) {
    if let Some(column) = table.column_mut(column) {
        column.set_cell_alignment(comfy_table::CellAlignment::Right);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What holds a ramp is on screen: the gates that said no, and which replica drives it.
    #[test]
    fn a_ramp_held_by_its_gates_says_which_and_who_drives_it() {
        let ramp = serde_json::json!({
            "state": "progressing", "paused_by": null, "step": 0, "steps": 3, "v1_percent": 99.0,
            "hold_left_seconds": 0.0, "analyses": [],
            "gates": { "to_step": 1, "open": false, "answers": [
                { "gate": "approval", "open": false, "status": 403, "error": null },
                { "gate": "tests", "open": true, "status": 200, "error": null },
                { "gate": "ci", "open": false, "status": null, "error": "no answer within 10s" },
            ]},
            "leader": { "replica": "3f9a", "this": false },
        });
        let shown = render_ramp(&ramp);
        assert!(
            shown.contains(
                "the gates hold the move to step 2:\n  approval: answered 403\n  ci: no answer within 10s\n"
            ),
            "{shown}"
        );
        assert!(!shown.contains("tests:"), "{shown}");
        assert!(shown.ends_with("driven by replica 3f9a"), "{shown}");
    }

    /// The upstream table's columns line up whatever the values' widths (a weight is a JSON
    /// number, which a format width used to ignore).
    #[test]
    fn status_columns_line_up() {
        let status = serde_json::json!({
            "revision": 3, "config_file": null,
            "routes": { "v2_prefixes": ["/api/v2"], "legacy_v1_percent": 50.0, "legacy_v1_percent_source": "admin" },
            "pools": {
                "v1": { "upstreams": [
                    { "name": "a", "url": "http://10.0.0.1:8080", "weight": 1, "weight_source": "config", "healthy": true },
                    { "name": "a-much-longer-name", "url": "http://10.0.0.2:8080", "weight": 1000, "weight_source": "admin", "healthy": false },
                ]},
                "v2": { "upstreams": [] },
            },
            "sessions": { "active": { "v1": 1, "v2": 2 }, "max_active": 10 },
            "drain": { "drained": false },
            "restart_required": ["shutdown.grace_period"],
        });
        let shown = render_status(&status);
        let rows: Vec<&str> =
            shown.lines().filter(|l| l.contains("HEALTHY") || l.contains("http://")).collect();
        assert_eq!(rows.len(), 3, "{shown}");
        let at = |row: &str, what: &str| row.find(what).unwrap();
        let healthy = at(rows[0], "HEALTHY");
        assert_eq!((at(rows[1], "yes"), at(rows[2], "no")), (healthy, healthy), "{shown}");
        // Weights right-aligned under their header.
        let (weight_end, source) = (at(rows[0], "WEIGHT") + "WEIGHT".len(), at(rows[0], "SOURCE"));
        for row in &rows[1..] {
            assert_eq!(row[..source].trim_end().len(), weight_end, "{shown}");
        }
        assert!(
            shown.contains("changed in the file, waiting for a restart: shutdown.grace_period"),
            "{shown}"
        );
    }
}
