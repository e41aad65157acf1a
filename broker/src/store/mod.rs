//! Persistence: retained messages and persistent sessions survive a restart or a crash.
//!
//! The core never waits on the disk. What changed (a session, a subscription, a message
//! owed to a session, a retained message) goes, in the order the core made it, down one
//! queue to a writer thread that commits whatever has gathered in one SQLite
//! transaction (group commit).
//! When a publisher's message was kept for a persistent session or as a retained message,
//! its PUBACK/PUBREC waits for a receipt from that queue, exactly as it waits for the
//! bridge spool: what the broker has acknowledged is on disk. Clients with clean
//! sessions and topics nobody keeps cost nothing here.
//!
//! A write that fails (disk full, a failing card) is logged and counted, and what waits on
//! it is refused: a 5.0 publisher gets 0x97 (Quota exceeded), a 3.x one no
//! acknowledgement, so it sends the message again later. Until the writer can write again
//! (it tries by itself, and holds back a disk reserve so that deletions still run on a
//! full disk), new retained messages and messages for persistent sessions are refused up
//! front, while everything else the broker does goes on.

mod db;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytestring::ByteString;
use futures_util::FutureExt;
use outpost_mqtt::{Protocol, QoS, SubscriptionOptions};
use tokio::sync::oneshot;

pub use db::{Loaded, LoadedSession};

use super::DurableReceipt;
use super::message::Message;

/// Why the store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite refused the file.
    #[error(
        "broker store {path}: {source} (check that the state directory is writable; \
         `broker.persistence = false` runs without it)"
    )]
    Sqlite {
        /// The file.
        path: PathBuf,
        /// What SQLite said.
        source: rusqlite::Error,
    },
    /// A file operation failed.
    #[error("broker store {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

impl From<outpost_sqlite::OpenError> for StoreError {
    fn from(e: outpost_sqlite::OpenError) -> StoreError {
        match e {
            outpost_sqlite::OpenError::Sqlite { path, source } => {
                StoreError::Sqlite { path, source }
            }
            outpost_sqlite::OpenError::Io { path, source } => StoreError::Io { path, source },
        }
    }
}

/// A persistent session's id in the store (never zero; a session that is not kept has
/// none).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StoreId(std::num::NonZeroU32);

impl StoreId {
    /// The id `raw` as read back from the file; `None` for 0, which no kept session has.
    pub fn new(raw: u32) -> Option<StoreId> {
        std::num::NonZeroU32::new(raw).map(StoreId)
    }

    /// The number stored in the file.
    pub fn get(self) -> u32 {
        self.0.get()
    }
}

/// The id in the store of one message owed to a session (never zero; a delivery that
/// is not kept has none).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DeliveryId(std::num::NonZeroU64);

impl DeliveryId {
    /// The id `raw` as read back from the file; `None` for 0, which no kept delivery has.
    pub fn new(raw: u64) -> Option<DeliveryId> {
        std::num::NonZeroU64::new(raw).map(DeliveryId)
    }

    /// The number stored in the file.
    pub fn get(self) -> u64 {
        self.0.get()
    }
}

/// One change for the writer, in the order the core made it.
pub(crate) enum Op {
    PutSession {
        id: u32,
        client_id: Box<str>,
        protocol: Protocol,
        expiry: u32,
    },
    DropSession(u32),
    PutSub {
        session: u32,
        filter: String,
        options: SubscriptionOptions,
        sub_id: Option<u32>,
    },
    DropSub {
        session: u32,
        filter: String,
    },
    PutDelivery {
        id: u64,
        session: u32,
        msg: Arc<Message>,
        qos: QoS,
        retain: bool,
        sub_ids: Vec<u32>,
        packet_id: Option<u16>,
    },
    SetPacketId {
        id: u64,
        packet_id: u16,
    },
    Released(u64),
    DropDelivery(u64),
    PutQos2 {
        session: u32,
        packet_id: u16,
    },
    DropQos2 {
        session: u32,
        packet_id: u16,
    },
    PutRetained(Arc<Message>),
    DropRetained(ByteString),
    /// Changes that reach the disk together or not at all.
    Group(Vec<Op>),
    /// Answered once everything before it is committed (true), or could not be (false).
    Sync(oneshot::Sender<bool>),
}

/// What the writer did, for `$SYS`.
#[derive(Default)]
pub struct Counters {
    /// Batches that could not be written.
    pub failed_batches: AtomicU64,
    /// Rows of messages owed to sessions that reached the disk.
    pub deliveries_written: AtomicU64,
    /// Transactions committed (each at least a page written and synced).
    pub commits: AtomicU64,
    /// The last write failed, or the file is over its quota: new content is refused
    /// until the writer recovers.
    pub refusing: AtomicBool,
    /// Messages (for sessions, or retained) refused because the store could not take them.
    pub refused: AtomicU64,
}

