//! Hitless restart: a new process takes the running one's listening sockets over a Unix socket.
//!
//! The running process offers its data-plane and admin listeners at `state_dir/handover.sock`.
//! A process started with `run --takeover` connects, receives both sockets (SCM_RIGHTS) and
//! starts accepting on them at once; the old process then stops accepting and drains. Both
//! processes accept from the *same* sockets, so no connection queued in the kernel is lost in
//! the switch, which closing one of two SO_REUSEPORT listeners would do. The state store is
//! handed over by its lock: the old process releases it when drained, and the new one's
//! requests wait for it (see [`crate::proxy::Gate`]).

use std::io;
use std::io::{Read, Write};
use std::mem::size_of;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// The socket inside `state_dir`.
pub const SOCKET: &str = "handover.sock";

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
pub type TakenOver = (TcpListener, TcpListener, UnixStream);

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
        TcpListener::from_std(listener)
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
pub fn acknowledge(mut predecessor: UnixStream) {
    if let Err(err) = predecessor.write_all(b"A") {
        warn!(error = %err, "could not confirm the takeover; the old process keeps serving too");
    }
}

/// A second descriptor for `listener`'s socket, so it can be offered while the listener itself
/// is in use elsewhere.
pub fn duplicate(listener: &TcpListener) -> io::Result<OwnedFd> {
    listener.as_fd().try_clone_to_owned()
}

/// Offers the data-plane socket (`data`, a duplicate from [`duplicate`]) and `admin` to one
/// successor; fires `handed_over` once it has them, which should start this process's graceful
/// stop. Ends when `stop` fires.
pub fn offer(
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
    let fds = [data.as_raw_fd(), admin.as_raw_fd()];
    Ok(tokio::spawn(async move {
        // Offer until one successor confirms; one that dies on the way leaves this process
        // serving, ready for the next.
        loop {
            let accepted = tokio::select! {
                _ = stop.cancelled() => None,
                accepted = listener.accept() => accepted.ok(),
            };
            let Some((stream, _)) = accepted else { break };
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
        drop((data, admin));
    }))
}

/// A control-message buffer with the alignment `cmsghdr` needs, for `fds` descriptors.
fn control_buffer(fds: usize) -> (Vec<u64>, usize) {
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE((fds * size_of::<RawFd>()) as u32) } as usize;
    (vec![0u64; space.div_ceil(size_of::<u64>())], space)
}

/// A message of one byte (`iov`) with room for control data (`control`, `space` bytes).
///
/// # Safety
/// The returned header points into `iov` and `control`; it must not outlive them.
unsafe fn message(iov: &mut libc::iovec, control: &mut [u64], space: usize) -> libc::msghdr {
    // SAFETY: a zeroed msghdr is a valid empty message.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    msg
}

fn send_fds(stream: &UnixStream, fds: &[RawFd; 2]) -> io::Result<()> {
    let mut byte = [b'L'];
    let mut iov = libc::iovec { iov_base: byte.as_mut_ptr().cast(), iov_len: 1 };
    let (mut control, space) = control_buffer(fds.len());
    // SAFETY: `iov` and `control` outlive the sendmsg call; the control buffer is aligned for
    // cmsghdr and CMSG_SPACE bytes long, enough for one header carrying `fds`, written unaligned.
    unsafe {
        let msg = message(&mut iov, &mut control, space);
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of_val(fds) as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<[RawFd; 2]>(), *fds);
        if libc::sendmsg(stream.as_raw_fd(), &msg, 0) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

fn receive_fds(stream: &UnixStream) -> io::Result<[OwnedFd; 2]> {
    let mut byte = [0u8];
    let mut iov = libc::iovec { iov_base: byte.as_mut_ptr().cast(), iov_len: 1 };
    let (mut control, space) = control_buffer(2);
    // SAFETY: as in `send_fds`; the kernel writes at most `msg_controllen` bytes of control data.
    // Received descriptors are owned (closed on every error path) before anything is checked.
    unsafe {
        let mut msg = message(&mut iov, &mut control, space);
        if libc::recvmsg(stream.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut owned = Vec::new();
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let bytes = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                for i in 0..bytes / size_of::<RawFd>() {
                    owned.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
        if msg.msg_flags & libc::MSG_CTRUNC != 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "the handover message was truncated"));
        }
        <[OwnedFd; 2]>::try_from(owned).map_err(|_| {
            io::Error::new(io::ErrorKind::InvalidData, "the handover message did not carry two sockets")
        })
    }
}
