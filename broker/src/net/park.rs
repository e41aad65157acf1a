//! Where idle plain-TCP sockets wait for their next byte outside tokio.
//!
//! A socket registered with tokio costs a 256-byte `ScheduledIo` (cache-padded, in an
//! `Arc`) and its task a 256-byte task cell: two thirds of what an idle client cost.
//! A connection that has been quiet for a while hands its socket to this lot instead:
//! one `epoll` set (through mio, which tokio already uses) watched by one task, a 16-byte
//! slot per socket, and no task at all. The first byte, an item from the core or the
//! keep-alive deadline wakes the connection's `Waker`, which takes the socket back to
//! tokio and spawns its task again (`connection/driver.rs`).
//!
//! A parked connection's keep-alive deadline is kept here too, beside its slot, rather
//! than in the B-tree of running connections' deadlines (`deadlines.rs`): there an
//! entry is 24 bytes in nodes about half full (~46 bytes a client); here it is the
//! slot's 8-byte position in a wheel of one-second buckets of 4-byte slot numbers
//! (~14 bytes). The sweeper of `deadlines.rs` fires both.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::task::Waker;
use std::time::Duration;

use mio::unix::SourceFd;
use mio::{Events, Interest, Token};
use tokio::io::unix::AsyncFd;
use tokio::runtime::Handle;

/// Readiness events taken from the set per `epoll_wait`.
const EVENTS: usize = 256;
/// Parks that make a wave worth handing freed memory back to the OS for.
const TRIM_AFTER_PARKS: usize = 256;
/// How long after such a wave starts the memory is trimmed (the wave is over by then, or
/// the next wave trims again). At most one trim is pending at a time, so a long wave
/// trims once per this period however many clients it parks.
const TRIM_DELAY: Duration = Duration::from_secs(2);

static TRIM: OnceLock<fn()> = OnceLock::new();

/// Sets what hands freed heap memory back to the OS (glibc's `malloc_trim(0)`; the
/// binary owns the allocator, and this crate has no `unsafe`). It runs on a blocking
/// thread a little after a wave of [`TRIM_AFTER_PARKS`] or more parked connections: many
/// connections busy at once (a burst) leave their buffers and tasks freed in the middle
/// of the heap, where `free` alone never returns them.
pub fn set_memory_trim(trim: fn()) {
    let _ = TRIM.set(trim);
}

/// The parked sockets of one broker; the watching task starts with the first one.
#[derive(Default)]
pub struct Lot {
    shared: Mutex<Option<Arc<Shared>>>,
    /// Parks since the last memory trim was scheduled.
    parks: AtomicUsize,
    /// A trim is scheduled and has not run yet.
    trim_pending: Arc<AtomicBool>,
}

impl std::fmt::Debug for Lot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lot").finish_non_exhaustive()
    }
}

struct Shared {
    registry: mio::Registry,
    /// The runtime the parked connections go back to.
    handle: Handle,
    slots: Mutex<Slots>,
}

/// Token (the socket's fd: unique among open sockets, and dense, so the parked
/// connection needs no token of its own) -> waker of the parked connection.
#[derive(Default)]
struct Slots {
    wakers: Vec<Option<Waker>>,
    /// Token -> its keep-alive bucket (a second on the `Deadlines` clock, 0 for none)
    /// and its place in that bucket, so that a connection taken back leaves its bucket
    /// at once (a swap-remove), however many share it.
    timer: Vec<(u32, u32)>,
    /// Second -> the tokens whose keep alive runs out in it. The first bucket is the
    /// next to fire.
    wheel: BTreeMap<u32, Vec<u32>>,
}

impl Slots {
    /// Puts `token` in the bucket of second `sec`.
    fn add_timer(&mut self, token: usize, sec: u32) {
        let bucket = self.wheel.entry(sec).or_default();
        // A token is an fd, below 2^31.
        let t = u32::try_from(token).unwrap_or(u32::MAX);
        let pos = u32::try_from(bucket.len()).unwrap_or(u32::MAX);
        bucket.push(t);
        self.timer[token] = (sec, pos);
    }

