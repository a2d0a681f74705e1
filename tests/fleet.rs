//! The fleet store on a real Redis server: first writer wins across replicas, the split salt is
//! one for the fleet, and what was written survives a Redis restart.

mod support;

use std::collections::BTreeMap;

use rollout_proxy::config::PoolName;
use rollout_proxy::session::PinPolicy;
use rollout_proxy::store::fleet::{Claimed, FleetStore};
use support::redis::RedisServer;

const POLICY: PinPolicy = PinPolicy { idle_secs: 600, max_secs: 3_600, max_active: 1_000_000, stale_secs: 3 };
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
