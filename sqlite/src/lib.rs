//! Opening an SQLite file that holds what a client was told is safe, and setting a damaged
//! one aside instead of deleting it.
//!
//! The broker store (retained messages, persistent sessions) and the bridge spool (messages
//! on their way to the cloud) each had their own copy of this code: the same open flags,
//! the same WAL and `synchronous=FULL` settings, the same integrity check and the same
//! renaming of a damaged file. Two copies of the code behind "acknowledged means durable"
//! can drift apart unnoticed, so this crate is the one both use. What a set-aside file
//! held differs between them, so saying so in the log is left to the caller.

#![forbid(unsafe_code)]
pub mod commit_window;
pub mod reserve;

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, ErrorCode, OpenFlags};

/// Page size of a new file, in bytes.
///
/// Flash wears by the bytes written, and with `synchronous=FULL` every commit appends each
/// page it changed to the WAL (plus a 24-byte frame header) and syncs it. A trickle of small
/// messages changes one or two pages a commit, so the page size, not the message, sets what
/// a commit writes: a 4 KiB page makes a 4,120-byte frame that always spans two 4 KiB blocks
/// of the page cache, a 1 KiB page a 1,048-byte frame that mostly stays inside one. Rows here
/// are small (a spooled 64-byte message is about 130 bytes), so 1 KiB pages still hold
/// several; a large message goes to overflow pages at about 2 % more bytes than with 4 KiB.
pub const PAGE_SIZE: u32 = 1024;

/// Why a file could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// SQLite refused the file.
    #[error("sqlite file {path}: {source}")]
    Sqlite {
        /// The file.
        path: PathBuf,
        /// What SQLite said.
        #[source]
        source: rusqlite::Error,
    },
    /// Creating the directory or setting a damaged file aside failed.
    #[error("sqlite file {path}: {source}")]
    Io {
        /// The directory or file involved.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// A damaged file that was renamed out of the way.
#[derive(Debug)]
pub struct SetAside {
    /// Where it is now: `{path}.corrupt-{unix seconds}`.
    pub path: PathBuf,
    /// What showed it was damaged.
    pub cause: rusqlite::Error,
}

/// An open connection, and the damaged file it replaced if there was one.
#[derive(Debug)]
pub struct Opened {
    /// The connection, in WAL mode with `synchronous=FULL` and the schema applied.
    pub conn: Connection,
    /// Set when the file at the path was damaged and a new one was started.
    pub set_aside: Option<SetAside>,
    /// Set when the file had pages of another size than [`PAGE_SIZE`] (an earlier release
    /// made it): what was done about it, for the caller to log.
    pub page_size_change: Option<PageSizeChange>,
}

/// Most live data a file made with other pages is rewritten with [`PAGE_SIZE`]-byte pages
/// at open: `VACUUM` copies it (twice the space for a moment, about a second per 16 MiB on
/// an SD card), which a drained spool or a store of retained messages pays once, and a
/// spool holding a long outage's backlog should not pay before it sends.
pub const REWRITE_LIMIT: u64 = 16 << 20;

/// What became of a file whose pages were not [`PAGE_SIZE`] bytes.
#[derive(Debug)]
pub enum PageSizeChange {
    /// Rewritten with [`PAGE_SIZE`]-byte pages.
    Rewritten {
        /// Its page size before.
        from: u32,
    },
    /// Kept as it is: more live data than [`REWRITE_LIMIT`].
    TooBig {
        /// Its page size.
        page_size: u32,
        /// Its live data, in bytes.
        bytes: u64,
    },
    /// Kept as it is: the rewrite failed (most likely no room for the copy).
    Failed {
        /// Its page size.
        page_size: u32,
        /// What SQLite said.
        error: rusqlite::Error,
    },
}

impl PageSizeChange {
    /// True when the rewrite was tried and failed.
    pub fn is_failure(&self) -> bool {
        matches!(self, PageSizeChange::Failed { .. })
    }
}

impl std::fmt::Display for PageSizeChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PageSizeChange::Rewritten { from } => write!(
                f,
                "rewritten with {PAGE_SIZE}-byte pages (it had {from}-byte pages), \
                 so each commit writes fewer bytes to flash"
            ),
            PageSizeChange::TooBig { page_size, bytes } => write!(
                f,
                "keeps its {page_size}-byte pages: {bytes} bytes of data is more than is \
                 rewritten at start ({REWRITE_LIMIT}); it is rewritten at a start when it holds less"
            ),
            PageSizeChange::Failed { page_size, error } => write!(
                f,
                "keeps its {page_size}-byte pages: rewriting it with {PAGE_SIZE}-byte pages \
                 failed ({error}); check the free space beside it, it is tried again at the next start"
            ),
        }
    }
}