    /// Takes `token` out of its bucket, if it is in one.
    fn remove_timer(&mut self, token: usize) {
        let Some(&(sec, pos)) = self.timer.get(token) else {
            return;
        };
        self.timer[token] = (0, 0);
        if sec == 0 {
            return;
        }
        let Some(bucket) = self.wheel.get_mut(&sec) else {
            return;
        };
        let pos = pos as usize;
        if bucket.get(pos).is_some_and(|&t| t as usize == token) {
            bucket.swap_remove(pos);
            if let Some(&moved) = bucket.get(pos)
                && let Some(m) = self.timer.get_mut(moved as usize)
            {
                m.1 = pos as u32;
            }
        }
        if bucket.is_empty() {
            self.wheel.remove(&sec);
        }
    }
}

/// The keep-alive bucket of a deadline (ms on the `Deadlines` clock): the second it
/// falls in, rounded up, so a bucket never fires before any of its deadlines.
fn bucket_of(due_ms: u64) -> u32 {
    u32::try_from(due_ms.div_ceil(1000)).unwrap_or(u32::MAX)
}

/// When a deadline `due` (ms on the `Deadlines` clock) given to [`Lot::watch`] fires.
pub(crate) fn fires_at(due: u64) -> u64 {
    bucket_ms(bucket_of(due))
}

/// When a bucket fires (ms on the `Deadlines` clock).
fn bucket_ms(sec: u32) -> u64 {
    u64::from(sec) * 1000
}

impl Lot {
    /// Watches `fd` for readability (data, end of stream or error) and wakes `waker`
    /// when it comes, or once `due` (ms on the `Deadlines` clock, 0 for never) has
    /// passed: [`Self::take_due`] fires it, at most a second late. A socket that is
    /// already readable wakes at once (`EPOLL_CTL_ADD` reports the current state), so no
    /// byte that came while parking is missed. [`Self::forget`] the socket before it
    /// is closed. Callers go through `Deadlines::park`, which makes sure a sweeper is
    /// awake for `due`.
    pub(crate) fn watch(&self, fd: RawFd, waker: Waker, due: u64) -> io::Result<()> {
        let token = usize::try_from(fd).map_err(io::Error::other)?;
        let shared = self.shared()?;
        {
            let mut s = lock(&shared.slots);
            if s.wakers.len() <= token {
                s.wakers.resize(token + 1, None);
                s.timer.resize(token + 1, (0, 0));
            }
            // Not watched already (a socket is forgotten before it closes and its fd is
            // reused), but if it were, its old deadline goes with its old waker.
            s.remove_timer(token);
            s.wakers[token] = Some(waker);
            if due != 0 {
                s.add_timer(token, bucket_of(due));
            }
        }
        if let Err(e) =
            shared
                .registry
                .register(&mut SourceFd(&fd), Token(token), Interest::READABLE)
        {
            release(&shared, token);
            return Err(e);
        }
        Ok(())
    }

    /// Counts a park; every [`TRIM_AFTER_PARKS`] of them schedule a memory trim.
    pub fn parked(&self) {
        if self.parks.fetch_add(1, Ordering::Relaxed) + 1 < TRIM_AFTER_PARKS
            || self.trim_pending.swap(true, Ordering::AcqRel)
        {
            return;
        }
        self.parks.store(0, Ordering::Relaxed);
        let (Some(trim), Ok(handle)) = (TRIM.get().copied(), Handle::try_current()) else {
            self.trim_pending.store(false, Ordering::Release);
            return;
        };
        let pending = self.trim_pending.clone();
        handle.spawn(async move {
            tokio::time::sleep(TRIM_DELAY).await;
            let _ = tokio::task::spawn_blocking(trim).await;
            pending.store(false, Ordering::Release);
        });
    }

    /// Adds to `out` the wakers of the parked connections whose keep alive ran out by
    /// `now` (ms on the `Deadlines` clock); returns when the next one does.
    pub(crate) fn take_due(&self, now: u64, out: &mut Vec<Waker>) -> Option<u64> {
        let shared = lock(&self.shared).clone()?;
        let mut s = lock(&shared.slots);
        while let Some(entry) = s.wheel.first_entry() {
            if bucket_ms(*entry.key()) > now {
                return Some(bucket_ms(*entry.key()));
            }
            for t in entry.remove() {
                let t = t as usize;
                s.timer[t] = (0, 0);
                if let Some(Some(w)) = s.wakers.get(t) {
                    out.push(w.clone());
                }
            }
        }
        None
    }

    /// The runtime parked connections resume on (once the lot is in use).
    pub fn handle(&self) -> Option<Handle> {
        lock(&self.shared).as_ref().map(|s| s.handle.clone())
    }

