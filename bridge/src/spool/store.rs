//! The SQLite file: opening with durable settings, the schema, and setting aside a corrupt
//! file instead of deleting it.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, ErrorCode, OpenFlags};

use crate::error::SpoolError;

/// Fixed per-row overhead added to topic, payload and property bytes in the byte bound,
/// so millions of empty messages still count for something.
pub const ROW_OVERHEAD: u64 = 32;

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

fn sqlite_err(path: &Path) -> impl Fn(rusqlite::Error) -> SpoolError + '_ {
    move |source| SpoolError::Sqlite {
        path: path.to_path_buf(),
        source,
    }
}

/// True for SQLite errors that mean the file itself is damaged.
pub fn is_corruption(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase)
    )
}

fn try_open(path: &Path) -> Result<Connection, rusqlite::Error> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    // WAL + FULL: NORMAL may lose the last commits on power loss, and "acked" must mean durable.
    let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(rusqlite::Error::InvalidQuery);
    }
    conn.pragma_update(None, "synchronous", "FULL")?;
    let check: String = conn.query_row("PRAGMA quick_check", [], |r| r.get(0))?;
    if check != "ok" {
        return Err(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CORRUPT),
            Some(format!("quick_check: {check}")),
        ));
    }
    conn.execute_batch(SCHEMA)?;
    Ok(conn)
}

/// Where a corrupt file goes: `{path}.corrupt-{unix seconds}`.
fn quarantine_name(path: &Path) -> PathBuf {
    let ts = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".corrupt-{ts}"));
    PathBuf::from(name)
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// Rename a corrupt spool (and its WAL/SHM companions) aside; returns the new name.
fn quarantine(path: &Path) -> Result<PathBuf, SpoolError> {
    let target = quarantine_name(path);
    let io_err = |p: &Path| {
        let p = p.to_path_buf();
        move |source| SpoolError::Io { path: p, source }
    };
    std::fs::rename(path, &target).map_err(io_err(path))?;
    for suffix in ["-wal", "-shm"] {
        let side = with_suffix(path, suffix);
        if side.exists() {
            std::fs::rename(&side, with_suffix(&target, suffix)).map_err(io_err(&side))?;
        }
    }
    Ok(target)
}

/// Open (creating if needed) the spool at `path`. A corrupt file is renamed to
/// `*.corrupt-<ts>` and a fresh spool is created; the returned flag says so.
pub fn open(path: &Path) -> Result<(Connection, Option<PathBuf>), SpoolError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| SpoolError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    match try_open(path) {
        Ok(conn) => Ok((conn, None)),
        Err(e) if is_corruption(&e) => {
            let aside = quarantine(path)?;
            tracing::error!(
                spool = %path.display(),
                kept_as = %aside.display(),
                error = %e,
                "spool file is corrupt: set aside (not deleted) and starting a new one"
            );
            let conn = try_open(path).map_err(sqlite_err(path))?;
            Ok((conn, Some(aside)))
        }
        Err(e) => Err(sqlite_err(path)(e)),
    }
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
