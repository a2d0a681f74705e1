//! The fleet's shared store on Redis (or Valkey): where replicas of one deployment agree on pins.
//!
//! Every replica keeps its full local copy of the pins (the pin table); this is the source of
//! truth they settle on. The one operation that must be atomic across replicas is making a pin:
//! [`FleetStore::claim`] runs one Lua script that returns the key's live pin if any replica made
//! one, and otherwise makes it, so concurrent first requests for one key on different replicas
//! always end up on one pool: the first writer's. The same script records a v1 pin in a sorted
//! set scored by when it ends (the fleet's drain signal counts the live ones) and appends the pin
//! to a change stream other replicas follow.
//!
//! Layout under the namespace `ns` (one hash tag, so a script's keys share a cluster slot):
//! - `{ns}:pins`: hash, session key → `pool:first_seen:last_seen` (Unix seconds);
//! - `{ns}:v1`: sorted set of v1 pins, scored by the second they end if no request comes;
//! - `{ns}:changes`: stream of changes (pins made, refreshed, ended), trimmed to about
//!   [`STREAM_LENGTH`] entries; a replica follows it from its position ([`Follower::changes`]);
//! - `{ns}:last_v1`: hash, replica → Unix milliseconds of its last v1 request;
//! - `{ns}:overrides`: hash with the operator's overrides (`json`) and the fleet `revision`
//!   they make current, changed only by compare-and-set on the revision;
//! - `{ns}:replicas`: hash, replica → `revision:unix_ms`, the fleet revision each replica has
//!   applied and when it last said so (for `GET /status`);
//! - `{ns}:salt`: the legacy split's salt ([`SplitSalt`]), made by the first replica;
//! - `{ns}:ramp`, `{ns}:ramp_lease`, `{ns}:ramp_fence`: the ramp and who drives it, and
//!   `{ns}:ramp_totals`, each replica's request counters for the ramp's analyses ([`lease`]);
//! - `{ns}:incarnation`: a random marker made by the first replica; a replica that finds it
//!   gone or changed knows the store lost its data (flushed, or restarted without its
//!   append-only file) and writes back what it holds.
//!
//! Every script checks a pin's `first_seen` before changing it, so a late refresh or end meant
//! for a pin that has since ended and been made again never touches the new one.

mod lease;

pub use lease::{Lease, RampRecord, RampWrite};

use redis::aio::ConnectionManager;
use redis::{AsyncCommands, Script};

use super::{new_split_salt, SplitSalt, StoredPin};
use crate::config::PoolName;
use crate::session::PinPolicy;

/// About how many changes the stream keeps. A replica that falls further behind than this
/// reads every pin again instead.
pub(crate) const STREAM_LENGTH: usize = 100_000;

/// How long an answer may take before the store counts as unreachable for that call. The
/// client's default (500 ms) would call a store that is merely busy for a moment unreachable.
const RESPONSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Returns the key's live pin, or makes one on the proposed pool.
///
/// KEYS: pins hash, v1 set, change stream. ARGV: session key, proposed pool, now, idle seconds,
/// max seconds, stream length. Answers `{made, pool, first_seen, last_seen}`. A stored pin that
/// has ended (by its idle or maximum time, as of `now`) counts as absent, as it does locally.
const CLAIM: &str = r"
local key, proposed, now = ARGV[1], ARGV[2], tonumber(ARGV[3])
local idle, max = tonumber(ARGV[4]), tonumber(ARGV[5])
local stored = redis.call('HGET', KEYS[1], key)
if stored then
  local pool, first, last = string.match(stored, '^(v[12]):(%d+):(%d+)$')
  if pool and now - tonumber(last) < idle and now - tonumber(first) < max then
    return {0, pool, tonumber(first), tonumber(last)}
  end
end
local value = proposed .. ':' .. now .. ':' .. now
redis.call('HSET', KEYS[1], key, value)
if proposed == 'v1' then
  redis.call('ZADD', KEYS[2], now + math.min(idle, max), key)
else
  redis.call('ZREM', KEYS[2], key)
end
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[6], '*', 'pin', key, 'value', value)
return {1, proposed, now, now}
";

