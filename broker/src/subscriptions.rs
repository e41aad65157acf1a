//! The subscription tree: which sessions want a topic.
//!
//! A trie keyed by topic level, with `+` and `#` stored as ordinary children, so a
//! lookup costs one hash probe per level per wildcard branch instead of a scan over all
//! filters. Shared subscriptions (`$share/{group}/{filter}`) hang off the node of their
//! inner filter, one group per name, and each message goes to one member per group.

use std::cell::Cell;
use std::collections::HashMap;

use outpost_mqtt::SubscriptionOptions;

/// Key of a session in the broker core: a slot of the core's session table and the
/// generation of that slot, so a key that outlived its session finds nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SessionKey(u64);

impl SessionKey {
    /// The key of the session in slot `index` at `generation`.
    pub fn new(generation: u32, index: u32) -> SessionKey {
        SessionKey((u64::from(generation) << 32) | u64::from(index))
    }

    /// The slot of the session table.
    pub fn index(self) -> u32 {
        self.0 as u32
    }

    /// The generation of the slot the key was made for.
    pub fn generation(self) -> u32 {
        (self.0 >> 32) as u32
    }
}

impl std::fmt::Display for SessionKey {
    /// The key as one number (`generation << 32 | index`), as logs and the names of
    /// in-process subscribers show it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

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
    /// Round-robin position; a `Cell` so a lookup can walk the tree by shared reference.
    next: Cell<usize>,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.children.is_empty() && self.subscribers.is_empty() && self.shared.is_empty()
    }

    /// True when the node must stay even if the one child on a removal's path goes.
    fn holds_more_than_the_path(&self) -> bool {
        self.children.len() > 1 || !self.subscribers.is_empty() || !self.shared.is_empty()
    }
}

impl Drop for Node {
    // The derived drop recurses once per level, and a client chooses the depth: a filter
    // of 30,000 levels overflowed the stack when its subscription went. Children are
    // taken apart here on a heap stack, so every node drops with no children left.
    fn drop(&mut self) {
        if self.children.is_empty() {
            return;
        }
        let mut stack: Vec<Node> = self.children.drain().map(|(_, n)| n).collect();
        while let Some(mut n) = stack.pop() {
            stack.extend(n.children.drain().map(|(_, c)| c));
        }
    }
}

/// The subscription trie. No operation recurses: the depth of the tree is as deep as the
/// deepest filter a client sent (bounded by `max_topic_levels`, but the tree must not
/// depend on that to stay safe).
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

    /// Removes a subscription; returns true if it existed. Nodes left empty are pruned.
    pub fn remove(&mut self, filter: &str, group: Option<&str>, session: SessionKey) -> bool {
        // First pass, read only: is the filter's node there, and which is the deepest
        // node on the path that has to stay whatever happens below it?
        let mut keep_depth = 0;
        let mut node = &self.root;
        for (depth, level) in filter.split('/').enumerate() {
            if depth > 0 && node.holds_more_than_the_path() {
                keep_depth = depth;
            }
            match node.children.get(level) {
                Some(child) => node = child,
                None => return false,
            }
        }
        // Second pass: take the entry out of the filter's node.
        let mut node = &mut self.root;
        for level in filter.split('/') {
            node = node
                .children
                .get_mut(level)
                .expect("found on the first pass");
        }
        let removed = match group {
            None => node.subscribers.remove(&session).is_some(),
            Some(g) => match node.shared.get_mut(g) {
                None => false,
                Some(grp) => {
                    let before = grp.members.len();
                    grp.members.retain(|(m, _)| *m != session);
                    let removed = grp.members.len() != before;
                    if grp.members.is_empty() {
                        node.shared.remove(g);
                    }
                    removed
                }
            },
        };
        if !removed {
            return false;
        }
        self.count -= 1;
        // Third pass: the filter's node is empty now, and so is every node between it and
        // `keep_depth` but for the path itself: cut the path below that node.
        if node.is_empty() {
            let mut node = &mut self.root;
            let mut levels = filter.split('/');
            for _ in 0..keep_depth {
                let level = levels.next().expect("within the filter");
                node = node
                    .children
                    .get_mut(level)
                    .expect("found on the first pass");
            }
            if let Some(level) = levels.next() {
                node.children.remove(level);
            }
        }
        true
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
    pub fn matches(&self, topic: &str, online: &dyn Fn(SessionKey) -> bool, out: &mut Vec<Match>) {
        // MQTT-4.7.2-1: wildcards at the first level do not match topics starting with '$'.
        let dollar = topic.starts_with('$');
        // Nodes still to visit, with what is left of the topic below them (`None` once
        // every level is consumed) and whether wildcards may match at the next level.
        let mut stack: Vec<(&Node, Option<&str>, bool)> = vec![(&self.root, Some(topic), !dollar)];
        while let Some((node, rest, wildcards)) = stack.pop() {
            let Some(rest) = rest else {
                collect(node, online, out);
                // "sport/#" also matches "sport" (the parent level).
                if let Some(hash) = node.children.get("#") {
                    collect(hash, online, out);
                }
                continue;
            };
            let (level, next) = match rest.split_once('/') {
                Some((l, n)) => (l, Some(n)),
                None => (rest, None),
            };
            if wildcards {
                if let Some(hash) = node.children.get("#") {
                    collect(hash, online, out);
                }
                if let Some(plus) = node.children.get("+") {
                    stack.push((plus, next, true));
                }
            }
            if let Some(child) = node.children.get(level) {
                stack.push((child, next, true));
            }
        }
    }
}

