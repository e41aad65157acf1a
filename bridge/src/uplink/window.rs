//! How many messages may be out unacknowledged towards the cloud: sized to the link.
//!
//! A fixed window is wrong somewhere. Over cellular (600 ms round trip, 1 Mbit/s) 256
//! messages carry a third of what the link can; on a LAN a large window only means more
//! to resend, and on a metered link to pay for twice, when the link drops. So the window
//! starts small, doubles each round trip while the round trip stays flat (the link has
//! room), and once a queue shows (the round trip grows with the window: a modem's buffer)
//! it holds the bandwidth-delay product plus a quarter, plus what the link carries in
//! 5 ms: enough to keep the link and the cloud broker busy through jitter, not so much
//! that live messages wait behind a standing queue. That is TCP Vegas's idea, counted in
//! messages and timed by PUBACK/PUBREC. Every 30 s under load it drains to a few messages
//! for one round trip to measure the round trip without a queue again (BBR's ProbeRTT), so
//! a path that got longer is not mistaken for a queue.
//!
//! Sans-I/O: the session reports sends and acknowledgements with the time; `limit` is the
//! window. The configured `max_inflight` and the cloud's Receive Maximum bound it.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// The window of a new connection (or the cap, when that is smaller).
const INITIAL: usize = 64;
/// The window never shrinks below this: on a fast, short link a round trip is a few
/// messages, and a little pipelining costs nothing.
const FLOOR: usize = 32;
/// The window's size over the bandwidth-delay product in steady state.
const HEADROOM: f64 = 1.25;
/// Queueing delay the window may add on top of [`HEADROOM`]: a standing queue this short
/// costs live messages nothing they would notice (CoDel's target). It matters where the
/// round trip is short: on a LAN a quarter of the bandwidth-delay product is a handful of
/// messages, too few to keep a cloud broker that reads in batches busy (a 1,000,000-message
/// drain into a local Mosquitto reached 70 % of its accept rate without it, 85 % with a
/// fixed window of 256). Over a 600 ms cellular link it adds under 1 % to the window.
const QUEUE_BUDGET: Duration = Duration::from_millis(5);
/// Under load without a round trip near the base for this long, measure it again.
const PROBE_EVERY: Duration = Duration::from_secs(30);
/// The window while the base round trip is measured.
const PROBE_WINDOW: usize = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Doubling each round trip until a queue shows.
    Startup,
    /// Near the bandwidth-delay product plus headroom.
    Steady,
    /// Drained to [`PROBE_WINDOW`] for one round trip; then back to `saved`.
    Probe { saved: usize },
}

/// The in-flight window of one connection to the cloud.
#[derive(Debug)]
pub(crate) struct Window {
    cap: usize,
    window: usize,
    phase: Phase,
    /// The smallest round trip seen (since connecting, or since the last probe).
    base: Option<Duration>,
    /// When a round trip near `base` was last seen.
    base_seen: Instant,
    /// Send time and sequence number of each message out, by packet identifier.
    sent: HashMap<u16, (Instant, u64)>,
    seq: u64,
    /// The round ends when a message sent at or after this sequence number is answered.
    round_end: u64,
    round_min: Option<Duration>,
    /// Most messages out at once in this round.
    round_flight: usize,
    /// The window, not the spool, limited sending in this round.
    round_limited: bool,
}

impl Window {
    /// A window for a new connection, at most `cap` (max_inflight ∧ Receive Maximum).
    pub(crate) fn new(cap: usize, now: Instant) -> Window {
        let cap = cap.max(1);
        Window {
            cap,
            window: INITIAL.min(cap),
            phase: Phase::Startup,
            base: None,
            base_seen: now,
            sent: HashMap::new(),
            seq: 0,
            round_end: 1,
            round_min: None,
            round_flight: 0,
            round_limited: false,
        }
    }

    /// How many messages may be out now.
    pub(crate) fn limit(&self) -> usize {
        match self.phase {
            Phase::Probe { .. } => PROBE_WINDOW.min(self.window),
            _ => self.window,
        }
    }

    /// A PUBLISH with identifier `pid` went out; `out` messages are out with it.
    pub(crate) fn on_send(&mut self, pid: u16, now: Instant, out: usize) {
        self.seq += 1;
        self.sent.insert(pid, (now, self.seq));
        self.round_flight = self.round_flight.max(out);
        if out >= self.limit() {
            self.round_limited = true;
        }
    }

    /// The cloud answered `pid` (PUBACK, or PUBREC for QoS 2).
    pub(crate) fn on_ack(&mut self, pid: u16, now: Instant) {
        let Some((at, seq)) = self.sent.remove(&pid) else {
            return;
        };
        let rtt = now.saturating_duration_since(at);
        self.round_min = Some(self.round_min.map_or(rtt, |m| m.min(rtt)));
        if seq >= self.round_end {
            self.end_round(now);
        }
    }

