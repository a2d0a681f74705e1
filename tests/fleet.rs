//! The fleet store on a real Redis server: first writer wins across replicas, the split salt is
//! one for the fleet, what was written survives a Redis restart, and every change reaches the
//! other replicas through the stream.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use rollout_proxy::config::PoolName;
use rollout_proxy::session::PinPolicy;
use rollout_proxy::store::fleet::{
    Change, Changes, Claimed, FleetOverrides, FleetStore, Published, RampWrite,
};
use rollout_proxy::store::StoredPin;
use support::redis::RedisServer;
use support::{
    admin_call, eventually, eventually_some, get, metric, pools_of, write_config, ConfigBuilder, ManualClock,
    Pool, ProxyBuilder, ProxyHandle, ProxyProcess, Sessions, Upstream,
};

const POLICY: PinPolicy =
    PinPolicy { idle_secs: 600, max_secs: 3_600, max_active: 1_000_000, stale_secs: 3, fleet_lag_secs: 6 };
const NOW: u32 = 1_800_000_000;

/// Three replicas race to make the first pin of each of 1,000 keys, each proposing a different
/// pool for half of them: every key ends on one pool, the same for all three, made by one claim.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_claims_on_three_replicas_agree() {
    let redis = RedisServer::start();
    let mut replicas = Vec::new();
    for _ in 0..3 {
        replicas.push(FleetStore::connect(&redis.url(), "race").await.unwrap());
    }
    let keys: Vec<String> = (0..1_000).map(|i| format!("study-{i}")).collect();
    let mut tasks = Vec::new();
    for (r, replica) in replicas.iter().enumerate() {
        let (replica, keys) = (replica.clone(), keys.clone());
        tasks.push(tokio::spawn(async move {
            let mut claims = Vec::new();
            for (k, key) in keys.iter().enumerate() {
                let proposed = if (k + r) % 2 == 0 { PoolName::V1 } else { PoolName::V2 };
                claims.push(replica.claim(key, proposed, NOW, &POLICY).await.unwrap());
            }
            claims
        }));
    }
    let mut by_replica: Vec<Vec<Claimed>> = Vec::new();
    for task in tasks {
        by_replica.push(task.await.unwrap());
    }
    let mut pools = BTreeMap::new();
    for (k, key) in keys.iter().enumerate() {
        let claims: Vec<&Claimed> = by_replica.iter().map(|claims| &claims[k]).collect();
        assert!(claims.iter().all(|c| c.pool == claims[0].pool), "{key}: replicas disagree: {claims:?}");
        assert_eq!(claims.iter().filter(|c| c.made).count(), 1, "{key}: not exactly one claim made the pin");
        *pools.entry(claims[0].pool).or_insert(0) += 1;
    }
    // Both pools were proposed first somewhere, so both won somewhere.
    assert_eq!(pools.len(), 2, "{pools:?}");
}

#[tokio::test]
async fn a_live_pin_wins_and_an_ended_one_is_replaced() {
    let redis = RedisServer::start();
    let store = FleetStore::connect(&redis.url(), "ends").await.unwrap();
    let made = store.claim("42", PoolName::V1, NOW, &POLICY).await.unwrap();
    assert_eq!(made, Claimed { pool: PoolName::V1, first_seen: NOW, last_seen: NOW, made: true });

    let later = NOW + POLICY.idle_secs - 1;
    let kept = store.claim("42", PoolName::V2, later, &POLICY).await.unwrap();
    assert_eq!(kept, Claimed { made: false, ..made }, "a live pin must win over a new proposal");

    let idle = NOW + POLICY.idle_secs;
    let replaced = store.claim("42", PoolName::V2, idle, &POLICY).await.unwrap();
    assert_eq!(replaced, Claimed { pool: PoolName::V2, first_seen: idle, last_seen: idle, made: true });
}

#[tokio::test]
async fn one_split_salt_for_the_fleet_and_pins_survive_a_redis_restart() {
    let mut redis = RedisServer::start();
    let a = FleetStore::connect(&redis.url(), "salt").await.unwrap();
    let b = FleetStore::connect(&redis.url(), "salt").await.unwrap();
    let (salt_a, salt_b) = tokio::join!(a.split_salt(), b.split_salt());
    assert_eq!(salt_a.unwrap(), salt_b.unwrap());
    let other = FleetStore::connect(&redis.url(), "other-namespace").await.unwrap();
    assert_ne!(other.split_salt().await.unwrap(), a.split_salt().await.unwrap(), "namespaces share a salt");

    let made = a.claim("7", PoolName::V1, NOW, &POLICY).await.unwrap();
    let salt = a.split_salt().await.unwrap();
    redis.restart();
    let c = FleetStore::connect(&redis.url(), "salt").await.unwrap();
    assert_eq!(c.split_salt().await.unwrap(), salt, "the salt changed across a Redis restart");
    assert_eq!(c.claim("7", PoolName::V2, NOW + 1, &POLICY).await.unwrap(), Claimed { made: false, ..made });
}

/// What one replica changes, another reads from the stream in order: pins made, refreshed and
/// ended. A follower that fell behind a trim is told to read every pin again.
#[tokio::test]
async fn a_follower_reads_every_change_in_order_and_learns_when_it_fell_behind_a_trim() {
    let redis = RedisServer::start();
    let a = FleetStore::connect(&redis.url(), "follow").await.unwrap();
    let b = FleetStore::connect(&redis.url(), "follow").await.unwrap();
    let mut follower = b.follower(Duration::from_millis(100)).await.unwrap();
    let start = b.position().await.unwrap();
    assert_eq!(start, "0-0", "an empty store's stream starts at the beginning");

    a.claim("1", PoolName::V1, NOW, &POLICY).await.unwrap();
    a.claim("2", PoolName::V2, NOW, &POLICY).await.unwrap();
    assert_eq!(a.touch(&[("1".into(), NOW, NOW + 5), ("2".into(), NOW, NOW + 6)], &POLICY).await.unwrap(), 2);
    assert_eq!(a.end("2", Some(NOW)).await.unwrap(), Some(PoolName::V2));

    let Changes::Read { changes, position } =
        follower.changes(&start, Duration::from_millis(100), 100).await.unwrap()
    else {
        panic!("a follower from the start cannot have missed anything")
    };
    let pin = |key: &str, pool, last_seen| StoredPin { key: key.into(), pool, first_seen: NOW, last_seen };
    assert_eq!(
        changes,
        [
            Change::Pin(pin("1", PoolName::V1, NOW)),
            Change::Pin(pin("2", PoolName::V2, NOW)),
            Change::Touch(vec![("1".into(), NOW, NOW + 5), ("2".into(), NOW, NOW + 6)]),
            Change::End { key: "2".into(), first_seen: NOW },
        ]
    );
    // Nothing new: the read waits its time and returns nothing, at the same position.
    let quiet = follower.changes(&position, Duration::from_millis(50), 100).await.unwrap();
    assert_eq!(quiet, Changes::Read { changes: vec![], position: position.clone() });

    // Another change, then a trim that drops it before this follower read it.
    a.claim("3", PoolName::V1, NOW, &POLICY).await.unwrap();
    let trimmed = redis.command("XTRIM {follow}:changes MAXLEN 0").unwrap();
    assert!(trimmed.starts_with(":"), "{trimmed}");
    match follower.changes(&position, Duration::from_millis(50), 100).await.unwrap() {
        Changes::Trimmed { .. } => {}
        read => panic!("a follower behind a trim must read every pin again, got {read:?}"),
    }
    let mut keys: Vec<String> = b.pins().await.unwrap().into_iter().map(|p| p.key.into()).collect();
    keys.sort();
    assert_eq!(keys, ["1", "3"], "every pin, read again, after the end of 2");
}

