//! The control socket's listener and its thread.
//!
//! The socket is the host's way into a VM, and Kite runs as root, so:
//! - a path where another process listens (another Kite's socket, any daemon's) is
//!   refused; a stale socket left by a process that is gone is replaced; anything else
//!   at the path is refused;
//! - the socket is created with mode 0600 (under a umask that allows nothing else, then
//!   set again explicitly), so there is no moment when others can connect;
//! - each client must be of Kite's own user or root (`SO_PEERCRED`);
//! - one thread serves every connection, none of them blocking it: a poll(2) loop drives
//!   each as a non-blocking state machine (`connection`), so a client that stalls
//!   mid-request holds up neither the others nor a stop; at most [`MAX_CONNECTIONS`] are
//!   open (more get 503);
//! - each request has an absolute deadline to arrive and be answered (and an idle
//!   connection one to start its next request), after which its connection is dropped;
//! - on exit only the socket this process made is removed, never whatever replaced it.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use memory::ThreadHooks;
use vmm_sys_util::eventfd::EventFd;

use super::connection::{send, Connection, Next};
use super::http::{encode, Handler, Response};
use super::ApiError;

/// Longest a client may take to send a request and read the answer, in all, from the
/// request's first byte; also the longest a connection may stay idle.
pub const CLIENT_DEADLINE: Duration = Duration::from_secs(5);

