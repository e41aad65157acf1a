//! The spool reader thread: its own read-only connection, so fetching the next rows for
//! the uplink never waits behind a commit's fsync (WAL lets readers run beside the writer).

use std::path::Path;
use std::sync::{Arc, mpsc};

use bytes::Bytes;
use outpost_mqtt::QoS;
use rusqlite::{Connection, OpenFlags, params};

use super::acked::{IdRanges, Undeleted};
use super::{DeadLetter, Reply, Stage, StoredMessage, props};
use crate::error::SpoolError;

/// Payload bytes one fetch returns at most (at least one row).
const FETCH_MAX_BYTES: usize = 8 << 20;

pub(crate) enum Read {
    Fetch {
        after: i64,
        limit: usize,
        reply: Reply<Result<Vec<StoredMessage>, SpoolError>>,
    },
    InProgress(Reply<Result<Vec<StoredMessage>, SpoolError>>),
    Incoming {
        bridge: String,
        reply: Reply<Result<Vec<u16>, SpoolError>>,
    },
    DeadLetters(Reply<Result<Vec<DeadLetter>, SpoolError>>),
}

pub(super) fn open(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    conn.pragma_update(None, "query_only", true)?;
    Ok(conn)
}

pub(super) fn run(
    conn: Connection,
    path: std::path::PathBuf,
    undeleted: Arc<Undeleted>,
    rx: mpsc::Receiver<Read>,
) {
    let err = |source| SpoolError::Sqlite {
        path: path.clone(),
        source,
    };
    while let Ok(cmd) = rx.recv() {
        match cmd {
            Read::Fetch {
                after,
                limit,
                reply,
            } => {
                let skip = undeleted.snapshot();
                let _ = reply.send(fetch(&conn, after, limit, skip.as_ref()).map_err(err));
            }
            Read::InProgress(reply) => {
                let skip = undeleted.snapshot();
                let _ = reply.send(in_progress(&conn, skip.as_ref()).map_err(err));
            }
            Read::Incoming { bridge, reply } => {
                let _ = reply.send(incoming(&conn, &bridge).map_err(err));
            }
            Read::DeadLetters(reply) => {
                let _ = reply.send(dead_letters(&conn).map_err(err));
            }
        }
    }
}

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<StoredMessage> {
    let props: Option<Vec<u8>> = r.get(5)?;
    let properties = match props {
        Some(raw) => props::decode(&raw).unwrap_or_else(|| {
            tracing::warn!("spool row with unreadable properties: sending without them");
            Default::default()
        }),
        None => Default::default(),
    };
    let qos: i64 = r.get(3)?;
    let packet_id: Option<i64> = r.get(7)?;
    Ok(StoredMessage {
        id: r.get(0)?,
        topic: r.get(1)?,
        payload: Bytes::from(r.get::<_, Vec<u8>>(2)?),
        qos: stored_qos(qos),
        retain: r.get(4)?,
        properties,
        accepted_ms: r.get(6)?,
        packet_id: packet_id
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p != 0),
        stage: Stage::from_i64(r.get(8)?),
    })
}

/// Rows after `after`, leaving out `skip` (acknowledged rows whose delete is pending): a
/// page short of `limit` still means the end of the spool, as the uplink takes it.
fn fetch(
    conn: &Connection,
    after: i64,
    limit: usize,
    skip: Option<&IdRanges>,
) -> rusqlite::Result<Vec<StoredMessage>> {
    let mut st = conn.prepare_cached(
        "SELECT id, topic, payload, qos, retain, props, accepted_ms, packet_id, stage
         FROM messages WHERE id > ?1 ORDER BY id LIMIT ?2",
    )?;
    let mut out = Vec::with_capacity(limit.min(4096));
    let mut bytes = 0usize;
    let mut after = after;
    loop {
        let want = limit - out.len();
        let mut rows = st.query(params![after, want as i64])?;
        let mut seen = 0usize;
        while let Some(r) = rows.next()? {
            seen += 1;
            let id: i64 = r.get(0)?;
            after = id;
            if skip.is_some_and(|s| s.contains(id)) {
                continue;
            }
            let m = row(r)?;
            bytes += m.payload.len() + m.topic.len();
            out.push(m);
            if bytes >= FETCH_MAX_BYTES {
                return Ok(out);
            }
        }
        // Only skipped rows can leave a full page short; read on past them.
        if seen < want || out.len() >= limit || skip.is_none() {
            return Ok(out);
        }
    }
}

fn in_progress(conn: &Connection, skip: Option<&IdRanges>) -> rusqlite::Result<Vec<StoredMessage>> {
    let mut st = conn.prepare_cached(
        "SELECT id, topic, payload, qos, retain, props, accepted_ms, packet_id, stage
         FROM messages WHERE stage > 0 ORDER BY id",
    )?;
    let rows: Vec<StoredMessage> = st.query_map([], row)?.collect::<rusqlite::Result<_>>()?;
    Ok(match skip {
        Some(s) => rows.into_iter().filter(|m| !s.contains(m.id)).collect(),
        None => rows,
    })
}

fn incoming(conn: &Connection, bridge: &str) -> rusqlite::Result<Vec<u16>> {
    let mut st = conn.prepare_cached(
        "SELECT packet_id FROM incoming_qos2 WHERE bridge = ?1 ORDER BY packet_id",
    )?;
    let ids = st
        .query_map([bridge], |r| r.get::<_, i64>(0))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    // Only ids the bridge itself wrote are in there; anything else is skipped, not trusted.
    Ok(ids
        .into_iter()
        .filter_map(|p| u16::try_from(p).ok().filter(|p| *p != 0))
        .collect())
}

fn dead_letters(conn: &Connection) -> rusqlite::Result<Vec<DeadLetter>> {
    let mut st = conn.prepare_cached(
        "SELECT row_id, topic, payload, qos, accepted_ms, dead_ms, reason, strikes
         FROM dead_letters ORDER BY id",
    )?;
    st.query_map([], |r| {
        Ok(DeadLetter {
            row_id: r.get(0)?,
            topic: r.get(1)?,
            payload: Bytes::from(r.get::<_, Vec<u8>>(2)?),
            qos: stored_qos(r.get(3)?),
            accepted_ms: r.get(4)?,
            dead_ms: r.get(5)?,
            reason: r.get(6)?,
            strikes: r.get::<_, i64>(7)?.clamp(0, i64::from(u32::MAX)) as u32,
        })
    })?
    .collect()
}

/// The QoS of a row as the writer stored it (0, 1 or 2); a number out of that range, in a
/// file damaged some other way, is taken as the nearest QoS.
fn stored_qos(v: i64) -> QoS {
    match v {
        ..=0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}