    /// `pid` is no longer out without an answer worth timing (refused, dropped).
    pub(crate) fn forget(&mut self, pid: u16) {
        self.sent.remove(&pid);
    }

    fn end_round(&mut self, now: Instant) {
        self.round_end = self.seq + 1;
        let flight = std::mem::take(&mut self.round_flight);
        let limited = std::mem::take(&mut self.round_limited);
        let Some(rtt) = self.round_min.take() else {
            return;
        };
        if let Phase::Probe { saved } = self.phase {
            // Nothing was queued ahead of this round's messages: its round trip is the
            // path's, shorter or longer than before.
            self.base = Some(rtt);
            self.base_seen = now;
            self.window = saved;
            self.phase = Phase::Steady;
            return;
        }
        let base = match self.base {
            Some(b) if b <= rtt => b,
            _ => {
                self.base = Some(rtt);
                rtt
            }
        };
        if rtt.as_secs_f64() <= base.as_secs_f64() * 1.1 {
            self.base_seen = now;
        }
        if !limited {
            // The spool, not the window, set the pace: the round says nothing about the
            // link's room.
            return;
        }
        // What the path holds without a queue: the flight scaled by base / round trip.
        let rtt_s = rtt.as_secs_f64().max(1e-9);
        let bdp = flight as f64 * base.as_secs_f64() / rtt_s;
        let queued = flight as f64 - bdp;
        // Messages the path delivers in the queue budget, at this round's rate.
        let budget = flight as f64 * QUEUE_BUDGET.as_secs_f64() / rtt_s;
        let target = self.clamp((bdp * HEADROOM + budget).ceil() as usize);
        match self.phase {
            Phase::Startup if queued > (flight as f64 / 8.0).max(4.0) => {
                self.window = target;
                self.phase = Phase::Steady;
            }
            Phase::Startup => self.window = self.clamp(self.window.saturating_mul(2)),
            Phase::Steady => {
                self.window = target;
                if now.saturating_duration_since(self.base_seen) >= PROBE_EVERY {
                    self.phase = Phase::Probe { saved: self.window };
                }
            }
            Phase::Probe { .. } => {}
        }
    }

    fn clamp(&self, n: usize) -> usize {
        n.clamp(FLOOR.min(self.cap), self.cap)
    }
}

#[cfg(test)]
mod tests {
    //! A deterministic link: a bottleneck of `rate` messages per second with an unbounded
    //! queue (a modem's buffer), a fixed propagation round trip, and a sender that keeps
    //! the window full. Time is simulated; nothing sleeps.
    use super::*;
    use std::collections::VecDeque;

    struct Link {
        /// Messages per second through the bottleneck.
        rate: f64,
        /// Round trip without queueing.
        base: Duration,
    }

    /// Runs `secs` of a full backlog over `link`; returns (delivered per second over the
    /// last half, the window at the end, the mean wait in the bottleneck's queue in the
    /// last half: what a live message behind the backlog waits for on top of the path).
    fn drain(window: &mut Window, link: &Link, start: Instant, secs: f64) -> (f64, usize, f64) {
        let per_msg = 1.0 / link.rate;
        let mut t = 0.0_f64; // seconds since start
        let mut bottleneck_free = 0.0_f64;
        let mut acks: VecDeque<(f64, u16)> = VecDeque::new();
        let mut out = 0usize;
        let mut pid: u16 = 0;
        let (mut delivered_late, mut queued_late, mut waited_late) = (0usize, 0usize, 0.0_f64);
        let mut steps = 0u64;
        while t < secs {
            steps += 1;
            assert!(steps < 50_000_000, "simulation did not end");
            while out < window.limit() {
                pid = pid.wrapping_add(1).max(1);
                out += 1;
                window.on_send(pid, start + Duration::from_secs_f64(t), out);
                // Half the propagation before the bottleneck, half after.
                let arrive = t + link.base.as_secs_f64() / 2.0;
                let leave = arrive.max(bottleneck_free) + per_msg;
                if t > secs / 2.0 {
                    queued_late += 1;
                    waited_late += leave - arrive - per_msg;
                }
                bottleneck_free = leave;
                acks.push_back((leave + link.base.as_secs_f64() / 2.0, pid));
            }
            let (at, acked) = acks.pop_front().expect("messages out");
            t = at;
            out -= 1;
            if t > secs / 2.0 {
                delivered_late += 1;
            }
            window.on_ack(acked, start + Duration::from_secs_f64(t));
        }
        (
            delivered_late as f64 / (secs / 2.0),
            window.window,
            waited_late / queued_late.max(1) as f64,
        )
    }