/// Most connections open at once; one more is answered 503 and closed.
pub const MAX_CONNECTIONS: usize = 32;

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
    /// Listens on `path` (mode 0600), answering requests with `handler` on thread
    /// `kite_api`, which runs `hooks.confine` first.
    pub fn start(path: &Path, handler: Handler, hooks: ThreadHooks) -> Result<ApiServer, ApiError> {
        let socket_error = |source| ApiError::Socket {
            path: path.to_path_buf(),
            source,
        };
        claim(path)?;
        let listener = bind_private(path).map_err(socket_error)?;
        listener.set_nonblocking(true).map_err(socket_error)?;
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
                    Ok(()) => Server::new(listener, stop_seen, user, handler).run(),
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

/// The serving thread's state.
struct Server {
    listener: UnixListener,
    stop: EventFd,
    /// Kite's effective user: clients must be of it, or root.
    user: libc::uid_t,
    handler: Handler,
    connections: Vec<Connection>,
    accept_failures: u64,
    /// After a failed `accept`, the listener is left alone until then.
    accept_paused: Option<Instant>,
}

/// Time spent answering in one round past which waiting connections get it back.
const HELD_UP: Duration = Duration::from_millis(10);

/// Pause after a failed `accept`, before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Most connections accepted in one round of the loop, so the others are served too.
const ACCEPTS_PER_ROUND: usize = 16;

impl Server {
    fn new(listener: UnixListener, stop: EventFd, user: libc::uid_t, handler: Handler) -> Self {
        Server {
            listener,
            stop,
            user,
            handler,
            connections: Vec::new(),
            accept_failures: 0,
            accept_paused: None,
        }
    }

    /// Serves until the stop event fires (or poll itself fails).
    fn run(mut self) {
        let mut fds = Vec::new();
        loop {
            let now = Instant::now();
            self.connections.retain_mut(|c| {
                let expired = c.deadline() <= now;
                if expired {
                    c.expire();
                }
                !expired
            });
            if self.accept_paused.is_some_and(|until| until <= now) {
                self.accept_paused = None;
            }
            // The stop event, the listener (while not accepting, a negative descriptor,
            // which poll skips), then each connection in order.
            fds.clear();
            fds.push(pollfd(self.stop.as_raw_fd(), libc::POLLIN));
            let listener = match self.accept_paused {
                Some(_) => -1,
                None => self.listener.as_raw_fd(),
            };
            fds.push(pollfd(listener, libc::POLLIN));
            fds.extend(self.connections.iter().map(|c| pollfd(c.fd(), c.events())));
            let wake = self
                .connections
                .iter()
                .map(Connection::deadline)
                .chain(self.accept_paused)
                .min();
            let timeout = wake.map_or(-1, |at| {
                let left = at.saturating_duration_since(now);
                i32::try_from(left.as_nanos().div_ceil(1_000_000)).unwrap_or(i32::MAX)
            });
            // SAFETY: `fds` is a vector of valid pollfd structures, its length given.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
            if n < 0 {
                if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                log::error!(
                    "control socket: poll failed: {}",
                    std::io::Error::last_os_error()
                );
                return;
            }
            if fds[0].revents != 0 {
                // Answers already given (`vmm.shutdown`'s own, say) still go out.
                for c in &mut self.connections {
                    c.send_given_answer();
                }
                return;
            }
            let mut index = 0;
            let mut busy = Duration::ZERO;
            self.connections.retain_mut(|c| {
                let revents = fds[2 + index].revents;
                index += 1;
                if revents == 0 {
                    return true;
                }
                let start = Instant::now();
                let next = c.drive(revents, &mut self.handler);
                busy += start.elapsed();
                next == Next::Wait
            });
            if fds[1].revents != 0 {
                // New connections are served as they are accepted: that time counts too.
                let start = Instant::now();
                self.accept();
                busy += start.elapsed();
            }
            // Time the server spent answering (a slow handler) held every connection up,
            // whether its turn came before or after: it does not count against them.
            if busy >= HELD_UP {
                for c in &mut self.connections {
                    c.postpone(busy);
                }
            }
        }
    }

    /// Accepts the connections waiting, up to [`ACCEPTS_PER_ROUND`].
    fn accept(&mut self) {
        for _ in 0..ACCEPTS_PER_ROUND {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Out of descriptors, say: the connection stays pending and the
                    // listener readable. Do not spin on it, nor log every attempt.
                    self.accept_failures += 1;
                    if self.accept_failures.is_power_of_two() {
                        log::warn!(
                            "control socket: accept failed ({} times): {e}",
                            self.accept_failures
                        );
                    }
                    self.accept_paused = Some(Instant::now() + ACCEPT_BACKOFF);
                    return;
                }
            };
            if let Err(e) = self.admit(stream) {
                log::debug!("control socket: {e}");
            }
        }
    }

    /// Takes `stream` on, or refuses it: a stranger gets 403, one too many 503.
    fn admit(&mut self, stream: UnixStream) -> std::io::Result<()> {
        stream.set_nonblocking(true)?;
        let now = Instant::now();
        if self.connections.len() >= MAX_CONNECTIONS {
            // One try, and closed at once: holding it would defeat the cap.
            let busy = Response::error(
                503,
                format!("too many connections (at most {MAX_CONNECTIONS})"),
            );
            send(&stream, &encode(&busy, true))?;
            // Closing a Unix socket with unread input resets the peer's side, and the
            // client may lose the answer: drop what has come already (never waiting).
            let _ = stream.shutdown(std::net::Shutdown::Write);
            let mut scratch = [0u8; 4096];
            for _ in 0..16 {
                match (&stream).read(&mut scratch) {
                    Ok(n) if n > 0 => {}
                    _ => break,
                }
            }
            return Ok(());
        }
        let mut connection = if peer_allowed(&stream, self.user)? {
            Connection::new(stream, now)
        } else {
            let denied = Response::error(403, "permission denied: not the VM's user");
            Connection::refused(stream, now, &denied)
        };
        // A client sends its request as soon as it connects: serve what has come already
        // (it never waits) rather than after another round of the loop.
        if connection.drive(libc::POLLIN | libc::POLLOUT, &mut self.handler) == Next::Wait {
            self.connections.push(connection);
        }
        Ok(())
    }
}

fn pollfd(fd: std::os::fd::RawFd, events: libc::c_short) -> libc::pollfd {
    libc::pollfd {
        fd,
        events,
        revents: 0,
    }
}

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
