//! The store's writer thread: applies the core's changes in order, many per transaction.
//!
//! Whatever queued up while the last transaction was being made durable goes into the
//! next one, so under load one fsync covers thousands of changes, and at a trickle a
//! change waits for one fsync only. A message acknowledged by its subscriber before its
//! row was ever written costs no disk write at all: both changes meet in one batch and
//! cancel out.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use outpost_mqtt::QoS;
use outpost_sqlite::commit_window::{CommitWindow, gather};
use outpost_sqlite::reserve::{FileReserve, Reserve};
use rusqlite::{Connection, ErrorCode, OptionalExtension, params};
use tokio::sync::oneshot;
use tracing::{error, info, warn};

use super::db::{self, encode_publish, expires_ms};
use super::{Counters, Op};
use crate::message::Message;

/// Changes in one transaction at most, so a huge backlog still commits in steps.
const MAX_BATCH: usize = 8192;

/// How often a store that cannot write tries again when nothing new arrives.
const RETRY_EVERY: Duration = Duration::from_secs(1);

/// Starts the writer on its own thread (SQLite calls block). Without `conn` (no file
/// yet) the file is made when the first change comes, so a broker that keeps nothing
/// never loads SQLite's code or page cache.
pub(super) fn spawn(
    conn: Option<Connection>,
    rx: Receiver<Op>,
    path: PathBuf,
    quota: u64,
    window: Duration,
    counters: Arc<Counters>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("broker-store".into())
        .spawn(move || Writer::new(conn, path, quota, window, counters).run(rx))
}

/// The writer's state between batches.
struct Writer {
    conn: Option<Connection>,
    path: PathBuf,
    counters: Arc<Counters>,
    /// Disk space held back beside the file, given up when the disk fills so that
    /// deletions and checkpoints can still run (`outpost_sqlite::reserve`).
    reserve: Option<FileReserve>,
    reserve_held: bool,
    /// Changes of failed batches that the memory state already relies on (deletions,
    /// session and subscription rows, QoS 2 and release flags): tried again, in order,
    /// before anything newer, so the file never drifts from what the broker serves.
    carried: Vec<Op>,
    last_report: Option<Instant>,
    /// Bytes the file's live pages may take (`broker.max_store_size`); 0 for no bound.
    quota: u64,
    /// How long a batch may wait for more changes (`broker.commit_window`).
    window: CommitWindow,
    /// The last write failed (a full disk, a failing card).
    failing: bool,
    /// The file holds more than `quota`.
    over_quota: bool,
    /// Content was refused or failed after the last sync that was answered: the next
    /// sync belongs to its publisher and must say no. (The writer may take a message's
    /// row before the core has queued the sync right behind it, so the two can fall into
    /// different batches.)
    tainted: bool,
}

impl Writer {
    fn new(
        conn: Option<Connection>,
        path: PathBuf,
        quota: u64,
        window: Duration,
        counters: Arc<Counters>,
    ) -> Writer {
        let mut w = Writer {
            conn: None,
            path,
            counters,
            reserve: None,
            reserve_held: false,
            carried: Vec::new(),
            last_report: None,
            quota,
            window: CommitWindow::new(window),
            failing: false,
            over_quota: false,
            tainted: false,
        };
        if let Some(c) = conn {
            w.opened(c);
        }
        w
    }

    /// Takes an open connection and holds the disk reserve beside it.
    fn opened(&mut self, conn: Connection) {
        let (reserve, held) = FileReserve::open(&self.path);
        if let Err(e) = &held {
            warn!(store = %self.path.display(), reserve = %reserve.describe(), error = %e,
                "broker store: no room for the disk reserve; should the disk fill up, \
                 deliveries may not be removable until space is freed");
        }
        self.reserve_held = held.is_ok();
        self.reserve = Some(reserve);
        self.conn = Some(conn);
    }

    fn run(mut self, rx: Receiver<Op>) {
        let mut batch = Vec::new();
        let mut syncs: Vec<oneshot::Sender<bool>> = Vec::new();
        loop {
            // A store that cannot write still wakes up to try again by itself.
            let first = if self.carried.is_empty() && !self.refusing() {
                match rx.recv() {
                    Ok(op) => Some(op),
                    Err(_) => break,
                }
            } else {
                match rx.recv_timeout(RETRY_EVERY) {
                    Ok(op) => Some(op),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => {
                        // Shutting down: one last try for what is carried.
                        self.write(&mut batch, &mut syncs);
                        break;
                    }
                }
            };
            batch.append(&mut self.carried);
            let gathered = first.is_some();
            if let Some(first) = first {
                gather(&rx, first, &mut batch, MAX_BATCH, &mut self.window, |_| {
                    false
                });
            }
            self.write(&mut batch, &mut syncs);
            if gathered {
                self.window.on_commit(Instant::now());
            }
        }
    }

