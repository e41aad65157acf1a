//! When a writer thread commits its batch: at once for clients that wait for their
//! acknowledgements, up to a window later for changes that keep coming on their own.
//!
//! Why it matters on an SD card: in WAL mode with `synchronous=FULL` every commit appends
//! whole pages (plus a 24-byte frame header each) to the WAL and syncs them, and the kernel
//! counts every 4 KiB block of its page cache that a commit touches. A spool committing one
//! 96-byte message at a time wrote 8.6 KB per message with 4 KiB pages and 5.6 KB with
//! [`crate::PAGE_SIZE`]'s 1 KiB pages (BENCHMARKS.md, tenth session); a commit that holds
//! ten writes little more than one that holds one. So at a steady trickle (a site's sensors
//! publishing 100 readings a second) the bytes written per message fall with the messages
//! per commit, and only waiting can raise those.
//!
//! Waiting costs nothing when changes come by themselves, but a client that sends its next
//! message only after the acknowledgement of the last one (or of its last window of them)
//! would get one window per round trip. Only a change that arrives while a batch is still
//! open shows a pace of its own: that client had no acknowledgement to wait for. So:
//! - the gaps between arrivals inside one batch give a mean and a mean deviation, as TCP
//!   keeps for round trips, and a batch is committed once nothing came for twice the mean
//!   plus four deviations (at least [`MIN_QUIET`]), or when the window is over;
//! - with no such gaps seen there is nothing to wait for. When lone changes come closer
//!   together than the window, one batch is held for the whole window as a probe: if more
//!   come meanwhile, the stream has a pace of its own; if not, the next probe waits twice
//!   as long (from [`FIRST_BACKOFF`] up to [`MAX_BACKOFF`]), so a client that waits for each
//!   acknowledgement pays one window now and then, not every time;
//! - a probe finds a stream only if changes keep coming to the end of its window: a client
//!   that sent one burst and waits (whose burst may come in two parts when Nagle's
//!   algorithm holds the rest until the kernel's delayed ACK) is not one;
//! - a batch that ended in quiet before its window was over halves the mean: the stream has
//!   slowed or stopped.
//!
//! PostgreSQL's `commit_delay`/`commit_siblings` and Kafka's `linger.ms` make the same
//! trade; the probe is BBR's way of finding out what only trying shows. Sans-I/O: the writer
//! passes the time in, so the rule is tested without a clock.

use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

/// The window when the configuration names none: at 100 messages a second about ten share
/// a commit, and no acknowledgement waits more than a tenth of a second for it.
pub const DEFAULT_WINDOW: Duration = Duration::from_millis(100);

/// The longest window a configuration may ask for: every acknowledgement of a steady
/// stream waits that long.
pub const MAX_WINDOW: Duration = Duration::from_secs(5);

/// Least quiet time before a batch is committed early: shorter than a loopback round trip
/// plus an fsync, so a waiting client hardly notices it.
pub const MIN_QUIET: Duration = Duration::from_micros(250);

/// Least time between a probe that found no stream and the next one.
pub const FIRST_BACKOFF: Duration = Duration::from_secs(1);

/// Most time between a probe that found no stream and the next one.
pub const MAX_BACKOFF: Duration = Duration::from_secs(64);

/// Lone changes in a row, each within a window of the one before, that call for a probe.
const NEAR_BEFORE_PROBE: u32 = 4;

/// Mean gaps at least this long are a stream paced by its source, not by our
/// acknowledgements.
const PACED: Duration = Duration::from_millis(2);

/// Longer than Linux's delayed ACK (40 ms at least), which a paced client with Nagle's
/// algorithm may wait for between two of its messages.
const DELAYED_ACK: Duration = Duration::from_millis(50);

/// Changes closer together than this arrived together.
const TOGETHER: Duration = Duration::from_micros(100);

/// Weight of the newest gap in the mean, as a divisor (1/8, as TCP's SRTT).
const GAP_WEIGHT: u32 = 8;

/// Weight of the newest deviation in the mean deviation (1/4, as TCP's RTTVAR).
const DEV_WEIGHT: u32 = 4;

