//! Wall-clock time for pins and the drain signal, injectable so tests can move it.
//!
//! Pins and the drain clock are stored across restarts, so they use wall-clock time (Unix
//! milliseconds), not a monotonic instant. Timeouts on the request path use tokio's timers
//! instead; they are not this module's concern.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch.
pub(crate) type UnixMillis = u64;

pub trait Clock: Send + Sync + std::fmt::Debug {
    fn now(&self) -> UnixMillis;
}

/// The system's wall clock, on Linux read at the kernel's tick resolution (a few milliseconds), which is
/// far finer than pins (seconds) need and several times cheaper than a precise read.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> UnixMillis {
        #[cfg(target_os = "linux")]
        {
            let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
            // SAFETY: `ts` is a valid, writable timespec; CLOCK_REALTIME_COARSE exists on Linux.
            if unsafe { libc::clock_gettime(libc::CLOCK_REALTIME_COARSE, &mut ts) } == 0 {
                return ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000;
            }
        }
        // Elsewhere (and should the coarse clock ever fail) the precise clock.
        SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
    }
}

/// A clock that only moves when told to; clones share the same time.
#[derive(Debug, Clone)]
pub struct ManualClock(Arc<AtomicU64>);

impl ManualClock {
    pub(crate) fn new(now: UnixMillis) -> Self {
        ManualClock(Arc::new(AtomicU64::new(now)))
    }

    /// Starts at the current wall-clock time.
    pub fn starting_now() -> Self {
        ManualClock::new(SystemClock.now())
    }

    pub fn advance(&self, by: Duration) {
        self.0.fetch_add(by.as_millis() as u64, Ordering::SeqCst);
    }

    pub fn now_ms(&self) -> UnixMillis {
        self.0.load(Ordering::SeqCst)
    }
}

impl Clock for ManualClock {
    fn now(&self) -> UnixMillis {
        self.now_ms()
    }
}

pub type SharedClock = Arc<dyn Clock>;
