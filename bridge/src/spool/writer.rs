//! The spool writer thread: drains every queued command into one transaction (group
//! commit), then answers the callers.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc;

use rusqlite::{Connection, OptionalExtension, Transaction, params};
use tokio::sync::{oneshot, watch};

use super::{Command, Fence, IncomingOp, SpoolOptions, StrikeOutcome, store};
use crate::config::WhenFull;
use crate::error::{RejectReason, Rejected, SpoolError};
use crate::stats::BridgeStats;

/// Most commands folded into one transaction; bounds commit latency under a flood.
const MAX_GROUP: usize = 16_384;

pub(super) struct Writer {
    conn: Connection,
    st: State,
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
        fence: Arc<Fence>,
        committed: watch::Sender<i64>,
    ) -> Self {
        Writer {
            conn,
            st: State {
                opts,
                stats,
                bytes: totals.bytes,
                count: totals.count,
                next_id: totals.next_id.max(1),
                fence,
                unsettled: Vec::new(),
                committed,
            },
        }
    }

    pub(super) fn run(mut self, rx: mpsc::Receiver<Command>) {
        let mut batch = Vec::with_capacity(1024);
        while let Ok(first) = rx.recv() {
            batch.push(first);
            while batch.len() < MAX_GROUP {
                match rx.try_recv() {
                    Ok(c) => batch.push(c),
                    Err(_) => break,
                }
            }
            self.process(&mut batch);
        }
        // Fold the WAL back so the file on disk is self-contained after a clean stop.
        if let Err(e) = self.conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)") {
            tracing::warn!(error = %e, "spool checkpoint at close failed");
        }
    }

    fn process(&mut self, batch: &mut Vec<Command>) {
        let st = &mut self.st;
        let (bytes0, count0) = (st.bytes, st.count);
        let mut group = Group::default();
        let outcome = match self.conn.unchecked_transaction() {
            Ok(tx) => {
                let mut failed = st.settle_claims(&tx, &mut group).err();
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
            Ok(()) => self.st.after_commit(&self.conn, group),
            Err(e) => self.st.after_failure(e, group, bytes0, count0),
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
        // Deletes of a failed group are lost with it: the rows are sent again later, as
        // after a crash. Rows already claimed for dropping stay in `unsettled`.
        Command::Delete(_) => {}
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
                            msg.qos,
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
            Command::Delete(ids) => self.delete_all(tx, ids),
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
    fn delete_all(&mut self, tx: &Transaction<'_>, mut ids: Vec<i64>) -> rusqlite::Result<()> {
        ids.sort_unstable();
        ids.dedup();
        let mut totals = tx.prepare_cached(
            "SELECT count(*), coalesce(sum(size), 0) FROM messages WHERE id BETWEEN ?1 AND ?2",
        )?;
        let mut delete = tx.prepare_cached("DELETE FROM messages WHERE id BETWEEN ?1 AND ?2")?;
        let mut i = 0;
        while i < ids.len() {
            let mut j = i;
            while j + 1 < ids.len() && ids[j + 1] == ids[j] + 1 {
                j += 1;
            }
            let (count, size): (i64, i64) =
                totals.query_row(params![ids[i], ids[j]], |r| Ok((r.get(0)?, r.get(1)?)))?;
            if count > 0 {
                delete.execute(params![ids[i], ids[j]])?;
                self.bytes = self.bytes.saturating_sub(size.max(0) as u64);
                self.count = self.count.saturating_sub(count as u64);
            }
            i = j + 1;
        }
        Ok(())
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
        let stats = &self.stats;
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
        self.serve_reads(group.reads);
    }

    fn after_failure(&mut self, e: rusqlite::Error, group: Group, bytes0: u64, count0: u64) {
        // The transaction rolled back: restore the counters it had moved, and spare the
        // rows whose acknowledged deletes were lost with it.
        self.bytes = bytes0;
        self.count = count0;
        if let Some(taken) = group.untaken_from {
            self.fence.lock().respare(taken);
        }
        let text = e.to_string();
        tracing::error!(spool = %self.opts.path.display(), error = %text,
            refused = group.appended.len(), "spool commit failed: offered messages refused");
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
        self.serve_reads(group.reads);
    }

    fn publish_totals(&self, conn: &Connection) {
        self.stats.spool_messages.store(self.count, Relaxed);
        self.stats.spool_bytes.store(self.bytes, Relaxed);
        match store::oldest_ms(conn) {
            Ok(ms) => self.stats.oldest_accepted_ms.store(ms, Relaxed),
            Err(e) => tracing::warn!(error = %e, "spool: reading oldest age failed"),
        }
    }

    fn serve_reads(&self, reads: Vec<Command>) {
        for cmd in reads {
            if let Command::Flush(reply) = cmd {
                let _ = reply.send(Ok(()));
            }
        }
    }
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