/// True for SQLite errors that mean the file itself is damaged.
pub fn is_corruption(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase)
    )
}

/// Opens (creating it and its directory if needed) the file at `path` with durable
/// settings and runs `schema`, which must be idempotent (`CREATE ... IF NOT EXISTS`).
/// `cache_kib` caps SQLite's page cache. A damaged file is renamed to
/// `{path}.corrupt-{unix seconds}` with its `-wal` and `-shm` files, and a new one started:
/// what runs on an appliance nobody watches must come up, and the old file stays for
/// whoever wants to look.
pub fn open(path: &Path, schema: &str, cache_kib: Option<u32>) -> Result<Opened, OpenError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| OpenError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    let sqlite = |source| OpenError::Sqlite {
        path: path.to_path_buf(),
        source,
    };
    match try_open(path, schema, cache_kib) {
        Ok((conn, page_size_change)) => Ok(Opened {
            conn,
            set_aside: None,
            page_size_change,
        }),
        Err(cause) if is_corruption(&cause) => {
            let aside = set_aside(path)?;
            let (conn, page_size_change) = try_open(path, schema, cache_kib).map_err(sqlite)?;
            Ok(Opened {
                conn,
                set_aside: Some(SetAside { path: aside, cause }),
                page_size_change,
            })
        }
        Err(e) => Err(sqlite(e)),
    }
}

fn try_open(
    path: &Path,
    schema: &str,
    cache_kib: Option<u32>,
) -> rusqlite::Result<(Connection, Option<PageSizeChange>)> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(Duration::from_secs(5))?;
    // Only a new file takes it (an existing one keeps the page size it was made with).
    conn.pragma_update(None, "page_size", PAGE_SIZE)?;
    // WAL + FULL: callers acknowledge a client only after a commit here, and in WAL mode
    // NORMAL may lose the last commits on power loss.
    set_wal(&conn)?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    if let Some(kib) = cache_kib {
        // A negative cache_size is in KiB rather than pages, so it means the same whatever
        // the page size of the file.
        conn.pragma_update(None, "cache_size", -i64::from(kib))?;
    }
    // Damage found now costs a set-aside file; found later it would fail every commit.
    let check: String = conn.query_row("PRAGMA quick_check", [], |r| r.get(0))?;
    if check != "ok" {
        return Err(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CORRUPT),
            Some(format!("quick_check: {check}")),
        ));
    }
    let page_size_change = adopt_page_size(&conn)?;
    conn.execute_batch(schema)?;
    Ok((conn, page_size_change))
}

fn set_wal(conn: &Connection) -> rusqlite::Result<()> {
    let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(rusqlite::Error::InvalidQuery);
    }
    Ok(())
}

