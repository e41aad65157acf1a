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
}

impl RetainedStore {
    /// Stores a retained message, or clears the topic when its payload is empty
    /// (MQTT-3.3.1-10/11).
    pub fn update(&mut self, msg: &Arc<Message>) {
        if msg.payload.is_empty() {
            self.by_topic.remove(&msg.topic);
        } else {
            // Retained messages live long: copy them out of the receive buffer they were
            // decoded from, so they do not pin a whole read chunk each.
            let mut owned = (**msg).clone();
            owned.topic = ByteString::from(&*msg.topic);
            owned.payload = bytes::Bytes::copy_from_slice(&msg.payload);
            self.by_topic.insert(owned.topic.clone(), Arc::new(owned));
        }
    }

    /// Retained messages whose topic matches `filter`, skipping expired ones.
    pub fn matching(&mut self, filter: &str, now: Instant) -> Vec<Arc<Message>> {
        self.by_topic.retain(|_, m| !m.is_expired(now));
        if !filter.contains(['+', '#']) {
            return self.by_topic.get(filter).cloned().into_iter().collect();
        }
        self.by_topic
            .values()
            .filter(|m| outpost_mqtt::topic::matches(filter, &m.topic))
            .cloned()
            .collect()
    }

    /// Number of retained messages.
    pub fn len(&self) -> usize {
        self.by_topic.len()
    }
}
