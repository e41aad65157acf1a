//! End-to-end flow control shared by the publishers and subscribers of one run.
//!
//! Publishers may run ahead of delivery by at most a window of deliveries (one message to
//! one subscriber), summed over the run. Without
//! it, "as fast as possible" measures how large a broker lets its outgoing queues grow (and,
//! for Mosquitto, how many messages it drops when `max_queued_messages` is hit) instead of
//! how fast it routes. Because publishers and subscribers live in one process, the window
//! costs two atomic counters.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Instant;

use tokio::sync::Notify;

/// Shared counters of one run.
pub struct Flow {
    epoch: Instant,
    published: AtomicU64,
    delivered: AtomicU64,
    written_off: AtomicU64,
    activity: AtomicU64,
    awaiting_pubrel: AtomicI64,
    fanout: u64,
    window: u64,
    wakers: Vec<Arc<Notify>>,
}

impl Flow {
    /// A flow for `fanout` subscribers per message, allowing `window` deliveries (over all
    /// publishers and subscribers) to be owed at once; `wakers` are the publishers'.
    pub fn new(fanout: u64, window: u64, wakers: Vec<Arc<Notify>>) -> Flow {
        Flow {
            epoch: Instant::now(),
            published: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            written_off: AtomicU64::new(0),
            activity: AtomicU64::new(0),
            awaiting_pubrel: AtomicI64::new(0),
            fanout: fanout.max(1),
            window: window.max(1),
            wakers,
        }
    }

    /// Nanoseconds since the run's epoch: the clock of the payload timestamps.
    pub fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// How many more messages publishers may send now.
    pub fn allowance(&self) -> u64 {
        let owed = self.published.load(Ordering::Relaxed) * self.fanout;
        let done =
            self.delivered.load(Ordering::Relaxed) + self.written_off.load(Ordering::Relaxed);
        let outstanding = owed.saturating_sub(done);
        // At least one message may always go, even when the window is smaller than the
        // fan-out, or nothing would ever be published.
        let room = self.window.saturating_sub(outstanding) / self.fanout;
        if outstanding == 0 { room.max(1) } else { room }
    }

    /// Publishers call this before writing `n` messages.
    pub fn add_published(&self, n: u64) {
        self.published.fetch_add(n, Ordering::Relaxed);
    }

    /// Subscribers call this after receiving `n` new messages; wakes stalled publishers.
    pub fn add_delivered(&self, n: u64) {
        self.delivered.fetch_add(n, Ordering::Relaxed);
        for w in &self.wakers {
            w.notify_one();
        }
    }

    /// Gives up on everything outstanding (messages a QoS 0 broker dropped), so a stalled
    /// window reopens; loss is still counted from the subscribers' own trackers.
    pub fn write_off_outstanding(&self) {
        let owed = self.published.load(Ordering::Relaxed) * self.fanout;
        let done =
            self.delivered.load(Ordering::Relaxed) + self.written_off.load(Ordering::Relaxed);
        self.written_off
            .fetch_add(owed.saturating_sub(done), Ordering::Relaxed);
    }

    /// Subscribers call this with the packets of each read, new messages or not.
    pub fn add_activity(&self, packets: u64) {
        self.activity.fetch_add(packets, Ordering::Relaxed);
    }

    /// Packets received by all subscribers so far.
    pub fn activity(&self) -> u64 {
        self.activity.load(Ordering::Relaxed)
    }

    /// Subscribers report QoS 2 deliveries they answered with PUBREC (+) and that the
    /// broker then released with PUBREL (-).
    pub fn add_awaiting_pubrel(&self, delta: i64) {
        self.awaiting_pubrel.fetch_add(delta, Ordering::Relaxed);
    }

    /// QoS 2 deliveries the broker has not yet released, over all subscribers.
    pub fn awaiting_pubrel(&self) -> i64 {
        self.awaiting_pubrel.load(Ordering::Relaxed)
    }

    /// New deliveries so far (all subscribers).
    pub fn delivered(&self) -> u64 {
        self.delivered.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_closes_and_reopens() {
        // Two subscribers, twenty deliveries owed at most: ten messages.
        let f = Flow::new(2, 20, vec![]);
        assert_eq!(f.allowance(), 10);
        f.add_published(10);
        assert_eq!(f.allowance(), 0);
        // One subscriber got all ten, the other none: ten deliveries still owed.
        f.add_delivered(10);
        assert_eq!(f.allowance(), 5);
        f.write_off_outstanding();
        assert_eq!(f.allowance(), 10);
    }

    #[test]
    fn one_message_always_fits_an_empty_pipe() {
        let f = Flow::new(100, 10, vec![]);
        assert_eq!(f.allowance(), 1);
        f.add_published(1);
        assert_eq!(f.allowance(), 0);
    }
}