/// Rewrites a small file made with other pages with [`PAGE_SIZE`]-byte ones. `VACUUM`
/// cannot change the page size in WAL mode, so the file leaves it for the rewrite (a
/// rollback journal keeps the rewrite atomic: a crash during it leaves the old file) and
/// returns to it after. Only an error returning to WAL mode is the caller's.
fn adopt_page_size(conn: &Connection) -> rusqlite::Result<Option<PageSizeChange>> {
    let (page_size, live_pages): (i64, i64) = conn.query_row(
        "SELECT page_size, page_count - freelist_count \
         FROM pragma_page_size, pragma_page_count, pragma_freelist_count",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    let Ok(page_size) = u32::try_from(page_size) else {
        return Ok(None);
    };
    if page_size == PAGE_SIZE {
        return Ok(None);
    }
    let bytes = u64::from(page_size) * u64::try_from(live_pages).unwrap_or(0);
    if bytes > REWRITE_LIMIT {
        return Ok(Some(PageSizeChange::TooBig { page_size, bytes }));
    }
    let rewrite = || -> rusqlite::Result<()> {
        let _: String = conn.query_row("PRAGMA journal_mode=DELETE", [], |r| r.get(0))?;
        conn.pragma_update(None, "page_size", PAGE_SIZE)?;
        conn.execute_batch("VACUUM")
    };
    let outcome = rewrite();
    set_wal(conn)?;
    Ok(Some(match outcome {
        Ok(()) => PageSizeChange::Rewritten { from: page_size },
        Err(error) => PageSizeChange::Failed { page_size, error },
    }))
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// Renames a damaged file (and its WAL and shared-memory files) to `*.corrupt-{secs}`;
/// for callers that find damage SQLite cannot see (a checksum of their own).
pub fn set_aside(path: &Path) -> Result<PathBuf, OpenError> {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    // A second damaged file within the same second must not replace the first.
    let mut target = with_suffix(path, &format!(".corrupt-{secs}"));
    for n in 1..1000 {
        if !target.exists() {
            break;
        }
        target = with_suffix(path, &format!(".corrupt-{secs}-{n}"));
    }
    let rename = |from: &Path, to: &Path| {
        std::fs::rename(from, to).map_err(|source| OpenError::Io {
            path: from.to_path_buf(),
            source,
        })
    };
    // The file itself was just opened, so it must be there; its companions need not be.
    rename(path, &target)?;
    for suffix in ["-wal", "-shm"] {
        let from = with_suffix(path, suffix);
        if from.exists() {
            rename(&from, &with_suffix(&target, suffix))?;
        }
    }
    Ok(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, v TEXT);";

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn a_fresh_file_is_in_wal_mode_with_the_schema() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        let opened = open(&path, SCHEMA, Some(512)).unwrap();
        assert!(opened.set_aside.is_none());
        let conn = &opened.conn;
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        // 2 is FULL.
        let sync: i64 = conn
            .query_row("PRAGMA synchronous", [], |r| r.get(0))
            .unwrap();
        assert_eq!(sync, 2);
        let cache: i64 = conn
            .query_row("PRAGMA cache_size", [], |r| r.get(0))
            .unwrap();
        assert_eq!(cache, -512);
        conn.execute("INSERT INTO t (v) VALUES ('x')", []).unwrap();
        drop(opened);

        // Opening again keeps the rows: the schema is only created when missing.
        let again = open(&path, SCHEMA, None).unwrap();
        assert!(again.set_aside.is_none());
        let n: i64 = again
            .conn
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 1);
    }

    fn page_size(conn: &Connection) -> i64 {
        conn.query_row("PRAGMA page_size", [], |r| r.get(0))
            .unwrap()
    }

    /// A file as an earlier release made it: 4 KiB pages, WAL mode, a row `kept` and
    /// `ballast` bytes of padding.
    fn file_with_4k_pages(path: &Path, ballast: usize) {
        let conn = Connection::open(path).unwrap();
        conn.execute_batch(
            "PRAGMA page_size = 4096; PRAGMA journal_mode = WAL; \
             CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT); \
             INSERT INTO t (v) VALUES ('kept');",
        )
        .unwrap();
        if ballast > 0 {
            conn.execute("INSERT INTO t (v) VALUES (zeroblob(?1))", [ballast as i64])
                .unwrap();
        }
    }

    fn first_row(conn: &Connection) -> String {
        conn.query_row("SELECT v FROM t ORDER BY id LIMIT 1", [], |r| r.get(0))
            .unwrap()
    }

    #[test]
    fn a_new_file_has_small_pages() {
        let dir = tempfile::tempdir().unwrap();
        let fresh = open(&dir.path().join("new.sqlite"), SCHEMA, None).unwrap();
        assert_eq!(page_size(&fresh.conn), i64::from(PAGE_SIZE));
        assert!(fresh.page_size_change.is_none());
    }

    #[test]
    fn a_small_file_with_4k_pages_is_rewritten_with_small_ones_and_keeps_its_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.sqlite");
        file_with_4k_pages(&path, 100_000);
        let opened = open(&path, SCHEMA, None).unwrap();
        assert!(opened.set_aside.is_none());
        match &opened.page_size_change {
            Some(PageSizeChange::Rewritten { from: 4096 }) => {}
            other => panic!("expected a rewrite from 4096, got {other:?}"),
        }
        assert_eq!(page_size(&opened.conn), i64::from(PAGE_SIZE));
        assert_eq!(first_row(&opened.conn), "kept");
        let mode: String = opened
            .conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal", "back in WAL mode after the rewrite");
        opened
            .conn
            .execute("INSERT INTO t (v) VALUES ('new')", [])
            .unwrap();
        drop(opened);
        // Done once: the next start finds small pages and changes nothing.
        let again = open(&path, SCHEMA, None).unwrap();
        assert!(again.page_size_change.is_none());
        let n: i64 = again
            .conn
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 3);
    }

    #[test]
    fn a_big_file_with_4k_pages_keeps_them_and_says_why() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.sqlite");
        file_with_4k_pages(&path, REWRITE_LIMIT as usize + (1 << 20));
        let opened = open(&path, SCHEMA, None).unwrap();
        let change = opened
            .page_size_change
            .as_ref()
            .expect("a change to report");
        match change {
            PageSizeChange::TooBig {
                page_size: 4096,
                bytes,
            } => {
                assert!(*bytes > REWRITE_LIMIT, "{bytes}")
            }
            other => panic!("expected TooBig, got {other:?}"),
        }
        assert!(!change.is_failure());
        assert!(
            change.to_string().contains("keeps its 4096-byte pages"),
            "{change}"
        );
        assert_eq!(page_size(&opened.conn), 4096);
        assert_eq!(first_row(&opened.conn), "kept");
    }

    /// A file of garbage at `dir/db.sqlite`: its path and bytes.
    fn garbage_file(dir: &Path) -> (PathBuf, Vec<u8>) {
        let path = dir.join("db.sqlite");
        let garbage = b"this is not an sqlite database, it is a damaged file.....".repeat(100);
        std::fs::write(&path, &garbage).unwrap();
        (path, garbage)
    }

    /// Checks that `opened` replaced a file that held `garbage`, kept byte for byte under
    /// `db.sqlite.corrupt-{secs}`, and that the new file takes rows; returns the kept name.
    fn kept_aside(opened: &Opened, garbage: &[u8]) -> String {
        let aside = opened.set_aside.as_ref().expect("the file is set aside");
        assert!(is_corruption(&aside.cause), "{}", aside.cause);
        let kept = aside.path.file_name().unwrap().to_string_lossy();
        let secs = kept
            .strip_prefix("db.sqlite.corrupt-")
            .expect("named after the file");
        assert!(secs.parse::<u64>().is_ok(), "{kept}");
        assert_eq!(
            std::fs::read(&aside.path).unwrap(),
            garbage,
            "kept byte for byte"
        );
        opened
            .conn
            .execute("INSERT INTO t (v) VALUES ('x')", [])
            .unwrap();
        kept.into_owned()
    }

    #[test]
    fn a_file_of_garbage_is_set_aside_and_a_new_one_opened() {
        let dir = tempfile::tempdir().unwrap();
        let (path, garbage) = garbage_file(dir.path());
        let opened = open(&path, SCHEMA, None).unwrap();
        let kept = kept_aside(&opened, &garbage);
        let mode: String = opened
            .conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        assert_eq!(
            names(dir.path()),
            ["db.sqlite", "db.sqlite-shm", "db.sqlite-wal", kept.as_str()]
        );
    }

    #[test]
    fn a_file_of_garbage_is_set_aside_with_its_wal_and_shm() {
        let dir = tempfile::tempdir().unwrap();
        let (path, garbage) = garbage_file(dir.path());
        std::fs::write(with_suffix(&path, "-wal"), b"not a wal").unwrap();
        std::fs::write(with_suffix(&path, "-shm"), b"not a shm").unwrap();
        // The last connection to close a file deletes its WAL and shared memory, so with
        // no other one open `open`'s failed first attempt would remove them itself. This
        // stands in for another process that has the damaged file open.
        let other = Connection::open(&path).unwrap();
        let refused = other.query_row("PRAGMA journal_mode", [], |r| r.get::<_, String>(0));
        assert!(is_corruption(&refused.unwrap_err()));

        let opened = open(&path, SCHEMA, None).unwrap();
        let kept = kept_aside(&opened, &garbage);
        let kept_path = dir.path().join(&kept);
        assert_eq!(
            std::fs::read(with_suffix(&kept_path, "-wal")).unwrap(),
            b"not a wal"
        );
        assert!(with_suffix(&kept_path, "-shm").exists());
        assert_eq!(
            names(dir.path()),
            [
                "db.sqlite".to_owned(),
                "db.sqlite-shm".to_owned(),
                "db.sqlite-wal".to_owned(),
                kept.clone(),
                format!("{kept}-shm"),
                format!("{kept}-wal"),
            ]
        );
        // `other` still names its WAL by the old path, which is now the new file's: it
        // closes after the new connection has removed that one.
        drop(opened);
        drop(other);
    }

    #[test]
    fn a_missing_directory_is_created() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/nested/db.sqlite");
        let opened = open(&path, SCHEMA, None).unwrap();
        assert!(opened.set_aside.is_none());
        assert!(path.exists());
    }

    #[test]
    fn a_directory_that_cannot_be_made_is_an_io_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("file");
        std::fs::write(&blocker, b"").unwrap();
        let err = open(&blocker.join("db.sqlite"), SCHEMA, None).unwrap_err();
        match &err {
            OpenError::Io { path, .. } => assert_eq!(path, &blocker),
            other => panic!("expected an I/O error, got {other:?}"),
        }
        assert!(
            err.to_string().contains(&*blocker.to_string_lossy()),
            "{err}"
        );
    }

    #[test]
    fn a_schema_error_is_not_taken_for_damage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        let err = open(&path, "CREATE TABLE nonsense (", None).unwrap_err();
        assert!(matches!(err, OpenError::Sqlite { .. }), "{err:?}");
        assert!(err.to_string().contains("db.sqlite"), "{err}");
        assert_eq!(
            names(dir.path())
                .iter()
                .filter(|n| n.contains("corrupt"))
                .count(),
            0
        );
    }
}
