//! The embedded store: one redb file in `state_dir` (crash-safe copy-on-write B-trees, fsync on
//! commit), the [`Backend`] a single replica uses.
//!
//! redb locks the file: a second process pointed at the same directory fails to open it with
//! [`StoreError::Locked`] instead of corrupting it. Pin activity goes to an append-only log that
//! is folded into the pin records in the background (see [`ACTIVITY`]); batching, retries and
//! who waits for what are [`super`]'s.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;

use redb::{
    Database, DatabaseError, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition,
};
use tracing::{error, warn};

use super::{
    new_split_salt, Backend, BackendError, Background, Loaded, Op, SplitSalt, StoreError, StoreHealth,
    StoredPin,
};
use crate::config::PoolName;

const PINS: TableDefinition<&str, &[u8]> = TableDefinition::new("pins");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const ADMIN: TableDefinition<&str, &[u8]> = TableDefinition::new("admin");
const LAST_V1_REQUEST: &str = "last_v1_request_ms";
const REVISION: &str = "revision";
const OVERRIDES: &str = "overrides";
const SPLIT_SALT: &str = "split_salt";
const RAMP: &str = "ramp";

/// Pin activity (`last_seen` moving forward), appended as one record per commit instead of
/// rewriting each pin's record: refreshing many active pins costs one sequential write, not one
/// B-tree update each. A record is repeated `[last_seen: u32 LE][key length: u8][key]`. The log
/// is applied over `pins` when the store is loaded, and folded into `pins` once it holds
/// [`FOLD_AFTER`] entries: the records a fold covered are dropped, those logged while it ran
/// stay. Records are numbered from the last one's number up; only a fold empties the log, and
/// none is running then, so numbers starting over from 0 meet no record a fold still covers.
const ACTIVITY: TableDefinition<u64, &[u8]> = TableDefinition::new("activity");

/// Activity entries after which the log is folded into `pins`. A fold costs one B-tree update
/// per distinct key in the log, so a longer log folds the refreshes of pins that stay active
/// (one every 48 s each by default) more times over per update; a restart after a crash applies
/// the whole log, so it must stay short enough to load quickly (`benches/pins.rs`: at 1M pins,
/// a full log adds under a second). While a fold runs (about a second at 1M pins) the log goes
/// on growing past this.
pub const FOLD_AFTER: usize = 524_288;

/// Pin records a fold updates per commit. A fold of a full log at a million pins takes about a
/// second; done in one transaction, every new pin made meanwhile would wait for it. In chunks
/// that ride along with the ordinary commits, a new pin waits for one chunk at most.
const FOLD_CHUNK: usize = 4_096;

/// The file inside `state_dir`.
pub const STATE_FILE: &str = "state.redb";

fn encode(pool: PoolName, first_seen: u32, last_seen: u32) -> [u8; 9] {
    let mut out = [0u8; 9];
    out[0] = match pool {
        PoolName::V1 => 1,
        PoolName::V2 => 2,
    };
    out[1..5].copy_from_slice(&first_seen.to_le_bytes());
    out[5..9].copy_from_slice(&last_seen.to_le_bytes());
    out
}

fn decode(bytes: &[u8]) -> Option<(PoolName, u32, u32)> {
    let bytes: &[u8; 9] = bytes.try_into().ok()?;
    let pool = match bytes[0] {
        1 => PoolName::V1,
        2 => PoolName::V2,
        _ => return None,
    };
    let first = u32::from_le_bytes(bytes[1..5].try_into().ok()?);
    let last = u32::from_le_bytes(bytes[5..9].try_into().ok()?);
    Some((pool, first, last))
}

