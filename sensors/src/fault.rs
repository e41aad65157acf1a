//! Test-only fault points of the sensor layer, in debug builds only:
//! `OUTPOST_FAULT=wedge-sensor-lines` stops every line's task for good once it has
//! started, as a wedged poller would, so a test can show the systemd watchdog stops being
//! fed (`tests/tests/watchdog.rs`).

/// True when the line tasks must wedge.
pub fn wedge_lines() -> bool {
    use std::sync::OnceLock;
    static ARMED: OnceLock<bool> = OnceLock::new();
    *ARMED.get_or_init(|| std::env::var("OUTPOST_FAULT").is_ok_and(|v| v == "wedge-sensor-lines"))
}
