//! The store's writer thread: applies the core's changes in order, many per transaction.
//!
//! Whatever queued up while the last transaction was being made durable goes into the
//! next one, so under load one fsync covers thousands of changes, and at a trickle a
//! change waits for one fsync only. A message acknowledged by its subscriber before its
//! row was ever written costs no disk write at all: both changes meet in one batch and
//! cancel out.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use outpost_mqtt::QoS;
use rusqlite::{Connection, params};
use tokio::sync::oneshot;
use tracing::error;

use super::db::{self, encode_publish, expires_ms};
use super::{Counters, Op};

/// Changes in one transaction at most, so a huge backlog still commits in steps.
const MAX_BATCH: usize = 8192;

/// Starts the writer on its own thread (SQLite calls block). Without `conn` (no file
/// yet) the file is made when the first change comes, so a broker that keeps nothing
/// never loads SQLite's code or page cache.
pub(super) fn spawn(
    conn: Option<Connection>,
    rx: Receiver<Op>,
    path: PathBuf,
    counters: Arc<Counters>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("broker-store".into())
        .spawn(move || run(conn, rx, path, counters))
}

fn run(mut conn: Option<Connection>, rx: Receiver<Op>, path: PathBuf, counters: Arc<Counters>) {
    let mut batch = Vec::new();
    let mut syncs: Vec<oneshot::Sender<()>> = Vec::new();
    let mut last_report: Option<Instant> = None;
    while let Ok(first) = rx.recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        let only_syncs = batch.iter().all(|op| matches!(op, Op::Sync(_)));
        let result = match conn.as_mut() {
            Some(c) => apply(c, &mut batch, &mut syncs).map_err(|e| e.to_string()),
            // Nothing to write: nothing to open the file for.
            None if only_syncs => {
                take_syncs(&mut batch, &mut syncs);
                Ok(0)
            }
            None => match db::open(&path) {
                Ok(mut c) => {
                    let r = apply(&mut c, &mut batch, &mut syncs).map_err(|e| e.to_string());
                    conn = Some(c);
                    r
                }
                Err(e) => {
                    // Answer the batch's syncs all the same: the broker goes on from memory.
                    take_syncs(&mut batch, &mut syncs);
                    Err(e.to_string())
                }
            },
        };
        match result {
            Ok(written) => {
                counters
                    .deliveries_written
                    .fetch_add(written, Ordering::Relaxed);
            }
            Err(e) => {
                let n = counters.failed_batches.fetch_add(1, Ordering::Relaxed) + 1;
                // Once a minute at most: a full disk fails every batch.
                if last_report.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
                    last_report = Some(Instant::now());
                    error!(
                        store = %path.display(),
                        error = %e,
                        failed_batches = n,
                        "broker store: cannot write; retained messages and persistent sessions \
                         are kept in memory only until it can (is the disk full?)"
                    );
                }
            }
        }
        batch.clear();
        for s in syncs.drain(..) {
            let _ = s.send(());
        }
    }
}

/// Empties a batch that will not be written, keeping its syncs to be answered.
fn take_syncs(batch: &mut Vec<Op>, syncs: &mut Vec<oneshot::Sender<()>>) {
    syncs.extend(batch.drain(..).filter_map(|op| match op {
        Op::Sync(s) => Some(s),
        _ => None,
    }));
}

/// Applies one batch in one transaction, returning how many delivery rows it wrote; the
/// syncs in it are handed back to be answered after the commit, whatever its outcome.
fn apply(
    conn: &mut Connection,
    batch: &mut Vec<Op>,
    syncs: &mut Vec<oneshot::Sender<()>>,
) -> rusqlite::Result<u64> {
    // Deliveries both written and dropped in this batch never reach the file.
    let put: HashSet<u64> = batch
        .iter()
        .filter_map(|op| match op {
            Op::PutDelivery { id, .. } => Some(*id),
            _ => None,
        })
        .collect();
    let cancelled: HashSet<u64> = batch
        .iter()
        .filter_map(|op| match op {
            Op::DropDelivery(id) if put.contains(id) => Some(*id),
            _ => None,
        })
        .collect();

    let tx = conn.transaction()?;
    let mut result = Ok(());
    let mut written = 0;
    for op in batch.drain(..) {
        match op {
            Op::Sync(s) => {
                syncs.push(s);
                continue;
            }
            Op::PutDelivery { id, .. } if !cancelled.contains(&id) => written += 1,
            _ => {}
        }
        if result.is_ok() {
            result = apply_one(&tx, op, &cancelled);
        }
    }
    result?;
    tx.commit()?;
    Ok(written)
}

fn apply_one(
    tx: &rusqlite::Transaction<'_>,
    op: Op,
    cancelled: &HashSet<u64>,
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
                .query_row(params![&*client_id, id], |r| r.get(0))
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
            .execute(params![id, &*client_id, protocol as u8, expiry])?;
        }
        Op::DropSession(id) => drop_session(tx, i64::from(id))?,
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
            if cancelled.contains(&id) {
                return Ok(());
            }
            let blob = encode_publish(&msg, qos, retain);
            let ids: Option<Vec<u8>> = (!sub_ids.is_empty())
                .then(|| sub_ids.iter().flat_map(|i| i.to_be_bytes()).collect());
            tx.prepare_cached(
                "INSERT OR REPLACE INTO deliveries (id, session, publish, expires_ms, sub_ids, packet_id)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?
            .execute(params![
                i64::try_from(id).unwrap_or(i64::MAX),
                session,
                blob,
                expires_ms(&msg),
                ids,
                packet_id.filter(|_| qos != QoS::AtMostOnce)
            ])?;
        }
        Op::SetPacketId { id, packet_id } => {
            if !cancelled.contains(&id) {
                tx.prepare_cached("UPDATE deliveries SET packet_id = ?2 WHERE id = ?1")?
                    .execute(params![i64::try_from(id).unwrap_or(i64::MAX), packet_id])?;
            }
        }
        Op::Released(id) => {
            if !cancelled.contains(&id) {
                tx.prepare_cached("UPDATE deliveries SET released = 1 WHERE id = ?1")?
                    .execute(params![i64::try_from(id).unwrap_or(i64::MAX)])?;
            }
        }
        Op::DropDelivery(id) => {
            if !cancelled.contains(&id) {
                tx.prepare_cached("DELETE FROM deliveries WHERE id = ?1")?
                    .execute(params![i64::try_from(id).unwrap_or(i64::MAX)])?;
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
            let blob = encode_publish(&msg, msg.qos, true);
            tx.prepare_cached(
                "INSERT OR REPLACE INTO retained (topic, publish, expires_ms) VALUES (?1, ?2, ?3)",
            )?
            .execute(params![&*msg.topic, blob, expires_ms(&msg)])?;
        }
        Op::DropRetained(topic) => {
            tx.prepare_cached("DELETE FROM retained WHERE topic = ?1")?
                .execute(params![&*topic])?;
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
    Ok(())
}
