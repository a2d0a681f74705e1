//! A ramp plan: the steps of `legacy_v1_percent` a ramp walks through, and the analysis that
//! judges each step.
//!
//! This module says what a plan is and whether it makes sense, as written (plain serde, so the
//! config file's `ramp:` section, a plan file for `ctl ramp start` and the JSON body of
//! `PUT /ramp` are one document) and as checked. Judging a step's numbers is
//! [`crate::ramp::guard`]'s job, running a plan is [`crate::ramp::machine`]'s.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::Percent;

/// A plan as written: under `ramp:` in the config file, or as the body of `PUT /ramp`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawPlan {
    /// What the ramp is of, as gates are told (Flagger's canary name and namespace).
    #[serde(default = "default_name")]
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    pub steps: Vec<RawStep>,
    #[serde(default)]
    pub analysis: RawAnalysis,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gates: Vec<RawGate>,
}

fn default_name() -> String {
    "rollout".to_owned()
}

fn default_namespace() -> String {
    "default".to_owned()
}

/// A webhook the ramp calls, with Flagger's payload: before each step (any answer but 2xx holds
/// the step) or when the ramp aborts (told only; an abort is never held).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawGate {
    pub name: String,
    /// `http://` or `https://` (checked against the public web roots).
    pub url: String,
    #[serde(default)]
    pub on: GateOn,
    /// How long one call may take.
    #[serde(default = "default_gate_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Calls after a first one that failed or timed out (not after a clear non-2xx answer).
    #[serde(default = "default_gate_retries")]
    pub retries: u32,
    /// Sent as the payload's `metadata`, as Flagger's webhooks do.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GateOn {
    /// Before the share moves to the next step (Flagger's `confirm-traffic-increase`).
    #[default]
    Step,
    /// When the ramp aborts (Flagger's `event`, phase `Failed`).
    Abort,
}

fn default_gate_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_gate_retries() -> u32 {
    2
}

/// The longest a gate call may be allowed: longer would leave a step's fate unknown for long.
const MAX_GATE_TIMEOUT: Duration = Duration::from_secs(300);
const MAX_GATE_RETRIES: u32 = 10;

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawStep {
    pub v1_percent: f64,
    /// How long the step lasts at least; the last step may have none (the ramp completes when
    /// it is reached).
    #[serde(default, with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub hold: Option<Duration>,
}

/// How each step is judged; every field has a default.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawAnalysis {
    /// How often the step is judged.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// How far back each judgement looks.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// v2 requests the window must hold before its error ratio is judged.
    pub min_requests: u64,
    /// New v2 sessions the step must have made before it may pass.
    pub min_new_sessions: u64,
    /// v2's 5xx ratio may always reach this much...
    pub max_error_ratio: f64,
    /// ...or v1's ratio in the same window plus this much, whichever is larger.
    pub max_error_ratio_over_v1: f64,
    /// v2's p99 may always reach this much...
    #[serde(with = "humantime_serde")]
    pub max_p99: Duration,
    /// ...or v1's p99 in the same window times this, whichever is larger.
    pub max_p99_ratio_to_v1: f64,
    /// Requests a pool's window must hold before its p99 is judged, or used as v1's yardstick.
    pub min_latency_samples: u64,
    /// Failed judgements in a row that abort the ramp.
    pub failure_limit: u32,
    /// How long a step may stay inconclusive before the ramp pauses.
    #[serde(with = "humantime_serde")]
    pub inconclusive_timeout: Duration,
}

impl Default for RawAnalysis {
    fn default() -> Self {
        RawAnalysis {
            interval: Duration::from_secs(60),
            window: Duration::from_secs(600),
            min_requests: 500,
            min_new_sessions: 50,
            max_error_ratio: 0.05,
            max_error_ratio_over_v1: 0.01,
            max_p99: Duration::from_secs(1),
            max_p99_ratio_to_v1: 1.5,
            min_latency_samples: 100,
            failure_limit: 3,
            inconclusive_timeout: Duration::from_secs(2 * 3600),
        }
    }
}

/// A validated plan: at least one step, each lowering v1's share, every step but the last held
/// for a while.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    name: String,
    namespace: String,
    steps: Vec<Step>,
    analysis: Analysis,
    gates: Vec<RawGate>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Step {
    pub v1_percent: Percent,
    /// Zero only for a last step without a hold.
    pub hold: Duration,
}

/// The analysis settings, checked: ratios within 0–1, a window no shorter than the interval.
#[derive(Debug, Clone, PartialEq)]
pub struct Analysis(RawAnalysis);

impl std::ops::Deref for Analysis {
    type Target = RawAnalysis;
    fn deref(&self) -> &RawAnalysis {
        &self.0
    }
}

/// What is wrong with a plan, naming the field as it is written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct PlanError {
    pub field: String,
    pub problem: String,
}

fn invalid(field: impl Into<String>, problem: impl Into<String>) -> PlanError {
    PlanError { field: field.into(), problem: problem.into() }
}

