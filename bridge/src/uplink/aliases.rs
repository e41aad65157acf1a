//! Topic aliases towards the cloud for one network connection (MQTT 5.0, 3.3.2.3.4).
//! Sans-I/O: the session passes each PUBLISH through [`TopicAliases::apply`] just before
//! encoding it, and withdraws a mapping whose PUBLISH did not reach the wire.

use std::collections::HashMap;

use bytestring::ByteString;
use outpost_mqtt::Publish;

/// Most aliases used per connection, whatever the cloud allows: each costs a map entry,
/// and a gateway's hot topics (its sensor points) are far fewer.
const MAX_ALIASES: u16 = 256;
/// Topics whose use is counted to pick the most frequent ones; when full, the counts are
/// halved and the rarest forgotten, so the map stays bounded and old hits fade.
const MAX_COUNTED_TOPICS: usize = 4096;

/// Topic aliases towards the cloud for one network connection (MQTT 5.0, 3.3.2.3.4). A
/// topic gets an alias while one is free; once all are taken, a topic used clearly more
/// often than the least used holder takes that holder's alias. The first PUBLISH under an
/// alias carries the topic and sets the mapping; later ones carry the alias with an empty
/// topic. A new connection starts with none: mappings never carry over (MQTT-3.3.2-7).
#[derive(Debug, Default)]
pub(crate) struct TopicAliases {
    /// Aliases this connection may use: 1..=max (MQTT-3.3.2-8: never 0; MQTT-3.3.2-9:
    /// never above the Topic Alias Maximum of the CONNACK).
    max: u16,
    /// Topic held by alias `i + 1`; `None` where a mapping was withdrawn before it reached
    /// the wire.
    holders: Vec<Option<ByteString>>,
    by_topic: HashMap<ByteString, u16>,
    hits: HashMap<ByteString, u32>,
}

impl TopicAliases {
    /// Aliases for a connection whose CONNACK allowed `cloud_max` (0 on 3.1.1).
    pub(crate) fn new(cloud_max: u16) -> Self {
        TopicAliases {
            max: cloud_max.min(MAX_ALIASES),
            ..Default::default()
        }
    }

    /// Rewrites `publish` to use an alias when it should: `Some(true)` when this PUBLISH
    /// sets the mapping (topic and alias), `Some(false)` when it uses one (alias only).
    pub(crate) fn apply(&mut self, publish: &mut Publish) -> Option<bool> {
        // A topic alias that came with the message belongs to another connection.
        publish.properties.topic_alias = None;
        if self.max == 0 || publish.topic.is_empty() {
            return None;
        }
        let topic = publish.topic.clone();
        let hits = self.count(&topic);
        if let Some(&alias) = self.by_topic.get(&topic) {
            publish.properties.topic_alias = Some(alias);
            publish.topic = ByteString::new();
            return Some(false);
        }
        let slot = if let Some(free) = self.holders.iter().position(Option::is_none) {
            free
        } else if self.holders.len() < usize::from(self.max) {
            self.holders.push(None);
            self.holders.len() - 1
        } else {
            let (slot, least) = self
                .holders
                .iter()
                .enumerate()
                .map(|(i, t)| {
                    (
                        i,
                        t.as_ref()
                            .map_or(0, |t| self.hits.get(t).copied().unwrap_or(0)),
                    )
                })
                .min_by_key(|&(_, h)| h)?;
            // Only a clear winner takes an alias over: remapping costs a full topic once.
            if hits <= 2 * least + 1 {
                return None;
            }
            if let Some(old) = self.holders[slot].take() {
                self.by_topic.remove(&old);
            }
            slot
        };
        let alias = slot as u16 + 1;
        self.holders[slot] = Some(topic.clone());
        self.by_topic.insert(topic, alias);
        publish.properties.topic_alias = Some(alias);
        Some(true)
    }

    /// Withdraws the mapping a PUBLISH would have set, when it did not go out after all.
    pub(crate) fn withdraw(&mut self, topic: &ByteString) {
        if let Some(alias) = self.by_topic.remove(topic)
            && let Some(slot) = self.holders.get_mut(usize::from(alias) - 1)
        {
            *slot = None;
        }
    }

