//! Gates: webhooks the ramp calls before each step and when it aborts.
//!
//! The payload is Flagger's webhook payload (`name`, `namespace`, `phase`, `type`, `checksum`,
//! `metadata`), so Flagger's load tester gates (`/gate/check`, `/gate/approve`), and any CI or
//! chat approval written for Flagger, can hold a ramp; `step` and `v1_percent` are added for
//! receivers written for this proxy. A step gate answering 2xx lets the ramp move on; any other
//! answer, or none within the gate's timeout, holds the step, which is judged on and asked
//! again at its next analysis. An abort gate is told only: an abort is never held, because
//! holding it would keep sending new sessions to a failing v2. Every call is logged under the
//! `audit` target and counted in `rollout_ramp_gate_calls_total`.

use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request};
use http_body_util::Full;
use serde::Serialize;
use serde_json::{json, Value};
use tracing::info;

use crate::clock::UnixMillis;
use crate::config::ramp::{GateOn, Plan, RawGate};
use crate::metrics::Metrics;

/// The wait before calling a gate again that did not answer, times the attempt.
const RETRY_BACKOFF: Duration = Duration::from_millis(500);

/// One gate's answer, as `GET /ramp` shows it.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Answer {
    pub gate: String,
    pub at_unix_ms: UnixMillis,
    /// Whether the gate said yes (a 2xx).
    pub open: bool,
    pub status: Option<u16>,
    pub error: Option<String>,
    pub attempts: u32,
}

impl Answer {
    /// What the gate answered: its status, or why there was none.
    pub(crate) fn said(&self) -> String {
        self.status.map_or_else(|| self.error.clone().unwrap_or_default(), |s| s.to_string())
    }
}

/// Calls the gates, over HTTP/1.1, plain or TLS.
pub(crate) struct Gates {
    client: crate::tls::HttpsClient,
}

impl Gates {
    pub(crate) fn new() -> Gates {
        Gates { client: crate::tls::https_client(None).expect("the public web roots load") }
    }

    /// Asks every step gate whether the ramp may move on to step `to`; the answers, in the
    /// plan's order. It may move on only if every one is open.
    pub(crate) async fn ask(
        &self,
        plan: &Plan,
        to: usize,
        now: UnixMillis,
        metrics: &Metrics,
    ) -> Vec<Answer> {
        let v1_percent = plan.steps()[to].v1_percent.as_f64();
        let mut answers = Vec::new();
        for gate in plan.gates(GateOn::Step) {
            let payload = json!({
                "name": plan.name(),
                "namespace": plan.namespace(),
                "phase": "Progressing",
                "type": "confirm-traffic-increase",
                "checksum": "",
                "metadata": gate.metadata,
                "step": to,
                "v1_percent": v1_percent,
            });
            answers.push(self.call(gate, &payload, now, to, metrics).await);
        }
        answers
    }

    /// Tells every abort gate that the ramp aborted at `step`, and why.
    pub(crate) async fn tell_abort(
        &self,
        plan: &Plan,
        step: usize,
        why: &str,
        now: UnixMillis,
        metrics: &Metrics,
    ) -> Vec<Answer> {
        let mut answers = Vec::new();
        for gate in plan.gates(GateOn::Abort) {
            let mut metadata = gate.metadata.clone();
            metadata.insert("eventMessage".to_owned(), format!("ramp aborted at step {step}: {why}"));
            metadata.insert("eventType".to_owned(), "Warning".to_owned());
            let payload = json!({
                "name": plan.name(),
                "namespace": plan.namespace(),
                "phase": "Failed",
                "type": "event",
                "checksum": "",
                "metadata": metadata,
                "step": step,
                "v1_percent": 100.0,
            });
            answers.push(self.call(gate, &payload, now, step, metrics).await);
        }
        answers
    }

    /// One gate, tried again (after a short wait) when it does not answer or answers 5xx, up
    /// to its `retries`.
    async fn call(
        &self,
        gate: &RawGate,
        payload: &Value,
        now: UnixMillis,
        step: usize,
        metrics: &Metrics,
    ) -> Answer {
        let body = Bytes::from(serde_json::to_vec(payload).expect("a payload serializes"));
        let mut attempts = 0;
        let (status, error) = loop {
            attempts += 1;
            let outcome = self.send(gate, body.clone()).await;
            let transient = match &outcome {
                Ok(status) => *status >= 500,
                Err(_) => true,
            };
            if !transient || attempts > gate.retries {
                break match outcome {
                    Ok(status) => (Some(status), None),
                    Err(error) => (None, Some(error)),
                };
            }
            tokio::time::sleep(RETRY_BACKOFF * attempts).await;
        };
        let open = status.is_some_and(|s| (200..300).contains(&s));
        let result = match (open, status) {
            (true, _) => "open",
            (false, Some(_)) => "closed",
            (false, None) => "error",
        };
        metrics.ramp_gate_calls.with_label_values(&[result]).inc();
        info!(
            target: "audit", actor = "ramp", kind = "ramp_gate", gate = %gate.name, on = ?gate.on, url = %gate.url,
            step, attempts, status = ?status, error = ?error, result, "gate called"
        );
        Answer { gate: gate.name.clone(), at_unix_ms: now, open, status, error, attempts }
    }

    /// One POST of `body` to the gate; its status, or why there was none.
    async fn send(&self, gate: &RawGate, body: Bytes) -> Result<u16, String> {
        let request = Request::builder()
            .method(Method::POST)
            .uri(&gate.url)
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::USER_AGENT, concat!("rollout-proxy/", env!("CARGO_PKG_VERSION")))
            .body(Full::new(body))
            .map_err(|e| e.to_string())?;
        match tokio::time::timeout(gate.timeout, self.client.request(request)).await {
            Err(_) => Err(format!("no answer within {}", humantime::format_duration(gate.timeout))),
            Ok(Err(error)) => Err(crate::ErrorChain(&error).to_string()),
            Ok(Ok(response)) => Ok(response.status().as_u16()),
        }
    }
}
