//! Opening Modbus connections: TCP or an RTU serial port, metered for bus statistics.

use crate::config::{Parity, RtuTransport};
use crate::error::LinkError;
use crate::stats::LineStats;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_modbus::client::Context;
use tokio_serial::{SerialPort, SerialPortBuilderExt, SerialStream};

/// Where a line's requests go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// Modbus TCP host and port.
    Tcp {
        /// Host name or address.
        host: String,
        /// Port.
        port: u16,
    },
    /// An RTU serial line.
    Rtu(RtuTransport),
}

/// Something whose unread input can be discarded before a request.
pub trait DiscardInput {
    /// Drops bytes received but not yet read.
    fn discard_input(&self);
}

impl DiscardInput for SerialStream {
    fn discard_input(&self) {
        // A master only writes requests; any byte waiting before one is a late or stray reply.
        if let Err(e) = self.clear(tokio_serial::ClearBuffer::Input) {
            tracing::debug!("could not flush serial input: {e}");
        }
    }
}

impl DiscardInput for TcpStream {
    fn discard_input(&self) {}
}

/// A stream that counts bytes (and their wire time on serial lines) into the line's stats,
/// and notes when the peer ended the stream.
#[derive(Debug)]
pub struct Metered<T> {
    inner: T,
    stats: Arc<LineStats>,
    serial: Option<RtuTransport>,
    ended: Arc<AtomicBool>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Metered<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let room = buf.remaining() > 0;
        let res = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        if n > 0 {
            self.account(n, false);
        } else if room && matches!(res, Poll::Ready(Ok(()))) {
            // End of stream. tokio-modbus 0.17 reports it over TCP as `last_os_error()`
            // (often a stale EAGAIN), so the line needs its own record of it.
            self.ended.store(true, Ordering::Relaxed);
        }
        res
    }
}

impl<T: AsyncWrite + DiscardInput + Unpin> AsyncWrite for Metered<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.inner.discard_input();
        let res = Pin::new(&mut self.inner).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = &res {
            self.account(*n as u64, true);
        }
        res
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<T> Metered<T> {
    fn account(&mut self, n: u64, tx: bool) {
        let counter = if tx {
            &self.stats.bytes_tx
        } else {
            &self.stats.bytes_rx
        };
        counter.fetch_add(n, Ordering::Relaxed);
        if let Some(s) = &self.serial {
            LineStats::add_time(&self.stats.wire_ns, s.wire_time(n));
        }
    }
}

/// Opens a serial port with the line's settings.
pub fn open_serial(s: &RtuTransport) -> io::Result<SerialStream> {
    let data_bits = match s.data_bits {
        5 => tokio_serial::DataBits::Five,
        6 => tokio_serial::DataBits::Six,
        7 => tokio_serial::DataBits::Seven,
        _ => tokio_serial::DataBits::Eight,
    };
    let parity = match s.parity {
        Parity::None => tokio_serial::Parity::None,
        Parity::Even => tokio_serial::Parity::Even,
        Parity::Odd => tokio_serial::Parity::Odd,
    };
    let stop_bits = if s.stop_bits == 2 {
        tokio_serial::StopBits::Two
    } else {
        tokio_serial::StopBits::One
    };
    tokio_serial::new(&s.port, s.baud)
        .data_bits(data_bits)
        .parity(parity)
        .stop_bits(stop_bits)
        .flow_control(tokio_serial::FlowControl::None)
        .open_native_async()
        .map_err(io::Error::from)
}

/// An open client context and what is known about its stream.
pub struct Link {
    /// The tokio-modbus client.
    pub ctx: Context,
    /// Set once the peer ended the stream (TCP FIN, a serial port gone).
    pub ended: Arc<AtomicBool>,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link").field("ended", &self.ended).finish()
    }
}

/// Opens a client context for the endpoint within `timeout`.
pub async fn connect(
    endpoint: &Endpoint,
    timeout: Duration,
    stats: &Arc<LineStats>,
) -> io::Result<Link> {
    let ended = Arc::new(AtomicBool::new(false));
    match endpoint {
        Endpoint::Tcp { host, port } => {
            let stream = tokio::time::timeout(timeout, TcpStream::connect((host.as_str(), *port)))
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
            stream.set_nodelay(true)?;
            let metered = Metered {
                inner: stream,
                stats: Arc::clone(stats),
                serial: None,
                ended: Arc::clone(&ended),
            };
            Ok(Link {
                ctx: tokio_modbus::client::tcp::attach(metered),
                ended,
            })
        }
        Endpoint::Rtu(s) => {
            let port = open_serial(s)?;
            let metered = Metered {
                inner: port,
                stats: Arc::clone(stats),
                serial: Some(s.clone()),
                ended: Arc::clone(&ended),
            };
            Ok(Link {
                ctx: tokio_modbus::client::rtu::attach(metered),
                ended,
            })
        }
    }
}

/// Describes a transport error of a call on `link` as a user reads it: a peer that closed
/// the connection is named as such, not by the errno tokio-modbus happened to pick up.
pub fn describe_transport_error(link: &Link, endpoint: &Endpoint, e: io::Error) -> LinkError {
    let tcp = matches!(endpoint, Endpoint::Tcp { .. });
    if link.ended.load(Ordering::Relaxed) {
        return if tcp {
            LinkError::ClosedByDevice
        } else {
            LinkError::SerialPortClosed
        };
    }
    match e.kind() {
        io::ErrorKind::ConnectionReset if tcp => LinkError::ResetByDevice,
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionAborted if tcp => {
            LinkError::ClosedByDevice
        }
        _ => LinkError::Transport(Arc::new(e)),
    }
}
