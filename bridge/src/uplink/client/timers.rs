//! The client's timers as a table, in the style of quinn-proto's `timer.rs`: each timer
//! is an entry holding when it next fires. The driver sleeps until
//! [`Client::poll_timeout`](super::Client::poll_timeout) and then calls
//! [`Client::handle_timeout`](super::Client::handle_timeout), so the keep-alive, the
//! replay rate and the goodbye are tested on a clock the tests move.
//!
//! Keep alive, from the client's side. The client must make sure no more than the Keep
//! Alive interval passes between the control packets it sends and, with nothing else to
//! send, send a PINGREQ (MQTT-3.1.2-23 in 3.1.1, MQTT-3.1.2-20 in 5.0). A client that
//! gets no PINGRESP "within a reasonable amount of time" after its PINGREQ should close
//! the connection (section 3.1.2.10 in both versions); we take the server's
//! own limit for a silent client as that time: one and a half Keep Alive intervals
//! without any packet from the cloud (MQTT-3.1.2-24 in 3.1.1, MQTT-3.1.2-22 in 5.0).
//! A half-open link (the cloud gone without a FIN, common on cellular) is noticed then.

use std::time::{Duration, Instant};

use outpost_mqtt::Packet;

use super::{Client, SessionEnd, lost};

/// How long the goodbye waits for the cloud to acknowledge the clean offline status.
pub(super) const GOODBYE_TIMEOUT: Duration = Duration::from_secs(5);

/// One of the client's timers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Timer {
    /// Nothing came from the cloud for one and a half Keep Alive intervals: the link is
    /// dead. First, so a dead link is not pinged.
    Idle,
    /// The link was quiet for one Keep Alive interval: a PINGREQ is due.
    KeepAlive,
    /// The replay rate lets the next row from before the session go.
    Replay,
    /// The cloud did not acknowledge the clean offline status in time.
    Goodbye,
}

impl Timer {
    /// Every timer, in the order expired ones are handled.
    const VALUES: [Timer; 4] = [Timer::Idle, Timer::KeepAlive, Timer::Replay, Timer::Goodbye];
}

/// When each timer fires next (`None`: stopped).
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct TimerTable {
    data: [Option<Instant>; Timer::VALUES.len()],
}

impl TimerTable {
    /// Fires `timer` at `time` (instead of when it was set for).
    pub(super) fn set(&mut self, timer: Timer, time: Instant) {
        self.data[timer as usize] = Some(time);
    }

    /// When `timer` fires, if it is set.
    pub(super) fn get(&self, timer: Timer) -> Option<Instant> {
        self.data[timer as usize]
    }

    /// Stops `timer`.
    pub(super) fn stop(&mut self, timer: Timer) {
        self.data[timer as usize] = None;
    }

    /// The earliest time a timer fires.
    pub(super) fn next_timeout(&self) -> Option<Instant> {
        self.data.iter().flatten().min().copied()
    }

    /// `timer` is set for `now` or earlier.
    fn is_expired(&self, timer: Timer, now: Instant) -> bool {
        self.data[timer as usize].is_some_and(|t| t <= now)
    }
}

impl Client<'_> {
    /// Handles the timers due at `now`, each once, then sets the keep-alive ones again.
    pub(super) fn expire_timers(&mut self, now: Instant) -> Result<(), SessionEnd> {
        for timer in Timer::VALUES {
            if !self.timers.is_expired(timer, now) {
                continue;
            }
            self.timers.stop(timer);
            match timer {
                Timer::Idle => {
                    return Err(lost(
                        "keep alive timeout: no packet from the cloud (half-open link?)",
                    ));
                }
                Timer::KeepAlive => {
                    if !self.ping_out {
                        self.ping_out = true;
                        self.encode(&Packet::PingReq)?;
                    }
                }
                // The next fill lets the row go.
                Timer::Replay => {}
                Timer::Goodbye => {
                    self.goodbye_timed_out = true;
                    tracing::warn!(bridge = %self.setup.name,
                        "cloud did not acknowledge the offline status in time");
                }
            }
        }
        self.arm_keep_alive();
        Ok(())
    }

    /// Sets the keep-alive timers from the last traffic each way: a PINGREQ one interval
    /// after the older of the last packet sent and the last received (unless one is out),
    /// the link dead one and a half intervals after the last received. Called whenever
    /// either moves or a PINGREQ goes or is answered. Off with Keep Alive 0, and during the
    /// goodbye, which has its own, shorter, deadline.
    pub(super) fn arm_keep_alive(&mut self) {
        let ka = self.limits.keep_alive;
        if ka.is_zero() || self.goodbye_pid.is_some() {
            self.timers.stop(Timer::KeepAlive);
            self.timers.stop(Timer::Idle);
            return;
        }
        match (!self.ping_out)
            .then(|| self.last_sent.min(self.last_recv).checked_add(ka))
            .flatten()
        {
            Some(at) => self.timers.set(Timer::KeepAlive, at),
            None => self.timers.stop(Timer::KeepAlive),
        }
        match self.last_recv.checked_add(ka + ka / 2) {
            Some(at) => self.timers.set(Timer::Idle, at),
            None => self.timers.stop(Timer::Idle),
        }
    }
}