    fn refusing(&self) -> bool {
        self.failing || self.over_quota
    }

    /// Publishes whether content is refused, for the core to refuse up front.
    fn publish_refusing(&self) {
        self.counters
            .refusing
            .store(self.refusing(), Ordering::Relaxed);
    }

    /// After a commit: whether the file's live pages are over `quota` (content refused)
    /// or back under it. SQLite reuses freed pages rather than shrink the file, so the
    /// pages in use are what counts, not the file's length.
    fn check_quota(&mut self) {
        let Some(conn) = self.conn.as_ref().filter(|_| self.quota > 0) else {
            return;
        };
        let used = conn
            .query_row(
                "SELECT (page_count - freelist_count) * page_size
                 FROM pragma_page_count, pragma_freelist_count, pragma_page_size",
                [],
                |r| r.get::<_, i64>(0),
            )
            .map_or(0, |v| u64::try_from(v).unwrap_or(0));
        let over = used > self.quota;
        if over != self.over_quota {
            self.over_quota = over;
            if over {
                warn!(
                    store = %self.path.display(),
                    used,
                    max_store_size = self.quota,
                    "broker store is full (broker.max_store_size): new retained messages and \
                     messages for offline sessions are refused until sessions drain or expire"
                );
            } else {
                info!(store = %self.path.display(), used, "broker store is below its quota again");
            }
            self.publish_refusing();
        }
    }

    /// Writes one batch and answers its syncs: true when everything before each sync is
    /// on disk.
    fn write(&mut self, batch: &mut Vec<Op>, syncs: &mut Vec<oneshot::Sender<bool>>) {
        let has_syncs = batch.iter().any(|op| matches!(op, Op::Sync(_)));
        let tail_content = content_after_last_sync(batch);
        let ok = self.write_batch(batch, syncs);
        // A sync answers for everything before it: content that failed in an earlier
        // batch, with no sync after it there, is this batch's first sync's to refuse.
        let answered_ok = ok.committed && !self.tainted;
        answer(syncs, answered_ok && !ok.refused_any);
        self.tainted = if has_syncs {
            ok.refused_tail(tail_content)
        } else {
            self.tainted || ok.refused_any
        };
    }

    /// Writes one batch (its syncs moved into `syncs`, answered by the caller).
    fn write_batch(
        &mut self,
        batch: &mut Vec<Op>,
        syncs: &mut Vec<oneshot::Sender<bool>>,
    ) -> Outcome {
        let mut refused_puts = false;
        if self.refusing() {
            self.try_recover();
        }
        if self.refusing() {
            // New content (messages owed to sessions, retained messages) is refused while
            // the disk is full: its publishers hear so instead of being acknowledged for
            // something that is not kept. What the memory state already did is kept.
            let before = batch.len();
            batch.retain(|op| !is_content(op));
            refused_puts = batch.len() != before;
            self.counters
                .refused
                .fetch_add((before - batch.len()) as u64, Ordering::Relaxed);
        }
        let only_syncs = batch.iter().all(|op| matches!(op, Op::Sync(_)));
        let result = if only_syncs {
            take_syncs(batch, syncs);
            Ok(0)
        } else {
            if self.conn.is_none() {
                match db::open(&self.path) {
                    Ok(c) => self.opened(c),
                    Err(e) => {
                        let content = batch.iter().any(is_content);
                        take_syncs(batch, syncs);
                        self.failed(&e.to_string(), false);
                        return Outcome {
                            committed: false,
                            refused_any: content,
                        };
                    }
                }
            }
            let conn = self.conn.as_mut().expect("opened above");
            apply(conn, batch, syncs)
        };
        match result {
            Ok(written) => {
                self.counters
                    .deliveries_written
                    .fetch_add(written, Ordering::Relaxed);
                self.counters.commits.fetch_add(1, Ordering::Relaxed);
                if written > 0 || !self.carried.is_empty() || self.over_quota {
                    self.check_quota();
                }
                Outcome {
                    committed: true,
                    refused_any: refused_puts,
                }
            }
            Err((e, ops)) => {
                let full = e.sqlite_error_code() == Some(ErrorCode::DiskFull);
                // Content that did not make it is refused to its publishers; the rest is
                // what memory already relies on, so it is kept and tried again.
                let content = ops.iter().any(is_content);
                self.carried = ops.into_iter().filter(|op| !is_content(op)).collect();
                self.failed(&e.to_string(), full);
                Outcome {
                    committed: false,
                    refused_any: content || refused_puts,
                }
            }
        }
    }