/// A refresh only moves a pin forward, only the pin it was meant for, and moves its end in the
/// fleet's count of live v1 pins; ending names the pin too.
#[tokio::test]
async fn refreshes_and_ends_touch_only_the_pin_they_name() {
    let redis = RedisServer::start();
    let store = FleetStore::connect(&redis.url(), "touch").await.unwrap();
    store.claim("a", PoolName::V1, NOW, &POLICY).await.unwrap();
    store.claim("b", PoolName::V2, NOW, &POLICY).await.unwrap();
    let idle_end = NOW + POLICY.idle_secs;
    assert_eq!(store.live_v1(idle_end - 1).await.unwrap(), 1);
    assert_eq!(store.live_v1(idle_end).await.unwrap(), 0, "a v1 pin ends at its idle time");

    // Backwards, and for a pin made at another time: nothing moves.
    let stale =
        [("a".into(), NOW, NOW - 10), ("a".into(), NOW - 1, NOW + 100), ("none".into(), NOW, NOW + 1)];
    assert_eq!(store.touch(&stale, &POLICY).await.unwrap(), 0);
    assert_eq!(store.touch(&[("a".into(), NOW, NOW + 100)], &POLICY).await.unwrap(), 1);
    assert_eq!(store.live_v1(idle_end).await.unwrap(), 1, "the refresh moved the v1 pin's end");
    let pins = store.pins().await.unwrap();
    let a = pins.iter().find(|p| &*p.key == "a").unwrap();
    assert_eq!((a.first_seen, a.last_seen), (NOW, NOW + 100));

    assert_eq!(store.end("a", Some(NOW - 1)).await.unwrap(), None, "ended a pin made at another time");
    assert_eq!(store.end("a", Some(NOW)).await.unwrap(), Some(PoolName::V1));
    assert_eq!(store.end("a", None).await.unwrap(), None);
    assert_eq!(store.live_v1(NOW).await.unwrap(), 0);
    assert_eq!(store.end("b", None).await.unwrap(), Some(PoolName::V2));
}

/// Ended pins leave the store: sweeping a page at a time removes the pins past their idle or
/// maximum time (and from the count of live v1 pins), and keeps the live ones.
#[tokio::test]
async fn sweeping_removes_ended_pins_and_keeps_live_ones() {
    let redis = RedisServer::start();
    let store = FleetStore::connect(&redis.url(), "sweep").await.unwrap();
    let touch = |key: String, first_seen: u32| (key.into_boxed_str(), first_seen, NOW + 500);
    let (mut live, mut long) = (Vec::new(), Vec::new());
    for i in 0..250 {
        store.claim(&format!("idle-{i}"), PoolName::V1, NOW, &POLICY).await.unwrap();
        store.claim(&format!("live-{i}"), PoolName::V1, NOW, &POLICY).await.unwrap();
        live.push(touch(format!("live-{i}"), NOW));
        // Made earlier and busy since: at its maximum time when the others are at their idle one.
        let first_seen = NOW + POLICY.idle_secs - POLICY.max_secs;
        store.claim(&format!("long-{i}"), PoolName::V2, first_seen, &POLICY).await.unwrap();
        long.push(touch(format!("long-{i}"), first_seen));
    }
    assert_eq!(store.touch(&live, &POLICY).await.unwrap(), 250);
    assert_eq!(store.touch(&long, &POLICY).await.unwrap(), 250);

    // One pass, a page at a time, as of `now`: how many pins it removed.
    let pass = |now: u32| {
        let store = store.clone();
        async move {
            let (mut cursor, mut removed, mut steps) = (0, 0, 0);
            loop {
                let (next, gone) = store.sweep(now, &POLICY, cursor, 100).await.unwrap();
                (cursor, removed, steps) = (next, removed + gone, steps + 1);
                if cursor == 0 {
                    assert!(steps > 1, "a page is a part of the pins, not all of them");
                    return removed;
                }
            }
        }
    };
    let now = NOW + POLICY.idle_secs;
    assert_eq!(pass(now - 1).await, 0, "nothing has ended yet");
    assert_eq!(pass(now).await, 500, "the idle and the long pins");
    let mut left: Vec<String> = store.pins().await.unwrap().iter().map(|pin| pin.key.to_string()).collect();
    left.sort();
    let mut expected: Vec<String> = (0..250).map(|i| format!("live-{i}")).collect();
    expected.sort();
    assert_eq!(left, expected);
    assert_eq!(store.live_v1(now).await.unwrap(), 250);
    assert_eq!(
        redis.command("ZCARD {sweep}:v1").as_deref(),
        Some(":250\r\n"),
        "ended v1 pins leave the v1 set"
    );
}

/// Each replica records its own last v1 request; the fleet's is the latest, and never goes back.
#[tokio::test]
async fn the_fleets_last_v1_request_is_the_latest_of_any_replica() {
    let redis = RedisServer::start();
    let store = FleetStore::connect(&redis.url(), "drain").await.unwrap();
    assert_eq!(store.last_v1().await.unwrap(), None);
    store.record_last_v1("replica-a", 5_000).await.unwrap();
    store.record_last_v1("replica-b", 9_000).await.unwrap();
    store.record_last_v1("replica-b", 7_000).await.unwrap();
    assert_eq!(store.last_v1().await.unwrap(), Some(9_000));
}

/// A private Redis server and one stub upstream per pool.
async fn redis_and_upstreams() -> (RedisServer, SocketAddr, SocketAddr) {
    let redis = RedisServer::start();
    (redis, Upstream::new("v1-a").spawn().await, Upstream::new("v2-a").spawn().await)
}

/// A replica of a fleet sharing `redis` under `namespace`, splitting new sessions `percent` to
/// v1 (replicas may disagree on it for a moment while an operator change travels).
async fn replica(
    redis: &RedisServer,
    namespace: &str,
    v1: SocketAddr,
    v2: SocketAddr,
    percent: f64,
) -> ProxyHandle {
    replica_with(redis, namespace, v1, v2, |config| config.legacy_v1_percent(percent)).await
}

async fn replica_with(
    redis: &RedisServer,
    namespace: &str,
    v1: SocketAddr,
    v2: SocketAddr,
    configure: impl FnOnce(ConfigBuilder) -> ConfigBuilder,
) -> ProxyHandle {
    replica_on_error(redis, namespace, v1, v2, "degrade", configure).await
}

