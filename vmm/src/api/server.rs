//! The control socket's listener and its thread.
//!
//! The socket is the host's way into a VM, and Kite runs as root, so:
//! - a path where another process listens (another Kite's socket, any daemon's) is
//!   refused; a stale socket left by a process that is gone is replaced; anything else
//!   at the path is refused;
//! - the socket is created with mode 0600 (under a umask that allows nothing else, then
//!   set again explicitly), so there is no moment when others can connect;
//! - each client must be of Kite's own user or root (`SO_PEERCRED`);
//! - each request has an absolute deadline to arrive and be answered, so a client that
//!   trickles bytes cannot hold the (single-threaded) server, and stopping the server
//!   ends the connection it is serving;
//! - on exit only the socket this process made is removed, never whatever replaced it.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use memory::ThreadHooks;
use serde_json::Value;
use vmm_sys_util::eventfd::EventFd;

use super::{error, handle, ApiContext, ApiError, MAX_REQUEST};

/// Longest a client may take to send its request and read the reply, in all.
pub const CLIENT_DEADLINE: Duration = Duration::from_secs(5);

/// The running control socket; stopped (and its file removed) when dropped.
pub struct ApiServer {
    path: PathBuf,
    /// Device and inode of the socket this process made.
    inode: (u64, u64),
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for ApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiServer")
            .field("path", &self.path)
            .finish()
    }
}