fn collect(node: &Node, online: &dyn Fn(SessionKey) -> bool, out: &mut Vec<Match>) {
    out.extend(node.subscribers.iter().map(|(&session, &entry)| Match {
        session,
        entry,
        shared: false,
    }));
    for group in node.shared.values() {
        let n = group.members.len();
        if n == 0 {
            continue;
        }
        let start = group.next.get() % n;
        let pick = (0..n)
            .map(|i| (start + i) % n)
            .find(|&i| online(group.members[i].0))
            .unwrap_or(start);
        group.next.set(pick + 1);
        let (session, entry) = group.members[pick];
        out.push(Match {
            session,
            entry,
            shared: true,
        });
    }
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

    /// The key of test session `n`.
    fn k(n: u32) -> SessionKey {
        SessionKey::new(0, n)
    }

    /// The test sessions (`n` of [`k`]) that `topic` reaches, in order.
    fn sessions(t: &mut SubscriptionTree, topic: &str) -> Vec<u32> {
        let mut out = Vec::new();
        t.matches(topic, &|_| true, &mut out);
        let mut v: Vec<_> = out.iter().map(|m| m.session.index()).collect();
        v.sort();
        v
    }

    #[test]
    fn wildcards_match_per_spec_examples() {
        let mut t = SubscriptionTree::default();
        t.insert("sport/tennis/player1/#", None, k(1), entry(QoS::AtMostOnce));
        t.insert("sport/+/player1", None, k(2), entry(QoS::AtMostOnce));
        t.insert("+/+", None, k(3), entry(QoS::AtMostOnce));
        t.insert("#", None, k(4), entry(QoS::AtMostOnce));
        t.insert("/finance", None, k(5), entry(QoS::AtMostOnce));
        assert_eq!(sessions(&mut t, "sport/tennis/player1"), vec![1, 2, 4]);
        assert_eq!(sessions(&mut t, "sport/tennis/player1/ranking"), vec![1, 4]);
        assert_eq!(sessions(&mut t, "/finance"), vec![3, 4, 5]);
        assert_eq!(sessions(&mut t, "a/b"), vec![3, 4]);
    }

    #[test]
    fn dollar_topics_skip_leading_wildcards() {
        // MQTT-4.7.2-1
        let mut t = SubscriptionTree::default();
        t.insert("#", None, k(1), entry(QoS::AtMostOnce));
        t.insert("+/broker/uptime", None, k(2), entry(QoS::AtMostOnce));
        t.insert("$SYS/#", None, k(3), entry(QoS::AtMostOnce));
        assert_eq!(sessions(&mut t, "$SYS/broker/uptime"), vec![3]);
    }

    #[test]
    fn remove_prunes_and_counts() {
        let mut t = SubscriptionTree::default();
        assert!(!t.insert("a/b", None, k(1), entry(QoS::AtMostOnce)));
        assert!(t.insert("a/b", None, k(1), entry(QoS::AtLeastOnce)));
        assert_eq!(t.len(), 1);
        assert!(t.remove("a/b", None, k(1)));
        assert!(!t.remove("a/b", None, k(1)));
        assert!(t.is_empty());
        assert!(t.root.is_empty());
    }

    #[test]
    fn a_filter_of_100000_levels_is_matched_removed_and_dropped_without_recursion() {
        // The 42 KB filter of issue #17 (about 21,000 levels) aborted the broker when its
        // subscription was removed; the depth here is five times that, on a test
        // thread's small stack.
        let deep = vec!["a"; 100_000].join("/");
        let mut t = SubscriptionTree::default();
        t.insert(&deep, None, k(1), entry(QoS::AtMostOnce));
        t.insert(&format!("{deep}/#"), None, k(2), entry(QoS::AtMostOnce));
        t.insert(
            &vec!["+"; 100_000].join("/"),
            None,
            k(3),
            entry(QoS::AtMostOnce),
        );
        t.insert("a/b", None, k(4), entry(QoS::AtMostOnce));
        assert_eq!(sessions(&mut t, &deep), vec![1, 2, 3]);
        assert!(t.remove(&deep, None, k(1)));
        assert_eq!(sessions(&mut t, &deep), vec![2, 3]);
        assert!(t.remove(&format!("{deep}/#"), None, k(2)));
        assert_eq!(sessions(&mut t, "a/b"), vec![4]);
        // The `+` chain is still there; it goes when the tree is dropped.
        assert_eq!(t.len(), 2);
        drop(t);

        let mut t = SubscriptionTree::default();
        t.insert(&deep, Some("g"), k(7), entry(QoS::AtMostOnce));
        assert!(t.remove(&deep, Some("g"), k(7)));
        assert!(t.root.is_empty());
    }

    #[test]
    fn removal_prunes_only_the_branch_it_empties() {
        let mut t = SubscriptionTree::default();
        t.insert("a/b/c/d", None, k(1), entry(QoS::AtMostOnce));
        t.insert("a/b", None, k(2), entry(QoS::AtMostOnce));
        t.insert("a/x", None, k(3), entry(QoS::AtMostOnce));
        assert!(t.remove("a/b/c/d", None, k(1)));
        let b = &t.root.children["a"].children["b"];
        assert!(b.children.is_empty(), "c/d pruned below a/b");
        assert!(t.remove("a/b", None, k(2)));
        assert!(!t.root.children["a"].children.contains_key("b"));
        assert!(t.remove("a/x", None, k(3)));
        assert!(t.root.is_empty());
    }

    proptest::proptest! {
        /// The trie agrees with the spec's matching rule (`outpost_mqtt::topic::matches`)
        /// over any sequence of inserts and removals, and prunes back to nothing.
        #[test]
        fn agrees_with_a_brute_force_model(
            ops in proptest::collection::vec(
                (proptest::bool::ANY, 0u32..4, "(\\+|#|a|b|\\$s|)(/(\\+|a|b|)){0,4}(/#)?"),
                1..40,
            ),
            topics in proptest::collection::vec("(a|b|\\$s|)(/(a|b|)){0,5}", 1..8),
        ) {
            let mut t = SubscriptionTree::default();
            let mut model: std::collections::BTreeSet<(u32, String)> = Default::default();
            for (add, session, filter) in ops {
                if outpost_mqtt::topic::validate_topic_filter(&filter).is_err() {
                    continue;
                }
                if add {
                    let existed = t.insert(&filter, None, k(session), entry(QoS::AtMostOnce));
                    proptest::prop_assert_eq!(existed, !model.insert((session, filter)));
                } else {
                    let removed = t.remove(&filter, None, k(session));
                    proptest::prop_assert_eq!(removed, model.remove(&(session, filter)));
                }
                proptest::prop_assert_eq!(t.len(), model.len());
                for topic in &topics {
                    let mut want: Vec<u32> = model
                        .iter()
                        .filter(|(_, f)| outpost_mqtt::topic::matches(f, topic))
                        .map(|(s, _)| *s)
                        .collect();
                    want.sort();
                    proptest::prop_assert_eq!(sessions(&mut t, topic), want, "topic {}", topic);
                }
            }
            for (session, filter) in std::mem::take(&mut model) {
                proptest::prop_assert!(t.remove(&filter, None, k(session)));
            }
            proptest::prop_assert!(t.root.is_empty());
        }
    }

    #[test]
    fn shared_groups_round_robin_and_prefer_online() {
        let mut t = SubscriptionTree::default();
        t.insert("t", Some("g"), k(1), entry(QoS::AtMostOnce));
        t.insert("t", Some("g"), k(2), entry(QoS::AtMostOnce));
        let picks: Vec<_> = (0..4).map(|_| sessions(&mut t, "t")[0]).collect();
        assert_eq!(picks, vec![1, 2, 1, 2]);
        let mut out = Vec::new();
        for _ in 0..3 {
            t.matches("t", &|s| s == k(2), &mut out);
        }
        assert!(out.iter().all(|m| m.session == k(2) && m.shared));
    }
}