impl Plan {
    /// Checks a plan as written. `field` is where it was found (`ramp` in the config file), for
    /// the messages.
    pub fn try_from_raw(raw: RawPlan, field: &str) -> Result<Plan, PlanError> {
        if raw.steps.is_empty() {
            return Err(invalid(format!("{field}.steps"), "a ramp needs at least one step"));
        }
        let last = raw.steps.len() - 1;
        let mut steps = Vec::with_capacity(raw.steps.len());
        for (i, step) in raw.steps.iter().enumerate() {
            let at = format!("{field}.steps[{i}]");
            let v1_percent =
                Percent::try_from_f64(step.v1_percent).map_err(|p| invalid(format!("{at}.v1_percent"), p))?;
            if let Some(previous) = steps.last().map(|s: &Step| s.v1_percent) {
                if v1_percent >= previous {
                    return Err(invalid(
                        format!("{at}.v1_percent"),
                        format!("{v1_percent} does not lower v1's share from the step before ({previous})"),
                    ));
                }
            }
            let hold = match step.hold {
                Some(hold) if hold.is_zero() && i != last => {
                    return Err(invalid(format!("{at}.hold"), "only the last step may have no hold"))
                }
                Some(hold) => hold,
                None if i == last => Duration::ZERO,
                None => return Err(invalid(format!("{at}.hold"), "every step but the last needs a hold")),
            };
            steps.push(Step { v1_percent, hold });
        }
        let analysis = Analysis::try_from_raw(raw.analysis, &format!("{field}.analysis"))?;
        for (i, gate) in raw.gates.iter().enumerate() {
            check_gate(gate, &format!("{field}.gates[{i}]"))?;
            if raw.gates[..i].iter().any(|other| other.name == gate.name) {
                return Err(invalid(
                    format!("{field}.gates[{i}].name"),
                    format!("{:?} is used twice", gate.name),
                ));
            }
        }
        Ok(Plan { name: raw.name, namespace: raw.namespace, steps, analysis, gates: raw.gates })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The gates called `on` that occasion.
    pub fn gates(&self, on: GateOn) -> impl Iterator<Item = &RawGate> {
        self.gates.iter().filter(move |gate| gate.on == on)
    }

    pub fn steps(&self) -> &[Step] {
        &self.steps
    }

    pub fn analysis(&self) -> &Analysis {
        &self.analysis
    }

    /// The plan as it would be written, for `GET /ramp`.
    pub fn to_raw(&self) -> RawPlan {
        let last = self.steps.len() - 1;
        RawPlan {
            name: self.name.clone(),
            namespace: self.namespace.clone(),
            steps: self
                .steps
                .iter()
                .enumerate()
                .map(|(i, s)| RawStep {
                    v1_percent: s.v1_percent.as_f64(),
                    hold: (i != last || !s.hold.is_zero()).then_some(s.hold),
                })
                .collect(),
            analysis: self.analysis.0.clone(),
            gates: self.gates.clone(),
        }
    }
}

fn check_gate(gate: &RawGate, at: &str) -> Result<(), PlanError> {
    if gate.name.is_empty() {
        return Err(invalid(format!("{at}.name"), "a gate needs a name"));
    }
    let uri: http::Uri = gate
        .url
        .parse()
        .map_err(|e| invalid(format!("{at}.url"), format!("{:?} is not a URL: {e}", gate.url)))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none_or(str::is_empty) {
        return Err(invalid(
            format!("{at}.url"),
            format!("{:?} is not an http:// or https:// URL with a host", gate.url),
        ));
    }
    if gate.timeout.is_zero() || gate.timeout > MAX_GATE_TIMEOUT {
        return Err(invalid(
            format!("{at}.timeout"),
            format!(
                "{} is not between 0 and {}",
                humantime::format_duration(gate.timeout),
                humantime::format_duration(MAX_GATE_TIMEOUT)
            ),
        ));
    }
    if gate.retries > MAX_GATE_RETRIES {
        return Err(invalid(
            format!("{at}.retries"),
            format!("{} is more than {MAX_GATE_RETRIES}", gate.retries),
        ));
    }
    Ok(())
}

impl Analysis {
    fn try_from_raw(raw: RawAnalysis, field: &str) -> Result<Analysis, PlanError> {
        let at = |name: &str| format!("{field}.{name}");
        if raw.interval.is_zero() {
            return Err(invalid(at("interval"), "must be longer than zero"));
        }
        if raw.window < raw.interval {
            return Err(invalid(
                at("window"),
                format!(
                    "{} is shorter than the interval ({})",
                    humantime::format_duration(raw.window),
                    humantime::format_duration(raw.interval)
                ),
            ));
        }
        for (name, ratio) in [
            ("max_error_ratio", raw.max_error_ratio),
            ("max_error_ratio_over_v1", raw.max_error_ratio_over_v1),
        ] {
            if !ratio.is_finite() || !(0.0..=1.0).contains(&ratio) {
                return Err(invalid(at(name), format!("{ratio} is not a ratio between 0 and 1")));
            }
        }
        if !raw.max_p99_ratio_to_v1.is_finite() || raw.max_p99_ratio_to_v1 < 1.0 {
            return Err(invalid(
                at("max_p99_ratio_to_v1"),
                format!("{} would hold v2 to a p99 below v1's; use 1 or more", raw.max_p99_ratio_to_v1),
            ));
        }
        if raw.max_p99.is_zero() {
            return Err(invalid(at("max_p99"), "must be longer than zero"));
        }
        if raw.failure_limit == 0 {
            return Err(invalid(at("failure_limit"), "must be at least 1"));
        }
        if raw.inconclusive_timeout < raw.interval {
            return Err(invalid(at("inconclusive_timeout"), "is shorter than the interval"));
        }
        Ok(Analysis(raw))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(json: &str) -> Result<Plan, PlanError> {
        Plan::try_from_raw(serde_json::from_str(json).unwrap(), "ramp")
    }

    #[test]
    fn a_plan_steps_down_v1s_share_with_a_hold_on_every_step_but_the_last() {
        let ok = plan(r#"{"steps": [{"v1_percent": 99.75, "hold": "30m"}, {"v1_percent": 50, "hold": "1h"}, {"v1_percent": 0}]}"#)
            .unwrap();
        assert_eq!(ok.steps().len(), 3);
        assert_eq!(ok.steps()[0].hold, Duration::from_secs(1800));
        assert_eq!(ok.steps()[2].hold, Duration::ZERO);
        assert_eq!(ok.analysis().failure_limit, 3, "defaults fill the analysis");
        // Written back, it reads the same.
        let again = Plan::try_from_raw(
            serde_json::from_value(serde_json::to_value(ok.to_raw()).unwrap()).unwrap(),
            "ramp",
        );
        assert_eq!(again.unwrap(), ok);

        let problem = |json| plan(json).unwrap_err().to_string();
        assert_eq!(problem(r#"{"steps": []}"#), "ramp.steps: a ramp needs at least one step");
        assert_eq!(
            problem(r#"{"steps": [{"v1_percent": 50, "hold": "1h"}, {"v1_percent": 60}]}"#),
            "ramp.steps[1].v1_percent: 60% does not lower v1's share from the step before (50%)"
        );
        assert_eq!(
            problem(r#"{"steps": [{"v1_percent": 50}, {"v1_percent": 0}]}"#),
            "ramp.steps[0].hold: every step but the last needs a hold"
        );
        assert_eq!(
            problem(r#"{"steps": [{"v1_percent": 101, "hold": "1h"}]}"#),
            "ramp.steps[0].v1_percent: 101 is not a percentage between 0 and 100"
        );
        assert_eq!(
            problem(r#"{"steps": [{"v1_percent": 0}], "analysis": {"interval": "5m", "window": "1m"}}"#),
            "ramp.analysis.window: 1m is shorter than the interval (5m)"
        );
        assert_eq!(
            problem(r#"{"steps": [{"v1_percent": 0}], "analysis": {"max_error_ratio": 5}}"#),
            "ramp.analysis.max_error_ratio: 5 is not a ratio between 0 and 1"
        );
        assert_eq!(
            problem(r#"{"steps": [{"v1_percent": 0}], "analysis": {"failure_limit": 0}}"#),
            "ramp.analysis.failure_limit: must be at least 1"
        );
        let unknown: Result<RawPlan, _> = serde_json::from_str(r#"{"steps": [], "stpes": 1}"#);
        assert!(unknown.unwrap_err().to_string().contains("unknown field `stpes`"));
    }

    #[test]
    fn gates_need_a_unique_name_an_http_url_and_sane_limits() {
        let with_gates =
            |gates: &str| plan(&format!(r#"{{"steps": [{{"v1_percent": 0}}], "gates": {gates}}}"#));
        let ok = with_gates(r#"[{"name": "a", "url": "https://ci.example/gate"}, {"name": "b", "on": "abort", "url": "http://10.0.0.1:8080/x"}]"#)
            .unwrap();
        assert_eq!(ok.gates(GateOn::Step).map(|g| g.name.as_str()).collect::<Vec<_>>(), ["a"]);
        assert_eq!(ok.gates(GateOn::Abort).next().unwrap().timeout, Duration::from_secs(10));
        assert_eq!(Plan::try_from_raw(ok.to_raw(), "ramp").unwrap(), ok, "written back as read");
        for (gates, message) in [
            (r#"[{"name": "", "url": "http://a/"}]"#, "ramp.gates[0].name: a gate needs a name"),
            (
                r#"[{"name": "a", "url": "ftp://a/"}]"#,
                "ramp.gates[0].url: \"ftp://a/\" is not an http:// or https:// URL with a host",
            ),
            (
                r#"[{"name": "a", "url": "http://a/"}, {"name": "a", "url": "http://b/"}]"#,
                "ramp.gates[1].name: \"a\" is used twice",
            ),
            (
                r#"[{"name": "a", "url": "http://a/", "timeout": "10m"}]"#,
                "ramp.gates[0].timeout: 10m is not between 0 and 5m",
            ),
            (
                r#"[{"name": "a", "url": "http://a/", "retries": 11}]"#,
                "ramp.gates[0].retries: 11 is more than 10",
            ),
        ] {
            assert_eq!(with_gates(gates).unwrap_err().to_string(), message);
        }
    }
}
