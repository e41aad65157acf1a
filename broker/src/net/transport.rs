//! The byte pipe under a client connection, whatever carries it, as poll functions.
//!
//! The connection is a hand-written future that polls its socket directly, so the
//! transport exposes `poll_*` methods instead of async ones: an async method would have
//! to keep its own state machine inside every connection's task, idle or not.
//!
//! Plain TCP reads through readiness (`poll_read_ready` then `try_read_buf`), so a
//! connection only holds a receive buffer while bytes are actually in hand: ten thousand
//! idle clients then cost no buffers at all. TLS and WebSocket streams go through the
//! generic `AsyncRead` path and keep theirs.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// First receive buffer of a connection: enough for any usual CONNECT, small enough
/// that ten thousand clients connecting at once do not leave a fragmented heap behind.
const FIRST_READ: usize = 512;
/// Receive buffer growth step once a client sends more than a trickle.
const READ_CHUNK: usize = 8192;

/// A client's byte stream.
pub trait Transport: Send + Unpin + 'static {
    /// Appends received bytes to `buf` (reserving space only when data is ready);
    /// `Ok(0)` is the end of the stream.
    fn poll_read_into(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
    ) -> Poll<io::Result<usize>>;
    /// Writes some of `data`, returning how much.
    fn poll_write_from(&mut self, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>>;
    /// Pushes out what the transport buffers itself (TLS records, WebSocket frames).
    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    /// Flushes and closes the sending direction.
    fn poll_close(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    /// Acknowledges (at the TCP level) what the client sent, now rather than after the
    /// kernel's delayed-ACK timer. Called when an acknowledgement starts to wait for a
    /// commit: a client with Nagle's algorithm on holds the rest of its burst until its
    /// last segment is ACKed, and that ACK would otherwise wait up to 40 ms for our
    /// PUBACK to carry it, pacing the client by the commit window's timer instead of its
    /// own (`outpost_sqlite::commit_window`).
    fn ack_now(&self) {}
}

fn reserve(buf: &mut BytesMut) {
    if buf.capacity() == 0 {
        buf.reserve(FIRST_READ);
    } else if buf.capacity() - buf.len() < FIRST_READ / 2 {
        buf.reserve(READ_CHUNK);
    }
}

impl Transport for TcpStream {
    fn poll_read_into(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
    ) -> Poll<io::Result<usize>> {
        // Wait for readiness before reserving, so an idle connection holds no buffer.
        ready!(self.poll_read_ready(cx))?;
        let had_buffer = buf.capacity() > 0;
        reserve(buf);
        // tokio's own read clears the readiness after a short read (epoll is
        // edge-triggered, so a short read means the socket is drained): the next round
        // then registers for a wake-up without a second `read` that would only say
        // WouldBlock. At a trickle that is one system call in four per message.
        match tokio_util::io::poll_read_buf(Pin::new(&mut *self), cx, buf) {
            Poll::Pending => {
                // Readiness was stale (a new socket starts out ready): do not keep a
                // buffer reserved just now for bytes that have not come. A busy
                // stream's buffer stays, with its read size.
                if !had_buffer && buf.is_empty() {
                    *buf = BytesMut::new();
                }
                Poll::Pending
            }
            ready => ready,
        }
    }

    fn poll_write_from(&mut self, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(self).poll_write(cx, data)
    }

    fn poll_flush(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_close(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self).poll_shutdown(cx)
    }

    fn ack_now(&self) {
        // Sends a pending delayed ACK at once (tcp(7) TCP_QUICKACK); it is not a lasting
        // mode, so it is set each time it matters. Failing costs only the wait.
        #[cfg(target_os = "linux")]
        let _ = socket2::SockRef::from(self).set_tcp_quickack(true);
    }
}

/// Any other byte stream (TLS, WebSocket), boxed: their state is large and only these
/// connections should pay for it.
pub struct StreamIo<S>(Pin<Box<S>>);

impl<S> StreamIo<S> {
    /// Wraps a stream.
    pub fn new(s: S) -> StreamIo<S> {
        StreamIo(Box::pin(s))
    }
}

impl<S: AsyncRead + AsyncWrite + Send + 'static> Transport for StreamIo<S> {
    fn poll_read_into(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
    ) -> Poll<io::Result<usize>> {
        reserve(buf);
        tokio_util::io::poll_read_buf(self.0.as_mut(), cx, buf)
    }

    fn poll_write_from(&mut self, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        self.0.as_mut().poll_write(cx, data)
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.0.as_mut().poll_flush(cx)
    }

    fn poll_close(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.0.as_mut().poll_shutdown(cx)
    }
}

/// Reads once into `buf` (the handshake's async form of [`Transport::poll_read_into`]).
pub async fn read_into<T: Transport>(io: &mut T, buf: &mut BytesMut) -> io::Result<usize> {
    poll_fn(|cx| io.poll_read_into(cx, buf)).await
}

/// Writes all of `data` and flushes it.
pub async fn write_all<T: Transport>(io: &mut T, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        let n = poll_fn(|cx| io.poll_write_from(cx, data)).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        data = &data[n..];
    }
    poll_fn(|cx| io.poll_flush(cx)).await
}

/// Flushes and closes the sending direction, ignoring errors (the peer may be gone).
pub async fn close<T: Transport>(io: &mut T) {
    let _ = poll_fn(|cx| io.poll_close(cx)).await;
}