async fn replica_on_error(
    redis: &RedisServer,
    namespace: &str,
    v1: SocketAddr,
    v2: SocketAddr,
    on_store_error: &str,
    configure: impl FnOnce(ConfigBuilder) -> ConfigBuilder,
) -> ProxyHandle {
    let options = format!("on_store_error: {on_store_error}");
    ProxyBuilder::new(&fleet_config(redis, namespace, v1, v2, &options, configure)).spawn().await
}

/// A fleet replica's configuration: `store` on `redis` under `namespace` with more `options`
/// (`key: value, ...`), the admin token set.
fn fleet_config(
    redis: &RedisServer,
    namespace: &str,
    v1: SocketAddr,
    v2: SocketAddr,
    options: &str,
    configure: impl FnOnce(ConfigBuilder) -> ConfigBuilder,
) -> ConfigBuilder {
    let store = format!("{{ backend: redis, url: \"{}\", namespace: {namespace}, {options} }}", redis.url());
    let token = tempfile::NamedTempFile::new().unwrap().into_temp_path().keep().unwrap();
    std::fs::write(&token, TOKEN).unwrap();
    configure(ConfigBuilder::one_each(v1, v2)).admin_token_file(&token).section("store", &store)
}

const TOKEN: &str = "fleet-admin-token";