/// Everything in the file, and the number of entries in the activity log not folded yet.
fn load(db: &Database) -> Result<(Loaded, usize), redb::Error> {
    // Make sure every table exists, so a fresh file reads as empty, and that the split has its
    // salt before the first pin is made with it.
    let txn = db.begin_write()?;
    txn.open_table(PINS)?;
    txn.open_table(META)?;
    {
        let mut admin = txn.open_table(ADMIN)?;
        let stored = admin.get(SPLIT_SALT)?.is_some_and(|salt| salt.value().len() == size_of::<SplitSalt>());
        if !stored {
            admin.insert(SPLIT_SALT, new_split_salt().as_slice())?;
        }
    }
    txn.open_table(ACTIVITY)?;
    txn.commit()?;

    let txn = db.begin_read()?;
    let pins_table = txn.open_table(PINS)?;
    let mut pins = Vec::with_capacity(pins_table.len()? as usize);
    for entry in pins_table.iter()? {
        let (key, value) = entry?;
        match decode(value.value()) {
            Some((pool, first_seen, last_seen)) => {
                pins.push(StoredPin { key: key.value().into(), pool, first_seen, last_seen })
            }
            None => warn!(key = key.value(), "skipping a pin record that does not decode"),
        }
    }
    // Activity moves a stored pin's time forward; entries for pins no longer stored are stale.
    let activity = txn.open_table(ACTIVITY)?;
    let mut activity_entries = 0;
    if !activity.is_empty()? {
        let index: std::collections::HashMap<Box<str>, usize> =
            pins.iter().enumerate().map(|(i, pin)| (pin.key.clone(), i)).collect();
        for record in activity.iter()? {
            let (_, record) = record?;
            for (key, last_seen) in decode_activity(record.value()) {
                activity_entries += 1;
                if let Some(&i) = index.get(key) {
                    pins[i].last_seen = pins[i].last_seen.max(last_seen);
                }
            }
        }
    }
    let meta = txn.open_table(META)?;
    let last_v1_request_ms = meta.get(LAST_V1_REQUEST)?.map(|v| v.value());
    let revision = meta.get(REVISION)?.map_or(0, |v| v.value());
    let admin = txn.open_table(ADMIN)?;
    let overrides = admin.get(OVERRIDES)?.map(|v| v.value().to_vec());
    let split_salt = admin
        .get(SPLIT_SALT)?
        .and_then(|v| SplitSalt::try_from(v.value()).ok())
        .expect("the salt was stored in the transaction before");
    let ramp = admin.get(RAMP)?.map(|v| v.value().to_vec());
    Ok((Loaded { pins, last_v1_request_ms, overrides, revision, split_salt, ramp }, activity_entries))
}

/// Appends one activity entry to a record; false if the key cannot be logged.
fn encode_activity(record: &mut Vec<u8>, key: &str, last_seen: u32) -> bool {
    // Session keys are at most 128 bytes (`session::MAX_KEY_LEN`); a longer one is never
    // truncated, which could move another pin.
    debug_assert!(key.len() <= usize::from(u8::MAX), "session key of {} bytes", key.len());
    let Ok(len) = u8::try_from(key.len()) else { return false };
    let key = key.as_bytes();
    record.extend_from_slice(&last_seen.to_le_bytes());
    record.push(len);
    record.extend_from_slice(key);
    true
}

/// The entries of an activity record; a truncated tail is ignored.
fn decode_activity(mut record: &[u8]) -> impl Iterator<Item = (&str, u32)> {
    std::iter::from_fn(move || loop {
        let (head, rest) = record.split_first_chunk::<5>()?;
        let last_seen = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
        let len = head[4] as usize;
        if rest.len() < len {
            return None;
        }
        let (key, rest) = rest.split_at(len);
        record = rest;
        if let Ok(key) = std::str::from_utf8(key) {
            return Some((key, last_seen));
        }
    })
}

/// An activity-log fold in progress. The log is read and reduced to each key's latest time on a
/// thread of its own (a read transaction does not hold up commits); then the writer applies the
/// result a chunk per commit and, with the last chunk, drops the records it covered. Records
/// logged meanwhile stay for the next fold. Applying a chunk is idempotent (a stored time only
/// moves forward), so a crash part-way leaves nothing to repair: the log is still whole.
enum Folding {
    Idle,
    Reading(JoinHandle<Result<Folded, redb::Error>>),
    Applying(Folded),
}

/// The log up to record `upto` (exclusive), reduced to each key's latest time, in key order.
struct Folded {
    touches: Vec<(String, u32)>,
    applied: usize,
    upto: u64,
    /// Log entries these records held.
    entries: usize,
}

