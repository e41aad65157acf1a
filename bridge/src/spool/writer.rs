//! The spool writer thread: drains every queued command into one transaction (group
//! commit), then answers the callers.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use outpost_sqlite::commit_window::{CommitWindow, gather};
use outpost_sqlite::reserve::Reserve;
use rusqlite::{Connection, ErrorCode, OptionalExtension, Transaction, params};
use tokio::sync::{oneshot, watch};

use super::acked::{IdRanges, Undeleted, runs};
use super::{Command, Fence, IncomingOp, SpoolOptions, StrikeOutcome, store};
use crate::config::WhenFull;
use crate::error::{RejectReason, Rejected, SpoolError};
use crate::stats::BridgeStats;

/// Most commands folded into one transaction; bounds commit latency under a flood.
const MAX_GROUP: usize = 16_384;
/// How soon acknowledged rows whose delete failed are tried again when nothing else comes.
const RETRY_EVERY: Duration = Duration::from_secs(1);
/// How often a full spool checks whether there is room again (and at once when it drains).
const RECOVER_EVERY: Duration = Duration::from_secs(2);
/// Least time between two log lines about the same kind of failure.
const LOG_EVERY: Duration = Duration::from_secs(10);
/// How often a spool that stays full says so again.
const STILL_FULL_EVERY: Duration = Duration::from_secs(60);

pub(super) struct Writer {
    conn: Connection,
    st: State,
    /// How long a batch may wait for more messages (`spool.commit_window`).
    window: CommitWindow,
}

/// What the writer shares with the handles and the reader, and the disk reserve.
pub(super) struct Shared {
    /// The drop-oldest fence.
    pub fence: Arc<Fence>,
    /// Acknowledged rows whose delete is not committed yet (the reader skips them).
    pub undeleted: Arc<Undeleted>,
    /// Highest committed row id.
    pub committed: watch::Sender<i64>,
    /// Space released on a full disk.
    pub reserve: Box<dyn Reserve>,
    /// Whether the reserve could be made at open.
    pub reserve_held: bool,
}

/// Counters read from the file at open.
pub(super) struct Totals {
    /// Accounted bytes of the rows present.
    pub bytes: u64,
    /// Rows present.
    pub count: u64,
    /// Id for the next appended row.
    pub next_id: i64,
}

/// Everything but the connection, so a transaction can borrow the connection while the
/// accounting is updated.
struct State {
    opts: SpoolOptions,
    stats: Arc<BridgeStats>,
    bytes: u64,
    count: u64,
    /// Ids are handed out here, never by SQLite: SQLite reuses `max(id) + 1`, so once the
    /// table drained empty a new row would get an id behind the uplink's read cursor.
    next_id: i64,
    fence: Arc<Fence>,
    /// Rows claimed for dropping whose delete has not been committed yet (the transaction
    /// failed): the uplink skips them, so they are deleted and counted with the next one.
    unsettled: Vec<i64>,
    committed: watch::Sender<i64>,
    /// Acknowledged rows whose delete was lost with a failed transaction: deleted with the
    /// next one, and left out of fetches meanwhile (mirrored in `shared_undeleted`), so they
    /// are not sent again while the process lives.
    undeleted: IdRanges,
    shared_undeleted: Arc<Undeleted>,
    reserve: Box<dyn Reserve>,
    reserve_held: bool,
    /// Set while the disk is full: new messages are refused until the reserve is held
    /// again, and deletes and checkpoints use the space it gave back.
    full: Option<Full>,
    commit_log: Throttle,
    delete_log: Throttle,
    full_log: Throttle,
}

/// A disk-full episode.
struct Full {
    since: Instant,
    refused: u64,
    last_try: Option<Instant>,
    last_note: Instant,
}

/// At most one log line per [`LOG_EVERY`]; counts the ones left out.
#[derive(Default)]
struct Throttle {
    last: Option<Instant>,
    suppressed: u64,
}

