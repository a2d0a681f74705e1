//! Legacy sessions: finding a request's session key and keeping its pin to a pool.
//!
//! A pin says "this study started on pool X; keep it there". It ends after `idle_timeout` without
//! a request, after `max_duration` from its first request, or when an operator deletes it.
//! Lookups and `last_seen` updates take only a shared lock on one of many stripes of the table
//! ([`table`]) and an atomic store, never a global lock; creating or ending a pin takes that
//! stripe's write lock. Expiry of
//! pins nobody asks for again runs in the background ([`Sessions::maintain`]). Making pins durable
//! is [`crate::store`]'s job; choosing the pool for a new pin is [`crate::router`]'s.

mod table;

use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use compact_str::CompactString;
use hashbrown::DefaultHashBuilder;
use http::HeaderMap;

use crate::clock::{SharedClock, UnixMillis};
use crate::config::{ByPool, Config, PoolName, SessionKeySpec, StoreConfig};
use crate::drain::READ_BACK_SLACK;
use crate::metrics::{EndReason, Metrics};
use crate::store::{Op, SplitSalt, Store, StoredPin};
use table::{stripe_of, PinTable, StripeWrite, STRIPES};

/// Longest accepted session key.
pub(crate) const MAX_KEY_LEN: usize = 128;

/// 1–128 bytes of `[A-Za-z0-9._~-]` (RFC 3986 unreserved characters).
pub(crate) fn is_valid_key(key: &str) -> bool {
    (1..=MAX_KEY_LEN).contains(&key.len())
        && key.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'~' | b'-'))
}

/// What the extractors found in a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyOutcome<'r> {
    Key(&'r str),
    /// An extractor matched but the value is not a valid key: the request is unkeyed.
    Invalid,
    Absent,
}

/// Header values of a request, whether parsed into a [`HeaderMap`] or still in the read buffer.
pub trait HeaderSource {
    /// Every value of header `name` (lower-case) that is valid UTF-8, in order.
    fn values<'a>(&'a self, name: &str) -> impl Iterator<Item = &'a str>;
}

impl HeaderSource for HeaderMap {
    fn values<'a>(&'a self, name: &str) -> impl Iterator<Item = &'a str> {
        self.get_all(name).iter().filter_map(|v| crate::headers::text_value(v.as_bytes()))
    }
}

/// The ordered list of `sessions.keys`; the first extractor that yields a value names the session.
#[derive(Debug, Clone)]
pub struct KeyExtractor {
    specs: Vec<SessionKeySpec>,
}

impl KeyExtractor {
    pub fn new(specs: Vec<SessionKeySpec>) -> Self {
        KeyExtractor { specs }
    }

    /// The session key of a request, from its path, query and header fields (a hyper
    /// [`HeaderMap`] or the fast path's parsed head), by the first spec that finds one.
    pub fn extract_from<'r>(
        &self,
        path: &'r str,
        query: Option<&'r str>,
        headers: &'r impl HeaderSource,
    ) -> KeyOutcome<'r> {
        for spec in &self.specs {
            let found = match spec {
                SessionKeySpec::Path { segments, .. } => from_path(path, segments),
                SessionKeySpec::Query(name) => query.and_then(|q| from_query(q, name)),
                SessionKeySpec::Header(name) => headers.values(name.as_str()).next(),
                SessionKeySpec::Cookie(name) => from_cookies(headers, name),
            };
            if let Some(value) = found {
                return if is_valid_key(value) { KeyOutcome::Key(value) } else { KeyOutcome::Invalid };
            }
        }
        KeyOutcome::Absent
    }
}

/// The segment at the `{id}` position when every other template segment matches; longer paths
/// under the template match too.
fn from_path<'r>(path: &'r str, template: &[Option<String>]) -> Option<&'r str> {
    let mut parts = path.strip_prefix('/')?.split('/');
    let mut id = None;
    for expected in template {
        let part = parts.next()?;
        match expected {
            Some(literal) if literal == part => {}
            Some(_) => return None,
            None => id = Some(part),
        }
    }
    id
}

fn from_query<'r>(query: &'r str, name: &str) -> Option<&'r str> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then_some(v)
    })
}

fn from_cookies<'r>(headers: &'r impl HeaderSource, name: &str) -> Option<&'r str> {
    headers.values("cookie").find_map(|line| {
        line.split(';').find_map(|pair| {
            let (k, v) = pair.trim().split_once('=')?;
            (k == name).then_some(v.trim_matches('"'))
        })
    })
}

/// Pin lifetimes, in whole seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PinPolicy {
    /// How long a pin lives after its last request: the configured idle timeout, plus in fleet
    /// mode the fleet's grace ([`PinPolicy::from_config`]).
    pub idle_secs: u32,
    pub max_secs: u32,
    pub max_active: usize,
    /// How stale a stored `last_seen` may be: half a percent of the idle timeout, at least the
    /// read-back slack. A request the stored value covers to within this is not written ahead,
    /// and after a restart every pin is read back this much later, so a crash can lengthen a pin
    /// by up to this much but never shorten it. The background flush refreshes an active pin's
    /// stored value once it lags the pin's last request by a quarter of that
    /// ([`PinPolicy::refresh_lag`]), so only a study returning after a pause of more than three
    /// quarters of it waits for a commit. With the default 10h40m idle timeout that is 192 s: an
    /// active study costs one batched store write every ~48 s, and waits for a commit only after
    /// a pause of over 144 s.
    pub stale_secs: u32,
    /// Fleet mode: an active pin's `last_seen` in the fleet store moves forward once per this
    /// many seconds of the study's activity (0 outside fleet mode). See [`PinPolicy::from_config`].
    pub fleet_lag_secs: u32,
}