/// The core's side of the store.
pub struct Store {
    /// Where changes go: the writer thread, or, once the core's task has taken that
    /// ([`Store::take_writer`]), `ops`, for the task to hand over
    /// ([`Store::poll_op`]): the core itself then does no I/O.
    writer: Option<StoreWriter>,
    /// Changes made since the task last took them, in order.
    ops: std::cell::RefCell<std::collections::VecDeque<Op>>,
    /// Changes gathered between [`Store::begin_group`] and [`Store::end_group`].
    group: std::cell::RefCell<Option<Vec<Op>>>,
    next_session: u32,
    next_delivery: u64,
    counters: Arc<Counters>,
}

/// The queue into the writer thread. Dropping it lets the writer commit what is left
/// and waits for it to stop.
pub struct StoreWriter {
    tx: std::sync::mpsc::Sender<Op>,
    counters: Arc<Counters>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StoreWriter {
    /// Hands one change to the writer.
    pub(crate) fn send(&self, op: Op) {
        // The writer only stops when this side is dropped, or if it panicked; then the
        // broker carries on from memory and the failure counter says why.
        if self.tx.send(op).is_err() {
            self.counters.failed_batches.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Drop for StoreWriter {
    fn drop(&mut self) {
        // Closing the queue lets the writer commit what is left and stop; waiting for it
        // here is what makes a clean shutdown lose nothing that was queued.
        let (tx, _) = std::sync::mpsc::channel();
        drop(std::mem::replace(&mut self.tx, tx));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Store {
    /// Opens the store at `path`, reads back what it holds and starts its writer. A
    /// file that does not exist yet is created only when there is something to keep.
    /// `quota` bounds the bytes its live pages may take (0: no bound). Every batch of
    /// changes is committed at once; [`Store::open_windowed`] lets a steady stream share
    /// commits.
    pub fn open(path: &Path, quota: u64) -> Result<(Store, Loaded), StoreError> {
        Store::open_windowed(path, quota, Duration::ZERO)
    }

    /// As [`Store::open`], with changes waiting up to `window` for others to share their
    /// commit (`outpost_sqlite::commit_window`).
    pub fn open_windowed(
        path: &Path,
        quota: u64,
        window: Duration,
    ) -> Result<(Store, Loaded), StoreError> {
        let (conn, loaded) = if path.exists() {
            let conn = db::open(path)?;
            match db::load(&conn) {
                Ok(loaded) => (Some(conn), loaded),
                Err(db::LoadError::Sqlite(source)) => {
                    return Err(StoreError::Sqlite {
                        path: path.to_owned(),
                        source,
                    });
                }
                Err(e @ db::LoadError::Checksum { .. }) => {
                    // Bytes that changed on disk: the file cannot be trusted, as with any
                    // other damage. It is set aside, not deleted.
                    drop(conn);
                    let aside = outpost_sqlite::set_aside(path)?;
                    tracing::error!(
                        store = %path.display(),
                        kept_as = %aside.display(),
                        error = %e,
                        "broker store is damaged: set aside (not deleted); starting without \
                         the retained messages and sessions it held"
                    );
                    (Some(db::open(path)?), Loaded::default())
                }
            }
        } else {
            (None, Loaded::default())
        };
        let (tx, rx) = std::sync::mpsc::channel();
        let counters = Arc::new(Counters::default());
        let thread = writer::spawn(conn, rx, path.to_owned(), quota, window, counters.clone())
            .map_err(|source| StoreError::Io {
                path: path.to_owned(),
                source,
            })?;
        let store = Store {
            writer: Some(StoreWriter {
                tx,
                counters: counters.clone(),
                thread: Some(thread),
            }),
            ops: Default::default(),
            group: std::cell::RefCell::new(None),
            next_session: loaded.max_session_id,
            next_delivery: loaded.max_delivery_id,
            counters,
        };
        Ok((store, loaded))
    }

    /// From here to [`Store::end_group`], changes are committed in one transaction.
    pub fn begin_group(&self) {
        self.group.borrow_mut().get_or_insert_with(Vec::new);
    }

    /// Sends the changes gathered since [`Store::begin_group`] as one.
    pub fn end_group(&self) {
        let Some(ops) = self.group.borrow_mut().take() else {
            return;
        };
        // Receipts asked for inside the group resolve once the whole group is committed.
        let (syncs, changes): (Vec<Op>, Vec<Op>) =
            ops.into_iter().partition(|op| matches!(op, Op::Sync(_)));
        if !changes.is_empty() {
            self.send(Op::Group(changes));
        }
        syncs.into_iter().for_each(|op| self.send(op));
    }

    fn send(&self, op: Op) {
        if let Some(group) = self.group.borrow_mut().as_mut() {
            group.push(op);
            return;
        }
        match &self.writer {
            Some(writer) => writer.send(op),
            None => self.ops.borrow_mut().push_back(op),
        }
    }

    /// Takes the queue into the writer thread: from here on changes wait in this store,
    /// in order, until [`Store::poll_op`] hands them out (the broker core's task sends
    /// them on; the core only makes them).
    pub(crate) fn take_writer(&mut self) -> Option<StoreWriter> {
        self.writer.take()
    }

    /// The oldest change not handed out yet (after [`Store::take_writer`]).
    pub(crate) fn poll_op(&mut self) -> Option<Op> {
        self.ops.get_mut().pop_front()
    }

    /// A fresh id for a session that becomes persistent.
    pub fn new_session_id(&mut self) -> StoreId {
        self.next_session = self.next_session.wrapping_add(1).max(1);
        StoreId::new(self.next_session).expect("never zero: max(1) above")
    }

    /// A fresh id for a message owed to a session.
    pub fn new_delivery_id(&mut self) -> DeliveryId {
        // Counts up from the largest id on file (at most i64::MAX, SQLite's bound).
        self.next_delivery += 1;
        DeliveryId::new(self.next_delivery).expect("never zero: one above a u64")
    }

    /// Writes (or rewrites) a persistent session.
    pub fn put_session(&self, id: StoreId, client_id: &str, protocol: Protocol, expiry: u32) {
        self.send(Op::PutSession {
            id: id.get(),
            client_id: client_id.into(),
            protocol,
            expiry,
        });
    }

    /// Forgets a session with everything it held.
    pub fn drop_session(&self, id: StoreId) {
        self.send(Op::DropSession(id.get()));
    }

    /// Writes a subscription of a persistent session.
    pub fn put_sub(
        &self,
        session: StoreId,
        filter: &str,
        options: SubscriptionOptions,
        id: Option<u32>,
    ) {
        self.send(Op::PutSub {
            session: session.get(),
            filter: filter.to_owned(),
            options,
            sub_id: id,
        });
    }

    /// Removes a subscription.
    pub fn drop_sub(&self, session: StoreId, filter: &str) {
        self.send(Op::DropSub {
            session: session.get(),
            filter: filter.to_owned(),
        });
    }

    /// Writes a message owed to a session, queued (`packet_id` `None`) or in flight.
    pub fn put_delivery(
        &self,
        id: DeliveryId,
        session: StoreId,
        d: &super::message::Delivery,
        packet_id: Option<u16>,
    ) {
        self.send(Op::PutDelivery {
            id: id.get(),
            session: session.get(),
            msg: d.msg.clone(),
            qos: d.qos,
            retain: d.retain,
            sub_ids: d.sub_ids.clone(),
            packet_id,
        });
    }

    /// A queued message went out with this packet identifier.
    pub fn set_packet_id(&self, id: DeliveryId, packet_id: u16) {
        self.send(Op::SetPacketId {
            id: id.get(),
            packet_id,
        });
    }

    /// PUBREC came for this message and PUBREL went out.
    pub fn released(&self, id: DeliveryId) {
        self.send(Op::Released(id.get()));
    }

    /// The message is no longer owed (acknowledged, expired or refused).
    pub fn drop_delivery(&self, id: DeliveryId) {
        self.send(Op::DropDelivery(id.get()));
    }

    /// An inbound QoS 2 exchange waits for PUBREL.
    pub fn put_qos2(&self, session: StoreId, packet_id: u16) {
        self.send(Op::PutQos2 {
            session: session.get(),
            packet_id,
        });
    }

    /// An inbound QoS 2 exchange ended.
    pub fn drop_qos2(&self, session: StoreId, packet_id: u16) {
        self.send(Op::DropQos2 {
            session: session.get(),
            packet_id,
        });
    }

    /// Stores a retained message, or clears its topic when the payload is empty.
    pub fn retain(&self, msg: &Arc<Message>) {
        if msg.payload.is_empty() {
            self.send(Op::DropRetained(msg.topic.clone()));
        } else {
            self.send(Op::PutRetained(msg.clone()));
        }
    }

    /// Forgets the retained message of `topic`, which expired in memory.
    pub fn forget_retained(&self, topic: ByteString) {
        self.send(Op::DropRetained(topic));
    }

    /// Resolves once everything sent so far is committed, or with a refusal when it
    /// could not be.
    pub fn receipt(&self) -> DurableReceipt {
        let (tx, rx) = oneshot::channel();
        self.send(Op::Sync(tx));
        async move {
            match rx.await {
                Ok(true) => Ok(()),
                _ => Err(Self::refusal()),
            }
        }
        .boxed()
    }

    /// True while the store cannot write: new retained messages and messages for
    /// persistent sessions are refused before they are routed.
    pub fn is_refusing(&self) -> bool {
        self.counters.refusing.load(Ordering::Relaxed)
    }

    /// What a publisher is told when the store cannot keep its message.
    pub fn refusal() -> super::Rejected {
        super::Rejected {
            reason: "the broker store cannot write (disk full?)".into(),
            code: outpost_mqtt::ReasonCode::QUOTA_EXCEEDED,
        }
    }

    /// What the writer has done since start.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }
}

#[cfg(test)]
mod tests;
