//! Durable state: session pins, the drain clock, and the admin overrides.
//!
//! All writes go through one writer thread fed by a channel: while one commit is being synced,
//! new operations queue up and are committed together in the next one (group commit), so many
//! new pins cost one sync. Operations on the same key are sent in the order they happened in
//! memory, so the stored state always converges to the in-memory table. Where batches are made
//! durable is a [`Backend`]'s business; today that is one redb file in `state_dir`
//! ([`embedded`]), and the request path sees only [`Store`], whatever the backend. Deciding
//! *what* to store is [`crate::session`]'s and [`crate::drain`]'s business; this module only
//! makes it durable.

mod embedded;
pub mod fleet;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tracing::{error, warn};

use crate::config::PoolName;
use embedded::EmbeddedBackend;
pub use embedded::{FOLD_AFTER, STATE_FILE};

/// Most operations committed in one transaction.
const MAX_BATCH: usize = 16_384;

/// Pauses between attempts at a failing commit.
const COMMIT_RETRY_PAUSES: [Duration; 3] =
    [Duration::from_millis(50), Duration::from_millis(200), Duration::from_millis(800)];

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create state directory {}", dir.display())]
    CreateDir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("state directory {} is in use by another rollout-proxy process; each process needs its own state_dir", dir.display())]
    Locked { dir: PathBuf },
    #[error("cannot open state file {}", file.display())]
    Open {
        file: PathBuf,
        #[source]
        source: redb::DatabaseError,
    },
    #[error("cannot read state file {}", file.display())]
    Read {
        file: PathBuf,
        #[source]
        source: redb::Error,
    },
    #[error("cannot start the state writer")]
    Writer(#[source] std::io::Error),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredPin {
    pub key: Box<str>,
    pub pool: PoolName,
    pub first_seen: u32,
    pub last_seen: u32,
}

/// What was in the store when it was opened.
#[derive(Debug, Default)]
pub struct Loaded {
    pub pins: Vec<StoredPin>,
    pub last_v1_request_ms: Option<u64>,
    /// The admin overrides as last stored (JSON), and the revision they belong to.
    pub overrides: Option<Vec<u8>>,
    pub revision: u64,
    /// The secret that keys the legacy split of new sessions (see [`SplitSalt`]).
    pub split_salt: SplitSalt,
    /// The ramp as last stored (JSON), if one was ever started.
    pub ramp: Option<Vec<u8>>,
}

/// The secret key of the hash that places a new session in the legacy split. Made once per
/// store and kept in it, so every restart (and, sharing a store, every replica) places a key
/// the same way; secret, so clients cannot choose keys that land on one pool.
pub type SplitSalt = [u8; 16];

/// A fresh salt from the system's secure random source.
pub(crate) fn new_split_salt() -> SplitSalt {
    let mut salt = SplitSalt::default();
    rustls::crypto::ring::default_provider()
        .secure_random
        .fill(&mut salt)
        .expect("the system's secure random source failed");
    salt
}

#[derive(Debug)]
pub enum Op {
    /// A new pin; `seq` comes from [`Store::next_seq`].
    Pin {
        pin: StoredPin,
        seq: u64,
    },
    /// Newer `last_seen` values of existing pins.
    Touch(Vec<(Box<str>, u32)>),
    Remove(Box<str>),
    LastV1Request(u64),
    /// The admin overrides (JSON) and the revision they make current.
    Overrides {
        json: Vec<u8>,
        revision: u64,
    },
    /// The split salt the fleet uses, kept so a restart without the fleet store splits alike.
    SplitSalt(SplitSalt),
    /// The ramp's plan and progress (JSON), so a restart resumes it.
    Ramp(Vec<u8>),
    /// Answered once everything sent before it is committed: true if that commit succeeded.
    Flush(oneshot::Sender<bool>),
    /// Commit what is queued, release the file and stop; answered once the file is released.
    Close(oneshot::Sender<()>),
}

/// Commit outcomes the rest of the proxy can observe.
#[derive(Debug, Default)]
pub struct StoreHealth {
    /// Unix seconds of the last successful commit.
    pub last_commit: AtomicU64,
    /// Successful commits; with group commit, far fewer than the pins they carry. A fold adds
    /// a commit of its own per chunk while nothing else is queued.
    pub commits: AtomicU64,
    pub write_errors: AtomicU64,
    /// Refreshes in the activity log not yet folded into the pin records.
    pub activity_entries: AtomicU64,
}