impl PinPolicy {
    /// In fleet mode, the fleet store hears of a study's activity once every `fleet_lag_secs`
    /// (1% of the idle timeout: 384 s at the default 10h40m), not every 48 s: a refresh is a
    /// script run in Redis and a change every replica applies, and at a million active studies
    /// the local rate would be 21,000 of each per second. What the fleet store knows of a
    /// pin's last request may then lag by up to two such periods (one refresh lost to an
    /// unreachable store) plus the local store's `stale_secs`, so every replica, and the fleet
    /// store's claim script, let a pin live that much longer than the idle timeout: its grace,
    /// 960 s at the default. No replica ends a pin early; all end it at about the same time.
    pub fn from_config(config: &Config) -> Self {
        let secs = |d: Duration| u32::try_from(d.as_secs().max(1)).unwrap_or(u32::MAX);
        let idle_secs = secs(config.sessions.idle_timeout);
        let stale_secs = (idle_secs / 200).max(READ_BACK_SLACK.as_secs() as u32);
        let mut policy = PinPolicy {
            idle_secs,
            max_secs: secs(config.sessions.max_duration),
            max_active: config.sessions.max_active,
            stale_secs,
            fleet_lag_secs: 0,
        };
        if matches!(config.store, StoreConfig::Redis(_)) {
            policy.fleet_lag_secs = (idle_secs / 100).max(policy.refresh_lag());
            let grace = policy.fleet_lag_secs.saturating_mul(2).saturating_add(stale_secs);
            policy.idle_secs = idle_secs.saturating_add(grace);
        }
        policy
    }

    /// How far a pin's stored `last_seen` may lag its last request before the background flush
    /// refreshes it. Background writes go in large batches and nobody waits for them; a request
    /// whose time the stored value does not cover waits for its own commit. Refreshing well
    /// before the bound keeps the second kind rare.
    pub(crate) fn refresh_lag(&self) -> u32 {
        (self.stale_secs / 4).max(1)
    }

    /// Whether a local refresh of a pin made at `first_seen`, from the stored `last_seen` `from`
    /// to `to`, also goes to the fleet store: when it crosses a multiple of `fleet_lag_secs`
    /// counted from the pin's start, so refreshes of pins made at different times are spread
    /// out rather than all due at once.
    fn reaches_fleet(&self, first_seen: u32, from: u32, to: u32) -> bool {
        let lag = self.fleet_lag_secs.max(1);
        to.saturating_sub(first_seen) / lag > from.saturating_sub(first_seen) / lag
    }
}

/// One live pin. Times are Unix seconds.
#[derive(Debug)]
struct Pin {
    pool: PoolName,
    first_seen: u32,
    /// For a pin loaded at start-up, the stored value plus the read-back slack.
    last_seen: AtomicU32,
    /// The `last_seen` the store has (or has been sent). A request this value would not cover
    /// after a crash writes ahead; the background flush keeps it fresh for active pins.
    stored_last_seen: AtomicU32,
    /// The store sequence number of this pin's creation; 0 for pins loaded from disk.
    seq: u64,
}

impl Pin {
    fn ended(&self, now: u32, policy: &PinPolicy) -> Option<EndReason> {
        if now.saturating_sub(self.first_seen) >= policy.max_secs {
            Some(EndReason::MaxDuration)
        } else if now.saturating_sub(self.last_seen.load(Ordering::Relaxed)) >= policy.idle_secs {
            Some(EndReason::Idle)
        } else {
            None
        }
    }

    fn touch(&self, now: u32) {
        // Only write when the second changes, so hot keys do not bounce a cache line per request.
        // A plain store, not a read-modify-write: two requests racing here write clock readings
        // microseconds apart, and one second of `last_seen` either way changes nothing.
        if self.last_seen.load(Ordering::Relaxed) < now {
            self.last_seen.store(now, Ordering::Relaxed);
        }
    }

    /// When this pin ends if no request comes: the earlier of idle and max-duration expiry.
    fn end(&self, policy: &PinPolicy) -> u32 {
        let idle_end = self.last_seen.load(Ordering::Relaxed).saturating_add(policy.idle_secs);
        idle_end.min(self.first_seen.saturating_add(policy.max_secs))
    }
}

/// How a legacy request with a key was routed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolution {
    /// An existing pin; `seq` is its creation's store sequence number. `write_ahead`: the
    /// stored `last_seen` would not cover this request after a crash, so a touch was sent that
    /// must be committed before the response.
    Pinned { pool: PoolName, seq: u64, write_ahead: bool },
    /// A pin made by this request; it must be durable before the response goes out.
    NewPin { pool: PoolName, seq: u64 },
    /// The pin table is full: routed by the split, without a pin.
    Full { pool: PoolName },
}

/// A live pin as listed by the admin API.
#[derive(Debug, Clone)]
pub(crate) struct PinInfo {
    pub key: String,
    pub pool: PoolName,
    pub first_seen: u32,
    pub last_seen: u32,
    /// When it ends if no request comes (Unix seconds), and which limit ends it then.
    pub ends_at: u32,
    pub ended_by: EndReason,
}