    fn count(&mut self, topic: &ByteString) -> u32 {
        if self.hits.len() >= MAX_COUNTED_TOPICS && !self.hits.contains_key(topic) {
            self.hits.retain(|_, h| {
                *h /= 2;
                *h > 0
            });
            if self.hits.len() >= MAX_COUNTED_TOPICS {
                self.hits.clear();
            }
        }
        let h = self.hits.entry(topic.clone()).or_insert(0);
        *h = h.saturating_add(1);
        *h
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;
    use outpost_mqtt::{Properties, Protocol, QoS, codec::encode_publish};

    fn reading(topic: &str) -> Publish {
        Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: ByteString::from(topic),
            packet_id: Some(1),
            properties: Properties::default(),
            payload: bytes::Bytes::from_static(br#"{"value":21.4,"unit":"C"}"#),
        }
    }

    /// Sends `topic` through `aliases`; returns (topic on the wire, alias).
    fn send(aliases: &mut TopicAliases, topic: &str) -> (String, Option<u16>) {
        let mut p = reading(topic);
        aliases.apply(&mut p);
        (p.topic.to_string(), p.properties.topic_alias)
    }

    #[test]
    fn no_alias_without_a_topic_alias_maximum_and_none_carried_in() {
        let mut a = TopicAliases::new(0);
        let mut p = reading("outpost/gw-01/sensors/boiler/temperature");
        // An alias of the local publisher's connection is meaningless upstream.
        p.properties.topic_alias = Some(7);
        assert_eq!(a.apply(&mut p), None);
        assert_eq!(p.topic, "outpost/gw-01/sensors/boiler/temperature");
        assert_eq!(p.properties.topic_alias, None);
    }

    #[test]
    fn topic_goes_once_then_only_the_alias() {
        let mut a = TopicAliases::new(10);
        let t = "outpost/gw-01/sensors/boiler/temperature";
        assert_eq!(send(&mut a, t), (t.to_string(), Some(1)));
        assert_eq!(send(&mut a, t), (String::new(), Some(1)));
        assert_eq!(
            send(&mut a, "outpost/gw-01/sensors/boiler/pressure"),
            ("outpost/gw-01/sensors/boiler/pressure".to_string(), Some(2))
        );
        assert_eq!(send(&mut a, t), (String::new(), Some(1)));
        // Smaller on the wire, which is the point.
        let (mut full, mut aliased) = (BytesMut::new(), BytesMut::new());
        encode_publish(&reading(t), Protocol::V5, &mut full).unwrap();
        let mut p = reading(t);
        a.apply(&mut p);
        encode_publish(&p, Protocol::V5, &mut aliased).unwrap();
        assert!(
            aliased.len() + t.len() - 3 <= full.len(),
            "{} vs {}",
            aliased.len(),
            full.len()
        );
    }

    #[test]
    fn aliases_stay_within_one_and_the_maximum() {
        // MQTT-3.3.2-8 (never 0) and MQTT-3.3.2-9 (never above the CONNACK's maximum).
        let mut a = TopicAliases::new(3);
        for round in 0..5 {
            for i in 0..20 {
                let (_, alias) = send(&mut a, &format!("t/{}", (i * 7 + round) % 11));
                if let Some(alias) = alias {
                    assert!((1..=3).contains(&alias), "alias {alias}");
                }
            }
        }
        assert!(TopicAliases::new(u16::MAX).max <= MAX_ALIASES);
    }

    #[test]
    fn a_frequent_topic_takes_the_alias_of_a_rare_one() {
        let mut a = TopicAliases::new(1);
        assert_eq!(send(&mut a, "rare"), ("rare".to_string(), Some(1)));
        // Full: a topic seen once does not displace the holder.
        for _ in 0..3 {
            assert_eq!(send(&mut a, "hot"), ("hot".to_string(), None));
        }
        // Seen clearly more often than the holder (more than twice, plus one): it takes
        // the alias, and its topic goes once more.
        assert_eq!(send(&mut a, "hot"), ("hot".to_string(), Some(1)));
        assert_eq!(send(&mut a, "hot"), (String::new(), Some(1)));
        // The old holder has no mapping any more: its topic goes in full.
        assert_eq!(send(&mut a, "rare"), ("rare".to_string(), None));
    }

    #[test]
    fn a_withdrawn_mapping_is_set_again_with_the_topic() {
        let mut a = TopicAliases::new(2);
        let mut p = reading("t/a");
        assert_eq!(a.apply(&mut p), Some(true));
        // The PUBLISH that carried the mapping never reached the wire.
        a.withdraw(&ByteString::from("t/a"));
        assert_eq!(send(&mut a, "t/a"), ("t/a".to_string(), Some(1)));
        assert_eq!(send(&mut a, "t/a"), (String::new(), Some(1)));
    }

    #[test]
    fn counted_topics_stay_bounded() {
        let mut a = TopicAliases::new(1);
        for i in 0..3 * MAX_COUNTED_TOPICS {
            send(&mut a, &format!("t/{i}"));
        }
        assert!(a.hits.len() <= MAX_COUNTED_TOPICS);
    }
}