/// Moves stored pins' `last_seen` forward (never back) and their end in the v1 set; one stream
/// entry for the batch. KEYS: pins, v1 set, stream. ARGV: idle seconds, max seconds, stream
/// length, then (key, first_seen, last_seen) triples. Answers how many pins moved.
const TOUCH: &str = r"
local idle, max = tonumber(ARGV[1]), tonumber(ARGV[2])
local moved = {}
for i = 4, #ARGV, 3 do
  local key, first, last = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
  local stored = redis.call('HGET', KEYS[1], key)
  if stored then
    local pool, f, was = string.match(stored, '^(v[12]):(%d+):(%d+)$')
    if pool and f == first and last > tonumber(was) then
      redis.call('HSET', KEYS[1], key, pool .. ':' .. f .. ':' .. last)
      if pool == 'v1' then
        redis.call('ZADD', KEYS[2], math.min(last + idle, tonumber(f) + max), key)
      end
      moved[#moved + 1] = key .. ':' .. f .. ':' .. last
    end
  end
end
if #moved > 0 then
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[3], '*', 'touch', table.concat(moved, ','))
end
return #moved
";

/// Ends a pin: the one made at `first_seen`, or whichever is stored when that is empty.
/// KEYS: pins, v1 set, stream. ARGV: key, first_seen or '', stream length. Answers the ended
/// pin's pool, or false if there was none.
const END: &str = r"
local stored = redis.call('HGET', KEYS[1], ARGV[1])
if not stored then return false end
local pool, first = string.match(stored, '^(v[12]):(%d+):')
if ARGV[2] ~= '' and first ~= ARGV[2] then return false end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[3], '*', 'end', ARGV[1] .. ':' .. (first or ''))
return pool
";

/// Removes the named pins if they have ended (by their idle or maximum time, as of `now`):
/// replicas end pins in their local copies by the same rule without being told, and without
/// this the store would keep every session it ever saw. Checked again here, atomically, because
/// a request may have renewed a pin since the caller read it. KEYS: pins, v1 set. ARGV: now,
/// idle seconds, max seconds, then the session keys. Answers how many pins it removed.
const SWEEP: &str = r"
local now, idle, max = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local removed = 0
for i = 4, #ARGV do
  local stored = redis.call('HGET', KEYS[1], ARGV[i])
  local pool, first, last = string.match(stored or '', '^(v[12]):(%d+):(%d+)$')
  if pool and (now - tonumber(last) >= idle or now - tonumber(first) >= max) then
    redis.call('HDEL', KEYS[1], ARGV[i])
    redis.call('ZREM', KEYS[2], ARGV[i])
    removed = removed + 1
  end
end
return removed
";

/// Records a replica's last v1 request, never moving it back. KEYS: the last-v1 hash. ARGV:
/// replica, Unix milliseconds.
const LAST_V1: &str = r"
local was = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if tonumber(ARGV[2]) > was then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
return 1
";

/// Replaces the operator's overrides if the fleet revision is still the one the caller knows.
/// KEYS: overrides hash, stream, ramp lease. ARGV: expected revision, JSON, stream length, the
/// ramp lease the caller holds or ''. Answers `{1, new revision, ''}`, or `{0, current
/// revision, current JSON}` when another change came first. With a lease (the ramp leader's
/// change), only while that lease is still the store's: `{2, current revision, ''}` when not.
const PUBLISH_OVERRIDES: &str = r"
if ARGV[4] ~= '' and redis.call('GET', KEYS[3]) ~= ARGV[4] then
  return {2, tonumber(redis.call('HGET', KEYS[1], 'revision') or '0'), ''}
end
local current = tonumber(redis.call('HGET', KEYS[1], 'revision') or '0')
if current ~= tonumber(ARGV[1]) then
  return {0, current, redis.call('HGET', KEYS[1], 'json') or ''}
end
local revision = current + 1
redis.call('HSET', KEYS[1], 'revision', revision, 'json', ARGV[2])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'overrides', revision, 'json', ARGV[2])
return {1, revision, ''}
";

/// Puts overrides back into a store that lost them, keeping their revision, unless another
/// replica did first. KEYS: overrides hash, stream. ARGV: revision, JSON, stream length.
/// Answers what the store holds afterwards: `{revision, json}`.
const RESTORE_OVERRIDES: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[1], 'revision', ARGV[1], 'json', ARGV[2])
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'overrides', ARGV[1], 'json', ARGV[2])
end
return redis.call('HMGET', KEYS[1], 'revision', 'json')
";

/// What became of overrides sent to the fleet store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Published {
    /// They are the fleet's, at this revision.
    Done(u64),
    /// Another change came first: these are the fleet's overrides.
    Stale(FleetOverrides),
    /// Sent under a ramp lease the store no longer has: a stale leader's change, refused.
    Fenced,
}

