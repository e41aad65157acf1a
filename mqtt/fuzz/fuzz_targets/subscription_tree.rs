//! The broker's subscription tree (`outpost_gateway::broker::subscriptions::SubscriptionTree`)
//! under arbitrary insert / remove / match operations, checked against a model that is
//! a plain set of subscriptions matched one by one with `outpost_mqtt::topic::matches`:
//!
//! - `insert` says whether the subscription existed, `remove` whether it was removed,
//!   and `len()` counts the model's subscriptions, after every operation;
//! - `matches` returns exactly the sessions of the non-shared filters that match the
//!   topic (one entry per matching filter), and for shared subscriptions one member of
//!   each matching group (an online one when the group has one).
//!
//! Only valid filters and topic names reach the tree (as the broker validates them
//! first); a shared filter `$share/{group}/{inner}` is stored as the broker stores it,
//! as `inner` with the group. `Deep` builds a filter of up to 200,000 levels (65,536
//! at most are valid, in 65,535 bytes) so that recursion over the depth of a filter
//! shows as a stack overflow. Everything runs on a thread with 2 MiB of stack, the
//! stack of a tokio worker thread, where the broker's core runs the tree.

#![no_main]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Mutex, OnceLock};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use outpost_gateway::broker::subscriptions::{SessionKey, SubEntry, SubscriptionTree};
use outpost_mqtt::topic::{matches, parse_shared, validate_topic_filter, validate_topic_name};
use outpost_mqtt::{QoS, SubscriptionOptions};

/// Stack of a tokio worker thread (the broker's core runs on one).
const STACK: usize = 2 << 20;
/// Longest filter `Deep` builds, in levels; `FUZZ_TREE_MAX_LEVELS` lowers it and keeps
/// deeper filters of any op out of the tree (to look past a known depth crash for other
/// bugs).
const MAX_DEEP_LEVELS: u32 = 200_000;

fn max_deep_levels() -> u32 {
    static MAX: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *MAX.get_or_init(|| {
        std::env::var("FUZZ_TREE_MAX_LEVELS")
            .ok()
            .and_then(|v| v.parse().ok())
            .map_or(MAX_DEEP_LEVELS, |v: u32| v.min(MAX_DEEP_LEVELS))
    })
}

/// One level of a filter or topic, from a small alphabet so that filters collide.
#[derive(Arbitrary, Debug, Clone)]
enum Level {
    A,
    B,
    Empty,
    Plus,
    Hash,
    Sys,
    Dollar,
    Raw(String),
}

