//! End-to-end flow control shared by the publishers and subscribers of one run.
//!
//! Publishers may run ahead of the slowest delivery by at most a window of messages. Without
//! it, "as fast as possible" measures how large a broker lets its outgoing queues grow (and,
//! for Mosquitto, how many messages it drops when `max_queued_messages` is hit) instead of
//! how fast it routes. Because publishers and subscribers live in one process, the window
//! costs two atomic counters.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use tokio::sync::Notify;

/// Shared counters of one run.
pub struct Flow {
    epoch: Instant,
    published: AtomicU64,
    delivered: AtomicU64,
    written_off: AtomicU64,
    fanout: u64,
    window: u64,
    wakers: Vec<Arc<Notify>>,
}

impl Flow {
    /// A flow for `fanout` subscribers per message, allowing `window` messages (over all
    /// publishers) to be published but not yet delivered; `wakers` are the publishers'.
    pub fn new(fanout: u64, window: u64, wakers: Vec<Arc<Notify>>) -> Flow {
        Flow {
            epoch: Instant::now(),
            published: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            written_off: AtomicU64::new(0),
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
        let outstanding = owed.saturating_sub(done).div_ceil(self.fanout);
        self.window.saturating_sub(outstanding)
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
        let f = Flow::new(2, 10, vec![]);
        assert_eq!(f.allowance(), 10);
        f.add_published(10);
        assert_eq!(f.allowance(), 0);
        // One subscriber got all ten, the other none: still ten outstanding deliveries,
        // five messages' worth.
        f.add_delivered(10);
        assert_eq!(f.allowance(), 5);
        f.write_off_outstanding();
        assert_eq!(f.allowance(), 10);
    }
}