/// The operator's overrides as the fleet has them: JSON, and the fleet revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetOverrides {
    pub revision: u64,
    pub json: Vec<u8>,
}

/// What changed in the fleet store, as read from its stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A pin was made (on any replica).
    Pin(StoredPin),
    /// Pins' `last_seen` moved forward: (key, first_seen, last_seen).
    Touch(Vec<(Box<str>, u32, u32)>),
    /// A pin ended by an operator; `first_seen` names which.
    End { key: Box<str>, first_seen: u32 },
    /// An operator changed the overrides (on any replica).
    Overrides(FleetOverrides),
}

/// The stream read from a position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Changes {
    /// What came after the position, in order, and the position after them.
    Read { changes: Vec<Change>, position: String },
    /// The stream was trimmed past the position: some changes are lost, so read every pin again
    /// ([`FleetStore::pins`]) and follow from `position`.
    Trimmed { position: String },
}

#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("invalid store URL {url:?}")]
    Url {
        url: String,
        #[source]
        source: redis::RedisError,
    },
    #[error("the fleet store at {location} failed")]
    Redis {
        location: String,
        #[source]
        source: redis::RedisError,
    },
    #[error("the fleet store at {location} did not answer in time ({what})")]
    Timeout { location: String, what: &'static str },
    #[error("the fleet store at {location} answered {answer:?} for {what}, which this version cannot read")]
    Unreadable { location: String, what: &'static str, answer: String },
}

/// A pin as the fleet store has it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claimed {
    pub pool: PoolName,
    pub first_seen: u32,
    pub last_seen: u32,
    /// Whether this claim made the pin (else another request, on any replica, made it first).
    pub made: bool,
}

/// The names of one namespace's keys.
#[derive(Debug, Clone)]
struct Keys {
    pins: String,
    v1: String,
    changes: String,
    last_v1: String,
    overrides: String,
    salt: String,
    incarnation: String,
    replicas: String,
    ramp: String,
    ramp_lease: String,
    ramp_fence: String,
    ramp_totals: String,
}

impl Keys {
    fn new(namespace: &str) -> Keys {
        let key = |name: &str| format!("{{{namespace}}}:{name}");
        Keys {
            pins: key("pins"),
            v1: key("v1"),
            changes: key("changes"),
            last_v1: key("last_v1"),
            overrides: key("overrides"),
            salt: key("salt"),
            incarnation: key("incarnation"),
            replicas: key("replicas"),
            ramp: key("ramp"),
            ramp_lease: key("ramp_lease"),
            ramp_fence: key("ramp_fence"),
            ramp_totals: key("ramp_totals"),
        }
    }
}

/// A connection to the fleet store; cheap to clone, reconnects by itself.
#[derive(Clone)]
pub struct FleetStore {
    client: redis::Client,
    connection: ConnectionManager,
    keys: Keys,
    claim: Script,
    touch: Script,
    end: Script,
    sweep: Script,
    last_v1: Script,
    publish_overrides: Script,
    restore_overrides: Script,
    lease: Script,
    release: Script,
    write_ramp: Script,
    /// The URL without credentials, for messages.
    location: String,
}

impl std::fmt::Debug for FleetStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetStore").field("location", &self.location).finish_non_exhaustive()
    }
}

impl FleetStore {
    /// Connects to the store at `url` (`redis://` or `rediss://`), keys under `namespace`.
    pub async fn connect(url: &str, namespace: &str) -> Result<FleetStore, FleetError> {
        let client =
            redis::Client::open(url).map_err(|source| FleetError::Url { url: url.to_owned(), source })?;
        let info = client.get_connection_info();
        let location = format!("{}/{}", info.addr(), info.redis_settings().db());
        // Reconnecting is retried once, briefly: a call to an unreachable store should fail within
        // seconds (so the replica degrades and says so), and the next call tries again anyway.
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_connection_timeout(Some(RESPONSE_TIMEOUT))
            .set_number_of_retries(1)
            .set_max_delay(std::time::Duration::from_millis(500));
        // Connects on first use: a replica can start while the store is unreachable.
        let connection = ConnectionManager::new_lazy_with_config(client.clone(), config)
            .map_err(|source| FleetError::Redis { location: location.clone(), source })?;
        Ok(FleetStore {
            client,
            connection,
            keys: Keys::new(namespace),
            claim: Script::new(CLAIM),
            touch: Script::new(TOUCH),
            end: Script::new(END),
            sweep: Script::new(SWEEP),
            last_v1: Script::new(LAST_V1),
            publish_overrides: Script::new(PUBLISH_OVERRIDES),
            restore_overrides: Script::new(RESTORE_OVERRIDES),
            lease: Script::new(lease::LEASE),
            release: Script::new(lease::RELEASE),
            write_ramp: Script::new(lease::WRITE_RAMP),
            location,
        })
    }

