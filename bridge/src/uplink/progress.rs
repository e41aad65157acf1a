//! What an operator reads in the log about a link: the backlog found on connecting, the
//! drain's progress and its end, and connect failures without one line per retry.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use crate::stats::BridgeStats;

/// How often a long drain reports its progress.
const PROGRESS_EVERY: Duration = Duration::from_secs(30);
/// How often the drain watcher looks at the counters.
const LOOK_EVERY: Duration = Duration::from_secs(1);
/// A failure that keeps repeating is logged again at most this often.
const REPEAT_EVERY: Duration = Duration::from_secs(60);

/// The spool as found when the link came up.
pub(crate) struct Backlog {
    messages: u64,
    bytes: u64,
    oldest_age: Option<Duration>,
}

impl Backlog {
    /// Reads the spool's counters now.
    pub(crate) fn now(stats: &BridgeStats, now_ms: i64) -> Backlog {
        let oldest = stats.oldest_accepted_ms.load(Relaxed);
        Backlog {
            messages: stats.spool_messages.load(Relaxed),
            bytes: stats.spool_bytes.load(Relaxed),
            oldest_age: (oldest > 0 && now_ms >= oldest)
                .then(|| Duration::from_millis(u64::try_from(now_ms - oldest).unwrap_or(0))),
        }
    }

    /// `1204 messages (96.3 kB, oldest 2h 5m)`, or `nothing`.
    pub(crate) fn describe(&self) -> String {
        if self.messages == 0 {
            return "nothing".to_owned();
        }
        let age = self
            .oldest_age
            .map(|a| format!(", oldest {}", human_duration(a)))
            .unwrap_or_default();
        format!(
            "{} messages ({}{age})",
            self.messages,
            human_bytes(self.bytes)
        )
    }
}

/// Logs the drain of a backlog found at connect: progress every [`PROGRESS_EVERY`] and
/// `drained N messages in T` at the end. Ends with the link (or the drain).
pub(crate) fn watch_drain(name: String, stats: Arc<BridgeStats>, start: Backlog) {
    if start.messages == 0 {
        return;
    }
    tokio::spawn(async move {
        let began = Instant::now();
        let mut last_report = began;
        let mut tick = tokio::time::interval(LOOK_EVERY);
        let forwarded_at_start = stats.forwarded.load(Relaxed);
        loop {
            tick.tick().await;
            if !stats.connected.load(Relaxed) {
                let sent = stats
                    .forwarded
                    .load(Relaxed)
                    .saturating_sub(forwarded_at_start);
                tracing::info!(bridge = %name, sent, left = stats.spool_messages.load(Relaxed),
                    "drain interrupted: the link went down");
                return;
            }
            let left = stats.spool_messages.load(Relaxed);
            let sent = stats
                .forwarded
                .load(Relaxed)
                .saturating_sub(forwarded_at_start);
            if left == 0 {
                let took = began.elapsed();
                tracing::info!(bridge = %name, messages = sent, secs = took.as_secs_f64(),
                    "drained {sent} messages in {}", human_duration(took));
                return;
            }
            if last_report.elapsed() >= PROGRESS_EVERY {
                last_report = Instant::now();
                let rate = sent as f64 / began.elapsed().as_secs_f64().max(0.001);
                let eta = if rate > 0.0 {
                    human_duration(Duration::from_secs_f64(left as f64 / rate))
                } else {
                    "unknown".to_owned()
                };
                tracing::info!(bridge = %name, sent, left, rate = rate.round(),
                    "draining: {sent} sent, {left} left, {rate:.0} msg/s, about {eta} to go");
            }
        }
    });
}

/// Keeps a failure that repeats on every retry from filling the log: the first one is
/// a warning, the same one again is logged at most every [`REPEAT_EVERY`] with how often
/// it happened since, and a different one is a warning at once.
#[derive(Default)]
pub(crate) struct Repeats {
    last: Option<(String, Instant)>,
    since_logged: u64,
}

impl Repeats {
    /// Logs `why` for the bridge `name` if it is due.
    pub(crate) fn failed(&mut self, name: &str, why: &str) {
        match &self.last {
            Some((w, at)) if w == why && at.elapsed() < REPEAT_EVERY => {
                self.since_logged += 1;
                tracing::debug!(bridge = %name, "cannot connect: {why}");
            }
            Some((w, _)) if w == why => {
                tracing::warn!(bridge = %name, attempts = self.since_logged + 1,
                    "still cannot connect ({} attempts since the last report): {why}",
                    self.since_logged + 1);
                self.last = Some((why.to_owned(), Instant::now()));
                self.since_logged = 0;
            }
            _ => {
                tracing::warn!(bridge = %name, "cannot connect: {why}");
                self.last = Some((why.to_owned(), Instant::now()));
                self.since_logged = 0;
            }
        }
    }

    /// The link is up: the next failure is news again.
    pub(crate) fn reset(&mut self) {
        self.last = None;
        self.since_logged = 0;
    }
}

fn human_bytes(b: u64) -> String {
    match b {
        0..1_000 => format!("{b} B"),
        1_000..1_000_000 => format!("{:.1} kB", b as f64 / 1e3),
        1_000_000..1_000_000_000 => format!("{:.1} MB", b as f64 / 1e6),
        _ => format!("{:.1} GB", b as f64 / 1e9),
    }
}

fn human_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0 => format!("{} ms", d.as_millis()),
        1..60 => format!("{:.1} s", d.as_secs_f64()),
        60..3600 => format!("{}m {}s", s / 60, s % 60),
        3600..86_400 => format!("{}h {}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d {}h", s / 86_400, (s % 86_400) / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backlog_reads_like_a_sentence() {
        let stats = BridgeStats::default();
        assert_eq!(Backlog::now(&stats, 10).describe(), "nothing");
        stats.spool_messages.store(1204, Relaxed);
        stats.spool_bytes.store(96_300, Relaxed);
        stats.oldest_accepted_ms.store(1_000, Relaxed);
        let b = Backlog::now(&stats, 1_000 + 7_500_000);
        assert_eq!(b.describe(), "1204 messages (96.3 kB, oldest 2h 5m)");
    }

    #[test]
    fn durations_and_sizes_are_short() {
        assert_eq!(human_duration(Duration::from_millis(250)), "250 ms");
        assert_eq!(human_duration(Duration::from_secs(61)), "1m 1s");
        assert_eq!(human_duration(Duration::from_secs(90_000)), "1d 1h");
        assert_eq!(human_bytes(999), "999 B");
        assert_eq!(human_bytes(2_500_000), "2.5 MB");
    }
}
