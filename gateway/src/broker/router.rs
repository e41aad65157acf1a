//! The subscription tree: which sessions want a topic.
//!
//! A trie keyed by topic level, with `+` and `#` stored as ordinary children, so a
//! lookup costs one hash probe per level per wildcard branch instead of a scan over all
//! filters. Shared subscriptions (`$share/{group}/{filter}`) hang off the node of their
//! inner filter, one group per name, and each message goes to one member per group.

use std::collections::HashMap;

use outpost_mqtt::SubscriptionOptions;

/// Key of a session in the broker core.
pub type SessionKey = u64;

/// What a session asked for with one filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubEntry {
    /// Subscription options from SUBSCRIBE.
    pub options: SubscriptionOptions,
    /// 5.0 subscription identifier, if the SUBSCRIBE carried one.
    pub id: Option<u32>,
}

/// One match of a topic: a session and the options of the subscription that matched.
#[derive(Debug, Clone, Copy)]
pub struct Match {
    /// The subscribing session.
    pub session: SessionKey,
    /// The matching subscription.
    pub entry: SubEntry,
    /// True when it came through a shared subscription (delivered on its own, never
    /// merged with the session's other matches, no retained messages on subscribe).
    pub shared: bool,
}

#[derive(Default)]
struct Node {
    children: HashMap<Box<str>, Node>,
    subscribers: HashMap<SessionKey, SubEntry>,
    shared: HashMap<Box<str>, SharedGroup>,
}

#[derive(Default)]
struct SharedGroup {
    members: Vec<(SessionKey, SubEntry)>,
    next: usize,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.children.is_empty() && self.subscribers.is_empty() && self.shared.is_empty()
    }
}

/// The subscription trie.
#[derive(Default)]
pub struct SubscriptionTree {
    root: Node,
    count: usize,
}

impl SubscriptionTree {
    /// Adds or replaces a subscription; returns true if the session already had one on
    /// exactly this filter (and group), which matters for Retain Handling 1.
    pub fn insert(
        &mut self,
        filter: &str,
        group: Option<&str>,
        session: SessionKey,
        entry: SubEntry,
    ) -> bool {
        let mut node = &mut self.root;
        for level in filter.split('/') {
            node = node.children.entry(level.into()).or_default();
        }
        let existed = match group {
            None => node.subscribers.insert(session, entry).is_some(),
            Some(g) => {
                let grp = node.shared.entry(g.into()).or_default();
                if let Some(m) = grp.members.iter_mut().find(|(s, _)| *s == session) {
                    m.1 = entry;
                    true
                } else {
                    grp.members.push((session, entry));
                    false
                }
            }
        };
        if !existed {
            self.count += 1;
        }
        existed
    }

    /// Removes a subscription; returns true if it existed.
    pub fn remove(&mut self, filter: &str, group: Option<&str>, session: SessionKey) -> bool {
        let removed = remove_in(&mut self.root, Some(filter), group, session);
        if removed {
            self.count -= 1;
        }
        removed
    }

    /// Number of subscriptions in the tree.
    pub fn len(&self) -> usize {
        self.count
    }

    /// True when nobody subscribes to anything.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Collects every subscription matching `topic` into `out`. For each shared group
    /// one member is chosen round-robin, preferring members for which `online` is true.
    pub fn matches(
        &mut self,
        topic: &str,
        online: &dyn Fn(SessionKey) -> bool,
        out: &mut Vec<Match>,
    ) {
        // MQTT-4.7.2-1: wildcards at the first level do not match topics starting with '$'.
        let dollar = topic.starts_with('$');
        walk(&mut self.root, Some(topic), !dollar, online, out);
    }
}

fn walk(
    node: &mut Node,
    rest: Option<&str>,
    wildcards: bool,
    online: &dyn Fn(SessionKey) -> bool,
    out: &mut Vec<Match>,
) {
    let Some(rest) = rest else {
        collect(node, online, out);
        // "sport/#" also matches "sport" (the parent level).
        if let Some(hash) = node.children.get_mut("#") {
            collect(hash, online, out);
        }
        return;
    };
    let (level, next) = match rest.split_once('/') {
        Some((l, n)) => (l, Some(n)),
        None => (rest, None),
    };
    if wildcards {
        if let Some(hash) = node.children.get_mut("#") {
            collect(hash, online, out);
        }
        if let Some(plus) = node.children.get_mut("+") {
            walk(plus, next, true, online, out);
        }
    }
    if let Some(child) = node.children.get_mut(level) {
        walk(child, next, true, online, out);
    }
}

