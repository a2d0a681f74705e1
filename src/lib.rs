//! rollout-proxy: a reverse proxy that makes version-incompatible rolling deployments safe.
//!
//! A service ships a v2 whose API (under a version prefix such as `/api/v2`) and database schema
//! are incompatible with v1. The proxy sends version-prefixed requests to the `v2` pool, splits
//! legacy requests between the pools by an operator-set percentage, keeps each legacy session on
//! the pool it started on, and tells the operator when v1 has been quiet long enough to switch off.
//!
//! # Request flow
//!
//! ```text
//! listener (plain HTTP/1.1 on the h1 fast path; h2, TLS and unusual requests on hyper)
//!          → proxy (per-request orchestration; the ONE place errors become responses)
//!          → router (v2 prefix? else legacy) → session (extract key, look up / create pin)
//!          → balancer (smooth weighted round-robin inside a pool, skipping unhealthy / weight 0)
//!          → upstream (pooled and capped connections, timeouts, retries in the pool)
//!          → headers (the framing and field rules both codecs share) → metrics
//! supporting: config (raw serde → validated), snapshot (the running config behind one ArcSwap),
//!             state (durable store), drain, clock, health, control, admin, ctl, tls, handover,
//!             server (listeners, readiness, graceful stop), demo
//! ```
//!
//! # Layout
//!
//! - [`config`]: the YAML file, parsed into raw serde structs and validated into [`config::Config`];
//!   every problem is reported with file, line and column.
//! - [`snapshot`]: the running routing state built from a config and published through one
//!   `ArcSwap`.
//! - [`listener`]: accept loop, connection limits, TLS handshakes, HTTP/1.1 + HTTP/2 serving
//!   with graceful stop.
//! - [`h1`]: the HTTP/1.1 fast path's codec: heads parsed in place and rewritten into bytes,
//!   chunked bodies re-framed, and the hand-over of a connection to hyper.
//! - [`proxy`]: the per-request service, in one room per codec (`proxy/fast.rs`,
//!   `proxy/hyper.rs`) around the rules both call (`proxy/mod.rs`); maps every failure to its
//!   response in one function. `src/proxy/LIFECYCLE.md` maps each fast-path step to its twin.
//! - [`router`]: v2-prefix matching and the legacy percentage split.
//! - [`balancer`]: smooth weighted round-robin inside one pool.
//! - [`upstream`]: upstream identity, the client for both codecs (`upstream/fast.rs` for the
//!   fast path), and each upstream's connections and their cap (`upstream/pool.rs`).
//! - [`health`]: active health checks and passive ejection.
//! - [`headers`]: the header and framing rules both codecs share: hop-by-hop removal,
//!   `X-Forwarded-*`, `Host`, underscores, response framing (RFC 9110, RFC 9112).
//! - [`session`]: session keys and the pin table (striped, one cache line per pin).
//! - [`state`]: the durable store (pins, drain clock, overrides) with group commit.
//! - [`drain`]: the drain signal and its persisted clock.
//! - [`clock`]: wall-clock time, injectable for tests.
//! - [`metrics`]: Prometheus metrics with pre-resolved label handles.
//! - [`control`]: overrides, revisions, reloads: every change to the running config.
//! - [`admin`]: the admin listener (health, readiness, metrics, drain, the operator's API).
//! - [`ctl`]: the operator's command-line client for the admin API.
//! - [`tls`]: rustls termination with reloadable certificates, and TLS to `https://` upstreams.
//! - [`handover`]: hitless restart by passing the listening sockets to a successor.
//! - [`server`]: starts the data plane and admin listeners, tracks readiness, stops gracefully.
//! - [`demo`]: the self-contained tour with built-in stub upstreams.

pub mod admin;
pub mod balancer;
pub mod clock;
pub mod config;
pub mod control;
pub mod ctl;
pub mod demo;
pub mod drain;
pub mod h1;
pub mod handover;
pub mod headers;
pub mod health;
pub mod listener;
pub mod metrics;
pub mod proxy;
pub mod router;
pub mod server;
pub mod session;
pub mod shared;
pub mod snapshot;
pub mod store;
pub mod tls;
pub mod upstream;

/// Displays an error with its chain of causes: `outer: inner: root`.
pub struct ErrorChain<'a>(pub &'a dyn std::error::Error);

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        while let Some(err) = cause {
            write!(f, ": {err}")?;
            cause = err.source();
        }
        Ok(())
    }
}
