//! Accepts client connections and serves HTTP/1.1 and HTTP/2 on them: h2c (prior knowledge) on
//! plain TCP, ALPN-negotiated over TLS.
//!
//! The accept loop survives accept errors (a full file-descriptor table must not stop the proxy)
//! and, on shutdown, stops accepting and lets open connections finish within the grace period.
//! What happens to each request is [`crate::proxy`]'s business.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{Notify, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use crate::config::ClientConfig;
use crate::h1::Rewind;
use crate::metrics::Metrics;
use crate::proxy::{error_response, Body, ClientConn, H1Plan, Peer, Proxy, ProxyError};

/// How long connections accepted just before a stop get to send their first request before the
/// drain closes idle connections.
const ACCEPT_LINGER: Duration = Duration::from_millis(250);

/// Connections the kernel queues for a listener until they are accepted (it caps this at
/// `net.core.somaxconn`). A burst of new connections, such as clients coming back after a load
/// balancer fails over, waits here: past a full queue the kernel drops handshakes, and a client
/// tries again only a second later. The runtime's own bind queues 128.
const LISTEN_BACKLOG: u32 = 4096;

/// A listening socket on `addr`, with room for [`LISTEN_BACKLOG`] queued connections.
pub(crate) fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    // As the runtime's bind does: a restarted proxy binds again while the connections of the
    // last one are in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Gives a listening socket bound elsewhere (taken over from a running process, which may have
/// bound it with a smaller queue) room for [`LISTEN_BACKLOG`] queued connections: on a
/// listening socket, `listen` again only sets the queue's length.
pub(crate) fn widen_backlog(listener: &TcpListener) -> io::Result<()> {
    Ok(rustix::net::listen(listener, LISTEN_BACKLOG as i32)?)
}

/// How long a fast-path connection waits for its next request before it gives its buffers back
/// (about 10 KiB); they are taken again when the request comes.
const BUFFERS_KEPT_IDLE: Duration = Duration::from_secs(1);

/// How long the accept loop pauses after a resource error such as EMFILE before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The proxy once it is ready. During a takeover the listeners accept before the state store is
/// free; requests wait here (up to `patience`) instead of failing.
pub(crate) struct Gate {
    proxy: std::sync::OnceLock<Arc<Proxy>>,
    opened: tokio::sync::Notify,
    patience: std::time::Duration,
}

impl Gate {
    pub(crate) fn new(patience: std::time::Duration) -> Arc<Gate> {
        Arc::new(Gate { proxy: std::sync::OnceLock::new(), opened: tokio::sync::Notify::new(), patience })
    }

    pub(crate) fn open(&self, proxy: Arc<Proxy>) {
        let _ = self.proxy.set(proxy);
        self.opened.notify_waiters();
    }

    /// The proxy if it is ready.
    pub(crate) fn proxy_now(&self) -> Option<&Arc<Proxy>> {
        self.proxy.get()
    }

    /// The proxy, waiting for it while it starts; `None` if it did not come in time.
    pub(crate) async fn proxy(&self) -> Option<&Arc<Proxy>> {
        if let Some(proxy) = self.proxy.get() {
            return Some(proxy);
        }
        let wait = async {
            loop {
                let opened = self.opened.notified();
                tokio::pin!(opened);
                opened.as_mut().enable();
                if let Some(proxy) = self.proxy.get() {
                    return proxy;
                }
                opened.await;
            }
        };
        tokio::time::timeout(self.patience, wait).await.ok()
    }

    /// Answers `req` with the proxy, or with 503 `starting` if it is not ready in time.
    pub(crate) async fn handle(&self, req: Request<Incoming>, peer: &Peer) -> Response<Body> {
        match self.proxy().await {
            Some(proxy) => proxy.handle(req, peer).await,
            None => error_response(&ProxyError::Starting, None, req.version()),
        }
    }
}