fn collect(node: &mut Node, online: &dyn Fn(SessionKey) -> bool, out: &mut Vec<Match>) {
    out.extend(node.subscribers.iter().map(|(&session, &entry)| Match {
        session,
        entry,
        shared: false,
    }));
    for group in node.shared.values_mut() {
        let n = group.members.len();
        if n == 0 {
            continue;
        }
        let start = group.next % n;
        let pick = (0..n)
            .map(|i| (start + i) % n)
            .find(|&i| online(group.members[i].0))
            .unwrap_or(start);
        group.next = pick + 1;
        let (session, entry) = group.members[pick];
        out.push(Match {
            session,
            entry,
            shared: true,
        });
    }
}

fn remove_in(node: &mut Node, rest: Option<&str>, group: Option<&str>, s: SessionKey) -> bool {
    let Some(rest) = rest else {
        return match group {
            None => node.subscribers.remove(&s).is_some(),
            Some(g) => {
                let Some(grp) = node.shared.get_mut(g) else {
                    return false;
                };
                let before = grp.members.len();
                grp.members.retain(|(m, _)| *m != s);
                let removed = grp.members.len() != before;
                if grp.members.is_empty() {
                    node.shared.remove(g);
                }
                removed
            }
        };
    };
    let (level, next) = match rest.split_once('/') {
        Some((l, n)) => (l, Some(n)),
        None => (rest, None),
    };
    let Some(child) = node.children.get_mut(level) else {
        return false;
    };
    let removed = remove_in(child, next, group, s);
    if child.is_empty() {
        node.children.remove(level);
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_mqtt::QoS;

    fn entry(qos: QoS) -> SubEntry {
        SubEntry {
            options: SubscriptionOptions {
                qos,
                ..Default::default()
            },
            id: None,
        }
    }

    fn sessions(t: &mut SubscriptionTree, topic: &str) -> Vec<SessionKey> {
        let mut out = Vec::new();
        t.matches(topic, &|_| true, &mut out);
        let mut v: Vec<_> = out.iter().map(|m| m.session).collect();
        v.sort();
        v
    }

    #[test]
    fn wildcards_match_per_spec_examples() {
        let mut t = SubscriptionTree::default();
        t.insert("sport/tennis/player1/#", None, 1, entry(QoS::AtMostOnce));
        t.insert("sport/+/player1", None, 2, entry(QoS::AtMostOnce));
        t.insert("+/+", None, 3, entry(QoS::AtMostOnce));
        t.insert("#", None, 4, entry(QoS::AtMostOnce));
        t.insert("/finance", None, 5, entry(QoS::AtMostOnce));
        assert_eq!(sessions(&mut t, "sport/tennis/player1"), vec![1, 2, 4]);
        assert_eq!(sessions(&mut t, "sport/tennis/player1/ranking"), vec![1, 4]);
        assert_eq!(sessions(&mut t, "/finance"), vec![3, 4, 5]);
        assert_eq!(sessions(&mut t, "a/b"), vec![3, 4]);
    }

    #[test]
    fn dollar_topics_skip_leading_wildcards() {
        // MQTT-4.7.2-1
        let mut t = SubscriptionTree::default();
        t.insert("#", None, 1, entry(QoS::AtMostOnce));
        t.insert("+/broker/uptime", None, 2, entry(QoS::AtMostOnce));
        t.insert("$SYS/#", None, 3, entry(QoS::AtMostOnce));
        assert_eq!(sessions(&mut t, "$SYS/broker/uptime"), vec![3]);
    }

    #[test]
    fn remove_prunes_and_counts() {
        let mut t = SubscriptionTree::default();
        assert!(!t.insert("a/b", None, 1, entry(QoS::AtMostOnce)));
        assert!(t.insert("a/b", None, 1, entry(QoS::AtLeastOnce)));
        assert_eq!(t.len(), 1);
        assert!(t.remove("a/b", None, 1));
        assert!(!t.remove("a/b", None, 1));
        assert!(t.is_empty());
        assert!(t.root.is_empty());
    }

    #[test]
    fn shared_groups_round_robin_and_prefer_online() {
        let mut t = SubscriptionTree::default();
        t.insert("t", Some("g"), 1, entry(QoS::AtMostOnce));
        t.insert("t", Some("g"), 2, entry(QoS::AtMostOnce));
        let picks: Vec<_> = (0..4).map(|_| sessions(&mut t, "t")[0]).collect();
        assert_eq!(picks, vec![1, 2, 1, 2]);
        let mut out = Vec::new();
        for _ in 0..3 {
            t.matches("t", &|s| s == 2, &mut out);
        }
        assert!(out.iter().all(|m| m.session == 2 && m.shared));
    }
}
