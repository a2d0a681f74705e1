//! Judges one step of a ramp from both pools' traffic over the analysis window: pass, fail or
//! inconclusive.
//!
//! Arithmetic on counts only: gathering them from the proxy's own counters is the ramp
//! runner's job, acting on a verdict is [`super::machine`]'s. The rule everywhere is the same:
//! a number known only within a range (an error ratio from a sample, a p99 from histogram
//! buckets) fails the step when the whole range is over its bound, passes it when the whole range
//! is under, and otherwise leaves the step held. So a step is never failed on a handful of
//! unlucky requests, nor passed on a handful of lucky ones.

use std::time::Duration;

use serde::Serialize;

use crate::config::ramp::Analysis;

pub(crate) use crate::metrics::LATENCY_BUCKETS;

/// z for a two-sided 95 % interval.
const Z: f64 = 1.959_963_984_540_054;

/// One pool's traffic over the window.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct PoolSample {
    pub requests: u64,
    /// Answers with a 5xx status, the proxy's own 502, 503 and 504 included.
    pub errors: u64,
    /// Requests per duration bucket ([`LATENCY_BUCKETS`], then one past the last bound).
    pub latency: [u64; LATENCY_BUCKETS.len() + 1],
}

/// Both pools over the window, and the new sessions v2 got in the step so far.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Sample {
    pub v1: PoolSample,
    pub v2: PoolSample,
    pub new_v2_sessions: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Pass,
    Fail,
    Inconclusive,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Pass => "pass",
            Verdict::Fail => "fail",
            Verdict::Inconclusive => "inconclusive",
        }
    }
}

/// A judgement with the numbers behind it, as `GET /ramp` shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Judgement {
    pub verdict: Verdict,
    /// v2's 5xx ratio in the window, and its 95 % interval.
    pub v2_error_ratio: Option<f64>,
    pub v2_error_interval: Option<(f64, f64)>,
    /// The bound v2's ratio is held to (the larger of the absolute one and v1's plus the margin).
    pub error_bound: f64,
    /// The histogram bucket v2's p99 lies in, in seconds.
    pub v2_p99_range: Option<(f64, f64)>,
    /// The p99 bound v2 is held to, in seconds.
    pub p99_bound: f64,
    /// Why the step did not pass, one line per reason.
    pub reasons: Vec<String>,
}

/// The Wilson score interval of a ratio of `hits` in `n` (Wilson 1927): unlike the normal
/// approximation it stays within 0–1 and is sound for small counts and ratios near 0.
pub(crate) fn wilson(hits: u64, n: u64) -> Option<(f64, f64)> {
    if n == 0 {
        return None;
    }
    let (n, p) = (n as f64, hits as f64 / n as f64);
    let z2 = Z * Z;
    let centre = (p + z2 / (2.0 * n)) / (1.0 + z2 / n);
    let half = Z * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt() / (1.0 + z2 / n);
    Some(((centre - half).max(0.0), (centre + half).min(1.0)))
}

/// The bucket a pool's p99 lies in: (lower, upper) bounds in seconds, the last bucket's upper
/// bound infinite. `None` without requests.
pub(crate) fn p99_range(latency: &[u64; LATENCY_BUCKETS.len() + 1]) -> Option<(f64, f64)> {
    let total: u64 = latency.iter().sum();
    if total == 0 {
        return None;
    }
    // The 99th percentile is the request at rank ceil(0.99 n).
    let rank = (total * 99).div_ceil(100);
    let mut seen = 0;
    for (i, count) in latency.iter().enumerate() {
        seen += count;
        if seen >= rank {
            let lower = if i == 0 { 0.0 } else { LATENCY_BUCKETS[i - 1] };
            let upper = LATENCY_BUCKETS.get(i).copied().unwrap_or(f64::INFINITY);
            return Some((lower, upper));
        }
    }
    None
}

/// The rule for a number known only within `(low, high)`: fail when the whole range is over
/// its bound (`over`, as the caller's kind of range decides), pass when all of it is within
/// `pass_bound`, and otherwise hold.
fn place((_, high): (f64, f64), over: bool, pass_bound: f64) -> Verdict {
    if over {
        Verdict::Fail
    } else if high <= pass_bound {
        Verdict::Pass
    } else {
        Verdict::Inconclusive
    }
}

