//! `$SYS/broker/...`: the core publishes its statistics as retained messages.

use std::sync::atomic::Ordering;
use std::time::Instant;

use bytes::Bytes;
use outpost_mqtt::{Properties, QoS};

use super::Core;
use crate::message::Message;
use crate::session::Link;
use crate::sys::SysSnapshot;

impl Core {
    /// The statistics at `now`: what `$SYS` publishes and the HTTP side reads.
    pub(super) fn sys_snapshot(&self, now: Instant) -> SysSnapshot {
        let connected = self
            .sessions
            .values()
            .filter(|s| matches!(s.link, Some(Link::Network { .. })))
            .count();
        let store = self.store.as_ref().map(|s| s.counters());
        let load = |f: fn(&crate::store::Counters) -> &std::sync::atomic::AtomicU64| {
            store.map_or(0, |c| f(c).load(Ordering::Relaxed))
        };
        let conns = &self.settings.connections;
        SysSnapshot {
            uptime: now.duration_since(self.started),
            clients_connected: connected as u64,
            clients_total: self.sessions.len() as u64,
            subscriptions: self.tree.len() as u64,
            retained_messages: self.retained.len() as u64,
            retained_bytes: self.retained.bytes(),
            stats: self.stats.clone(),
            store_failed_writes: load(|c| &c.failed_batches),
            store_messages_written: load(|c| &c.deliveries_written),
            store_refused: load(|c| &c.refused),
            store_commits: load(|c| &c.commits),
            store_refusing: self.store.as_ref().is_some_and(|s| s.is_refusing()),
            refused_connections: conns.refused_total.load(Ordering::Relaxed),
            refused_connections_per_address: conns.refused_per_address.load(Ordering::Relaxed),
            connect_too_large: conns.connect_too_large.load(Ordering::Relaxed),
            packet_too_large: conns.packet_too_large.load(Ordering::Relaxed),
            packet_timeouts: conns.packet_timeouts.load(Ordering::Relaxed),
        }
    }

    /// Publishes the statistics as retained `$SYS` messages.
    pub(super) fn publish_sys(&mut self, now: Instant) {
        for (name, value) in self.sys_snapshot(now).entries() {
            let msg = Message::new_at(
                format!("$SYS/broker/{name}").into(),
                Bytes::from(value),
                QoS::AtMostOnce,
                true,
                Properties::default(),
                None,
                now,
            );
            // $SYS messages are not counted as received traffic nor offered to the bridge,
            // and no publisher waits for what routing them keeps.
            self.retained.update(&msg);
            let _ = self.route(&msg, now);
        }
    }
}
