//! Keep-alive and close-grace deadlines of every connection, in one ordered map that
//! one task sweeps.
//!
//! A `tokio::time::Sleep` per connection is a 112-byte allocation per client plus its
//! pointer in the task; with ten thousand idle clients that is a tenth of the memory
//! budget spent on timers that almost never fire. Here a connection keeps only its
//! deadline (a number) and its entry in a B-tree; the sweeper wakes the connection when
//! the deadline passes and the connection decides (keep-alive expired, or re-arm from
//! the last packet it saw). A parked connection's keep alive is kept more compactly by
//! the parked-socket set (`park.rs`), and fired by the same sweeper.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::Waker;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// Longest the sweeper sleeps with nothing due, so a forgotten wake-up costs at most
/// this much lateness.
const MAX_IDLE: Duration = Duration::from_secs(60);

/// The deadlines of one broker's connections.
pub struct Deadlines {
    epoch: Instant,
    next_id: AtomicU64,
    inner: Mutex<Inner>,
    /// Wakes the sweeper when a deadline earlier than its next wake-up is armed.
    earlier: Notify,
    /// Where quiet connections leave their sockets (they keep their deadline here).
    lot: super::park::Lot,
}

/// Low bits of a key that tell apart connections with the same deadline millisecond.
const ID_BITS: u32 = 24;

#[derive(Default)]
struct Inner {
    /// Key (deadline in ms since `epoch` above [`ID_BITS`] bits of connection id) -> that
    /// connection's task. One `u64` key rather than a (deadline, id) pair keeps an entry
    /// at 24 bytes: with ten thousand clients the map is a tenth of their memory.
    map: BTreeMap<u64, Waker>,
    /// When the sweeper will next look (ms since `epoch`); 0 when it is not running.
    sweeper_at: u64,
}

impl std::fmt::Debug for Deadlines {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deadlines").finish_non_exhaustive()
    }
}

impl Deadlines {
    /// An empty set; the sweeper task starts with the first deadline.
    pub fn new() -> Arc<Deadlines> {
        Arc::new(Deadlines {
            epoch: Instant::now(),
            next_id: AtomicU64::new(1),
            inner: Mutex::new(Inner::default()),
            earlier: Notify::new(),
            lot: super::park::Lot::default(),
        })
    }

    /// The clock deadlines are kept in: milliseconds since this set was made, never 0.
    pub fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX) + 1
    }

    /// The sockets of parked (quiet) connections.
    pub fn lot(&self) -> &super::park::Lot {
        &self.lot
    }

    /// A new connection id for [`Self::arm`]. Only its low [`ID_BITS`] bits reach a key,
    /// so 32 bits (which keep a connection's task a cache line smaller) lose nothing.
    pub fn id(&self) -> u32 {
        (self.next_id.fetch_add(1, Ordering::Relaxed) & u64::from(u32::MAX)) as u32
    }

    /// When the deadline with this key is due (ms, [`Self::now_ms`] clock).
    pub fn due(key: u64) -> u64 {
        key >> ID_BITS
    }

    /// Wakes `waker` once `at` (ms, [`Self::now_ms`] clock) has passed, replacing the
    /// connection's previous deadline `prev` (a key from this function, or 0 for none).
    /// Returns the new deadline's key.
    pub fn arm(self: &Arc<Self>, id: u32, prev: u64, at: u64, waker: &Waker) -> u64 {
        let at = at.max(1);
        let mut key = (at << ID_BITS) | (u64::from(id) & ((1 << ID_BITS) - 1));
        let mut inner = lock(&self.inner);
        if prev != 0 {
            inner.map.remove(&prev);
        }
        // Two connections whose ids agree in the low bits and that share a deadline
        // millisecond: the later one moves on by a key step (at most a millisecond).
        while inner.map.contains_key(&key) {
            key += 1;
        }
        inner.map.insert(key, waker.clone());
        self.sweep_by(inner, at);
        key
    }

    /// Parks a quiet connection's socket `fd` in the lot: `waker` fires when the socket
    /// becomes readable or, unless `due` is 0, once `due` (ms, [`Self::now_ms`] clock)
    /// has passed (at most a second late, well inside the half keep alive of slack that
    /// MQTT-3.1.2-24 gives). The lot must forget `fd` before it is closed.
    pub fn park(self: &Arc<Self>, fd: RawFd, waker: Waker, due: u64) -> io::Result<()> {
        // The lot's lock is taken and released before ours: the sweeper takes ours, then
        // the lot's, and sets its next wake-up before letting go of ours, so this check
        // sees either a sweeper that saw the new deadline or the wake-up it chose
        // without it.
        self.lot.watch(fd, waker, due)?;
        if due != 0 {
            self.sweep_by(lock(&self.inner), super::park::fires_at(due));
        }
        Ok(())
    }

    /// Makes sure the sweeper looks again by `at`: starts it, or wakes it if it sleeps
    /// past `at`.
    fn sweep_by(self: &Arc<Self>, mut inner: std::sync::MutexGuard<'_, Inner>, at: u64) {
        let (start, notify) = if inner.sweeper_at == 0 {
            inner.sweeper_at = at;
            (true, false)
        } else {
            (false, at < inner.sweeper_at)
        };
        drop(inner);
        if start {
            tokio::spawn(sweep(Arc::downgrade(self)));
        } else if notify {
            self.earlier.notify_one();
        }
    }

    /// Forgets a deadline by its key (0 for none).
    pub fn disarm(&self, key: u64) {
        if key != 0 {
            lock(&self.inner).map.remove(&key);
        }
    }

    /// Takes every due entry; returns their wakers and when the next one is due.
    fn take_due(&self) -> (Vec<Waker>, Option<u64>) {
        let now = self.now_ms();
        let mut inner = lock(&self.inner);
        let later = inner.map.split_off(&((now + 1) << ID_BITS));
        let due = std::mem::replace(&mut inner.map, later);
        let mut wakers: Vec<Waker> = due.into_values().collect();
        let parked_next = self.lot.take_due(now, &mut wakers);
        let next = inner
            .map
            .keys()
            .next()
            .map(|&k| Self::due(k))
            .into_iter()
            .chain(parked_next)
            .min();
        let max_idle = u64::try_from(MAX_IDLE.as_millis()).unwrap_or(u64::MAX);
        inner.sweeper_at = next.unwrap_or(now + max_idle).min(now + max_idle);
        (wakers, next)
    }
}