/// Pins are ordered, and told apart, by key: a table holds one per key.
impl Ord for PinInfo {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.key.cmp(&other.key)
    }
}

impl PartialOrd for PinInfo {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for PinInfo {
    fn eq(&self, other: &Self) -> bool {
        self.key == other.key
    }
}

impl Eq for PinInfo {}

impl PinInfo {
    fn of(key: &str, pin: &Pin, policy: &PinPolicy) -> PinInfo {
        let last_seen = pin.last_seen.load(Ordering::Relaxed);
        let idle_end = last_seen.saturating_add(policy.idle_secs);
        let max_end = pin.first_seen.saturating_add(policy.max_secs);
        let (ends_at, ended_by) =
            if idle_end <= max_end { (idle_end, EndReason::Idle) } else { (max_end, EndReason::MaxDuration) };
        PinInfo {
            key: key.to_owned(),
            pool: pin.pool,
            first_seen: pin.first_seen,
            last_seen,
            ends_at,
            ended_by,
        }
    }
}

/// A pin under its key. Keys up to 24 bytes (every numeric study id) are stored inline, so a
/// lookup compares without another cache miss.
#[derive(Debug)]
struct Entry {
    key: CompactString,
    pin: Pin,
}

/// A session key with its hash; its pin's slot is already on the way into the cache
/// ([`Sessions::locate`]).
#[derive(Debug, Clone, Copy)]
pub struct Located<'k> {
    key: &'k str,
    hash: u64,
}

impl<'k> Located<'k> {
    pub(crate) fn key(&self) -> &'k str {
        self.key
    }
}

/// The pin table and its link to the store.
pub struct Sessions {
    table: PinTable,
    /// Seeded per process (foldhash): keys come from clients, so collisions must not be
    /// predictable; the `max_active` cap bounds the table in any case.
    hasher: DefaultHashBuilder,
    live: AtomicUsize,
    live_by_pool: ByPool<AtomicUsize>,
    /// Unix seconds at which the last live v1 pin ends if no request comes; refreshed by
    /// [`Sessions::maintain`].
    v1_pins_end: AtomicU32,
    /// Unix seconds when the table was loaded.
    loaded_at: u32,
    /// Keys the hash that places new sessions in the legacy split ([`Sessions::split_roll`]).
    /// Replaced only when a replica that started without the fleet store joins it late.
    split_salt: arc_swap::ArcSwap<SplitSalt>,
    /// In fleet mode a new pin is provisional until the fleet store confirms it: it is stored
    /// (and its `seq` settles) only then, so a request following it waits for the fleet's word.
    claims_first: std::sync::atomic::AtomicBool,
    /// In fleet mode, where refreshes go besides the local store: (key, first_seen, last_seen).
    fleet_touches: std::sync::OnceLock<tokio::sync::mpsc::UnboundedSender<Vec<FleetTouch>>>,
    store: Arc<Store>,
    clock: SharedClock,
    metrics: Arc<Metrics>,
}

/// See [`Sessions::split_roll`].
fn split_roll(salt: &SplitSalt, key: &str) -> u16 {
    let mut hasher = siphasher::sip::SipHasher13::new_with_key(salt);
    hasher.write(key.as_bytes());
    (hasher.finish() % 10_000) as u16
}

/// A refresh for the fleet store: (key, first_seen, last_seen).
pub(crate) type FleetTouch = (Box<str>, u32, u32);

fn secs(ms: UnixMillis) -> u32 {
    u32::try_from(ms / 1000).unwrap_or(u32::MAX)
}

impl Sessions {
    /// Builds the table from the pins the store loaded, dropping (and deleting) those that ended
    /// while the proxy was down. `last_seen` reaches the store by the background flush, so the
    /// stored value may be stale by up to `policy.stale_secs`; it is read back that much later
    /// (never past now): a restart never ends a pin early.
    pub fn new(
        loaded: Vec<StoredPin>,
        split_salt: SplitSalt,
        policy: &PinPolicy,
        store: Arc<Store>,
        clock: SharedClock,
        metrics: Arc<Metrics>,
    ) -> Self {
        let hasher = DefaultHashBuilder::default();
        let table = PinTable::with_capacity(loaded.len());
        let now = secs(clock.now());
        let slack = policy.stale_secs;
        let live_by_pool = ByPool::<AtomicUsize>::default();
        for stored in loaded {
            let last_seen = stored.last_seen.saturating_add(slack).min(now.max(stored.last_seen));
            let pin = Pin {
                pool: stored.pool,
                first_seen: stored.first_seen,
                last_seen: AtomicU32::new(last_seen),
                stored_last_seen: AtomicU32::new(stored.last_seen),
                seq: 0,
            };
            if pin.ended(now, policy).is_some() {
                store.send(Op::Remove(stored.key));
                continue;
            }
            live_by_pool.get(pin.pool).fetch_add(1, Ordering::Relaxed);
            let hash = hasher.hash_one(&*stored.key);
            let entry = Entry { key: CompactString::from(&*stored.key), pin };
            table.write_with_room(stripe_of(hash)).insert_unique(hash, entry);
        }
        let live = live_by_pool.v1.load(Ordering::Relaxed) + live_by_pool.v2.load(Ordering::Relaxed);
        Sessions {
            table,
            hasher,
            live: AtomicUsize::new(live),
            live_by_pool,
            v1_pins_end: AtomicU32::new(0),
            loaded_at: now,
            split_salt: arc_swap::ArcSwap::from_pointee(split_salt),
            fleet_touches: std::sync::OnceLock::new(),
            claims_first: std::sync::atomic::AtomicBool::new(false),
            store,
            clock,
            metrics,
        }
    }