    fn failed(&self) -> impl Fn(redis::RedisError) -> FleetError + '_ {
        |source| FleetError::Redis { location: self.location.clone(), source }
    }

    /// Where the store is (its URL without credentials), for messages.
    pub fn location(&self) -> &str {
        &self.location
    }

    /// Sets `key` to `value` unless it has a value (SET NX), and returns the value it has then:
    /// of replicas racing to set it, the first one's is everybody's.
    async fn set_if_absent(&self, key: &str, value: &str) -> Result<String, FleetError> {
        let mut connection = self.connection.clone();
        let _: Option<String> = redis::cmd("SET")
            .arg(key)
            .arg(value)
            .arg("NX")
            .query_async(&mut connection)
            .await
            .map_err(self.failed())?;
        connection.get(key).await.map_err(self.failed())
    }

    /// The fleet's split salt: the one stored, or a fresh one if this replica is the first.
    pub async fn split_salt(&self) -> Result<SplitSalt, FleetError> {
        let stored = self.set_if_absent(&self.keys.salt, &hex(&new_split_salt())).await?;
        unhex(&stored).ok_or_else(|| FleetError::Unreadable {
            location: self.location.clone(),
            what: "the split salt",
            answer: stored,
        })
    }

    /// Puts `salt` back as the fleet's, unless one is there (after the store lost its data).
    pub async fn restore_salt(&self, salt: &SplitSalt) -> Result<(), FleetError> {
        self.set_if_absent(&self.keys.salt, &hex(salt)).await.map(drop)
    }

    /// Records that `replica` has applied fleet revision `revision`, as of `at_ms`.
    pub async fn report_replica(&self, replica: &str, revision: u64, at_ms: u64) -> Result<(), FleetError> {
        let mut connection = self.connection.clone();
        let _: () = connection
            .hset(&self.keys.replicas, replica, format!("{revision}:{at_ms}"))
            .await
            .map_err(self.failed())?;
        Ok(())
    }

    /// Every replica's last report: (replica, revision, Unix milliseconds). Replicas that
    /// stopped reporting more than `forget_after_ms` before `now_ms` are dropped from the store.
    pub async fn replicas(
        &self,
        now_ms: u64,
        forget_after_ms: u64,
    ) -> Result<Vec<(String, u64, u64)>, FleetError> {
        let mut connection = self.connection.clone();
        let all: Vec<(String, String)> =
            connection.hgetall(&self.keys.replicas).await.map_err(self.failed())?;
        let mut replicas = Vec::new();
        for (replica, report) in all {
            let parsed = report.split_once(':').and_then(|(r, at)| Some((r.parse().ok()?, at.parse().ok()?)));
            match parsed {
                Some((revision, at)) if now_ms.saturating_sub(at) <= forget_after_ms => {
                    replicas.push((replica, revision, at))
                }
                _ => {
                    let _: () =
                        connection.hdel(&self.keys.replicas, &replica).await.map_err(self.failed())?;
                }
            }
        }
        replicas.sort();
        Ok(replicas)
    }

    /// The store's incarnation marker, made `fresh` if there is none (a new or emptied store).
    pub async fn incarnation(&self, fresh: &str) -> Result<String, FleetError> {
        self.set_if_absent(&self.keys.incarnation, fresh).await
    }

    /// The key's live pin as of `now` (Unix seconds), made on `proposed` if no replica has one.
    pub async fn claim(
        &self,
        key: &str,
        proposed: PoolName,
        now: u32,
        policy: &PinPolicy,
    ) -> Result<Claimed, FleetError> {
        let mut connection = self.connection.clone();
        let (made, pool, first_seen, last_seen): (u8, String, u32, u32) = self
            .claim
            .key(&self.keys.pins)
            .key(&self.keys.v1)
            .key(&self.keys.changes)
            .arg(key)
            .arg(proposed.as_str())
            .arg(now)
            .arg(policy.idle_secs)
            .arg(policy.max_secs)
            .arg(STREAM_LENGTH)
            .invoke_async(&mut connection)
            .await
            .map_err(self.failed())?;
        let pool = self.pool(&pool)?;
        Ok(Claimed { pool, first_seen, last_seen, made: made == 1 })
    }

    fn pool(&self, text: &str) -> Result<PoolName, FleetError> {
        match text {
            "v1" => Ok(PoolName::V1),
            "v2" => Ok(PoolName::V2),
            _ => Err(self.unreadable("a pin's pool", text)),
        }
    }

    fn unreadable(&self, what: &'static str, answer: &str) -> FleetError {
        FleetError::Unreadable { location: self.location.clone(), what, answer: answer.to_owned() }
    }

    /// Moves pins' `last_seen` forward, in one round trip: (key, first_seen, last_seen). A pin
    /// that ended, or was made again since `first_seen`, is left alone. Returns how many moved.
    pub async fn touch(
        &self,
        touches: &[(Box<str>, u32, u32)],
        policy: &PinPolicy,
    ) -> Result<usize, FleetError> {
        if touches.is_empty() {
            return Ok(0);
        }
        let mut invocation = self.touch.key(&self.keys.pins);
        invocation.key(&self.keys.v1).key(&self.keys.changes);
        invocation.arg(policy.idle_secs).arg(policy.max_secs).arg(STREAM_LENGTH);
        for (key, first_seen, last_seen) in touches {
            invocation.arg(&**key).arg(first_seen).arg(last_seen);
        }
        let mut connection = self.connection.clone();
        invocation.invoke_async(&mut connection).await.map_err(self.failed())
    }

    /// Ends the key's pin (the one made at `first_seen`, if given). Returns the pool it had, or
    /// `None` if there was no such pin.
    pub async fn end(&self, key: &str, first_seen: Option<u32>) -> Result<Option<PoolName>, FleetError> {
        let mut connection = self.connection.clone();
        let first_seen = first_seen.map(|s| s.to_string()).unwrap_or_default();
        let ended: Option<String> = self
            .end
            .key(&self.keys.pins)
            .key(&self.keys.v1)
            .key(&self.keys.changes)
            .arg(key)
            .arg(first_seen)
            .arg(STREAM_LENGTH)
            .invoke_async(&mut connection)
            .await
            .map_err(self.failed())?;
        ended.map(|pool| self.pool(&pool)).transpose()
    }

    /// One step of a pass over the stored pins that removes the ended ones (as of `now`, by
    /// `policy`): reads about `page` pins from `cursor` on (0 starts a pass) and removes those
    /// that ended. Returns the cursor of the next step (0 when the pass is done) and how many
    /// pins it removed. The page is read by a plain HSCAN, not inside the script: Redis runs
    /// an HSCAN from a script many times slower.
    pub async fn sweep(
        &self,
        now: u32,
        policy: &PinPolicy,
        cursor: u64,
        page: usize,
    ) -> Result<(u64, usize), FleetError> {
        let mut connection = self.connection.clone();
        let (next, entries): (u64, Vec<(String, String)>) = redis::cmd("HSCAN")
            .arg(&self.keys.pins)
            .arg(cursor)
            .arg("COUNT")
            .arg(page)
            .query_async(&mut connection)
            .await
            .map_err(self.failed())?;
        let mut ended = Vec::new();
        for (key, value) in entries {
            // A value this build cannot read is left for the claim script to replace.
            let Ok(pin) = self.stored_pin(key.into(), &value) else { continue };
            if now.saturating_sub(pin.last_seen) >= policy.idle_secs
                || now.saturating_sub(pin.first_seen) >= policy.max_secs
            {
                ended.push(pin.key);
            }
        }
        if ended.is_empty() {
            return Ok((next, 0));
        }
        let mut invocation = self.sweep.key(&self.keys.pins);
        invocation.key(&self.keys.v1).arg(now).arg(policy.idle_secs).arg(policy.max_secs);
        for key in &ended {
            invocation.arg(&**key);
        }
        let removed = invocation.invoke_async(&mut connection).await.map_err(self.failed())?;
        Ok((next, removed))
    }

    /// Every stored pin, ended or not (the caller applies its policy), read in pages so the
    /// store answers others in between.
    pub async fn pins(&self) -> Result<Vec<StoredPin>, FleetError> {
        let mut connection = self.connection.clone();
        let mut pins = Vec::new();
        let mut cursor = 0u64;
        loop {
            let (next, page): (u64, Vec<(String, String)>) = redis::cmd("HSCAN")
                .arg(&self.keys.pins)
                .arg(cursor)
                .arg("COUNT")
                .arg(10_000)
                .query_async(&mut connection)
                .await
                .map_err(self.failed())?;
            for (key, value) in page {
                pins.push(self.stored_pin(key.into(), &value)?);
            }
            if next == 0 {
                return Ok(pins);
            }
            cursor = next;
        }
    }

    fn stored_pin(&self, key: Box<str>, value: &str) -> Result<StoredPin, FleetError> {
        let mut parts = value.split(':');
        let pool = self.pool(parts.next().unwrap_or_default())?;
        let mut time = || parts.next().and_then(|t| t.parse::<u32>().ok());
        match (time(), time()) {
            (Some(first_seen), Some(last_seen)) => Ok(StoredPin { key, pool, first_seen, last_seen }),
            _ => Err(self.unreadable("a pin", value)),
        }
    }

    /// Live v1 pins across the fleet as of `now` (Unix seconds).
    pub async fn live_v1(&self, now: u32) -> Result<u64, FleetError> {
        let mut connection = self.connection.clone();
        connection.zcount(&self.keys.v1, format!("({now}"), "+inf").await.map_err(self.failed())
    }

    /// Records `replica`'s last v1 request (Unix milliseconds); an older time changes nothing.
    pub async fn record_last_v1(&self, replica: &str, at_ms: u64) -> Result<(), FleetError> {
        let mut connection = self.connection.clone();
        let _: u8 = self
            .last_v1
            .key(&self.keys.last_v1)
            .arg(replica)
            .arg(at_ms)
            .invoke_async(&mut connection)
            .await
            .map_err(self.failed())?;
        Ok(())
    }

    /// The fleet's last v1 request: the latest any replica recorded.
    pub async fn last_v1(&self) -> Result<Option<u64>, FleetError> {
        let mut connection = self.connection.clone();
        let times: Vec<u64> = connection.hvals(&self.keys.last_v1).await.map_err(self.failed())?;
        Ok(times.into_iter().max())
    }

    /// The operator's overrides as the fleet has them; `None` before the first change.
    pub async fn overrides(&self) -> Result<Option<FleetOverrides>, FleetError> {
        let mut connection = self.connection.clone();
        let (revision, json): (Option<u64>, Option<Vec<u8>>) = redis::cmd("HMGET")
            .arg(&self.keys.overrides)
            .arg("revision")
            .arg("json")
            .query_async(&mut connection)
            .await
            .map_err(self.failed())?;
        Ok(revision.zip(json).map(|(revision, json)| FleetOverrides { revision, json }))
    }

    /// Makes `json` the fleet's overrides if its revision is still `expected` and, with `lease`
    /// (the ramp leader's change), while that lease is still the store's.
    pub async fn publish_overrides(
        &self,
        expected: u64,
        json: &[u8],
        lease: Option<&Lease>,
    ) -> Result<Published, FleetError> {
        let mut connection = self.connection.clone();
        let (done, revision, current): (u8, u64, Vec<u8>) = self
            .publish_overrides
            .key(&self.keys.overrides)
            .key(&self.keys.changes)
            .key(&self.keys.ramp_lease)
            .arg(expected)
            .arg(json)
            .arg(STREAM_LENGTH)
            .arg(lease.map_or("", Lease::value))
            .invoke_async(&mut connection)
            .await
            .map_err(self.failed())?;
        Ok(match done {
            1 => Published::Done(revision),
            2 => Published::Fenced,
            _ => Published::Stale(FleetOverrides { revision, json: current }),
        })
    }

    /// Writes `json` at `revision` back as the overrides if the store has none (it lost its
    /// data); returns what it holds afterwards.
    pub async fn restore_overrides(&self, revision: u64, json: &[u8]) -> Result<FleetOverrides, FleetError> {
        let mut connection = self.connection.clone();
        let (revision, json): (u64, Vec<u8>) = self
            .restore_overrides
            .key(&self.keys.overrides)
            .key(&self.keys.changes)
            .arg(revision)
            .arg(json)
            .arg(STREAM_LENGTH)
            .invoke_async(&mut connection)
            .await
            .map_err(self.failed())?;
        Ok(FleetOverrides { revision, json })
    }

    /// The stream's current end: follow from here after reading every pin.
    pub async fn position(&self) -> Result<String, FleetError> {
        let mut connection = self.connection.clone();
        let last: Vec<(String, Vec<(String, String)>)> = redis::cmd("XREVRANGE")
            .arg(&self.keys.changes)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query_async(&mut connection)
            .await
            .map_err(self.failed())?;
        Ok(last.into_iter().next().map_or_else(|| "0-0".to_owned(), |(id, _)| id))
    }

    /// Opens a connection of its own for following the stream: a blocking read would hold up
    /// every other command queued on a shared one. Its answers may take `longest_wait` (the
    /// longest a read will block) plus the usual response time.
    pub async fn follower(&self, longest_wait: std::time::Duration) -> Result<Follower, FleetError> {
        let config = redis::AsyncConnectionConfig::new()
            .set_response_timeout(Some(longest_wait + RESPONSE_TIMEOUT))
            .set_connection_timeout(Some(RESPONSE_TIMEOUT));
        let connection =
            self.client.get_multiplexed_async_connection_with_config(&config).await.map_err(self.failed())?;
        Ok(Follower { store: self.clone(), connection })
    }

    fn change(&self, entry: &redis::streams::StreamId) -> Result<Change, FleetError> {
        let text = |name: &str| entry.get::<String>(name);
        if let (Some(key), Some(value)) = (text("pin"), text("value")) {
            return Ok(Change::Pin(self.stored_pin(key.into(), &value)?));
        }
        if let Some(list) = text("touch") {
            let mut touches = Vec::new();
            for item in list.split(',') {
                let mut parts = item.rsplitn(3, ':');
                let (last, first, key) = (parts.next(), parts.next(), parts.next());
                match (key, first.and_then(|f| f.parse().ok()), last.and_then(|l| l.parse().ok())) {
                    (Some(key), Some(first), Some(last)) => touches.push((key.into(), first, last)),
                    _ => return Err(self.unreadable("a refresh", item)),
                }
            }
            return Ok(Change::Touch(touches));
        }
        if let (Some(revision), Some(json)) = (text("overrides"), entry.get::<Vec<u8>>("json")) {
            let revision =
                revision.parse().map_err(|_| self.unreadable("an overrides revision", &revision))?;
            return Ok(Change::Overrides(FleetOverrides { revision, json }));
        }
        if let Some(ended) = text("end") {
            if let Some((key, first)) = ended.rsplit_once(':') {
                if let Ok(first_seen) = first.parse() {
                    return Ok(Change::End { key: key.into(), first_seen });
                }
            }
            return Err(self.unreadable("an ended pin", &ended));
        }
        Err(self.unreadable("a change", &entry.id))
    }
}