/// Connection-level settings for client connections.
fn http_builder(client: &ClientConfig) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // Bounds reading a request head, and an idle keep-alive connection's wait for the next.
        .header_read_timeout(client.header_read_timeout)
        // The exact head-size limit is checked per request so the 431 can name its cause; this
        // buffer bound only stops a client from making the parser hold more than that.
        .max_buf_size((client.max_header_bytes * 2).max(64 * 1024))
        // The upstream's Date passes through as it is; the fast path adds none either.
        .auto_date_header(false);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(client.max_header_bytes * 2).unwrap_or(u32::MAX))
        // Each stream is an upstream request: one connection may not have more than this open.
        .max_concurrent_streams(client.max_concurrent_streams)
        // A peer that stops answering PINGs is gone, even with streams open.
        .keep_alive_interval(client.header_read_timeout)
        .keep_alive_timeout(client.header_read_timeout)
        .auto_date_header(false);
    builder
}

/// Serves `listener` until `shutdown` fires, then waits up to `grace` for open connections.
pub(crate) async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    gate: Arc<Gate>,
    metrics: Arc<Metrics>,
    client: &ClientConfig,
    shutdown: CancellationToken,
    grace: Duration,
) {
    // Accepted sockets stay off the runtime's event loop until something has to wait on them
    // (`h1::ClientStream`), so the listener is accepted from with a plain accept4.
    let listener = match listener.into_std().and_then(|listener| {
        // SAFETY: the std listener owns its socket, and the `AsyncFd` owns the listener until
        // it is dropped: the descriptor is neither closed nor replaced while registered.
        Ok(unsafe { AsyncFd::register(listener)? })
    }) {
        Ok(listener) => listener,
        Err(err) => {
            error!(error = %err, "cannot watch the listening socket; the data plane is not serving");
            return;
        }
    };
    // Shared: only a connection that goes to hyper needs it, and then as its own copy.
    let builder = Arc::new(http_builder(client));
    // The last client's address as `X-Forwarded-For` renders it: consecutive connections tend
    // to come from the same address (a load balancer in front, a busy client).
    let mut last_peer: Option<Peer> = None;
    let shutdown = shutdown.cancelled();
    tokio::pin!(shutdown);
    let slots = Arc::new(Semaphore::new(client.max_connections));
    // Every connection's task.
    let connections = TaskTracker::new();
    // Fired when the proxy stops accepting: idle connections close, busy ones after their
    // current request (hyper's are shut down gracefully).
    let draining = CancellationToken::new();
    // Fired when the grace period is over: connections still open are dropped.
    let hard_stop = CancellationToken::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = accept(&listener) => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    back_off(err).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            metrics.client_rejected.max_connections.inc();
            if let Ok(stream) = TcpStream::from_std(stream) {
                tokio::spawn(refuse(stream, TOO_MANY_CONNECTIONS));
            }
            continue;
        };
        // The fast path turns Nagle's algorithm off itself, once a connection writes twice
        // (`h1::ClientStream`); TLS and hyper write as they please.
        if tls.is_some() {
            if let Err(err) = stream.set_nodelay(true) {
                debug!(peer = %peer, error = %err, "could not set TCP_NODELAY");
            }
        }
        let addr = peer;
        let peer = match last_peer.take() {
            Some(last) if last.addr.ip() == addr.ip() => Peer { addr, ip: last.ip },
            _ => Peer::new(addr),
        };
        last_peer = Some(peer.clone());
        let connection = Connection {
            builder: builder.clone(),
            gate: gate.clone(),
            metrics: metrics.clone(),
            peer,
            hard_stop: hard_stop.clone(),
            draining: draining.clone(),
            header_read_timeout: client.header_read_timeout,
            send_timeout: client.send_timeout,
            max_head_bytes: client.max_header_bytes * 2,
        };
        let tls = tls.clone();
        let handshake_timeout = client.header_read_timeout;
        // A connection's future is kilobytes (hyper's and TLS's parts are boxed inside it, but
        // the fast path's own state is still large). Boxed, the runtime moves a pointer: it
        // moves a task's future into the task, and writes the task's stage over it as it ends,
        // each time a copy of the whole future (profiled in benches/compare.sh scenario (d), a
        // new connection per request).
        connections.spawn(Box::pin(async move {
            let _slot = slot;
            match tls {
                None => connection.serve_h1(stream).await,
                Some(acceptor) => {
                    Box::pin(async move {
                        let Ok(stream) = TcpStream::from_std(stream) else { return };
                        match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                            Ok(Ok(tls_stream)) => {
                                let h2 = tls_stream.get_ref().1.alpn_protocol() == Some(b"h2");
                                connection.serve(tls_stream, h2).await
                            }
                            Ok(Err(err)) => debug!(peer = %addr, error = %err, "TLS handshake failed"),
                            Err(_) => {
                                connection.metrics.client_rejected.header_timeout.inc();
                                debug!(peer = %addr, "TLS handshake timed out");
                            }
                        }
                    })
                    .await
                }
            }
        }));
    }
    drop(listener);
    // A connection accepted a moment ago may not have sent its request yet, and a graceful
    // shutdown closes such "idle" connections at once: give them time to be read first.
    tokio::time::sleep(ACCEPT_LINGER.min(grace)).await;
    info!(open_connections = connections.len(), grace = ?grace, "stopped accepting; draining connections");
    draining.cancel();
    connections.close();
    tokio::select! {
        _ = connections.wait() => info!("all client connections finished"),
        _ = tokio::time::sleep(grace) => {
            warn!("grace period over; closing the remaining connections");
            hard_stop.cancel();
        }
    }
}