impl Folded {
    /// The next chunk to apply, and whether it is the last.
    fn next_chunk(&self) -> (&[(String, u32)], bool) {
        let end = (self.applied + FOLD_CHUNK).min(self.touches.len());
        (&self.touches[self.applied..end], end == self.touches.len())
    }
}

impl Folding {
    /// Starts reading the log for a fold; if no thread can be started, folds it in one go
    /// (and empties `activity_entries`).
    fn start(db: &Arc<Database>, activity_entries: &mut usize) -> Folding {
        let reader = db.clone();
        match std::thread::Builder::new().name("rollout-fold".to_owned()).spawn(move || read_log(&reader)) {
            Ok(handle) => Folding::Reading(handle),
            Err(err) => {
                warn!(error = %err, "cannot start the fold reader; folding in one transaction");
                match fold(db) {
                    Ok(()) => *activity_entries = 0,
                    Err(err) => {
                        warn!(error = %crate::ErrorChain(&err), "could not fold the activity log; trying again later")
                    }
                }
                Folding::Idle
            }
        }
    }

    /// Moves from reading to applying once the reader is done.
    fn poll(self) -> Folding {
        match self {
            Folding::Reading(handle) if handle.is_finished() => match handle.join() {
                Ok(Ok(folded)) => Folding::Applying(folded),
                Ok(Err(err)) => {
                    warn!(error = %crate::ErrorChain(&err), "could not read the activity log to fold it; trying again later");
                    Folding::Idle
                }
                Err(_) => {
                    error!("the activity log reader panicked; trying again later");
                    Folding::Idle
                }
            },
            other => other,
        }
    }
}

/// The redb file and the state of its activity log.
pub(super) struct EmbeddedBackend {
    db: Arc<Database>,
    /// Entries in the activity log, folded or not (a fold's entries are dropped with its last
    /// chunk).
    activity_entries: usize,
    folding: Folding,
    health: Arc<StoreHealth>,
}

impl EmbeddedBackend {
    /// Opens (or creates) the file in `dir` and reads everything in it.
    pub(super) fn open(
        dir: &Path,
        health: Arc<StoreHealth>,
    ) -> Result<(EmbeddedBackend, Loaded), StoreError> {
        std::fs::create_dir_all(dir)
            .map_err(|source| StoreError::CreateDir { dir: dir.to_owned(), source })?;
        let file = dir.join(STATE_FILE);
        let db =
            redb::Builder::new().set_cache_size(32 * 1024 * 1024).create(&file).map_err(|e| match e {
                DatabaseError::DatabaseAlreadyOpen => StoreError::Locked { dir: dir.to_owned() },
                source => StoreError::Open { file: file.clone(), source },
            })?;
        let (loaded, activity_entries) =
            load(&db).map_err(|source| StoreError::Read { file: file.clone(), source })?;
        health.activity_entries.store(activity_entries as u64, Ordering::Relaxed);
        let backend = EmbeddedBackend { db: Arc::new(db), activity_entries, folding: Folding::Idle, health };
        Ok((backend, loaded))
    }
}

impl Backend for EmbeddedBackend {
    fn background(&mut self) -> Background {
        self.folding = std::mem::replace(&mut self.folding, Folding::Idle).poll();
        match self.folding {
            Folding::Idle => Background::Idle,
            // While the reader runs (about a second at 1M pins, once per full log) there is
            // nothing to commit for it yet.
            Folding::Reading(_) => Background::Waiting,
            Folding::Applying(_) => Background::Ready,
        }
    }