/// The sweeper: wakes connections whose deadline passed; ends with the broker.
async fn sweep(deadlines: Weak<Deadlines>) {
    loop {
        let Some(d) = deadlines.upgrade() else {
            return;
        };
        let (due, next) = d.take_due();
        // Woken outside the lock: a woken connection may re-arm at once.
        for w in due {
            w.wake();
        }
        let wait = next.map_or(MAX_IDLE, |at| {
            Duration::from_millis(at.saturating_sub(d.now_ms())).min(MAX_IDLE)
        });
        // Holding `d` while asleep is fine: once the broker lets go, this is the last
        // reference, dropped after the wake-up, and the next upgrade fails.
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = d.earlier.notified() => {}
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every critical section leaves the map consistent, so a poisoned lock is usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;
    use std::sync::atomic::AtomicBool;
    use std::task::Wake;

    use super::*;

    struct Flag(AtomicBool);
    impl Wake for Flag {
        fn wake(self: Arc<Self>) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    #[tokio::test]
    async fn wakes_when_due_and_not_after_disarm() {
        let d = Deadlines::new();
        let (a, b) = (
            Arc::new(Flag(AtomicBool::new(false))),
            Arc::new(Flag(AtomicBool::new(false))),
        );
        let (wa, wb) = (Waker::from(a.clone()), Waker::from(b.clone()));
        let (ia, ib) = (d.id(), d.id());
        d.arm(ia, 0, d.now_ms() + 50, &wa);
        let key_b = d.arm(ib, 0, d.now_ms() + 50, &wb);
        d.disarm(key_b);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            a.0.load(Ordering::SeqCst),
            "the armed deadline must wake its task"
        );
        assert!(
            !b.0.load(Ordering::SeqCst),
            "a disarmed deadline must not wake"
        );
    }

    #[tokio::test]
    async fn ids_that_collide_in_the_low_bits_both_fire() {
        let d = Deadlines::new();
        let (a, b) = (
            Arc::new(Flag(AtomicBool::new(false))),
            Arc::new(Flag(AtomicBool::new(false))),
        );
        let at = d.now_ms() + 30;
        let ka = d.arm(5, 0, at, &Waker::from(a.clone()));
        let kb = d.arm(5 + (1 << ID_BITS), 0, at, &Waker::from(b.clone()));
        assert_ne!(ka, kb);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(a.0.load(Ordering::SeqCst) && b.0.load(Ordering::SeqCst));
    }

    /// A parked connection's keep alive lives in the lot's wheel, which the same
    /// sweeper fires: every socket still parked when its deadline passes is woken, none
    /// that was taken back (forgotten) before, whatever its place in the shared bucket.
    #[tokio::test]
    async fn parked_keep_alives_fire_and_forgotten_ones_do_not() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let d = Deadlines::new();
        let mut held = Vec::new();
        let mut parked = Vec::new();
        // Something far off first, so the sweeper is asleep past the parked deadlines.
        let late = Waker::from(Arc::new(Flag(AtomicBool::new(false))));
        d.arm(d.id(), 0, d.now_ms() + 30_000, &late);
        tokio::time::sleep(Duration::from_millis(20)).await;
        let at = d.now_ms() + 100;
        for _ in 0..4 {
            let client = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
            let (server, _) = l.accept().unwrap();
            server.set_nonblocking(true).unwrap();
            let flag = Arc::new(Flag(AtomicBool::new(false)));
            d.park(server.as_raw_fd(), Waker::from(flag.clone()), at)
                .unwrap();
            parked.push((server.as_raw_fd(), flag));
            held.push((client, server));
        }
        // The first and the third leave the bucket (the last ones move into their places).
        for i in [0, 2] {
            d.lot().forget(parked[i].0);
        }
        for _ in 0..300 {
            if parked[1].1.0.load(Ordering::SeqCst) && parked[3].1.0.load(Ordering::SeqCst) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let woken: Vec<bool> = parked
            .iter()
            .map(|p| p.1.0.load(Ordering::SeqCst))
            .collect();
        assert_eq!(woken, [false, true, false, true]);
        assert!(
            d.now_ms() >= at,
            "a parked keep alive must not fire before its deadline"
        );
    }

    #[tokio::test]
    async fn an_earlier_deadline_wakes_the_sleeping_sweeper() {
        let d = Deadlines::new();
        let late = Waker::from(Arc::new(Flag(AtomicBool::new(false))));
        d.arm(d.id(), 0, d.now_ms() + 30_000, &late);
        tokio::time::sleep(Duration::from_millis(20)).await;
        let soon = Arc::new(Flag(AtomicBool::new(false)));
        d.arm(d.id(), 0, d.now_ms() + 20, &Waker::from(soon.clone()));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            soon.0.load(Ordering::SeqCst),
            "the sweeper slept through an earlier deadline"
        );
    }
}
