//! Accepts client connections and serves HTTP/1.1 and HTTP/2 on them: h2c (prior knowledge) on
//! plain TCP, ALPN-negotiated over TLS.
//!
//! The accept loop survives accept errors (a full file-descriptor table must not stop the proxy)
//! and, on shutdown, stops accepting and lets open connections finish within the grace period.
//! What happens to each request is [`crate::proxy`]'s business.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::config::ClientConfig;
use crate::h1::Rewind;
use crate::metrics::Metrics;
use crate::proxy::{ClientConn, Gate, H1Plan, Peer};

/// How long connections accepted just before a stop get to send their first request before the
/// drain closes idle connections.
const ACCEPT_LINGER: Duration = Duration::from_millis(250);

/// How long the accept loop pauses after a resource error such as EMFILE before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Connection-level settings for client connections.
fn http_builder(client: &ClientConfig) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(client.header_read_timeout)
        // The exact head-size limit is checked per request so the 431 can name its cause; this
        // buffer bound only stops a client from making the parser hold more than that.
        .max_buf_size((client.max_header_bytes * 2).max(64 * 1024));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(client.max_header_bytes * 2).unwrap_or(u32::MAX));
    builder
}

/// Serves `listener` until `shutdown` fires, then waits up to `grace` for open connections.
pub async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    gate: Arc<Gate>,
    metrics: Arc<Metrics>,
    client: &ClientConfig,
    shutdown: CancellationToken,
    grace: Duration,
) {
    let builder = http_builder(client);
    let slots = Arc::new(Semaphore::new(client.max_connections));
    let graceful = GracefulShutdown::new();
    // Every connection's task; hyper's connections are also watched by `graceful`.
    let connections = TaskTracker::new();
    // Fired when the proxy stops accepting: idle fast-path connections close.
    let draining = CancellationToken::new();
    // Fired when the grace period is over: connections still open are dropped.
    let hard_stop = CancellationToken::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    back_off(err).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            metrics.client_rejected.max_connections.inc();
            tokio::spawn(refuse(stream));
            continue;
        };
        if let Err(err) = stream.set_nodelay(true) {
            debug!(peer = %peer, error = %err, "could not set TCP_NODELAY");
        }
        let connection = Connection {
            builder: builder.clone(),
            gate: gate.clone(),
            metrics: metrics.clone(),
            peer,
            watcher: graceful.watcher(),
            hard_stop: hard_stop.clone(),
            draining: draining.clone(),
            header_read_timeout: client.header_read_timeout,
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
                        match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                            Ok(Ok(tls_stream)) => connection.serve(tls_stream).await,
                            Ok(Err(err)) => debug!(peer = %peer, error = %err, "TLS handshake failed"),
                            Err(_) => {
                                connection.metrics.client_rejected.header_timeout.inc();
                                debug!(peer = %peer, "TLS handshake timed out");
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
    let finished = async {
        graceful.shutdown().await;
        connections.wait().await;
    };
    tokio::select! {
        _ = finished => info!("all client connections finished"),
        _ = tokio::time::sleep(grace) => {
            warn!("grace period over; closing the remaining connections");
            hard_stop.cancel();
        }
    }
}

/// Everything one accepted connection needs to be served.
struct Connection {
    builder: auto::Builder<TokioExecutor>,
    gate: Arc<Gate>,
    metrics: Arc<Metrics>,
    peer: SocketAddr,
    watcher: Watcher,
    hard_stop: CancellationToken,
    draining: CancellationToken,
    header_read_timeout: Duration,
    /// Buffered bytes without a complete head after which the connection goes to hyper, which
    /// answers 431.
    max_head_bytes: usize,
}

impl Connection {
    /// Serves a plain-TCP connection on the HTTP/1.1 fast path ([`crate::h1`]) for as long as
    /// its requests allow, then hands it, with the bytes already read, to hyper.
    async fn serve_h1(self, stream: TcpStream) {
        let Some(proxy) = self.gate.proxy_now().cloned() else {
            // Starting up: hyper's path waits for the proxy or answers 503.
            return Box::pin(self.serve(stream)).await;
        };
        let mut conn = ClientConn::new(stream, Peer::new(self.peer));
        let deadline = tokio::time::sleep(self.header_read_timeout);
        tokio::pin!(deadline);
        loop {
            deadline.as_mut().reset(tokio::time::Instant::now() + self.header_read_timeout);
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
                tokio::select! {
                    biased;
                    read = conn.fill() => match read {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    },
                    _ = &mut deadline => {
                        if conn.buf.is_empty() {
                            // An idle keep-alive connection: between requests.
                            return close_idle(conn.stream, &self.hard_stop).await;
                        }
                        self.metrics.client_rejected.header_timeout.inc();
                        debug!(peer = %self.peer, "request head not complete within header_read_timeout");
                        return;
                    }
                    _ = self.draining.cancelled(), if conn.buf.is_empty() => {
                        return close_idle(conn.stream, &self.hard_stop).await;
                    }
                    _ = self.hard_stop.cancelled() => return,
                }
            };
            let keep = tokio::select! {
                keep = proxy.serve_h1(&snapshot, request, &mut conn, &self.draining) => keep,
                _ = self.hard_stop.cancelled() => false,
            };
            if !keep {
                let _ = conn.stream.shutdown().await;
                return;
            }
        }
    }

    /// Hands a fast-path connection to hyper, bytes read so far included.
    async fn hand_over(self, conn: ClientConn) {
        let ClientConn { stream, buf, .. } = conn;
        self.serve(Rewind::new(buf.freeze(), stream)).await
    }

    /// Serves HTTP/1.1 or HTTP/2 on `io` until the client leaves, a graceful stop finishes it,
    /// or the grace period ends.
    async fn serve<I>(self, io: I)
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let Connection { mut builder, gate, metrics, peer, watcher, hard_stop, draining, .. } = self;
        let header_timeouts = metrics.client_rejected.header_timeout.clone();
        let client = Arc::new(Peer::new(peer));
        let service = service_fn(move |req| {
            let (gate, client) = (gate.clone(), client.clone());
            async move { Ok::<_, Infallible>(gate.handle(req, &client).await) }
        });
        // A connection that reaches hyper after the stop began (handed over by the fast path, or
        // out of a TLS handshake) would be shut down by the graceful watcher before its first
        // request is read. It gets its request answered, without keep-alive, instead.
        let watcher = (!draining.is_cancelled()).then_some(watcher);
        if watcher.is_none() {
            builder.http1().keep_alive(false);
        }
        let connection = builder.serve_connection_with_upgrades(TokioIo::new(io), service).into_owned();
        let ended = match watcher {
            Some(watcher) => tokio::select! {
                ended = watcher.watch(connection) => Some(ended),
                _ = hard_stop.cancelled() => None,
            },
            None => tokio::select! {
                ended = connection => Some(ended),
                _ = hard_stop.cancelled() => None,
            },
        };
        match ended {
            Some(Err(err)) => {
                if err.downcast_ref::<hyper::Error>().is_some_and(hyper::Error::is_timeout) {
                    header_timeouts.inc();
                }
                debug!(peer = %peer, error = %err, "client connection ended with an error");
            }
            Some(Ok(())) => {}
            None => debug!(peer = %peer, "connection closed at the end of the grace period"),
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
async fn close_idle(mut stream: TcpStream, hard_stop: &CancellationToken) {
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

/// Answers a connection over `client.max_connections` with a plain 503 and closes it.
async fn refuse(mut stream: TcpStream) {
    const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nx-rollout-error: too_many_connections\r\n\
content-type: text/plain; charset=utf-8\r\ncontent-length: 21\r\nconnection: close\r\n\r\ntoo many connections\n";
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(BUSY)).await;
    let _ = stream.shutdown().await;
}

/// Errors about one connection are skipped at once; resource exhaustion gets a short pause so
/// the loop does not spin while descriptors are short.
async fn back_off(err: io::Error) {
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