    /// Records a failed write: counted, logged once a minute, and, on a full disk, the
    /// reserve is given back and new content is refused until it can be held again.
    fn failed(&mut self, error: &str, full: bool) {
        let n = self.counters.failed_batches.fetch_add(1, Ordering::Relaxed) + 1;
        let newly = !self.failing;
        self.failing = true;
        self.publish_refusing();
        if full
            && self.reserve_held
            && let (Some(r), Some(c)) = (self.reserve.as_mut(), self.conn.as_ref())
            && r.release(c).is_ok()
        {
            self.reserve_held = false;
        }
        if newly
            || self
                .last_report
                .is_none_or(|t| t.elapsed() > Duration::from_secs(60))
        {
            self.last_report = Some(Instant::now());
            error!(
                store = %self.path.display(),
                error,
                failed_batches = n,
                "broker store: cannot write; retained messages and messages for persistent \
                 sessions are refused (5.0: 0x97, 3.x: no acknowledgement) until it can. \
                 Free space on the disk: the broker starts accepting them again by itself"
            );
        }
    }

    /// Accepts content again once the carried changes are written and the reserve can be
    /// held again with room to spare.
    fn try_recover(&mut self) {
        if !self.failing || !self.carried.is_empty() {
            return;
        }
        let held = match (self.reserve.as_mut(), self.conn.as_ref()) {
            (Some(r), Some(c)) if !self.reserve_held => r.hold(c).is_ok(),
            _ => true,
        };
        if held {
            self.reserve_held = self.reserve.is_some();
            self.failing = false;
            self.publish_refusing();
            info!(store = %self.path.display(), "broker store: writing again");
        }
    }
}

/// How one batch went.
struct Outcome {
    /// The transaction committed (or there was nothing to write).
    committed: bool,
    /// Content of the batch was refused or lost with a failed transaction.
    refused_any: bool,
}

impl Outcome {
    /// Whether the next batch's first sync must refuse: content failed here after this
    /// batch's last sync (`tail_content`).
    fn refused_tail(&self, tail_content: bool) -> bool {
        tail_content && (self.refused_any || !self.committed)
    }
}

/// True when content comes after the batch's last sync (its sync is still to come).
fn content_after_last_sync(batch: &[Op]) -> bool {
    batch
        .iter()
        .rev()
        .take_while(|op| !matches!(op, Op::Sync(_)))
        .any(is_content)
}

/// Messages for sessions and retained messages: what a publisher's acknowledgement waits
/// for, and what a full disk refuses.
fn is_content(op: &Op) -> bool {
    match op {
        Op::PutDelivery { .. } | Op::PutRetained(_) => true,
        // A group stands or falls as one: with any content in it, it is content.
        Op::Group(ops) => ops.iter().any(is_content),
        _ => false,
    }
}

fn answer(syncs: &mut Vec<oneshot::Sender<bool>>, ok: bool) {
    for s in syncs.drain(..) {
        let _ = s.send(ok);
    }
}

/// Empties a batch that will not be written, keeping its syncs to be answered.
fn take_syncs(batch: &mut Vec<Op>, syncs: &mut Vec<oneshot::Sender<bool>>) {
    syncs.extend(batch.drain(..).filter_map(|op| match op {
        Op::Sync(s) => Some(s),
        _ => None,
    }));
}

