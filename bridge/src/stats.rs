//! Counters of one bridge, shared lock-free between the spool writer, the uplink and the
//! `$SYS` publisher.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering::Relaxed};

/// Live counters; all updates are relaxed atomics (they are reported, not synchronised on).
#[derive(Debug, Default)]
pub struct BridgeStats {
    /// Link to the cloud is up (CONNACK accepted).
    pub connected: AtomicBool,
    /// Rows in the spool.
    pub spool_messages: AtomicU64,
    /// Accounted bytes in the spool.
    pub spool_bytes: AtomicU64,
    /// Accept time (unix ms) of the oldest spooled row, 0 when empty.
    pub oldest_accepted_ms: AtomicI64,
    /// Messages acknowledged by the cloud (QoS 1/2) or written to it (QoS 0).
    pub forwarded: AtomicU64,
    /// Messages taken into the spool.
    pub spooled: AtomicU64,
    /// Transactions the spool committed (each one at least a page written and synced):
    /// `spooled` over this is the messages per commit that the commit window buys.
    pub spool_commits: AtomicU64,
    /// Oldest rows deleted to make room (`drop-oldest`).
    pub dropped_spool_full: AtomicU64,
    /// Messages larger than the cloud's Maximum Packet Size.
    pub dropped_too_large: AtomicU64,
    /// Messages whose Message Expiry Interval passed while spooled.
    pub dropped_expired: AtomicU64,
    /// Unspooled QoS 0 messages that could not be sent (link down or queue full).
    pub dropped_qos0: AtomicU64,
    /// Messages the cloud refused with an error reason code in PUBACK/PUBREC.
    pub dropped_refused: AtomicU64,
    /// Poison messages: the cloud dropped the link every time they were in flight; moved to
    /// the spool's dead-letter table.
    pub dropped_poison: AtomicU64,
    /// Rows in the spool's dead-letter table (kept until an operator removes them).
    pub dead_letters: AtomicU64,
    /// Offers refused because the spool is full (`reject-new`).
    pub rejected_full: AtomicU64,
    /// Offers refused because SQLite could not commit.
    pub rejected_storage: AtomicU64,
    /// Successful connections after the first one.
    pub reconnects: AtomicU64,
    /// Connection attempts that failed.
    pub connect_failures: AtomicU64,
    /// Messages the bridge may have unacknowledged now: the window sized to the link.
    pub inflight_window: AtomicU64,
    /// Spool files set aside as corrupt.
    pub quarantined: AtomicU64,
    /// When the link last went up or down (unix ms), 0 before the first attempt.
    pub link_changed_ms: AtomicI64,
    /// The last reason the link failed or dropped (kept after it comes back, for the
    /// status page); written only on those rare events.
    pub last_error: Mutex<Option<String>>,
    /// The cloud address of the current (or last) session, as configured; empty before
    /// the first connection.
    pub address: Mutex<String>,
    /// notAfter of the TLS client certificate (unix seconds); 0 when there is none.
    pub cert_not_after: AtomicI64,
}

impl BridgeStats {
    /// Add one to a counter.
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Relaxed);
    }

    /// Records why the link failed or dropped.
    pub fn set_error(&self, why: String) {
        if let Ok(mut e) = self.last_error.lock() {
            *e = Some(why);
        }
    }

    /// The last reason the link failed or dropped.
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|e| e.clone())
    }

    /// Records the address now in use.
    pub fn set_address(&self, address: &str) {
        let mut a = self.address.lock().unwrap_or_else(|e| e.into_inner());
        if *a != address {
            *a = address.to_owned();
        }
    }

    /// The address of the current (or last) session; empty before the first one.
    pub fn address(&self) -> String {
        self.address
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Whole days until the client certificate expires (negative once expired); None
    /// without a client certificate.
    pub fn cert_expires_in_days(&self, now_ms: i64) -> Option<i64> {
        let not_after = self.cert_not_after.load(Relaxed);
        (not_after != 0).then(|| (not_after - now_ms / 1000).div_euclid(86_400))
    }

    /// Counter name/value pairs as published under `$SYS/broker/bridge/{name}/`.
    pub fn snapshot(&self, now_ms: i64) -> Vec<(&'static str, String)> {
        let oldest = self.oldest_accepted_ms.load(Relaxed);
        let age = if oldest == 0 {
            0
        } else {
            (now_ms - oldest).max(0) / 1000
        };
        let g = |c: &AtomicU64| c.load(Relaxed).to_string();
        let mut out = vec![
            (
                "state",
                if self.connected.load(Relaxed) {
                    "connected"
                } else {
                    "disconnected"
                }
                .to_string(),
            ),
            ("spool/messages", g(&self.spool_messages)),
            ("spool/bytes", g(&self.spool_bytes)),
            ("spool/oldest_age_seconds", age.to_string()),
            ("spooled", g(&self.spooled)),
            ("spool/commits", g(&self.spool_commits)),
            ("forwarded", g(&self.forwarded)),
            ("dropped/spool_full", g(&self.dropped_spool_full)),
            ("dropped/too_large", g(&self.dropped_too_large)),
            ("dropped/expired", g(&self.dropped_expired)),
            ("dropped/qos0", g(&self.dropped_qos0)),
            ("dropped/refused", g(&self.dropped_refused)),
            ("dropped/poison", g(&self.dropped_poison)),
            ("spool/dead_letters", g(&self.dead_letters)),
            ("rejected/spool_full", g(&self.rejected_full)),
            ("rejected/storage", g(&self.rejected_storage)),
            ("reconnects", g(&self.reconnects)),
            ("connect_failures", g(&self.connect_failures)),
            ("inflight_window", g(&self.inflight_window)),
            ("spool/quarantined", g(&self.quarantined)),
            ("address", self.address()),
        ];
        if let Some(days) = self.cert_expires_in_days(now_ms) {
            out.push(("tls/cert_expires_in_days", days.to_string()));
        }
        out
    }
}