/// Reads the change stream on its own connection.
pub struct Follower {
    store: FleetStore,
    connection: redis::aio::MultiplexedConnection,
}

impl Follower {
    /// The changes after `position`, waiting up to `wait` for the first; at most `count`.
    pub async fn changes(
        &mut self,
        position: &str,
        wait: std::time::Duration,
        count: usize,
    ) -> Result<Changes, FleetError> {
        let store = &self.store;
        // Trimming drops the oldest entries. A position before the first entry left, with
        // entries added after it, may have missed some (more rarely it missed none; reading
        // every pin again is then only work). From the very start, anything dropped is missed.
        let info: redis::Value = match redis::cmd("XINFO")
            .arg("STREAM")
            .arg(&store.keys.changes)
            .query_async(&mut self.connection)
            .await
        {
            Ok(info) => info,
            // No stream yet: nothing was ever written, so nothing was trimmed.
            Err(e)
                if matches!(e.kind(), redis::ErrorKind::Server(_))
                    && e.to_string().contains("no such key") =>
            {
                redis::Value::Nil
            }
            Err(e) => return Err(store.failed()(e)),
        };
        if is_trimmed_past(&info, position) {
            return Ok(Changes::Trimmed { position: store.position().await? });
        }
        let reply: Option<redis::streams::StreamReadReply> = redis::cmd("XREAD")
            .arg("COUNT")
            .arg(count)
            .arg("BLOCK")
            .arg(wait.as_millis() as u64)
            .arg("STREAMS")
            .arg(&store.keys.changes)
            .arg(position)
            .query_async(&mut self.connection)
            .await
            .map_err(store.failed())?;
        let mut changes = Vec::new();
        let mut position = position.to_owned();
        for entry in reply.into_iter().flat_map(|r| r.keys).flat_map(|k| k.ids) {
            changes.push(store.change(&entry)?);
            position = entry.id;
        }
        Ok(Changes::Read { changes, position })
    }
}