/// Judges a step's window by `analysis`.
pub fn judge(sample: &Sample, analysis: &Analysis) -> Judgement {
    let mut reasons = Vec::new();
    let mut verdicts = Vec::new();

    // Errors: v2's interval against the larger of the absolute bound and v1's ratio plus the
    // margin. v1's ratio is used only from a sample as large as v2 must have, and then its own
    // interval's far end for failing (never fail v2 for v1's bad luck) and near end for passing.
    let v2_interval = wilson(sample.v2.errors, sample.v2.requests);
    let v1_interval = (sample.v1.requests >= analysis.min_requests)
        .then(|| wilson(sample.v1.errors, sample.v1.requests))
        .flatten();
    let bound = |v1: Option<f64>| {
        v1.map_or(analysis.max_error_ratio, |r| {
            analysis.max_error_ratio.max(r + analysis.max_error_ratio_over_v1)
        })
    };
    let (fail_bound, pass_bound) = (bound(v1_interval.map(|i| i.1)), bound(v1_interval.map(|i| i.0)));
    match v2_interval {
        _ if sample.v2.requests < analysis.min_requests => {
            reasons.push(format!(
                "{} v2 requests in the window, fewer than the {} needed",
                sample.v2.requests, analysis.min_requests
            ));
            verdicts.push(Verdict::Inconclusive);
        }
        None => verdicts.push(Verdict::Inconclusive),
        Some((low, high)) => {
            let verdict = place((low, high), low > fail_bound, pass_bound);
            match verdict {
                Verdict::Fail => reasons.push(format!(
                    "v2's 5xx ratio is at least {low:.4} (95 % interval), over the bound {fail_bound:.4}"
                )),
                Verdict::Inconclusive => reasons.push(format!(
                    "v2's 5xx ratio lies within {low:.4}–{high:.4} (95 % interval), across the bound {pass_bound:.4}"
                )),
                Verdict::Pass => {}
            }
            verdicts.push(verdict);
        }
    }

    // Latency: the bucket v2's p99 lies in against the larger of the absolute bound and v1's
    // p99 times the factor; v1's bucket's upper end for failing, its lower end for passing.
    let latency_samples = |p: &PoolSample| p.latency.iter().sum::<u64>();
    let v2_p99 = p99_range(&sample.v2.latency);
    let v1_p99 = (latency_samples(&sample.v1) >= analysis.min_latency_samples)
        .then(|| p99_range(&sample.v1.latency))
        .flatten();
    let max_p99 = analysis.max_p99.as_secs_f64();
    let p99_bound = |v1: Option<f64>| v1.map_or(max_p99, |p| max_p99.max(p * analysis.max_p99_ratio_to_v1));
    let (p99_fail_bound, p99_pass_bound) = (p99_bound(v1_p99.map(|r| r.1)), p99_bound(v1_p99.map(|r| r.0)));
    match v2_p99 {
        _ if latency_samples(&sample.v2) < analysis.min_latency_samples => {
            reasons.push(format!(
                "{} v2 latency samples in the window, fewer than the {} needed",
                latency_samples(&sample.v2),
                analysis.min_latency_samples
            ));
            verdicts.push(Verdict::Inconclusive);
        }
        None => verdicts.push(Verdict::Inconclusive),
        Some((low, high)) => {
            // A bucket holds durations above its lower bound: a p99 in it is over that bound.
            let verdict = place((low, high), low >= p99_fail_bound, p99_pass_bound);
            match verdict {
                Verdict::Fail => reasons.push(format!(
                    "v2's p99 is at least {}, over the bound {}",
                    seconds(low),
                    seconds(p99_fail_bound)
                )),
                Verdict::Inconclusive => reasons.push(format!(
                    "v2's p99 lies within {}–{}, across the bound {}",
                    seconds(low),
                    seconds(high),
                    seconds(p99_pass_bound)
                )),
                Verdict::Pass => {}
            }
            verdicts.push(verdict);
        }
    }

    if sample.new_v2_sessions < analysis.min_new_sessions {
        reasons.push(format!(
            "{} new v2 sessions in the step, fewer than the {} needed",
            sample.new_v2_sessions, analysis.min_new_sessions
        ));
        verdicts.push(Verdict::Inconclusive);
    }

    let verdict = if verdicts.contains(&Verdict::Fail) {
        Verdict::Fail
    } else if verdicts.iter().all(|v| *v == Verdict::Pass) {
        Verdict::Pass
    } else {
        Verdict::Inconclusive
    };
    Judgement {
        verdict,
        v2_error_ratio: (sample.v2.requests > 0).then(|| sample.v2.errors as f64 / sample.v2.requests as f64),
        v2_error_interval: v2_interval,
        error_bound: pass_bound,
        v2_p99_range: v2_p99,
        p99_bound: p99_pass_bound,
        reasons,
    }
}

