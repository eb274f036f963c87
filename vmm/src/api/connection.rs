//! One client connection of the control socket: a non-blocking state machine that the
//! server's poll loop drives. It reads a request head, then its body, has the handler
//! answer, writes the answer, and starts over (keep-alive) or closes; it never waits, so
//! one slow client cannot hold up the others.

use std::io::{ErrorKind, Read};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::Instant;

use super::http::{
    encode, parse_head, Deferred, Handler, Parsed, Reply, Request, Response, CONTINUE, MAX_HEAD,
};
use super::CLIENT_DEADLINE;

/// Longest a connection waits for a deferred answer (an action carried out by the VMM
/// thread: a boot, a shutdown of vCPUs and device threads).
pub const ANSWER_DEADLINE: std::time::Duration = std::time::Duration::from_secs(65);

/// Largest read of input that is dropped (lingering).
const DRAIN_CHUNK: usize = 16 << 10;

/// Where a connection is in its current request.
#[derive(Debug)]
enum State {
    /// Reading a request head (or waiting for one: keep-alive).
    Head,
    /// Reading the body of `request`: `remaining` bytes more.
    Body {
        request: Request,
        remaining: usize,
        close: bool,
    },
    /// Waiting for an answer another thread gives; nothing is read meanwhile.
    Awaiting { answer: Deferred, close: bool },
    /// Writing the answer; then closing (after lingering) or reading the next request.
    Answer { close: bool },
    /// The answer is out and our side shut: input is read and dropped until the client
    /// closes or the deadline passes. Closing at once with unread input would reset the
    /// connection, and the client might lose the answer (an error sent before its body).
    Linger,
}

/// What the server should do with a connection after driving it.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Next {
    /// Poll it again for [`Connection::events`], until [`Connection::deadline`].
    Wait,
    /// Drop it.
    Close,
}

/// A client connection.
pub(super) struct Connection {
    stream: UnixStream,
    state: State,
    /// Bytes read and not yet used: part of a head, or of what follows it.
    input: Vec<u8>,
    /// Bytes to write, from `written` on.
    output: Vec<u8>,
    written: usize,
    /// When the connection is dropped: [`CLIENT_DEADLINE`] after its current request's
    /// first byte, or after it was accepted or last answered while it is idle.
    deadline: Instant,
}

impl Connection {
    /// A connection accepted at `now`; `stream` must be non-blocking.
    pub fn new(stream: UnixStream, now: Instant) -> Self {
        Connection {
            stream,
            state: State::Head,
            input: Vec::new(),
            output: Vec::new(),
            written: 0,
            deadline: now + CLIENT_DEADLINE,
        }
    }

    /// A connection that only gets `response`, then closes.
    pub fn refused(stream: UnixStream, now: Instant, response: &Response) -> Self {
        let mut connection = Self::new(stream, now);
        connection.refuse(response);
        connection
    }

    /// When to give up on the connection.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Moves the deadline `by` later: the time the server spent answering another
    /// connection (an action on the VM's life can take seconds) is not this client's.
    pub fn postpone(&mut self, by: std::time::Duration) {
        self.deadline += by;
    }

    /// The poll events the connection waits for.
    pub fn events(&self) -> libc::c_short {
        let write = if self.written < self.output.len() {
            libc::POLLOUT
        } else {
            0
        };
        match self.state {
            // Nothing more is read before the answer is out: a client that does not read
            // its answers cannot make the server buffer without bound.
            State::Answer { .. } => libc::POLLOUT,
            // The answer's eventfd (see `fd`).
            State::Awaiting { .. } => libc::POLLIN,
            _ => libc::POLLIN | write,
        }
    }

    /// What to poll: the client's descriptor, or, while an answer is awaited, the
    /// eventfd that tells it has come.
    pub fn fd(&self) -> std::os::fd::RawFd {
        match &self.state {
            State::Awaiting { answer, .. } => answer.fd(),
            _ => self.stream.as_raw_fd(),
        }
    }

