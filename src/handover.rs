//! Hitless restart: a new process takes the running one's listening sockets over a Unix socket.
//!
//! The running process offers its data-plane and admin listeners at `state_dir/handover.sock`.
//! A process started with `run --takeover` connects, receives both sockets (SCM_RIGHTS) and
//! starts accepting on them at once; the old process then stops accepting and drains. Both
//! processes accept from the *same* sockets, so no connection queued in the kernel is lost in
//! the switch, which closing one of two SO_REUSEPORT listeners would do. The state store is
//! handed over by its lock: the old process releases it when drained, and the new one's
//! requests wait for it (see [`crate::listener::Gate`]).

use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// The socket inside `state_dir`.
pub(crate) const SOCKET: &str = "handover.sock";

#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("cannot offer the listeners at {}", path.display())]
    Offer {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("taking the listeners over from {} failed", path.display())]
    Take {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// How long either side waits for the other during a handover.
const HANDOVER_WAIT: Duration = Duration::from_secs(10);

/// The listeners (data plane, admin) taken over, and the stream to [`acknowledge`] on.
pub(crate) type TakenOver = (TcpListener, TcpListener, UnixStream);

/// Takes the listeners from the process serving `state_dir`, if one offers them. `Ok(None)`
/// when nobody does: the caller binds its own.
pub async fn take(state_dir: &Path) -> Result<Option<TakenOver>, HandoverError> {
    let path = state_dir.join(SOCKET);
    let receiving = path.clone();
    // The exchange is a few blocking socket calls; keep them off the async threads.
    let received = tokio::task::spawn_blocking(move || receive(&receiving))
        .await
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic.into_panic()));
    let fail = |source| HandoverError::Take { path: path.clone(), source };
    let Some(([data, admin], stream)) = received.map_err(fail)? else { return Ok(None) };
    let listener = |fd: OwnedFd| {
        let listener = std::net::TcpListener::from(fd);
        listener.set_nonblocking(true)?;
        let listener = TcpListener::from_std(listener)?;
        // An older predecessor may have bound it with a shorter queue than ours.
        crate::listener::widen_backlog(&listener)?;
        Ok(listener)
    };
    let (data, admin) = (listener(data).map_err(fail)?, listener(admin).map_err(fail)?);
    info!(from = %path.display(), "took the listening sockets over from the running process");
    Ok(Some((data, admin, stream)))
}

/// Connects to the handover socket at `path` and receives the two listening sockets.
fn receive(path: &Path) -> io::Result<Option<([OwnedFd; 2], UnixStream)>> {
    let stream = match UnixStream::connect(path) {
        Ok(stream) => stream,
        Err(err) if matches!(err.kind(), io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused) => {
            return Ok(None)
        }
        Err(err) => return Err(err),
    };
    stream.set_read_timeout(Some(HANDOVER_WAIT))?;
    let fds = receive_fds(&stream)?;
    Ok(Some((fds, stream)))
}

/// Tells the process the sockets came from that they are being served here, so it may stop.
pub(crate) fn acknowledge(mut predecessor: UnixStream) {
    if let Err(err) = predecessor.write_all(b"A") {
        warn!(error = %err, "could not confirm the takeover; the old process keeps serving too");
    }
}

/// A second descriptor for `listener`'s socket, so it can be offered while the listener itself
/// is in use elsewhere.
pub(crate) fn duplicate(listener: &TcpListener) -> io::Result<OwnedFd> {
    listener.as_fd().try_clone_to_owned()
}