/// The commit timing of one writer thread.
#[derive(Debug, Clone)]
pub struct CommitWindow {
    window: Duration,
    /// Moving average of the time between arrivals within one batch.
    gap: Duration,
    /// Moving mean deviation of those gaps.
    dev: Duration,
    /// `gap` holds a sample.
    sampled: bool,
    /// First and last change of the open batch, and how many it holds.
    first: Option<Instant>,
    last: Option<Instant>,
    changes: u32,
    /// Arrivals in the open batch: changes less than [`TOGETHER`] apart count as one.
    arrivals: u32,
    /// Start of the batch before the open one.
    previous_first: Option<Instant>,
    /// Lone batches in a row that each started within a window of the one before.
    near: u32,
    /// The open batch is held for the whole window.
    probing: bool,
    /// No probe before this; and the wait after the next one that finds nothing.
    next_probe: Option<Instant>,
    backoff: Duration,
}

impl CommitWindow {
    /// A writer that waits at most `window` after the first change of a batch (zero
    /// commits every batch at once).
    pub fn new(window: Duration) -> CommitWindow {
        CommitWindow {
            window,
            // Nobody is held up before the changes have shown a pace of their own.
            gap: Duration::ZERO,
            dev: Duration::ZERO,
            sampled: false,
            first: None,
            last: None,
            changes: 0,
            arrivals: 0,
            previous_first: None,
            near: 0,
            probing: false,
            next_probe: None,
            backoff: FIRST_BACKOFF,
        }
    }

    /// The configured window.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// A change arrived at `now`.
    pub fn on_change(&mut self, now: Instant) {
        if self.changes == 0 {
            self.first = Some(now);
            self.arrivals = 1;
            self.probing = !self.window.is_zero()
                && self.near >= NEAR_BEFORE_PROBE
                && self.quiet() < self.window
                && self.next_probe.is_none_or(|t| now >= t);
        } else if let Some(prev) = self.last {
            let gap = now.saturating_duration_since(prev);
            // Changes that come together (one TCP segment, or what queued during the
            // last commit) are one arrival: their near-zero gaps say nothing of the pace.
            if gap >= TOGETHER {
                self.sample(gap.min(self.window));
                self.arrivals += 1;
            }
        }
        self.last = Some(now);
        self.changes += 1;
    }

    /// When the open batch is to be committed; a time in the past means now, and `None`
    /// that no batch is open.
    pub fn deadline(&self) -> Option<Instant> {
        let first = self.first?;
        if self.window.is_zero() {
            return Some(first);
        }
        let end = first + self.window;
        if self.probing {
            return Some(end);
        }
        let last = self.last.map_or(first, |l| l.max(first));
        Some(end.min(last + self.quiet()))
    }

    /// The open batch was committed at `now` (its acknowledgements are on their way).
    pub fn on_commit(&mut self, now: Instant) {
        let Some(first) = self.first.take() else {
            return;
        };
        let end = first + self.window;
        let last = self.last.unwrap_or(first);
        let lone = self.arrivals == 1;
        if self.probing {
            // A stream keeps coming to the end of the window. A client that sent one burst
            // and waits for its acknowledgements may show two arrivals (with Nagle's
            // algorithm, the rest of its burst comes when the kernel's delayed ACK lets
            // it), then nothing.
            let stream = self.arrivals >= 3 && last >= first + self.window * 3 / 4;
            if stream {
                self.backoff = FIRST_BACKOFF;
            } else {
                self.next_probe = Some(now + self.backoff);
                self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
                // What it saw is no pace to wait for.
                self.gap = Duration::ZERO;
                self.dev = Duration::ZERO;
                self.sampled = false;
            }
            self.near = 0;
        } else {
            if last + self.quiet() < end {
                // Ended in quiet before the window was over: the stream has slowed or
                // stopped (or never was one), so wait less next time.
                self.gap /= 2;
                self.dev /= 2;
            }
            let near = lone
                && self
                    .previous_first
                    .is_some_and(|p| first.saturating_duration_since(p) < self.window);
            self.near = if near { self.near.saturating_add(1) } else { 0 };
        }
        self.previous_first = Some(first);
        self.changes = 0;
        self.arrivals = 0;
        self.probing = false;
    }

