//! The connected phase of a client connection, as a hand-written poll loop.
//!
//! An `async fn` with a `select!` over the socket, the core's queue, the durable acks and
//! the keep-alive timer compiles to a state machine that keeps room for every branch's
//! future at once, in every connection's task, idle or not (about 1.5 KiB each). This
//! driver instead polls each source in turn from one small struct: the socket through
//! its readiness, the queue through a waker slot, the timer through the broker's shared
//! `Deadlines`.
//! What only a connection with work in hand needs (buffers, a stalled core event, the
//! client's DISCONNECT) lives in a [`Busy`] box that exists only while there is such
//! work: between packets an idle client's task is the socket, its identity and its
//! deadline, which keeps the task within two of tokio's 128-byte lines.
//!
//! A plain TCP client that has had no work for a while (or says nothing after its
//! CONNACK) goes further: it is parked. Its task ends, its socket leaves tokio for the
//! broker's parked-socket set (`net/park.rs`), and its state waits in a [`Parked`] behind a
//! `Waker` that the socket, the outbound queue and the keep-alive deadline all hold; the
//! first of them to fire spawns the task again. An idle client then costs neither a task
//! cell nor tokio's `ScheduledIo` (256 bytes each).

use std::any::Any;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use bytes::BytesMut;
use futures_util::future::BoxFuture;
use outpost_mqtt::{Disconnect, ReasonCode};
use tokio::net::TcpStream;
use tokio::sync::mpsc::OwnedPermit;
use tokio::sync::mpsc::error::SendError;
use tracing::{debug, info, warn};

use super::state::{Conn, Decoded, End};
use crate::events::CoreEvent;
use crate::net::deadlines::Deadlines;
use crate::net::transport::Transport;
use crate::outbound::{Outbound, OutboundRx};

/// Stop taking items from the core, and stop reading the client's packets, while this
/// much is waiting to be written. Every packet read may owe the client a reply (PINGRESP,
/// SUBACK, PUBACK, …): a client that sends without reading what it is owed would
/// otherwise grow the broker's memory without bound, so its own packets wait in its
/// socket (and TCP's flow control slows it) until it reads.
const WRITE_HIGH_WATER: usize = 256 * 1024;
/// A write buffer above this size is released once it drains.
const WRITE_BUF_KEEP: usize = 16 * 1024;
/// A drained write buffer that held less than this was a trickle: release it, so an
/// idle subscriber holds no buffer between messages.
const WRITE_TRICKLE: usize = 4 * 1024;
/// How long a closing connection may take to flush its last packets (ms).
const CLOSE_GRACE_MS: u64 = 5_000;
/// Rounds of work per poll before yielding, so one busy client cannot hold a worker.
const ROUNDS_PER_POLL: usize = 32;
/// A plain TCP connection with no work from its client or the core for between one and
/// two of these (ms) is parked: its socket waits in `park::Lot` and its task ends, until
/// a byte, an item from the core or its keep-alive deadline brings it back. Long enough
/// that a client sending every second or so stays in its task (parking and resuming
/// cost a few system calls and allocations), short enough that a site of sensors
/// reporting every minute spends nearly all its time parked.
const PARK_AFTER_MS: u64 = 5_000;

/// Why writing to the client's socket ended the connection.
#[derive(Debug, thiserror::Error)]
enum WriteError {
    /// The socket refused the bytes or the flush.
    #[error("writing to the client failed: {0}")]
    Io(std::io::Error),
    /// The socket took no bytes: the client is gone.
    #[error("the client's socket took no bytes (it is closed)")]
    Closed,
}

/// An event for the core that waits for room in its queue.
struct Stall {
    event: Box<CoreEvent>,
    permit: BoxFuture<'static, Result<OwnedPermit<CoreEvent>, SendError<()>>>,
}

/// The part of a connection that exists only while it has work in hand.
#[derive(Default)]
struct Busy {
    rbuf: BytesMut,
    wbuf: BytesMut,
    wpos: usize,
    /// `rbuf` may hold whole packets not yet handled (decoding stopped at a stall).
    decode_pending: bool,
    stall: Option<Box<Stall>>,
    /// The client's DISCONNECT, when it ended that way.
    disconnect: Option<Box<Disconnect>>,
    /// When the packet at the head of `rbuf` started to arrive (ms on the `Deadlines`
    /// clock), 0 when `rbuf` holds no partial packet: it must be complete within
    /// `packet_timeout`, so a slow sender cannot hold a buffer forever.
    partial_since: u64,
}