/// Whether a stream (its `XINFO STREAM` answer) lost entries after `position` to trimming.
fn is_trimmed_past(info: &redis::Value, position: &str) -> bool {
    let number = |name| field(info, name).and_then(|v| redis::from_redis_value_ref::<u64>(v).ok());
    let id = |v: &redis::Value| redis::from_redis_value_ref::<String>(v).ok();
    if entry_id(position) == (0, 0) {
        return matches!((number("entries-added"), number("length")), (Some(added), Some(length)) if added > length);
    }
    let Some(last) = field(info, "last-generated-id").and_then(id) else { return false };
    if entry_id(&last) <= entry_id(position) {
        return false; // nothing added since
    }
    let first = match field(info, "first-entry") {
        Some(redis::Value::Array(entry)) => entry.first().and_then(id),
        _ => None,
    };
    first.is_none_or(|first| entry_id(&first) > entry_id(position))
}

/// A field of an `XINFO STREAM` answer (RESP2: alternating names and values; RESP3: a map).
fn field<'v>(info: &'v redis::Value, name: &str) -> Option<&'v redis::Value> {
    let is_name = |v: &redis::Value| redis::from_redis_value_ref::<String>(v).ok().as_deref() == Some(name);
    match info {
        redis::Value::Array(items) => {
            items.chunks(2).find(|pair| is_name(&pair[0])).and_then(|pair| pair.get(1))
        }
        redis::Value::Map(pairs) => pairs.iter().find(|(k, _)| is_name(k)).map(|(_, v)| v),
        _ => None,
    }
}

