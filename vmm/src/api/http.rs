//! HTTP/1.1 messages as the control socket sees them: the [`Request`] a handler gets, the
//! [`Response`] it gives, the parsing of a request head (with `httparse`) and the
//! encoding of a response head. No I/O here: see `connection` for that.

use std::fmt::Display;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TryRecvError};
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use serde_json::{json, Value};

use super::MAX_REQUEST;

/// Longest request head (request line and headers) read; a longer one gets 413.
pub const MAX_HEAD: usize = 8 << 10;

/// Most headers a request may have (a head of [`MAX_HEAD`] bytes holds more only if they
/// are nearly empty).
const MAX_HEADERS: usize = 128;

/// A request, once its body has arrived in full.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The method, as sent (`GET`, `PUT`, ...).
    pub method: String,
    /// The path, without the query (`?...`); not percent-decoded.
    pub path: String,
    /// The body (`Content-Length` bytes; empty without that header).
    pub body: Vec<u8>,
}

/// A handler's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The status code (200 to 599).
    pub status: u16,
    /// The JSON body, if any (never sent with 204).
    pub body: Option<Vec<u8>>,
}

impl Response {
    /// `204 No Content`.
    pub fn no_content() -> Self {
        Response {
            status: 204,
            body: None,
        }
    }

    /// `status` with `value` as its body.
    pub fn json(status: u16, value: &Value) -> Self {
        Response {
            status,
            body: Some(serde_json::to_vec(value).unwrap_or_default()),
        }
    }

    /// `status` with the body `{"error": message}`.
    pub fn error(status: u16, message: impl Display) -> Self {
        Self::json(status, &json!({"error": message.to_string()}))
    }
}

/// What answers requests: called on the control socket's thread, one request at a time.
/// It must not block: an answer that takes time (an action carried out by another
/// thread) is a [`Reply::Later`], which the connection waits for while others are served.
pub type Handler = Box<dyn FnMut(&Request) -> Reply + Send>;

/// A handler's reply: an answer now, or one another thread gives later.
pub enum Reply {
    /// The answer.
    Now(Response),
    /// An answer to come (see [`Deferred`]).
    Later(Deferred),
}

impl From<Response> for Reply {
    fn from(response: Response) -> Self {
        Reply::Now(response)
    }
}

/// An answer another thread gives later, through the [`Answerer`] made with it.
#[derive(Debug)]
pub struct Deferred {
    ready: Arc<EventFd>,
    answer: Receiver<Response>,
}

/// Gives a [`Deferred`] its answer, from any thread.
pub struct Answerer {
    ready: Arc<EventFd>,
    answer: Option<SyncSender<Response>>,
}

impl Deferred {
    /// A deferred answer and what gives it.
    pub fn new() -> std::io::Result<(Deferred, Answerer)> {
        // One descriptor for both (no dup: the API thread's filter allows no fcntl).
        let ready = Arc::new(EventFd::new(libc::EFD_NONBLOCK)?);
        let (tx, rx) = sync_channel(1);
        Ok((
            Deferred {
                ready: Arc::clone(&ready),
                answer: rx,
            },
            Answerer {
                ready,
                answer: Some(tx),
            },
        ))
    }

    /// Readable once the answer is there (or its answerer is gone).
    pub fn fd(&self) -> RawFd {
        self.ready.as_raw_fd()
    }

    /// The answer, if it has come; a 500 if its answerer went away without one.
    pub fn try_take(&self) -> Option<Response> {
        match self.answer.try_recv() {
            Ok(response) => Some(response),
            Err(TryRecvError::Empty) => None,
            Err(TryRecvError::Disconnected) => Some(Response::error(
                500,
                "the VMM ended without carrying the request out",
            )),
        }
    }

    /// Waits for the answer, `timeout` at most (for callers outside the server: tests,
    /// fuzzing).
    pub fn wait(self, timeout: std::time::Duration) -> Option<Response> {
        self.answer.recv_timeout(timeout).ok()
    }
}

impl Answerer {
    /// Gives the answer (dropped if the connection has gone).
    pub fn answer(mut self, response: Response) {
        if let Some(answer) = self.answer.take() {
            let _ = answer.try_send(response);
        }
        // Dropped now: the connection is woken.
    }
}

