//! The bridge's one wall clock: milliseconds since the Unix epoch, as the spool stamps
//! accept times and the status and statistics report them. Kept apart from `uplink` and
//! `spool` so neither imports the other for the time.

/// Now, in milliseconds since the Unix epoch (0 if the clock is before 1970).
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
