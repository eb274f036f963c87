//! A raw HTTP client for the control socket's tests: it sends exactly the bytes it is
//! given and reads answers one by one, every wait bounded.

use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use memory::ThreadHooks;
use serde_json::json;
use vmm::api::{ApiError, ApiServer, Request, Response};

/// Longest any single wait of a test client lasts: past it the test fails.
pub const WAIT: Duration = Duration::from_secs(15);

/// How soon a connection the server means to close is closed.
pub const PROMPTLY: Duration = Duration::from_secs(2);

/// Body size of `/big`: more than a Unix socket buffers.
pub const BIG: usize = 8 << 20;

/// A server whose handler echoes the request as JSON; `/empty` answers 204, `/big` a
/// body of [`BIG`] bytes.
pub fn start(path: &Path) -> Result<ApiServer, ApiError> {
    let handler = Box::new(|r: &Request| {
        match r.path.as_str() {
            "/empty" => Response::no_content(),
            "/big" => Response {
                status: 200,
                body: Some(vec![b' '; BIG]),
            },
            _ => Response::json(
                200,
                &json!({
                    "method": r.method,
                    "path": r.path,
                    "body": String::from_utf8_lossy(&r.body),
                }),
            ),
        }
        .into()
    });
    ApiServer::start(path, handler, ThreadHooks::default())
}

/// An answer as received.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub reason: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    /// The value of header `name`, if there.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {:?}", String::from_utf8_lossy(&self.body)))
    }

    /// The `error` of a JSON error body.
    pub fn error(&self) -> String {
        self.json()["error"]
            .as_str()
            .expect("an error message")
            .into()
    }
}

/// A connection to the control socket.
pub struct Client {
    pub stream: UnixStream,
    input: Vec<u8>,
}

impl Client {
    pub fn connect(path: &Path) -> Self {
        let stream = UnixStream::connect(path).expect("connect");
        stream.set_read_timeout(Some(WAIT)).unwrap();
        stream.set_write_timeout(Some(WAIT)).unwrap();
        Client {
            stream,
            input: Vec::new(),
        }
    }

    /// Sends `bytes` (all of them, or fails the test).
    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("send");
    }

    /// Reads until `input` holds `n` bytes or the stream ends; false if it ended.
    fn fill(&mut self, n: usize) -> bool {
        let mut chunk = [0u8; 64 << 10];
        while self.input.len() < n {
            match self.stream.read(&mut chunk) {
                Ok(0) => return false,
                Ok(k) => self.input.extend_from_slice(&chunk[..k]),
                Err(e) if e.kind() == ErrorKind::ConnectionReset => return false,
                Err(e) => panic!("read: {e}"),
            }
        }
        true
    }

    /// The next answer (interim ones included); fails the test if none comes.
    pub fn reply(&mut self) -> Reply {
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut response = httparse::Response::new(&mut headers);
            match response.parse(&self.input).expect("a valid response") {
                httparse::Status::Complete(len) => {
                    let headers: Vec<(String, String)> = response
                        .headers
                        .iter()
                        .map(|h| {
                            let value = String::from_utf8_lossy(h.value).into_owned();
                            (h.name.to_string(), value)
                        })
                        .collect();
                    let mut reply = Reply {
                        status: response.code.unwrap(),
                        reason: response.reason.unwrap_or_default().to_string(),
                        headers,
                        body: Vec::new(),
                    };
                    let length = reply
                        .header("content-length")
                        .map_or(0, |v| v.parse::<usize>().expect("a numeric Content-Length"));
                    self.input.drain(..len);
                    assert!(self.fill(length), "the body was cut short: {reply:?}");
                    reply.body = self.input.drain(..length).collect();
                    return reply;
                }
                httparse::Status::Partial => {
                    let want = self.input.len() + 1;
                    let text = String::from_utf8_lossy(&self.input).into_owned();
                    assert!(
                        self.fill(want),
                        "the stream ended before an answer: {text:?}"
                    );
                }
            }
        }
    }

    /// Whether the server closes the connection now (nothing more to read, then the end
    /// within [`PROMPTLY`]: well before any deadline of the server's).
    pub fn at_end(&mut self) -> bool {
        self.stream.set_read_timeout(Some(PROMPTLY)).unwrap();
        let mut byte = [0u8; 1];
        let end = self.input.is_empty()
            && match self.stream.read(&mut byte) {
                Ok(0) => true,
                Err(e) => e.kind() == ErrorKind::ConnectionReset,
                Ok(_) => false,
            };
        self.stream.set_read_timeout(Some(WAIT)).unwrap();
        end
    }

    /// Waits until the server closes its side (not reading what it sent); how long that
    /// took, or `None` past `limit`.
    pub fn wait_closed(&self, limit: Duration) -> Option<Duration> {
        let start = Instant::now();
        let mut fd = libc::pollfd {
            fd: self.stream.as_raw_fd(),
            events: libc::POLLRDHUP,
            revents: 0,
        };
        loop {
            let left = limit.saturating_sub(start.elapsed());
            if left.is_zero() {
                return None;
            }
            // SAFETY: one valid pollfd, its count given.
            let n = unsafe { libc::poll(&mut fd, 1, left.as_millis() as i32 + 1) };
            if n > 0 {
                return Some(start.elapsed());
            }
        }
    }
}