impl Level {
    fn as_str(&self) -> &str {
        match self {
            Level::A => "a",
            Level::B => "b",
            Level::Empty => "",
            Level::Plus => "+",
            Level::Hash => "#",
            Level::Sys => "$SYS",
            Level::Dollar => "$x",
            Level::Raw(s) => s,
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Name {
    Levels(Vec<Level>),
    Raw(String),
}

impl Name {
    fn build(&self) -> String {
        match self {
            Name::Levels(l) => l.iter().map(Level::as_str).collect::<Vec<_>>().join("/"),
            Name::Raw(s) => s.clone(),
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Group {
    G,
    H,
    Raw(String),
}

#[derive(Arbitrary, Debug)]
enum Op {
    Insert {
        filter: Name,
        group: Option<Group>,
        session: u8,
        qos: u8,
        id: Option<u32>,
    },
    Remove {
        filter: Name,
        group: Option<Group>,
        session: u8,
    },
    Match {
        topic: Name,
        online: u8,
    },
    /// A filter of `levels` levels of `level`, optionally ending in `#`; inserted, then
    /// matched against the topic of as many levels, then removed if `remove`.
    Deep {
        levels: u32,
        level: Level,
        hash: bool,
        session: u8,
        remove: bool,
    },
}

/// The model: (full filter as subscribed, group, session) -> nothing. The full filter
/// keeps the `$share/{group}/` prefix so `topic::matches` strips it as the broker does.
#[derive(Default)]
struct Model {
    subs: BTreeSet<(String, Option<String>, SessionKey)>,
}

/// A filter as the broker receives it: the `$share/` form when there is a group.
fn full_filter(filter: &str, group: &Option<Group>) -> String {
    match group {
        None => filter.to_owned(),
        Some(Group::G) => format!("$share/g/{filter}"),
        Some(Group::H) => format!("$share/h/{filter}"),
        Some(Group::Raw(g)) => format!("$share/{g}/{filter}"),
    }
}

/// Validates a filter and splits it the way the broker does (`control.rs`).
fn split(full: &str) -> Option<(Option<String>, String)> {
    validate_topic_filter(full).ok()?;
    Some(match parse_shared(full) {
        Some((g, inner)) => (Some(g.to_owned()), inner.to_owned()),
        None => (None, full.to_owned()),
    })
}

fn entry(qos: u8, id: Option<u32>) -> SubEntry {
    SubEntry {
        options: SubscriptionOptions {
            qos: QoS::from_u8(qos % 3).unwrap_or_default(),
            ..Default::default()
        },
        id,
    }
}

struct Harness {
    tree: SubscriptionTree,
    model: Model,
}

impl Harness {
    fn insert(&mut self, full: &str, session: SessionKey, e: SubEntry) {
        let Some((group, inner)) = split(full) else {
            return;
        };
        if inner.split('/').count() > max_deep_levels() as usize {
            return;
        }
        let existed = self.tree.insert(&inner, group.as_deref(), session, e);
        let was = !self.model.subs.insert((full.to_owned(), group, session));
        assert_eq!(existed, was, "insert({full:?}, {session}) existed");
        assert_eq!(self.tree.len(), self.model.subs.len());
    }

    fn remove(&mut self, full: &str, session: SessionKey) {
        let Some((group, inner)) = split(full) else {
            return;
        };
        let removed = self.tree.remove(&inner, group.as_deref(), session);
        let was = self.model.subs.remove(&(full.to_owned(), group, session));
        assert_eq!(removed, was, "remove({full:?}, {session})");
        assert_eq!(self.tree.len(), self.model.subs.len());
    }

    fn check_match(&mut self, topic: &str, online_mask: u8) {
        if validate_topic_name(topic).is_err() {
            return;
        }
        let online = move |s: SessionKey| online_mask & (1 << (s.index() % 8)) != 0;
        let mut out = Vec::new();
        self.tree.matches(topic, &online, &mut out);

        let mut got: Vec<SessionKey> = out
            .iter()
            .filter(|m| !m.shared)
            .map(|m| m.session)
            .collect();
        got.sort_unstable();
        let mut want = Vec::new();
        // (group, inner filter) -> members, for the shared subscriptions that match.
        let mut groups: BTreeMap<(&str, &str), Vec<SessionKey>> = BTreeMap::new();
        for (full, group, session) in &self.model.subs {
            if !matches(full, topic) {
                continue;
            }
            match group {
                None => want.push(*session),
                Some(g) => {
                    let inner = parse_shared(full).map_or(full.as_str(), |(_, i)| i);
                    groups
                        .entry((g.as_str(), inner))
                        .or_default()
                        .push(*session);
                }
            }
        }
        want.sort_unstable();
        assert_eq!(got, want, "non-shared matches of {topic:?}");

        let picks: Vec<SessionKey> = out.iter().filter(|m| m.shared).map(|m| m.session).collect();
        assert_eq!(
            picks.len(),
            groups.len(),
            "one pick per matching shared group for {topic:?}"
        );
        for p in &picks {
            assert!(
                groups.values().any(|members| members.contains(p)),
                "shared pick {p} is no member of a matching group for {topic:?}"
            );
        }
        if groups
            .values()
            .all(|members| members.iter().all(|&m| online(m)))
        {
            assert!(picks.iter().all(|&p| online(p)));
        }
    }

    fn run(&mut self, op: &Op) {
        match op {
            Op::Insert {
                filter,
                group,
                session,
                qos,
                id,
            } => {
                let full = full_filter(&filter.build(), group);
                self.insert(
                    &full,
                    SessionKey::new(0, u32::from(*session)),
                    entry(*qos, *id),
                );
            }
            Op::Remove {
                filter,
                group,
                session,
            } => {
                let full = full_filter(&filter.build(), group);
                self.remove(&full, SessionKey::new(0, u32::from(*session)));
            }
            Op::Match { topic, online } => self.check_match(&topic.build(), *online),
            Op::Deep {
                levels,
                level,
                hash,
                session,
                remove,
            } => {
                let n = (*levels % (max_deep_levels() + 1)) as usize;
                let level = level.as_str();
                let mut filter = vec![level; n].join("/");
                if *hash {
                    filter.push_str(if n == 0 { "#" } else { "/#" });
                }
                let session = SessionKey::new(0, u32::from(*session));
                self.insert(&filter, session, entry(0, None));
                let topic = vec![
                    if level == "+" || level == "#" {
                        "x"
                    } else {
                        level
                    };
                    n.max(1)
                ]
                .join("/");
                self.check_match(&topic, 0xFF);
                if *remove {
                    self.remove(&filter, session);
                }
            }
        }
    }
}

/// The thread the tree runs on, made once: a thread per input would cost more than most
/// inputs. A panic there aborts the process (libfuzzer-sys's panic hook), so a failed
/// check is reported as a crash of the input being run.
fn worker() -> &'static Mutex<(SyncSender<Vec<Op>>, Receiver<()>)> {
    static WORKER: OnceLock<Mutex<(SyncSender<Vec<Op>>, Receiver<()>)>> = OnceLock::new();
    WORKER.get_or_init(|| {
        let (tx, inputs) = sync_channel::<Vec<Op>>(0);
        let (done, rx) = sync_channel(0);
        std::thread::Builder::new()
            .name("tree".into())
            .stack_size(STACK)
            .spawn(move || {
                for ops in inputs {
                    let mut h = Harness {
                        tree: SubscriptionTree::default(),
                        model: Model::default(),
                    };
                    for op in &ops {
                        h.run(op);
                    }
                    // Dropping the tree is part of the test: a deep tree must drop too.
                    drop(h);
                    let _ = done.send(());
                }
            })
            .expect("spawn the tree thread");
        Mutex::new((tx, rx))
    })
}

fuzz_target!(|ops: Vec<Op>| {
    let w = worker().lock().unwrap_or_else(|e| e.into_inner());
    w.0.send(ops).expect("tree thread alive");
    w.1.recv().expect("tree thread alive");
});