/// Applies one batch in one transaction, returning how many delivery rows it wrote; the
/// syncs in it are handed back to be answered after the commit. On failure the batch's
/// changes come back with the error, to be carried into the next try.
fn apply(
    conn: &mut Connection,
    batch: &mut Vec<Op>,
    syncs: &mut Vec<oneshot::Sender<bool>>,
) -> Result<u64, (rusqlite::Error, Vec<Op>)> {
    // Deliveries both written and dropped in this batch never reach the file.
    let put: HashSet<u64> = flat(batch)
        .filter_map(|op| match op {
            Op::PutDelivery { id, .. } => Some(*id),
            _ => None,
        })
        .collect();
    let cancelled: HashSet<u64> = flat(batch)
        .filter_map(|op| match op {
            Op::DropDelivery(id) if put.contains(id) => Some(*id),
            _ => None,
        })
        .collect();
    take_syncs_in_place(batch, syncs);
    // Messages owed to more than one session in this batch (one publish to many offline
    // sessions) are kept once: 40 sessions and a 50 MiB payload cost 50 MiB, not 2 GB.
    let mut owed: HashMap<*const Message, usize> = HashMap::new();
    for op in flat(batch) {
        if let Op::PutDelivery { id, msg, .. } = op
            && !cancelled.contains(id)
        {
            *owed.entry(Arc::as_ptr(msg)).or_default() += 1;
        }
    }
    let mut shared: HashMap<*const Message, Option<i64>> = owed
        .into_iter()
        .filter(|&(_, n)| n > 1)
        .map(|(m, _)| (m, None))
        .collect();
    let result = (|| {
        let tx = conn.transaction()?;
        let mut written = 0;
        for op in batch.iter() {
            apply_one(&tx, op, &cancelled, &mut shared)?;
        }
        for op in flat(batch) {
            if let Op::PutDelivery { id, .. } = op
                && !cancelled.contains(id)
            {
                written += 1;
            }
        }
        tx.commit()?;
        Ok(written)
    })();
    match result {
        Ok(n) => {
            batch.clear();
            Ok(n)
        }
        Err(e) => Err((e, std::mem::take(batch))),
    }
}

/// The changes of a batch with groups opened up (groups do not nest).
fn flat(batch: &[Op]) -> impl Iterator<Item = &Op> {
    batch.iter().flat_map(|op| match op {
        Op::Group(ops) => ops.as_slice(),
        op => std::slice::from_ref(op),
    })
}

/// Moves the syncs out of a batch, leaving its changes in order.
fn take_syncs_in_place(batch: &mut Vec<Op>, syncs: &mut Vec<oneshot::Sender<bool>>) {
    let mut rest = Vec::with_capacity(batch.len());
    for op in batch.drain(..) {
        match op {
            Op::Sync(s) => syncs.push(s),
            op => rest.push(op),
        }
    }
    *batch = rest;
}

