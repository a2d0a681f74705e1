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
use std::mem::size_of;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

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

/// Takes the listeners (data plane, admin) from the process serving `state_dir`, if one offers
/// them. `Ok(None)` when nobody does: the caller binds its own.
pub fn take(state_dir: &Path) -> Result<Option<(TcpListener, TcpListener)>, HandoverError> {
    let path = state_dir.join(SOCKET);
    let stream = match UnixStream::connect(&path) {
        Ok(stream) => stream,
        Err(err) if matches!(err.kind(), io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused) => {
            return Ok(None)
        }
        Err(source) => return Err(HandoverError::Take { path, source }),
    };
    let fail = |source| HandoverError::Take { path: path.clone(), source };
    let fds = receive_fds(&stream, 2).map_err(fail)?;
    let listeners = fds
        .into_iter()
        .map(|fd| {
            // SAFETY: the descriptor was just received and is owned by nobody else here.
            let listener = unsafe { std::net::TcpListener::from_raw_fd(fd) };
            listener.set_nonblocking(true)?;
            TcpListener::from_std(listener)
        })
        .collect::<io::Result<Vec<_>>>()
        .map_err(fail)?;
    let [data, admin]: [TcpListener; 2] =
        listeners.try_into().map_err(|_| fail(io::ErrorKind::InvalidData.into()))?;
    info!(from = %path.display(), "took the listening sockets over from the running process");
    Ok(Some((data, admin)))
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
    Ok(tokio::spawn(async move {
        let accepted = tokio::select! {
            _ = stop.cancelled() => None,
            accepted = listener.accept() => accepted.ok(),
        };
        let _ = std::fs::remove_file(&path);
        let Some((stream, _)) = accepted else { return };
        let fds = [data.as_raw_fd(), admin.as_raw_fd()];
        let sent = stream.into_std().and_then(|s| {
            s.set_nonblocking(false)?;
            send_fds(&s, &fds)
        });
        match sent {
            Ok(()) => {
                info!("handed the listening sockets to a new process; stopping gracefully");
                handed_over.cancel();
            }
            Err(err) => warn!(error = %err, "handing the listeners over failed; still serving"),
        }
    }))
}

fn send_fds(stream: &UnixStream, fds: &[RawFd]) -> io::Result<()> {
    let mut byte = [b'L'];
    let mut iov = libc::iovec { iov_base: byte.as_mut_ptr().cast(), iov_len: 1 };
    let data_len = std::mem::size_of_val(fds) as u32;
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(data_len) } as usize;
    let mut control = vec![0u8; space];
    // SAFETY: a zeroed msghdr is valid; every pointer set below outlives the sendmsg call, and
    // the control buffer is CMSG_SPACE bytes, enough for one header with `fds`.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(data_len) as _;
        std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(cmsg).cast::<RawFd>(), fds.len());
        if libc::sendmsg(stream.as_raw_fd(), &msg, 0) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

fn receive_fds(stream: &UnixStream, count: usize) -> io::Result<Vec<RawFd>> {
    let mut byte = [0u8];
    let mut iov = libc::iovec { iov_base: byte.as_mut_ptr().cast(), iov_len: 1 };
    let data_len = (count * size_of::<RawFd>()) as u32;
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(data_len) } as usize;
    let mut control = vec![0u8; space];
    // SAFETY: as in `send_fds`; the kernel writes at most `msg_controllen` bytes of control data,
    // and the header is read only after checking its level, type and length.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        if libc::recvmsg(stream.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) < 0 {
            return Err(io::Error::last_os_error());
        }
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        if cmsg.is_null()
            || (*cmsg).cmsg_level != libc::SOL_SOCKET
            || (*cmsg).cmsg_type != libc::SCM_RIGHTS
            || ((*cmsg).cmsg_len as usize) < libc::CMSG_LEN(data_len) as usize
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "no listening sockets in the handover message",
            ));
        }
        let mut fds = vec![0 as RawFd; count];
        std::ptr::copy_nonoverlapping(libc::CMSG_DATA(cmsg).cast::<RawFd>(), fds.as_mut_ptr(), count);
        Ok(fds)
    }
}