/// Everything one accepted connection needs to be served.
struct Connection {
    builder: Arc<auto::Builder<TokioExecutor>>,
    gate: Arc<Gate>,
    metrics: Arc<Metrics>,
    peer: Peer,
    hard_stop: CancellationToken,
    draining: CancellationToken,
    header_read_timeout: Duration,
    send_timeout: Duration,
    /// Buffered bytes without a complete head after which the connection goes to hyper, which
    /// answers 431.
    max_head_bytes: usize,
}

/// The HTTP/2 connection preface (RFC 9113 §3.4): a client speaking h2c with prior knowledge.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

impl Connection {
    /// Serves a plain-TCP connection on the HTTP/1.1 fast path ([`crate::h1`]) for as long as
    /// its requests allow, then hands it, with the bytes already read, to hyper.
    async fn serve_h1(self, stream: std::net::TcpStream) {
        let mut conn = ClientConn::new(stream, self.peer.clone(), self.send_timeout);
        let Some(proxy) = self.gate.proxy_now().cloned() else {
            // Starting up: hyper's path waits for the proxy or answers 503. What the client
            // sends first says whether it speaks HTTP/2.
            if let Ok(Ok(1..)) = tokio::time::timeout(self.header_read_timeout, conn.fill()).await {
                return Box::pin(self.hand_over(conn)).await;
            }
            return;
        };
        conn.read_now();
        // The wait for the next request is bounded by `header_read_timeout` from
        // `waiting_since`. The timer is not moved on every request: when it fires early it is
        // set again for what is left, which costs one timer move per timeout rather than per
        // request.
        // The same timer gives an idle connection's buffers back once it has waited
        // `BUFFERS_KEPT_IDLE`.
        let mut waiting_since = tokio::time::Instant::now();
        let deadline =
            tokio::time::sleep_until(waiting_since + BUFFERS_KEPT_IDLE.min(self.header_read_timeout));
        // Each registers with its token once per connection, not once per wait.
        let draining = self.draining.clone().cancelled_owned();
        let hard_stop = self.hard_stop.clone().cancelled_owned();
        tokio::pin!(deadline, draining, hard_stop);
        loop {
            let (snapshot, request) = loop {
                if !conn.buf.is_empty() {
                    let snapshot = proxy.snapshot();
                    match proxy.plan_h1(&snapshot, &mut conn) {
                        H1Plan::Ready(request) => break (snapshot, request),
                        H1Plan::Unsupported => return Box::pin(self.hand_over(conn)).await,
                        H1Plan::Partial if conn.buf.len() > self.max_head_bytes => {
                            return Box::pin(self.hand_over(conn)).await
                        }
                        H1Plan::Partial => {}
                    }
                }
                let released = conn.released();
                tokio::select! {
                    biased;
                    read = conn.fill() => match read {
                        Ok(0) | Err(_) => return,
                        // Back from a long wait, with its buffers again: they are kept while
                        // the connection is busy.
                        Ok(_) if released => {
                            let due = waiting_since + self.header_read_timeout;
                            deadline.as_mut().reset((tokio::time::Instant::now() + BUFFERS_KEPT_IDLE).min(due));
                        }
                        Ok(_) => {}
                    },
                    _ = &mut deadline => {
                        let now = tokio::time::Instant::now();
                        let due = waiting_since + self.header_read_timeout;
                        if now < due {
                            let release = waiting_since + BUFFERS_KEPT_IDLE;
                            if conn.buf.is_empty() && !conn.released() && now >= release {
                                conn.release_buffers();
                            }
                            let holding = conn.buf.is_empty() && !conn.released();
                            deadline.as_mut().reset(if holding { release.min(due) } else { due });
                            continue;
                        }
                        if conn.buf.is_empty() {
                            // An idle keep-alive connection: between requests.
                            return close_idle(conn.stream, &self.hard_stop).await;
                        }
                        self.metrics.client_rejected.header_timeout.inc();
                        debug!(peer = %self.peer.addr, "request head not complete within header_read_timeout");
                        return;
                    }
                    _ = &mut draining, if conn.buf.is_empty() => {
                        return close_idle(conn.stream, &self.hard_stop).await;
                    }
                    _ = &mut hard_stop => return,
                }
            };
            let keep = tokio::select! {
                keep = proxy.serve_h1(&snapshot, request, &mut conn, &self.draining) => keep,
                _ = &mut hard_stop => false,
            };
            if !keep {
                // An exchange that used every byte the client sent ends with a plain close, as
                // after `Connection: close`; bytes left over are said goodbye to with a FIN
                // first.
                if !conn.buf.is_empty() {
                    conn.stream.shutdown();
                }
                return;
            }
            waiting_since = tokio::time::Instant::now();
        }
    }

