//! `$SYS/broker/...`: the core publishes its statistics as retained messages.

use std::sync::atomic::Ordering;
use std::time::Instant;

use bytes::Bytes;
use outpost_mqtt::{Properties, QoS};

use super::Core;
use crate::message::Message;
use crate::session::Link;

impl Core {
    /// Publishes the statistics as retained `$SYS` messages.
    pub(super) fn publish_sys(&mut self, now: Instant) {
        let connected = self
            .sessions
            .values()
            .filter(|s| matches!(s.link, Some(Link::Network { .. })))
            .count();
        let st = self.stats.clone();
        let (failed_writes, written) = self.store.as_ref().map_or((0, 0), |s| {
            let c = s.counters();
            (
                c.failed_batches.load(Ordering::Relaxed),
                c.deliveries_written.load(Ordering::Relaxed),
            )
        });
        let conns = &self.settings.connections;
        let entries = [
            ("version", format!("outpost {}", env!("CARGO_PKG_VERSION"))),
            (
                "uptime",
                format!("{} seconds", now.duration_since(self.started).as_secs()),
            ),
            ("clients/connected", connected.to_string()),
            ("clients/total", self.sessions.len().to_string()),
            ("subscriptions/count", self.tree.len().to_string()),
            ("retained messages/count", self.retained.len().to_string()),
            ("messages/received", st.messages_received.to_string()),
            ("messages/sent", st.messages_sent.to_string()),
            ("load/bytes/received", st.bytes_received.to_string()),
            (
                "messages/dropped/queue_full",
                st.dropped_queue_full.to_string(),
            ),
            (
                "messages/dropped/slow_client",
                st.dropped_slow_client.to_string(),
            ),
            ("messages/dropped/local", st.dropped_local.to_string()),
            (
                "messages/dropped/too_large",
                st.dropped_too_large.to_string(),
            ),
            // Batches the broker store could not write (disk full, failing card): what
            // they held is kept in memory only.
            ("store/failed_writes", failed_writes.to_string()),
            // Messages owed to persistent sessions that had to be written (queued, or
            // unacknowledged past the grace period): what persistence costs the disk.
            ("store/messages_written", written.to_string()),
            ("retained messages/bytes", self.retained.bytes().to_string()),
            // What the configured bounds refused (broker.max_*), one counter per bound.
            ("limits/topic_levels", st.limits.topic_levels.to_string()),
            ("limits/sessions", st.limits.sessions.to_string()),
            ("limits/subscriptions", st.limits.subscriptions.to_string()),
            ("limits/retained", st.limits.retained.to_string()),
            ("limits/queued_bytes", st.limits.queued_bytes.to_string()),
            (
                "limits/connections",
                conns.refused_total.load(Ordering::Relaxed).to_string(),
            ),
            (
                "limits/connections_per_address",
                conns
                    .refused_per_address
                    .load(Ordering::Relaxed)
                    .to_string(),
            ),
            (
                "limits/connect_size",
                conns.connect_too_large.load(Ordering::Relaxed).to_string(),
            ),
            (
                "limits/packet_size",
                conns.packet_too_large.load(Ordering::Relaxed).to_string(),
            ),
            (
                "limits/packet_timeout",
                conns.packet_timeouts.load(Ordering::Relaxed).to_string(),
            ),
            // Messages the store refused (full disk or broker.max_store_size).
            (
                "store/refused",
                self.store
                    .as_ref()
                    .map_or(0, |s| s.counters().refused.load(Ordering::Relaxed))
                    .to_string(),
            ),
            // Set while the broker store cannot write and refuses what it would keep.
            (
                "store/refusing",
                u8::from(self.store.as_ref().is_some_and(|s| s.is_refusing())).to_string(),
            ),
        ];
        for (name, value) in entries {
            let msg = Message::new(
                format!("$SYS/broker/{name}").into(),
                Bytes::from(value),
                QoS::AtMostOnce,
                true,
                Properties::default(),
                None,
            );
            // $SYS messages are not counted as received traffic nor offered to the bridge.
            self.retained.update(&msg);
            let _ = self.route(&msg);
        }
    }
}