/// Replicas whose splits disagree completely (alternately every new session to v1, every one
/// to v2) get the first request of 1,000 sessions each at the same moment: every session is
/// answered from one pool by all of them, because the first claim in the fleet store wins. Each
/// replica then holds all 1,000 pins in its local copy, including those the others made.
async fn replicas_racing_on_first_requests_agree(count: usize, namespace: &str) {
    let (redis, v1, v2) = redis_and_upstreams().await;
    let mut replicas = Vec::new();
    for r in 0..count {
        let percent = if r % 2 == 0 { 100.0 } else { 0.0 };
        replicas.push(replica(&redis, namespace, v1, v2, percent).await);
    }
    let keys: Vec<String> = (0..1_000).map(|i| format!("s{i}")).collect();
    let url = |proxy: &ProxyHandle, key: &str| proxy.url(&format!("/api/studies/{key}/contents"));
    let racing: Vec<_> = replicas
        .iter()
        .map(|proxy| tokio::spawn(pools_of(keys.iter().map(|k| url(proxy, k)).collect())))
        .collect();
    let mut answers = Vec::new();
    for replica in racing {
        answers.push(replica.await.unwrap());
    }
    let split: Vec<&String> = keys
        .iter()
        .enumerate()
        .filter(|(k, _)| answers.iter().any(|pools| pools[*k] != answers[0][*k]))
        .map(|(_, key)| key)
        .collect();
    assert_eq!(split, Vec::<&String>::new(), "sessions answered from different pools by the replicas");
    let on_v1 = answers[0].iter().filter(|p| *p == "v1").count();
    let mut lost = 0.0;
    for proxy in &replicas {
        lost += metric(&proxy.metrics().await, "rollout_pin_conflicts_total", &[]).unwrap_or(0.0);
    }
    assert!(lost > 0.0, "no replica counted a race it lost");
    assert!(on_v1 > 0 && on_v1 < 1_000, "the race was not a race: v1 won {on_v1} of 1,000");

    // Later requests, on any replica, stay where the first one went.
    for proxy in &replicas {
        assert_eq!(pools_of(keys.iter().map(|k| url(proxy, k)).collect()).await, answers[0]);
        eventually(Duration::from_secs(5), "each replica holds every pin", || async {
            proxy.live_pins(Pool::V1) + proxy.live_pins(Pool::V2) == 1_000
        })
        .await;
        assert_eq!(proxy.live_pins(Pool::V1), on_v1);
    }
    for proxy in replicas {
        proxy.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_racing_on_first_requests_agree_and_learn_each_others_pins() {
    replicas_racing_on_first_requests_agree(2, "race2").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_racing_on_first_requests_agree_and_learn_each_others_pins() {
    replicas_racing_on_first_requests_agree(3, "race3").await;
}

/// A session made on one replica is followed on another within a second, and an operator ending
/// it on the second ends it on the first.
#[tokio::test]
async fn a_pin_made_on_one_replica_reaches_the_other_and_an_end_reaches_back() {
    let (redis, v1, v2) = redis_and_upstreams().await;
    let a = replica(&redis, "follow2", v1, v2, 100.0).await;
    let b = replica(&redis, "follow2", v1, v2, 0.0).await;

    assert_eq!(pools_of(vec![a.url("/api/studies/42/contents")]).await, ["v1"]);
    eventually(Duration::from_secs(1), "B learns A's pin within a second", || async {
        b.live_pins(Pool::V1) == 1
    })
    .await;
    // B's own split says v2; the pin says v1.
    assert_eq!(pools_of(vec![b.url("/api/progress?studyId=42")]).await, ["v1"]);

    let ended = admin_call("DELETE", &b.admin_url("/sessions/42"), Some(TOKEN), None, None).await;
    assert_eq!(ended.status, StatusCode::OK, "{ended:?}");
    eventually(Duration::from_secs(1), "A hears of the end within a second", || async {
        a.live_pins(Pool::V1) == 0
    })
    .await;
    // Ended fleet-wide: the next request is a new session, made by B's split this time.
    assert_eq!(pools_of(vec![b.url("/api/studies/42")]).await, ["v2"]);
    a.shutdown().await;
    b.shutdown().await;
}

/// An active study's `last_seen` reaches the fleet store once per fleet lag (1 % of the idle
/// timeout: here 10 s of a 1,000 s timeout), not at every local refresh (here every second),
/// and every replica lets a pin live the grace that covers that lag (2 × 10 s plus the local
/// store's 5 s): the replica that did not serve the study does not end the pin before the idle
/// timeout after its last request, though what it knows of that request is 8 s old; both end
/// it once the grace has passed as well.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refreshes_reach_the_fleet_once_per_fleet_lag_and_no_replica_ends_a_pin_early() {
    let (redis, v1, v2) = redis_and_upstreams().await;
    let clock = ManualClock::starting_now();
    let sessions = Sessions { idle_timeout: Some(Duration::from_secs(1_000)), ..Sessions::default() };
    let configure = |config: ConfigBuilder| config.legacy_v1_percent(100.0).sessions(sessions.clone());
    let a = ProxyBuilder::new(&fleet_config(&redis, "lag", v1, v2, "on_store_error: degrade", configure))
        .clock(&clock)
        .spawn()
        .await;
    let b = ProxyBuilder::new(&fleet_config(&redis, "lag", v1, v2, "on_store_error: degrade", configure))
        .clock(&clock)
        .spawn()
        .await;

    // A serves the study every 2 s for 58 s; its local store is refreshed at every pass.
    let study = a.url("/api/studies/s");
    assert_eq!(pools_of(vec![study.clone()]).await, ["v1"]);
    for _ in 0..29 {
        clock.advance(Duration::from_secs(2));
        assert_eq!(get(&study).await.status, StatusCode::OK);
        a.maintain();
    }
    let touches = || {
        let script = "local n = 0 for _, e in ipairs(redis.call('XRANGE', KEYS[1], '-', '+')) do if e[2][1] == 'touch' then n = n + 1 end end return n";
        let reply = redis.command(&format!("EVAL \"{script}\" 1 {{lag}}:changes")).unwrap_or_default();
        reply.trim().trim_start_matches(':').parse::<u32>().unwrap_or(0)
    };
    // At 10, 20, ... 50 s after the pin was made: five refreshes in the fleet store.
    eventually(Duration::from_secs(2), "A's refreshes reach the fleet store", || async { touches() >= 5 })
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(touches(), 5, "one fleet refresh per 10 s of activity, not one per local refresh");
    eventually(Duration::from_secs(1), "B holds the pin", || async { b.live_pins(Pool::V1) == 1 }).await;

    // 999 s after the last request: within the idle timeout on both.
    clock.advance(Duration::from_secs(999));
    a.maintain();
    b.maintain();
    assert_eq!((a.live_pins(Pool::V1), b.live_pins(Pool::V1)), (1, 1), "no replica ends the pin early");
    // The idle timeout and the grace after the last request: ended on both.
    clock.advance(Duration::from_secs(1 + 25));
    a.maintain();
    b.maintain();
    assert_eq!((a.live_pins(Pool::V1), b.live_pins(Pool::V1)), (0, 0), "both end it after the grace");
    eventually(Duration::from_secs(2), "the ended pin leaves the fleet store", || async {
        redis.command("HLEN {lag}:pins").as_deref() == Some(":0\r\n")
    })
    .await;
    a.shutdown().await;
    b.shutdown().await;
}

/// `/drain` on any replica answers for the fleet: a v1 pin made on A keeps B from saying
/// drained, as does v1 traffic through A; and while the fleet store is unreachable, B withholds
/// the signal whatever its own numbers say.
#[tokio::test]
async fn the_drain_signal_on_one_replica_counts_the_whole_fleets_v1_traffic() {
    let (mut redis, v1, v2) = redis_and_upstreams().await;
    let quiet = |c: ConfigBuilder| c.legacy_v1_percent(100.0).quiet_window(Duration::from_millis(1500));
    let a = replica_with(&redis, "drain2", v1, v2, quiet).await;
    let b = replica_with(&redis, "drain2", v1, v2, quiet).await;
    let drain_b = || async { get(&b.admin_url("/drain")).await };
    eventually(Duration::from_secs(5), "B drained before any v1 traffic", || async {
        drain_b().await.status == StatusCode::OK
    })
    .await;
    // And it stays so: with the store up and nothing happening, the signal must not flicker
    // (blocking reads of the change stream once timed out and made the store look down).
    for _ in 0..15 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let reply = drain_b().await;
        assert_eq!(reply.status, StatusCode::OK, "{:?}", String::from_utf8_lossy(&reply.body));
    }

    // A v1 session on A: B counts its pin.
    assert_eq!(pools_of(vec![a.url("/api/studies/7")]).await, ["v1"]);
    let pinned = eventually_some(Duration::from_secs(2), "B counts A's v1 pin", || async {
        let reply = drain_b().await;
        (reply.json()["v1_active_pins"] == 1).then_some(reply)
    })
    .await;
    assert_eq!(pinned.status, StatusCode::SERVICE_UNAVAILABLE);
    let ended = admin_call("DELETE", &a.admin_url("/sessions/7"), Some(TOKEN), None, None).await;
    assert_eq!(ended.status, StatusCode::OK, "{ended:?}");
    eventually(Duration::from_secs(5), "B drained once the pin ended and v1 was quiet", || async {
        drain_b().await.status == StatusCode::OK
    })
    .await;

    // Unkeyed v1 traffic through A: B's quiet time starts again.
    assert_eq!(pools_of(vec![a.url("/api/members/me")]).await, ["v1"]);
    eventually(Duration::from_secs(2), "B hears of A's v1 request", || async {
        drain_b().await.status == StatusCode::SERVICE_UNAVAILABLE
    })
    .await;
    eventually(Duration::from_secs(5), "B drained again after the quiet window", || async {
        drain_b().await.status == StatusCode::OK
    })
    .await;

    redis.kill();
    let withheld = eventually_some(Duration::from_secs(5), "B withholds the signal", || async {
        let reply = drain_b().await;
        (reply.status == StatusCode::SERVICE_UNAVAILABLE).then_some(reply)
    })
    .await;
    assert!(
        withheld.json()["withheld"].as_str().is_some_and(|why| why.contains("unreachable")),
        "{withheld:?}"
    );
    let metrics = b.metrics().await;
    assert_eq!(metric(&metrics, "rollout_store_up", &[]), Some(0.0));
    let errors: f64 = ["follow", "drain_clock"]
        .iter()
        .filter_map(|op| metric(&metrics, "rollout_store_errors_total", &[("op", op)]))
        .sum();
    assert!(errors > 0.0, "no store error counted while the store is gone");
    a.shutdown().await;
    b.shutdown().await;
}

/// An operator's change on one replica is the fleet's: it governs new sessions on the other
/// within a second, both answer with one fleet revision, and a change based on a stale revision
/// is refused on any replica.
#[tokio::test]
async fn an_operator_change_on_one_replica_governs_the_fleet_with_one_revision() {
    let (redis, v1, v2) = redis_and_upstreams().await;
    let a = replica(&redis, "ops", v1, v2, 100.0).await;
    let b = replica(&redis, "ops", v1, v2, 100.0).await;
    let call = |proxy: &ProxyHandle, if_match: Option<&'static str>, percent: u32| {
        let (url, body) = (proxy.admin_url("/routes/legacy"), format!(r#"{{"v1_percent": {percent}}}"#));
        async move { admin_call("PUT", &url, Some(TOKEN), if_match, Some(&body)).await }
    };

    let changed = call(&a, Some("\"0\""), 0).await;
    assert_eq!(changed.status, StatusCode::OK, "{changed:?}");
    assert_eq!(changed.header("etag"), Some("\"1\""));
    eventually(Duration::from_secs(1), "B applies A's change within a second", || async {
        get(&b.admin_url("/status")).await.header("etag") == Some("\"1\"")
    })
    .await;
    let new_on_b: Vec<String> = (0..20).map(|i| b.url(&format!("/api/studies/new-{i}"))).collect();
    assert!(pools_of(new_on_b).await.iter().all(|p| p == "v2"), "B still sends new sessions to v1");

    // B's operator still thinks revision 0 is current: refused, and nothing changes.
    let stale = call(&b, Some("\"0\""), 100).await;
    assert_eq!(stale.status, StatusCode::PRECONDITION_FAILED, "{stale:?}");
    let current = call(&b, Some("\"1\""), 50).await;
    assert_eq!(current.status, StatusCode::OK, "{current:?}");
    eventually(Duration::from_secs(1), "A applies B's change", || async {
        get(&a.admin_url("/status")).await.header("etag") == Some("\"2\"")
    })
    .await;
    // Either replica's status shows the fleet revision and both replicas having applied it.
    let status = eventually_some(Duration::from_secs(3), "both replicas report revision 2", || async {
        let status = get(&b.admin_url("/status")).await.json();
        let replicas = status["fleet"]["replicas"].as_array()?.clone();
        (replicas.len() == 2 && replicas.iter().all(|r| r["applied"] == true)).then_some(status)
    })
    .await;
    assert_eq!(status["fleet"]["revision"], 2);
    assert_eq!(
        status["fleet"]["replicas"].as_array().unwrap().iter().filter(|r| r["this"] == true).count(),
        1
    );
    a.shutdown().await;
    b.shutdown().await;
}

/// The overrides change only by compare-and-set on the fleet revision: of two changes based on
/// the same revision, the second is told what the first made.
#[tokio::test]
async fn overrides_change_by_compare_and_set_on_the_fleet_revision() {
    let redis = RedisServer::start();
    let store = FleetStore::connect(&redis.url(), "cas").await.unwrap();
    assert_eq!(store.overrides().await.unwrap(), None);
    assert_eq!(
        store.publish_overrides(0, b"{\"legacy_v1_percent\":0.0}", None).await.unwrap(),
        Published::Done(1)
    );
    let lost = store.publish_overrides(0, b"{\"legacy_v1_percent\":100.0}", None).await.unwrap();
    let first = FleetOverrides { revision: 1, json: b"{\"legacy_v1_percent\":0.0}".to_vec() };
    assert_eq!(lost, Published::Stale(first.clone()));
    assert_eq!(store.overrides().await.unwrap(), Some(first));
    assert_eq!(store.publish_overrides(1, b"{}", None).await.unwrap(), Published::Done(2));
}

/// With the fleet store gone: known sessions are served from the local copy; new sessions are
/// pinned locally by the split (`degrade`) or refused (`fail_closed`); operator changes answer
/// 503. Once it is back, the pins made meanwhile reach it and the other replicas.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_the_store_is_down_known_sessions_are_served_and_new_ones_follow_on_store_error() {
    let (mut redis, v1, v2) = redis_and_upstreams().await;
    let a = replica(&redis, "outage", v1, v2, 50.0).await;
    let b = replica(&redis, "outage", v1, v2, 50.0).await;
    let c = replica_on_error(&redis, "outage", v1, v2, "fail_closed", |c| c.legacy_v1_percent(50.0)).await;

    let known: Vec<String> = (0..40).map(|i| format!("known-{i}")).collect();
    let urls = |proxy: &ProxyHandle, keys: &[String]| {
        keys.iter().map(|k| proxy.url(&format!("/api/studies/{k}"))).collect()
    };
    let pools = pools_of(urls(&a, &known)).await;
    for proxy in [&b, &c] {
        eventually(Duration::from_secs(2), "every replica knows the sessions", || async {
            proxy.live_pins(Pool::V1) + proxy.live_pins(Pool::V2) == 40
        })
        .await;
    }

    redis.kill();
    // Known sessions: every request answered, from its pool, on every replica.
    for proxy in [&a, &b, &c] {
        assert_eq!(pools_of(urls(proxy, &known)).await, pools, "a known session failed or moved");
    }
    // New sessions: A pins them by the split; C refuses them.
    let fresh: Vec<String> = (0..20).map(|i| format!("fresh-{i}")).collect();
    let on_a = pools_of(urls(&a, &fresh)).await;
    let refused = get(&c.url("/api/studies/fresh-c")).await;
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(refused.header("x-rollout-error"), Some("store_unavailable"));
    let change =
        admin_call("PUT", &a.admin_url("/routes/legacy"), Some(TOKEN), None, Some(r#"{"v1_percent": 0}"#))
            .await;
    assert_eq!(change.status, StatusCode::SERVICE_UNAVAILABLE, "{change:?}");

    redis.restart();
    eventually(Duration::from_secs(10), "B learns the pins A made during the outage", || async {
        b.live_pins(Pool::V1) + b.live_pins(Pool::V2) == 60
    })
    .await;
    assert_eq!(pools_of(urls(&b, &fresh)).await, on_a, "B sends A's sessions elsewhere");
    for proxy in [a, b, c] {
        proxy.shutdown().await;
    }
}

/// A Redis that comes back empty (flushed, or restarted without its append-only file) is
/// noticed by its missing incarnation marker: the replicas write back their pins, the split
/// salt and the overrides with their revision, and the fleet's drain clock starts again from
/// now instead of from "long ago".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_lost_its_data_gets_the_fleets_state_back() {
    let (redis, v1, v2) = redis_and_upstreams().await;
    let long_quiet = |c: ConfigBuilder| c.legacy_v1_percent(50.0).quiet_window(Duration::from_secs(3600));
    let a = replica_with(&redis, "lost", v1, v2, long_quiet).await;
    let b = replica_with(&redis, "lost", v1, v2, long_quiet).await;
    let store = FleetStore::connect(&redis.url(), "lost").await.unwrap();
    let salt = store.split_salt().await.unwrap();

    let keys: Vec<String> = (0..50).map(|i| format!("k{i}")).collect();
    let pools = pools_of(keys.iter().map(|k| a.url(&format!("/api/studies/{k}"))).collect()).await;
    let change =
        admin_call("PUT", &a.admin_url("/routes/legacy"), Some(TOKEN), None, Some(r#"{"v1_percent": 25}"#))
            .await;
    assert_eq!(change.status, StatusCode::OK, "{change:?}");
    eventually(Duration::from_secs(2), "B has every pin and the change", || async {
        b.live_pins(Pool::V1) + b.live_pins(Pool::V2) == 50
            && get(&b.admin_url("/status")).await.header("etag") == Some("\"1\"")
    })
    .await;

    let quiet_for =
        || async { get(&b.admin_url("/drain")).await.json()["quiet_for_seconds"].as_f64().unwrap() };
    eventually(Duration::from_secs(5), "v1 quiet for two seconds", || async { quiet_for().await >= 2.0 })
        .await;

    let flushed = redis.command("FLUSHALL").unwrap();
    assert!(flushed.starts_with("+OK"), "{flushed}");
    eventually_some(Duration::from_secs(10), "the pins are back in the store", || async {
        (store.pins().await.ok()?.len() == 50).then_some(())
    })
    .await;
    assert_eq!(store.split_salt().await.unwrap(), salt, "the split salt changed");
    let overrides = store.overrides().await.unwrap().expect("the overrides are back");
    assert_eq!(overrides.revision, 1);
    assert!(String::from_utf8_lossy(&overrides.json).contains("25"), "{overrides:?}");
    // The drain clock starts again: the forgotten v1 traffic may have been recent.
    eventually(Duration::from_secs(3), "the quiet time starts again", || async { quiet_for().await < 1.5 })
        .await;
    // And the sessions stay where they were, on both replicas.
    assert_eq!(pools_of(keys.iter().map(|k| b.url(&format!("/api/studies/{k}"))).collect()).await, pools);
    a.shutdown().await;
    b.shutdown().await;
}

/// Requests for a new session on one replica that arrive while its pin is still being claimed
/// wait for the fleet's answer instead of following the provisional pin: with splits that
/// disagree, every request of a session, on either replica, is answered from one pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_following_a_pin_being_claimed_wait_for_the_fleets_answer() {
    let (redis, v1, v2) = redis_and_upstreams().await;
    let a = replica(&redis, "provisional", v1, v2, 100.0).await;
    let b = replica(&redis, "provisional", v1, v2, 0.0).await;
    for round in 0..100 {
        let key = format!("p{round}");
        let mut urls = vec![a.url(&format!("/api/studies/{key}"))];
        urls.extend((0..3).map(|i| b.url(&format!("/api/studies/{key}/part/{i}"))));
        let answers =
            futures_util::future::join_all(urls.into_iter().map(|url| async move { get(&url).await })).await;
        let pools: Vec<&str> = answers.iter().map(|r| r.header("x-rollout-pool").unwrap_or("none")).collect();
        assert!(pools.iter().all(|p| *p == pools[0]), "{key}: answered from {pools:?}");
    }
    a.shutdown().await;
    b.shutdown().await;
}

/// A replica can start while the fleet store is unreachable: it serves from its local copy
/// (known sessions on their pools, new ones pinned by the split), withholds the drain signal,
/// and joins once the store answers, writing the pins it made meanwhile for the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_starts_without_the_store_and_joins_when_it_answers() {
    let (mut redis, v1, v2) = redis_and_upstreams().await;
    let a = replica(&redis, "late", v1, v2, 50.0).await;
    let known = pools_of(vec![a.url("/api/studies/known")]).await;
    let state = a.shutdown().await;

    redis.kill();
    let store = format!("{{ backend: redis, url: \"{}\", namespace: late }}", redis.url());
    let config = ConfigBuilder::one_each(v1, v2).legacy_v1_percent(50.0).section("store", &store);
    let a = ProxyBuilder::new(&config).state_dir(state).spawn().await;
    assert_eq!(pools_of(vec![a.url("/api/studies/known")]).await, known, "a known session moved");
    let made = pools_of(vec![a.url("/api/studies/made-alone")]).await;
    let drain = get(&a.admin_url("/drain")).await;
    assert_eq!(drain.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(drain.json()["withheld"].is_string(), "{drain:?}");

    redis.restart();
    let b = replica(&redis, "late", v1, v2, 50.0).await;
    eventually(Duration::from_secs(10), "B learns the pin A made alone", || async {
        b.live_pins(Pool::V1) + b.live_pins(Pool::V2) == 2
    })
    .await;
    assert_eq!(pools_of(vec![b.url("/api/studies/made-alone")]).await, made);
    eventually(Duration::from_secs(5), "A's metrics say the store is up", || async {
        metric(&a.metrics().await, "rollout_store_up", &[]) == Some(1.0)
    })
    .await;
    a.shutdown().await;
    b.shutdown().await;
}

/// `kill -9` of one replica under load: the other serves its sessions on their pools without a
/// failed request and no pin is lost; the killed replica restarts and catches up with what was
/// made while it was gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_under_load_loses_nothing_and_catches_up() {
    let (redis, v1, v2) = redis_and_upstreams().await;
    let dir = tempfile::tempdir().unwrap();
    let store = format!("{{ backend: redis, url: \"{}\", namespace: killed }}", redis.url());
    let file = write_config(
        dir.path(),
        &ConfigBuilder::one_each(v1, v2).legacy_v1_percent(50.0).section("store", &store),
    );
    let args = ["run", "--config", file.as_str()];
    let a = ProxyProcess::start(&args).await;
    let b = replica(&redis, "killed", v1, v2, 50.0).await;

    let keys: Vec<String> = (0..100).map(|i| format!("study-{i}")).collect();
    let pools = pools_of(keys.iter().map(|k| a.url(&format!("/api/studies/{k}"))).collect()).await;

    // Load on B for A's sessions, across the kill.
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (stop, urls) =
            (stop.clone(), keys.iter().map(|k| b.url(&format!("/api/studies/{k}/more"))).collect::<Vec<_>>());
        let expected = pools.clone();
        tokio::spawn(async move {
            let mut answered = 0;
            while !stop.load(Ordering::Relaxed) {
                assert_eq!(pools_of(urls.clone()).await, expected, "a session moved or failed on B");
                answered += urls.len();
            }
            answered
        })
    };
    a.signal(libc::SIGKILL);
    let mut a = a;
    assert_eq!(a.exit_status(Duration::from_secs(5)).await.code(), None, "killed by a signal");
    drop(a);
    // New sessions while A is gone, made on B.
    let later: Vec<String> = (0..20).map(|i| format!("later-{i}")).collect();
    let later_pools = pools_of(later.iter().map(|k| b.url(&format!("/api/studies/{k}"))).collect()).await;

    let a = ProxyProcess::start(&args).await;
    stop.store(true, Ordering::Relaxed);
    assert!(load.await.unwrap() >= keys.len(), "the load on B did not run");
    assert_eq!(pools_of(keys.iter().map(|k| a.url(&format!("/api/studies/{k}"))).collect()).await, pools);
    assert_eq!(
        pools_of(later.iter().map(|k| a.url(&format!("/api/studies/{k}"))).collect()).await,
        later_pools
    );
    a.signal(libc::SIGTERM);
    b.shutdown().await;
}

/// A hitless restart (`run --takeover`) of a fleet replica: the successor takes the sockets,
/// joins the fleet, and serves every session on its pool; the old process drains and exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_in_fleet_mode_keeps_every_session_on_its_pool() {
    let (redis, v1, v2) = redis_and_upstreams().await;
    let dir = tempfile::tempdir().unwrap();
    let store = format!("{{ backend: redis, url: \"{}\", namespace: takeover }}", redis.url());
    let file = write_config(
        dir.path(),
        &ConfigBuilder::one_each(v1, v2).legacy_v1_percent(50.0).section("store", &store),
    );
    let mut old = ProxyProcess::start(&["run", "--config", &file]).await;
    let keys: Vec<String> = (0..60).map(|i| format!("t{i}")).collect();
    let urls =
        |p: &ProxyProcess| keys.iter().map(|k| p.url(&format!("/api/studies/{k}"))).collect::<Vec<_>>();
    let pools = pools_of(urls(&old)).await;

    let new = ProxyProcess::start(&["run", "--config", &file, "--takeover"]).await;
    assert_eq!(new.addr, old.addr, "the new process serves on the same socket");
    let status = old.exit_status(Duration::from_secs(15)).await;
    assert_eq!(status.code(), Some(0), "the old process drained and exited: {}", old.stderr.lock().unwrap());
    assert_eq!(pools_of(urls(&new)).await, pools, "a session moved across the takeover");
    let drain = get(&new.admin_url("/drain")).await.json();
    assert!(drain.get("withheld").is_none(), "the successor has not joined the fleet: {drain}");
    new.signal(libc::SIGTERM);
}