    /// Takes one gap between arrivals into the mean and the mean deviation, as TCP
    /// does with round trips (RFC 6298, 2.3).
    fn sample(&mut self, gap: Duration) {
        if self.sampled {
            let dev = self.gap.abs_diff(gap);
            self.dev = (self.dev * (DEV_WEIGHT - 1) + dev) / DEV_WEIGHT;
            self.gap = (self.gap * (GAP_WEIGHT - 1) + gap) / GAP_WEIGHT;
        } else {
            self.gap = gap;
            self.dev = gap / 2;
            self.sampled = true;
        }
    }

    /// How long a batch stays open after its last change: twice the mean gap plus four
    /// mean deviations, so a client whose segments wait for TCP's delayed ACK (Nagle's
    /// algorithm on its side) now and then is not taken for one that stopped.
    fn quiet(&self) -> Duration {
        let mut quiet = self.gap * 2 + self.dev * 4;
        if self.gap >= PACED {
            // A client with Nagle's algorithm on sends its next segment only once the last
            // one is acknowledged, and the kernel holds that ACK up to 40 ms hoping to put
            // it on our PUBACK: such a stall is not the end of the stream.
            quiet = quiet.max(DELAYED_ACK);
        }
        quiet.clamp(MIN_QUIET, self.window.max(MIN_QUIET))
    }

    /// The mean gap between arrivals within one batch (for the log and tests).
    pub fn average_gap(&self) -> Duration {
        self.gap
    }
}