impl Drop for Answerer {
    /// Wakes the connection: with the answer, or, if none was given, to send a 500 at once
    /// rather than wait for its deadline.
    fn drop(&mut self) {
        drop(self.answer.take());
        if let Err(e) = self.ready.write(1) {
            log::error!("API: cannot signal an answer: {e}");
        }
    }
}

/// A parsed request head.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Head {
    pub method: String,
    pub path: String,
    /// `Content-Length`, at most [`MAX_REQUEST`].
    pub content_length: usize,
    /// The connection ends after this request (`Connection: close`, or HTTP/1.0).
    pub close: bool,
    /// The client waits for `100 Continue` before it sends the body.
    pub expect_continue: bool,
}

/// Whether a head has arrived in full, and its length.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Parsed {
    /// More bytes are needed.
    Partial,
    /// The head, and how many bytes it took.
    Complete(Head, usize),
}

/// A request refused before it reaches the handler: sent as an error response, after
/// which the connection closes.
pub(super) type Refusal = Response;

/// Parses the request head at the start of `buf`.
pub(super) fn parse_head(buf: &[u8]) -> Result<Parsed, Refusal> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let len = match request.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => return Err(head_too_large()),
        Ok(httparse::Status::Partial) => return Ok(Parsed::Partial),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Response::error(
                431,
                format!("more than {MAX_HEADERS} request headers"),
            ))
        }
        Err(e) => return Err(Response::error(400, format!("malformed request: {e}"))),
    };
    if len > MAX_HEAD {
        return Err(head_too_large());
    }
    // Complete: method, path and version are there.
    let method = request.method.unwrap_or_default().to_string();
    let target = request.path.unwrap_or_default();
    if !target.starts_with('/') {
        return Err(Response::error(
            400,
            format!("the request target '{target}' is not a path"),
        ));
    }
    let path = target.split(['?', '#']).next().unwrap_or_default();
    let http_1_0 = request.version == Some(0);
    let mut head = Head {
        method,
        path: path.to_string(),
        content_length: 0,
        close: http_1_0,
        expect_continue: false,
    };
    let mut length = None;
    for header in request.headers.iter() {
        let name = header.name;
        let value = std::str::from_utf8(header.value).map(str::trim);
        if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(Response::error(
                411,
                "Transfer-Encoding (chunked bodies) is not supported: send Content-Length",
            ));
        } else if name.eq_ignore_ascii_case("content-length") {
            // Digits only: Rust's parse takes `+1`, which other parsers may read otherwise.
            let parsed = value
                .ok()
                .filter(|v| v.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|v| v.parse::<u64>().ok());
            match (parsed, length) {
                (None, _) => return Err(Response::error(400, "malformed Content-Length")),
                (Some(new), Some(old)) if new != old => {
                    return Err(Response::error(400, "conflicting Content-Length headers"))
                }
                (Some(new), _) => length = Some(new),
            }
        } else if name.eq_ignore_ascii_case("connection") {
            for option in value.unwrap_or_default().split(',').map(str::trim) {
                // HTTP/1.0 keep-alive is not offered: such a client gets one request.
                head.close |= option.eq_ignore_ascii_case("close");
            }
        } else if name.eq_ignore_ascii_case("expect") {
            if !value.is_ok_and(|v| v.eq_ignore_ascii_case("100-continue")) {
                return Err(Response::error(
                    417,
                    "only Expect: 100-continue is supported",
                ));
            }
            head.expect_continue = !http_1_0;
        }
    }
    let length = length.unwrap_or(0);
    if length > MAX_REQUEST {
        // Refused from the header alone: the body is never read into memory.
        return Err(Response::error(
            413,
            format!("request body larger than {MAX_REQUEST} bytes"),
        ));
    }
    head.content_length = length as usize;
    Ok(Parsed::Complete(head, len))
}

fn head_too_large() -> Refusal {
    Response::error(
        413,
        format!("request header block larger than {MAX_HEAD} bytes"),
    )
}

