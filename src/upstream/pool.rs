//! One upstream's connections: the idle keep-alive ones of both paths, and the cap on how many
//! may be open at once (`upstream.max_connections_per_upstream`).
//!
//! The cap is what stops one client from turning into hundreds of upstream connections (an
//! HTTP/2 connection opening stream after stream, a burst of new clients): past it, a request
//! waits for a connection to come back idle or to close, for at most the connect timeout, and
//! then gets [`super::UpstreamError::Busy`]. How connections are used is [`super::fast`]'s and
//! hyper's business; this module only keeps them.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Context;
use std::time::{Duration, Instant};

use hyper::client::conn::http1;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use super::fast::UpstreamConn;
use super::UpstreamBody;

/// Idle connections of one upstream and the count of all its open ones.
#[derive(Debug)]
pub(crate) struct ConnPool {
    idle: Mutex<Vec<Idle>>,
    /// Connections of the HTTP/1.1 fast path, most recently used last.
    idle_h1: Mutex<Vec<(UpstreamConn, Instant)>>,
    max_idle: usize,
    idle_timeout: Duration,
    /// One permit per open connection, idle or busy, of either path.
    open: Arc<Semaphore>,
    /// Requests waiting at the cap, so a returned connection wakes one only when there is one.
    waiting: AtomicUsize,
    returned: Notify,
}

#[derive(Debug)]
struct Idle {
    sender: HyperConn,
    since: Instant,
}

/// A hyper client connection and its place under the cap, shared with the task that drives the
/// connection (and, after a protocol switch, with the tunnel that takes it over).
pub(crate) type HyperConn = (http1::SendRequest<UpstreamBody>, Arc<OwnedSemaphorePermit>);

/// What a request gets to send on: a connection that was idle, or the right to open one.
pub(crate) enum Slot<C> {
    Idle(C),
    /// Held by the new connection for as long as it is open.
    New(OwnedSemaphorePermit),
}

impl ConnPool {
    pub(crate) fn new(max_idle: usize, idle_timeout: Duration, max_open: usize) -> Self {
        ConnPool {
            idle: Mutex::new(Vec::new()),
            idle_h1: Mutex::new(Vec::new()),
            max_idle,
            idle_timeout,
            open: Arc::new(Semaphore::new(max_open)),
            waiting: AtomicUsize::new(0),
            returned: Notify::new(),
        }
    }

    /// An idle connection from `checkout`, or a permit to open a new one. At the cap, an idle
    /// connection of the other path is closed to make room; failing that, waits up to `patience`
    /// for a connection to come back or close. `None`: still at the cap after that.
    pub(crate) async fn slot<C>(
        &self,
        checkout: impl Fn(&Self) -> Option<C>,
        patience: Duration,
    ) -> Option<Slot<C>> {
        if let Some(conn) = checkout(self) {
            return Some(Slot::Idle(conn));
        }
        if let Ok(permit) = self.open.clone().try_acquire_owned() {
            return Some(Slot::New(permit));
        }
        // At the cap, which is rare: the waiting is boxed so that it does not make every
        // request's future larger.
        Box::pin(self.wait_for_slot(checkout, patience)).await
    }

    async fn wait_for_slot<C>(
        &self,
        checkout: impl Fn(&Self) -> Option<C>,
        patience: Duration,
    ) -> Option<Slot<C>> {
        // The idle connections left are the other path's (the caller's own checkout found
        // none): the oldest one makes room. A fast-path connection's permit is free at once,
        // hyper's once its connection task sees the sender gone. One is enough.
        let oldest_h1 = pop_oldest(&self.idle_h1);
        if oldest_h1.is_none() {
            drop(pop_oldest(&self.idle));
        }
        drop(oldest_h1);
        let _waiting = Waiting::new(&self.waiting);
        tokio::time::timeout(patience, async {
            loop {
                let returned = self.returned.notified();
                tokio::pin!(returned);
                returned.as_mut().enable();
                if let Some(conn) = checkout(self) {
                    return Slot::Idle(conn);
                }
                tokio::select! {
                    permit = self.open.clone().acquire_owned() => {
                        return Slot::New(permit.expect("the semaphore is never closed"));
                    }
                    _ = returned => {}
                }
            }
        })
        .await
        .ok()
    }

    fn wake_one_waiter(&self) {
        if self.waiting.load(Ordering::SeqCst) > 0 {
            self.returned.notify_one();
        }
    }

    /// The most recently used idle hyper connection that is still open.
    pub(crate) fn checkout(&self) -> Option<HyperConn> {
        let mut idle = lock(&self.idle);
        while let Some(conn) = idle.pop() {
            if !conn.sender.0.is_closed() && conn.since.elapsed() < self.idle_timeout {
                return Some(conn.sender);
            }
        }
        None
    }

    pub(crate) fn checkin(&self, sender: HyperConn) {
        if sender.0.is_closed() {
            return;
        }
        let mut idle = lock(&self.idle);
        if idle.len() < self.max_idle {
            idle.push(Idle { sender, since: Instant::now() });
            drop(idle);
            self.wake_one_waiter();
        }
    }

    /// The most recently used idle fast-path connection that nothing has arrived on, by the
    /// readiness the reactor has recorded (no system call): a close or stray bytes it has seen
    /// disqualify the connection. One that closes unseen is caught by the exchange itself.
    pub(crate) fn checkout_h1(&self) -> Option<UpstreamConn> {
        let mut idle = lock(&self.idle_h1);
        while let Some((conn, since)) = idle.pop() {
            let mut cx = Context::from_waker(std::task::Waker::noop());
            if since.elapsed() < self.idle_timeout && conn.is_quiet(&mut cx) {
                return Some(conn);
            }
        }
        None
    }

    pub(crate) fn checkin_h1(&self, conn: UpstreamConn) {
        let mut idle = lock(&self.idle_h1);
        // The oldest connections come first; those past the idle timeout are closed now rather
        // than held until a checkout reaches them.
        let now = Instant::now();
        let expired = idle
            .iter()
            .take_while(|(_, since)| now.saturating_duration_since(*since) >= self.idle_timeout)
            .count();
        idle.drain(..expired);
        if idle.len() < self.max_idle {
            idle.push((conn, now));
            drop(idle);
            self.wake_one_waiter();
        }
    }
}

/// Counts a request waiting at the cap for as long as it waits, however its wait ends.
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn new(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        Waiting(count)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn pop_oldest<T>(idle: &Mutex<Vec<T>>) -> Option<T> {
    let mut idle = lock(idle);
    (!idle.is_empty()).then(|| idle.remove(0))
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}