    fn hash(&self, key: &str) -> u64 {
        self.hasher.hash_one(key)
    }

    /// Hashes `key` and starts loading its pin's slot, so that [`Sessions::resolve`], called
    /// after other work, does not wait for memory.
    pub fn locate<'k>(&self, key: &'k str) -> Located<'k> {
        let hash = self.hash(key);
        self.table.prefetch(hash);
        Located { key, hash }
    }

    /// A digest of `key` for logs: 64 bits of SipHash-1-3 under the split's secret salt, so it
    /// is the same on every replica of a fleet and cannot be turned back into the key, even by
    /// trying every study id, without the salt.
    pub(crate) fn key_digest(&self, key: &str) -> String {
        let mut hasher = siphasher::sip::SipHasher13::new_with_key(&self.split_salt.load());
        hasher.write(b"access log\0");
        hasher.write(key.as_bytes());
        format!("{:016x}", hasher.finish())
    }

    /// Where `key` falls in the legacy split, uniform in `0..10_000`: a keyed hash (SipHash-1-3
    /// under the store's salt), so a key falls in the same place after a restart and on every
    /// replica sharing the store, and lowering the v1 share only ever moves new sessions from v1
    /// to v2. The hash function is fixed by its specification, not by this build.
    pub fn split_roll(&self, key: &str) -> u16 {
        split_roll(&self.split_salt.load(), key)
    }

    /// Routes a keyed legacy request: its live pin, else a new pin on the pool `split` picks for
    /// the key's [`Sessions::split_roll`].
    pub fn resolve(
        &self,
        located: Located<'_>,
        policy: &PinPolicy,
        split: impl FnOnce(u16) -> PoolName,
    ) -> Resolution {
        let now = secs(self.clock.now());
        let Located { key, hash } = located;
        debug_assert_eq!(hash, self.hash(key), "located by another pin table");
        let stripe = stripe_of(hash);
        {
            let table = self.table.read(stripe);
            if let Some(Entry { pin, .. }) = table.find(hash, key) {
                if pin.ended(now, policy).is_none() {
                    pin.touch(now);
                    self.extend_v1_end(pin, policy);
                    let write_ahead = self.write_ahead(key, pin, now, policy);
                    return Resolution::Pinned { pool: pin.pool, seq: pin.seq, write_ahead };
                }
            }
        }
        let mut table = self.table.write_with_room(stripe);
        let ended = match table.find(hash, key) {
            Some(Entry { pin, .. }) => match pin.ended(now, policy) {
                // Another request pinned it between our two locks.
                None => {
                    pin.touch(now);
                    self.extend_v1_end(pin, policy);
                    return Resolution::Pinned { pool: pin.pool, seq: pin.seq, write_ahead: false };
                }
                Some(reason) => {
                    self.count_end(pin.pool, reason);
                    true
                }
            },
            None => false,
        };
        if ended {
            table.remove(hash, key);
        }
        // Respect the cap without ever evicting a live pin.
        if self.live.fetch_add(1, Ordering::Relaxed) >= policy.max_active {
            self.live.fetch_sub(1, Ordering::Relaxed);
            if ended {
                self.store.send(Op::Remove(key.into()));
            }
            self.metrics.keys_rejected_full.inc();
            return Resolution::Full { pool: split(self.split_roll(key)) };
        }
        let pool = split(self.split_roll(key));
        let seq = self.store.next_seq();
        let pin = Pin {
            pool,
            first_seen: now,
            last_seen: AtomicU32::new(now),
            stored_last_seen: AtomicU32::new(now),
            seq,
        };
        self.extend_v1_end(&pin, policy);
        table.insert_unique(hash, Entry { key: CompactString::from(key), pin });
        // Sent under the stripe lock, so the store sees this key's changes in memory order. In
        // a fleet the pin is only provisional until the fleet store confirms it
        // ([`Sessions::confirm_claim`] sends it then).
        if !self.claims_first.load(Ordering::Relaxed) {
            self.store.send(Op::Pin {
                pin: StoredPin { key: key.into(), pool, first_seen: now, last_seen: now },
                seq,
            });
        }
        self.live_by_pool.get(pool).fetch_add(1, Ordering::Relaxed);
        self.metrics.sessions_started.get(pool).inc();
        Resolution::NewPin { pool, seq }
    }

    /// Sends this request's time to the store if the stored `last_seen` would not cover it after
    /// a crash (read back plus `policy.stale_secs`). Called under the stripe lock, so the touch
    /// is ordered with the key's other changes.
    fn write_ahead(&self, key: &str, pin: &Pin, now: u32, policy: &PinPolicy) -> bool {
        let stored = pin.stored_last_seen.load(Ordering::Relaxed);
        if stored.saturating_add(policy.stale_secs) >= now {
            return false;
        }
        pin.stored_last_seen.fetch_max(now, Ordering::Relaxed);
        self.store.send(Op::Touch(vec![(key.into(), now)]));
        true
    }

    fn count_end(&self, pool: PoolName, reason: EndReason) {
        self.live.fetch_sub(1, Ordering::Relaxed);
        self.live_by_pool.get(pool).fetch_sub(1, Ordering::Relaxed);
        self.metrics.session_ended(pool, reason);
    }

    /// Waits (bounded) until pin `seq` is durable. Returns false if the store did not confirm in time.
    pub(crate) async fn settle(&self, seq: u64) -> bool {
        self.store.is_settled(seq) || self.store.settle(seq, Duration::from_secs(5)).await
    }

    /// Background upkeep: ends expired pins, sends newer `last_seen` values to the store,
    /// and recomputes when the last v1 pin ends.
    pub fn maintain(&self, policy: &PinPolicy) {
        let now = secs(self.clock.now());
        let mut v1_end = 0u32;
        let v1_end_before = self.v1_pins_end.load(Ordering::Relaxed);
        let mut ended = Vec::new();
        let fleet = self.fleet_touches.get();
        for stripe in 0..STRIPES {
            // The scan takes only the read lock, so requests are never held up by it; the write
            // lock is taken only when there is something to remove.
            {
                let table = self.table.read(stripe);
                let mut touches = Vec::new();
                let mut fleet_touches = Vec::new();
                for Entry { key, pin } in table.iter() {
                    if pin.ended(now, policy).is_some() {
                        ended.push(key.clone());
                        continue;
                    }
                    let last_seen = pin.last_seen.load(Ordering::Relaxed);
                    // Only activity since the start is flushed: a loaded pin's `last_seen` is the
                    // read-back estimate, and storing it would add the slack again at every
                    // restart.
                    let stored = pin.stored_last_seen.load(Ordering::Relaxed);
                    let refresh = last_seen > stored && last_seen - stored >= policy.refresh_lag();
                    if refresh && last_seen > self.loaded_at {
                        pin.stored_last_seen.fetch_max(last_seen, Ordering::Relaxed);
                        touches.push((key.as_str().into(), last_seen));
                        if fleet.is_some() && policy.reaches_fleet(pin.first_seen, stored, last_seen) {
                            fleet_touches.push((key.as_str().into(), pin.first_seen, last_seen));
                        }
                    }
                    if pin.pool == PoolName::V1 {
                        v1_end = v1_end.max(pin.end(policy));
                    }
                }
                // Sent under the stripe lock, so the store sees this key's changes in order.
                if !touches.is_empty() {
                    self.store.send(Op::Touch(touches));
                }
                if let (Some(fleet), false) = (fleet, fleet_touches.is_empty()) {
                    let _ = fleet.send(fleet_touches);
                }
            }
            if !ended.is_empty() {
                let mut table = self.table.write(stripe);
                for key in ended.drain(..) {
                    let hash = self.hash(&key);
                    let Some(Entry { pin, .. }) = table.find(hash, &key) else { continue };
                    // A request may have renewed it between the two locks.
                    if let Some(reason) = pin.ended(now, policy) {
                        self.count_end(pin.pool, reason);
                        self.store.send(Op::Remove(key.as_str().into()));
                        table.remove(hash, &key);
                    }
                }
            }
            // On a machine with one core to spare, let the request threads in between stripes.
            std::thread::yield_now();
        }
        // The scan's value, unless a request moved the end out meanwhile (in a stripe already
        // scanned): then the later of the two, so the end never goes back past a request.
        if self
            .v1_pins_end
            .compare_exchange(v1_end_before, v1_end, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            self.v1_pins_end.fetch_max(v1_end, Ordering::Relaxed);
        }
    }

    /// Grows the pin table ahead of need, so requests rarely have to. Blocking work (making a
    /// larger table can take a few hundred milliseconds at a million pins): for the upkeep
    /// thread, not a request or a shutdown.
    pub fn reserve(&self) {
        self.table.reserve();
    }

    /// Ends one pin by operator request. Returns the pool it was on.
    pub(crate) fn remove(&self, key: &str) -> Option<PoolName> {
        let hash = self.hash(key);
        let mut table = self.table.write(stripe_of(hash));
        let Entry { pin, .. } = table.remove(hash, key)?;
        self.count_end(pin.pool, EndReason::Admin);
        self.store.send(Op::Remove(key.into()));
        Some(pin.pool)
    }

    /// Makes the local copy hold `stored` as the fleet store has it: a pin made on another
    /// replica, or the winner of a race this replica lost. A local pin made at another time is
    /// replaced; the same pin only has its `last_seen` moved forward. The local store gets the
    /// pin too, so a restart finds it. Returns whether the table changed.
    pub(crate) fn adopt(&self, stored: &StoredPin) -> bool {
        let hash = self.hash(&stored.key);
        let mut table = self.table.write_with_room(stripe_of(hash));
        if let Some(Entry { pin, .. }) = table.find(hash, &stored.key) {
            if pin.pool == stored.pool && pin.first_seen == stored.first_seen {
                pin.touch(stored.last_seen);
                pin.stored_last_seen.fetch_max(stored.last_seen, Ordering::Relaxed);
                return false;
            }
        }
        let seq = self.store.next_seq();
        self.replace_entry(&mut table, hash, stored, seq);
        self.store.send(Op::Pin { pin: stored.clone(), seq });
        true
    }

    /// Puts `stored` in the stripe (under store sequence number `seq`) in place of the key's
    /// entry, if it has one, keeping the live counts right.
    fn replace_entry(&self, table: &mut StripeWrite<'_>, hash: u64, stored: &StoredPin, seq: u64) {
        if let Some(Entry { pin, .. }) = table.remove(hash, &stored.key) {
            self.live.fetch_sub(1, Ordering::Relaxed);
            self.live_by_pool.get(pin.pool).fetch_sub(1, Ordering::Relaxed);
        }
        let pin = Pin {
            pool: stored.pool,
            first_seen: stored.first_seen,
            last_seen: AtomicU32::new(stored.last_seen),
            stored_last_seen: AtomicU32::new(stored.last_seen),
            seq,
        };
        table.insert_unique(hash, Entry { key: CompactString::from(&*stored.key), pin });
        self.live.fetch_add(1, Ordering::Relaxed);
        self.live_by_pool.get(stored.pool).fetch_add(1, Ordering::Relaxed);
    }

    /// Takes the key's entry out of the stripe if it is the pin made at `first_seen` (and not
    /// one made again since), sending its removal to the store.
    fn remove_made_at(
        &self,
        table: &mut StripeWrite<'_>,
        hash: u64,
        key: &str,
        first_seen: u32,
    ) -> Option<Pin> {
        if table.find(hash, key).is_none_or(|Entry { pin, .. }| pin.first_seen != first_seen) {
            return None;
        }
        let Entry { pin, .. } = table.remove(hash, key)?;
        self.store.send(Op::Remove(key.into()));
        Some(pin)
    }

    /// A refresh another replica made: moves the pin made at `first_seen` forward to
    /// `last_seen`, so it ends at the same time on every replica.
    pub(crate) fn refreshed_elsewhere(&self, key: &str, first_seen: u32, last_seen: u32) {
        let hash = self.hash(key);
        let table = self.table.read(stripe_of(hash));
        if let Some(Entry { pin, .. }) = table.find(hash, key) {
            if pin.first_seen == first_seen {
                pin.touch(last_seen);
                pin.stored_last_seen.fetch_max(last_seen, Ordering::Relaxed);
            }
        }
    }

    /// An operator ended the pin made at `first_seen` on another replica.
    pub(crate) fn ended_elsewhere(&self, key: &str, first_seen: u32) {
        let hash = self.hash(key);
        let mut table = self.table.write(stripe_of(hash));
        if let Some(pin) = self.remove_made_at(&mut table, hash, key, first_seen) {
            self.count_end(pin.pool, EndReason::Admin);
        }
    }

    /// The salt of the legacy split ([`Sessions::split_roll`]).
    pub(crate) fn split_salt(&self) -> SplitSalt {
        **self.split_salt.load()
    }

    /// Splits new sessions by the fleet's salt from now on, and keeps it in the local store
    /// (for a replica that started without the fleet store and joined it later).
    pub(crate) fn use_split_salt(&self, salt: SplitSalt) {
        if self.split_salt() != salt {
            self.split_salt.store(Arc::new(salt));
            self.store.send(Op::SplitSalt(salt));
        }
    }

    /// Fleet mode: new pins are stored only once the fleet store confirmed them
    /// ([`Sessions::confirm_claim`]).
    pub(crate) fn claim_new_pins_first(&self) {
        self.claims_first.store(true, Ordering::Relaxed);
    }

    /// Settles the provisional pin `seq` a request made for `key`, as the fleet store answered:
    /// the local copy takes the fleet's pin (`None`: the claim failed and the local pin stands),
    /// stores it under the same `seq`, and requests waiting on `seq` then follow it. If the pin
    /// is gone meanwhile (an operator ended it), it is stored and removed again, so `seq` still
    /// settles. Returns the pool the key is pinned to now, if any.
    pub(crate) fn confirm_claim(&self, key: &str, seq: u64, fleet: Option<&StoredPin>) -> Option<PoolName> {
        let hash = self.hash(key);
        let mut table = self.table.write_with_room(stripe_of(hash));
        let local = table
            .find(hash, key)
            .map(|Entry { pin, .. }| (pin.pool, pin.first_seen, pin.last_seen.load(Ordering::Relaxed)));
        let stored = match (local, fleet) {
            (None, Some(fleet)) => {
                self.store.send(Op::Pin { pin: fleet.clone(), seq });
                self.store.send(Op::Remove(key.into()));
                return None;
            }
            (None, None) => {
                let gone = StoredPin { key: key.into(), pool: PoolName::V1, first_seen: 0, last_seen: 0 };
                self.store.send(Op::Pin { pin: gone, seq });
                self.store.send(Op::Remove(key.into()));
                return None;
            }
            (Some((pool, first_seen, last_seen)), None) => {
                StoredPin { key: key.into(), pool, first_seen, last_seen }
            }
            (Some((pool, first_seen, _)), Some(fleet))
                if (pool, first_seen) == (fleet.pool, fleet.first_seen) =>
            {
                fleet.clone()
            }
            (Some(_), Some(fleet)) => {
                self.replace_entry(&mut table, hash, fleet, seq);
                fleet.clone()
            }
        };
        let pool = stored.pool;
        self.store.send(Op::Pin { pin: stored, seq });
        Some(pool)
    }

    /// Sends refreshes to the fleet store through `to` from now on, as well as to the local one.
    pub(crate) fn mirror_refreshes(&self, to: tokio::sync::mpsc::UnboundedSender<Vec<FleetTouch>>) {
        let _ = self.fleet_touches.set(to);
    }

    /// Takes back the pin made at `first_seen` for a session that is refused after all (the
    /// fleet store could not confirm it): it never served a request.
    pub(crate) fn unmake(&self, key: &str, first_seen: u32) {
        let hash = self.hash(key);
        let mut table = self.table.write(stripe_of(hash));
        // Never served a request: no end to count, only the live counts to take back.
        if let Some(pin) = self.remove_made_at(&mut table, hash, key, first_seen) {
            self.live.fetch_sub(1, Ordering::Relaxed);
            self.live_by_pool.get(pin.pool).fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// The live pin of `key`, if any: (pool, first_seen).
    pub(crate) fn pin_of(&self, key: &str) -> Option<(PoolName, u32)> {
        let hash = self.hash(key);
        let table = self.table.read(stripe_of(hash));
        table.find(hash, key).map(|Entry { pin, .. }| (pin.pool, pin.first_seen))
    }

    /// Live pins on `pool`.
    pub fn live(&self, pool: PoolName) -> usize {
        self.live_by_pool.get(pool).load(Ordering::Relaxed)
    }

    /// A v1 pin was made or renewed: the end of the last v1 pin moves out with it at once, not
    /// only at the next [`Sessions::maintain`], so the drain signal's ETA never lags a request.
    /// The shared value changes at most once a second (ends are whole seconds), so a request
    /// usually only reads it.
    fn extend_v1_end(&self, pin: &Pin, policy: &PinPolicy) {
        if pin.pool == PoolName::V1 {
            let end = pin.end(policy);
            if end > self.v1_pins_end.load(Ordering::Relaxed) {
                self.v1_pins_end.fetch_max(end, Ordering::Relaxed);
            }
        }
    }

    /// Unix seconds at which the last v1 pin ends without further requests (0: none): as of
    /// the last [`Sessions::maintain`], moved out by every v1 request since.
    pub(crate) fn v1_pins_end(&self) -> u32 {
        self.v1_pins_end.load(Ordering::Relaxed)
    }

    /// Up to `limit` live pins, optionally of one pool, in no particular order.
    pub(crate) fn list(&self, pool: Option<PoolName>, policy: &PinPolicy, limit: usize) -> Vec<PinInfo> {
        let now = secs(self.clock.now());
        let mut out = Vec::new();
        for stripe in 0..STRIPES {
            let table = self.table.read(stripe);
            let live = table
                .iter()
                .filter(|e| pool.is_none_or(|p| p == e.pin.pool) && e.pin.ended(now, policy).is_none());
            for Entry { key, pin } in live {
                if out.len() >= limit {
                    return out;
                }
                out.push(PinInfo::of(key, pin, policy));
            }
        }
        out
    }

    /// A page of live pins, optionally of one pool, in key order: the first `limit` whose key
    /// comes after `after`, and whether more follow. One pass over the table, keeping only the
    /// page's worth (a heap of `limit`), so paging through a million pins costs no sort of them.
    pub(crate) fn page(
        &self,
        pool: Option<PoolName>,
        policy: &PinPolicy,
        after: Option<&str>,
        limit: usize,
    ) -> (Vec<PinInfo>, bool) {
        let now = secs(self.clock.now());
        // The `limit` smallest keys seen so far, largest on top; one more tells whether more follow.
        let mut smallest: std::collections::BinaryHeap<PinInfo> = std::collections::BinaryHeap::new();
        for stripe in 0..STRIPES {
            let table = self.table.read(stripe);
            let live = table.iter().filter(|e| {
                pool.is_none_or(|p| p == e.pin.pool)
                    && after.is_none_or(|after| &*e.key > after)
                    && e.pin.ended(now, policy).is_none()
            });
            for Entry { key, pin } in live {
                if smallest.len() > limit && smallest.peek().is_some_and(|top| *top.key <= **key) {
                    continue;
                }
                smallest.push(PinInfo::of(key, pin, policy));
                if smallest.len() > limit + 1 {
                    smallest.pop();
                }
            }
        }
        let mut page = smallest.into_sorted_vec();
        let more = page.len() > limit;
        page.truncate(limit);
        (page, more)
    }

    /// `key`'s live pin, if it has one.
    pub(crate) fn lookup(&self, key: &str, policy: &PinPolicy) -> Option<PinInfo> {
        let now = secs(self.clock.now());
        let hash = self.hash(key);
        let table = self.table.read(stripe_of(hash));
        let Entry { key, pin } = table.find(hash, key)?;
        pin.ended(now, policy).is_none().then(|| PinInfo::of(key, pin, policy))
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// "key:K", "invalid" or "absent" for a request with this target and headers.
    fn key_of(uri: &str, headers: &[(&'static str, &'static str)]) -> String {
        let yaml = "pools:\n  v1: { upstreams: [{ name: a, url: \"http://x:1\" }] }\n  v2: { upstreams: [{ name: b, url: \"http://x:2\" }] }\nsessions:\n  keys: [{ path: \"/api/studies/{id}\" }, { query: studyId }, { header: X-Study-Id }, { cookie: study }]\n";
        let config = crate::config::Config::from_yaml(yaml, std::path::Path::new("t")).unwrap();
        let extractor = KeyExtractor::new(config.sessions.keys);
        let parsed: http::Uri = uri.parse().unwrap();
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.append(*k, http::HeaderValue::from_static(v));
        }
        let shown = |outcome| match outcome {
            KeyOutcome::Key(k) => format!("key:{k}"),
            KeyOutcome::Invalid => "invalid".to_owned(),
            KeyOutcome::Absent => "absent".to_owned(),
        };
        let from_map = shown(extractor.extract_from(parsed.path(), parsed.query(), &map));

        // The fast path reads the same request from its raw head: it must name the same session.
        let mut raw = format!("GET {uri} HTTP/1.1\r\nHost: h\r\n");
        for (k, v) in headers {
            raw.push_str(&format!("{}: {v}\r\n", k.to_ascii_uppercase()));
        }
        raw.push_str("\r\n");
        let mut space = [const { std::mem::MaybeUninit::uninit() }; crate::h1::MAX_HEADERS];
        let crate::h1::ParsedRequest::Complete(head) = crate::h1::parse_request(raw.as_bytes(), &mut space)
        else {
            panic!("{raw:?} did not parse")
        };
        let from_raw = shown(extractor.extract_from(head.path(), head.query(), &head));
        assert_eq!(from_map, from_raw, "{uri} {headers:?}");
        from_map
    }

    #[test]
    fn in_fleet_mode_pins_live_a_grace_that_covers_the_fleets_refresh_lag() {
        let pools = "pools:\n  v1: { upstreams: [{ name: a, url: \"http://x:1\" }] }\n  v2: { upstreams: [{ name: b, url: \"http://x:2\" }] }\n";
        let policy = |extra: &str| {
            let yaml = format!("{pools}{extra}");
            PinPolicy::from_config(&Config::from_yaml(&yaml, std::path::Path::new("t")).unwrap())
        };
        let embedded = policy("");
        assert_eq!((embedded.idle_secs, embedded.stale_secs, embedded.fleet_lag_secs), (38_400, 192, 0));
        let fleet = policy("store: { backend: redis, url: \"redis://127.0.0.1:6379/0\" }\n");
        // 1 % of 10h40m between fleet refreshes; the grace is two of them plus the local 192 s.
        assert_eq!((fleet.idle_secs, fleet.stale_secs, fleet.fleet_lag_secs), (38_400 + 960, 192, 384));
        assert_eq!(
            fleet.max_secs, embedded.max_secs,
            "a pin's first request is exact: no grace on max_duration"
        );

        // Refreshes reach the fleet when they cross a multiple of the lag since the pin began.
        let first = 1_000;
        assert!(!fleet.reaches_fleet(first, first, first + 383));
        assert!(fleet.reaches_fleet(first, first + 383, first + 384));
        assert!(!fleet.reaches_fleet(first, first + 384, first + 767));
        assert!(fleet.reaches_fleet(first, first + 700, first + 2_000));
    }

    #[test]
    fn every_extractor_names_the_same_session() {
        assert_eq!(key_of("/api/studies/42", &[]), "key:42");
        assert_eq!(key_of("/api/studies/42/contents?x=1", &[]), "key:42");
        assert_eq!(key_of("/api/progress?a=1&studyId=42", &[]), "key:42");
        assert_eq!(key_of("/api/other", &[("x-study-id", "42")]), "key:42");
        assert_eq!(key_of("/api/other", &[("cookie", "a=1; study=42")]), "key:42");
        assert_eq!(key_of("/api/studies", &[]), "absent");
        assert_eq!(key_of("/api/studiesX/42", &[]), "absent");
    }

    #[test]
    fn first_extractor_wins_and_bad_values_make_the_request_unkeyed() {
        assert_eq!(key_of("/api/studies/1?studyId=2", &[]), "key:1");
        assert_eq!(key_of("/api/studies/a%20b", &[]), "invalid");
        assert_eq!(key_of("/api/progress?studyId=", &[]), "invalid");
        let long = format!("/api/studies/{}", "x".repeat(129));
        assert_eq!(key_of(&long, &[]), "invalid");
        assert!(is_valid_key(&"x".repeat(128)));
        assert!(is_valid_key("a.b_c~d-E9"));
        assert!(!is_valid_key("a/b") && !is_valid_key("") && !is_valid_key("ü"));
    }

    #[test]
    fn the_split_roll_is_uniform_and_follows_the_salt() {
        let (salt, other) = ([7u8; 16], [8u8; 16]);
        let keys: Vec<String> = (0..20_000).map(|i| format!("study-{i}")).collect();
        let below_30 = keys.iter().filter(|k| split_roll(&salt, k) < 3_000).count();
        assert!((5_600..=6_400).contains(&below_30), "{below_30} of 20,000 keys below 30 %");
        assert!(keys.iter().all(|k| split_roll(&salt, k) == split_roll(&salt, k)));
        let same_under_other = keys.iter().filter(|k| split_roll(&salt, k) == split_roll(&other, k)).count();
        assert!(same_under_other < 100, "{same_under_other} keys fall in the same place under another salt");
    }

    /// Replicas of different versions share one store during an upgrade: they must place a key
    /// alike, so the hash is pinned to its specification (SipHash-1-3), not to this build.
    #[test]
    fn the_split_roll_is_sip_hash_1_3() {
        let salt: SplitSalt = std::array::from_fn(|i| i as u8);
        // SipHash-1-3 of "42" under the key 00 01 .. 0f is 651 modulo 10,000; checked against
        // an independent implementation of the specification.
        assert_eq!(split_roll(&salt, "42"), 651);
    }
}