    /// Called when the deadline has passed: a request under way is told 408 if nothing of
    /// an answer is pending (one try: the connection is dropped either way).
    pub fn expire(&mut self) {
        let under_way = match self.state {
            State::Head => !self.input.is_empty(),
            State::Body { .. } => true,
            State::Awaiting { .. } => {
                let late = Response::error(
                    500,
                    format!("the VMM did not carry the request out within {ANSWER_DEADLINE:?}"),
                );
                let _ = send(&self.stream, &encode(&late, true));
                false
            }
            State::Answer { .. } | State::Linger => false,
        };
        if under_way && self.written == self.output.len() {
            let late = Response::error(
                408,
                format!("the request took longer than {CLIENT_DEADLINE:?}"),
            );
            let _ = send(&self.stream, &encode(&late, true));
        }
        // Closing with unread input resets the client's side (it may lose the answer):
        // drop what has come already, never waiting.
        let _ = self.stream.shutdown(std::net::Shutdown::Write);
        let mut scratch = [0u8; DRAIN_CHUNK];
        for _ in 0..4 {
            match (&self.stream).read(&mut scratch) {
                Ok(n) if n > 0 => {}
                _ => break,
            }
        }
    }

    /// When the server stops: an answer that has been given but not yet sent is sent,
    /// as far as the socket takes it now (never waiting).
    pub fn send_given_answer(&mut self) {
        if let State::Awaiting { answer, close } = &self.state {
            if let Some(response) = answer.try_take() {
                let bytes = encode(&response, *close);
                self.queue(&bytes);
                let _ = self.flush();
            }
        }
    }

    /// Does all that `revents` allows without waiting, answering requests with `handler`.
    pub fn drive(&mut self, revents: libc::c_short, handler: &mut Handler) -> Next {
        if revents & libc::POLLNVAL != 0 {
            return Next::Close;
        }
        if let State::Awaiting { answer, close } = &self.state {
            let Some(response) = answer.try_take() else {
                return Next::Wait;
            };
            let close = *close;
            self.queue(&encode(&response, close));
            self.state = State::Answer { close };
            return self.advance(handler);
        }
        if revents & (libc::POLLOUT | libc::POLLERR | libc::POLLHUP) != 0
            && self.written < self.output.len()
            && self.flush().is_err()
        {
            return Next::Close;
        }
        let readable = revents & (libc::POLLIN | libc::POLLERR | libc::POLLHUP) != 0;
        if readable && !matches!(self.state, State::Answer { .. }) {
            match self.fill() {
                Ok(0) => return self.ended(handler),
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(_) => return Next::Close,
            }
        }
        self.advance(handler)
    }

    /// The client closed its side (or the read end failed).
    fn ended(&mut self, handler: &mut Handler) -> Next {
        match self.state {
            State::Head if self.input.is_empty() => Next::Close,
            State::Head | State::Body { .. } => {
                self.refuse(&Response::error(400, "the request ended early"));
                self.advance(handler)
            }
            State::Awaiting { .. } | State::Answer { .. } | State::Linger => Next::Close,
        }
    }

    /// One read, of what the current state can use (never in [`State::Answer`]).
    fn fill(&mut self) -> std::io::Result<usize> {
        let want = match &self.state {
            // One byte past the limit tells a head that is too long.
            State::Head => (MAX_HEAD + 1).saturating_sub(self.input.len()),
            State::Body { remaining, .. } => remaining.saturating_sub(self.input.len()),
            State::Awaiting { .. } | State::Answer { .. } | State::Linger => {
                // Dropped as it comes, never kept.
                let mut scratch = [0u8; DRAIN_CHUNK];
                return (&self.stream).read(&mut scratch);
            }
        };
        let start = self.input.len();
        self.input.resize(start + want.max(1), 0);
        let read = (&self.stream).read(&mut self.input[start..]);
        self.input.truncate(start + *read.as_ref().unwrap_or(&0));
        if start == 0 && !self.input.is_empty() && matches!(self.state, State::Head) {
            // A new request's first byte: its own deadline starts.
            self.deadline = Instant::now() + CLIENT_DEADLINE;
        }
        read
    }