    /// Hands a fast-path connection to hyper, bytes read so far included. A client that has sent
    /// only part of the HTTP/2 preface is read until it is whole, so that an HTTP/2 connection is
    /// known for one (and gets the idle limit hyper's HTTP/1.1 side has of its own).
    async fn hand_over(self, mut conn: ClientConn) {
        while conn.buf.len() < H2_PREFACE.len() && H2_PREFACE.starts_with(&conn.buf) {
            match tokio::time::timeout(self.header_read_timeout, conn.fill()).await {
                Ok(Ok(1..)) => {}
                _ => return,
            }
        }
        let ClientConn { stream, buf, .. } = conn;
        let Ok(stream) = stream.into_inner() else { return };
        let h2 = buf.starts_with(H2_PREFACE);
        self.serve(Rewind::new(buf.freeze(), stream), h2).await
    }

    /// Serves HTTP/1.1 or HTTP/2 (`h2`) on `io` with hyper until the client leaves, a graceful
    /// stop finishes it, or the grace period ends. Hyper bounds an HTTP/1.1 client's heads and
    /// idle time itself; [`Activity`] adds what it does not: an HTTP/2 connection with no
    /// stream open closes after `header_read_timeout`, and a response that makes no progress
    /// towards the client for `send_timeout` closes the connection (HTTP/1.1 and HTTP/2).
    async fn serve<I>(self, io: I, h2: bool)
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let Connection {
            builder,
            gate,
            metrics,
            peer,
            hard_stop,
            draining,
            header_read_timeout,
            send_timeout,
            ..
        } = self;
        let mut builder = Arc::unwrap_or_clone(builder);
        let activity = Arc::new(Activity::new());
        let peer_addr = peer.addr;
        let client = Arc::new(peer);
        let watched = activity.clone();
        let service = service_fn(move |req| {
            let (gate, client, activity) = (gate.clone(), client.clone(), watched.clone());
            async move {
                let request = activity.begin();
                let response = gate.handle(req, &client).await;
                Ok::<_, Infallible>(response.map(|body| Watched { body, request, sending: false }))
            }
        });
        // A connection that reaches hyper after the stop began (handed over by the fast path, or
        // out of a TLS handshake) would be shut down gracefully before its first request is
        // read. It gets its request answered, without keep-alive, instead.
        let graceful = !draining.is_cancelled();
        if !graceful {
            builder.http1().keep_alive(false);
        }
        let connection = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
        tokio::pin!(connection);
        let idle_limit = h2.then_some(header_read_timeout);
        // Set once the connection is told to finish: by the stop, or for being idle.
        let mut finishing = false;
        // After an idle close began, how long the connection gets to end by itself.
        let mut close_by = None;
        let ended = loop {
            tokio::select! {
                ended = connection.as_mut() => break Some(ended),
                _ = draining.cancelled(), if graceful && !finishing => {
                    connection.as_mut().graceful_shutdown();
                    finishing = true;
                }
                verdict = activity.watch(idle_limit, send_timeout), if !finishing => match verdict {
                    Verdict::Idle => {
                        debug!(peer = %peer_addr, "HTTP/2 connection idle; closing it");
                        connection.as_mut().graceful_shutdown();
                        finishing = true;
                        close_by = Some(tokio::time::Instant::now() + send_timeout);
                    }
                    Verdict::Stalled => {
                        metrics.client_rejected.send_timeout.inc();
                        debug!(peer = %peer_addr, "no progress writing to the client within send_timeout; closing");
                        break Some(Ok(()));
                    }
                },
                _ = sleep_until_some(close_by) => break Some(Ok(())),
                _ = hard_stop.cancelled() => break None,
            }
        };
        match ended {
            Some(Err(err)) => {
                // What hyper refused before the proxy saw a request: a head it could not read
                // (it answers 400, 414 or 431 itself) or one that came too slowly.
                if let Some(err) = err.downcast_ref::<hyper::Error>() {
                    if err.is_timeout() {
                        metrics.client_rejected.header_timeout.inc();
                    } else if err.is_parse_too_large() {
                        metrics.client_rejected.headers_too_large.inc();
                    } else if err.is_parse() {
                        metrics.client_rejected.bad_request.inc();
                    }
                }
                debug!(peer = %peer_addr, error = %err, "client connection ended with an error");
            }
            Some(Ok(())) => {}
            None => debug!(peer = %peer_addr, "connection closed at the end of the grace period"),
        }
    }
}

