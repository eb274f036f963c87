//! The control socket against hostile or careless hosts: a path another process listens
//! on, stale sockets, sockets replaced behind Kite's back, clients of another user; and
//! its HTTP/1.1 transport: keep-alive, pipelining, `100 Continue`, malformed, oversized,
//! slow and stalled clients, too many of them. The server answers with a trivial handler
//! here: no VM is needed.

mod http_client;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::time::Duration;

use http_client::{start, Client, BIG};
use vmm::api::{request, ApiError, CLIENT_DEADLINE, MAX_CONNECTIONS};

const KITE: &str = env!("CARGO_BIN_EXE_kite");

fn answers(path: &Path) -> bool {
    request(path, "GET", "/ping", None, Duration::from_secs(10)).is_ok_and(|(s, _)| s == 200)
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
    assert!(stderr.contains("(403): permission denied"), "{stderr}");
    assert!(answers(&path), "root's client is served");
}

/// A GET, then two requests pipelined in one write, then `Connection: close`: all on one
/// connection, each answered in order with the transport's headers.
#[test]
fn keep_alive_serves_requests_in_order_on_one_connection() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("api.sock");
    let _server = start(&path).unwrap();
    let mut client = Client::connect(&path);
    client.send(b"GET /api/v1/vm.info?x=1 HTTP/1.1\r\nHost: kite\r\n\r\n");
    let first = client.reply();
    assert_eq!((first.status, first.reason.as_str()), (200, "OK"));
    assert_eq!(first.header("server"), Some("kite"));
    assert_eq!(first.header("content-type"), Some("application/json"));
    assert_eq!(first.header("connection"), None);
    assert_eq!(first.json()["path"], "/api/v1/vm.info", "without the query");
    client.send(
        b"PUT /a HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello\
          GET /empty HTTP/1.1\r\n\r\n",
    );
    let second = client.reply();
    assert_eq!(second.json()["method"], "PUT");
    assert_eq!(second.json()["body"], "hello");
    let third = client.reply();
    assert_eq!((third.status, third.reason.as_str()), (204, "No Content"));
    assert_eq!(third.header("content-length"), None, "204 has no body");
    assert!(third.body.is_empty());
    // A body-bearing method without Content-Length: an empty body.
    client.send(b"PUT /last HTTP/1.1\r\nConnection: close\r\n\r\n");
    let last = client.reply();
    assert_eq!(last.json()["body"], "");
    assert_eq!(last.header("connection"), Some("close"));
    assert!(client.at_end(), "Connection: close is honoured");

    let mut old = Client::connect(&path);
    old.send(b"GET /old HTTP/1.0\r\n\r\n");
    assert_eq!(old.reply().status, 200);
    assert!(old.at_end(), "an HTTP/1.0 client gets one answer");
}

/// Each kind of bad request gets its status and a JSON error, then the connection
/// closes; the server goes on serving.
#[test]
fn bad_requests_get_an_error_status_and_are_closed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("api.sock");
    let _server = start(&path).unwrap();
    let mut huge_head = b"GET / HTTP/1.1\r\nX-Padding: ".to_vec();
    huge_head.resize(9 << 10, b'a');
    let cases: [(&[u8], u16, &str); 8] = [
        (b"GARBAGE\r\n\r\n", 400, "malformed"),
        (b"GET / HTTP/1.1\r\nNo colon here\r\n\r\n", 400, "malformed"),
        (b"GET /\xff\xfe HTTP/1.1\r\n\r\n", 400, "malformed"),
        (b"GET example.org HTTP/1.1\r\n\r\n", 400, "not a path"),
        (&huge_head, 413, "header block larger than"),
        (
            b"PUT / HTTP/1.1\r\nContent-Length: 65537\r\n\r\n",
            413,
            "body larger than",
        ),
        (
            b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            411,
            "Transfer-Encoding",
        ),
        (
            b"PUT / HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n",
            400,
            "conflicting",
        ),
    ];
    for (request, status, message) in cases {
        let mut client = Client::connect(&path);
        client.send(request);
        let reply = client.reply();
        let shown = String::from_utf8_lossy(&request[..request.len().min(60)]).into_owned();
        assert_eq!(reply.status, status, "{shown}: {reply:?}");
        assert_eq!(reply.header("content-type"), Some("application/json"));
        assert!(reply.error().contains(message), "{shown}: {reply:?}");
        assert!(client.at_end(), "{shown}: closed after the error");
    }
    assert!(answers(&path));
}

