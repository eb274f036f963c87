//! The control socket against hostile or careless hosts: a path another process listens
//! on, stale sockets, sockets replaced behind Kite's back, slow and stalled clients,
//! clients of another user.

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use memory::{RegionTable, ThreadHooks};
use serde_json::json;
use vmm::api::{call, ApiContext, ApiError, ApiServer, CLIENT_DEADLINE};

const KITE: &str = env!("CARGO_BIN_EXE_kite");

fn start(path: &Path) -> Result<ApiServer, ApiError> {
    let context = ApiContext {
        table: Arc::new(RegionTable::default()),
        boot_memory: 256 << 20,
        hotplug: None,
        faults: None,
    };
    ApiServer::start(path, context, ThreadHooks::default())
}

fn answers(path: &Path) -> bool {
    call(path, &json!({"command": "info"}), Duration::from_secs(10))
        .is_ok_and(|reply| reply["ok"] == json!(true))
}

#[test]
fn a_path_where_another_process_listens_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = dir.path().join("daemon.sock");
    let listener = UnixListener::bind(&daemon).unwrap();
    assert!(matches!(start(&daemon), Err(ApiError::InUse(_))));
    assert!(
        UnixStream::connect(&daemon).is_ok(),
        "the daemon's socket is still there"
    );
    drop(listener);

    let path = dir.path().join("api.sock");
    let first = start(&path).unwrap();
    let second = start(&path);
    assert!(matches!(second, Err(ApiError::InUse(_))), "{second:?}");
    assert!(answers(&path), "the first VM's socket still works");
    drop(first);
}

/// A listener that never accepts and whose backlog is full is still someone else's
/// socket: it is refused, at once (a blocking probe would wait for ever).
#[test]
fn a_hung_listener_is_refused_without_waiting() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hung.sock");
    let _listener = UnixListener::bind(&path).unwrap();
    let mut clients = Vec::new();
    loop {
        // SAFETY: socket(2) with constant arguments; the descriptor is owned below.
        let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_NONBLOCK, 0) };
        assert!(fd >= 0);
        // SAFETY: a fresh descriptor nobody else owns.
        let socket = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let stream = std::os::unix::net::UnixStream::from(socket);
        let addr = std::os::unix::net::SocketAddr::from_pathname(&path).unwrap();
        // std's connect_addr is unstable: connect through a blocking-free retry instead.
        match connect_nonblocking(&stream, &addr) {
            Ok(()) => clients.push(stream),
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => break,
            Err(e) => panic!("{e}"),
        }
        assert!(clients.len() < 10_000, "the backlog never filled");
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let probed = path.clone();
    std::thread::spawn(move || {
        let _ = tx.send(matches!(start(&probed), Err(ApiError::InUse(_))));
    });
    let refused = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("starting does not wait for a hung listener");
    assert!(refused, "a hung listener's path is refused");
}

/// connect(2) on a non-blocking Unix socket.
fn connect_nonblocking(
    stream: &UnixStream,
    addr: &std::os::unix::net::SocketAddr,
) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let path = addr.as_pathname().unwrap();
    // SAFETY: sockaddr_un is plain data; all-zero is valid.
    let mut raw: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    raw.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, src) in raw
        .sun_path
        .iter_mut()
        .zip(path.as_os_str().as_encoded_bytes())
    {
        *dst = *src as libc::c_char;
    }
    // SAFETY: connect(2) with a sockaddr_un of the length given.
    let rc = unsafe {
        libc::connect(
            stream.as_raw_fd(),
            (&raw as *const libc::sockaddr_un).cast(),
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[test]
fn a_stale_socket_is_replaced_and_other_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("api.sock");
    drop(UnixListener::bind(&path).unwrap()); // its process is gone; the file stays
    let server = start(&path).unwrap();
    assert!(answers(&path));
    drop(server);

    let file = dir.path().join("file");
    std::fs::write(&file, b"data").unwrap();
    assert!(matches!(start(&file), Err(ApiError::Exists(_))));
    assert_eq!(std::fs::read(&file).unwrap(), b"data");
}

#[test]
fn only_the_socket_kite_made_is_removed_on_exit() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("api.sock");
    drop(start(&path).unwrap());
    assert!(!path.exists(), "its own socket is removed");

    let server = start(&path).unwrap();
    // Someone else takes the path over while the VM runs.
    std::fs::remove_file(&path).unwrap();
    let other = UnixListener::bind(&path).unwrap();
    drop(server);
    assert!(path.exists(), "the other socket stays");
    assert!(UnixStream::connect(&path).is_ok());
    drop(other);
}

#[test]
fn the_socket_is_private() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("api.sock");
    let _server = start(&path).unwrap();
    let meta = std::fs::symlink_metadata(&path).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    // SAFETY: geteuid cannot fail.
    assert_eq!(meta.uid(), unsafe { libc::geteuid() });
}

#[test]
fn a_client_trickling_bytes_is_cut_off_at_its_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("api.sock");
    let _server = start(&path).unwrap();
    let mut client = UnixStream::connect(&path).unwrap();
    let start = Instant::now();
    let limit = CLIENT_DEADLINE * 4;
    // One byte at a time, never a whole request: the server must give up on its own.
    let cut_off = loop {
        if client.write_all(b" ").is_err() {
            break true;
        }
        let mut byte = [0u8; 1];
        client
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        match client.read(&mut byte) {
            Ok(_) => break true, // a reply or end of stream: the server is done with it
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => break true,
        }
        if start.elapsed() > limit {
            break false;
        }
    };
    assert!(cut_off, "the server still read the client after {limit:?}");
    assert!(answers(&path), "and serves the next client");
}

#[test]
fn stopping_the_server_ends_a_stalled_client() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("api.sock");
    let server = start(&path).unwrap();
    let mut client = UnixStream::connect(&path).unwrap();
    client.write_all(b"{\"command\":").unwrap(); // and nothing more
                                                 // The server is inside that client's request now; stopping must not wait it out.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        drop(server);
        let _ = tx.send(());
    });
    rx.recv_timeout(CLIENT_DEADLINE / 2)
        .expect("the server stops without waiting for the stalled client");
}

/// `SO_PEERCRED`: a client of another user is refused even where the socket's mode would
/// let it connect.
#[test]
fn a_client_of_another_user_is_refused() {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED: needs root to run a client as another user");
        assert!(
            std::env::var_os("KITE_NO_SKIPS").is_none(),
            "CI runs as root"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = dir.path().join("api.sock");
    let _server = start(&path).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = std::process::Command::new(KITE)
        .args(["remote", "--api-socket", path.to_str().unwrap(), "info"])
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("permission denied"), "{stderr}");
    assert!(answers(&path), "root's client is served");
}