/// The interim response to `Expect: 100-continue`.
pub(super) const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// `response` as bytes on the wire; with `Connection: close` if the connection ends after
/// it.
pub(super) fn encode(response: &Response, close: bool) -> Vec<u8> {
    let mut status = response.status;
    let mut body = response.body.as_deref();
    if !(200..=599).contains(&status) {
        log::warn!("control socket: the handler answered status {status}; sending 500");
        status = 500;
        body = None;
    }
    let mut out = format!("HTTP/1.1 {status} {}\r\nServer: kite\r\n", reason(status));
    if close {
        out.push_str("Connection: close\r\n");
    }
    if status == 204 {
        // RFC 9110: no body, and no Content-Length, in a 204.
        body = None;
    } else if let Some(body) = body {
        out.push_str("Content-Type: application/json\r\n");
        out.push_str(&format!("Content-Length: {}\r\n", body.len()));
    } else {
        out.push_str("Content-Length: 0\r\n");
    }
    out.push_str("\r\n");
    let mut out = out.into_bytes();
    out.extend_from_slice(body.unwrap_or_default());
    out
}

/// The reason phrase of `status`.
fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        415 => "Unsupported Media Type",
        417 => "Expectation Failed",
        422 => "Unprocessable Content",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn complete(buf: &[u8]) -> (Head, usize) {
        match parse_head(buf) {
            Ok(Parsed::Complete(head, len)) => (head, len),
            other => panic!("{other:?}"),
        }
    }

    fn refused(buf: &[u8]) -> u16 {
        match parse_head(buf) {
            Err(response) => response.status,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_request_head_is_parsed() {
        let buf = b"PUT /api/v1/vm.resize?x=1 HTTP/1.1\r\nHost: l\r\nContent-Length: 12\r\n\
                    Expect: 100-continue\r\n\r\n{\"a\": 1}";
        let (head, len) = complete(buf);
        assert_eq!(len, buf.len() - 8);
        assert_eq!(
            head,
            Head {
                method: "PUT".into(),
                path: "/api/v1/vm.resize".into(),
                content_length: 12,
                close: false,
                expect_continue: true,
            }
        );
        assert!(complete(b"GET / HTTP/1.0\r\n\r\n").0.close);
        assert!(
            complete(b"GET / HTTP/1.1\r\nConnection: keep-alive, Close\r\n\r\n")
                .0
                .close
        );
        assert_eq!(parse_head(b"GET / HTTP/1.1\r\nHost:"), Ok(Parsed::Partial));
    }

    #[test]
    fn bad_heads_are_refused_with_their_status() {
        assert_eq!(refused(b"GET /\r\n\r\n"), 400);
        assert_eq!(refused(b"GET / HTTP/1.1\r\nBad Header\r\n\r\n"), 400);
        assert_eq!(
            refused(b"GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n"),
            400
        );
        assert_eq!(
            refused(b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"),
            400
        );
        assert_eq!(refused(b"GET * HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(refused(b"GET /\xff HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(
            refused(b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            411
        );
        assert_eq!(
            refused(b"PUT / HTTP/1.1\r\nContent-Length: 65537\r\n\r\n"),
            413
        );
        assert_eq!(refused(b"PUT / HTTP/1.1\r\nExpect: teapot\r\n\r\n"), 417);
        let mut long = b"GET / HTTP/1.1\r\nX: ".to_vec();
        long.resize(MAX_HEAD + 1, b'a');
        assert_eq!(refused(&long), 413);
    }

    #[test]
    fn responses_are_encoded() {
        let ok = encode(&Response::json(200, &json!({"a": 1})), false);
        assert_eq!(
            String::from_utf8(ok).unwrap(),
            "HTTP/1.1 200 OK\r\nServer: kite\r\nContent-Type: application/json\r\n\
             Content-Length: 7\r\n\r\n{\"a\":1}"
        );
        let none = encode(&Response::no_content(), true);
        assert_eq!(
            String::from_utf8(none).unwrap(),
            "HTTP/1.1 204 No Content\r\nServer: kite\r\nConnection: close\r\n\r\n"
        );
        let empty = encode(
            &Response {
                status: 202,
                body: None,
            },
            false,
        );
        assert!(String::from_utf8(empty)
            .unwrap()
            .contains("Content-Length: 0\r\n"));
    }
}
