//! Disk space held back for a full disk.
//!
//! In WAL mode every write, a delete too, appends to the `-wal` file, and a checkpoint that
//! would give the WAL's space back first has to grow the database file. On a file system
//! that is full (often with the spool's own WAL) neither can run: acknowledged rows could
//! not be deleted, the spool stayed full after the cloud drained it, and a restart sent
//! them all again. So each durable file (the bridge spool, the broker store) keeps a file of
//! real (not sparse) bytes next to it. When a write fails with `SQLITE_FULL` its writer
//! deletes the file, which lets deletes and checkpoints run while new messages are refused,
//! and it makes the file again (with room to spare) before it accepts messages again.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use rusqlite::Connection;

/// Largest reserve: about what a WAL holds at SQLite's automatic checkpoint (1000 pages, of
/// 4 KiB in a file an earlier release made), so that one checkpoint can always complete once
/// the reserve is released.
pub const RESERVE_BYTES: u64 = 4 << 20;
/// Smallest reserve tried when a small file system has no room for a bigger one.
const MIN_RESERVE_BYTES: u64 = 512 << 10;

/// Space held back; the writer releases it on a full disk and holds it again after.
pub trait Reserve: Send {
    /// Hold the reserve, with as much again free beside it as half its size; an error when
    /// there is no room for that (nothing is held then).
    fn hold(&mut self, conn: &Connection) -> io::Result<()>;
    /// Give the space back (nothing happens when it is not held).
    fn release(&mut self, conn: &Connection) -> io::Result<()>;
    /// Bytes held when held.
    fn size(&self) -> u64;
    /// Where it is, for the log.
    fn describe(&self) -> String;
}

/// A file of `size` bytes beside the spool: `{spool}.reserve`.
pub struct FileReserve {
    path: PathBuf,
    size: u64,
}

impl FileReserve {
    /// The reserve of the spool at `spool`.
    pub fn path_for(spool: &Path) -> PathBuf {
        let mut s = spool.as_os_str().to_owned();
        s.push(".reserve");
        PathBuf::from(s)
    }

    /// Hold the reserve of `spool` now: the file left by an earlier run is kept as it is
    /// (a restart writes nothing); otherwise the biggest size from [`RESERVE_BYTES`] down
    /// that fits is made. Returns the reserve and whether it is held.
    pub fn open(spool: &Path) -> (FileReserve, io::Result<()>) {
        let path = Self::path_for(spool);
        if let Ok(meta) = std::fs::metadata(&path)
            && meta.is_file()
            && (MIN_RESERVE_BYTES..=RESERVE_BYTES).contains(&meta.len())
        {
            let size = meta.len();
            return (FileReserve { path, size }, Ok(()));
        }
        let mut size = RESERVE_BYTES;
        loop {
            let mut r = FileReserve {
                path: path.clone(),
                size,
            };
            match r.make() {
                Ok(()) => return (r, Ok(())),
                Err(e) if size / 2 >= MIN_RESERVE_BYTES && is_no_space(&e) => size /= 2,
                Err(e) => return (r, Err(e)),
            }
        }
    }

    /// Write the file with real bytes (pseudo-random, so a compressing file system stores
    /// them too) and sync it, once the file system shows room for it and half as much
    /// again beside it. Removes it on failure.
    fn make(&mut self) -> io::Result<()> {
        let r = self.write_file();
        if r.is_err() {
            let _ = std::fs::remove_file(&self.path);
        }
        r
    }

    fn write_file(&self) -> io::Result<()> {
        let want = self.size + self.size / 2;
        if let Some(free) = self.free_bytes()
            && free < want
        {
            return Err(io::Error::new(
                io::ErrorKind::StorageFull,
                format!("{free} bytes free, {want} wanted"),
            ));
        }
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&self.path)?;
        let probe = self.size;
        let mut chunk = vec![0u8; 64 << 10];
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut written = 0u64;
        while written < probe {
            for b in chunk.chunks_mut(8) {
                // xorshift64
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                b.copy_from_slice(&x.to_le_bytes()[..b.len()]);
            }
            let n = (probe - written).min(chunk.len() as u64) as usize;
            f.write_all(&chunk[..n])?;
            written += n as u64;
        }
        f.sync_all()?;
        Ok(())
    }

    /// Bytes an unprivileged writer may still use on the reserve's file system (the file
    /// itself, when it exists, not counted as used); `None` when that cannot be told.
    fn free_bytes(&self) -> Option<u64> {
        let dir = match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let st = nix::sys::statvfs::statvfs(dir).ok()?;
        // The field types are narrower on 32-bit targets (armv7, arm): widen them.
        #[allow(clippy::useless_conversion)]
        let avail = u64::from(st.blocks_available()).saturating_mul(u64::from(st.fragment_size()));
        let mine = std::fs::metadata(&self.path).map_or(0, |m| m.len());
        Some(avail.saturating_add(mine))
    }
}

/// True for "no space left on device" (and a file size limit).
pub fn is_no_space(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded | io::ErrorKind::FileTooLarge
    ) || e.kind() == io::ErrorKind::WriteZero
}

impl Reserve for FileReserve {
    fn hold(&mut self, _conn: &Connection) -> io::Result<()> {
        self.make()
    }

    fn release(&mut self, _conn: &Connection) -> io::Result<()> {
        match std::fs::remove_file(&self.path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }
}