    #[test]
    fn fills_a_long_fat_link_without_a_long_standing_queue() {
        // Cellular: 1 Mbit/s of ~120-byte messages, 600 ms round trip: a product of ~625.
        let link = Link {
            rate: 1_040.0,
            base: Duration::from_millis(600),
        };
        let start = Instant::now();
        let mut w = Window::new(65_535, start);
        let (rate, window, queue) = drain(&mut w, &link, start, 120.0);
        let bdp = link.rate * link.base.as_secs_f64();
        eprintln!("rate {rate:.0}/s window {window} mean queueing {queue:.3} s");
        assert!(
            rate >= 0.95 * link.rate,
            "delivered {rate:.0}/s of {:.0}/s",
            link.rate
        );
        assert!(
            (window as f64) < 1.6 * bdp,
            "window {window} against a product of {bdp:.0}"
        );
        assert!(
            queue < 0.4 * link.base.as_secs_f64(),
            "mean queueing {queue:.2} s on a {:?} path",
            link.base
        );
    }

    #[test]
    fn the_fixed_default_would_have_left_most_of_that_link_idle() {
        // The reason for all this: the old fixed window of 256 over the same link.
        let link = Link {
            rate: 1_040.0,
            base: Duration::from_millis(600),
        };
        let start = Instant::now();
        let mut w = Window::new(256, start);
        let (rate, _, _) = drain(&mut w, &link, start, 60.0);
        assert!(rate < 0.5 * link.rate, "delivered {rate:.0}/s");
    }

    #[test]
    fn holds_the_product_and_five_milliseconds_on_a_short_link() {
        // A LAN or loopback cloud: 2 ms round trip, 20,000 messages/s.
        let link = Link {
            rate: 20_000.0,
            base: Duration::from_millis(2),
        };
        let start = Instant::now();
        let mut w = Window::new(65_535, start);
        let (rate, window, queue) = drain(&mut w, &link, start, 20.0);
        eprintln!("rate {rate:.0}/s window {window} mean queueing {queue:.4} s");
        assert!(rate >= 0.95 * link.rate, "delivered {rate:.0}/s");
        // A product of 40, a quarter more (50), and 5 ms of the link's rate (100): enough
        // queued that a cloud broker which reads in batches never waits for the next
        // message, and no more.
        assert!(
            (130..=200).contains(&window),
            "window {window} for a product of 40"
        );
        // What a live message behind the backlog waits: the budget and a quarter of the
        // round trip, not more.
        assert!(queue < 0.0065, "mean queueing {queue:.4} s");
    }

    #[test]
    fn never_exceeds_the_cap() {
        let link = Link {
            rate: 1_040.0,
            base: Duration::from_millis(600),
        };
        let start = Instant::now();
        let mut w = Window::new(100, start); // AWS IoT's 100 unacknowledged publishes
        let (_, window, _) = drain(&mut w, &link, start, 30.0);
        assert!(window <= 100 && w.limit() <= 100);
        let mut tiny = Window::new(3, start);
        assert_eq!(tiny.limit(), 3);
        let _ = drain(&mut tiny, &link, start, 10.0);
        assert!(tiny.limit() <= 3);
    }

    #[test]
    fn a_path_that_gets_longer_is_measured_again_not_taken_for_a_queue() {
        // 100 ms becomes 600 ms (a handover to a slower network): without the probe the
        // window would shrink towards the floor and starve the link.
        let start = Instant::now();
        let mut w = Window::new(65_535, start);
        let short = Link {
            rate: 1_040.0,
            base: Duration::from_millis(100),
        };
        let _ = drain(&mut w, &short, start, 60.0);
        let long = Link {
            rate: 1_040.0,
            base: Duration::from_millis(600),
        };
        // The simulated clock restarts at `start + 60 s`.
        let (rate, _, _) = drain(&mut w, &long, start + Duration::from_secs(60), 180.0);
        assert!(
            rate >= 0.9 * long.rate,
            "delivered {rate:.0}/s after the path grew"
        );
    }

    #[test]
    fn an_idle_spool_does_not_grow_the_window() {
        let start = Instant::now();
        let mut w = Window::new(65_535, start);
        // One message at a time, each answered after 100 ms: never window-limited.
        for i in 0..1_000u16 {
            let t = start + Duration::from_millis(u64::from(i) * 200);
            w.on_send(i + 1, t, 1);
            w.on_ack(i + 1, t + Duration::from_millis(100));
        }
        assert_eq!(w.limit(), INITIAL);
    }

    #[test]
    fn answers_for_unknown_or_forgotten_identifiers_are_ignored() {
        let start = Instant::now();
        let mut w = Window::new(65_535, start);
        w.on_ack(7, start);
        w.on_send(7, start, 1);
        w.forget(7);
        w.on_ack(7, start + Duration::from_secs(1));
        assert_eq!(w.limit(), INITIAL);
        assert!(w.sent.is_empty());
    }
}
