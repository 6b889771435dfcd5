//! Deadlines for each request's header, below HTTP.
//!
//! `axum::serve` gives hyper no timer, so hyper's own `header_read_timeout` is off: a client that connects and
//! sends nothing, or sends its header a byte a second and never ends it (a "slowloris"), or keeps an idle
//! keep-alive connection after its reply, held its connection, a task and a file descriptor for as long as it
//! liked, and enough of them exhaust the process's open-files limit so that nobody else can connect.
//! [`HeaderDeadlineListener`] wraps each accepted connection in [`HeaderDeadline`], which fails the connection's
//! reads (hyper then drops it) when a request's header has not fully arrived within the header timeout of its
//! first byte (of the connection's start, for the first request), or when a kept-alive connection has sent
//! nothing for the idle timeout since its last reply was written whole. Once a header has arrived the deadline
//! is off: reading the body (bounded separately, in `until_ready`), generating the reply and streaming it take
//! as long as they take. The HTTP side says when a reply has been written whole through the connection's
//! [`Peer::replies`] count ([`ReplyGuard`]): bytes alone cannot tell a finished reply from a stream waiting for
//! its next token.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, Sleep};

/// A TCP listener whose connections must send each request's header within `header_timeout` of its start, and
/// may stay idle between requests for `idle_timeout`.
pub(crate) struct HeaderDeadlineListener {
    pub inner: TcpListener,
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
}

/// A connection as the HTTP side sees it (`ConnectInfo<Peer>`): how many of its replies are still being
/// produced or written.
#[derive(Clone, Debug, Default)]
pub(crate) struct Peer {
    pub replies: Arc<Replies>,
}

/// A connection's replies not yet written whole, and the connection's reader to wake when the last one is:
/// hyper may have polled the read side while the reply was still running, and would not poll it again (to
/// start the idle deadline) until the client sent something.
#[derive(Debug, Default)]
pub(crate) struct Replies {
    count: AtomicUsize,
    reader: std::sync::Mutex<Option<std::task::Waker>>,
}

impl Replies {
    fn running(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    /// Wakes `waker` once no reply is running (at once, if none is).
    fn wake_when_done(&self, waker: &std::task::Waker) {
        let done = {
            let mut reader = self.reader.lock().unwrap_or_else(|p| p.into_inner());
            if !reader.as_ref().is_some_and(|w| w.will_wake(waker)) {
                *reader = Some(waker.clone());
            }
            // Checked after the waker is stored: a reply ending in between finds it and wakes it.
            if self.running() == 0 {
                reader.take()
            } else {
                None
            }
        };
        if let Some(w) = done {
            w.wake();
        }
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, HeaderDeadlineListener>>
    for Peer
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, HeaderDeadlineListener>) -> Peer {
        stream.remote_addr().clone()
    }
}

/// Counts one reply of a connection from the moment its request is taken until its body is dropped (written
/// whole, or abandoned).
pub(crate) struct ReplyGuard(Arc<Replies>);

impl ReplyGuard {
    pub(crate) fn new(peer: &Peer) -> ReplyGuard {
        peer.replies.count.fetch_add(1, Ordering::SeqCst);
        ReplyGuard(peer.replies.clone())
    }
}

impl Drop for ReplyGuard {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::SeqCst) == 1
            && let Some(w) = self
                .0
                .reader
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take()
        {
            w.wake();
        }
    }
}

/// A reply body that holds its [`ReplyGuard`] until it is dropped; frames, end and size pass through (a JSON
/// reply keeps its `Content-Length`).
pub(crate) struct GuardedBody {
    inner: axum::body::Body,
    _guard: ReplyGuard,
}

impl GuardedBody {
    pub(crate) fn new(inner: axum::body::Body, guard: ReplyGuard) -> GuardedBody {
        GuardedBody {
            inner,
            _guard: guard,
        }
    }
}

