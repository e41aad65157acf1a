//! The two halves of a client connection, whatever carries it.
//!
//! Plain TCP reads through readiness (`readable` then `try_read_buf`), so a connection
//! only holds a receive buffer while bytes are actually in hand: ten thousand idle
//! clients then cost no buffers at all. TLS and WebSocket streams go through the generic
//! `AsyncRead` path and keep theirs.

use std::future::Future;
use std::io;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

/// First receive buffer of a connection: enough for any usual CONNECT, small enough
/// that ten thousand clients connecting at once do not leave a fragmented heap behind.
const FIRST_READ: usize = 512;
/// Receive buffer growth step once a client sends more than a trickle.
const READ_CHUNK: usize = 8192;

/// The receiving half.
pub trait ReadSide: Send + 'static {
    /// Waits for data and appends it to `buf` (reserving space only then); `Ok(0)` is
    /// the end of the stream.
    fn read_into<'a>(
        &'a mut self,
        buf: &'a mut BytesMut,
    ) -> impl Future<Output = io::Result<usize>> + Send + 'a;
}

/// The sending half.
pub trait WriteSide: Send + 'static {
    /// Writes some of `data`, returning how much.
    fn write_from<'a>(
        &'a mut self,
        data: &'a [u8],
    ) -> impl Future<Output = io::Result<usize>> + Send + 'a;
    /// Flushes and closes the sending direction.
    fn close(&mut self) -> impl Future<Output = ()> + Send + '_;
}

fn reserve(buf: &mut BytesMut) {
    if buf.capacity() == 0 {
        buf.reserve(FIRST_READ);
    } else if buf.capacity() - buf.len() < FIRST_READ / 2 {
        buf.reserve(READ_CHUNK);
    }
}

impl ReadSide for OwnedReadHalf {
    async fn read_into(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        loop {
            self.readable().await?;
            reserve(buf);
            match self.try_read_buf(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

impl WriteSide for OwnedWriteHalf {
    async fn write_from(&mut self, data: &[u8]) -> io::Result<usize> {
        self.write(data).await
    }

    async fn close(&mut self) {
        let _ = self.shutdown().await;
    }
}

/// The read half of any byte stream (TLS, WebSocket).
pub struct StreamRead<S>(tokio::io::ReadHalf<S>);

/// The write half of any byte stream (TLS, WebSocket).
pub struct StreamWrite<S>(tokio::io::WriteHalf<S>);

impl<S: AsyncRead + Send + 'static> ReadSide for StreamRead<S> {
    async fn read_into(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        reserve(buf);
        self.0.read_buf(buf).await
    }
}

impl<S: AsyncWrite + Send + 'static> WriteSide for StreamWrite<S> {
    async fn write_from(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = self.0.write(data).await?;
        // TLS and WebSocket buffer internally; push each batch out.
        self.0.flush().await?;
        Ok(n)
    }

    async fn close(&mut self) {
        let _ = self.0.shutdown().await;
    }
}

/// Splits a TCP stream for the readiness-based path.
pub fn tcp(stream: TcpStream) -> (OwnedReadHalf, OwnedWriteHalf) {
    stream.into_split()
}

/// Splits any other stream.
pub fn stream<S: AsyncRead + AsyncWrite + Send + 'static>(s: S) -> (StreamRead<S>, StreamWrite<S>) {
    let (r, w) = tokio::io::split(s);
    (StreamRead(r), StreamWrite(w))
}