/// The ramp lease and its fencing token, on the store: one holder at a time, renewed only by
/// its holder; once it ran out and another replica took it, the old holder's writes (the ramp
/// record and the share in the overrides) are refused, while the new holder's and the
/// operator's (by compare-and-set on the record's version) go through.
#[tokio::test]
async fn a_stale_ramp_leaders_writes_are_refused() {
    let redis = RedisServer::start();
    let store = FleetStore::connect(&redis.url(), "lease").await.unwrap();
    let short = Duration::from_millis(300);
    let a = store.lease("a", short, None).await.unwrap();
    assert_eq!((a.holder(), a.token()), ("a", 1));
    assert_eq!(store.lease("b", short, None).await.unwrap(), a, "held: B gets A's lease back");
    assert_eq!(store.lease("a", short, Some(&a)).await.unwrap(), a, "renewed by its holder");
    assert_eq!(store.write_ramp(0, b"step 1", Some(&a), "a").await.unwrap(), RampWrite::Done(1));

    // A stalls past its lease; B takes over with the next token.
    tokio::time::sleep(short * 2).await;
    let b = store.lease("b", Duration::from_secs(30), None).await.unwrap();
    assert_eq!((b.holder(), b.token()), ("b", 2));
    assert_eq!(store.lease("a", short, Some(&a)).await.unwrap(), b, "A cannot renew what it lost");
    assert_eq!(store.write_ramp(1, b"step 2 by a", Some(&a), "a").await.unwrap(), RampWrite::Fenced);
    assert_eq!(
        store.publish_overrides(0, b"{\"legacy_v1_percent\":50.0}", Some(&a)).await.unwrap(),
        Published::Fenced
    );
    let record = store.ramp().await.unwrap().unwrap();
    assert_eq!((record.version, record.json.as_slice(), record.writer.as_str()), (1, &b"step 1"[..], "a"));
    assert_eq!(store.overrides().await.unwrap(), None, "the stale leader's share was not applied");

    assert_eq!(store.write_ramp(1, b"step 2", Some(&b), "b").await.unwrap(), RampWrite::Done(2));
    assert_eq!(
        store.publish_overrides(0, b"{\"legacy_v1_percent\":50.0}", Some(&b)).await.unwrap(),
        Published::Done(1)
    );
    // An operator's command on any replica: by the record's version, no lease needed.
    assert_eq!(store.write_ramp(1, b"paused", None, "c").await.unwrap(), RampWrite::Moved);
    assert_eq!(store.write_ramp(2, b"paused", None, "c").await.unwrap(), RampWrite::Done(3));

    // Giving up a lease one no longer holds leaves the holder's alone.
    store.release(&a).await.unwrap();
    assert_eq!(store.lease("c", short, None).await.unwrap(), b);
    store.release(&b).await.unwrap();
    let c = store.lease("c", short, None).await.unwrap();
    assert_eq!((c.holder(), c.token()), ("c", 3));
}