/// Sleeps until `deadline`; never, without one.
async fn sleep_until_some(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// What a hyper-served connection is doing, for [`Activity::watch`]: requests in flight (from
/// the service call until hyper has taken the last of the response body; HTTP/2 may still be
/// sending it) and responses being written out.
struct Activity {
    base: tokio::time::Instant,
    in_flight: AtomicUsize,
    /// Response bodies whose last frame has been taken and not yet followed by a request for
    /// the next: the connection is writing to the client (or the client does not read).
    sending: AtomicUsize,
    /// Milliseconds since `base` when a request last ended (the connection is idle from then on
    /// if none is in flight).
    idle_since: AtomicU64,
    /// Milliseconds since `base` of the last frame taken from a response body.
    progress_at: AtomicU64,
    changed: Notify,
}

/// Why [`Activity::watch`] gave up on a connection.
enum Verdict {
    /// No request in flight for the idle limit.
    Idle,
    /// Responses waiting on the client for the send timeout.
    Stalled,
}

impl Activity {
    fn new() -> Self {
        Activity {
            base: tokio::time::Instant::now(),
            in_flight: AtomicUsize::new(0),
            sending: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
            progress_at: AtomicU64::new(0),
            changed: Notify::new(),
        }
    }

    fn now(&self) -> u64 {
        self.base.elapsed().as_millis() as u64
    }

    fn at(&self, ms: u64) -> tokio::time::Instant {
        self.base + Duration::from_millis(ms)
    }

    /// Counts a request in flight until the returned guard (kept by its response body) drops.
    fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(self.clone())
    }

    fn sending(&self, now_sending: bool) {
        self.progress_at.store(self.now(), Ordering::SeqCst);
        if now_sending {
            if self.sending.fetch_add(1, Ordering::SeqCst) == 0 {
                self.changed.notify_one();
            }
        } else {
            self.sending.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Resolves when the connection has been idle for `idle_limit` (if any) or its responses
    /// have waited on the client for `send_timeout`.
    async fn watch(&self, idle_limit: Option<Duration>, send_timeout: Duration) -> Verdict {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let deadline = if self.in_flight.load(Ordering::SeqCst) == 0 {
                idle_limit
                    .map(|limit| (self.at(self.idle_since.load(Ordering::SeqCst)) + limit, Verdict::Idle))
            } else if self.sending.load(Ordering::SeqCst) > 0 {
                Some((self.at(self.progress_at.load(Ordering::SeqCst)) + send_timeout, Verdict::Stalled))
            } else {
                None
            };
            match deadline {
                Some((at, verdict)) if at <= tokio::time::Instant::now() => return verdict,
                Some((at, _)) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(at) => {}
                        _ = changed => {}
                    }
                }
                None => changed.await,
            }
        }
    }
}