    /// Moves through the states as far as the input and the socket allow.
    fn advance(&mut self, handler: &mut Handler) -> Next {
        loop {
            match &mut self.state {
                State::Head => {
                    if self.input.is_empty() {
                        return Next::Wait;
                    }
                    match parse_head(&self.input) {
                        Ok(Parsed::Partial) => return Next::Wait,
                        Err(refusal) => self.refuse(&refusal),
                        Ok(Parsed::Complete(head, len)) => {
                            self.input.drain(..len);
                            if head.expect_continue && self.input.len() < head.content_length {
                                self.queue(CONTINUE);
                            }
                            self.state = State::Body {
                                request: Request {
                                    method: head.method,
                                    path: head.path,
                                    body: Vec::with_capacity(head.content_length),
                                },
                                remaining: head.content_length,
                                close: head.close,
                            };
                        }
                    }
                }
                State::Body {
                    request,
                    remaining,
                    close,
                } => {
                    let take = (*remaining).min(self.input.len());
                    request.body.extend(self.input.drain(..take));
                    *remaining -= take;
                    if *remaining > 0 {
                        return self.wait_or_close();
                    }
                    let close = *close;
                    match handler(request) {
                        Reply::Now(response) => {
                            self.queue(&encode(&response, close));
                            self.state = State::Answer { close };
                        }
                        Reply::Later(answer) => {
                            // Flush a `100 Continue` first; then only the answer counts.
                            if self.flush().is_err() {
                                return Next::Close;
                            }
                            self.deadline = Instant::now() + ANSWER_DEADLINE;
                            self.state = State::Awaiting { answer, close };
                            return Next::Wait;
                        }
                    }
                }
                State::Awaiting { .. } => return Next::Wait,
                State::Answer { close } => {
                    let close = *close;
                    if self.flush().is_err() {
                        return Next::Close;
                    }
                    if self.written < self.output.len() {
                        return Next::Wait;
                    }
                    if close {
                        // The client sees the end of the answer; its unread input drains.
                        let _ = self.stream.shutdown(std::net::Shutdown::Write);
                        self.input = Vec::new();
                        self.state = State::Linger;
                    } else {
                        // Idle from now on; bytes already here (pipelining) are the next
                        // request, whose deadline starts now too.
                        self.deadline = Instant::now() + CLIENT_DEADLINE;
                        self.state = State::Head;
                    }
                }
                State::Linger => return Next::Wait,
            }
        }
    }

    /// Flushes what is queued; waits if the socket is full.
    fn wait_or_close(&mut self) -> Next {
        match self.flush() {
            Ok(()) => Next::Wait,
            Err(_) => Next::Close,
        }
    }

    /// Sends `response`, then closes (the connection's input is not read any more).
    fn refuse(&mut self, response: &Response) {
        self.queue(&encode(response, true));
        self.state = State::Answer { close: true };
    }

    fn queue(&mut self, bytes: &[u8]) {
        if self.written == self.output.len() {
            self.output.clear();
            self.written = 0;
        }
        self.output.extend_from_slice(bytes);
    }

    /// Writes as much of the output as the socket takes now.
    fn flush(&mut self) -> std::io::Result<()> {
        while self.written < self.output.len() {
            match send(&self.stream, &self.output[self.written..]) {
                Ok(n) => self.written += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// One non-blocking `send`, without `SIGPIPE` when the client has gone.
pub(super) fn send(stream: &UnixStream, bytes: &[u8]) -> std::io::Result<usize> {
    // SAFETY: send(2) reads `bytes.len()` bytes from a live slice, on a socket we own.
    let n = unsafe {
        libc::send(
            stream.as_raw_fd(),
            bytes.as_ptr().cast(),
            bytes.len(),
            libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}