/// Why a backend could not commit a batch.
pub(crate) type BackendError = Box<dyn std::error::Error + Send + Sync>;

/// What a backend has to do between commits, besides the operations queued for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Background {
    /// Nothing: the writer may sleep until an operation arrives.
    Idle,
    /// Work under way elsewhere, with nothing to commit yet: look again shortly.
    Waiting,
    /// A step to commit, with or without queued operations.
    Ready,
}

/// Where batches are made durable. Called on the writer thread only, one call at a time, so
/// calls may block; nothing on the request path calls a backend.
pub(crate) trait Backend: Send {
    /// What the backend has to do besides queued operations (see [`Background`]).
    fn background(&mut self) -> Background {
        Background::Idle
    }

    /// Commits `batch` all or nothing. A failed commit changes nothing, so the writer may try the
    /// same batch again.
    fn commit(&mut self, batch: &[Op]) -> Result<(), BackendError>;

    /// Called once after the last commit, before the writer stops; `unsaved` are pin refreshes
    /// whose commit failed, a last chance to store them.
    fn close(self: Box<Self>, unsaved: &[Op]);
}

/// Handle to the durable store and its writer thread.
pub struct Store {
    /// Where the store lives, for log lines.
    location: PathBuf,
    ops: mpsc::UnboundedSender<Op>,
    next_seq: AtomicU64,
    /// Highest `seq` such that every pin up to it has been committed (or its commit failed).
    settled: watch::Receiver<u64>,
    /// Pins whose commit failed for good: settled, but not durable.
    failed: Arc<Mutex<BTreeSet<u64>>>,
    pub health: Arc<StoreHealth>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("location", &self.location).finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (or creates) the embedded store in `dir` and reads everything in it.
    pub fn open(dir: &Path) -> Result<(Store, Loaded), StoreError> {
        Store::open_with_delay(dir, Duration::ZERO)
    }

    /// Like [`Store::open`], with every commit held back by `commit_delay`: a slow disk, for
    /// tests that check what waits for durability.
    pub(crate) fn open_with_delay(dir: &Path, commit_delay: Duration) -> Result<(Store, Loaded), StoreError> {
        let health = Arc::new(StoreHealth::default());
        let (backend, loaded) = EmbeddedBackend::open(dir, health.clone())?;
        let store = Store::start(dir.to_owned(), Box::new(backend), health, commit_delay)?;
        Ok((store, loaded))
    }

    /// Starts the writer thread on `backend`.
    fn start(
        location: PathBuf,
        backend: Box<dyn Backend>,
        health: Arc<StoreHealth>,
        commit_delay: Duration,
    ) -> Result<Store, StoreError> {
        let (ops, rx) = mpsc::unbounded_channel();
        let (settled_tx, settled) = watch::channel(0);
        let failed = Arc::new(Mutex::new(BTreeSet::new()));
        let writer = Writer {
            backend,
            ops: rx,
            settled: settled_tx,
            watermark: 0,
            committed: BTreeSet::new(),
            failed: failed.clone(),
            health: health.clone(),
            commit_delay,
            carried: Vec::new(),
        };
        let writer = std::thread::Builder::new()
            .name("rollout-state".to_owned())
            .spawn(move || writer.run())
            .map_err(StoreError::Writer)?;
        Ok(Store {
            location,
            ops,
            next_seq: AtomicU64::new(1),
            settled,
            failed,
            health,
            writer: Mutex::new(Some(writer)),
        })
    }

    /// A sequence number for a new pin. Send the pin with [`Store::send`] right after taking it:
    /// later pins count as durable only once every earlier number has been committed.
    pub(crate) fn next_seq(&self) -> u64 {
        self.next_seq.fetch_add(1, Ordering::Relaxed)
    }

    /// Queues an operation; never blocks.
    pub fn send(&self, op: Op) {
        if self.ops.send(op).is_err() {
            warn!("state writer has stopped; change not stored");
        }
    }

