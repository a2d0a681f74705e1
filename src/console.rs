//! The admin console: one page, embedded in the binary, served on the admin listener at `/`,
//! that shows the rollout live and carries the operator's controls.
//!
//! The page (`src/console/`) fetches nothing from outside and runs no inline script, so its
//! Content-Security-Policy allows only this listener. It polls the admin API; besides the
//! endpoints the API has anyway, it reads two kept here:
//! - `GET /history`: live pins per pool, sampled every [`SAMPLE_EVERY`] for [`HISTORY`], and now;
//! - `GET /audit`: the last [`JOURNAL_LENGTH`] operator changes, ramp moves and gate calls, as
//!   the `audit` log lines record them.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::Json;
use serde::Serialize;
use serde_json::json;

use crate::admin::AdminState;
use crate::clock::UnixMillis;
use crate::config::PoolName;

/// How often live pins are sampled for the chart, and how far back the samples go.
pub(crate) const SAMPLE_EVERY: Duration = Duration::from_secs(30);
pub(crate) const HISTORY: Duration = Duration::from_secs(24 * 3600);
/// How many changes `GET /audit` keeps.
pub(crate) const JOURNAL_LENGTH: usize = 50;

const INDEX: &str = include_str!("console/index.html");
const SCRIPT: &str = include_str!("console/console.js");
const STYLE: &str = include_str!("console/console.css");

/// Only this listener may be reached, nothing may be framed or submitted, no inline code.
const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
                      img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

#[derive(Debug, Clone, Copy, Serialize)]
struct Sample {
    at_unix_ms: UnixMillis,
    v1: usize,
    v2: usize,
}

#[derive(Debug, Clone, Serialize)]
struct Event {
    at_unix_ms: UnixMillis,
    actor: String,
    kind: String,
    detail: String,
}

/// What the console shows that the proxy does not otherwise keep.
#[derive(Debug, Default)]
pub(crate) struct Console {
    samples: Mutex<VecDeque<Sample>>,
    journal: Mutex<VecDeque<Event>>,
}

impl Console {
    /// Takes a sample of live pins, if the last one is [`SAMPLE_EVERY`] old.
    pub(crate) fn sample(&self, at: UnixMillis, live: impl Fn(PoolName) -> usize) {
        let mut samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        if samples.back().is_some_and(|last| at < last.at_unix_ms + SAMPLE_EVERY.as_millis() as u64) {
            return;
        }
        samples.push_back(Sample { at_unix_ms: at, v1: live(PoolName::V1), v2: live(PoolName::V2) });
        let kept = (HISTORY.as_secs() / SAMPLE_EVERY.as_secs()) as usize;
        while samples.len() > kept {
            samples.pop_front();
        }
    }

    /// Notes a change for `GET /audit`, next to its `audit` log line.
    pub(crate) fn record(&self, at: UnixMillis, actor: &str, kind: &str, detail: String) {
        let mut journal = self.journal.lock().unwrap_or_else(|p| p.into_inner());
        journal.push_front(Event { at_unix_ms: at, actor: actor.to_owned(), kind: kind.to_owned(), detail });
        journal.truncate(JOURNAL_LENGTH);
    }
}

fn asset(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, POLICY),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::X_FRAME_OPTIONS, "DENY"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body,
    )
}

pub(crate) async fn index() -> impl IntoResponse {
    asset("text/html; charset=utf-8", INDEX)
}

pub(crate) async fn script() -> impl IntoResponse {
    asset("text/javascript; charset=utf-8", SCRIPT)
}

pub(crate) async fn style() -> impl IntoResponse {
    asset("text/css; charset=utf-8", STYLE)
}

/// `GET /history`: live pins per pool over the last hours, oldest first, ending with now.
pub(crate) async fn history(State(state): State<AdminState>) -> impl IntoResponse {
    let console = state.shared.console();
    let mut samples: Vec<Sample> =
        console.samples.lock().unwrap_or_else(|p| p.into_inner()).iter().copied().collect();
    let sessions = state.shared.sessions();
    samples.push(Sample {
        at_unix_ms: state.shared.now(),
        v1: sessions.live(PoolName::V1),
        v2: sessions.live(PoolName::V2),
    });
    Json(json!({ "sample_every_seconds": SAMPLE_EVERY.as_secs(), "samples": samples }))
}

/// `GET /audit`: the last changes, newest first.
pub(crate) async fn audit(State(state): State<AdminState>) -> impl IntoResponse {
    let console = state.shared.console();
    let events: Vec<Event> =
        console.journal.lock().unwrap_or_else(|p| p.into_inner()).iter().cloned().collect();
    Json(json!({ "events": events }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_spaced_and_bounded_and_the_journal_keeps_the_newest() {
        let console = Console::default();
        let step = SAMPLE_EVERY.as_millis() as u64;
        for i in 0..3_000u64 {
            console.sample(i * step, |pool| if pool == PoolName::V1 { i as usize } else { 0 });
            console.sample(i * step + 1, |_| 999);
        }
        let samples = console.samples.lock().unwrap();
        assert_eq!(samples.len(), 2_880, "a day of samples, one every 30 s");
        assert_eq!((samples.back().unwrap().v1, samples.back().unwrap().v2), (2_999, 0));
        for i in 0..60 {
            console.record(i, "op", "weight", format!("change {i}"));
        }
        let journal = console.journal.lock().unwrap();
        assert_eq!((journal.len(), journal[0].detail.as_str()), (JOURNAL_LENGTH, "change 59"));
    }
}
