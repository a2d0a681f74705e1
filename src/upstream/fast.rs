//! The HTTP/1.1 fast path's upstream connections: the request written as bytes, the response
//! head read and rewritten with [`crate::h1`], the body relayed to the client.
//!
//! The hyper path's twin is [`super::UpstreamClient::send`]; both classify failures the same way
//! ([`super::UpstreamError`]) and what is retried is [`crate::proxy`]'s rule.

use std::task::Context;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use std::sync::{Arc, Weak};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tracing::debug;

use super::pool::Slot;
use super::{Upstream, UpstreamClient, UpstreamError, UpstreamState, MAX_RESPONSE_HEAD};
use crate::h1;

/// Response body bytes at most copied behind the head into one write.
const COALESCE: usize = 16 * 1024;

/// An upstream connection of the HTTP/1.1 fast path: the socket and what was read from it.
#[derive(Debug)]
pub(crate) struct UpstreamConn {
    stream: TcpStream,
    buf: BytesMut,
    /// The upstream whose pool the connection returns to. Weak: the pool holds its idle
    /// connections, and a removed upstream's pool must be freed with its sockets.
    home: Weak<UpstreamState>,
    /// Counts the connection against `upstream.max_connections_per_upstream` while it is open.
    _open: OwnedSemaphorePermit,
}