fn seconds(value: f64) -> String {
    if value.is_infinite() {
        "more than 10s".to_owned()
    } else {
        humantime::format_duration(Duration::from_secs_f64(value)).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ramp::{Plan, RawAnalysis, RawPlan};

    fn analysis(edit: impl FnOnce(&mut RawAnalysis)) -> Analysis {
        let mut raw = RawAnalysis { min_new_sessions: 0, ..RawAnalysis::default() };
        edit(&mut raw);
        let mut plan: RawPlan = serde_json::from_str(r#"{"steps": [{"v1_percent": 0}]}"#).unwrap();
        plan.analysis = raw;
        Plan::try_from_raw(plan, "ramp").unwrap().analysis().clone()
    }

    /// `n` requests, `errors` of them 5xx, all taking about `seconds`.
    fn pool(n: u64, errors: u64, seconds: f64) -> PoolSample {
        let mut latency = [0; LATENCY_BUCKETS.len() + 1];
        let bucket = LATENCY_BUCKETS.iter().position(|b| seconds <= *b).unwrap_or(LATENCY_BUCKETS.len());
        latency[bucket] = n;
        PoolSample { requests: n, errors, latency }
    }

    #[test]
    fn the_wilson_interval_matches_published_values_and_stays_within_0_and_1() {
        // Newcombe (1998), table I: 81 of 263 → 0.2553–0.3662; 0 of 10 → 0–0.2775.
        let (low, high) = wilson(81, 263).unwrap();
        assert!((low - 0.2553).abs() < 5e-4 && (high - 0.3662).abs() < 5e-4, "{low} {high}");
        let (low, high) = wilson(0, 10).unwrap();
        assert!(low == 0.0 && (high - 0.2775).abs() < 5e-4, "{low} {high}");
        assert!(wilson(10, 10).unwrap().1 > 1.0 - 1e-12);
        assert_eq!(wilson(0, 0), None);
    }

    #[test]
    fn the_p99_is_known_to_the_bucket_it_falls_in() {
        let mut latency = [0; LATENCY_BUCKETS.len() + 1];
        latency[3] = 98; // 5–10 ms
        latency[9] = 2; // 0.5–1 s
        assert_eq!(p99_range(&latency), Some((0.5, 1.0)), "the 99th of 100 is in the slow bucket");
        latency[3] = 990;
        latency[9] = 10;
        assert_eq!(p99_range(&latency), Some((0.005, 0.01)), "the 990th of 1,000 is not");
        latency[13] = 1_000;
        assert_eq!(p99_range(&latency).unwrap().1, f64::INFINITY);
        assert_eq!(p99_range(&[0; LATENCY_BUCKETS.len() + 1]), None);
    }

    #[test]
    fn errors_fail_a_step_only_when_the_whole_interval_is_over_the_bound() {
        let a = analysis(|_| {});
        let judge_errors = |v1: PoolSample, v2: PoolSample| judge(&Sample { v1, v2, new_v2_sessions: 0 }, &a);
        // v2 answers 1 % 5xx, v1 0.5 %: well under 5 %.
        assert_eq!(judge_errors(pool(10_000, 50, 0.02), pool(2_000, 20, 0.02)).verdict, Verdict::Pass);
        // 20 % 5xx on 2,000 requests: over 5 % for certain.
        let failed = judge_errors(pool(10_000, 50, 0.02), pool(2_000, 400, 0.02));
        assert_eq!(failed.verdict, Verdict::Fail, "{failed:?}");
        // 6 % on 600 requests: the interval (4.4–8.1 %) straddles 5 %: hold, do not fail.
        let unsure = judge_errors(pool(10_000, 50, 0.02), pool(600, 36, 0.02));
        assert_eq!(unsure.verdict, Verdict::Inconclusive, "{unsure:?}");
        // 5.5 %, over the absolute 5 %, passes when v1 answers 5.5 % too: v2 is held to v1's
        // ratio plus 1 %.
        assert_eq!(
            judge_errors(pool(100_000, 5_500, 0.02), pool(20_000, 1_100, 0.02)).verdict,
            Verdict::Pass
        );
        // Too few v2 requests: no verdict, however bad they look.
        let few = judge_errors(pool(10_000, 0, 0.02), pool(100, 100, 0.02));
        assert_eq!(few.verdict, Verdict::Inconclusive);
        assert_eq!(few.reasons[0], "100 v2 requests in the window, fewer than the 500 needed");
    }

    #[test]
    fn latency_fails_a_step_when_v2s_p99_is_over_the_larger_of_the_limit_and_v1s_times_the_factor() {
        let a = analysis(|_| {});
        let judge_latency =
            |v1: PoolSample, v2: PoolSample| judge(&Sample { v1, v2, new_v2_sessions: 0 }, &a).verdict;
        assert_eq!(judge_latency(pool(10_000, 0, 0.02), pool(1_000, 0, 0.04)), Verdict::Pass);
        // v2 at 2–2.5 s against a 1 s limit and v1 at 10–25 ms.
        assert_eq!(judge_latency(pool(10_000, 0, 0.02), pool(1_000, 0, 2.2)), Verdict::Fail);
        // v1 itself at 1–2.5 s: v2 may take 1.5 × that; 2–2.5 s straddles the bound.
        assert_eq!(judge_latency(pool(10_000, 0, 2.2), pool(1_000, 0, 2.2)), Verdict::Inconclusive);
        assert_eq!(judge_latency(pool(10_000, 0, 4.0), pool(1_000, 0, 2.2)), Verdict::Pass);
    }

    #[test]
    fn a_step_needs_its_new_sessions_before_it_can_pass_but_can_fail_without_them() {
        let a = analysis(|raw| raw.min_new_sessions = 50);
        let sample = |errors, sessions| Sample {
            v1: pool(10_000, 0, 0.02),
            v2: pool(1_000, errors, 0.02),
            new_v2_sessions: sessions,
        };
        assert_eq!(judge(&sample(0, 49), &a).verdict, Verdict::Inconclusive);
        assert_eq!(judge(&sample(0, 50), &a).verdict, Verdict::Pass);
        assert_eq!(judge(&sample(500, 0), &a).verdict, Verdict::Fail);
    }
}