/// Puts `first` and then whatever else `rx` yields into `batch` until the window says to
/// commit: at once when `urgent` holds for a change (someone is waiting on it, such as a
/// flush), when `batch` holds `max`, or when the channel is closed. The caller commits the
/// batch and then calls [`CommitWindow::on_commit`].
pub fn gather<T>(
    rx: &Receiver<T>,
    first: T,
    batch: &mut Vec<T>,
    max: usize,
    window: &mut CommitWindow,
    urgent: impl Fn(&T) -> bool,
) {
    let mut hurry = urgent(&first);
    window.on_change(Instant::now());
    batch.push(first);
    // Every pass takes a change or returns, so `max` bounds it.
    loop {
        while batch.len() < max {
            match rx.try_recv() {
                Ok(c) => {
                    hurry |= urgent(&c);
                    window.on_change(Instant::now());
                    batch.push(c);
                }
                Err(_) => break,
            }
        }
        if hurry || batch.len() >= max {
            return;
        }
        let Some(deadline) = window.deadline() else {
            return;
        };
        let wait = deadline.saturating_duration_since(Instant::now());
        if wait.is_zero() {
            return;
        }
        match rx.recv_timeout(wait) {
            Ok(c) => {
                hurry |= urgent(&c);
                window.on_change(Instant::now());
                batch.push(c);
            }
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// How the simulated client sends.
    #[derive(Clone, Copy, Debug)]
    enum Source {
        /// One change every so often, whether or not the last one was acknowledged.
        Paced(Duration),
        /// A burst of this many changes, then nothing until the commit acknowledges them.
        Clocked(usize),
        /// As `Clocked`, from a client with Nagle's algorithm on: the first change of a
        /// burst comes at once, the rest once its segment is acknowledged (by our commit's
        /// PUBACK, or else the kernel's delayed ACK 40 ms later).
        ClockedNagle(usize),
        /// Every 10 ms from a client with Nagle's algorithm on, as seen after our PUBACKs
        /// put the kernel into delayed-ACK mode: after a commit, one change comes on time;
        /// the next ones wait for the ACK of its segment, 45 ms later, and come together.
        Nagle,
    }

    /// What a simulated run gave.
    struct Run {
        /// Changes per commit, in order.
        commits: Vec<usize>,
        /// Changes per second over the run.
        rate: f64,
        /// The longest time from a change to its commit.
        max_wait: Duration,
    }

    impl Run {
        /// Mean changes per commit over the second half (once the average has settled).
        fn settled_mean(&self) -> f64 {
            let s = &self.commits[self.commits.len() / 2..];
            s.iter().sum::<usize>() as f64 / s.len() as f64
        }
    }

    /// Runs a source through a writer whose commit takes 3 ms (an SD card's fsync), with
    /// a 150 µs round trip to the client.
    fn simulate(window: Duration, source: Source, changes: usize) -> Run {
        simulate_with(window, source, changes, 3 * MS)
    }

    /// As [`simulate`], with a commit that takes `fsync`.
    fn simulate_with(window: Duration, source: Source, changes: usize, fsync: Duration) -> Run {
        // The round trip varies (100 to 227 µs, a fixed pseudo-random sequence) so that
        // nothing in the run falls into lockstep with the commits.
        let mut seed = 0x2545_f491_u32;
        let mut rtt = || {
            seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            Duration::from_micros(100 + u64::from(seed >> 25))
        };
        let mut cw = CommitWindow::new(window);
        let t0 = Instant::now();
        let mut now = t0;
        let mut sent = 0;
        let mut in_burst = 0;
        let mut burst_start = t0;
        let mut max_wait = Duration::ZERO;
        // When the next change arrives; None while the client waits for a commit.
        let mut next = Some(t0);
        let mut commits = Vec::new();
        let mut last_commit: Option<Instant> = None;
        let mut since_commit = 0;
        // The rest of a Nagle client's burst waits for the ACK of its first segment.
        let mut nagle_held = false;
        while sent < changes {
            now = now.max(next.expect("a change is due"));
            let first = now;
            let mut n = 0;
            loop {
                cw.on_change(now);
                sent += 1;
                n += 1;
                since_commit += 1;
                next = match source {
                    Source::Paced(every) => Some(t0 + every * sent as u32),
                    Source::ClockedNagle(burst) => {
                        in_burst += 1;
                        if in_burst == 1 && burst > 1 {
                            nagle_held = true;
                            Some(now + 40 * MS)
                        } else if in_burst < burst {
                            Some(now)
                        } else {
                            in_burst = 0;
                            None
                        }
                    }
                    Source::Nagle => {
                        let due = t0 + 10 * MS * sent as u32;
                        let held_until = last_commit.map(|c| c + 45 * MS);
                        match held_until {
                            // Not the first since the commit, and its ACK not yet sent.
                            Some(h) if since_commit > 0 && due < h => Some(h.max(now)),
                            _ => Some(due.max(now)),
                        }
                    }
                    Source::Clocked(burst) => {
                        if in_burst == 0 {
                            burst_start = now;
                        }
                        in_burst += 1;
                        if in_burst < burst {
                            // Sent 10 µs apart whatever the writer does meanwhile: those a
                            // commit overtakes are queued when it ends.
                            Some(burst_start + Duration::from_micros(10) * in_burst as u32)
                        } else {
                            in_burst = 0;
                            None
                        }
                    }
                };
                let deadline = cw.deadline().expect("a batch is open");
                match next {
                    Some(a) if sent < changes && a <= deadline => now = now.max(a),
                    _ => {
                        now = now.max(deadline);
                        break;
                    }
                }
            }
            max_wait = max_wait.max(now - first);
            now += fsync;
            cw.on_commit(now);
            last_commit = Some(now);
            since_commit = 0;
            commits.push(n);
            let rtt = rtt();
            if next.is_none() {
                next = Some(now + rtt);
            } else if nagle_held {
                // Our PUBACK carried the ACK the rest of the burst was waiting for.
                next = next.map(|a| a.min(now + rtt));
            }
            nagle_held = false;
        }
        Run {
            commits,
            rate: changes as f64 / now.duration_since(t0).as_secs_f64(),
            max_wait,
        }
    }

    #[test]
    fn a_zero_window_commits_every_batch_at_once() {
        let run = simulate(Duration::ZERO, Source::Paced(10 * MS), 200);
        assert!(run.commits.iter().all(|&n| n == 1), "{:?}", run.commits);
        assert_eq!(run.max_wait, Duration::ZERO);
    }

    #[test]
    fn a_steady_stream_fills_the_window() {
        // 100 messages/s that do not wait for their acknowledgement, a 250 ms window: once
        // a probe has found the stream, every commit holds about 25 of them.
        let run = simulate(250 * MS, Source::Paced(10 * MS), 6_000);
        let mean = run.settled_mean();
        assert!(mean >= 20.0, "mean {mean} per commit");
        assert!(run.max_wait <= 250 * MS, "{:?}", run.max_wait);
    }

    #[test]
    fn a_stream_held_up_by_delayed_acks_now_and_then_still_fills_the_window() {
        let run = simulate(250 * MS, Source::Nagle, 6_000);
        let mean = run.settled_mean();
        assert!(mean >= 20.0, "mean {mean} per commit");
    }

    #[test]
    fn a_stream_slower_than_the_window_is_not_held() {
        // One change every 400 ms with a 250 ms window: no two ever share a commit, so
        // holding them would only add latency. After the first probe they wait for the
        // quiet floor only.
        let run = simulate(250 * MS, Source::Paced(400 * MS), 200);
        assert!(run.commits.iter().all(|&n| n == 1));
        let mut cw = CommitWindow::new(250 * MS);
        let t0 = Instant::now();
        let mut held = 0;
        for i in 0..200u32 {
            let at = t0 + 400 * MS * i;
            cw.on_change(at);
            let d = cw.deadline().expect("open");
            if d - at > MS {
                held += 1;
            }
            cw.on_commit(d + 3 * MS);
        }
        // Lone changes 400 ms apart are never within a 250 ms window of each other, so
        // nothing calls for a probe.
        assert_eq!(held, 0, "{held} of 200 changes were held");
    }

    #[test]
    fn a_client_that_waits_for_each_acknowledgement_is_not_held_for_the_window() {
        // One message, then the next only after its PUBACK: with no probe, each is
        // committed after the quiet floor; the probes that find nothing back off.
        // Over 30 s: the quiet floor and six probes (at 0, 1, 3, 7, 15 and 31 s) cost it
        // about a tenth.
        let run = simulate(250 * MS, Source::Clocked(1), 10_000);
        assert!(run.commits.iter().all(|&n| n == 1));
        let unheld = simulate(Duration::ZERO, Source::Clocked(1), 10_000).rate;
        assert!(
            run.rate >= 0.8 * unheld,
            "{:.0} changes/s against {unheld:.0} without a window",
            run.rate
        );
    }

    #[test]
    fn a_pipelined_client_gets_its_burst_committed_together_and_soon() {
        // Twenty in flight (mosquitto_pub's default), sent together after each round of
        // acknowledgements: each commit holds the whole burst, at nearly the rate without
        // a window.
        let run = simulate(250 * MS, Source::Clocked(20), 60_000);
        assert!(run.commits.iter().all(|&n| n == 20), "{:?}", run.commits);
        // Without a window (and a writer that takes the whole burst), a round is the burst,
        // the fsync and the round trip.
        // Over 13 s the quiet floor and four probes cost it about a tenth.
        let unheld = 20.0 / (19.0 * 10e-6 + 3e-3 + 150e-6);
        assert!(
            run.rate >= 0.8 * unheld,
            "{:.0} changes/s against {unheld:.0} without a window",
            run.rate
        );
    }

    #[test]
    fn a_pipelined_client_is_faster_with_the_window_where_a_commit_is_slow() {
        // Without a window the writer commits the first message of a burst alone and the
        // rest, which came during that commit, after it: two commits a round. Waiting the
        // quiet floor for the rest makes one. Where a commit takes 3 ms (an SD card) that
        // wins; where it takes 300 µs (this project's VM measured 0.2 to 0.6 ms) the floor
        // is about what the second commit would have cost, and the measured burst there ran
        // at about 60 % of its "0s" speed (BENCHMARKS.md, tenth session).
        let rate = |window, fsync| simulate_with(window, Source::Clocked(20), 20_000, fsync).rate;
        let (slow_held, slow_unheld) = (rate(100 * MS, 3 * MS), rate(Duration::ZERO, 3 * MS));
        assert!(
            slow_held >= 1.5 * slow_unheld,
            "3 ms commits: {slow_held:.0} changes/s with the window, {slow_unheld:.0} without"
        );
        let fast = Duration::from_micros(300);
        let (fast_held, fast_unheld) = (rate(100 * MS, fast), rate(Duration::ZERO, fast));
        eprintln!(
            "3 ms: {slow_held:.0} against {slow_unheld:.0}; 300 µs: {fast_held:.0} against {fast_unheld:.0}"
        );
        assert!(
            fast_held >= 0.7 * fast_unheld,
            "300 µs commits: {fast_held:.0} changes/s with the window, {fast_unheld:.0} without"
        );
    }

    #[test]
    fn a_client_with_nagle_that_waits_for_its_burst_s_acknowledgements_is_not_held() {
        // mosquitto_pub -l with twenty in flight: the burst comes in two parts, 40 ms
        // apart unless a commit acknowledges the first. That is no stream: failed probes
        // back off, and it keeps nearly its rate without a window.
        let run = simulate(100 * MS, Source::ClockedNagle(20), 60_000);
        let unheld = simulate(Duration::ZERO, Source::ClockedNagle(20), 60_000);
        assert!(
            run.rate >= 0.8 * unheld.rate,
            "{:.0} changes/s against {:.0} without a window",
            run.rate,
            unheld.rate
        );
    }

    #[test]
    fn the_window_bounds_every_wait() {
        for source in [
            Source::Paced(MS),
            Source::Paced(10 * MS),
            Source::Paced(60 * MS),
            Source::Clocked(1),
            Source::Clocked(20),
            Source::ClockedNagle(20),
            Source::Nagle,
        ] {
            let run = simulate(50 * MS, source, 3_000);
            assert!(run.max_wait <= 50 * MS, "{source:?}: {:?}", run.max_wait);
        }
    }
}

#[cfg(test)]
mod gather_tests {
    use super::*;
    use std::sync::mpsc::channel;

    /// A window that has seen changes 10 ms apart, so it holds a batch 50 ms after its
    /// last change.
    fn paced(window: Duration) -> CommitWindow {
        let mut w = CommitWindow::new(window);
        let t = Instant::now() - Duration::from_secs(1);
        w.on_change(t);
        w.on_change(t + Duration::from_millis(10));
        w.on_commit(t + Duration::from_millis(20));
        w
    }

    #[test]
    fn a_zero_window_takes_what_is_queued_and_returns() {
        let (tx, rx) = channel();
        for i in 1..=3 {
            tx.send(i).unwrap();
        }
        let mut w = CommitWindow::new(Duration::ZERO);
        let mut batch = Vec::new();
        gather(&rx, 0, &mut batch, 100, &mut w, |_| false);
        assert_eq!(batch, [0, 1, 2, 3]);
    }

    #[test]
    fn an_urgent_change_ends_the_wait_and_max_bounds_the_batch() {
        let (tx, rx) = channel();
        let mut w = paced(Duration::from_secs(3600));
        // The batch would be held for 50 ms after each change: the urgent one (a flush)
        // ends it at once.
        tx.send(-1).unwrap();
        let mut batch = Vec::new();
        let t = Instant::now();
        gather(&rx, 0, &mut batch, 100, &mut w, |&c| c < 0);
        assert_eq!(batch, [0, -1]);
        assert!(t.elapsed() < Duration::from_secs(60));
        w.on_commit(Instant::now());
        for i in 1..=10 {
            tx.send(i).unwrap();
        }
        let mut batch = Vec::new();
        gather(&rx, 0, &mut batch, 5, &mut w, |&c| c < 0);
        assert_eq!(batch, [0, 1, 2, 3, 4]);
    }

    #[test]
    fn a_closed_channel_ends_the_wait() {
        let (tx, rx) = channel::<i32>();
        // Held 50 ms after each change: the sender's change 20 ms in is taken, and its
        // hang-up ends the wait.
        let mut w = paced(Duration::from_secs(3600));
        let sender = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            tx.send(1).unwrap();
            drop(tx);
        });
        let mut batch = Vec::new();
        gather(&rx, 0, &mut batch, 100, &mut w, |_| false);
        sender.join().unwrap();
        assert_eq!(batch, [0, 1]);
    }
}