/// How a fast-path exchange failed, before any response head.
#[derive(Debug, thiserror::Error)]
enum ExchangeError {
    #[error("writing the request failed")]
    Write(#[source] std::io::Error),
    #[error("reading the response failed")]
    Read(#[source] std::io::Error),
    #[error("the connection closed before a response")]
    Eof,
    /// Closed or reset before the first byte of a response: on a pooled connection, most likely
    /// closed by the upstream while idle.
    #[error("the connection closed before any response byte")]
    Unanswered(#[source] Option<std::io::Error>),
    #[error(transparent)]
    Response(#[from] h1::ResponseError),
}

/// A failed fast-path send; `written` says whether the request may have reached the upstream.
#[derive(Debug)]
pub(crate) struct H1SendError {
    pub error: UpstreamError,
    pub written: bool,
}

/// Why relaying a response body stopped early.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RelayError {
    #[error("reading the upstream body failed")]
    Upstream(#[source] std::io::Error),
    #[error("the upstream closed before the end of the body")]
    Truncated,
    /// The upstream's chunked framing is invalid; `head_sent` says whether the client has had
    /// the response head already (if not, it can still be answered 502).
    #[error("the upstream's body is malformed")]
    Invalid {
        head_sent: bool,
        #[source]
        source: h1::ChunkError,
    },
    #[error("writing to the client failed")]
    Client(#[source] std::io::Error),
}

impl UpstreamConn {
    fn new(stream: TcpStream, home: &Arc<UpstreamState>, open: OwnedSemaphorePermit) -> Self {
        UpstreamConn {
            stream,
            buf: BytesMut::with_capacity(16 * 1024),
            home: Arc::downgrade(home),
            _open: open,
        }
    }

    /// Whether nothing (neither bytes nor a close) has arrived on the idle connection.
    pub(super) fn is_quiet(&self, cx: &mut Context<'_>) -> bool {
        self.stream.poll_read_ready(cx).is_pending()
    }

    async fn fill(&mut self) -> std::io::Result<usize> {
        h1::fill(&mut self.stream, &mut self.buf, 4096, 16 * 1024).await
    }

    /// Writes `request` and reads the response head, writing the client's version to `out`.
    async fn exchange(
        &mut self,
        request: &[u8],
        rules: h1::ResponseRules,
        out: &mut Vec<u8>,
    ) -> Result<h1::ResponseHead, ExchangeError> {
        self.stream.write_all(request).await.map_err(ExchangeError::Write)?;
        self.buf.clear();
        loop {
            if !self.buf.is_empty() {
                match h1::rewrite_response(&self.buf, rules, out)? {
                    Some(head) if (100..200).contains(&head.status) => {
                        self.buf.advance(head.len);
                        continue;
                    }
                    Some(head) => return Ok(head),
                    None if self.buf.len() > MAX_RESPONSE_HEAD => {
                        return Err(h1::ResponseError::TooLarge(MAX_RESPONSE_HEAD).into())
                    }
                    None => {}
                }
            }
            match self.fill().await {
                Ok(0) if self.buf.is_empty() => return Err(ExchangeError::Unanswered(None)),
                Ok(0) => return Err(ExchangeError::Eof),
                Ok(_) => {}
                Err(err) if self.buf.is_empty() => return Err(ExchangeError::Unanswered(Some(err))),
                Err(err) => return Err(ExchangeError::Read(err)),
            }
        }
    }

    /// Sends the response whose head is `head` to `client`: `out` (the rewritten head, finished)
    /// with the body bytes already read, then the rest of the body as it arrives, each write
    /// within `send_timeout`. Returns whether the upstream connection can carry another request.
    pub(crate) async fn relay(
        &mut self,
        head: h1::ResponseHead,
        out: &mut Vec<u8>,
        client: &mut h1::ClientStream,
        send_timeout: Duration,
    ) -> Result<bool, RelayError> {
        let keep_alive = head.keep_alive;
        let mut framing = head.framing;
        let reframed = matches!(framing, h1::Framing::Chunked(_));
        self.buf.advance(head.len);
        // A malformed body found here has not reached the client: it can still be answered 502.
        let (used, mut done) = body_part(&mut framing, &self.buf, out)
            .map_err(|source| RelayError::Invalid { head_sent: false, source })?;
        if reframed || used <= COALESCE {
            if !reframed {
                out.extend_from_slice(&self.buf[..used]);
            }
            client.send(out, send_timeout).await.map_err(RelayError::Client)?;
        } else {
            client.send(out, send_timeout).await.map_err(RelayError::Client)?;
            client.send(&self.buf[..used], send_timeout).await.map_err(RelayError::Client)?;
        }
        self.buf.advance(used);
        while !done {
            self.buf.clear();
            if self.fill().await.map_err(RelayError::Upstream)? == 0 {
                return match framing {
                    h1::Framing::UntilClose => Ok(false),
                    _ => Err(RelayError::Truncated),
                };
            }
            out.clear();
            let used;
            (used, done) = body_part(&mut framing, &self.buf, out)
                .map_err(|source| RelayError::Invalid { head_sent: true, source })?;
            let bytes = if reframed { &out[..] } else { &self.buf[..used] };
            client.send(bytes, send_timeout).await.map_err(RelayError::Client)?;
            self.buf.advance(used);
        }
        // Bytes after the body would be a response nobody asked for: such a connection is not
        // reused.
        Ok(keep_alive && self.buf.is_empty())
    }

    /// Returns the connection to its upstream's pool, if the upstream is still configured.
    pub(crate) fn release(self) {
        if let Some(home) = self.home.upgrade() {
            home.pool.checkin_h1(self);
        }
    }
}

/// How many of `buf`'s bytes belong to the body, and whether the body ends with them. A chunked
/// body's client framing is appended to `out`; other bodies are passed on as they are.
fn body_part(
    framing: &mut h1::Framing,
    buf: &[u8],
    out: &mut Vec<u8>,
) -> Result<(usize, bool), h1::ChunkError> {
    Ok(match framing {
        h1::Framing::Empty => (0, true),
        h1::Framing::Length(left) => {
            let take = (*left).min(buf.len() as u64);
            *left -= take;
            (take as usize, *left == 0)
        }
        h1::Framing::Chunked(chunked) => {
            let used = chunked.reframe(buf, out)?;
            (used, chunked.is_done())
        }
        h1::Framing::UntilClose => (buf.len(), false),
    })
}

impl UpstreamClient {
    /// Sends `request` (a complete upstream request, head and body) on the HTTP/1.1 fast path
    /// and reads the response head, writing the client's version to `out`. A pooled connection
    /// that turns out closed before answering is replaced when `replayable`.
    pub(crate) async fn send_h1(
        &self,
        upstream: &Upstream,
        request: &[u8],
        replayable: bool,
        rules: h1::ResponseRules,
        out: &mut Vec<u8>,
        response_timeout: Duration,
    ) -> Result<(UpstreamConn, h1::ResponseHead), H1SendError> {
        loop {
            let (mut conn, reused) =
                match upstream.state.pool.slot(|p| p.checkout_h1(), self.connect_timeout).await {
                    Some(Slot::Idle(conn)) => (conn, true),
                    Some(Slot::New(permit)) => match self.connect_tcp(upstream).await {
                        Ok(stream) => (UpstreamConn::new(stream, &upstream.state, permit), false),
                        Err(error) => return Err(H1SendError { error, written: false }),
                    },
                    None => return Err(H1SendError { error: self.busy(upstream), written: false }),
                };
            let error = match tokio::time::timeout(response_timeout, conn.exchange(request, rules, out)).await
            {
                Ok(Ok(head)) => return Ok((conn, head)),
                Err(_) => UpstreamError::Timeout { upstream: upstream.name.clone(), after: response_timeout },
                Ok(Err(ExchangeError::Write(_) | ExchangeError::Unanswered(_))) if reused && replayable => {
                    debug!(upstream = %upstream.name, "idle upstream connection was closed; retrying on another");
                    continue;
                }
                Ok(Err(ExchangeError::Response(err))) => {
                    UpstreamError::Invalid { upstream: upstream.name.clone(), source: err.into() }
                }
                Ok(Err(err)) => UpstreamError::Closed { upstream: upstream.name.clone(), source: err.into() },
            };
            return Err(H1SendError { error, written: true });
        }
    }
}
