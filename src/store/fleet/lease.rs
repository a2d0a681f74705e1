//! The fleet's ramp and the lease that decides which replica drives it.
//!
//! One replica at a time holds the lease (`{ns}:ramp_lease`, with a time to live) and runs the
//! ramp's analyses; the others follow the ramp record (`{ns}:ramp`). Each new holder gets the
//! next fencing token from `{ns}:ramp_fence`, and the lease's value is `token:replica`: a
//! leader's writes (the record, and the share of new sessions in the overrides) go through
//! scripts that first check the store still holds that exact value, so a leader that stalled
//! past its lease while another took over can no longer write anything.
//!
//! Operators' commands may come to any replica: those write the record by compare-and-set on
//! its version alone, and the leader, whose next write then fails on the version, reads the
//! record again.
//!
//! Every replica publishes its request counters (`{ns}:ramp_totals`, replica → JSON) while a
//! ramp runs, so the leader judges the whole fleet's traffic, not only its own.

use redis::AsyncCommands;

use super::{FleetError, FleetStore};

/// Takes the lease, or renews it for its holder. KEYS: lease, fence counter. ARGV: replica,
/// time to live (ms), the lease the caller holds or ''. Answers the lease the store holds
/// afterwards, `token:replica`. A holder whose own count of the lease ran out (it sends '')
/// still renews it: replica names are made afresh by every process.
pub(super) const LEASE: &str = r"
local held = redis.call('GET', KEYS[1])
if held then
  if held == ARGV[3] or string.match(held, '^%d+:(.*)$') == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
  end
  return held
end
local lease = redis.call('INCR', KEYS[2]) .. ':' .. ARGV[1]
redis.call('SET', KEYS[1], lease, 'PX', ARGV[2])
return lease
";

/// Gives the lease up if the caller still holds it. KEYS: lease. ARGV: the lease held.
pub(super) const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
";

/// Writes the ramp record if its version is still the one the caller read and, for a leader's
/// write, while its lease is still the store's. KEYS: record, lease. ARGV: expected version,
/// JSON, the lease held or '' (an operator's command), writer. Answers `{1, new version}`,
/// `{0, current version}` when the record moved on, `{2, current version}` when fenced.
pub(super) const WRITE_RAMP: &str = r"
local version = tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
if ARGV[3] ~= '' and redis.call('GET', KEYS[2]) ~= ARGV[3] then return {2, version} end
if version ~= tonumber(ARGV[1]) then return {0, version} end
version = version + 1
redis.call('HSET', KEYS[1], 'version', version, 'json', ARGV[2], 'writer', ARGV[4])
return {1, version}
";

/// A lease on driving the ramp, as the store handed it out: `token:replica`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease(String);

impl Lease {
    /// The fencing token: larger for every new holder (while the store keeps its data).
    pub fn token(&self) -> u64 {
        self.0.split_once(':').and_then(|(token, _)| token.parse().ok()).unwrap_or(0)
    }

    /// The replica holding it.
    pub fn holder(&self) -> &str {
        self.0.split_once(':').map_or("", |(_, replica)| replica)
    }

    pub fn value(&self) -> &str {
        &self.0
    }
}

/// The ramp record as the store has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RampRecord {
    /// Incremented by every write; 0 when there is no record.
    pub version: u64,
    pub json: Vec<u8>,
    /// The replica (or the operator's replica) that wrote it last.
    pub writer: String,
}

/// What became of a write of the ramp record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RampWrite {
    /// Written; the record's new version.
    Done(u64),
    /// Somebody wrote it since the caller read it: read it again.
    Moved,
    /// The caller's lease is no longer the store's: it no longer leads the ramp.
    Fenced,
}

impl FleetStore {
    /// Takes the ramp lease for `replica` if nobody holds it, or renews `held` if the caller
    /// still holds it, for `ttl`; returns the lease the store holds then (maybe another's).
    pub async fn lease(
        &self,
        replica: &str,
        ttl: std::time::Duration,
        held: Option<&Lease>,
    ) -> Result<Lease, FleetError> {
        let mut connection = self.connection.clone();
        let lease: String = self
            .lease
            .key(&self.keys.ramp_lease)
            .key(&self.keys.ramp_fence)
            .arg(replica)
            .arg(ttl.as_millis() as u64)
            .arg(held.map_or("", Lease::value))
            .invoke_async(&mut connection)
            .await
            .map_err(self.failed())?;
        if !lease.contains(':') {
            return Err(self.unreadable("the ramp lease", &lease));
        }
        Ok(Lease(lease))
    }

    /// Gives up `held` (at shutdown), so another replica need not wait for it to run out.
    pub async fn release(&self, held: &Lease) -> Result<(), FleetError> {
        let mut connection = self.connection.clone();
        let _: i64 = self
            .release
            .key(&self.keys.ramp_lease)
            .arg(held.value())
            .invoke_async(&mut connection)
            .await
            .map_err(self.failed())?;
        Ok(())
    }

    /// The ramp record; `None` when no ramp was ever started (or the store lost it).
    pub async fn ramp(&self) -> Result<Option<RampRecord>, FleetError> {
        let mut connection = self.connection.clone();
        let (version, json, writer): (Option<u64>, Option<Vec<u8>>, Option<String>) = redis::cmd("HMGET")
            .arg(&self.keys.ramp)
            .arg("version")
            .arg("json")
            .arg("writer")
            .query_async(&mut connection)
            .await
            .map_err(self.failed())?;
        Ok(version.zip(json).map(|(version, json)| RampRecord {
            version,
            json,
            writer: writer.unwrap_or_default(),
        }))
    }

    /// Writes the ramp record over `expected` (its version as read; 0 for none), as `writer`;
    /// with `lease`, only while the store still holds it.
    pub async fn write_ramp(
        &self,
        expected: u64,
        json: &[u8],
        lease: Option<&Lease>,
        writer: &str,
    ) -> Result<RampWrite, FleetError> {
        let mut connection = self.connection.clone();
        let (done, version): (u8, u64) = self
            .write_ramp
            .key(&self.keys.ramp)
            .key(&self.keys.ramp_lease)
            .arg(expected)
            .arg(json)
            .arg(lease.map_or("", Lease::value))
            .arg(writer)
            .invoke_async(&mut connection)
            .await
            .map_err(self.failed())?;
        Ok(match done {
            1 => RampWrite::Done(version),
            2 => RampWrite::Fenced,
            _ => RampWrite::Moved,
        })
    }

    /// Publishes this replica's counters for the ramp's analyses.
    pub async fn publish_totals(&self, replica: &str, json: &[u8]) -> Result<(), FleetError> {
        let mut connection = self.connection.clone();
        let _: i64 = connection.hset(&self.keys.ramp_totals, replica, json).await.map_err(self.failed())?;
        Ok(())
    }

    /// Every replica's published counters: (replica, JSON).
    pub async fn ramp_totals(&self) -> Result<Vec<(String, Vec<u8>)>, FleetError> {
        let mut connection = self.connection.clone();
        connection.hgetall(&self.keys.ramp_totals).await.map_err(self.failed())
    }

    /// Forgets the counters of replicas that are gone.
    pub async fn forget_totals(&self, replicas: &[String]) -> Result<(), FleetError> {
        if replicas.is_empty() {
            return Ok(());
        }
        let mut connection = self.connection.clone();
        let _: i64 = connection.hdel(&self.keys.ramp_totals, replicas).await.map_err(self.failed())?;
        Ok(())
    }
}
