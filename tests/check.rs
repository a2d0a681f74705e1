//! `rollout-proxy check`: every kind of bad config is rejected with file, line, column and key.

mod support;

use std::path::Path;

use support::edit;

const GOOD: &str = "\
listen: \"0.0.0.0:8080\"
pools:
  v1:
    upstreams:
      - { name: was-1, url: \"http://10.0.1.11:8080\", weight: 1 }
      - { name: was-2, url: \"http://10.0.1.12:8080\", weight: 1 }
  v2:
    upstreams:
      - { name: was-3, url: \"http://10.0.2.11:8080\" }
routes:
  v2_prefixes: [\"/api/v2\"]
  legacy_v1_percent: 100
drain:
  quiet_window: 24h
";

/// Runs `check` on `text`, returning (exit code, stdout, stderr).
fn check(dir: &Path, text: &str) -> (Option<i32>, String, String) {
    let file = dir.join("rollout.yaml");
    std::fs::write(&file, text).unwrap();
    let out = support::binary().args(["check", "--config", file.to_str().unwrap()]).output().unwrap();
    (out.status.code(), String::from_utf8(out.stdout).unwrap(), String::from_utf8(out.stderr).unwrap())
}

fn assert_rejected(text: &str, expected: &str) {
    let dir = tempfile::tempdir().unwrap();
    let (code, _, stderr) = check(dir.path(), text);
    assert_eq!(code, Some(1), "exit code; stderr: {stderr}");
    let want = format!("{}:{expected}", dir.path().join("rollout.yaml").display());
    assert!(stderr.contains(&want), "expected {want:?} in:\n{stderr}");
}

#[test]
fn good_config_prints_the_effective_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let (code, stdout, stderr) = check(dir.path(), GOOD);
    assert_eq!(code, Some(0), "{stderr}");
    // Defaults the file does not mention are filled in.
    for default in
        ["max_duration: 10h 40m", "header_read_timeout: 10s", "listen: 127.0.0.1:9901", "pool_header: true"]
    {
        assert!(stdout.contains(default), "{default:?} missing from:\n{stdout}");
    }
}

#[test]
fn unknown_key() {
    assert_rejected(
        &edit(GOOD, "weight: 1 }\n      - { name: was-2", "wieght: 1 }\n      - { name: was-2"),
        "5:54: pools.v1.upstreams[0]: unknown field `wieght`, expected one of `name`, `url`, `weight`\n",
    );
}

#[test]
fn unknown_top_level_section() {
    assert_rejected(&format!("{GOOD}sesions: {{}}\n"), "15:1: unknown field `sesions`");
}

#[test]
fn bad_url() {
    assert_rejected(
        &edit(GOOD, "http://10.0.1.12:8080", "ftp://10.0.1.12"),
        "6:29: pools.v1.upstreams[1].url: \"ftp://10.0.1.12\": scheme ftp is not supported",
    );
    assert_rejected(
        &edit(GOOD, "http://10.0.2.11:8080", "10.0.2.11"),
        "9:29: pools.v2.upstreams[0].url: \"10.0.2.11\" must be an absolute URL",
    );
}

#[test]
fn duplicate_upstream_name() {
    assert_rejected(
        &edit(GOOD, "name: was-2", "name: was-1"),
        "6:17: pools.v1.upstreams[1].name: duplicate upstream name \"was-1\"",
    );
}

#[test]
fn percent_over_100() {
    assert_rejected(
        &edit(GOOD, "legacy_v1_percent: 100", "legacy_v1_percent: 101"),
        "12:22: routes.legacy_v1_percent: 101 is not a percentage between 0 and 100",
    );
}

#[test]
fn empty_pool() {
    let text = edit(
        GOOD,
        "    upstreams:\n      - { name: was-3, url: \"http://10.0.2.11:8080\" }\n",
        "    upstreams: []\n",
    );
    assert_rejected(&text, "8:16: pools.v2.upstreams: pool has no upstreams");
}

#[test]
fn missing_pool() {
    let text =
        edit(GOOD, "  v2:\n    upstreams:\n      - { name: was-3, url: \"http://10.0.2.11:8080\" }\n", "");
    assert_rejected(&text, "3:3: pools: missing field `v2`");
}

#[test]
fn bad_duration() {
    assert_rejected(
        &edit(GOOD, "quiet_window: 24h", "quiet_window: 24 hours and a bit"),
        "14:17: drain.quiet_window: ",
    );
}

#[test]
fn prefix_without_leading_slash() {
    assert_rejected(
        &edit(GOOD, "[\"/api/v2\"]", "[\"/api/v3\", \"api/v2\"]"),
        "11:28: routes.v2_prefixes[1]: prefix \"api/v2\" must start with '/'",
    );
}

#[test]
fn bad_listen_address() {
    assert_rejected(
        &edit(GOOD, "0.0.0.0:8080", "localhost"),
        "1:9: listen: \"localhost\" is not an IP:port address",
    );
}

#[test]
fn every_problem_is_reported_at_once() {
    let text =
        edit(&edit(GOOD, "legacy_v1_percent: 100", "legacy_v1_percent: -1"), "name: was-2", "name: was-1");
    let dir = tempfile::tempdir().unwrap();
    let (code, _, stderr) = check(dir.path(), &text);
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains("duplicate upstream name") && stderr.contains("routes.legacy_v1_percent"),
        "{stderr}"
    );
}

#[test]
fn missing_file_is_named() {
    let out = support::binary().args(["check", "--config", "/nonexistent/rollout.yaml"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot read config file /nonexistent/rollout.yaml")
    );
}

/// The shipped configs pass, with and without the files they name being checked.
#[test]
fn shipped_configs_pass() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for file in ["config/rollout.yaml", "config/demo.yaml"] {
        let out = support::binary()
            .args(["check", "--file-only", "--config"])
            .arg(root.join(file))
            .output()
            .unwrap();
        assert!(out.status.success(), "{file}: {}", String::from_utf8_lossy(&out.stderr));
    }
    for file in ["config/rollout.yaml", "config/demo.yaml"] {
        let out = support::binary().args(["check", "--config"]).arg(root.join(file)).output().unwrap();
        assert!(out.status.success(), "{file}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

#[test]
fn absurd_durations_are_refused() {
    assert_rejected(
        &edit(GOOD, "quiet_window: 24h", "quiet_window: 10000years"),
        "14:17: drain.quiet_window: 10000years is longer than the maximum of 10 years",
    );
}

#[test]
fn a_session_header_with_an_underscore_needs_underscores_allowed() {
    let keyed = format!("{GOOD}sessions:\n  keys: [{{ header: X_Study_Id }}]\n");
    assert_rejected(
        &keyed,
        "16:20: sessions.keys[0].header: \"X_Study_Id\" contains '_', and request headers with '_' are dropped",
    );
    let dir = tempfile::tempdir().unwrap();
    let allowed = format!("{keyed}client:\n  allow_underscores_in_headers: true\n");
    let (code, _, stderr) = check(dir.path(), &allowed);
    assert_eq!(code, Some(0), "{stderr}");
}

#[test]
fn new_client_and_upstream_limits_are_bounds_checked() {
    assert_rejected(
        &format!("{GOOD}client:\n  max_concurrent_streams: 0\n"),
        "16:27: client.max_concurrent_streams: 0 is outside 1..=10000",
    );
    assert_rejected(
        &format!("{GOOD}client:\n  send_timeout: 0s\n"),
        "16:17: client.send_timeout: must be longer than 0s",
    );
    assert_rejected(
        &format!("{GOOD}upstream:\n  max_connections_per_upstream: 0\n"),
        "16:33: upstream.max_connections_per_upstream: must be at least 1",
    );
}

#[test]
fn ejection_duration_is_bounds_checked() {
    let ejection = |duration: &str| {
        edit(
            GOOD,
            "  v2:\n",
            &format!("    ejection: {{ consecutive_failures: 3, duration: {duration} }}\n  v2:\n"),
        )
    };
    assert_rejected(
        &ejection("0s"),
        "7:52: pools.v1.ejection.duration: 0s is shorter than the minimum of 1s",
    );
    assert_rejected(&ejection("2h"), "7:52: pools.v1.ejection.duration: 2h is longer than the maximum of 1h");
    let dir = tempfile::tempdir().unwrap();
    for bound in ["1s", "1h"] {
        let (code, _, stderr) = check(dir.path(), &ejection(bound));
        assert_eq!(code, Some(0), "{bound}: {stderr}");
    }
}

/// `check` makes every check `run` makes before it binds: a config it passes is one `run`
/// starts with.
#[test]
fn check_refuses_what_run_would_refuse_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let exposed = format!("{GOOD}admin:\n  listen: \"0.0.0.0:9901\"\n");
    let (code, _, stderr) = check(dir.path(), &exposed);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr
            .contains("admin.listen 0.0.0.0:9901 is not a loopback address and no admin token is configured"),
        "{stderr}"
    );

    let missing = dir.path().join("no-such-token");
    let (code, _, stderr) =
        check(dir.path(), &format!("{exposed}  token_file: {:?}\n", missing.to_str().unwrap()));
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains(&format!("cannot read admin.token_file {}", missing.display())), "{stderr}");

    let token = dir.path().join("token");
    std::fs::write(&token, "s3cret").unwrap();
    let (code, _, stderr) =
        check(dir.path(), &format!("{exposed}  token_file: {:?}\n", token.to_str().unwrap()));
    assert_eq!(code, Some(0), "{stderr}");

    let tls = format!(
        "{GOOD}tls:\n  cert: {:?}\n  key: {:?}\n",
        dir.path().join("c.pem"),
        dir.path().join("k.pem")
    );
    let (code, _, stderr) = check(dir.path(), &tls);
    assert_eq!(code, Some(1), "a missing certificate: {stderr}");
    assert!(stderr.contains(&format!("cannot read {}", dir.path().join("c.pem").display())), "{stderr}");
}

/// Settings that would silently do nothing, or the wrong thing, are refused by name.
#[test]
fn an_idle_timeout_past_max_duration_and_a_zero_quiet_window_are_refused() {
    assert_rejected(
        &format!("{GOOD}sessions:\n  idle_timeout: 12h\n  max_duration: 1h\n"),
        "16:17: sessions.idle_timeout: 12h is longer than max_duration (1h), so it would never end a session; shorten it or drop it\n",
    );
    assert_rejected(
        &edit(GOOD, "quiet_window: 24h", "quiet_window: 0s"),
        "14:17: drain.quiet_window: must be longer than 0s\n",
    );
}

/// A YAML syntax error names its position once, in front; other positions the parser names
/// (where the broken scalar began) stay in the message.
#[test]
fn a_syntax_error_names_its_position_once() {
    let dir = tempfile::tempdir().unwrap();
    let (code, _, stderr) = check(dir.path(), "listen: \"0.0.0.0:8080\npools:\n  v1: x\n");
    assert_eq!(code, Some(1));
    let file = dir.path().join("rollout.yaml");
    assert_eq!(
        stderr.trim_end(),
        format!("error: {}:4:1: found unexpected end of stream, while scanning a quoted scalar at line 1 column 9", file.display())
    );
}

/// A duplicate key is placed at its second occurrence, not at the start of its mapping.
#[test]
fn a_duplicate_key_is_placed_where_it_repeats() {
    assert_rejected(
        &edit(GOOD, "legacy_v1_percent: 100\n", "legacy_v1_percent: 100\n  legacy_v1_percent: 50\n"),
        "13:22: routes: duplicate field `legacy_v1_percent`\n",
    );
    assert_rejected(
        &edit(GOOD, "{ name: was-3,", "{ name: was-3, name: was-4,"),
        "9:30: pools.v2.upstreams[0]: duplicate field `name`\n",
    );
}