impl Busy {
    /// Nothing in hand and no memory held: the box can go.
    fn is_idle(&self) -> bool {
        self.rbuf.capacity() == 0
            && self.wbuf.capacity() == 0
            && !self.decode_pending
            && self.stall.is_none()
            && self.disconnect.is_none()
    }
}

/// The busy part, made when first needed.
fn busy(slot: &mut Option<Box<Busy>>) -> &mut Busy {
    slot.get_or_insert_with(Default::default)
}

/// Everything a connected client's task holds.
pub(super) struct Driver<T> {
    pub(super) io: T,
    pub(super) conn: Conn,
    pub(super) rx: OutboundRx,
    busy: Option<Box<Busy>>,
    /// When the last bytes arrived (ms on the `Deadlines` clock).
    last_rx: u64,
    /// Keep alive in milliseconds; 0 when the client has none.
    keep_alive_ms: u32,
    /// Bytes handed to the transport since its last flush.
    unflushed: bool,
    closing_armed: bool,
    /// The client or the core gave this connection work since the last park check.
    active: bool,
    /// Quiet for a whole [`PARK_AFTER_MS`] (or just connected): park at the next idle
    /// moment.
    park_due: bool,
    /// The parked state of the last park, kept for the next: a burst of traffic then
    /// allocates nothing that outlives it, so the heap it used can go back to the OS.
    parked: Option<Arc<Parked>>,
}

// The connection's deadline (`conn.deadline`) is keep alive, a partial packet's
// timeout, the close grace period or the next park check, whichever is first. It is
// re-armed lazily, so it fires at most once per keep-alive period or park check
// instead of moving on every packet.

/// How the connected phase ended.
pub(super) enum Exit {
    /// The connection is over; the client's DISCONNECT if it sent one.
    Closed(Option<Box<Disconnect>>),
    /// The connection is quiet and may leave its task: see [`park`].
    Park,
}

enum Round {
    Progress,
    Idle,
    Finished,
}

impl<T: Transport> Driver<T> {
    /// A driver for a connection whose CONNECT the core has answered; `rbuf` holds any
    /// bytes that arrived after the CONNECT.
    pub(super) fn new(
        io: T,
        conn: Conn,
        rx: OutboundRx,
        rbuf: BytesMut,
        keep_alive: Option<Duration>,
    ) -> Driver<T> {
        let last_rx = conn.deadlines().now_ms();
        let mut driver = Driver {
            io,
            conn,
            rx,
            busy: None,
            last_rx,
            keep_alive_ms: keep_alive
                .map_or(0, |k| u32::try_from(k.as_millis()).unwrap_or(u32::MAX)),
            unflushed: false,
            closing_armed: false,
            active: false,
            // A client that says nothing after its CONNACK is parked at once: ten
            // thousand clients connecting then hold ten thousand parked sockets, not
            // ten thousand tasks whose freed memory the heap keeps.
            park_due: true,
            parked: None,
        };
        if !rbuf.is_empty() {
            let b = busy(&mut driver.busy);
            b.rbuf = rbuf;
            b.decode_pending = true;
        }
        // What the core queued while the connection was set up (CONNACK, resent
        // messages); a refused connection has its CONNACK and a close, nothing else.
        let mut items = driver.rx.take_now();
        if !items.is_empty() {
            driver.encode_items(&mut items);
        }
        driver
    }