/// An oversized body is refused from its Content-Length at once, without waiting for it
/// (nor keeping it); a client that sends it anyway still gets the answer.
#[test]
fn an_oversized_body_gets_413_without_being_read() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("api.sock");
    let _server = start(&path).unwrap();
    let body = vec![b'x'; vmm::api::MAX_REQUEST as usize + 1];
    let (status, reply) = request(&path, "PUT", "/", Some(&body), Duration::from_secs(10)).unwrap();
    assert_eq!(status, 413, "{}", String::from_utf8_lossy(&reply));

    // The head alone: the answer does not wait for the body.
    let mut client = Client::connect(&path);
    let started = std::time::Instant::now();
    client.send(b"PUT / HTTP/1.1\r\nContent-Length: 1000000000\r\n\r\n");
    assert_eq!(client.reply().status, 413);
    assert!(started.elapsed() < CLIENT_DEADLINE / 5);
    // Sending the body anyway (a client that does not look): it is drained, not
    // refused mid-way, until the client closes.
    let chunk = vec![b'x'; 1 << 20];
    for _ in 0..8 {
        client.send(&chunk);
    }
    assert!(client.at_end());
}

/// `Expect: 100-continue` (what curl sends before a large body) gets `100 Continue`
/// before the body is sent.
#[test]
fn expect_100_continue_is_answered() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("api.sock");
    let _server = start(&path).unwrap();
    let mut client = Client::connect(&path);
    client.send(b"PUT /put HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n");
    let interim = client.reply();
    assert_eq!((interim.status, interim.reason.as_str()), (100, "Continue"));
    client.send(b"body");
    let reply = client.reply();
    assert_eq!(reply.json()["body"], "body");

    let curl = std::process::Command::new("curl").arg("--version").output();
    if curl.is_err() {
        eprintln!("SKIPPED (curl part): curl is not installed (apt-get install curl)");
        assert!(
            std::env::var_os("KITE_NO_SKIPS").is_none(),
            "curl is missing"
        );
        return;
    }
    let body = dir.path().join("body.json");
    let text = format!("{{\"padding\": \"{}\"}}", "x".repeat(4000));
    std::fs::write(&body, &text).unwrap();
    // Without the 100, curl would wait out its 4 s before sending the body.
    let started = std::time::Instant::now();
    let out = std::process::Command::new("curl")
        .args(["-sS", "-v", "--max-time", "10", "--expect100-timeout", "4"])
        .args([
            "-H",
            "Expect: 100-continue",
            "-H",
            "Content-Type: application/json",
        ])
        .args(["-X", "PUT", "--data-binary"])
        .arg(format!("@{}", body.display()))
        .arg("--unix-socket")
        .arg(&path)
        .arg("http://localhost/api/v1/vm.resize")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("HTTP/1.1 100 Continue"), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(2), "{stderr}");
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(reply["body"], text.as_str());
    assert_eq!(reply["method"], "PUT");
}

/// Clients stalled mid-headers, mid-body and idle hold up nobody: others are answered at
/// once, and the stalled ones are cut at their deadline (408 if a request was under way).
#[test]
fn stalled_clients_do_not_hold_up_others_and_are_cut_at_the_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("api.sock");
    let _server = start(&path).unwrap();
    let mut headers = Client::connect(&path);
    headers.send(b"PUT /stalled HTTP/1.1\r\nHost: kite\r\nContent-Le");
    let stalled_at = std::time::Instant::now();
    let mut body = Client::connect(&path);
    body.send(b"PUT /stalled HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"half\":");
    let mut idle = Client::connect(&path);
    let clients: Vec<_> = (0..8)
        .map(|i| {
            let path = path.clone();
            std::thread::spawn(move || {
                let started = std::time::Instant::now();
                let body = format!("{{\"client\": {i}}}");
                let timeout = Duration::from_secs(10);
                let (status, _) =
                    request(&path, "PUT", "/x", Some(body.as_bytes()), timeout).expect("an answer");
                assert_eq!(status, 200);
                started.elapsed()
            })
        })
        .collect();
    for client in clients {
        let took = client.join().unwrap();
        assert!(took < CLIENT_DEADLINE / 5, "a client waited {took:?}");
    }
    for (name, client) in [("mid-headers", &mut headers), ("mid-body", &mut body)] {
        let cut = client.wait_closed(CLIENT_DEADLINE * 3);
        assert!(cut.is_some(), "{name}: never cut");
        let since = stalled_at.elapsed();
        assert!(
            since >= CLIENT_DEADLINE - Duration::from_millis(200)
                && since < CLIENT_DEADLINE + Duration::from_secs(1),
            "{name}: cut after {since:?}"
        );
        let reply = client.reply();
        assert_eq!(reply.status, 408, "{name}");
        assert!(client.at_end(), "{name}");
    }
    assert!(
        idle.wait_closed(Duration::from_secs(2)).is_some(),
        "the idle one too"
    );
    assert!(idle.at_end(), "an idle connection is closed without a 408");
}