    /// Stops watching `fd` (its connection is taking it back).
    pub fn forget(&self, fd: RawFd) {
        let Some(shared) = lock(&self.shared).clone() else {
            return;
        };
        // Fails only if the socket is no longer in the set, which is what we want.
        let _ = shared.registry.deregister(&mut SourceFd(&fd));
        if let Ok(token) = usize::try_from(fd) {
            release(&shared, token);
        }
    }

    /// The shared set, made (with its watching task) on first use.
    fn shared(&self) -> io::Result<Arc<Shared>> {
        let mut slot = lock(&self.shared);
        if let Some(s) = slot.as_ref() {
            return Ok(s.clone());
        }
        let handle = Handle::try_current().map_err(io::Error::other)?;
        let poll = mio::Poll::new()?;
        let shared = Arc::new(Shared {
            registry: poll.registry().try_clone()?,
            handle: handle.clone(),
            slots: Mutex::new(Slots::default()),
        });
        let fd = {
            let _enter = handle.enter();
            // Deprecated because a caller could hand in a value whose fd closes or changes
            // while registered; `mio::Poll` owns its epoll fd for its whole life and
            // always returns that one, which is what the replacement's `unsafe`
            // contract asks (this crate forbids `unsafe`).
            #[allow(deprecated)]
            AsyncFd::with_interest(poll, tokio::io::Interest::READABLE)?
        };
        handle.spawn(watch(fd, Arc::downgrade(&shared)));
        *slot = Some(shared.clone());
        Ok(shared)
    }
}

fn release(shared: &Shared, token: usize) {
    let mut s = lock(&shared.slots);
    if let Some(w) = s.wakers.get_mut(token)
        && w.take().is_some()
    {
        s.remove_timer(token);
    }
}

/// The watching task: wakes the connection of every socket that became readable.
/// Ends when the broker (its `Lot`) is gone.
async fn watch(mut fd: AsyncFd<mio::Poll>, shared: Weak<Shared>) {
    let mut events = Events::with_capacity(EVENTS);
    let mut due = Vec::new();
    loop {
        let Ok(mut guard) = fd.readable_mut().await else {
            return;
        };
        loop {
            if let Err(e) = guard
                .get_inner_mut()
                .poll(&mut events, Some(Duration::ZERO))
                && e.kind() != io::ErrorKind::Interrupted
            {
                tracing::error!(error = %e, "parked sockets: epoll_wait failed");
                return;
            }
            let Some(s) = shared.upgrade() else {
                return;
            };
            let mut n = 0;
            {
                let slots = lock(&s.slots);
                for e in events.iter() {
                    n += 1;
                    if let Some(Some(w)) = slots.wakers.get(e.token().0) {
                        due.push(w.clone());
                    }
                }
            }
            // Woken outside the lock: waking takes the socket out of the set.
            for w in due.drain(..) {
                w.wake();
            }
            if n < EVENTS {
                break;
            }
        }
        guard.clear_ready();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every critical section leaves the slots consistent, so a poisoned lock is usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Wake;

    use super::*;

    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[tokio::test]
    async fn wakes_on_data_and_not_after_forget() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (server, _) = l.accept().unwrap();
        server.set_nonblocking(true).unwrap();
        let lot = Lot::default();
        let count = Arc::new(Count(AtomicUsize::new(0)));
        lot.watch(server.as_raw_fd(), Waker::from(count.clone()), 0)
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(count.0.load(Ordering::SeqCst), 0, "woken without data");
        client.write_all(b"x").unwrap();
        for _ in 0..100 {
            if count.0.load(Ordering::SeqCst) > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(count.0.load(Ordering::SeqCst), 1, "data must wake once");
        lot.forget(server.as_raw_fd());
        client.write_all(b"y").unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(count.0.load(Ordering::SeqCst), 1, "forgotten socket woke");
    }

    #[tokio::test]
    async fn a_socket_readable_before_parking_wakes_at_once() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (server, _) = l.accept().unwrap();
        server.set_nonblocking(true).unwrap();
        client.write_all(b"early").unwrap();
        drop(client);
        tokio::time::sleep(Duration::from_millis(20)).await;
        let lot = Lot::default();
        let count = Arc::new(Count(AtomicUsize::new(0)));
        lot.watch(server.as_raw_fd(), Waker::from(count.clone()), 0)
            .unwrap();
        for _ in 0..100 {
            if count.0.load(Ordering::SeqCst) > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
    }
}