/// A fleet ramp plan: a few seconds at 90 %, then an hour at 50 %; judged every second on
/// whatever traffic there is (a lax error bound, so a few dozen requests pass).
const FLEET_PLAN: &str = r#"{
  "steps": [ { "v1_percent": 90, "hold": "3s" }, { "v1_percent": 50, "hold": "1h" }, { "v1_percent": 0 } ],
  "analysis": { "interval": "1s", "window": "2s", "min_requests": 5, "min_new_sessions": 0,
                "min_latency_samples": 5, "max_error_ratio": 0.5, "failure_limit": 3,
                "inconclusive_timeout": "1h" }
}"#;

async fn ramp_of(admin_url: &str) -> serde_json::Value {
    get(&format!("{admin_url}/ramp")).await.json()
}

/// Two replicas: only the lease holder drives the ramp (its record, its writes), the other
/// follows; started on the follower, the ramp is driven by the leader. `kill -9` of the leader:
/// the other takes the lease over within the lease time and goes on from the same step, with
/// the hold that was left, neither repeating nor skipping it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_replica_drives_the_ramp_and_another_takes_over_when_it_dies() {
    let (redis, v1, v2) = redis_and_upstreams().await;
    let dir = tempfile::tempdir().unwrap();
    let lease = Duration::from_secs(2);
    let config =
        || fleet_config(&redis, "ramp", v1, v2, "leader_lease: 2s", |config| config.legacy_v1_percent(100.0));
    let file = write_config(dir.path(), &config());
    let a = ProxyProcess::start(&["run", "--config", file.as_str()]).await;
    let a_admin = a.admin_url("");
    let a_id: String = eventually_some(Duration::from_secs(5), "A leads the ramp", || {
        let url = a_admin.clone();
        async move {
            let ramp = ramp_of(&url).await;
            (ramp["leader"]["this"] == true).then(|| ramp["leader"]["replica"].as_str().unwrap().to_owned())
        }
    })
    .await;
    let b = ProxyBuilder::new(&config()).spawn().await;
    let b_admin = b.admin_url("");
    eventually(Duration::from_secs(5), "B sees A as the leader", || {
        let (url, a_id) = (b_admin.clone(), a_id.clone());
        async move {
            let leader = ramp_of(&url).await["leader"].clone();
            leader["this"] == false && leader["replica"] == a_id.as_str()
        }
    })
    .await;

    // Traffic on both replicas (on A until it is killed): v2 calls and new studies.
    let (on_a, on_b) = (Arc::new(AtomicBool::new(true)), Arc::new(AtomicBool::new(true)));
    let traffic = [(on_a.clone(), a.url("")), (on_b.clone(), b.url(""))].map(|(on, base)| {
        tokio::spawn(async move {
            let mut next = 0;
            while on.load(Ordering::Relaxed) {
                get(&format!("{base}/api/v2/items")).await;
                get(&format!("{base}/api/studies/traffic-{next}")).await;
                next += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    });

    let started = admin_call("PUT", &b.admin_url("/ramp"), Some(TOKEN), None, Some(FLEET_PLAN)).await;
    assert_eq!(started.status, StatusCode::OK, "started on the follower: {started:?}");
    eventually(Duration::from_secs(15), "the leader moves the ramp to step 1", || {
        let url = b_admin.clone();
        async move { ramp_of(&url).await["step"] == 1 }
    })
    .await;
    let store = FleetStore::connect(&redis.url(), "ramp").await.unwrap();
    let record = store.ramp().await.unwrap().unwrap();
    assert_eq!(record.writer, a_id, "only the lease holder writes the ramp");
    assert_eq!(metric(&get_text(&a_admin).await, "rollout_ramp_leader", &[]), Some(1.0));
    assert_eq!(metric(&b.metrics().await, "rollout_ramp_leader", &[]), Some(0.0));
    // Some of the hour held, by A.
    let hold_left = || async { ramp_of(&b_admin).await["hold_left_seconds"].as_f64().unwrap() };
    eventually(Duration::from_secs(10), "A holds step 1 for a while", || async {
        hold_left().await <= 3_598.0
    })
    .await;

    on_a.store(false, Ordering::Relaxed);
    let [to_a, to_b] = traffic;
    to_a.await.unwrap();
    let left_by_a = hold_left().await;
    a.signal(libc::SIGKILL);
    let killed = std::time::Instant::now();
    let mut a = a;
    assert_eq!(a.exit_status(Duration::from_secs(5)).await.code(), None, "killed by a signal");
    eventually(Duration::from_secs(6), "B takes the ramp over", || {
        let url = b_admin.clone();
        async move { ramp_of(&url).await["leader"]["this"] == true }
    })
    .await;
    let took = killed.elapsed();
    assert!(took <= lease + Duration::from_secs(2), "taken over within the lease (and a tick): {took:?}");
    // B drives now: same step, the hold goes on from what A left, B writes.
    let b_id = ramp_of(&b_admin).await["leader"]["replica"].as_str().unwrap().to_owned();
    assert_ne!(b_id, a_id);
    eventually(Duration::from_secs(10), "B writes the ramp", || {
        let (store, b_id) = (store.clone(), b_id.clone());
        async move { store.ramp().await.unwrap().unwrap().writer == b_id }
    })
    .await;
    let now = ramp_of(&b_admin).await;
    assert_eq!((now["state"].as_str(), now["step"].as_u64()), (Some("progressing"), Some(1)), "{now}");
    assert_eq!(now["v1_percent"], 50.0);
    let left = now["hold_left_seconds"].as_f64().unwrap();
    assert!(left <= left_by_a, "the hold did not start again: {left_by_a}s left by A, {left}s now");
    eventually(Duration::from_secs(5), "B counts the hold on", || async { hold_left().await < left_by_a })
        .await;
    assert_eq!(ramp_of(&b_admin).await["step"], 1, "the step is neither repeated nor skipped");
    assert_eq!(metric(&b.metrics().await, "rollout_ramp_leader", &[]), Some(1.0));
    let status: serde_json::Value = get(&b.admin_url("/status")).await.json();
    assert_eq!(status["routes"]["legacy_v1_percent"], 50.0, "{status}");

    on_b.store(false, Ordering::Relaxed);
    to_b.await.unwrap();
    b.shutdown().await;
}

async fn get_text(admin_url: &str) -> String {
    String::from_utf8(get(&format!("{admin_url}/metrics")).await.body.to_vec()).unwrap()
}

/// The driving replica judges the fleet's traffic, not only its own: v2 fails only behind the
/// other replica, and the ramp still aborts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_driving_replica_judges_every_replicas_traffic() {
    let (redis, v1, v2) = redis_and_upstreams().await;
    let config = || {
        fleet_config(&redis, "judged", v1, v2, "leader_lease: 2s", |config| config.legacy_v1_percent(100.0))
    };
    let a = ProxyBuilder::new(&config()).spawn().await;
    eventually(Duration::from_secs(5), "A leads the ramp", || async {
        ramp_of(&a.admin_url("")).await["leader"]["this"] == true
    })
    .await;
    let b = ProxyBuilder::new(&config()).spawn().await;
    let plan = r#"{
      "steps": [ { "v1_percent": 90, "hold": "1h" }, { "v1_percent": 0 } ],
      "analysis": { "interval": "1s", "window": "3s", "min_requests": 20, "min_new_sessions": 0,
                    "min_latency_samples": 5, "failure_limit": 2, "inconclusive_timeout": "1h" }
    }"#;
    let started = admin_call("PUT", &a.admin_url("/ramp"), Some(TOKEN), None, Some(plan)).await;
    assert_eq!(started.status, StatusCode::OK, "{started:?}");

    // Every v2 request fails, all of them through B.
    let on = Arc::new(AtomicBool::new(true));
    let traffic = {
        let (on, url) = (on.clone(), b.url("/api/v2/items/__status/500"));
        tokio::spawn(async move {
            while on.load(Ordering::Relaxed) {
                get(&url).await;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    eventually(Duration::from_secs(15), "the ramp aborts on B's traffic", || async {
        ramp_of(&b.admin_url("")).await["state"] == "aborted"
    })
    .await;
    on.store(false, Ordering::Relaxed);
    traffic.await.unwrap();
    let aborted = ramp_of(&a.admin_url("")).await;
    assert_eq!(aborted["analyses"][0]["judgement"]["v2_error_ratio"], 1.0, "{aborted}");
    assert_eq!(aborted["v1_percent"], 100.0);
    assert_eq!(metric(&a.metrics().await, "rollout_ramp_leader", &[]), Some(1.0), "A judged it");
    a.shutdown().await;
    b.shutdown().await;
}

/// A Redis that lost its data gets the ramp back from the replica driving it, where it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_lost_its_data_gets_the_ramp_back() {
    let (redis, v1, v2) = redis_and_upstreams().await;
    let a = ProxyBuilder::new(&fleet_config(&redis, "lost-ramp", v1, v2, "leader_lease: 2s", |c| c))
        .spawn()
        .await;
    let started = admin_call("PUT", &a.admin_url("/ramp"), Some(TOKEN), None, Some(FLEET_PLAN)).await;
    assert_eq!(started.status, StatusCode::OK, "{started:?}");
    let promoted = admin_call("POST", &a.admin_url("/ramp/promote"), Some(TOKEN), None, None).await;
    assert_eq!(promoted.json()["step"], 1, "{promoted:?}");
    let store = FleetStore::connect(&redis.url(), "lost-ramp").await.unwrap();
    assert!(store.ramp().await.unwrap().is_some());

    let flushed = redis.command("FLUSHALL").unwrap();
    assert!(flushed.starts_with("+OK"), "{flushed}");
    let back = eventually_some(Duration::from_secs(10), "the ramp is back in the store", || async {
        store.ramp().await.ok()?
    })
    .await;
    let record: serde_json::Value = serde_json::from_slice(&back.json).unwrap();
    assert_eq!(
        (record["progress"]["state"].as_str(), record["progress"]["step"].as_u64()),
        (Some("progressing"), Some(1))
    );
    let now = ramp_of(&a.admin_url("")).await;
    assert_eq!((now["step"].as_u64(), now["leader"]["this"].as_bool()), (Some(1), Some(true)), "{now}");
    assert_eq!(now["stalled"], serde_json::Value::Null);

    // With the store gone the ramp stands still, and says so.
    let mut redis = redis;
    redis.kill();
    eventually(Duration::from_secs(10), "the ramp says it stands still", || async {
        ramp_of(&a.admin_url("")).await["stalled"].is_string()
    })
    .await;
    a.shutdown().await;
}