/// A client that does not read its (large) answer is cut at its deadline too, and holds
/// nobody up meanwhile.
#[test]
fn a_client_not_reading_its_answer_is_cut_at_the_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("api.sock");
    let _server = start(&path).unwrap();
    let mut client = Client::connect(&path);
    client.send(b"GET /big HTTP/1.1\r\n\r\n");
    let started = std::time::Instant::now();
    let timeout = Duration::from_secs(10);
    assert_eq!(request(&path, "GET", "/x", None, timeout).unwrap().0, 200);
    assert!(started.elapsed() < CLIENT_DEADLINE / 5);
    let cut = client.wait_closed(CLIENT_DEADLINE * 3).expect("cut off");
    assert!(
        cut >= CLIENT_DEADLINE - Duration::from_millis(200)
            && cut < CLIENT_DEADLINE + Duration::from_secs(1),
        "cut after {cut:?}"
    );
    let mut received = Vec::new();
    let _ = std::io::Read::read_to_end(&mut client.stream, &mut received);
    assert!(received.len() < BIG, "the answer was not all sent");
}

/// A client sending a byte now and then never completes a request: it is cut at the
/// deadline of that request all the same.
#[test]
fn a_client_trickling_bytes_is_cut_off_at_its_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("api.sock");
    let _server = start(&path).unwrap();
    let mut client = Client::connect(&path);
    client.send(b"GET / HTTP/1.1\r\nX-Slow: ");
    let started = std::time::Instant::now();
    // One byte every 100 ms (the pace under test, not a synchronisation).
    while client.wait_closed(Duration::from_millis(100)).is_none() {
        assert!(started.elapsed() < CLIENT_DEADLINE * 3, "never cut off");
        if std::io::Write::write_all(&mut client.stream, b"a").is_err() {
            break; // cut off between the two calls
        }
    }
    let cut = started.elapsed();
    assert!(
        cut >= CLIENT_DEADLINE - Duration::from_millis(200)
            && cut < CLIENT_DEADLINE + Duration::from_secs(1),
        "cut after {cut:?}"
    );
    assert_eq!(client.reply().status, 408);
    assert!(answers(&path), "and the next client is served");
}

/// At most MAX_CONNECTIONS are open: one more gets 503 and is closed; once one closes,
/// a new client is served again.
#[test]
fn one_connection_too_many_gets_503() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("api.sock");
    let _server = start(&path).unwrap();
    let mut open: Vec<_> = (0..MAX_CONNECTIONS)
        .map(|_| Client::connect(&path))
        .collect();
    let mut extra = Client::connect(&path);
    let busy = extra.reply();
    assert_eq!(busy.status, 503, "{busy:?}");
    assert!(busy.error().contains("too many connections"));
    assert!(extra.at_end());
    // Those open are served.
    open[0].send(b"GET /still HTTP/1.1\r\n\r\n");
    assert_eq!(open[0].reply().status, 200);
    drop(open.pop());
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (status, _) = request(&path, "GET", "/", None, Duration::from_secs(5)).unwrap();
        if status == 200 {
            break;
        }
        assert_eq!(status, 503);
        assert!(
            std::time::Instant::now() < deadline,
            "a freed slot is never reused"
        );
    }
}

/// Dropping the server (the VM stopping) ends it promptly, whatever its clients do.
#[test]
fn stopping_the_server_ends_stalled_clients() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("api.sock");
    let server = start(&path).unwrap();
    let mut headers = Client::connect(&path);
    headers.send(b"GET / HTTP/1.1\r\nHos");
    let mut body = Client::connect(&path);
    body.send(b"PUT / HTTP/1.1\r\nContent-Length: 10\r\n\r\n12345");
    let mut not_reading = Client::connect(&path);
    not_reading.send(b"GET /big HTTP/1.1\r\n\r\n");
    let _idle = Client::connect(&path);
    assert!(answers(&path), "all of them were accepted before this one");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        drop(server);
        let _ = tx.send(());
    });
    rx.recv_timeout(Duration::from_secs(1))
        .expect("the server stops within 1 s, stalled clients or not");
    for client in [&headers, &body, &not_reading] {
        assert!(client.wait_closed(Duration::from_secs(1)).is_some());
    }
}

