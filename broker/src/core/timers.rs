//! Delayed work of the core: delayed wills, session expiry, `$SYS` publishing and
//! deferred writes.
//!
//! The core owns no timer of the runtime: it says when it next needs to be woken
//! ([`Core::poll_timeout`]) and is told the time when that comes
//! ([`Core::handle_timeout`]), as quinn-proto's connection is. The task around it
//! sleeps; tests advance a fake clock instead.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Instant;

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

/// A min-heap of timers.
#[derive(Default)]
pub(crate) struct Timers {
    heap: BinaryHeap<Reverse<(Instant, Timer)>>,
}

impl Timers {
    /// Schedules `t` at `at`.
    pub(crate) fn push(&mut self, at: Instant, t: Timer) {
        self.heap.push(Reverse((at, t)));
    }

    /// The earliest deadline.
    fn next_deadline(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse((at, _))| *at)
    }

    fn pop_due(&mut self, now: Instant) -> Option<Timer> {
        if self.next_deadline()? <= now {
            self.heap.pop().map(|Reverse((_, t))| t)
        } else {
            None
        }
    }
}

impl Core {
    /// When the core next has something to do on its own: the earliest of the pending
    /// wills, session expiries, `$SYS` and deferred writes, or `None` with none pending.
    /// Call [`Core::handle_timeout`] once the clock reaches it. A deadline whose work went
    /// away (its client reconnected) stays until it passes, and then does nothing.
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
            self.timers.push(now + every, Timer::Sys);
        }
    }
}