    fn commit(&mut self, batch: &[Op]) -> Result<(), BackendError> {
        let mut step = match &self.folding {
            Folding::Applying(folded) => {
                let (touches, last) = folded.next_chunk();
                Some(FoldStep { touches, drop_before: last.then_some(folded.upto) })
            }
            _ => None,
        };
        let mut result = commit(&self.db, batch, self.activity_entries, step.as_ref());
        let mut fold_failed = false;
        if result.is_err() && step.is_some() {
            // The fold only tidies the log: it must never cost a batch its commit. It starts
            // over later.
            warn!("could not commit a step of the activity log's fold; trying again later");
            (step, fold_failed) = (None, true);
            result = commit(&self.db, batch, self.activity_entries, None);
        }
        // What of the fold went in: (pin records, whether it was the last chunk).
        let stepped = step.map(|step| (step.touches.len(), step.drop_before.is_some()));
        if fold_failed {
            self.folding = Folding::Idle;
        }
        let entries = result?;
        self.activity_entries = entries;
        if let (Some((applied, last)), Folding::Applying(folded)) = (stepped, &mut self.folding) {
            folded.applied += applied;
            if last {
                self.activity_entries = self.activity_entries.saturating_sub(folded.entries);
                self.folding = Folding::Idle;
            }
        }
        if self.activity_entries >= FOLD_AFTER && matches!(self.folding, Folding::Idle) {
            self.folding = Folding::start(&self.db, &mut self.activity_entries);
        }
        self.health.activity_entries.store(self.activity_entries as u64, Ordering::Relaxed);
        Ok(())
    }

    fn close(self: Box<Self>, unsaved: &[Op]) {
        let EmbeddedBackend { db, activity_entries, folding, .. } = *self;
        // The reader holds the database open; let it finish before the file is let go.
        if let Folding::Reading(handle) = folding {
            let _ = handle.join();
        }
        // A graceful stop leaves the pin records complete: the next start (or an older build,
        // which does not read the log) finds every refresh in them. A fold part-way is simply
        // redone.
        if activity_entries > 0 || !unsaved.is_empty() {
            if !unsaved.is_empty() {
                if let Err(err) = commit(&db, unsaved, activity_entries, None) {
                    error!(error = %crate::ErrorChain(&err), "pin activity not stored at shutdown");
                }
            }
            if let Err(err) = fold(&db) {
                warn!(error = %crate::ErrorChain(&err), "could not fold the activity log at shutdown");
            }
        }
    }
}

/// Part of a fold to commit along with a batch: pin records to move forward, and, with the
/// last chunk, the log records the fold covered (those before `drop_before`).
struct FoldStep<'a> {
    touches: &'a [(String, u32)],
    drop_before: Option<u64>,
}

/// Commits `batch`, and a step of a fold, in one transaction. `activity_entries` is the size of
/// the activity log before it; returns the size after (a fold's dropped records not counted).
fn commit(
    db: &Database,
    batch: &[Op],
    activity_entries: usize,
    fold_step: Option<&FoldStep<'_>>,
) -> Result<usize, redb::Error> {
    let txn = db.begin_write()?;
    let entries = {
        let mut pins = txn.open_table(PINS)?;
        let mut meta = txn.open_table(META)?;
        let mut admin = txn.open_table(ADMIN)?;
        let mut activity = txn.open_table(ACTIVITY)?;
        // Touches only ever move a stored time forward and are applied only to pins still
        // stored, so they need not keep their place among pins and removals: a touch of a key
        // that is removed and pinned again later carries an older time than the new pin's.
        let mut record = Vec::new();
        let mut entries = activity_entries;
        for op in batch {
            match op {
                Op::Pin { pin, .. } => {
                    pins.insert(&*pin.key, encode(pin.pool, pin.first_seen, pin.last_seen).as_slice())?;
                }
                Op::Touch(touches) => {
                    for (key, last_seen) in touches {
                        entries += usize::from(encode_activity(&mut record, key, *last_seen));
                    }
                }
                Op::Remove(key) => {
                    pins.remove(&**key)?;
                }
                Op::LastV1Request(ms) => {
                    meta.insert(LAST_V1_REQUEST, ms)?;
                }
                Op::Overrides { json, revision } => {
                    admin.insert(OVERRIDES, json.as_slice())?;
                    meta.insert(REVISION, revision)?;
                }
                Op::SplitSalt(salt) => {
                    admin.insert(SPLIT_SALT, salt.as_slice())?;
                }
                Op::Ramp(json) => {
                    admin.insert(RAMP, json.as_slice())?;
                }
                Op::Flush(_) | Op::Close(_) => {}
            }
        }
        if let Some(step) = fold_step {
            apply_touches(&mut pins, step.touches)?;
            if let Some(upto) = step.drop_before {
                activity.retain_in(..upto, |_, _| false)?;
            }
        }
        if !record.is_empty() {
            let next = activity.last()?.map_or(0, |(k, _)| k.value() + 1);
            activity.insert(next, record.as_slice())?;
        }
        entries
    };
    txn.commit()?;
    Ok(entries)
}

