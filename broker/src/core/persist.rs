//! The core's side of persistence: which sessions the store keeps, when a message owed
//! to one is written, and bringing back what an earlier run left.
//!
//! A message queued for a persistent session (offline, or its inflight window full) is
//! written at once, and so is every QoS 2 delivery (`route.rs` says why). A QoS 1
//! message sent straight to a connected one usually comes back
//! acknowledged within a millisecond; writing it and deleting it again would cost two
//! commits per message (and wear an SD card) for nothing. So such a delivery is written
//! only if it is still unacknowledged after [`WRITE_GRACE`], or when its client goes
//! away; until then its publisher's PUBACK/PUBREC waits on an [`AckGate`] that each
//! delivery holds and drops once it is acknowledged or committed. Either way, what the
//! broker has acknowledged to a publisher is with a subscriber or on disk.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Core;
use super::timers::Timer;
use crate::session::{AckGate, ClientId, Inflight, Session, SessionSub};
use crate::store::{DeliveryId, Loaded, StoreId};
use crate::subscriptions::{SessionKey, SubEntry};

/// How long a delivery in flight to a connected persistent session may go unacknowledged
/// before it is written. A healthy client answers well inside it; it also bounds how long
/// a slow one holds up its publisher's acknowledgement (plus one commit).
pub(super) const WRITE_GRACE: Duration = Duration::from_millis(50);

/// Deferred deliveries are looked at no more often than this, so one may wait up to
/// `WRITE_GRACE + FLUSH_TICK` before it is written.
const FLUSH_TICK: Duration = Duration::from_millis(20);

impl Core {
    /// Writes deferred deliveries that are due (all of them with `all`), releasing their
    /// publishers once the store has committed them.
    pub(super) fn flush_deferred(&mut self, now: Instant, all: bool) {
        let mut gates = Vec::new();
        while let Some(&(at, key, id)) = self.deferred.front() {
            if !all && at > now {
                break;
            }
            self.deferred.pop_front();
            self.write_deferred(key, Some(id), &mut gates);
        }
        self.release_after_commit(gates);
        if let Some(&(at, _, _)) = self.deferred.front() {
            // One wake-up per tick, not one per message: at a steady rate every delivery
            // has its own deadline, and waking for each would cost more than the writes
            // the grace period saves.
            self.timers.push(at.max(now + FLUSH_TICK), Timer::Deferred);
        }
    }

    /// Writes every deferred delivery of one session (its client went away).
    pub(super) fn flush_session(&mut self, key: SessionKey) {
        let mut gates = Vec::new();
        self.write_deferred(key, None, &mut gates);
        self.release_after_commit(gates);
    }

    /// Writes the session's unwritten delivery `id` (every one with `None`), moving the
    /// gates of what was written into `gates`.
    fn write_deferred(
        &mut self,
        key: SessionKey,
        id: Option<DeliveryId>,
        gates: &mut Vec<Arc<AckGate>>,
    ) {
        let Some(store) = self.store.as_ref() else {
            return;
        };
        let Some(s) = self.sessions.get_mut(key) else {
            return;
        };
        let sid = s.store_id;
        let Some(flows) = s.flows_mut() else {
            return;
        };
        for f in flows.inflight.iter_mut() {
            let Some(stored) = f.stored else {
                continue;
            };
            if f.written || id.is_some_and(|id| id != stored) {
                continue;
            }
            let Some(sid) = sid else {
                // The session stopped being persistent (a 5.0 client resumed it with
                // expiry 0): nothing to keep, nobody to wait for.
                f.gate = None;
                continue;
            };
            store.put_delivery(stored, sid, &f.delivery, Some(f.packet_id));
            if f.released {
                store.released(stored);
            }
            f.written = true;
            gates.extend(f.gate.take());
        }
    }

    /// Releases `gates` once everything written so far is committed.
    fn release_after_commit(&mut self, gates: Vec<Arc<AckGate>>) {
        if gates.is_empty() {
            return;
        }
        if let Some(store) = &self.store {
            let committed = store.receipt();
            self.releases.push((committed, gates));
        }
    }

    /// Brings the session's row in the store in line with it: a session that outlives
    /// its connection (expiry above zero) is kept; one that ends with it is not.
    pub(super) fn persist_session(&mut self, key: SessionKey) {
        let Some(store) = self.store.as_mut() else {
            return;
        };
        let Some(s) = self.sessions.get_mut(key) else {
            return;
        };
        if s.expiry == 0 {
            if let Some(sid) = s.store_id.take() {
                store.drop_session(sid);
            }
            return;
        }
        // A session gets its id when it is first kept and holds it until it ends: a
        // session that ends with its connection is never resumed, so one that is kept
        // has been kept since it was created, with everything it ever held.
        let sid = *s.store_id.get_or_insert_with(|| store.new_session_id());
        store.put_session(sid, &s.client_id, s.protocol, s.expiry);
    }

    /// Takes in what the store held at start: retained messages, and persistent
    /// sessions as if their clients had just disconnected at `now` (their expiry starts
    /// then, as in Mosquitto).
    pub(super) fn restore(&mut self, loaded: Loaded, now: Instant) {
        let retained = loaded.retained.len();
        for msg in loaded.retained {
            self.retained.restore(msg);
        }
        let sessions = loaded.sessions.len();
        let mut owed = 0;
        for ls in loaded.sessions {
            let client_id = ClientId::from(ls.client_id);
            if self.sessions.key_of(&client_id).is_some() {
                continue;
            }
            let mut s = Session::new(client_id, ls.protocol);
            s.expiry = ls.expiry;
            s.store_id = StoreId::new(ls.id);
            let mut subs = Vec::with_capacity(ls.subs.len());
            for (filter, options, id) in ls.subs {
                let (group, inner) = match outpost_mqtt::topic::parse_shared(&filter) {
                    Some((g, f)) => (Some(g.to_owned()), f.to_owned()),
                    None => (None, filter.clone()),
                };
                subs.push((inner.clone(), group.clone(), SubEntry { options, id }));
                s.subs.insert(
                    filter,
                    SessionSub {
                        group,
                        filter: inner,
                    },
                );
            }
            owed += ls.deliveries.len();
            for (stored, packet_id, released, delivery) in ls.deliveries {
                let stored = DeliveryId::new(stored);
                match packet_id {
                    Some(packet_id) => s.flows().inflight.push_back(Inflight {
                        packet_id,
                        delivery,
                        released,
                        stored,
                        written: true,
                        gate: None,
                    }),
                    None => s.push_queued(stored, delivery),
                }
            }
            for p in ls.incoming_qos2 {
                s.flows().incoming_qos2.insert(p);
            }
            let expiry = s.expiry;
            let key = self.sessions.insert(Box::new(s), true);
            for (inner, group, entry) in subs {
                self.tree.insert(&inner, group.as_deref(), key, entry);
            }
            if expiry != u32::MAX {
                let after = Duration::from_secs(u64::from(expiry));
                self.timers
                    .push_after(now, after, Timer::Expire { key, generation: 0 });
            }
        }
        if sessions > 0 || retained > 0 {
            tracing::info!(
                retained,
                sessions,
                messages = owed,
                "restored from the broker store"
            );
        }
    }
}
