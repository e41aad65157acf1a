//! Delayed work of the core: delayed wills, session expiry, `$SYS` publishing and
//! deferred writes.
//!
//! The core owns no timer of the runtime: it says when it next needs to be woken
//! ([`Core::poll_timeout`]) and is told the time when that comes
//! ([`Core::handle_timeout`]), as quinn-proto's connection is. The task around it
//! sleeps; tests advance a fake clock instead.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use super::Core;
use crate::subscriptions::SessionKey;

/// Something due at a point in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Timer {
    /// Publish the will of a disconnected session if it has not reconnected.
    Will {
        /// The session.
        key: SessionKey,
        /// Session generation at disconnect; a reconnect makes it stale.
        generation: u32,
    },
    /// End a disconnected session whose expiry interval has passed.
    Expire {
        /// The session.
        key: SessionKey,
        /// Session generation at disconnect.
        generation: u32,
    },
    /// Publish `$SYS` statistics.
    Sys,
    /// Write deliveries to persistent sessions that are still unacknowledged.
    Deferred,
}

impl Timer {
    /// The session and kind a will or expiry timer is for: a session has at most one
    /// pending timer of each kind, the one set at its last disconnect.
    fn slot(&self) -> Option<(SessionKey, SessionTimer)> {
        match *self {
            Timer::Will { key, .. } => Some((key, SessionTimer::Will)),
            Timer::Expire { key, .. } => Some((key, SessionTimer::Expire)),
            Timer::Sys | Timer::Deferred => None,
        }
    }
}

/// The kinds of timer a session has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum SessionTimer {
    Will,
    Expire,
}

/// Pending timers in deadline order. A session's will and expiry timers are replaced
/// when set again and dropped when the session reconnects or ends: left to fall due,
/// a client reconnecting in a loop would grow the queue by one or two entries per
/// reconnect for as long as its session expiry (days).
#[derive(Default)]
pub(crate) struct Timers {
    /// Every pending timer; a set rather than a heap so one can be taken out.
    queue: BTreeSet<(Instant, Timer)>,
    /// The queued entry of each session's will and expiry timer.
    by_session: HashMap<(SessionKey, SessionTimer), (Instant, Timer)>,
}

impl Timers {
    /// Schedules `t` at `at`, replacing the session's pending timer of the same kind.
    pub(crate) fn push(&mut self, at: Instant, t: Timer) {
        if let Some(slot) = t.slot()
            && let Some(old) = self.by_session.insert(slot, (at, t))
        {
            self.queue.remove(&old);
        }
        self.queue.insert((at, t));
    }

    /// Schedules `t` at `after` past `now`. A deadline past what the clock can hold is
    /// never reached, so it is not scheduled: `Instant + Duration` would panic.
    pub(crate) fn push_after(&mut self, now: Instant, after: Duration, t: Timer) {
        if let Some(at) = now.checked_add(after) {
            self.push(at, t);
        }
    }

    /// Drops the session's pending will and expiry timers: it reconnected or ended, so
    /// they would do nothing when due.
    pub(crate) fn cancel_session(&mut self, key: SessionKey) {
        for kind in [SessionTimer::Will, SessionTimer::Expire] {
            if let Some(old) = self.by_session.remove(&(key, kind)) {
                self.queue.remove(&old);
            }
        }
    }

    /// Timers pending.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.queue.len()
    }

    /// The earliest deadline.
    fn next_deadline(&self) -> Option<Instant> {
        self.queue.first().map(|(at, _)| *at)
    }

    fn pop_due(&mut self, now: Instant) -> Option<Timer> {
        if self.next_deadline()? > now {
            return None;
        }
        let (_, t) = self.queue.pop_first()?;
        if let Some(slot) = t.slot() {
            self.by_session.remove(&slot);
        }
        Some(t)
    }
}

impl Core {
    /// When the core next has something to do on its own: the earliest of the pending
    /// wills, session expiries, `$SYS` and deferred writes, or `None` with none pending.
    /// Call [`Core::handle_timeout`] once the clock reaches it.
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        self.timers.next_deadline()
    }

    /// Does everything due at `now`: publishes delayed wills, ends expired sessions,
    /// publishes `$SYS`, writes deferred deliveries.
    pub(crate) fn handle_timeout(&mut self, now: Instant) {
        // Bounded: only timers already due are handled; new ones land in the future.
        while let Some(t) = self.timers.pop_due(now) {
            match t {
                Timer::Will { key, generation } => {
                    if let Some(s) = self.sessions.get_mut(key)
                        && s.generation == generation
                        && s.link.is_none()
                        && let Some(w) = s.will.take()
                    {
                        self.publish_will(key, w, now);
                    }
                }
                Timer::Expire { key, generation } => {
                    if self
                        .sessions
                        .get(key)
                        .is_some_and(|s| s.generation == generation && s.link.is_none())
                    {
                        // A will still pending is due when the session ends.
                        if let Some(w) = self.sessions.get_mut(key).and_then(|s| s.will.take()) {
                            self.publish_will(key, w, now);
                        }
                        self.end_session(key);
                    }
                }
                Timer::Sys => {
                    self.publish_sys(now);
                    self.schedule_sys(now);
                }
                Timer::Deferred => self.flush_deferred(now, false),
            }
        }
    }

    /// Schedules the next `$SYS` publication, one interval after `now`.
    pub(super) fn schedule_sys(&mut self, now: Instant) {
        let every = self.settings.sys_interval;
        if !every.is_zero() {
            self.timers.push_after(now, every, Timer::Sys);
        }
    }
}
