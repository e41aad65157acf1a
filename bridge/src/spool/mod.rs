//! The durable spool: an SQLite file owned by one writer thread that group-commits every
//! queued request (appends, deletes, QoS 2 stage changes) in one transaction.
//!
//! Callers never touch SQLite: they send commands over a channel and get answers on
//! oneshot channels, so the async runtime never blocks on disk.
//!
//! Besides the messages, the file keeps the strikes of a suspected poison message, the
//! dead-letter table it ends up in, and the QoS 2 packet ids received from the cloud and
//! not yet released (downlink deduplication across restarts).

mod acked;
mod fence;
mod props;
mod reader;
mod store;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use outpost_sqlite::reserve;
use std::sync::mpsc;

use bytes::Bytes;
use outpost_mqtt::{Properties, QoS};
use tokio::sync::{oneshot, watch};

use crate::config::WhenFull;
use crate::error::{RejectReason, Rejected, SpoolError};
use crate::stats::BridgeStats;

pub(crate) use fence::{Fence, Marks};
pub use props::{decode as decode_properties, encode as encode_properties};
pub use store::ROW_OVERHEAD;

/// A message to append.
#[derive(Debug, Clone)]
pub struct NewMessage {
    /// Remote (cloud) topic.
    pub topic: String,
    /// Payload, shared with the publisher's buffer.
    pub payload: Bytes,
    /// QoS towards the cloud.
    pub qos: QoS,
    /// RETAIN flag towards the cloud.
    pub retain: bool,
    /// Encoded properties ([`encode_properties`]).
    pub props: Option<Vec<u8>>,
    /// Accept time, unix milliseconds.
    pub accepted_ms: i64,
}

impl NewMessage {
    /// Bytes this message counts for against `max_bytes`.
    pub fn accounted_size(&self) -> u64 {
        (self.topic.len() + self.payload.len() + self.props.as_ref().map_or(0, Vec::len)) as u64
            + ROW_OVERHEAD
    }
}

/// Where a QoS 2 message is in its exchange with the cloud.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Not sent yet (or QoS 0/1, whose identifiers are not persisted).
    New = 0,
    /// PUBLISH sent with the persisted packet id; resend PUBLISH (DUP) after a restart.
    Published = 1,
    /// PUBREC received; resend PUBREL, never PUBLISH.
    Released = 2,
}

impl Stage {
    fn from_i64(v: i64) -> Stage {
        match v {
            1 => Stage::Published,
            2 => Stage::Released,
            _ => Stage::New,
        }
    }
}

/// A spooled row.
#[derive(Debug, Clone)]
pub struct StoredMessage {
    /// Row id (accept order).
    pub id: i64,
    /// Remote topic.
    pub topic: String,
    /// Payload.
    pub payload: Bytes,
    /// QoS as accepted.
    pub qos: QoS,
    /// RETAIN flag.
    pub retain: bool,
    /// Decoded properties (empty when none or damaged).
    pub properties: Properties,
    /// Accept time, unix milliseconds.
    pub accepted_ms: i64,
    /// Persisted packet id (QoS 2 in progress).
    pub packet_id: Option<u16>,
    /// QoS 2 stage.
    pub stage: Stage,
}

/// One persisted QoS 2 stage change.
#[derive(Debug, Clone, Copy)]
pub struct StageUpdate {
    /// Row id.
    pub id: i64,
    /// Packet identifier on the cloud session.
    pub packet_id: u16,
    /// New stage.
    pub stage: Stage,
}

/// A change to the persisted set of QoS 2 packet ids received from the cloud.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IncomingOp {
    /// A new QoS 2 PUBLISH was delivered locally: remember its id until PUBREL.
    Add(u16),
    /// PUBREL arrived: forget the id.
    Remove(u16),
}

/// What one link loss did to the strikes of the row blamed for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StrikeOutcome {
    /// No row was blamed: earlier strikes are forgotten (losses must be consecutive).
    Cleared,
    /// The blamed row is no longer spooled (acknowledged or dropped meanwhile).
    Gone,
    /// The row was the oldest in flight at `strikes` consecutive link losses.
    Counted {
        /// Row id.
        row: i64,
        /// Consecutive strikes so far.
        strikes: u32,
    },
    /// The row reached the limit and was moved to the dead-letter table.
    DeadLettered {
        /// Row id it had in the spool.
        row: i64,
        /// Remote topic.
        topic: String,
        /// Accounted bytes.
        size: u64,
        /// Strikes it collected.
        strikes: u32,
    },
}