/// A handler that takes long (an action on the VM's life, a boot or a shutdown, may take
/// seconds) holds every other connection up; that time is not counted against them: a
/// kept-alive client that sent its next request meanwhile is answered, not cut off.
#[test]
fn time_spent_on_a_slow_answer_does_not_count_against_other_clients() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("api.sock");
    let (started, slow_began) = std::sync::mpsc::channel();
    let handler = Box::new(move |r: &vmm::api::Request| {
        if r.path == "/slow" {
            let _ = started.send(());
            // The work of a slow action, not synchronisation.
            std::thread::sleep(CLIENT_DEADLINE + Duration::from_secs(1));
        }
        vmm::api::Response::no_content().into()
    });
    let _server =
        vmm::api::ApiServer::start(&path, handler, memory::ThreadHooks::default()).unwrap();
    let mut waiting = Client::connect(&path);
    waiting.send(b"GET /first HTTP/1.1\r\n\r\n");
    assert_eq!(waiting.reply().status, 204);
    let mut slow = Client::connect(&path);
    slow.send(b"PUT /slow HTTP/1.1\r\n\r\n");
    slow_began
        .recv_timeout(Duration::from_secs(10))
        .expect("the slow request is being answered");
    waiting.send(b"GET /second HTTP/1.1\r\n\r\n");
    assert_eq!(slow.reply().status, 204);
    assert_eq!(
        waiting.reply().status,
        204,
        "the waiting client is answered"
    );
}

/// An answer another thread gives later (an action carried out by the VMM thread): its
/// connection waits for it, others are served meanwhile, and it arrives when given.
#[test]
fn a_deferred_answer_holds_only_its_own_connection() {
    use std::sync::{Arc, Mutex};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("api.sock");
    let pending: Arc<Mutex<Vec<vmm::api::Answerer>>> = Arc::default();
    let (asked, answer_asked) = std::sync::mpsc::channel();
    let handler = {
        let pending = Arc::clone(&pending);
        Box::new(move |r: &vmm::api::Request| {
            if r.path == "/later" {
                let (deferred, answerer) = vmm::api::Deferred::new().unwrap();
                pending.lock().unwrap().push(answerer);
                let _ = asked.send(());
                return vmm::api::Reply::Later(deferred);
            }
            vmm::api::Response::no_content().into()
        })
    };
    let _server =
        vmm::api::ApiServer::start(&path, handler, memory::ThreadHooks::default()).unwrap();
    let mut later = Client::connect(&path);
    later.send(b"PUT /later HTTP/1.1\r\n\r\n");
    answer_asked
        .recv_timeout(Duration::from_secs(10))
        .expect("the handler was asked");
    // Others are served while the answer is awaited, past a client's deadline too.
    for _ in 0..3 {
        let mut other = Client::connect(&path);
        other.send(b"GET /other HTTP/1.1\r\nConnection: close\r\n\r\n");
        assert_eq!(other.reply().status, 204);
    }
    // A long action: past a client's deadline, the answer is still awaited.
    std::thread::sleep(CLIENT_DEADLINE + Duration::from_secs(1));
    let answerer = pending.lock().unwrap().pop().unwrap();
    answerer.answer(vmm::api::Response::json(
        200,
        &serde_json::json!({"done": true}),
    ));
    let reply = later.reply();
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json()["done"], true);
    // The connection goes on (keep-alive).
    later.send(b"GET /again HTTP/1.1\r\n\r\n");
    assert_eq!(later.reply().status, 204);
    // An answerer dropped without answering (its VMM gone): a 500 at once, not a wait.
    later.send(b"PUT /later HTTP/1.1\r\n\r\n");
    answer_asked
        .recv_timeout(Duration::from_secs(10))
        .expect("the handler was asked again");
    let start = std::time::Instant::now();
    drop(pending.lock().unwrap().pop().unwrap());
    let reply = later.reply();
    assert_eq!(reply.status, 500, "{:?}", reply.error());
    assert!(start.elapsed() < CLIENT_DEADLINE, "{:?}", start.elapsed());
}
