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
//! listener (accept, limits, TLS; plain HTTP/1.1 on the h1 fast path, the rest on hyper)
//!   → proxy (per-request orchestration; the ONE place errors become responses)
//!   → router (v2 prefix? else legacy split) → session (extract key, look up / create pin)
//!   → balancer (smooth weighted round-robin in a pool, skipping unhealthy / weight 0)
//!   → upstream (pooled, capped connections; timeouts; retries inside the pool)
//!   → headers (field and framing rules both codecs share) → metrics
//!
//! shared: snapshot (running config, one ArcSwap) · sessions + store · drain · metrics · clock
//!         · fleet (in fleet mode: the link to the other replicas through Redis)
//!   ↑ taken by proxy (per request) and by control, admin, health::checks, upkeep (background)
//! ```
//!
//! # Layout
//!
//! Public modules are what the binary, the integration tests and the benches use; the rest is
//! internal (`pub(crate)`), checked by `unreachable_pub`.
//!
//! Request path:
//! - `listener`: accept loops, connection limits, TLS handshakes, HTTP/1.1 + HTTP/2 serving with
//!   graceful stop, and the `Gate` requests wait at until a takeover hands the state over.
//! - [`h1`]: the HTTP/1.1 fast path's codec: heads parsed in place and rewritten into bytes,
//!   chunked bodies re-framed, and the hand-over of a connection to hyper.
//! - `proxy`: the per-request service, one room per codec (`proxy/fast.rs`, `proxy/hyper.rs`)
//!   around the rules both call (`proxy/mod.rs`); maps every failure to its response in one
//!   function. `src/proxy/LIFECYCLE.md` maps each fast-path step to its twin.
//! - [`router`]: v2-prefix matching and the legacy percentage split.
//! - [`session`]: session keys and the pin table (`session/table.rs`: striped, one cache line per
//!   pin).
//! - [`balancer`]: smooth weighted round-robin inside one pool.
//! - [`upstream`]: upstream identity, the client for both codecs (`upstream/fast.rs` for the fast
//!   path), and each upstream's connections and their cap (`upstream/pool.rs`).
//! - [`headers`]: the header and framing rules both codecs share: hop-by-hop removal,
//!   `X-Forwarded-*`, `Host`, underscores, response framing (RFC 9110, RFC 9112).
//!
//! State, shared by the request path and the background:
//! - [`shared`]: the one handle on the snapshot, pins, store, drain clock, metrics and clock, and
//!   the background upkeep (pin expiry, drain clock, store health).
//! - `snapshot`: the running routing state built from a config, published through one `ArcSwap`.
//! - [`store`]: durable pins, drain clock and overrides with group commit, behind a `Backend`
//!   (`store/embedded.rs`: one redb file in `state_dir`); `store/fleet.rs` is the fleet's
//!   shared store on Redis (atomic pin claims, the change stream, the fleet revision).
//! - `fleet`: fleet mode at run time: claims a new session's pin before it is forwarded, follows
//!   the other replicas' changes into the local copy, shares the drain clock.
//! - [`drain`]: the drain signal and its persisted clock.
//! - [`ramp`]: the automated ramp: its plan, the verdict on each analysis window, and its states.
//! - `health`: whether an upstream may get new requests (thresholds, passive ejection; no I/O);
//!   `health/checks.rs` runs the active probes.
//! - [`metrics`]: Prometheus metrics with pre-resolved label handles.
//! - [`clock`]: wall-clock time, injectable for tests.
//!
//! Configuration and operation:
//! - [`config`]: the YAML file (`config/raw.rs`), validated into [`config::Config`]
//!   (`config/validate.rs`), every problem reported with file, line and column
//!   (`config/locate.rs`).
//! - `control`: overrides, revisions, reloads: every change to the running config.
//! - `admin`: the admin listener (health, readiness, metrics, drain, the operator's API).
//! - [`ctl`]: the operator's command-line client for the admin API.
//! - `tls`: rustls termination with reloadable certificates, and TLS to `https://` upstreams.
//! - [`handover`]: hitless restart by passing the listening sockets to a successor.
//! - [`server`]: starts the data plane and admin listeners (a start half and a stop half), tracks
//!   readiness, stops gracefully.
//! - [`demo`]: the self-contained tour with built-in stub upstreams.

#![warn(unreachable_pub)]
#![warn(clippy::undocumented_unsafe_blocks)]
// The docs are for the people working on the proxy (`cargo doc --document-private-items`): public
// items may point at the internals that do the work.
#![allow(rustdoc::private_intra_doc_links)]

mod admin;
pub mod balancer;
pub mod clock;
pub mod config;
mod console;
mod control;
pub mod ctl;
pub mod demo;
pub mod drain;
mod fleet;
pub mod h1;
pub mod handover;
pub mod headers;
mod health;
mod listener;
pub mod logging;
pub mod metrics;
mod proxy;
pub mod ramp;
pub mod router;
pub mod server;
pub mod session;
pub mod shared;
mod snapshot;
pub mod store;
mod tls;
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