    /// Whether every pin sent so far is committed.
    pub fn is_all_settled(&self) -> bool {
        self.is_settled(self.next_seq.load(Ordering::Relaxed) - 1)
    }

    pub(crate) fn is_settled(&self, seq: u64) -> bool {
        *self.settled.borrow() >= seq
    }

    /// Waits until pin `seq` has been committed, at most `limit`. False on time-out or when the
    /// commit failed.
    pub(crate) async fn settle(&self, seq: u64, limit: Duration) -> bool {
        let mut settled = self.settled.clone();
        let reached = tokio::time::timeout(limit, settled.wait_for(|s| *s >= seq)).await;
        matches!(reached, Ok(Ok(_))) && !self.failed.lock().unwrap_or_else(|p| p.into_inner()).contains(&seq)
    }

    /// Waits until everything queued so far is committed. False if that commit failed or the
    /// writer has stopped.
    pub async fn flush(&self) -> bool {
        let (tx, rx) = oneshot::channel();
        self.send(Op::Flush(tx));
        rx.await.unwrap_or(false)
    }

    /// Commits everything queued, stops the writer and releases the file, so another process
    /// can open the same directory. Later operations are dropped with a warning.
    pub async fn close(&self) {
        let (tx, rx) = oneshot::channel();
        self.send(Op::Close(tx));
        let _ = rx.await;
        let writer = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(writer) = writer {
            let _ = tokio::task::spawn_blocking(move || writer.join()).await;
        }
    }
}

/// The writer thread: takes queued operations in batches, has the backend commit each (trying
/// again a few times before giving up on it), and tells waiting requests what became durable.
struct Writer {
    backend: Box<dyn Backend>,
    ops: mpsc::UnboundedReceiver<Op>,
    settled: watch::Sender<u64>,
    /// Highest `seq` such that every pin up to it is settled.
    watermark: u64,
    /// Settled pins above the watermark.
    committed: BTreeSet<u64>,
    failed: Arc<Mutex<BTreeSet<u64>>>,
    health: Arc<StoreHealth>,
    commit_delay: Duration,
    /// Touches of a batch whose commit failed: memory already counts them as stored (a request
    /// will not write ahead again for a while), so they go again with the next batch.
    carried: Vec<Op>,
}

impl Writer {
    fn run(mut self) {
        let mut closing = None;
        while closing.is_none() {
            let Some(batch) = self.next_batch() else { break };
            let ok = self.commit(&batch);
            closing = self.settle(batch, ok);
        }
        self.backend.close(&self.carried);
        if let Some(done) = closing {
            let _ = done.send(());
        }
    }

