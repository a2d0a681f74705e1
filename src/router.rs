//! Decides which pool a request belongs to before any session is consulted.
//!
//! Version-prefixed paths always go to `v2`; everything else is legacy and, when no session pin
//! applies, is split by the operator's percentage. Honouring pins is [`crate::session`]'s job once
//! ([`crate::session`]); choosing the upstream inside the pool is [`crate::balancer`]'s.

use crate::config::{Percent, PoolName, Prefix};

/// What kind of request the path makes this.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Under one of `routes.v2_prefixes`: always pool `v2`.
    V2Prefix,
    /// Any other path.
    Legacy,
}

impl Route {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Route::V2Prefix => "v2_prefix",
            Route::Legacy => "legacy",
        }
    }
}

/// How the pool of a request was decided; a metrics label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Under a v2 prefix.
    Prefix,
    /// A legacy request following its session's live pin.
    Pinned,
    /// A legacy request that started a new pin.
    NewPin,
    /// A legacy request without a (valid) session key, or with the pin table full: split per request.
    Unkeyed,
}

impl Decision {
    pub(crate) const ALL: [Decision; 4] =
        [Decision::Prefix, Decision::Pinned, Decision::NewPin, Decision::Unkeyed];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Decision::Prefix => "prefix",
            Decision::Pinned => "pinned",
            Decision::NewPin => "new_pin",
            Decision::Unkeyed => "unkeyed",
        }
    }

    pub(crate) fn route(self) -> Route {
        match self {
            Decision::Prefix => Route::V2Prefix,
            _ => Route::Legacy,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Router {
    v2_prefixes: Vec<Prefix>,
    legacy_v1: Percent,
}

impl Router {
    pub fn new(v2_prefixes: Vec<Prefix>, legacy_v1: Percent) -> Self {
        Router { v2_prefixes, legacy_v1 }
    }

    pub fn route(&self, path: &str) -> Route {
        if self.v2_prefixes.iter().any(|p| is_under(path, p.as_str())) {
            Route::V2Prefix
        } else {
            Route::Legacy
        }
    }

    /// Picks a pool for an unkeyed legacy request: `v1` with probability `legacy_v1_percent`.
    pub fn split(&self) -> PoolName {
        split_with(self.legacy_v1, fastrand::u16(0..10_000))
    }

    /// Picks the pool of a new session whose key falls at `roll` (0..10_000, see
    /// [`crate::session::Sessions::split_roll`]): `v1` below the v1 share.
    pub fn split_session(&self, roll: u16) -> PoolName {
        split_with(self.legacy_v1, roll)
    }

    pub(crate) fn legacy_v1_percent(&self) -> Percent {
        self.legacy_v1
    }
}

/// `roll` is uniform in 0..10_000; hundredths of a percent below the share go to v1.
fn split_with(share: Percent, roll: u16) -> PoolName {
    if roll < share.basis_points() {
        PoolName::V1
    } else {
        PoolName::V2
    }
}

/// Segment-boundary prefix match: `/api/v2` covers `/api/v2` and `/api/v2/x`, never `/api/v2x`.
fn is_under(path: &str, prefix: &str) -> bool {
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router(prefixes: &[&str]) -> Router {
        Router::new(prefixes.iter().map(|p| Prefix::try_new(p).unwrap()).collect(), Percent::HUNDRED)
    }

    #[test]
    fn prefixes_match_on_segment_boundaries() {
        let r = router(&["/api/v2"]);
        assert_eq!(r.route("/api/v2"), Route::V2Prefix);
        assert_eq!(r.route("/api/v2/"), Route::V2Prefix);
        assert_eq!(r.route("/api/v2/studies/1"), Route::V2Prefix);
        assert_eq!(r.route("/api/v2x"), Route::Legacy);
        assert_eq!(r.route("/api/v20/x"), Route::Legacy);
        assert_eq!(r.route("/api/studies/1"), Route::Legacy);
        assert_eq!(r.route("/"), Route::Legacy);
    }

    #[test]
    fn split_boundaries_are_exact() {
        let thirty = Percent::try_from_f64(30.0).unwrap();
        assert_eq!(split_with(thirty, 2_999), PoolName::V1);
        assert_eq!(split_with(thirty, 3_000), PoolName::V2);
        assert_eq!(split_with(Percent::ZERO, 0), PoolName::V2);
        assert_eq!(split_with(Percent::HUNDRED, 9_999), PoolName::V1);
    }
}