/// Moves the activity log into the pins' records and empties it, in one transaction.
fn fold(db: &Database) -> Result<(), redb::Error> {
    let txn = db.begin_write()?;
    fold_activity(&mut txn.open_table(PINS)?, &mut txn.open_table(ACTIVITY)?)?;
    txn.commit()?;
    Ok(())
}

fn fold_activity(
    pins: &mut redb::Table<&str, &[u8]>,
    activity: &mut redb::Table<u64, &[u8]>,
) -> Result<(), redb::Error> {
    let folded = reduce_log(activity, u64::MAX)?;
    apply_touches(pins, &folded.touches)?;
    activity.retain(|_, _| false)?;
    Ok(())
}

/// Reads the whole activity log as of now, for a fold applied in chunks.
fn read_log(db: &Database) -> Result<Folded, redb::Error> {
    let txn = db.begin_read()?;
    let activity = txn.open_table(ACTIVITY)?;
    let upto = activity.last()?.map_or(0, |(k, _)| k.value() + 1);
    reduce_log(&activity, upto)
}

/// The log's records before `upto`, reduced to each key's latest time, in key order (so that
/// applying them is one walk over the B-tree's leaves).
fn reduce_log(activity: &impl ReadableTable<u64, &'static [u8]>, upto: u64) -> Result<Folded, redb::Error> {
    let mut latest = std::collections::HashMap::<String, u32>::new();
    let mut entries = 0;
    for record in activity.range(..upto)? {
        let (_, record) = record?;
        for (key, last_seen) in decode_activity(record.value()) {
            entries += 1;
            // Most keys repeat (an active pin is refreshed every 48 s by default): copy a key
            // only the first time.
            match latest.get_mut(key) {
                Some(time) => *time = (*time).max(last_seen),
                None => {
                    latest.insert(key.to_owned(), last_seen);
                }
            }
        }
    }
    let mut touches: Vec<(String, u32)> = latest.into_iter().collect();
    touches.sort_unstable();
    Ok(Folded { touches, applied: 0, upto, entries })
}