/// A request in flight on a hyper-served connection.
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let activity = &self.0;
        // Stored first: a watcher that sees no request in flight must see when that began.
        activity.idle_since.store(activity.now(), Ordering::SeqCst);
        if activity.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            activity.changed.notify_one();
        }
    }
}

/// A response body on a hyper-served connection, reporting to the connection's [`Activity`]
/// whether hyper is waiting for it (the upstream) or it is waiting for hyper (the client).
struct Watched {
    body: Body,
    request: InFlight,
    /// A frame was taken and the next has not been asked for yet.
    sending: bool,
}

impl hyper::body::Body for Watched {
    type Data = bytes::Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, Self::Error>>> {
        let this = &mut *self;
        if std::mem::take(&mut this.sending) {
            this.request.0.sending(false);
        }
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        if let Poll::Ready(Some(Ok(_))) = &polled {
            this.sending = true;
            this.request.0.sending(true);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        if self.sending {
            self.request.0.sending(false);
        }
    }
}

/// How long a connection closed between requests goes on reading what the client sends.
const CLOSE_LINGER: Duration = Duration::from_millis(500);

/// Closes a connection between requests. A keep-alive client may be sending its next request
/// just then; closed with that request unread, the socket would answer with a reset, which
/// clients report as an error. So the proxy's end goes first, and whatever arrives is read and
/// dropped until the client closes too (or [`CLOSE_LINGER`] passes): the client sees the
/// connection closed before an answer, and retries an idempotent request (RFC 9112 §9.3.1).
async fn close_idle(stream: crate::h1::ClientStream, hard_stop: &CancellationToken) {
    let Ok(mut stream) = stream.into_registered() else { return };
    if stream.shutdown().await.is_err() {
        return;
    }
    let mut sink = [0u8; 1024];
    let drain = async { while let Ok(1..) = stream.read(&mut sink).await {} };
    tokio::select! {
        _ = tokio::time::timeout(CLOSE_LINGER, drain) => {}
        _ = hard_stop.cancelled() => {}
    }
}

/// The answer to a connection over `client.max_connections`.
const TOO_MANY_CONNECTIONS: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nx-rollout-error: too_many_connections\r\n\
content-type: text/plain; charset=utf-8\r\ncontent-length: 21\r\nconnection: close\r\n\r\ntoo many connections\n";

/// Answers a connection over a connection limit with `answer` (a whole response) and closes it.
pub(crate) async fn refuse(mut stream: TcpStream, answer: &'static [u8]) {
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(answer)).await;
    let _ = stream.shutdown().await;
}

/// With `on`, the kernel hands a new connection over only once its first bytes have arrived, or
/// after about a second (one SYN-ACK retransmission) if none do: the request is read straight
/// after accept, without a wait on the event loop, and a silent connection takes no place under
/// `client.max_connections` meanwhile. NGINX's `listen … deferred` sets the same.
#[cfg(target_os = "linux")]
pub(crate) fn defer_accept(listener: &TcpListener, on: bool) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let seconds: libc::c_int = on.into();
    // SAFETY: the descriptor is the listener's, open for the call; the value is a `c_int` and
    // the length given is its size.
    let set = unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            std::ptr::from_ref(&seconds).cast(),
            std::mem::size_of_val(&seconds) as libc::socklen_t,
        )
    };
    if set == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Elsewhere connections are accepted at once.
#[cfg(not(target_os = "linux"))]
pub(crate) fn defer_accept(_listener: &TcpListener, _on: bool) -> io::Result<()> {
    Ok(())
}

/// Accepts the next connection: non-blocking, close-on-exec, not on the event loop. Each accept
/// spends the task's budget, so a burst of queued connections lets the runtime run the
/// connections already accepted (and their timers) every so often, as tokio's own accept does.
async fn accept(listener: &AsyncFd<std::net::TcpListener>) -> io::Result<(std::net::TcpStream, SocketAddr)> {
    listener.async_io(Interest::READABLE, accept_now).await
}

