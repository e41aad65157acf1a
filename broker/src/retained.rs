//! Retained messages: the last retained message per topic, replayed on subscribe.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use bytestring::ByteString;

use super::message::Message;

/// Retained messages by topic.
#[derive(Default)]
pub struct RetainedStore {
    by_topic: HashMap<ByteString, Arc<Message>>,
    /// Payload bytes of every retained message.
    bytes: u64,
    /// Topics whose message expired since [`Self::take_expired`] was last called: their
    /// rows in the broker's store go too, or the file would keep every expired message
    /// until a restart, past the limits that bound the messages kept in memory.
    expired: Vec<ByteString>,
}

/// How many retained messages, and how many payload bytes, the store may hold (0: any).
#[derive(Debug, Clone, Copy)]
pub struct RetainedLimits {
    /// Topics.
    pub messages: usize,
    /// Payload bytes.
    pub bytes: u64,
}

impl RetainedStore {
    /// Stores a retained message, or clears the topic when its payload is empty
    /// (MQTT-3.3.1-10/11).
    pub fn update(&mut self, msg: &Arc<Message>) {
        if let Some(old) = self.by_topic.get(&msg.topic) {
            self.bytes -= old.payload.len() as u64;
        }
        if msg.payload.is_empty() {
            self.by_topic.remove(&msg.topic);
        } else {
            self.bytes += msg.payload.len() as u64;
            // Retained messages live long: copy them out of the receive buffer they were
            // decoded from, so they do not pin a whole read chunk each.
            let mut owned = (**msg).clone();
            owned.topic = ByteString::from(&*msg.topic);
            owned.payload = bytes::Bytes::copy_from_slice(&msg.payload);
            self.by_topic.insert(owned.topic.clone(), Arc::new(owned));
        }
    }

    /// Takes back a retained message read from the store: it owns its bytes already (one
    /// allocation per message), so unlike [`Self::update`] it is not copied again; a
    /// restart with a full store would otherwise hold every payload twice at its peak.
    pub fn restore(&mut self, msg: Arc<Message>) {
        if msg.payload.is_empty() {
            return;
        }
        if let Some(old) = self.by_topic.insert(msg.topic.clone(), msg.clone()) {
            self.bytes -= old.payload.len() as u64;
        }
        self.bytes += msg.payload.len() as u64;
    }

    /// Retained messages whose topic matches `filter`, skipping expired ones.
    pub fn matching(&mut self, filter: &str, now: Instant) -> Vec<Arc<Message>> {
        self.remove_expired(now);
        if !filter.contains(['+', '#']) {
            return self.by_topic.get(filter).cloned().into_iter().collect();
        }
        self.by_topic
            .values()
            .filter(|m| outpost_mqtt::topic::matches(filter, &m.topic))
            .cloned()
            .collect()
    }

    /// Drops the messages whose Message Expiry Interval has passed (MQTT-3.3.2-5), and
    /// their bytes with them: `fits` counts `bytes`, so a byte left behind would be
    /// room refused to every later retained message until a restart.
    /// Their topics wait in [`Self::take_expired`].
    pub fn remove_expired(&mut self, now: Instant) {
        let (bytes, expired) = (&mut self.bytes, &mut self.expired);
        self.by_topic.retain(|topic, m| {
            let gone = m.is_expired(now);
            if gone {
                *bytes -= m.payload.len() as u64;
                expired.push(topic.clone());
            }
            !gone
        });
    }

    /// The topics whose message expired since the last call, for the store to forget.
    pub fn take_expired(&mut self) -> Vec<ByteString> {
        std::mem::take(&mut self.expired)
    }

    /// [`Self::fits`], after dropping expired messages if the store looks full: only
    /// then, so a store with room is not scanned on every retained publish.
    pub fn fits_at(
        &mut self,
        topic: &str,
        payload_len: usize,
        limits: RetainedLimits,
        now: Instant,
    ) -> bool {
        if self.fits(topic, payload_len, limits) {
            return true;
        }
        self.remove_expired(now);
        self.fits(topic, payload_len, limits)
    }

    /// Number of retained messages.
    pub fn len(&self) -> usize {
        self.by_topic.len()
    }

