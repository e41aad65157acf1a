//! The spool writer thread: drains every queued command into one transaction (group
//! commit), then answers the callers.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc;

use rusqlite::{Connection, OptionalExtension, Transaction, params};
use tokio::sync::{oneshot, watch};

use super::{Command, SpoolOptions, store};
use crate::config::WhenFull;
use crate::error::{RejectReason, Rejected, SpoolError};
use crate::stats::BridgeStats;

/// Most commands folded into one transaction; bounds commit latency under a flood.
const MAX_GROUP: usize = 16_384;

pub(super) struct Writer {
    conn: Connection,
    st: State,
}

/// Everything but the connection, so a transaction can borrow the connection while the
/// accounting is updated.
struct State {
    opts: SpoolOptions,
    stats: Arc<BridgeStats>,
    bytes: u64,
    count: u64,
    committed: watch::Sender<i64>,
}

/// What one group produced, answered after the commit.
#[derive(Default)]
struct Group {
    appended: Vec<oneshot::Sender<Result<(), Rejected>>>,
    staged: Vec<oneshot::Sender<Result<(), SpoolError>>>,
    reads: Vec<Command>,
    dropped_oldest: u64,
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
        bytes: u64,
        count: u64,
        committed: watch::Sender<i64>,
    ) -> Self {
        Writer {
            conn,
            st: State {
                opts,
                stats,
                bytes,
                count,
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
                let mut failed = None;
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
        Command::SetStages(_, reply) => group.staged.push(reply),
        Command::Delete(_) => {}
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
                let r = tx
                    .prepare_cached(
                        "INSERT INTO messages (topic, payload, qos, retain, props, accepted_ms, size)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                    )
                    .and_then(|mut st| {
                        st.execute(params![
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
                    group.last_id = Some(tx.last_insert_rowid());
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
    /// go in one range statement.
    fn delete_all(&mut self, tx: &Transaction<'_>, mut ids: Vec<i64>) -> rusqlite::Result<()> {
        ids.sort_unstable();
        ids.dedup();
        let mut st =
            tx.prepare_cached("DELETE FROM messages WHERE id BETWEEN ?1 AND ?2 RETURNING size")?;
        let mut i = 0;
        while i < ids.len() {
            let mut j = i;
            while j + 1 < ids.len() && ids[j + 1] == ids[j] + 1 {
                j += 1;
            }
            let mut rows = st.query(params![ids[i], ids[j]])?;
            while let Some(row) = rows.next()? {
                let size: i64 = row.get(0)?;
                self.bytes = self.bytes.saturating_sub(size as u64);
                self.count = self.count.saturating_sub(1);
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

    /// Ensure `size` more bytes fit: under drop-oldest, delete the oldest rows that have no
    /// QoS 2 exchange in progress (dropping those would break exactly-once). False when the
    /// message cannot fit.
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
        let mut after = 0i64;
        while self.bytes + size > max {
            let victims: Vec<i64> = {
                let mut st = tx.prepare_cached(
                    "SELECT id FROM messages WHERE stage = 0 AND id > ?1 ORDER BY id LIMIT 256",
                )?;
                st.query_map([after], |r| r.get(0))?
                    .collect::<rusqlite::Result<_>>()?
            };
            let Some(&last) = victims.last() else {
                return Ok(false);
            };
            after = last;
            for id in victims {
                if self.bytes + size <= max {
                    break;
                }
                if self.delete(tx, id)? {
                    group.dropped_oldest += 1;
                }
            }
        }
        Ok(true)
    }

    fn after_commit(&mut self, conn: &Connection, group: Group) {
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
        self.publish_totals(conn);
        for reply in group.appended {
            let _ = reply.send(Ok(()));
        }
        for reply in group.staged {
            let _ = reply.send(Ok(()));
        }
        if let Some(id) = group.last_id {
            self.committed.send_replace(id);
        }
        self.serve_reads(group.reads);
    }

    fn after_failure(&mut self, e: rusqlite::Error, group: Group, bytes0: u64, count0: u64) {
        // The transaction rolled back: restore the counters it had moved.
        self.bytes = bytes0;
        self.count = count0;
        let text = e.to_string();
        tracing::error!(spool = %self.opts.path.display(), error = %text,
            refused = group.appended.len(), "spool commit failed: offered messages refused");
        if store::is_corruption(&e) {
            tracing::error!(spool = %self.opts.path.display(),
                "spool is corrupt: it will be set aside at the next start");
        }
        self.stats
            .rejected_storage
            .fetch_add(group.appended.len() as u64, Relaxed);
        for reply in group.appended {
            reject(reply, RejectReason::Storage(text.clone()));
        }
        for reply in group.staged {
            let _ = reply.send(Err(self.sqlite_error(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_IOERR),
                Some(text.clone()),
            ))));
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