    /// Runs the connection; ready when it has ended, with the client's DISCONNECT if it
    /// sent one.
    pub(super) fn poll_run(&mut self, cx: &mut Context<'_>) -> Poll<Exit> {
        for _ in 0..ROUNDS_PER_POLL {
            match self.round(cx) {
                Round::Progress => {}
                Round::Idle => {
                    if self.busy.as_ref().is_some_and(|b| b.is_idle()) {
                        self.busy = None;
                    }
                    if self.park_due && self.can_park() {
                        return Poll::Ready(Exit::Park);
                    }
                    return Poll::Pending;
                }
                Round::Finished => {
                    return Poll::Ready(Exit::Closed(
                        self.busy.as_mut().and_then(|b| b.disconnect.take()),
                    ));
                }
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Whether this connection can leave its task now: a plain TCP socket (the only
    /// transport whose state is all in the kernel), nothing buffered or in hand, nothing
    /// waited on but the socket, the outbound queue and the deadline.
    fn can_park(&self) -> bool {
        std::any::TypeId::of::<T>() == std::any::TypeId::of::<TcpStream>()
            && self.busy.is_none()
            && !self.unflushed
            && self.conn.parkable()
    }

    fn wbuf_len(&self) -> usize {
        self.busy.as_ref().map_or(0, |b| b.wbuf.len())
    }

    /// Whether the client's packets wait unread: it is not reading what it is owed
    /// ([`WRITE_HIGH_WATER`]), or too many of its publishes wait for their
    /// acknowledgements ([`Conn::replies_backlogged`]). Whatever unblocks it (a write,
    /// an acknowledgement released) is polled every round, so reading resumes by itself.
    fn read_paused(&self) -> bool {
        self.wbuf_len() >= WRITE_HIGH_WATER || self.conn.replies_backlogged()
    }

    /// Polls every source once. Each source that returns `Pending` has registered the
    /// waker; a source skipped for a condition (closing, a full write buffer, a stall)
    /// is unblocked only by progress of one that was polled.
    fn round(&mut self, cx: &mut Context<'_>) -> Round {
        let mut progress = false;
        let mut worked = false;
        let paused = self.read_paused();
        match self.poll_write(cx) {
            Poll::Ready(Ok(true)) => {
                progress = true;
                if paused {
                    // Its packets wait unread while it catches up; a client taking
                    // what it is owed is alive, so its keep-alive counts from here.
                    self.last_rx = self.conn.deadlines().now_ms();
                }
            }
            Poll::Ready(Ok(false)) | Poll::Pending => {}
            Poll::Ready(Err(e)) => {
                debug!(conn_id = %self.conn.conn_id, error = %e, "connection closed");
                return Round::Finished;
            }
        }
        if self.conn.winding_down() {
            if self.conn.closing
                && self.wbuf_len() == 0
                && !self.unflushed
                && !self.conn.replies_pending()
            {
                return Round::Finished;
            }
            if !self.closing_armed {
                self.closing_armed = true;
                let at = self.conn.deadlines().now_ms() + CLOSE_GRACE_MS;
                self.conn.arm(at, cx.waker());
            }
        }

        if !self.conn.closing
            && self.wbuf_len() < WRITE_HIGH_WATER
            && let Poll::Ready(mut items) = self.rx.poll_take(cx)
        {
            worked = true;
            let batch = items.len();
            let held = self.conn.replies_pending();
            self.encode_items(&mut items);
            if !held && self.conn.replies_pending() {
                // An acknowledgement now waits for a commit: let the client's TCP see
                // its bytes acknowledged meanwhile.
                self.io.ack_now();
            }
            self.rx.recycle(items, batch);
        }

        if self.conn.poll_head_publish(cx) {
            worked = true;
            self.conn.release_publishes(&mut busy(&mut self.busy).wbuf);
        }

        if let Some(outcome) = self.conn.poll_head_ack(cx) {
            worked = true;
            self.conn
                .release_acks(outcome, &mut busy(&mut self.busy).wbuf);
        }

        if let Some(b) = self.busy.as_mut()
            && let Some(stall) = b.stall.as_mut()
            && let Poll::Ready(permit) = stall.permit.as_mut().poll(cx)
        {
            worked = true;
            let event = b.stall.take().map(|s| s.event);
            match (permit, event) {
                (Ok(permit), Some(event)) => {
                    permit.send(*event);
                }
                _ => {
                    // Closes the connection (and the will is due).
                    self.conn
                        .violation(ReasonCode::SERVER_SHUTTING_DOWN, &mut b.wbuf);
                }
            }
        }

        let stalled = self.busy.as_ref().is_some_and(|b| b.stall.is_some());
        if !self.conn.winding_down() && !stalled && !self.read_paused() {
            if self.busy.as_ref().is_some_and(|b| b.decode_pending) {
                worked = true;
                self.decode();
            }
            let stalled = self.busy.as_ref().is_some_and(|b| b.stall.is_some());
            if !self.conn.winding_down() && !stalled && !self.read_paused() {
                // Read into the busy part's buffer if there is one, else into a fresh
                // one that allocates only if bytes actually came.
                let mut fresh = BytesMut::new();
                let rbuf = match self.busy.as_mut() {
                    Some(b) => &mut b.rbuf,
                    None => &mut fresh,
                };
                match self.io.poll_read_into(cx, rbuf) {
                    Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Round::Finished,
                    Poll::Ready(Ok(n)) => {
                        worked = true;
                        let trickle = n < rbuf.capacity() / 2;
                        if fresh.capacity() > 0 {
                            busy(&mut self.busy).rbuf = fresh;
                        }
                        self.last_rx = self.conn.deadlines().now_ms();
                        self.decode();
                        let b = busy(&mut self.busy);
                        if b.rbuf.is_empty() && trickle {
                            // A client that sends a little now and then (the idle
                            // majority) holds no receive buffer between packets; a busy
                            // one keeps its buffer and its read size.
                            b.rbuf = BytesMut::new();
                        }
                    }
                    Poll::Pending => {}
                }
            }
        }

        // Work from the client or the core (not a write, which is the tail of earlier
        // work) postpones parking.
        if worked {
            self.active = true;
            self.park_due = false;
            progress = true;
        }
        let parks = std::any::TypeId::of::<T>() == std::any::TypeId::of::<TcpStream>();

        // The packet being received, if it waits on the client: due by packet_timeout.
        let partial_due = self
            .busy
            .as_ref()
            .filter(|b| b.partial_since != 0 && b.stall.is_none() && !b.decode_pending)
            .map(|b| b.partial_since + self.conn.packet_timeout_ms());
        if !self.conn.winding_down() {
            if let Some(due) = partial_due
                && (self.conn.deadline == 0 || due < Deadlines::due(self.conn.deadline))
            {
                self.conn.arm(due, cx.waker());
            } else if self.conn.deadline == 0 && (self.keep_alive_ms > 0 || parks) {
                let k = u64::from(self.keep_alive_ms);
                let keep_alive = (k > 0).then(|| self.last_rx + k);
                let check = parks.then(|| self.conn.deadlines().now_ms() + PARK_AFTER_MS);
                if let Some(at) = keep_alive.into_iter().chain(check).min() {
                    self.conn.arm(at, cx.waker());
                }
            }
        }
        if self.conn.deadline != 0 {
            let now = self.conn.deadlines().now_ms();
            if now >= Deadlines::due(self.conn.deadline) {
                progress = true;
                if self.conn.winding_down() {
                    return Round::Finished;
                }
                let k = u64::from(self.keep_alive_ms);
                if partial_due.is_some_and(|due| now >= due) {
                    crate::limits::ConnectionLimits::count(
                        &self.conn.settings().connections.packet_timeouts,
                    );
                    info!(
                        conn_id = %self.conn.conn_id,
                        "connection closed: a packet was not completed within broker.packet_timeout"
                    );
                    self.conn.disarm();
                    self.conn.violation(
                        ReasonCode::UNSPECIFIED_ERROR,
                        &mut busy(&mut self.busy).wbuf,
                    );
                } else if k > 0 && now - self.last_rx >= k {
                    info!(
                        conn_id = %self.conn.conn_id,
                        "connection closed: keep alive expired"
                    );
                    self.conn.disarm();
                    self.conn.violation(
                        ReasonCode::KEEP_ALIVE_TIMEOUT,
                        &mut busy(&mut self.busy).wbuf,
                    );
                } else {
                    // A park check: quiet since the last one, park when next idle.
                    if parks {
                        if self.active {
                            self.active = false;
                        } else {
                            self.park_due = true;
                            // A client that went quiet after sending more than a trickle
                            // kept its read size; quiet now, it gives the buffers back.
                            if let Some(b) = self.busy.as_mut() {
                                if b.rbuf.is_empty() && partial_due.is_none() {
                                    b.rbuf = BytesMut::new();
                                }
                                if b.wbuf.is_empty() {
                                    b.wpos = 0;
                                    b.wbuf = BytesMut::new();
                                }
                            }
                        }
                    }
                    // Nothing expired: look again at the nearest of what is pending.
                    let next = [
                        partial_due,
                        (k > 0).then(|| self.last_rx + k),
                        parks.then_some(now + PARK_AFTER_MS),
                    ]
                    .into_iter()
                    .flatten()
                    .min();
                    match next {
                        Some(at) => self.conn.arm(at, cx.waker()),
                        None => self.conn.disarm(),
                    }
                }
            }
        }

        if progress {
            Round::Progress
        } else {
            Round::Idle
        }
    }

    /// Writes what is buffered and flushes it; `Ok(true)` when bytes moved.
    fn poll_write(&mut self, cx: &mut Context<'_>) -> Poll<Result<bool, WriteError>> {
        let mut moved = false;
        if let Some(b) = self.busy.as_mut()
            && b.wpos < b.wbuf.len()
        {
            match self.io.poll_write_from(cx, &b.wbuf[b.wpos..]) {
                Poll::Ready(Ok(n)) if n > 0 => {
                    moved = true;
                    self.unflushed = true;
                    b.wpos += n;
                    if b.wpos == b.wbuf.len() {
                        b.wpos = 0;
                        if b.wbuf.len() < WRITE_TRICKLE || b.wbuf.capacity() > WRITE_BUF_KEEP {
                            b.wbuf = BytesMut::new();
                        } else {
                            b.wbuf.clear();
                        }
                    }
                }
                Poll::Ready(Ok(_)) => return Poll::Ready(Err(WriteError::Closed)),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(WriteError::Io(e))),
                Poll::Pending => return Poll::Pending,
            }
        }
        if self.unflushed && self.wbuf_len() == 0 {
            match self.io.poll_flush(cx) {
                Poll::Ready(Ok(())) => {
                    self.unflushed = false;
                    #[cfg(debug_assertions)]
                    if self.conn.abort_after_flush.get() {
                        // The packet is with the kernel; nothing after it happens.
                        std::process::abort();
                    }
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(WriteError::Io(e))),
                Poll::Pending => {}
            }
        }
        Poll::Ready(Ok(moved))
    }

    /// Handles the whole packets in the receive buffer, up to a stall.
    fn decode(&mut self) {
        let b = busy(&mut self.busy);
        b.decode_pending = false;
        let before = b.rbuf.len();
        let outcome = self.conn.on_bytes(&mut b.rbuf, &mut b.wbuf);
        if b.rbuf.is_empty() {
            b.partial_since = 0;
        } else if b.partial_since == 0 || b.rbuf.len() < before {
            // What is left started arriving no earlier than now.
            b.partial_since = self.conn.deadlines().now_ms();
        }
        match outcome {
            Ok(Decoded::Done) => {}
            Ok(Decoded::Stalled(event)) => {
                b.decode_pending = true;
                b.stall = Some(Box::new(Stall {
                    event,
                    permit: Box::pin(self.conn.core.reserve_owned()),
                }));
            }
            Err(End::Graceful(d)) => {
                b.disconnect = Some(d);
                if !self.conn.close_after_replies() {
                    self.conn.closing = true;
                }
            }
            // A violation: `Conn::violation` already queued the close.
            Err(End::Abnormal) => {}
        }
    }

    /// Encodes what the core queued, in order, until an item closes the connection
    /// (what follows a close is dropped with the drain).
    fn encode_items(&mut self, items: &mut Vec<Outbound>) {
        let b = busy(&mut self.busy);
        for item in items.drain(..) {
            if self.conn.add(item, &mut b.wbuf) {
                self.conn.closing = true;
                break;
            }
        }
    }
}

/// A parked connection: its state without a task or a tokio registration. Its waker sits
/// in the lot (the socket), the outbound queue and the deadlines; the first to fire
/// takes the state out and resumes it, later ones find it gone.
struct Parked {
    state: Mutex<Option<Sleeping>>,
}

/// What a parked connection keeps: only what outlives its quiet spell (no buffers, no
/// flags of a running one), so that `Parked` in its `Arc` is one malloc size class
/// smaller.
struct Sleeping {
    io: std::net::TcpStream,
    keep_alive_ms: u32,
    conn: Conn,
    rx: OutboundRx,
    last_rx: u64,
}

impl Wake for Parked {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let Some(z) = lock(&self.state).take() else {
            return;
        };
        // Also takes it off the lot's keep-alive wheel; the task arms its own deadline.
        let lot = z.conn.deadlines().lot();
        lot.forget(z.io.as_raw_fd());
        let handle = lot.handle();
        match handle {
            Some(h) => resume(z, self.clone(), &h),
            None => lost(z.conn, z.rx),
        }
    }
}

/// Moves a quiet connection out of its task (which then ends) into the lot; `Some`
/// gives the driver back if this transport cannot be parked.
pub(super) fn park<T: Transport>(driver: Driver<T>) -> Option<Driver<T>> {
    let any: Box<dyn Any> = Box::new(driver);
    match any.downcast::<Driver<TcpStream>>() {
        Ok(d) => {
            park_tcp(*d);
            None
        }
        Err(any) => any.downcast::<Driver<T>>().ok().map(|mut d| {
            d.park_due = false;
            *d
        }),
    }
}

fn park_tcp(d: Driver<TcpStream>) {
    // `can_park` made sure nothing is buffered (`busy` is gone) or unflushed.
    let Driver {
        io,
        conn,
        rx,
        last_rx,
        keep_alive_ms,
        parked,
        ..
    } = d;
    // Leaves tokio's reactor; the socket stays non-blocking.
    let io = match io.into_std() {
        Ok(io) => io,
        Err(e) => {
            warn!(conn_id = %conn.conn_id, error = %e, "could not park an idle connection; closing it");
            lost(conn, rx);
            return;
        }
    };
    let mut z = Sleeping {
        io,
        keep_alive_ms,
        conn,
        rx,
        last_rx,
    };
    let parked = parked.unwrap_or_else(|| {
        Arc::new(Parked {
            state: Mutex::new(None),
        })
    });
    let waker = Waker::from(parked.clone());
    // Held while the wakers are handed out, so one that fires meanwhile (on another
    // worker) waits until the state is in place.
    let mut state = lock(&parked.state);
    // The running connection's deadline (keep alive or a park check) goes: the lot keeps
    // the keep alive of a parked one, in less room.
    z.conn.disarm();
    let due = match z.keep_alive_ms {
        0 => 0,
        k => z.last_rx + u64::from(k),
    };
    let deadlines = z.conn.deadlines().clone();
    let fd = z.io.as_raw_fd();
    // The socket's fd is its slot in the lot: a parked state holds no token.
    if let Err(e) = deadlines.park(fd, waker.clone(), due) {
        {
            debug!(error = %e, "parking a connection failed; it keeps its task");
            drop(state);
            match tokio::runtime::Handle::try_current() {
                Ok(h) => resume(z, parked.clone(), &h),
                Err(_) => lost(z.conn, z.rx),
            }
            return;
        }
    }
    z.rx.shed();
    let queued = z.rx.register(&waker);
    deadlines.lot().parked();
    *state = Some(z);
    drop(state);
    if queued {
        waker.wake();
    }
}

/// Gives a parked connection its tokio registration and task back.
fn resume(z: Sleeping, parked: Arc<Parked>, handle: &tokio::runtime::Handle) {
    let Sleeping {
        io,
        keep_alive_ms,
        conn,
        rx,
        last_rx,
        ..
    } = z;
    let _enter = handle.enter();
    match TcpStream::from_std(io) {
        Ok(io) => {
            let d = Driver {
                io,
                conn,
                rx,
                busy: None,
                last_rx,
                keep_alive_ms,
                unflushed: false,
                closing_armed: false,
                active: false,
                park_due: false,
                parked: Some(parked),
            };
            handle.spawn(super::Connection::running(d));
        }
        Err(e) => {
            warn!(conn_id = %conn.conn_id, error = %e, "could not resume a parked connection; closing it");
            lost(conn, rx);
        }
    }
}

/// A connection whose socket was lost while parking or resuming: the core still hears
/// that it closed (its will is due, as for any connection that ends without
/// DISCONNECT).
fn lost(conn: Conn, rx: OutboundRx) {
    rx.close();
    if !conn.accepted {
        return;
    }
    let Ok(handle) = tokio::runtime::Handle::try_current() else {
        return;
    };
    handle.spawn(async move {
        let _ = conn
            .core
            .send(CoreEvent::Closed {
                session: conn.session,
                conn_id: conn.conn_id,
                disconnect: None,
                reason: conn.close_reason,
            })
            .await;
    });
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A parked state is taken or put whole, so a poisoned lock is still usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    /// A parked client costs this state (in an `Arc`) instead of its task and its tokio
    /// registration (256 bytes each); at 104 bytes the `Arc` is a 128-byte heap chunk
    /// (at 112, as before the socket's fd became its slot in the lot, a 144-byte one).
    /// A field that only a running connection needs stays out of `Sleeping`.
    #[test]
    fn parked_state_stays_small() {
        let size = std::mem::size_of::<super::Parked>();
        assert!(size <= 104, "parked connection state is {size} bytes");
    }
}