    /// Payload bytes of all retained messages.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Whether retaining `msg` keeps the store within `limits`: clearing a topic always
    /// does, replacing one counts only the difference.
    pub fn fits(&self, topic: &str, payload_len: usize, limits: RetainedLimits) -> bool {
        if payload_len == 0 {
            return true;
        }
        let old = self.by_topic.get(topic);
        let count = self.by_topic.len() + usize::from(old.is_none());
        let bytes = self.bytes - old.map_or(0, |m| m.payload.len() as u64) + payload_len as u64;
        (limits.messages == 0 || count <= limits.messages)
            && (limits.bytes == 0 || bytes <= limits.bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use outpost_mqtt::{Properties, QoS};

    fn msg(topic: &str, payload: &'static [u8]) -> Arc<Message> {
        Message::new(
            topic.into(),
            Bytes::from_static(payload),
            QoS::AtMostOnce,
            true,
            Properties::default(),
            None,
        )
    }

    #[test]
    fn limits_count_topics_and_bytes_and_replacing_counts_the_difference() {
        let limits = RetainedLimits {
            messages: 2,
            bytes: 10,
        };
        let mut r = RetainedStore::default();
        for m in [msg("a", b"12345"), msg("b", b"123")] {
            assert!(r.fits(&m.topic, m.payload.len(), limits));
            r.update(&m);
        }
        assert_eq!((r.len(), r.bytes()), (2, 8));
        assert!(!r.fits("c", 1, limits), "a third topic");
        assert!(r.fits("a", 7, limits), "8 - 5 + 7 = 10 bytes");
        assert!(!r.fits("a", 8, limits), "11 bytes");
        assert!(r.fits("c", 0, limits), "clearing always fits");
        r.update(&msg("a", b""));
        assert_eq!((r.len(), r.bytes()), (1, 3));
        assert!(r.fits("c", 7, limits));
    }

    fn expiring(topic: &str, payload: &'static [u8], secs: u32, now: Instant) -> Arc<Message> {
        let props = Properties {
            message_expiry_interval: Some(secs),
            ..Properties::default()
        };
        Message::new_at(
            topic.into(),
            Bytes::from_static(payload),
            QoS::AtMostOnce,
            true,
            props,
            None,
            now,
        )
    }

    #[test]
    fn expired_messages_give_back_their_bytes_and_room_for_new_ones() {
        // MQTT-3.3.2-5: once its Message Expiry Interval has passed, a retained message
        // is no longer delivered; it must stop taking room too.
        let limits = RetainedLimits {
            messages: 4,
            bytes: 20,
        };
        let t0 = Instant::now();
        let mut r = RetainedStore::default();
        for topic in ["a", "b", "c", "d"] {
            let m = expiring(topic, b"12345", 10, t0);
            assert!(r.fits_at(&m.topic, m.payload.len(), limits, t0));
            r.update(&m);
        }
        assert_eq!((r.len(), r.bytes()), (4, 20));
        assert!(!r.fits_at("e", 1, limits, t0), "full before expiry");

        // Expired, then dropped by a subscribe's look-up.
        let later = t0 + std::time::Duration::from_secs(10);
        assert!(r.matching("#", later).is_empty());
        assert_eq!((r.len(), r.bytes()), (0, 0), "expiry gave its bytes back");
        for topic in ["e", "f", "g", "h"] {
            let m = msg(topic, b"12345");
            assert!(
                r.fits_at(&m.topic, m.payload.len(), limits, later),
                "{topic}"
            );
            r.update(&m);
        }
        assert_eq!((r.len(), r.bytes()), (4, 20));
    }

    #[test]
    fn a_full_store_of_expired_messages_makes_room_for_a_new_one_without_a_subscribe() {
        let limits = RetainedLimits {
            messages: 0,
            bytes: 10,
        };
        let t0 = Instant::now();
        let mut r = RetainedStore::default();
        r.update(&expiring("a", b"12345", 1, t0));
        r.update(&msg("b", b"12345"));
        let later = t0 + std::time::Duration::from_secs(1);
        assert!(
            r.fits_at("c", 5, limits, later),
            "the expired one made room"
        );
        assert_eq!((r.len(), r.bytes()), (1, 5));
        assert!(
            !r.fits_at("c", 6, limits, later),
            "the live one stays counted"
        );
    }
}
