//! Open connections, in all and per source address: a LAN peer (or a broken device in a
//! reconnect loop) cannot take every socket and descriptor the gateway has.
//!
//! Counted at accept, before any byte is read, and given back when the connection's task
//! ends; a refused connection is closed at once. Counting happens once per connection,
//! so one small lock is cheaper than anything cleverer.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::warn;

/// The connection bounds of one broker and what they refused.
#[derive(Debug)]
pub struct ConnectionLimits {
    max_total: usize,
    max_per_address: usize,
    open: Mutex<Open>,
    /// Connections refused by `max_connections`.
    pub refused_total: AtomicU64,
    /// Connections refused by `max_connections_per_address`.
    pub refused_per_address: AtomicU64,
    /// Connections closed because their CONNECT exceeded `max_connect_size`.
    pub connect_too_large: AtomicU64,
    /// Connections closed because a packet exceeded `max_packet_size`.
    pub packet_too_large: AtomicU64,
    /// Connections closed because a packet was not finished within `packet_timeout`.
    pub packet_timeouts: AtomicU64,
}

#[derive(Debug, Default)]
struct Open {
    total: usize,
    by_address: HashMap<IpAddr, u32>,
    /// When a refusal was last logged: a flood must not flood the journal too.
    last_log: Option<Instant>,
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// `max_connections` reached.
    Total,
    /// `max_connections_per_address` reached for the peer's address.
    PerAddress,
}

impl ConnectionLimits {
    /// Bounds of `max_total` connections and `max_per_address` per address (0: none).
    pub fn new(max_total: usize, max_per_address: usize) -> Arc<ConnectionLimits> {
        Arc::new(ConnectionLimits {
            max_total,
            max_per_address,
            open: Mutex::new(Open::default()),
            refused_total: AtomicU64::new(0),
            refused_per_address: AtomicU64::new(0),
            connect_too_large: AtomicU64::new(0),
            packet_too_large: AtomicU64::new(0),
            packet_timeouts: AtomicU64::new(0),
        })
    }

    /// Counts a new connection from `ip`, or refuses it (counted and logged).
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<ConnectionSlot, Refused> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let from_ip = open.by_address.get(&ip).copied().unwrap_or(0);
        let refused = if self.max_total != 0 && open.total >= self.max_total {
            Some(Refused::Total)
        } else if self.max_per_address != 0 && from_ip as usize >= self.max_per_address {
            Some(Refused::PerAddress)
        } else {
            None
        };
        if let Some(why) = refused {
            let (counter, key, max) = match why {
                Refused::Total => (&self.refused_total, "max_connections", self.max_total),
                Refused::PerAddress => (
                    &self.refused_per_address,
                    "max_connections_per_address",
                    self.max_per_address,
                ),
            };
            let n = counter.fetch_add(1, Ordering::Relaxed) + 1;
            if open
                .last_log
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(10))
            {
                open.last_log = Some(Instant::now());
                warn!(
                    peer = %ip,
                    limit = key,
                    max,
                    refused_so_far = n,
                    "connection refused: broker.{key} reached (logged at most every 10 s; \
                     $SYS/broker/limits/connections counts them)"
                );
            }
            return Err(why);
        }
        open.total += 1;
        *open.by_address.entry(ip).or_default() += 1;
        Ok(ConnectionSlot {
            limits: self.clone(),
            ip,
        })
    }

    /// Counts one bite of a per-connection bound (`connect_too_large`, ...).
    pub fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.lock().map_or(0, |o| o.total)
    }

    fn release(&self, ip: IpAddr) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.total = open.total.saturating_sub(1);
        if let Some(n) = open.by_address.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                open.by_address.remove(&ip);
            }
        }
    }
}

/// One admitted connection; dropping it gives the place back.
#[derive(Debug)]
pub struct ConnectionSlot {
    limits: Arc<ConnectionLimits>,
    ip: IpAddr,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.limits.release(self.ip);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_total_and_per_address_and_gives_places_back() {
        let l = ConnectionLimits::new(3, 2);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let a1 = l.admit(a).unwrap();
        let _a2 = l.admit(a).unwrap();
        assert_eq!(l.admit(a).unwrap_err(), Refused::PerAddress);
        let _b1 = l.admit(b).unwrap();
        assert_eq!(l.admit(b).unwrap_err(), Refused::Total);
        drop(a1);
        assert_eq!(l.open(), 2);
        let _b2 = l.admit(b).unwrap();
        assert_eq!(l.refused_total.load(Ordering::Relaxed), 1);
        assert_eq!(l.refused_per_address.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn zero_means_no_bound() {
        let l = ConnectionLimits::new(0, 0);
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let slots: Vec<_> = (0..100).map(|_| l.admit(ip).unwrap()).collect();
        assert_eq!(l.open(), 100);
        drop(slots);
        assert_eq!(l.open(), 0);
    }
}