/// Offers the data-plane socket (`data`, a duplicate from [`duplicate`]) and `admin` to one
/// successor; fires `handed_over` once it has them, which should start this process's graceful
/// stop. Ends when `stop` fires.
pub(crate) fn offer(
    state_dir: &Path,
    data: OwnedFd,
    admin: &TcpListener,
    handed_over: CancellationToken,
    stop: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, HandoverError> {
    let path = state_dir.join(SOCKET);
    let offer_error = |source| HandoverError::Offer { path: path.clone(), source };
    let admin = duplicate(admin).map_err(offer_error)?;
    // A socket file left by a process that died is stale: nobody answers on it.
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).map_err(offer_error)?;
    let fds = std::sync::Arc::new([data, admin]);
    Ok(tokio::spawn(async move {
        // Offer until one successor confirms; one that dies on the way leaves this process
        // serving, ready for the next.
        loop {
            let accepted = tokio::select! {
                _ = stop.cancelled() => None,
                accepted = listener.accept() => accepted.ok(),
            };
            let Some((stream, _)) = accepted else { break };
            let fds = fds.clone();
            // Send, then wait for the successor to say it is accepting; only then stop.
            let handed = tokio::task::spawn_blocking(move || {
                let mut stream = stream.into_std()?;
                stream.set_nonblocking(false)?;
                stream.set_read_timeout(Some(HANDOVER_WAIT))?;
                send_fds(&stream, &fds)?;
                let mut ack = [0u8; 1];
                stream.read_exact(&mut ack)
            })
            .await;
            match handed {
                Ok(Ok(())) => {
                    info!("a new process took the listening sockets over; stopping gracefully");
                    handed_over.cancel();
                    break;
                }
                Ok(Err(err)) => warn!(error = %err, "a takeover did not complete; still serving"),
                Err(err) => warn!(error = %err, "a takeover did not complete; still serving"),
            }
        }
        let _ = std::fs::remove_file(&path);
        drop(fds);
    }))
}

/// Sends the two listening sockets as one SCM_RIGHTS message, with one byte of data.
fn send_fds(stream: &UnixStream, fds: &[OwnedFd; 2]) -> io::Result<()> {
    let borrowed = [fds[0].as_fd(), fds[1].as_fd()];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(2))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    // The buffer is sized for exactly this message, so it always fits.
    let fits = control.push(SendAncillaryMessage::ScmRights(&borrowed));
    debug_assert!(fits);
    rustix::net::sendmsg(stream, &[IoSlice::new(b"L")], &mut control, SendFlags::empty())?;
    Ok(())
}

/// Receives the two listening sockets [`send_fds`] sent. Every descriptor received is owned
/// (and closed on every error path) before anything is checked.
fn receive_fds(stream: &UnixStream) -> io::Result<[OwnedFd; 2]> {
    let mut byte = [0u8];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(2))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let received =
        rustix::net::recvmsg(stream, &mut [IoSliceMut::new(&mut byte)], &mut control, RECEIVE_FLAGS)?;
    let mut owned = Vec::new();
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(fds) = message {
            owned.extend(fds);
        }
    }
    close_on_exec(&owned)?;
    if received.flags.contains(ReturnFlags::CTRUNC) {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "the handover message was truncated"));
    }
    <[OwnedFd; 2]>::try_from(owned).map_err(|_| {
        io::Error::new(io::ErrorKind::InvalidData, "the handover message did not carry two sockets")
    })
}

/// Received descriptors are close-on-exec atomically where the kernel can do it.
#[cfg(any(target_os = "linux", target_os = "android", target_os = "freebsd"))]
const RECEIVE_FLAGS: RecvFlags = RecvFlags::CMSG_CLOEXEC;
#[cfg(not(any(target_os = "linux", target_os = "android", target_os = "freebsd")))]
const RECEIVE_FLAGS: RecvFlags = RecvFlags::empty();

#[cfg(any(target_os = "linux", target_os = "android", target_os = "freebsd"))]
fn close_on_exec(_: &[OwnedFd]) -> io::Result<()> {
    Ok(())
}

/// Elsewhere (macOS) they are marked right after: this process does not exec, so nothing can
/// inherit them in between.
#[cfg(not(any(target_os = "linux", target_os = "android", target_os = "freebsd")))]
fn close_on_exec(fds: &[OwnedFd]) -> io::Result<()> {
    for fd in fds {
        rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::CLOEXEC)?;
    }
    Ok(())
}