/// A message kept aside in the dead-letter table (never sent, never deleted by the bridge).
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// Row id it had in the spool.
    pub row_id: i64,
    /// Remote topic.
    pub topic: String,
    /// Payload.
    pub payload: Bytes,
    /// QoS as accepted.
    pub qos: QoS,
    /// Accept time, unix milliseconds.
    pub accepted_ms: i64,
    /// When it was set aside, unix milliseconds.
    pub dead_ms: i64,
    /// Why (`poison`).
    pub reason: String,
    /// Consecutive link losses it was blamed for.
    pub strikes: u32,
}

type Reply<T> = oneshot::Sender<T>;

pub(crate) enum Command {
    Append(NewMessage, Reply<Result<(), Rejected>>),
    Delete(Vec<i64>),
    SetStages(Vec<StageUpdate>, Reply<Result<(), SpoolError>>),
    Strike {
        row: Option<i64>,
        through: i64,
        limit: u32,
        now_ms: i64,
        reply: Reply<Result<StrikeOutcome, SpoolError>>,
    },
    Incoming {
        bridge: String,
        ops: Vec<IncomingOp>,
        reply: Reply<Result<(), SpoolError>>,
    },
    ClearIncoming {
        bridge: String,
        reply: Reply<Result<(), SpoolError>>,
    },
    /// The uplink session ended; its deletes were queued before this.
    Untake,
    Flush(Reply<Result<(), SpoolError>>),
    /// Commit what is queued, then fold the WAL into the file.
    Checkpoint(Reply<Result<(), SpoolError>>),
}

impl Command {
    /// Someone waits on this one and nothing more is expected soon: commit without
    /// waiting out the commit window.
    fn is_urgent(&self) -> bool {
        matches!(
            self,
            Command::Flush(_)
                | Command::Checkpoint(_)
                | Command::Untake
                | Command::Strike { .. }
                | Command::ClearIncoming { .. }
        )
    }
}

/// Settings of a spool.
#[derive(Debug, Clone)]
pub struct SpoolOptions {
    /// SQLite file.
    pub path: PathBuf,
    /// Byte bound.
    pub max_bytes: u64,
    /// Policy at the bound.
    pub when_full: WhenFull,
    /// Longest wait of a message for others to share its commit
    /// (`outpost_sqlite::commit_window`); zero commits at once.
    pub commit_window: std::time::Duration,
}

/// Handle to the spool writer; cheap to clone.
#[derive(Clone)]
pub struct Spool {
    tx: mpsc::Sender<Command>,
    reads: mpsc::Sender<reader::Read>,
    committed: watch::Receiver<i64>,
    fence: Arc<Fence>,
    careful_at_open: i64,
    path: Arc<PathBuf>,
}

/// Run on the writer's connection right after it opens (tests cap the file with it).
type Hook<'a> = &'a dyn Fn(&rusqlite::Connection) -> rusqlite::Result<()>;

/// The writer thread; join it after every [`Spool`] handle is dropped.
pub struct SpoolThread(std::thread::JoinHandle<()>);

impl SpoolThread {
    /// Wait for the writer to finish its last transaction (blocking).
    pub fn join(self) {
        if self.0.join().is_err() {
            tracing::error!("spool writer thread panicked");
        }
    }
}

impl Spool {
    /// Open the file (blocking: call from a blocking context) and start the writer thread.
    pub fn open(
        opts: SpoolOptions,
        stats: Arc<BridgeStats>,
    ) -> Result<(Spool, SpoolThread), SpoolError> {
        Self::open_with(opts, stats, &|_| Ok(()), None)
    }

