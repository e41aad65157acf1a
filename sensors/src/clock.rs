//! Wall-clock trust: readings get a date only once the kernel says the clock is synchronised.

use crate::config::ClockMode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

/// Kernel clock state as reported by adjtimex(2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelClock {
    /// Return value of adjtimex: TIME_ERROR (5) means unsynchronised.
    pub state: i32,
    /// The `status` word; STA_UNSYNC (0x40) means unsynchronised.
    pub status: i32,
}

const TIME_ERROR: i32 = 5;
const STA_UNSYNC: i32 = 0x0040;

/// The same rule systemd's `timedatectl` uses for NTPSynchronized.
pub fn is_synchronised(k: KernelClock) -> bool {
    k.state != TIME_ERROR && k.status & STA_UNSYNC == 0
}

/// Milliseconds since boot (CLOCK_BOOTTIME), a monotonic reference while the wall clock
/// is unknown.
pub fn uptime_ms() -> Option<u64> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, exclusively borrowed timespec.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    (rc == 0).then(|| ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000)
}

/// Reads the kernel clock state without changing it (modes = 0 needs no privilege).
pub fn read_kernel_clock() -> Option<KernelClock> {
    // SAFETY: timex is plain old data; zeroed is a valid value, and modes = 0 only reads.
    let mut tx: libc::timex = unsafe { std::mem::zeroed() };
    // SAFETY: `tx` is a valid, exclusively borrowed timex for the duration of the call.
    let state = unsafe { libc::adjtimex(&mut tx) };
    (state >= 0).then_some(KernelClock {
        state,
        status: tx.status,
    })
}

/// Shared view of whether timestamps can be trusted, refreshed in the background.
#[derive(Debug, Clone)]
pub struct Clock {
    synced: Arc<AtomicBool>,
}

impl Clock {
    /// Starts a clock; in `Auto` mode a task rechecks adjtimex every few seconds until synchronised.
    pub fn start(mode: ClockMode, shutdown: tokio::sync::watch::Receiver<bool>) -> Self {
        let synced = Arc::new(AtomicBool::new(
            mode == ClockMode::Trusted || kernel_synced(),
        ));
        if !synced.load(Ordering::Relaxed) {
            let flag = Arc::clone(&synced);
            tokio::spawn(async move {
                let mut shutdown = shutdown;
                let mut tick = tokio::time::interval(Duration::from_secs(2));
                loop {
                    tokio::select! {
                        _ = tick.tick() => {}
                        _ = shutdown.changed() => return,
                    }
                    if kernel_synced() {
                        tracing::info!("system clock synchronised; readings now carry timestamps");
                        flag.store(true, Ordering::Relaxed);
                        return;
                    }
                }
            });
        }
        Clock { synced }
    }

    /// A clock with a fixed answer (tests, tools).
    pub fn fixed(synced: bool) -> Self {
        Clock {
            synced: Arc::new(AtomicBool::new(synced)),
        }
    }

    /// The wall-clock time if it can be trusted.
    pub fn now(&self) -> Option<SystemTime> {
        self.synced.load(Ordering::Relaxed).then(SystemTime::now)
    }
}

fn kernel_synced() -> bool {
    read_kernel_clock().is_some_and(is_synchronised)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decision_follows_timedatectl() {
        assert!(is_synchronised(KernelClock {
            state: 0,
            status: 0x2001
        }));
        assert!(!is_synchronised(KernelClock {
            state: 0,
            status: STA_UNSYNC
        }));
        assert!(!is_synchronised(KernelClock {
            state: TIME_ERROR,
            status: 0
        }));
        assert!(read_kernel_clock().is_some());
    }

    #[test]
    fn fixed_clock() {
        assert!(Clock::fixed(true).now().is_some());
        assert!(Clock::fixed(false).now().is_none());
    }
}