    /// The next batch: what a failed commit left, then up to [`MAX_BATCH`] queued operations.
    /// Waits for the first operation unless the backend has work of its own. `None` once every
    /// sender is gone.
    fn next_batch(&mut self) -> Option<Vec<Op>> {
        loop {
            let background = self.backend.background();
            let first = match background {
                Background::Idle => Some(self.ops.blocking_recv()?),
                Background::Waiting | Background::Ready => match self.ops.try_recv() {
                    Ok(op) => Some(op),
                    Err(mpsc::error::TryRecvError::Empty) => None,
                    Err(mpsc::error::TryRecvError::Disconnected) => return None,
                },
            };
            if first.is_none() && self.carried.is_empty() && background == Background::Waiting {
                // An operation waits up to this pause before the writer looks.
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            let mut batch = std::mem::take(&mut self.carried);
            batch.extend(first);
            while batch.len() < MAX_BATCH {
                match self.ops.try_recv() {
                    Ok(op) => batch.push(op),
                    Err(_) => break,
                }
            }
            return Some(batch);
        }
    }

    /// Commits `batch`; a failed commit changes nothing, so the same batch is tried again a few
    /// times before it is given up (a full disk, say) and a passing hiccup loses nothing.
    fn commit(&mut self, batch: &[Op]) -> bool {
        if !self.commit_delay.is_zero() && !batch.is_empty() {
            std::thread::sleep(self.commit_delay);
        }
        let mut result = self.backend.commit(batch);
        for pause in COMMIT_RETRY_PAUSES {
            if result.is_ok() {
                break;
            }
            std::thread::sleep(pause);
            result = self.backend.commit(batch);
        }
        match result {
            Ok(()) => {
                let now = crate::clock::Clock::now(&crate::clock::SystemClock) / 1000;
                self.health.last_commit.store(now, Ordering::Relaxed);
                self.health.commits.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(err) => {
                self.health.write_errors.fetch_add(1, Ordering::Relaxed);
                error!(error = %crate::ErrorChain(&*err), ops = batch.len(), "state commit failed; these changes are not durable");
                false
            }
        }
    }

    /// Records what `batch`'s commit (`ok` or not) settled, answers its flushes, and keeps its
    /// refreshes for the next batch if it failed. Returns the close request, if the batch had one.
    fn settle(&mut self, batch: Vec<Op>, ok: bool) -> Option<oneshot::Sender<()>> {
        let mut closing = None;
        let mut flushes = Vec::new();
        for op in batch {
            match op {
                Op::Pin { seq, .. } => {
                    self.committed.insert(seq);
                    if !ok {
                        self.failed.lock().unwrap_or_else(|p| p.into_inner()).insert(seq);
                    }
                }
                Op::Flush(done) => flushes.push(done),
                Op::Close(done) => closing = Some(done),
                Op::Touch(touches) if !ok => self.carried.push(Op::Touch(touches)),
                _ => {}
            }
        }
        while self.committed.remove(&(self.watermark + 1)) {
            self.watermark += 1;
        }
        self.settled.send_replace(self.watermark);
        // Answered last, so whoever waited on a flush also sees the pins in it as settled.
        for done in flushes {
            let _ = done.send(ok);
        }
        closing
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A backend that keeps what it committed in memory and refuses commits while `down`.
    struct Flaky {
        down: Arc<std::sync::atomic::AtomicBool>,
        committed: Arc<Mutex<Vec<String>>>,
    }

    impl Backend for Flaky {
        fn commit(&mut self, batch: &[Op]) -> Result<(), BackendError> {
            if self.down.load(Ordering::Relaxed) {
                return Err("disk full".into());
            }
            let mut committed = self.committed.lock().unwrap();
            for op in batch {
                match op {
                    Op::Pin { pin, .. } => committed.push(format!("pin {}", pin.key)),
                    Op::Touch(touches) => {
                        touches.iter().for_each(|(k, t)| committed.push(format!("touch {k} {t}")))
                    }
                    _ => {}
                }
            }
            Ok(())
        }

        fn close(self: Box<Self>, unsaved: &[Op]) {
            assert!(unsaved.is_empty(), "refreshes left unsaved: {unsaved:?}");
        }
    }

    fn pin(key: &str) -> StoredPin {
        StoredPin { key: key.into(), pool: PoolName::V1, first_seen: 1, last_seen: 1 }
    }

    #[tokio::test]
    async fn a_batch_that_cannot_be_committed_fails_its_pins_and_carries_its_refreshes() {
        let down = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let committed = Arc::new(Mutex::new(Vec::new()));
        let backend = Flaky { down: down.clone(), committed: committed.clone() };
        let health = Arc::new(StoreHealth::default());
        let store = Store::start("memory".into(), Box::new(backend), health.clone(), Duration::ZERO).unwrap();

        let seq = store.next_seq();
        store.send(Op::Pin { pin: pin("lost"), seq });
        store.send(Op::Touch(vec![("kept".into(), 7)]));
        assert!(!store.flush().await, "a flush reports the failed commit");
        assert!(store.is_settled(seq), "a failed pin is settled: nobody waits for it forever");
        assert!(!store.settle(seq, Duration::from_secs(1)).await, "but it is not durable");
        assert_eq!(health.write_errors.load(Ordering::Relaxed), 1, "one batch, tried four times");

        down.store(false, Ordering::Relaxed);
        let seq = store.next_seq();
        store.send(Op::Pin { pin: pin("made"), seq });
        assert!(store.flush().await);
        assert!(store.settle(seq, Duration::from_secs(1)).await);
        assert_eq!(
            *committed.lock().unwrap(),
            ["touch kept 7", "pin made"],
            "the refresh went with the next batch"
        );
        store.close().await;
    }
}