    /// Open with a hook run on the connection first (tests cap the file size with it) and
    /// a reserve other than the file beside the spool (tests hold pages back instead).
    fn open_with(
        opts: SpoolOptions,
        stats: Arc<BridgeStats>,
        hook: Hook<'_>,
        reserve: Option<Box<dyn reserve::Reserve>>,
    ) -> Result<(Spool, SpoolThread), SpoolError> {
        let reserve_path = reserve::FileReserve::path_for(&opts.path);
        let (conn, quarantined) = match store::open(&opts.path) {
            Ok(opened) => opened,
            // A full disk can keep even opening from writing (the shared-memory file, WAL
            // recovery): give the reserve back and try once more.
            Err(first) if reserve.is_none() && std::fs::remove_file(&reserve_path).is_ok() => {
                tracing::warn!(spool = %opts.path.display(), error = %first,
                    "spool could not be opened: released its disk reserve and trying again");
                store::open(&opts.path)?
            }
            Err(e) => return Err(e),
        };
        hook(&conn).map_err(|source| SpoolError::Sqlite {
            path: opts.path.clone(),
            source,
        })?;
        let (reserve, reserve_held): (Box<dyn reserve::Reserve>, bool) = match reserve {
            Some(mut r) => {
                let held = r.hold(&conn).is_ok();
                (r, held)
            }
            None => {
                let (r, held) = reserve::FileReserve::open(&opts.path);
                if let Err(e) = &held {
                    tracing::warn!(spool = %opts.path.display(), reserve = %reserve_path.display(), error = %e,
                        "spool: no room for the disk reserve: should the disk fill up, deleting \
                         acknowledged messages may have to wait for space to be freed");
                }
                (Box::new(r), held.is_ok())
            }
        };
        if quarantined.is_some() {
            BridgeStats::bump(&stats.quarantined);
        }
        let sqlite = |source| SpoolError::Sqlite {
            path: opts.path.clone(),
            source,
        };
        let (count, bytes) = store::totals(&conn).map_err(sqlite)?;
        let last_id = store::max_id(&conn).map_err(sqlite)?;
        let next_id = store::max_id_anywhere(&conn).map_err(sqlite)? + 1;
        let oldest = store::oldest_ms(&conn).map_err(sqlite)?;
        if store::prune_strikes(&conn).map_err(sqlite)? {
            tracing::info!(spool = %opts.path.display(), "a spooled message has link-loss strikes from an earlier run");
        }
        let careful_at_open = store::careful_through(&conn).map_err(sqlite)?;
        let dead = store::dead_letter_count(&conn).map_err(sqlite)?;
        stats
            .dead_letters
            .store(dead, std::sync::atomic::Ordering::Relaxed);
        if dead > 0 {
            tracing::warn!(spool = %opts.path.display(), dead_letters = dead,
                "spool holds dead-lettered messages (table dead_letters) awaiting an operator");
        }
        stats
            .spool_messages
            .store(count, std::sync::atomic::Ordering::Relaxed);
        stats
            .spool_bytes
            .store(bytes, std::sync::atomic::Ordering::Relaxed);
        stats
            .oldest_accepted_ms
            .store(oldest, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(spool = %opts.path.display(), messages = count, bytes, "spool opened");
        let reader_conn = reader::open(&opts.path).map_err(sqlite)?;
        let undeleted = Arc::new(acked::Undeleted::default());
        let reader_undeleted = undeleted.clone();
        let (tx, rx) = mpsc::channel();
        let (reads, reads_rx) = mpsc::channel();
        let (committed_tx, committed) = watch::channel(last_id);
        let path = Arc::new(opts.path.clone());
        let reader_path = opts.path.clone();
        std::thread::Builder::new()
            .name("bridge-spool-read".into())
            .spawn(move || reader::run(reader_conn, reader_path, reader_undeleted, reads_rx))
            .map_err(|source| SpoolError::Io {
                path: path.to_path_buf(),
                source,
            })?;
        let fence = Arc::new(Fence::default());
        let w = writer::Writer::new(
            conn,
            opts,
            stats,
            writer::Totals {
                bytes,
                count,
                next_id,
            },
            writer::Shared {
                fence: fence.clone(),
                undeleted,
                committed: committed_tx,
                reserve,
                reserve_held,
            },
        );
        let thread = std::thread::Builder::new()
            .name("bridge-spool".into())
            .spawn(move || w.run(rx))
            .map_err(|source| SpoolError::Io {
                path: path.to_path_buf(),
                source,
            })?;
        Ok((
            Spool {
                tx,
                reads,
                committed,
                fence,
                careful_at_open,
                path,
            },
            SpoolThread(thread),
        ))
    }

    /// The spool file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Queue a message; the receiver resolves after the commit that holds it.
    pub fn append(&self, msg: NewMessage) -> oneshot::Receiver<Result<(), Rejected>> {
        let (reply, rx) = oneshot::channel();
        if let Err(mpsc::SendError(Command::Append(_, reply))) =
            self.tx.send(Command::Append(msg, reply))
        {
            let _ = reply.send(Err(Rejected {
                reason: RejectReason::ShuttingDown,
            }));
        }
        rx
    }

    /// Delete an acknowledged row (committed with the next group).
    pub fn delete(&self, id: i64) {
        self.delete_many(vec![id]);
    }

    /// Delete acknowledged rows (committed with the next group).
    pub fn delete_many(&self, ids: Vec<i64>) {
        if !ids.is_empty() {
            let _ = self.tx.send(Command::Delete(ids));
        }
    }

    async fn ask<T>(
        &self,
        make: impl FnOnce(Reply<Result<T, SpoolError>>) -> Command,
    ) -> Result<T, SpoolError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(make(reply)).map_err(|_| SpoolError::Closed)?;
        rx.await.map_err(|_| SpoolError::Closed)?
    }

