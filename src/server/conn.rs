//! A deadline for each request's header, below HTTP.
//!
//! `axum::serve` gives hyper no timer, so hyper's own `header_read_timeout` is off: a client that connects and
//! sends nothing, or sends its header a byte a second and never ends it (a "slowloris"), held its connection, a
//! task and a file descriptor for as long as it liked, and enough of them exhaust the process's open-files
//! limit so that nobody else can connect. [`HeaderDeadlineListener`] wraps each accepted connection in
//! [`HeaderDeadline`], which fails the connection's reads (hyper then drops it) when a request's header has not
//! fully arrived within the timeout of its first byte, or of the connection's start for the first request.
//! Once a header has arrived the deadline is off: reading the body, generating the reply and streaming it take
//! as long as they take.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, Sleep};

/// A TCP listener whose connections must send each request's header within `timeout`.
pub(crate) struct HeaderDeadlineListener {
    pub inner: TcpListener,
    pub timeout: Duration,
}

impl axum::serve::Listener for HeaderDeadlineListener {
    type Io = HeaderDeadline<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        // axum's own accept loop: it retries (after a pause, for EMFILE and the like) rather than failing.
        let (io, addr) = axum::serve::Listener::accept(&mut self.inner).await;
        (HeaderDeadline::new(io, self.timeout), addr)
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// Where a connection is between requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Waiting for (the rest of) a request's header: the deadline runs.
    Header,
    /// The header has arrived; no reply has started yet (an interim `100 Continue` does not count).
    Request,
    /// A reply has started; the next bytes read begin the next request's header.
    Replied,
}

/// A connection whose reads fail with [`io::ErrorKind::TimedOut`] once a request's header is late.
///
/// The end of a header is found by watching the bytes read for an empty line (`\r\n\r\n`, or `\n\n` as hyper's
/// parser also accepts); bytes read after it (a body, pipelined requests) are not looked at until a reply has
/// started. A pipelined request whose header was read with an earlier request's body therefore gets the
/// deadline while it runs, if its own body is still arriving: no common client pipelines, and hyper serves
/// pipelined requests one at a time anyway.
pub(crate) struct HeaderDeadline<T> {
    inner: T,
    timeout: Duration,
    deadline: Pin<Box<Sleep>>,
    phase: Phase,
    /// The last two bytes of the header read so far (`\n\r` before a final `\n` ends it).
    tail: [u8; 2],
}

impl<T> HeaderDeadline<T> {
    pub(crate) fn new(inner: T, timeout: Duration) -> HeaderDeadline<T> {
        HeaderDeadline {
            inner,
            timeout,
            deadline: Box::pin(tokio::time::sleep(timeout)),
            phase: Phase::Header,
            tail: [0; 2],
        }
    }

    /// Follows the header through newly read `bytes`.
    fn saw(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        if self.phase == Phase::Replied {
            self.phase = Phase::Header;
            self.tail = [0; 2];
            self.deadline.as_mut().reset(Instant::now() + self.timeout);
        }
        if self.phase != Phase::Header {
            return;
        }
        for &b in bytes {
            if b == b'\n' && (self.tail[1] == b'\n' || self.tail == *b"\n\r") {
                self.phase = Phase::Request;
                return;
            }
            self.tail = [self.tail[1], b];
        }
    }

    /// Notes that `first`, the start of a write, went out.
    fn wrote(&mut self, first: &[u8]) {
        // hyper writes a reply's status line at the start of its first write; `HTTP/1.1 1xx` is interim.
        if self.phase == Phase::Request && !first.starts_with(b"HTTP/1.1 1") {
            self.phase = Phase::Replied;
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for HeaderDeadline<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // Polled before reading, so that a client sending nothing at all still wakes the connection at the deadline.
        if this.phase == Phase::Header && this.deadline.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "the request's header did not arrive within {} s",
                    this.timeout.as_secs_f64()
                ),
            )));
        }
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        let filled = buf.filled();
        this.saw(&filled[before..]);
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for HeaderDeadline<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let n = ready!(Pin::new(&mut this.inner).poll_write(cx, buf))?;
        if n > 0 {
            this.wrote(buf);
        }
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let n = ready!(Pin::new(&mut this.inner).poll_write_vectored(cx, bufs))?;
        if n > 0 {
            let first = bufs.iter().find(|b| !b.is_empty()).map_or(&[][..], |b| b);
            this.wrote(first);
        }
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_deadline_holds_from_the_first_byte_to_the_end_of_each_header() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        runtime.block_on(async {
            let mut c = HeaderDeadline::new((), Duration::from_secs(5));
            c.saw(b"GET / HTTP/1.1\r\nHost: x\r\n");
            assert_eq!(c.phase, Phase::Header);
            c.saw(b"\r");
            c.saw(b"\n{\"a\": 1}");
            assert_eq!(c.phase, Phase::Request);
            // An interim reply does not end the request; the body after it is not a header.
            c.wrote(b"HTTP/1.1 100 Continue\r\n\r\n");
            c.saw(b"{\"b\": 2}");
            assert_eq!(c.phase, Phase::Request);
            c.wrote(b"HTTP/1.1 200 OK\r\n");
            assert_eq!(c.phase, Phase::Replied);
            // The next request's first bytes restart the deadline; bare newlines end a header too.
            c.saw(b"GET /health HTTP/1.1\nHost: x\n");
            assert_eq!(c.phase, Phase::Header);
            c.saw(b"\n");
            assert_eq!(c.phase, Phase::Request);
        });
    }
}