/// Writes touches (in key order) to pins that are stored.
fn apply_touches(pins: &mut redb::Table<&str, &[u8]>, touches: &[(String, u32)]) -> Result<(), redb::Error> {
    for (key, last_seen) in touches {
        let (key, last_seen) = (key.as_str(), *last_seen);
        let current = pins.get(key)?.and_then(|v| decode(v.value()));
        // A request's write-ahead and the upkeep's refresh may arrive in either order; a stored
        // time never goes back, and a removed pin is not brought back.
        if let Some((pool, first_seen, _)) = current.filter(|c| c.2 < last_seen) {
            pins.insert(key, encode(pool, first_seen, last_seen).as_slice())?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;
    use std::time::Duration;

    fn pin(key: &str, pool: PoolName, t: u32) -> StoredPin {
        StoredPin { key: key.into(), pool, first_seen: t, last_seen: t }
    }

    #[tokio::test]
    async fn pins_and_clock_survive_reopen_and_removals_stick() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (store, loaded) = Store::open(dir.path()).unwrap();
            assert!(loaded.pins.is_empty() && loaded.last_v1_request_ms.is_none());
            for (i, key) in ["a", "b", "c"].iter().enumerate() {
                let seq = store.next_seq();
                store.send(Op::Pin { pin: pin(key, PoolName::V1, 100 + i as u32), seq });
            }
            store.send(Op::Touch(vec![("a".into(), 500)]));
            store.send(Op::Remove("b".into()));
            store.send(Op::LastV1Request(123_456));
            assert!(store.settle(3, Duration::from_secs(5)).await);
            store.close().await;
        }
        let (store, loaded) = Store::open(dir.path()).unwrap();
        let mut pins = loaded.pins;
        pins.sort_by(|a, b| a.key.cmp(&b.key));
        assert_eq!(
            pins,
            vec![StoredPin { last_seen: 500, ..pin("a", PoolName::V1, 100) }, pin("c", PoolName::V1, 102)]
        );
        assert_eq!(loaded.last_v1_request_ms, Some(123_456));
        store.close().await;
        let db = Database::open(dir.path().join(STATE_FILE)).unwrap();
        assert_eq!(load(&db).unwrap().1, 0, "a graceful close folds the activity log into the pins");
    }

    #[test]
    fn touches_only_move_forward_and_never_bring_a_removed_pin_back() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::create(dir.path().join("t.redb")).unwrap();
        load(&db).unwrap();
        let touch = |pairs: &[(&str, u32)]| Op::Touch(pairs.iter().map(|(k, t)| ((*k).into(), *t)).collect());
        let batch = [
            Op::Pin { pin: pin("a", PoolName::V1, 100), seq: 1 },
            Op::Pin { pin: pin("b", PoolName::V2, 100), seq: 2 },
            // The upkeep's refresh (older) arrives after a request's write-ahead (newer).
            touch(&[("b", 300), ("a", 250)]),
            touch(&[("a", 200), ("b", 290)]),
            Op::Remove("b".into()),
            touch(&[("b", 400)]),
        ];
        let logged = commit(&db, &batch, 0, None).unwrap();
        assert_eq!(logged, 5, "touches go to the activity log");
        let read_back = |db: &Database| {
            let mut pins = load(db).unwrap().0.pins;
            pins.sort_by(|a, b| a.key.cmp(&b.key));
            pins
        };
        let expected = vec![StoredPin { last_seen: 250, ..pin("a", PoolName::V1, 100) }];
        assert_eq!(read_back(&db), expected, "from the log");
        // Folding moves the log into the pins' records: the same result, from the records.
        fold(&db).unwrap();
        assert!(db.begin_read().unwrap().open_table(ACTIVITY).unwrap().is_empty().unwrap());
        assert_eq!(read_back(&db), expected, "from the folded records");
        // A key pinned again after its removal is not moved by the old pin's activity.
        commit(&db, &[touch(&[("c", 150)]), Op::Pin { pin: pin("c", PoolName::V2, 600), seq: 3 }], 0, None)
            .unwrap();
        assert_eq!(read_back(&db)[1], pin("c", PoolName::V2, 600));
        assert_eq!(commit(&db, &[touch(&[("a", 260)])], 7, None).unwrap(), 8, "the log's size is counted on");
    }

    #[test]
    fn a_fold_in_chunks_keeps_what_was_logged_or_removed_meanwhile() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::create(dir.path().join("t.redb")).unwrap();
        load(&db).unwrap();
        let keys: Vec<String> = (0..FOLD_CHUNK + 10).map(|i| format!("k{i:06}")).collect();
        let pins: Vec<Op> = keys
            .iter()
            .enumerate()
            .map(|(i, k)| Op::Pin { pin: pin(k, PoolName::V1, 100), seq: i as u64 + 1 })
            .collect();
        let touches = |t: u32| Op::Touch(keys.iter().map(|k| (k.as_str().into(), t)).collect());
        let logged = commit(&db, &pins, 0, None).unwrap();
        let logged = commit(&db, &[touches(200)], logged, None).unwrap();
        let logged = commit(&db, &[touches(150)], logged, None).unwrap();
        let folded = read_log(&db).unwrap();
        assert_eq!((folded.touches.len(), folded.entries), (keys.len(), 2 * keys.len()));

        // Between the read and the chunks: one pin removed, another refreshed again, a third
        // removed and pinned anew.
        let (first, last) = folded.next_chunk();
        assert!(!last, "more than one chunk");
        let step = FoldStep { touches: first, drop_before: None };
        let between = [
            Op::Remove(keys[1].as_str().into()),
            Op::Touch(vec![(keys[2].as_str().into(), 300)]),
            Op::Remove(keys[3].as_str().into()),
            Op::Pin { pin: pin(&keys[3], PoolName::V2, 400), seq: keys.len() as u64 + 1 },
        ];
        let logged = commit(&db, &between, logged, Some(&step)).unwrap();
        let folded = Folded { applied: FOLD_CHUNK, ..folded };
        let (rest, last) = folded.next_chunk();
        assert!(last && rest.len() == 10);
        let step = FoldStep { touches: rest, drop_before: Some(folded.upto) };
        let logged = commit(&db, &[], logged, Some(&step)).unwrap() - folded.entries;
        assert_eq!(logged, 1, "only the refresh logged during the fold is left in the log");

        let (loaded, activity_entries) = load(&db).unwrap();
        assert_eq!(activity_entries, 1);
        let by_key: std::collections::HashMap<_, _> =
            loaded.pins.iter().map(|p| (&*p.key, p.last_seen)).collect();
        assert_eq!(by_key.len(), keys.len() - 1, "the removed pin is not brought back");
        assert!(!by_key.contains_key(keys[1].as_str()));
        assert_eq!(by_key[keys[2].as_str()], 300, "the refresh logged meanwhile is kept");
        assert_eq!(by_key[keys[3].as_str()], 400, "the old pin's activity does not move the new one");
        for key in [&keys[0], &keys[FOLD_CHUNK + 9]] {
            assert_eq!(by_key[key.as_str()], 200, "{key}: the latest logged time, from its record");
        }
        let records = db.begin_read().unwrap().open_table(ACTIVITY).unwrap().len().unwrap();
        assert_eq!(records, 1);
    }

    #[tokio::test]
    async fn a_full_log_is_folded_while_the_store_keeps_committing() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path()).unwrap();
        let keys: Vec<String> = (0..2 * FOLD_CHUNK).map(|i| format!("study-{i:06}")).collect();
        for key in &keys {
            store.send(Op::Pin { pin: pin(key, PoolName::V2, 100), seq: store.next_seq() });
        }
        // A full log: every key many times, the latest time last.
        // One op, so one commit fills it past the point of folding and the fold covers it all.
        let rounds = FOLD_AFTER / keys.len() + 1;
        let touches =
            (0..rounds).flat_map(|round| keys.iter().map(move |k| (k.as_str().into(), 200 + round as u32)));
        store.send(Op::Touch(touches.collect()));
        assert!(store.flush().await);
        // New pins commit while the fold goes on.
        let mut made = 0;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while store.health.activity_entries.load(Ordering::Relaxed) > 0 {
            assert!(tokio::time::Instant::now() < deadline, "the fold did not finish");
            store
                .send(Op::Pin { pin: pin(&format!("new-{made}"), PoolName::V1, 500), seq: store.next_seq() });
            assert!(store.flush().await);
            made += 1;
        }
        assert!(store.is_all_settled());
        // As a crash would leave it now: the pins' own records hold the refreshes.
        let copy = tempfile::tempdir().unwrap();
        std::fs::copy(dir.path().join(STATE_FILE), copy.path().join(STATE_FILE)).unwrap();
        let db = Database::open(copy.path().join(STATE_FILE)).unwrap();
        assert!(db.begin_read().unwrap().open_table(ACTIVITY).unwrap().is_empty().unwrap());
        let (loaded, _) = load(&db).unwrap();
        assert_eq!(loaded.pins.len(), keys.len() + made);
        let latest = 200 + rounds as u32 - 1;
        assert!(loaded.pins.iter().filter(|p| p.key.starts_with("study-")).all(|p| p.last_seen == latest));
        store.close().await;
    }

    #[tokio::test]
    async fn a_second_opener_is_refused_until_the_first_closes() {
        let dir = tempfile::tempdir().unwrap();
        let (first, _) = Store::open(dir.path()).unwrap();
        let err = Store::open(dir.path()).unwrap_err();
        assert!(matches!(err, StoreError::Locked { .. }), "{err:?}");
        assert!(err.to_string().contains("in use by another rollout-proxy process"));
        first.close().await;
        let (second, _) = Store::open(dir.path()).unwrap();
        second.close().await;
    }

    #[tokio::test]
    async fn settling_waits_for_every_earlier_pin() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path()).unwrap();
        let early = store.next_seq();
        let late = store.next_seq();
        store.send(Op::Pin { pin: pin("late", PoolName::V2, 1), seq: late });
        store.flush().await;
        assert!(!store.is_settled(late), "an earlier pin is still unsent");
        store.send(Op::Pin { pin: pin("early", PoolName::V2, 1), seq: early });
        assert!(store.settle(late, Duration::from_secs(5)).await);
        store.close().await;
    }
}
