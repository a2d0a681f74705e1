//! The process's log output: text or JSON lines on stderr, filtered by `RUST_LOG` (default
//! `info`), and a filter the admin API can change while the process runs (`PUT /log-level`).

use std::sync::OnceLock;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Registry};

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per line: timestamp, level, target, message and fields.
    Json,
}

struct Filter {
    handle: reload::Handle<EnvFilter, Registry>,
    /// The filter as it was last set, for `GET /log-level`.
    spec: std::sync::Mutex<String>,
}

static FILTER: OnceLock<Filter> = OnceLock::new();

/// Why a filter was not set.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("{0:?} is not a log filter (e.g. info, or info,rollout_proxy::proxy=debug): {1}")]
    Invalid(String, String),
    #[error("this process's logging cannot be changed at run time")]
    NotAdjustable,
}

/// Installs the process's logger; once, before anything logs.
pub fn install(format: LogFormat, ansi: bool) {
    let wanted = std::env::var("RUST_LOG").ok().filter(|s| !s.trim().is_empty());
    let parsed = wanted.as_deref().map(|spec| (spec, EnvFilter::try_new(spec)));
    let (spec, filter, refused) = match parsed {
        Some((spec, Ok(filter))) => (spec.to_owned(), filter, None),
        Some((spec, Err(err))) => ("info".to_owned(), EnvFilter::new("info"), Some((spec.to_owned(), err))),
        None => ("info".to_owned(), EnvFilter::new("info"), None),
    };
    let (filter, handle) = reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    let installed = match format {
        LogFormat::Text => registry
            .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(ansi))
            .try_init(),
        LogFormat::Json => registry
            .with(tracing_subscriber::fmt::layer().json().flatten_event(true).with_writer(std::io::stderr))
            .try_init(),
    };
    if installed.is_ok() {
        let _ = FILTER.set(Filter { handle, spec: std::sync::Mutex::new(spec) });
    }
    if let Some((spec, err)) = refused {
        tracing::warn!(rust_log = %spec, error = %err, "RUST_LOG is not a log filter; logging at info");
    }
}

/// The filter in force, if this process's logging can be changed.
pub(crate) fn filter() -> Option<String> {
    FILTER.get().map(|f| f.spec.lock().unwrap_or_else(|p| p.into_inner()).clone())
}

/// Replaces the filter (same syntax as `RUST_LOG`); answers the one it replaced.
pub(crate) fn set_filter(spec: &str) -> Result<String, LogError> {
    let filter = FILTER.get().ok_or(LogError::NotAdjustable)?;
    let parsed = EnvFilter::try_new(spec).map_err(|e| LogError::Invalid(spec.to_owned(), e.to_string()))?;
    filter.handle.reload(parsed).map_err(|_| LogError::NotAdjustable)?;
    Ok(std::mem::replace(&mut *filter.spec.lock().unwrap_or_else(|p| p.into_inner()), spec.to_owned()))
}