impl ApiServer {
    /// Listens on `path` (mode 0600), serving `context` on thread `kite_api`, which runs
    /// `hooks.confine` first.
    pub fn start(
        path: &Path,
        context: ApiContext,
        hooks: ThreadHooks,
    ) -> Result<ApiServer, ApiError> {
        let socket_error = |source| ApiError::Socket {
            path: path.to_path_buf(),
            source,
        };
        claim(path)?;
        let listener = bind_private(path).map_err(socket_error)?;
        let meta = std::fs::symlink_metadata(path).map_err(socket_error)?;
        let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(socket_error)?;
        let stop_seen = stop.try_clone().map_err(socket_error)?;
        // SAFETY: geteuid cannot fail.
        let user = unsafe { libc::geteuid() };
        let thread = std::thread::Builder::new()
            .name("kite_api".into())
            .spawn(move || {
                let ThreadHooks { confine, died } = hooks;
                match confine() {
                    Ok(()) => serve(listener, stop_seen, user, context),
                    Err(why) => died(format!("the control socket cannot start: {why}")),
                }
            })
            .map_err(socket_error)?;
        Ok(ApiServer {
            path: path.to_path_buf(),
            inode: (meta.dev(), meta.ino()),
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if self.stop.write(1).is_ok() {
            if let Some(thread) = self.thread.take() {
                let _ = thread.join();
            }
        }
        // Only the socket this process made: the path may have been taken over since.
        let ours = std::fs::symlink_metadata(&self.path)
            .is_ok_and(|m| m.file_type().is_socket() && (m.dev(), m.ino()) == self.inode);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Makes `path` free for a new socket: nothing there, or a stale socket (nobody
/// listening), which is removed. A live socket or anything else is refused.
fn claim(path: &Path) -> Result<(), ApiError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(ApiError::Socket {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    if !meta.file_type().is_socket() {
        return Err(ApiError::Exists(path.to_path_buf()));
    }
    match probe(path) {
        Ok(()) => Err(ApiError::InUse(path.to_path_buf())),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => std::fs::remove_file(path)
            .map_err(|source| ApiError::Socket {
                path: path.to_path_buf(),
                source,
            }),
        Err(source) => Err(ApiError::Socket {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Connects to the socket at `path` without waiting: `Ok` if someone listens there (also
/// when its backlog is full: a hung listener is still not Kite's to replace),
/// `ConnectionRefused` if nobody does.
fn probe(path: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data; all-zero is valid.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() {
        return Err(std::io::Error::from_raw_os_error(libc::ENAMETOOLONG));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: socket(2) with constant arguments; the descriptor is owned right below.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nobody else owns.
    let socket = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: connect(2) on our socket with a sockaddr_un of the length given.
    let rc = unsafe {
        libc::connect(
            socket.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    match std::io::Error::last_os_error() {
        e if e.raw_os_error() == Some(libc::EAGAIN) => Ok(()), // listening, backlog full
        e => Err(e),
    }
}

/// Binds a listener at `path` that only its owner can connect to, from the start.
fn bind_private(path: &Path) -> std::io::Result<UnixListener> {
    // The umask is the process's: Kite binds its socket while no other thread creates
    // files (device threads, vCPUs and the fault handler never do).
    // SAFETY: umask(2) cannot fail; the old mask is put back right after.
    let old = unsafe { libc::umask(0o177) };
    let listener = UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    // No chmod after: it would follow a symbolic link put at the path meanwhile.
    listener
}

/// What waiting on a client came to.
#[derive(Debug, PartialEq, Eq)]
enum Wait {
    Ready,
    Stopped,
    TimedOut,
}

/// Waits until `fd` has `events`, the stop event fires, or `deadline` passes.
fn wait(
    fd: &impl AsRawFd,
    events: libc::c_short,
    stop: &EventFd,
    deadline: Option<Instant>,
) -> Wait {
    let mut fds = [
        libc::pollfd {
            fd: fd.as_raw_fd(),
            events,
            revents: 0,
        },
        libc::pollfd {
            fd: stop.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        let timeout = deadline.map_or(-1, |d| {
            let left = d.saturating_duration_since(Instant::now());
            i32::try_from(left.as_nanos().div_ceil(1_000_000)).unwrap_or(i32::MAX)
        });
        // SAFETY: `fds` is an array of two valid pollfd structures, its length given.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Wait::Stopped; // poll itself failed: nothing more can be served
        }
        if fds[1].revents != 0 {
            return Wait::Stopped;
        }
        if n == 0 {
            return Wait::TimedOut;
        }
        return Wait::Ready;
    }
}

/// Serves clients of `user` (Kite's own effective user) and root until stopped.
fn serve(listener: UnixListener, stop: EventFd, user: libc::uid_t, context: ApiContext) {
    let mut accept_failures = 0u64;
    while wait(&listener, libc::POLLIN, &stop, None) == Wait::Ready {
        match listener.accept() {
            Ok((stream, _)) => {
                if let Err(e) = answer(&stream, &stop, user, &context) {
                    log::debug!("control socket: {e}");
                }
            }
            Err(e) => {
                // Out of descriptors, say: the connection stays pending and the listener
                // readable. Do not spin on it, nor log every attempt.
                accept_failures += 1;
                if accept_failures.is_power_of_two() {
                    log::warn!("control socket: accept failed ({accept_failures} times): {e}");
                }
                let backoff = Some(Instant::now() + ACCEPT_BACKOFF);
                if wait(&stop, libc::POLLIN, &stop, backoff) != Wait::TimedOut {
                    return;
                }
            }
        }
    }
}

/// Pause after a failed `accept`, before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Whether the peer of `stream` is `user`, or root.
fn peer_allowed(stream: &UnixStream, user: libc::uid_t) -> std::io::Result<bool> {
    // SAFETY: ucred is plain data; getsockopt fills it.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt on a socket we own, into a ucred of the length given.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cred.uid == 0 || cred.uid == user)
}

/// Waits until the client's `stream` has `events`; an error once the server is stopping
/// or the client's `deadline` has passed.
fn wait_for_client(
    stream: &UnixStream,
    events: libc::c_short,
    stop: &EventFd,
    deadline: Option<Instant>,
) -> std::io::Result<()> {
    match wait(stream, events, stop, deadline) {
        Wait::Ready => Ok(()),
        Wait::Stopped => Err(std::io::Error::new(
            std::io::ErrorKind::Interrupted,
            "the server is stopping",
        )),
        Wait::TimedOut => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("client took longer than {CLIENT_DEADLINE:?}"),
        )),
    }
}

/// Reads one request line from `stream` and answers it, all before the client's deadline.
fn answer(
    stream: &UnixStream,
    stop: &EventFd,
    user: libc::uid_t,
    context: &ApiContext,
) -> std::io::Result<()> {
    let deadline = Some(Instant::now() + CLIENT_DEADLINE);
    stream.set_nonblocking(true)?;
    let reply = if !peer_allowed(stream, user)? {
        error("permission denied: not the VM's user".into())
    } else {
        match read_request(stream, stop, deadline)? {
            Some(line) => match serde_json::from_slice::<Value>(&line) {
                Ok(request) => handle(&request, context),
                Err(e) => error(format!("not JSON: {e}")),
            },
            None => error(format!("request larger than {MAX_REQUEST} bytes")),
        }
    };
    let mut out = serde_json::to_vec(&reply).unwrap_or_default();
    out.push(b'\n');
    let mut written = 0;
    while written < out.len() {
        match (&*stream).write(&out[written..]) {
            Ok(n) => written += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                wait_for_client(stream, libc::POLLOUT, stop, deadline)?
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The request line (up to a newline or the end of the stream), or `None` if it is longer
/// than [`MAX_REQUEST`].
fn read_request(
    stream: &UnixStream,
    stop: &EventFd,
    deadline: Option<Instant>,
) -> std::io::Result<Option<Vec<u8>>> {
    let mut line = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match (&*stream).read(&mut buf) {
            Ok(0) => return Ok(Some(line)),
            Ok(n) => {
                let chunk = &buf[..n];
                if let Some(end) = chunk.iter().position(|b| *b == b'\n') {
                    line.extend_from_slice(&chunk[..end]);
                } else {
                    line.extend_from_slice(chunk);
                }
                if line.len() as u64 > MAX_REQUEST {
                    return Ok(None);
                }
                if chunk.contains(&b'\n') {
                    return Ok(Some(line));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                wait_for_client(stream, libc::POLLIN, stop, deadline)?
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}
