//! The control socket's client (`kite remote`, tests): one HTTP/1.1 request per
//! connection, with a deadline for the whole exchange.

use std::io::{Error, ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use super::http::MAX_HEAD;

/// Largest response body read.
const MAX_RESPONSE: usize = 16 << 20;

/// Sends `method path` with `body` (JSON) to the control socket at `socket` and returns
/// the status and body of the answer; fails if that takes longer than `timeout` in all.
pub fn request(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    timeout: Duration,
) -> std::io::Result<(u16, Vec<u8>)> {
    let deadline = Instant::now() + timeout;
    let mut stream = UnixStream::connect(socket)?;
    let body = body.unwrap_or_default();
    let mut message = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\
         Connection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !body.is_empty() {
        message.push_str("Content-Type: application/json\r\n");
    }
    message.push_str("\r\n");
    let mut message = message.into_bytes();
    message.extend_from_slice(body);
    set_timeouts(&stream, deadline)?;
    match stream.write_all(&message) {
        // The server may answer (a refusal) before it has read the whole request.
        Err(e) if matches!(e.kind(), ErrorKind::BrokenPipe | ErrorKind::ConnectionReset) => {}
        other => other?,
    }
    read_response(&mut stream, deadline)
}

/// Sets the socket's timeouts to what is left until `deadline`.
fn set_timeouts(stream: &UnixStream, deadline: Instant) -> std::io::Result<()> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(Error::new(ErrorKind::TimedOut, "no answer in time"));
    }
    stream.set_read_timeout(Some(left))?;
    stream.set_write_timeout(Some(left))
}

/// Reads a response (after any interim `1xx` ones) from `stream`.
fn read_response(stream: &mut UnixStream, deadline: Instant) -> std::io::Result<(u16, Vec<u8>)> {
    let mut buf = Vec::new();
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut response = httparse::Response::new(&mut headers);
        let parsed = response
            .parse(&buf)
            .map_err(|e| Error::new(ErrorKind::InvalidData, format!("bad response: {e}")))?;
        let httparse::Status::Complete(len) = parsed else {
            if buf.len() > MAX_HEAD {
                return Err(Error::new(ErrorKind::InvalidData, "response head too long"));
            }
            if read_some(stream, &mut buf, deadline)? == 0 {
                return Err(Error::new(ErrorKind::UnexpectedEof, "no (whole) answer"));
            }
            continue;
        };
        let status = response.code.unwrap_or_default();
        let length = response
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("content-length"))
            .map(|h| {
                std::str::from_utf8(h.value)
                    .ok()?
                    .trim()
                    .parse::<usize>()
                    .ok()
            });
        buf.drain(..len);
        if (100..200).contains(&status) {
            continue; // 100 Continue: the answer follows
        }
        let length = match length {
            Some(Some(n)) if n <= MAX_RESPONSE => Some(n),
            Some(_) => return Err(Error::new(ErrorKind::InvalidData, "bad Content-Length")),
            None if status == 204 || status == 304 => Some(0),
            None => None, // to the end of the stream
        };
        while length.is_none_or(|n| buf.len() < n) {
            if buf.len() > MAX_RESPONSE {
                return Err(Error::new(ErrorKind::InvalidData, "response too long"));
            }
            if read_some(stream, &mut buf, deadline)? == 0 {
                if length.is_some() {
                    return Err(Error::new(ErrorKind::UnexpectedEof, "answer cut short"));
                }
                break;
            }
        }
        buf.truncate(length.unwrap_or(buf.len()));
        return Ok((status, buf));
    }
}

/// One read into `buf`, before `deadline`.
fn read_some(
    stream: &mut UnixStream,
    buf: &mut Vec<u8>,
    deadline: Instant,
) -> std::io::Result<usize> {
    let mut chunk = [0u8; 16 << 10];
    loop {
        set_timeouts(stream, deadline)?;
        match stream.read(&mut chunk) {
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                return Ok(n);
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                return Err(Error::new(ErrorKind::TimedOut, "no answer in time"))
            }
            Err(e) => return Err(e),
        }
    }
}