impl Throttle {
    /// `Some(lines left out since the last one)` when a line may be logged now.
    fn ready(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self.last.is_some_and(|t| now.duration_since(t) < LOG_EVERY) {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// True for `SQLITE_FULL`: the file system (or the page cap) has no room.
pub(super) fn is_disk_full(e: &rusqlite::Error) -> bool {
    e.sqlite_error_code() == Some(ErrorCode::DiskFull)
}

type StrikeReply = oneshot::Sender<Result<StrikeOutcome, SpoolError>>;

/// What one group produced, answered after the commit.
#[derive(Default)]
struct Group {
    appended: Vec<oneshot::Sender<Result<(), Rejected>>>,
    staged: Vec<oneshot::Sender<Result<(), SpoolError>>>,
    /// Strike replies with their outcome (`None`: failed with the group).
    struck: Vec<(StrikeReply, Option<StrikeOutcome>)>,
    reads: Vec<Command>,
    dropped_oldest: u64,
    dead_lettered: u64,
    /// `taken_through` before an `Untake` in this group, restored if it rolls back.
    untaken_from: Option<i64>,
    last_id: Option<i64>,
    /// Ids of the deletes in this group: kept for a retry if it rolls back.
    deletes: Vec<Vec<i64>>,
}

fn reject(reply: oneshot::Sender<Result<(), Rejected>>, reason: RejectReason) {
    let _ = reply.send(Err(Rejected { reason }));
}

impl Writer {
    pub(super) fn new(
        conn: Connection,
        opts: SpoolOptions,
        stats: Arc<BridgeStats>,
        totals: Totals,
        shared: Shared,
    ) -> Self {
        Writer {
            conn,
            window: CommitWindow::new(opts.commit_window),
            st: State {
                opts,
                stats,
                bytes: totals.bytes,
                count: totals.count,
                next_id: totals.next_id.max(1),
                fence: shared.fence,
                unsettled: Vec::new(),
                committed: shared.committed,
                undeleted: IdRanges::default(),
                shared_undeleted: shared.undeleted,
                reserve: shared.reserve,
                reserve_held: shared.reserve_held,
                full: None,
                commit_log: Throttle::default(),
                delete_log: Throttle::default(),
                full_log: Throttle::default(),
            },
        }
    }

    pub(super) fn run(mut self, rx: mpsc::Receiver<Command>) {
        let mut batch = Vec::with_capacity(1024);
        loop {
            // Blocks as before unless a failed delete or a full disk has something to retry.
            let first = if self.st.has_retries() {
                match rx.recv_timeout(RETRY_EVERY) {
                    Ok(c) => Some(c),
                    Err(mpsc::RecvTimeoutError::Timeout) => None,
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
            } else {
                match rx.recv() {
                    Ok(c) => Some(c),
                    Err(_) => break,
                }
            };
            let gathered = first.is_some();
            if let Some(first) = first {
                gather(
                    &rx,
                    first,
                    &mut batch,
                    MAX_GROUP,
                    &mut self.window,
                    Command::is_urgent,
                );
            }
            self.process(&mut batch);
            if gathered {
                self.window.on_commit(Instant::now());
            }
        }
        if self.st.has_writes() {
            // Last chance for acknowledged rows whose delete failed.
            self.process(&mut Vec::new());
        }
        if !self.st.undeleted.is_empty() {
            tracing::error!(spool = %self.st.opts.path.display(), messages = self.st.undeleted.len(),
                "spool: acknowledged messages could not be deleted before the stop: they will be sent \
                 again after the restart (QoS 1 duplicates; QoS 2 ones whose PUBREL was recorded \
                 only get a PUBREL); free space on the spool's file system");
        }
        // Fold the WAL back so the file on disk is self-contained after a clean stop.
        if let Err(e) = checkpoint_truncate(&self.conn) {
            tracing::warn!(error = %e, "spool checkpoint at close failed");
        }
    }

    fn process(&mut self, batch: &mut Vec<Command>) {
        if self.st.full.is_some() {
            self.st.refuse_appends(batch);
        }
        if batch.is_empty() && !self.st.has_writes() {
            self.st.maybe_recover(&self.conn, false);
            return;
        }
        let st = &mut self.st;
        let (bytes0, count0) = (st.bytes, st.count);
        let mut group = Group::default();
        let outcome = match self.conn.unchecked_transaction() {
            Ok(tx) => {
                let mut failed = st
                    .settle_claims(&tx, &mut group)
                    .and_then(|()| st.settle_undeleted(&tx))
                    .err();
                for cmd in batch.drain(..) {
                    st.apply(&tx, cmd, &mut group, &mut failed);
                }
                match failed {
                    None => tx.commit(),
                    Some(e) => Err(e),
                }
            }
            Err(e) => {
                let mut failed = Some(e);
                for cmd in batch.drain(..) {
                    collect_only(cmd, &mut group);
                }
                Err(failed.take().unwrap_or(rusqlite::Error::InvalidQuery))
            }
        };
        match outcome {
            Ok(()) => {
                self.st.after_commit(&self.conn, group);
                // Drained by this commit while full: look for room at once (checkpoint,
                // vacuum, reserve).
                let drained = count0 > 0 && self.st.count == 0;
                self.st.maybe_recover(&self.conn, drained);
            }
            Err(e) => {
                let full = is_disk_full(&e);
                self.st.after_failure(&self.conn, e, group, bytes0, count0);
                if full {
                    if self.st.enter_full(&self.conn) {
                        // The reserve is free now: the deletes (and stage changes to come)
                        // go through at once, while new messages are refused.
                        self.process(&mut Vec::new());
                    } else {
                        // Nothing left to release: see whether space was freed meanwhile.
                        self.st.maybe_recover(&self.conn, false);
                    }
                }
            }
        }
    }
}

fn collect_only(cmd: Command, group: &mut Group) {
    match cmd {
        Command::Append(_, reply) => group.appended.push(reply),
        Command::SetStages(_, reply)
        | Command::Incoming { reply, .. }
        | Command::ClearIncoming { reply, .. } => group.staged.push(reply),
        Command::Strike { reply, .. } => group.struck.push((reply, None)),
        // Deletes of a failed group are kept (`State::undeleted`) and retried. Rows already
        // claimed for dropping stay in `unsettled`.
        Command::Delete(ids) => group.deletes.push(ids),
        // Only after the deletes before it are durable may the fence open again.
        Command::Untake => {}
        read => group.reads.push(read),
    }
}

impl State {
    fn sqlite_error(&self, source: rusqlite::Error) -> SpoolError {
        SpoolError::Sqlite {
            path: self.opts.path.clone(),
            source,
        }
    }

    fn apply(
        &mut self,
        tx: &Transaction<'_>,
        cmd: Command,
        group: &mut Group,
        failed: &mut Option<rusqlite::Error>,
    ) {
        if failed.is_some() {
            return collect_only(cmd, group);
        }
        let result = match cmd {
            Command::Append(msg, reply) => {
                let size = msg.accounted_size();
                let fits = match self.make_room(tx, size, group) {
                    Ok(fits) => fits,
                    Err(e) => {
                        group.appended.push(reply);
                        *failed = Some(e);
                        return;
                    }
                };
                if !fits {
                    BridgeStats::bump(&self.stats.rejected_full);
                    return reject(reply, RejectReason::SpoolFull);
                }
                let id = self.next_id;
                let r = tx
                    .prepare_cached(
                        "INSERT INTO messages (id, topic, payload, qos, retain, props, accepted_ms, size)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                    )
                    .and_then(|mut st| {
                        st.execute(params![
                            id,
                            msg.topic,
                            &msg.payload[..],
                            msg.qos as u8,
                            msg.retain,
                            msg.props,
                            msg.accepted_ms,
                            size as i64
                        ])
                    });
                group.appended.push(reply);
                r.map(|_| {
                    self.next_id += 1;
                    group.last_id = Some(id);
                    self.bytes += size;
                    self.count += 1;
                })
            }
            Command::Delete(mut ids) => {
                let r = self.delete_all(tx, &mut ids);
                group.deletes.push(ids);
                r
            }
            Command::SetStages(updates, reply) => {
                group.staged.push(reply);
                tx.prepare_cached("UPDATE messages SET packet_id = ?2, stage = ?3 WHERE id = ?1")
                    .and_then(|mut st| {
                        for u in &updates {
                            st.execute(params![u.id, u.packet_id, u.stage as i64])?;
                        }
                        Ok(())
                    })
            }
            Command::Strike {
                row,
                through,
                limit,
                now_ms,
                reply,
            } => match self.strike(tx, row, through, limit, now_ms) {
                Ok(outcome) => {
                    if matches!(outcome, StrikeOutcome::DeadLettered { .. }) {
                        group.dead_lettered += 1;
                    }
                    group.struck.push((reply, Some(outcome)));
                    Ok(())
                }
                Err(e) => {
                    group.struck.push((reply, None));
                    Err(e)
                }
            },
            Command::Incoming { bridge, ops, reply } => {
                group.staged.push(reply);
                apply_incoming(tx, &bridge, &ops)
            }
            Command::ClearIncoming { bridge, reply } => {
                group.staged.push(reply);
                tx.prepare_cached("DELETE FROM incoming_qos2 WHERE bridge = ?1")
                    .and_then(|mut st| st.execute([&bridge]))
                    .map(|_| ())
            }
            Command::Untake => {
                // In place, so appends later in this group may drop those rows already; the
                // deletes before it are in this same transaction.
                let mut marks = self.fence.lock();
                group.untaken_from.get_or_insert(marks.taken_through());
                marks.untake_all();
                Ok(())
            }
            read => {
                group.reads.push(read);
                Ok(())
            }
        };
        if let Err(e) = result {
            *failed = Some(e);
        }
    }

    /// Delete acknowledged rows; consecutive ids (the common case: acks come in order)
    /// go in one range statement. The range's count and bytes are summed first rather
    /// than returned row by row: `RETURNING` buffers and steps out every deleted row, which
    /// made deleting cost the draining uplink more CPU than sending.
    fn delete_all(&mut self, tx: &Transaction<'_>, ids: &mut Vec<i64>) -> rusqlite::Result<()> {
        for (lo, hi) in runs(ids) {
            self.delete_range(tx, lo, hi)?;
        }
        Ok(())
    }

    /// Delete the rows `lo..=hi` (every one acknowledged).
    fn delete_range(&mut self, tx: &Transaction<'_>, lo: i64, hi: i64) -> rusqlite::Result<()> {
        let (count, size): (i64, i64) = tx
            .prepare_cached(
                "SELECT count(*), coalesce(sum(size), 0) FROM messages WHERE id BETWEEN ?1 AND ?2",
            )?
            .query_row(params![lo, hi], |r| Ok((r.get(0)?, r.get(1)?)))?;
        if count > 0 {
            tx.prepare_cached("DELETE FROM messages WHERE id BETWEEN ?1 AND ?2")?
                .execute(params![lo, hi])?;
            self.bytes = self.bytes.saturating_sub(size.max(0) as u64);
            self.count = self.count.saturating_sub(count as u64);
        }
        Ok(())
    }

    /// Delete the acknowledged rows whose delete failed before.
    fn settle_undeleted(&mut self, tx: &Transaction<'_>) -> rusqlite::Result<()> {
        if self.undeleted.is_empty() {
            return Ok(());
        }
        let ranges: Vec<(i64, i64)> = self.undeleted.ranges().collect();
        for (lo, hi) in ranges {
            self.delete_range(tx, lo, hi)?;
        }
        Ok(())
    }

    /// Something to write even without new commands: failed deletes or drop claims.
    fn has_writes(&self) -> bool {
        !self.undeleted.is_empty() || !self.unsettled.is_empty()
    }

    /// Whether the writer must wake up by itself: to retry writes, or to look for room.
    fn has_retries(&self) -> bool {
        self.has_writes() || self.full.is_some()
    }

    /// While the disk is full, refuse new messages before they cost a failed transaction.
    fn refuse_appends(&mut self, batch: &mut Vec<Command>) {
        if !batch.iter().any(|c| matches!(c, Command::Append(..))) {
            return;
        }
        let dir = self
            .opts
            .path
            .parent()
            .map_or_else(String::new, |d| d.display().to_string());
        let text = format!(
            "database or disk is full ({dir}): new messages are refused until there is room again"
        );
        let mut refused = 0u64;
        for cmd in std::mem::take(batch) {
            match cmd {
                Command::Append(_, reply) => {
                    refused += 1;
                    reject(reply, RejectReason::Storage(text.clone()));
                }
                other => batch.push(other),
            }
        }
        self.stats.rejected_storage.fetch_add(refused, Relaxed);
        if let Some(full) = &mut self.full {
            full.refused += refused;
        }
    }

    /// A write failed with `SQLITE_FULL`: refuse new messages from now on and give the
    /// reserve back so that deletes and checkpoints can run. True when it was released now.
    fn enter_full(&mut self, conn: &Connection) -> bool {
        let first = self.full.is_none();
        if first {
            let now = Instant::now();
            self.full = Some(Full {
                since: now,
                refused: 0,
                last_try: None,
                last_note: now,
            });
        }
        let mut released = false;
        if self.reserve_held {
            match self.reserve.release(conn) {
                Ok(()) => {
                    self.reserve_held = false;
                    released = true;
                }
                Err(e) => tracing::error!(spool = %self.opts.path.display(),
                    reserve = %self.reserve.describe(), error = %e,
                    "spool: could not release the disk reserve"),
            }
        }
        if first && let Some(suppressed) = self.full_log.ready() {
            let dir = self
                .opts
                .path
                .parent()
                .map_or_else(String::new, |d| d.display().to_string());
            tracing::error!(spool = %self.opts.path.display(), dir = %dir,
                reserve_released = released, reserve_bytes = self.reserve.size(),
                messages = self.count, bytes = self.bytes, similar_suppressed = suppressed,
                "spool: the disk is full: new messages are refused (reason code 0x80) until there \
                 is room again; acknowledged messages are still deleted (the disk reserve was \
                 given back for that) and the spool accepts again by itself once the uplink has \
                 drained it or space is freed. Free space on that file system, or lower \
                 max_bytes below what it can hold");
        }
        if released {
            let _ = checkpoint_truncate(conn);
        }
        released
    }

    /// While full: give back what the WAL (and, once drained, the file's free pages) hold,
    /// and accept messages again once the reserve can be held again with room beside it.
    /// At most every [`RECOVER_EVERY`] unless `now`.
    fn maybe_recover(&mut self, conn: &Connection, now: bool) {
        let Some(full) = &mut self.full else {
            return;
        };
        let t = Instant::now();
        if !now
            && full
                .last_try
                .is_some_and(|l| t.duration_since(l) < RECOVER_EVERY)
        {
            return;
        }
        full.last_try = Some(t);
        let _ = checkpoint_truncate(conn);
        if self.count == 0 && self.undeleted.is_empty() {
            // Deleted rows leave free pages that only VACUUM gives back to the file system;
            // with nothing spooled it rewrites next to nothing.
            let free: i64 = conn
                .query_row("PRAGMA freelist_count", [], |r| r.get(0))
                .unwrap_or(0);
            if free > 0 {
                match conn.execute_batch("VACUUM") {
                    Ok(()) => {
                        let _ = checkpoint_truncate(conn);
                    }
                    Err(e) => tracing::debug!(error = %e, "spool: vacuum while full failed"),
                }
            }
        }
        match self.reserve.hold(conn) {
            Ok(()) => {
                self.reserve_held = true;
                if let Some(full) = self.full.take() {
                    let (refused, secs) = (full.refused, full.since.elapsed().as_secs());
                    let text =
                        "spool: there is room on the disk again: new messages are accepted again";
                    if refused > 0 {
                        tracing::warn!(spool = %self.opts.path.display(), refused,
                            full_secs = secs, messages = self.count, "{text}");
                    } else {
                        tracing::info!(spool = %self.opts.path.display(), refused,
                            full_secs = secs, messages = self.count, "{text}");
                    }
                }
            }
            Err(e) => {
                if t.duration_since(full.last_note) >= STILL_FULL_EVERY {
                    full.last_note = t;
                    tracing::warn!(spool = %self.opts.path.display(), error = %e,
                        refused = full.refused, messages = self.count,
                        "spool: the disk is still full: new messages are still refused");
                }
            }
        }
    }

    fn delete(&mut self, tx: &Transaction<'_>, id: i64) -> rusqlite::Result<bool> {
        let size: Option<i64> = tx
            .prepare_cached("DELETE FROM messages WHERE id = ?1 RETURNING size")?
            .query_row([id], |r| r.get(0))
            .optional()?;
        if let Some(size) = size {
            self.bytes = self.bytes.saturating_sub(size as u64);
            self.count = self.count.saturating_sub(1);
        }
        Ok(size.is_some())
    }

    /// Ensure `size` more bytes fit: under drop-oldest, delete the oldest rows that the
    /// uplink has not taken for sending and that have no QoS 2 exchange in progress
    /// (dropping those would break exactly-once). False when the message cannot fit.
    ///
    /// Rows the uplink took (its in-flight window and acknowledged rows whose delete is on
    /// its way) are spared, so a message is counted dropped or forwarded, never both, and
    /// is never sent after being counted dropped. Sparing them never lets the spool grow
    /// past `max_bytes`: when only spared rows are left, the new message is refused.
    fn make_room(
        &mut self,
        tx: &Transaction<'_>,
        size: u64,
        group: &mut Group,
    ) -> rusqlite::Result<bool> {
        let max = self.opts.max_bytes;
        if self.bytes + size <= max {
            return Ok(true);
        }
        if self.opts.when_full == WhenFull::RejectNew || size > max {
            return Ok(false);
        }
        let need = self.bytes + size - max;
        let victims = {
            // Choose and claim under the lock, so the uplink cannot take a victim meanwhile.
            let fence = self.fence.clone();
            let mut marks = fence.lock();
            let floor = marks.taken_through();
            let victims = choose_victims(tx, floor, need)?;
            if victims.iter().map(|&(_, size)| size).sum::<u64>() < need {
                // Only rows in flight or in a QoS 2 exchange would be left: dropping some
                // and refusing anyway would lose them for nothing.
                return Ok(false);
            }
            if let Some(&(last, _)) = victims.last() {
                marks.claim(floor, last);
            }
            victims
        };
        for (id, _) in victims {
            self.unsettled.push(id);
            if self.delete(tx, id)? {
                group.dropped_oldest += 1;
            }
        }
        Ok(self.bytes + size <= max)
    }

    /// Delete rows claimed by a group that then failed to commit.
    fn settle_claims(&mut self, tx: &Transaction<'_>, group: &mut Group) -> rusqlite::Result<()> {
        for id in self.unsettled.clone() {
            if self.delete(tx, id)? {
                group.dropped_oldest += 1;
            }
        }
        Ok(())
    }

    /// Count a link loss against `row` (see `Spool::strike`).
    fn strike(
        &mut self,
        tx: &Transaction<'_>,
        row: Option<i64>,
        through: i64,
        limit: u32,
        now_ms: i64,
    ) -> rusqlite::Result<StrikeOutcome> {
        let Some(row) = row else {
            tx.execute("DELETE FROM strikes", [])?;
            return Ok(StrikeOutcome::Cleared);
        };
        // Only consecutive losses count: a strike on another row starts over.
        tx.execute("DELETE FROM strikes WHERE row_id != ?1", [row])?;
        let spooled: bool = tx.query_row(
            "SELECT EXISTS (SELECT 1 FROM messages WHERE id = ?1)",
            [row],
            |r| r.get(0),
        )?;
        if !spooled {
            tx.execute("DELETE FROM strikes", [])?;
            return Ok(StrikeOutcome::Gone);
        }
        let strikes: i64 = tx.query_row(
            "INSERT INTO strikes (row_id, count, through) VALUES (?1, 1, ?2)
             ON CONFLICT (row_id) DO UPDATE SET count = count + 1, through = max(through, ?2)
             RETURNING count",
            [row, through],
            |r| r.get(0),
        )?;
        let strikes = strikes.clamp(0, i64::from(u32::MAX)) as u32;
        if limit == 0 || strikes < limit {
            return Ok(StrikeOutcome::Counted { row, strikes });
        }
        tx.execute(
            "INSERT INTO dead_letters
                 (row_id, topic, payload, qos, retain, props, accepted_ms, size, dead_ms, reason, strikes)
             SELECT id, topic, payload, qos, retain, props, accepted_ms, size, ?2, 'poison', ?3
             FROM messages WHERE id = ?1",
            params![row, now_ms, strikes],
        )?;
        let (topic, size): (String, i64) = tx.query_row(
            "DELETE FROM messages WHERE id = ?1 RETURNING topic, size",
            [row],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        let size = size.max(0) as u64;
        self.bytes = self.bytes.saturating_sub(size);
        self.count = self.count.saturating_sub(1);
        tx.execute("DELETE FROM strikes", [])?;
        Ok(StrikeOutcome::DeadLettered {
            row,
            topic,
            size,
            strikes,
        })
    }

    fn after_commit(&mut self, conn: &Connection, group: Group) {
        self.unsettled.clear();
        if !self.undeleted.is_empty() {
            tracing::info!(spool = %self.opts.path.display(), messages = self.undeleted.len(),
                "spool: deleted the acknowledged messages whose delete had failed");
            self.undeleted.clear();
            self.shared_undeleted.lock().clear();
        }
        let stats = &self.stats;
        stats.spool_commits.fetch_add(1, Relaxed);
        stats
            .spooled
            .fetch_add(group.appended.len() as u64, Relaxed);
        if group.dropped_oldest > 0 {
            stats
                .dropped_spool_full
                .fetch_add(group.dropped_oldest, Relaxed);
            tracing::warn!(
                dropped = group.dropped_oldest,
                "spool full: dropped the oldest messages (when_full = drop-oldest)"
            );
        }
        if group.dead_lettered > 0 {
            stats.dropped_poison.fetch_add(group.dead_lettered, Relaxed);
            stats.dead_letters.fetch_add(group.dead_lettered, Relaxed);
        }
        self.publish_totals(conn);
        // Before the replies: whoever sees its append acknowledged also sees it committed.
        if let Some(id) = group.last_id {
            self.committed.send_replace(id);
        }
        for reply in group.appended {
            let _ = reply.send(Ok(()));
        }
        for reply in group.staged {
            let _ = reply.send(Ok(()));
        }
        for (reply, outcome) in group.struck {
            let _ =
                reply.send(outcome.ok_or_else(|| self.sqlite_error(rusqlite::Error::InvalidQuery)));
        }
        self.serve_reads(conn, group.reads);
    }

    fn after_failure(
        &mut self,
        conn: &Connection,
        e: rusqlite::Error,
        group: Group,
        bytes0: u64,
        count0: u64,
    ) {
        // The transaction rolled back: restore the counters it had moved, and spare the
        // rows whose acknowledged deletes were lost with it.
        self.bytes = bytes0;
        self.count = count0;
        if let Some(taken) = group.untaken_from {
            self.fence.lock().respare(taken);
        }
        let text = e.to_string();
        let others =
            !group.appended.is_empty() || !group.staged.is_empty() || !group.struck.is_empty();
        if others && let Some(suppressed) = self.commit_log.ready() {
            tracing::error!(spool = %self.opts.path.display(), error = %text,
                refused = group.appended.len(), similar_suppressed = suppressed,
                "spool commit failed: offered messages refused");
        }
        // Acknowledged rows must not be lost with the transaction: keep them to delete with
        // the next one, and out of the uplink's reads meanwhile.
        let before = self.undeleted.len();
        for mut ids in group.deletes {
            self.undeleted.insert_all(&mut ids);
        }
        if !self.undeleted.is_empty() {
            *self.shared_undeleted.lock() = self.undeleted.clone();
            if let Some(suppressed) = self.delete_log.ready() {
                tracing::warn!(spool = %self.opts.path.display(), error = %text,
                    messages = self.undeleted.len(), new = self.undeleted.len() - before,
                    similar_suppressed = suppressed,
                    "spool: acknowledged messages could not be deleted: kept in memory and retried \
                     every second; they are not sent again unless the gateway stops before the \
                     delete succeeds. Free space on the spool's file system if this goes on");
            }
        }
        if outpost_sqlite::is_corruption(&e) {
            tracing::error!(spool = %self.opts.path.display(),
                "spool is corrupt: it will be set aside at the next start");
        }
        self.stats
            .rejected_storage
            .fetch_add(group.appended.len() as u64, Relaxed);
        for reply in group.appended {
            reject(reply, RejectReason::Storage(text.clone()));
        }
        let failure = || {
            self.sqlite_error(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_IOERR),
                Some(text.clone()),
            ))
        };
        for reply in group.staged {
            let _ = reply.send(Err(failure()));
        }
        for (reply, _) in group.struck {
            let _ = reply.send(Err(failure()));
        }
        self.serve_reads(conn, group.reads);
    }

    fn publish_totals(&self, conn: &Connection) {
        self.stats.spool_messages.store(self.count, Relaxed);
        self.stats.spool_bytes.store(self.bytes, Relaxed);
        match store::oldest_ms(conn) {
            Ok(ms) => self.stats.oldest_accepted_ms.store(ms, Relaxed),
            Err(e) => tracing::warn!(error = %e, "spool: reading oldest age failed"),
        }
    }

    fn serve_reads(&self, conn: &Connection, reads: Vec<Command>) {
        for cmd in reads {
            match cmd {
                Command::Flush(reply) => {
                    let _ = reply.send(Ok(()));
                }
                Command::Checkpoint(reply) => {
                    let done = checkpoint_truncate(conn).map_err(|e| self.sqlite_error(e));
                    let _ = reply.send(done);
                }
                _ => {}
            }
        }
    }
}

/// `PRAGMA wal_checkpoint(TRUNCATE)`: folds the WAL into the file and cuts it to zero
/// bytes. Best effort where it only gives space back (failures are logged at debug).
fn checkpoint_truncate(conn: &Connection) -> rusqlite::Result<()> {
    let r = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()));
    if let Err(e) = &r {
        tracing::debug!(error = %e, "spool checkpoint failed");
    }
    r
}

/// Oldest droppable rows above `floor` whose sizes add up to at least `need` (fewer when
/// the spool runs out of them).
fn choose_victims(
    tx: &Transaction<'_>,
    floor: i64,
    need: u64,
) -> rusqlite::Result<Vec<(i64, u64)>> {
    let mut st = tx.prepare_cached(
        "SELECT id, size FROM messages WHERE stage = 0 AND id > ?1 ORDER BY id LIMIT 256",
    )?;
    let mut victims = Vec::new();
    let mut freed = 0u64;
    let mut after = floor;
    while freed < need {
        let page: Vec<(i64, i64)> = st
            .query_map([after], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?;
        let Some(&(last, _)) = page.last() else {
            break;
        };
        after = last;
        for (id, size) in page {
            if freed >= need {
                break;
            }
            let size = size.max(0) as u64;
            freed += size;
            victims.push((id, size));
        }
    }
    Ok(victims)
}

/// Insert or remove received QoS 2 packet ids.
fn apply_incoming(tx: &Transaction<'_>, bridge: &str, ops: &[IncomingOp]) -> rusqlite::Result<()> {
    let mut add = tx.prepare_cached(
        "INSERT OR IGNORE INTO incoming_qos2 (bridge, packet_id) VALUES (?1, ?2)",
    )?;
    let mut remove =
        tx.prepare_cached("DELETE FROM incoming_qos2 WHERE bridge = ?1 AND packet_id = ?2")?;
    for op in ops {
        match *op {
            IncomingOp::Add(pid) => add.execute(params![bridge, pid])?,
            IncomingOp::Remove(pid) => remove.execute(params![bridge, pid])?,
        };
    }
    Ok(())
}