fn apply_one(
    tx: &rusqlite::Transaction<'_>,
    op: &Op,
    cancelled: &HashSet<u64>,
    shared: &mut HashMap<*const Message, Option<i64>>,
) -> rusqlite::Result<()> {
    match op {
        Op::PutSession {
            id,
            client_id,
            protocol,
            expiry,
        } => {
            // A client id belongs to one session: an older row under another id (a
            // session that ended while a write failed) goes with everything it held.
            let old: Option<i64> = tx
                .prepare_cached("SELECT id FROM sessions WHERE client_id = ?1 AND id != ?2")?
                .query_row(params![&**client_id, id], |r| r.get(0))
                .map(Some)
                .or_else(|e| match e {
                    rusqlite::Error::QueryReturnedNoRows => Ok(None),
                    e => Err(e),
                })?;
            if let Some(old) = old {
                drop_session(tx, old)?;
            }
            tx.prepare_cached(
                "INSERT INTO sessions (id, client_id, protocol, expiry) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(id) DO UPDATE SET protocol = excluded.protocol, expiry = excluded.expiry",
            )?
            .execute(params![id, &**client_id, *protocol as u8, expiry])?;
        }
        Op::DropSession(id) => drop_session(tx, i64::from(*id))?,
        Op::PutSub {
            session,
            filter,
            options,
            sub_id,
        } => {
            tx.prepare_cached(
                "INSERT OR REPLACE INTO subscriptions
                 (session, filter, qos, no_local, retain_as_pub, retain_handling, sub_id)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?
            .execute(params![
                session,
                filter,
                options.qos as u8,
                options.no_local,
                options.retain_as_published,
                options.retain_handling as u8,
                sub_id
            ])?;
        }
        Op::DropSub { session, filter } => {
            tx.prepare_cached("DELETE FROM subscriptions WHERE session = ?1 AND filter = ?2")?
                .execute(params![session, filter])?;
        }
        Op::PutDelivery {
            id,
            session,
            msg,
            qos,
            retain,
            sub_ids,
            packet_id,
        } => {
            if cancelled.contains(id) {
                return Ok(());
            }
            let ids: Option<Vec<u8>> = (!sub_ids.is_empty())
                .then(|| sub_ids.iter().flat_map(|i| i.to_be_bytes()).collect());
            let id = i64::try_from(*id).unwrap_or(i64::MAX);
            let packet_id = packet_id.filter(|_| *qos != QoS::AtMostOnce);
            if let Some(slot) = shared.get_mut(&Arc::as_ptr(msg)) {
                let message = match *slot {
                    Some(m) => m,
                    None => {
                        let blob = encode_publish(msg, msg.qos, msg.retain);
                        tx.prepare_cached("INSERT INTO messages (publish, crc) VALUES (?1, ?2)")?
                            .execute(params![blob, db::checksum(&blob)])?;
                        let m = tx.last_insert_rowid();
                        *slot = Some(m);
                        m
                    }
                };
                tx.prepare_cached(
                    "INSERT OR REPLACE INTO deliveries
                     (id, session, publish, expires_ms, sub_ids, packet_id, message, qos, retain)
                     VALUES (?1, ?2, X'', ?3, ?4, ?5, ?6, ?7, ?8)",
                )?
                .execute(params![
                    id,
                    session,
                    expires_ms(msg),
                    ids,
                    packet_id,
                    message,
                    *qos as u8,
                    retain
                ])?;
                return Ok(());
            }
            let blob = encode_publish(msg, *qos, *retain);
            tx.prepare_cached(
                "INSERT OR REPLACE INTO deliveries (id, session, publish, expires_ms, sub_ids, packet_id, crc)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?
            .execute(params![
                id,
                session,
                blob,
                expires_ms(msg),
                ids,
                packet_id,
                db::checksum(&blob)
            ])?;
        }
        Op::SetPacketId { id, packet_id } => {
            if !cancelled.contains(id) {
                tx.prepare_cached("UPDATE deliveries SET packet_id = ?2 WHERE id = ?1")?
                    .execute(params![i64::try_from(*id).unwrap_or(i64::MAX), packet_id])?;
            }
        }
        Op::Released(id) => {
            if !cancelled.contains(id) {
                tx.prepare_cached("UPDATE deliveries SET released = 1 WHERE id = ?1")?
                    .execute(params![i64::try_from(*id).unwrap_or(i64::MAX)])?;
            }
        }
        Op::DropDelivery(id) => {
            if !cancelled.contains(id) {
                let message: Option<Option<i64>> = tx
                    .prepare_cached("DELETE FROM deliveries WHERE id = ?1 RETURNING message")?
                    .query_row(params![i64::try_from(*id).unwrap_or(i64::MAX)], |r| {
                        r.get(0)
                    })
                    .optional()?;
                if let Some(Some(m)) = message {
                    // The last session owed a shared message takes it with it.
                    tx.prepare_cached(
                        "DELETE FROM messages WHERE id = ?1
                         AND NOT EXISTS (SELECT 1 FROM deliveries WHERE message = ?1)",
                    )?
                    .execute(params![m])?;
                }
            }
        }
        Op::PutQos2 { session, packet_id } => {
            tx.prepare_cached(
                "INSERT OR IGNORE INTO incoming_qos2 (session, packet_id) VALUES (?1, ?2)",
            )?
            .execute(params![session, packet_id])?;
        }
        Op::DropQos2 { session, packet_id } => {
            tx.prepare_cached("DELETE FROM incoming_qos2 WHERE session = ?1 AND packet_id = ?2")?
                .execute(params![session, packet_id])?;
        }
        Op::PutRetained(msg) => {
            let blob = encode_publish(msg, msg.qos, true);
            tx.prepare_cached(
                "INSERT OR REPLACE INTO retained (topic, publish, expires_ms, crc) VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![&*msg.topic, blob, expires_ms(msg), db::checksum(&blob)])?;
        }
        Op::DropRetained(topic) => {
            tx.prepare_cached("DELETE FROM retained WHERE topic = ?1")?
                .execute(params![&**topic])?;
        }
        Op::Group(ops) => {
            for op in ops {
                apply_one(tx, op, cancelled, shared)?;
            }
        }
        Op::Sync(_) => {}
    }
    Ok(())
}

fn drop_session(tx: &rusqlite::Transaction<'_>, id: i64) -> rusqlite::Result<()> {
    for sql in [
        "DELETE FROM deliveries WHERE session = ?1",
        "DELETE FROM subscriptions WHERE session = ?1",
        "DELETE FROM incoming_qos2 WHERE session = ?1",
        "DELETE FROM sessions WHERE id = ?1",
    ] {
        tx.prepare_cached(sql)?.execute(params![id])?;
    }
    // Shared messages no session is owed any more.
    tx.prepare_cached(
        "DELETE FROM messages WHERE NOT EXISTS
         (SELECT 1 FROM deliveries WHERE deliveries.message = messages.id)",
    )?
    .execute([])?;
    Ok(())
}