    /// Persist QoS 2 stages; resolves after they are committed.
    pub async fn set_stages(&self, updates: Vec<StageUpdate>) -> Result<(), SpoolError> {
        self.ask(|r| Command::SetStages(updates, r)).await
    }

    async fn read<T>(
        &self,
        make: impl FnOnce(Reply<Result<T, SpoolError>>) -> reader::Read,
    ) -> Result<T, SpoolError> {
        let (reply, rx) = oneshot::channel();
        self.reads
            .send(make(reply))
            .map_err(|_| SpoolError::Closed)?;
        rx.await.map_err(|_| SpoolError::Closed)?
    }

    /// Up to `limit` committed rows with id > `after`, in id order (fewer once 8 MiB of
    /// payload are read, so big messages do not balloon memory). Reads the last commit:
    /// call [`Spool::flush`] first to see writes queued just before.
    pub async fn fetch(&self, after: i64, limit: usize) -> Result<Vec<StoredMessage>, SpoolError> {
        self.read(|reply| reader::Read::Fetch {
            after,
            limit,
            reply,
        })
        .await
    }

    /// Committed rows with a persisted QoS 2 packet id.
    pub async fn in_progress(&self) -> Result<Vec<StoredMessage>, SpoolError> {
        self.read(reader::Read::InProgress).await
    }

    /// Count a link loss against `row`, the oldest row whose PUBLISH was unacknowledged when
    /// the cloud dropped a link that had come up (`None`: nothing was in flight, which
    /// clears the strikes); `through` is the newest row that was out. At `limit`
    /// consecutive strikes the row moves to the dead-letter table.
    pub async fn strike(
        &self,
        row: Option<i64>,
        through: i64,
        limit: u32,
    ) -> Result<StrikeOutcome, SpoolError> {
        let now_ms = crate::clock::now_ms();
        self.ask(|reply| Command::Strike {
            row,
            through,
            limit,
            now_ms,
            reply,
        })
        .await
    }

    /// Persist changes to the set of unreleased QoS 2 ids received by `bridge`; resolves
    /// after the commit (send PUBREC/PUBCOMP only then).
    pub async fn apply_incoming(
        &self,
        bridge: &str,
        ops: Vec<IncomingOp>,
    ) -> Result<(), SpoolError> {
        let bridge = bridge.to_string();
        self.ask(|reply| Command::Incoming { bridge, ops, reply })
            .await
    }

    /// Forget every unreleased QoS 2 id of `bridge` (the cloud has no session for us).
    pub async fn clear_incoming(&self, bridge: &str) -> Result<(), SpoolError> {
        let bridge = bridge.to_string();
        self.ask(|reply| Command::ClearIncoming { bridge, reply })
            .await
    }

    /// Committed unreleased QoS 2 ids received by `bridge`.
    pub async fn incoming(&self, bridge: &str) -> Result<Vec<u16>, SpoolError> {
        let bridge = bridge.to_string();
        self.read(|reply| reader::Read::Incoming { bridge, reply })
            .await
    }

    /// Committed rows of the dead-letter table, oldest first.
    pub async fn dead_letters(&self) -> Result<Vec<DeadLetter>, SpoolError> {
        self.read(reader::Read::DeadLetters).await
    }

    /// Newest row that was out at the pending strikes when the spool was opened (0: none):
    /// the uplink resumes resending one message at a time up to there after a restart.
    pub fn careful_through_at_open(&self) -> i64 {
        self.careful_at_open
    }

    /// The drop-oldest fence shared with the writer.
    pub(crate) fn fence(&self) -> &Arc<Fence> {
        &self.fence
    }

    /// The uplink session is over: once the deletes queued before this are applied,
    /// drop-oldest may take any row again.
    pub(crate) fn untake_all(&self) {
        let _ = self.tx.send(Command::Untake);
    }

    /// Resolves once everything queued before it is committed.
    pub async fn flush(&self) -> Result<(), SpoolError> {
        self.ask(Command::Flush).await
    }

    /// Resolves once everything queued before it is committed and the WAL is folded into
    /// the file: the last step of a clean stop, so the rows' second copy (the checkpoint's)
    /// is written now rather than at the next start, and the file stands alone.
    pub async fn checkpoint(&self) -> Result<(), SpoolError> {
        self.ask(Command::Checkpoint).await
    }

    /// Highest committed row id, updated after every commit.
    pub fn committed(&self) -> watch::Receiver<i64> {
        self.committed.clone()
    }
}

#[cfg(test)]
mod tests;
