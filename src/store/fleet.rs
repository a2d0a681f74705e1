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
//! - `{ns}:changes`: stream of pins made, trimmed to about [`STREAM_LENGTH`] entries;
//! - `{ns}:salt`: the legacy split's salt ([`SplitSalt`]), made by the first replica.

use redis::aio::ConnectionManager;
use redis::{AsyncCommands, Script};

use super::{new_split_salt, SplitSalt};
use crate::config::PoolName;
use crate::session::PinPolicy;

/// About how many changes the stream keeps. A replica that falls further behind than this
/// reads every pin again instead.
pub(crate) const STREAM_LENGTH: usize = 100_000;

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
    salt: String,
}

impl Keys {
    fn new(namespace: &str) -> Keys {
        let key = |name: &str| format!("{{{namespace}}}:{name}");
        Keys { pins: key("pins"), v1: key("v1"), changes: key("changes"), salt: key("salt") }
    }
}

/// A connection to the fleet store; cheap to clone, reconnects by itself.
#[derive(Clone)]
pub struct FleetStore {
    connection: ConnectionManager,
    keys: Keys,
    claim: Script,
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
        let connection = ConnectionManager::new(client)
            .await
            .map_err(|source| FleetError::Redis { location: location.clone(), source })?;
        Ok(FleetStore { connection, keys: Keys::new(namespace), claim: Script::new(CLAIM), location })
    }

    fn failed(&self) -> impl Fn(redis::RedisError) -> FleetError + '_ {
        |source| FleetError::Redis { location: self.location.clone(), source }
    }

    /// The fleet's split salt: the one stored, or a fresh one if this replica is the first.
    pub async fn split_salt(&self) -> Result<SplitSalt, FleetError> {
        let mut connection = self.connection.clone();
        let fresh = hex(&new_split_salt());
        // SET NX: of replicas starting together, the first one's salt is everybody's.
        let _: Option<String> = redis::cmd("SET")
            .arg(&self.keys.salt)
            .arg(&fresh)
            .arg("NX")
            .query_async(&mut connection)
            .await
            .map_err(self.failed())?;
        let stored: String = connection.get(&self.keys.salt).await.map_err(self.failed())?;
        unhex(&stored).ok_or_else(|| FleetError::Unreadable {
            location: self.location.clone(),
            what: "the split salt",
            answer: stored,
        })
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
        let pool = match pool.as_str() {
            "v1" => PoolName::V1,
            "v2" => PoolName::V2,
            _ => {
                return Err(FleetError::Unreadable {
                    location: self.location.clone(),
                    what: "a pin's pool",
                    answer: pool,
                })
            }
        };
        Ok(Claimed { pool, first_seen, last_seen, made: made == 1 })
    }
}

fn hex(bytes: &[u8]) -> String {
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
}
