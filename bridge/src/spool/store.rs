//! The SQLite file: its schema, opening it (durable settings and setting aside a corrupt
//! file are `outpost_sqlite`'s), and the queries that read its totals.

use std::path::{Path, PathBuf};

use rusqlite::Connection;

use crate::error::SpoolError;

/// Fixed per-row overhead added to topic, payload and property bytes in the byte bound,
/// so millions of empty messages still count for something.
pub const ROW_OVERHEAD: u64 = 32;

/// Size the WAL is cut back to after it restarts (`PRAGMA journal_size_limit`): about what
/// it holds at SQLite's automatic checkpoint (1000 pages: 1 MiB in a file made with today's
/// 1 KiB pages, 4 MiB in one an earlier release made with 4 KiB pages), so a burst that grew
/// it further gives the space back, while the steady state is not truncated and regrown.
const WAL_SIZE_LIMIT: i64 = 4 << 20;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS messages (
    id          INTEGER PRIMARY KEY,   -- accept order
    topic       TEXT    NOT NULL,      -- remote topic, mapped when accepted
    payload     BLOB    NOT NULL,
    qos         INTEGER NOT NULL,
    retain      INTEGER NOT NULL,
    props       BLOB,
    accepted_ms INTEGER NOT NULL,
    size        INTEGER NOT NULL,      -- accounted bytes
    packet_id   INTEGER,               -- QoS 2: identifier used on the cloud session
    stage       INTEGER NOT NULL DEFAULT 0  -- 0 new, 1 PUBLISH sent, 2 PUBREL sent
);
CREATE INDEX IF NOT EXISTS messages_in_progress ON messages(stage) WHERE stage > 0;
-- Link losses blamed on a row (at most one row: only consecutive losses count).
CREATE TABLE IF NOT EXISTS strikes (
    row_id  INTEGER PRIMARY KEY,       -- messages.id oldest in flight when the cloud dropped us
    count   INTEGER NOT NULL,
    through INTEGER NOT NULL           -- newest row id that was out at those losses
);
-- Poison messages moved out of the send path; kept until an operator deletes them.
CREATE TABLE IF NOT EXISTS dead_letters (
    id          INTEGER PRIMARY KEY,
    row_id      INTEGER NOT NULL,      -- messages.id it had
    topic       TEXT    NOT NULL,
    payload     BLOB    NOT NULL,
    qos         INTEGER NOT NULL,
    retain      INTEGER NOT NULL,
    props       BLOB,
    accepted_ms INTEGER NOT NULL,
    size        INTEGER NOT NULL,
    dead_ms     INTEGER NOT NULL,      -- when it was set aside
    reason      TEXT    NOT NULL,
    strikes     INTEGER NOT NULL
);
-- QoS 2 PUBLISH packet ids received from the cloud whose PUBREL has not arrived yet.
CREATE TABLE IF NOT EXISTS incoming_qos2 (
    bridge    TEXT    NOT NULL,
    packet_id INTEGER NOT NULL,
    PRIMARY KEY (bridge, packet_id)
) WITHOUT ROWID;
";

/// Open (creating if needed) the spool at `path`. A corrupt file is renamed to
/// `*.corrupt-<ts>` and a fresh spool is created; the returned path says where it went.
pub fn open(path: &Path) -> Result<(Connection, Option<PathBuf>), SpoolError> {
    let opened = outpost_sqlite::open(path, SCHEMA, None)?;
    opened
        .conn
        .query_row(
            &format!("PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}"),
            [],
            |_| Ok(()),
        )
        .map_err(|source| SpoolError::Sqlite {
            path: path.to_path_buf(),
            source,
        })?;
    match &opened.page_size_change {
        Some(change) if change.is_failure() => {
            tracing::warn!(spool = %path.display(), "spool file {change}")
        }
        Some(change) => tracing::info!(spool = %path.display(), "spool file {change}"),
        None => {}
    }
    let aside = opened.set_aside.map(|aside| {
        tracing::error!(
            spool = %path.display(),
            kept_as = %aside.path.display(),
            error = %aside.cause,
            "spool file is corrupt: set aside (not deleted) and starting a new one"
        );
        aside.path
    });
    Ok((opened.conn, aside))
}

/// Count and accounted bytes of the rows present.
pub fn totals(conn: &Connection) -> rusqlite::Result<(u64, u64)> {
    conn.query_row(
        "SELECT count(*), coalesce(sum(size), 0) FROM messages",
        [],
        |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
    )
}

/// Accept time of the oldest row, 0 when empty.
pub fn oldest_ms(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row(
        "SELECT coalesce((SELECT accepted_ms FROM messages ORDER BY id LIMIT 1), 0)",
        [],
        |r| r.get(0),
    )
}

/// Highest row id, 0 when empty.
pub fn max_id(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row("SELECT coalesce(max(id), 0) FROM messages", [], |r| {
        r.get(0)
    })
}

/// Highest row id ever seen in any table that refers to message rows, so new ids never
/// collide with a strike or dead letter of an earlier row.
pub fn max_id_anywhere(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row(
        "SELECT max(
            (SELECT coalesce(max(id), 0) FROM messages),
            (SELECT coalesce(max(row_id), 0) FROM dead_letters),
            (SELECT coalesce(max(row_id), 0) FROM strikes))",
        [],
        |r| r.get(0),
    )
}

/// Forget strikes whose row is gone (acknowledged or dropped before a crash); true when a
/// strike remains.
pub fn prune_strikes(conn: &Connection) -> rusqlite::Result<bool> {
    conn.execute(
        "DELETE FROM strikes WHERE row_id NOT IN (SELECT id FROM messages)",
        [],
    )?;
    conn.query_row("SELECT count(*) > 0 FROM strikes", [], |r| r.get(0))
}

/// Newest row id that was out when the cloud dropped the link with a row to blame, 0 when
/// no strike is pending: the uplink resends up to there one message at a time.
pub fn careful_through(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row("SELECT coalesce(max(through), 0) FROM strikes", [], |r| {
        r.get(0)
    })
}

/// Rows in the dead-letter table.
pub fn dead_letter_count(conn: &Connection) -> rusqlite::Result<u64> {
    conn.query_row("SELECT count(*) FROM dead_letters", [], |r| {
        r.get::<_, i64>(0).map(|n| n as u64)
    })
}