/// One `accept4`, the socket non-blocking and close-on-exec from the start.
#[cfg(target_os = "linux")]
fn accept_now(listener: &std::net::TcpListener) -> io::Result<(std::net::TcpStream, SocketAddr)> {
    let flags = rustix::net::SocketFlags::NONBLOCK | rustix::net::SocketFlags::CLOEXEC;
    let (socket, addr) = rustix::net::acceptfrom_with(listener, flags)?;
    // Not expected of a TCP listener; skipped like a connection reset before its accept.
    let addr = addr.and_then(|addr| SocketAddr::try_from(addr).ok()).ok_or_else(|| {
        io::Error::new(io::ErrorKind::ConnectionAborted, "accepted a connection without an IP peer address")
    })?;
    Ok((std::net::TcpStream::from(socket), addr))
}

/// Where there is no `accept4`: accept, then make the socket non-blocking.
#[cfg(not(target_os = "linux"))]
fn accept_now(listener: &std::net::TcpListener) -> io::Result<(std::net::TcpStream, SocketAddr)> {
    let (socket, addr) = listener.accept()?;
    socket.set_nonblocking(true)?;
    Ok((socket, addr))
}

/// Errors about one connection are skipped at once; resource exhaustion gets a short pause so
/// the loop does not spin while descriptors are short.
pub(crate) async fn back_off(err: io::Error) {
    match err.kind() {
        io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset | io::ErrorKind::Interrupted => {
            debug!(error = %err, "accept failed for one connection")
        }
        _ => {
            warn!(error = %err, "accept failed; pausing before the next accept");
            tokio::time::sleep(ACCEPT_BACKOFF).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Connects to `addr`, failing after a few seconds rather than the kernel's two minutes
    /// when the listener's queue is full.
    fn connect(addr: SocketAddr) -> io::Result<std::net::TcpStream> {
        std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3))
    }

    /// Opens `count` connections to `addr`, each of which must complete its handshake (be
    /// queued, when nothing accepts), well past the runtime's default queue of 128. Needs
    /// `net.core.somaxconn` of `count` or more (Linux's default has been 4096 since 5.4).
    fn queue(addr: SocketAddr, count: usize) -> Vec<std::net::TcpStream> {
        (0..count)
            .map(|i| connect(addr).unwrap_or_else(|err| panic!("connection {i} was not queued: {err}")))
            .collect()
    }

    /// New connections wait in the kernel's queue while nothing accepts them.
    #[tokio::test]
    async fn a_listener_queues_a_burst_of_connections_before_it_accepts() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        queue(listener.local_addr().unwrap(), 200);
    }

    #[tokio::test]
    async fn a_listener_taken_over_with_a_short_queue_gets_the_long_one() {
        // The runtime's bind queues 128, as a process before this one may have bound it.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        widen_backlog(&listener).unwrap();
        queue(listener.local_addr().unwrap(), 200);
    }

    /// A burst of queued connections is accepted a slice at a time: each accept spends the
    /// task's budget, so the runtime gets to run other tasks (connections already accepted,
    /// timers) between slices instead of only after the queue is empty.
    #[tokio::test]
    async fn a_burst_of_queued_connections_lets_other_tasks_run_between_accepts() {
        // More than the 128 accepts a task's budget allows before it yields.
        const BURST: usize = 200;
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap().into_std().unwrap();
        let addr = listener.local_addr().unwrap();
        // All queued before the first accept: loopback completes each handshake at once.
        let clients = queue(addr, BURST);
        // SAFETY: the `AsyncFd` owns the listener, and with it its descriptor, until it is dropped.
        let listener = unsafe { AsyncFd::register(listener) }.unwrap();
        // The first accept waits for the event loop to report the listener readable; from then
        // on each accept finds a connection at once.
        accept(&listener).await.unwrap();
        let accepted = Arc::new(AtomicUsize::new(1));
        let other = tokio::spawn({
            let accepted = accepted.clone();
            async move { accepted.load(Ordering::Relaxed) }
        });
        for _ in 1..BURST {
            accept(&listener).await.unwrap();
            accepted.fetch_add(1, Ordering::Relaxed);
        }
        let ran_after = other.await.unwrap();
        assert!(ran_after < BURST, "another task ran only after all {BURST} connections were accepted");
        drop(clients);
    }
}