/// A stream entry id (`ms-seq`) as a pair that orders like the ids.
fn entry_id(id: &str) -> (u64, u64) {
    let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
    (ms.parse().unwrap_or(0), seq.parse().unwrap_or(0))
}

/// Bytes as lowercase hexadecimal.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<SplitSalt> {
    let mut salt = SplitSalt::default();
    if text.len() != 2 * salt.len() || !text.is_ascii() {
        return None;
    }
    for (i, byte) in salt.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(salt)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_salt_reads_back_as_written_and_nothing_else_reads() {
        let salt: SplitSalt = std::array::from_fn(|i| (i * 17) as u8);
        assert_eq!(unhex(&hex(&salt)), Some(salt));
        for bad in ["", "00", &"0".repeat(31), &"zz".repeat(16), &"é".repeat(16)] {
            assert_eq!(unhex(bad), None, "{bad:?}");
        }
    }

    /// An `XINFO STREAM` answer as RESP2 gives it.
    fn info(length: i64, added: i64, last: &str, first: Option<&str>) -> redis::Value {
        use redis::Value::{Array, BulkString, Int, Nil};
        let text = |t: &str| BulkString(t.as_bytes().to_vec());
        let first = first.map_or(Nil, |id| Array(vec![text(id), Array(vec![text("pin"), text("k")])]));
        Array(vec![
            text("length"),
            Int(length),
            text("last-generated-id"),
            text(last),
            text("entries-added"),
            Int(added),
            text("first-entry"),
            first,
        ])
    }

    #[test]
    fn a_position_is_trimmed_past_only_when_entries_after_it_may_be_gone() {
        // From the start: only if anything was ever dropped.
        assert!(!is_trimmed_past(&info(3, 3, "30-0", Some("10-0")), "0-0"));
        assert!(is_trimmed_past(&info(2, 3, "30-0", Some("20-0")), "0-0"));
        // Caught up: a trim that took everything lost nothing new.
        assert!(!is_trimmed_past(&info(0, 3, "30-0", None), "30-0"));
        // The position's entry (or an older one) is still there: nothing after it was dropped.
        assert!(!is_trimmed_past(&info(2, 3, "30-0", Some("20-0")), "20-0"));
        assert!(!is_trimmed_past(&info(3, 3, "30-0", Some("10-0")), "20-0"));
        // Behind the first entry left, with entries added since: some may be gone.
        assert!(is_trimmed_past(&info(1, 3, "30-0", Some("30-0")), "10-0"));
        assert!(is_trimmed_past(&info(0, 3, "30-0", None), "10-0"));
    }
}