impl axum::body::HttpBody for GuardedBody {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl axum::serve::Listener for HeaderDeadlineListener {
    type Io = HeaderDeadline<TcpStream>;
    type Addr = Peer;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        // axum's own accept loop: it retries (after a pause, for EMFILE and the like) rather than failing.
        let (io, _) = axum::serve::Listener::accept(&mut self.inner).await;
        let peer = Peer::default();
        let io = HeaderDeadline::new(
            io,
            self.header_timeout,
            self.idle_timeout,
            peer.replies.clone(),
        );
        (io, peer)
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr().map(|_| Peer::default())
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
    /// Every reply has been written whole and nothing of the next request has arrived: the idle deadline runs.
    Idle,
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
    header_timeout: Duration,
    idle_timeout: Duration,
    deadline: Pin<Box<Sleep>>,
    phase: Phase,
    /// The last two bytes of the header read so far (`\n\r` before a final `\n` ends it).
    tail: [u8; 2],
    /// The connection's replies not yet written whole ([`Peer::replies`]).
    replies: Arc<Replies>,
}

impl<T> HeaderDeadline<T> {
    pub(crate) fn new(
        inner: T,
        header_timeout: Duration,
        idle_timeout: Duration,
        replies: Arc<Replies>,
    ) -> HeaderDeadline<T> {
        HeaderDeadline {
            inner,
            header_timeout,
            idle_timeout,
            deadline: Box::pin(tokio::time::sleep(header_timeout)),
            phase: Phase::Header,
            tail: [0; 2],
            replies,
        }
    }

    /// Starts waiting for the next request's header, with the deadline from now.
    fn await_header(&mut self) {
        self.phase = Phase::Header;
        self.tail = [0; 2];
        self.deadline
            .as_mut()
            .reset(Instant::now() + self.header_timeout);
    }

    /// Follows the header through newly read `bytes`.
    fn saw(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        if matches!(self.phase, Phase::Replied | Phase::Idle) {
            self.await_header();
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

    /// Starts the idle deadline once the connection's replies have all been written whole. Called from every
    /// poll: hyper does not read again right after a reply (the read side stays registered with the socket), so
    /// the reply's last flush is where the deadline can first be armed, with the connection's waker.
    fn note_idle(&mut self, cx: &mut Context<'_>) {
        if self.phase != Phase::Replied {
            return;
        }
        // Woken when the last reply's body is dropped, in case that happens between polls.
        self.replies.wake_when_done(cx.waker());
        if self.replies.running() == 0 {
            self.phase = Phase::Idle;
            self.deadline
                .as_mut()
                .reset(Instant::now() + self.idle_timeout);
            // Registers the waker, so the connection is polled (and its read fails) at the deadline.
            let _ = self.deadline.as_mut().poll(cx);
        }
    }

    /// Whether the connection has been idle past its deadline.
    fn idle_too_long(&self) -> bool {
        self.phase == Phase::Idle && self.deadline.is_elapsed()
    }

    fn idle_error(&self) -> io::Error {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "the connection was idle for {} s",
                self.idle_timeout.as_secs_f64()
            ),
        )
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
        this.note_idle(cx);
        // Polled before reading, so that a client sending nothing at all still wakes the connection at the deadline.
        let late = match this.phase {
            Phase::Header => Some((
                "the request's header did not arrive within",
                this.header_timeout,
            )),
            Phase::Idle => Some(("the connection was idle for", this.idle_timeout)),
            Phase::Request | Phase::Replied => None,
        };
        if let Some((what, limit)) = late
            && this.deadline.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("{what} {} s", limit.as_secs_f64()),
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
        let this = self.get_mut();
        let flushed = ready!(Pin::new(&mut this.inner).poll_flush(cx));
        this.note_idle(cx);
        // hyper flushes on every wake; the read side may not be polled.
        if flushed.is_ok() && this.idle_too_long() {
            return Poll::Ready(Err(this.idle_error()));
        }
        Poll::Ready(flushed)
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
            let replies = Arc::new(Replies::default());
            let mut c =
                HeaderDeadline::new((), Duration::from_secs(5), Duration::from_secs(60), replies);
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
