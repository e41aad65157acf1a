//! The core's side of persistence: which sessions the store keeps, and bringing back
//! what an earlier run left.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Core;
use super::timers::Timer;
use crate::broker::router::{SessionKey, SubEntry};
use crate::broker::session::{Inflight, Session, SessionSub};
use crate::broker::store::Loaded;

impl Core {
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
            if s.store_id != 0 {
                store.drop_session(s.store_id);
                s.store_id = 0;
            }
            return;
        }
        // A session gets its id when it is first kept and holds it until it ends: a
        // session that ends with its connection is never resumed, so one that is kept
        // has been kept since it was created, with everything it ever held.
        if s.store_id == 0 {
            s.store_id = store.new_session_id();
        }
        store.put_session(s.store_id, &s.client_id, s.protocol, s.expiry);
    }

    /// Takes in what the store held at start: retained messages, and persistent
    /// sessions as if their clients had just disconnected (their expiry starts now, as
    /// in Mosquitto).
    pub(super) fn restore(&mut self, loaded: Loaded) {
        for msg in &loaded.retained {
            self.retained.update(msg);
        }
        let now = Instant::now();
        let sessions = loaded.sessions.len();
        let mut owed = 0;
        for ls in loaded.sessions {
            let client_id: Arc<str> = ls.client_id.into();
            if self.sessions.key_of(&client_id).is_some() {
                continue;
            }
            let mut s = Session::new(client_id, ls.protocol);
            s.expiry = ls.expiry;
            s.store_id = ls.id;
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
                match packet_id {
                    Some(packet_id) => s.flows().inflight.push_back(Inflight {
                        packet_id,
                        delivery,
                        released,
                        stored,
                    }),
                    None => s.flows().queue.push_back((stored, delivery)),
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
                let at = now + Duration::from_secs(u64::from(expiry));
                self.timers.push(at, Timer::Expire { key, generation: 0 });
            }
        }
        if sessions > 0 || !loaded.retained.is_empty() {
            tracing::info!(
                retained = loaded.retained.len(),
                sessions,
                messages = owed,
                "restored from the broker store"
            );
        }
    }
}
