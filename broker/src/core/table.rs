//! Every session, by key and by client identifier, in one compact table.
//!
//! Two hash maps (key -> session, client id -> key) cost about 75 bytes per client at
//! ten thousand clients, most of a tenth of the memory budget. Here sessions sit in a
//! slab whose index is part of the key (so a lookup by key is an array access), and the
//! client-id index is a hash table of 4-byte slab indices that hashes and compares the
//! client id stored in the session itself.
//!
//! A key is `generation << 32 | index`. The generation of a slot moves on when its
//! session ends, so a key held by something that outlived its session (a timer, a
//! connection event in flight) finds nothing instead of a newer session in that slot.

use std::hash::BuildHasher;

use hashbrown::HashTable;

use crate::session::Session;
use crate::subscriptions::SessionKey;

/// One slab slot.
struct Slot {
    /// Generation of the session in it, or of the next one when vacant.
    generation: u32,
    session: Option<Box<Session>>,
}

/// Sessions by key and by client identifier.
pub(crate) struct SessionTable {
    slots: Vec<Slot>,
    /// Vacant slot indices, reused last-freed first.
    free: Vec<u32>,
    /// Indices of the sessions that are found by client id (network clients).
    by_client_id: HashTable<u32>,
    hasher: std::hash::RandomState,
    len: usize,
}

fn index(key: SessionKey) -> usize {
    key.index() as usize
}

fn generation(key: SessionKey) -> u32 {
    key.generation()
}

impl SessionTable {
    /// An empty table.
    pub(crate) fn new() -> SessionTable {
        SessionTable {
            slots: Vec::new(),
            free: Vec::new(),
            by_client_id: HashTable::new(),
            hasher: std::hash::RandomState::new(),
            len: 0,
        }
    }

    /// Number of sessions.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The session with this key, if it still exists.
    pub(crate) fn get(&self, key: SessionKey) -> Option<&Session> {
        let slot = self.slots.get(index(key))?;
        if slot.generation != generation(key) {
            return None;
        }
        slot.session.as_deref()
    }

    /// The session with this key, if it still exists.
    pub(crate) fn get_mut(&mut self, key: SessionKey) -> Option<&mut Session> {
        let slot = self.slots.get_mut(index(key))?;
        if slot.generation != generation(key) {
            return None;
        }
        slot.session.as_deref_mut()
    }

    /// The key of the network session of `client_id`.
    pub(crate) fn key_of(&self, client_id: &str) -> Option<SessionKey> {
        let hash = self.hasher.hash_one(client_id);
        let &i = self
            .by_client_id
            .find(hash, |&i| self.client_id_at(i) == Some(client_id))?;
        self.key_at(i)
    }

    /// The key the next [`Self::insert`] will return.
    pub(crate) fn next_key(&self) -> SessionKey {
        match self.free.last() {
            Some(&i) => key(self.slots[i as usize].generation, i),
            None => key(1, self.slots.len() as u32),
        }
    }

    /// Adds a session; `by_client_id` makes it findable with [`Self::key_of`] (network
    /// clients; an earlier session of that id must have been removed first).
    pub(crate) fn insert(&mut self, session: Box<Session>, by_client_id: bool) -> SessionKey {
        let hash = self.hasher.hash_one(&*session.client_id);
        let i = match self.free.pop() {
            Some(i) => {
                self.slots[i as usize].session = Some(session);
                i
            }
            None => {
                // Four billion sessions at once is far past any file descriptor limit.
                let i = u32::try_from(self.slots.len()).unwrap_or(u32::MAX);
                self.slots.push(Slot {
                    generation: 1,
                    session: Some(session),
                });
                i
            }
        };
        self.len += 1;
        if by_client_id {
            let slots = &self.slots;
            let hasher = &self.hasher;
            self.by_client_id.insert_unique(hash, i, |&j| {
                let id = slots[j as usize].session.as_ref().map(|s| &*s.client_id);
                hasher.hash_one(id.unwrap_or(""))
            });
        }
        key(self.slots[i as usize].generation, i)
    }

    /// Removes and returns the session with this key.
    pub(crate) fn remove(&mut self, key: SessionKey) -> Option<Box<Session>> {
        let i = index(key);
        let slot = self.slots.get_mut(i)?;
        if slot.generation != generation(key) {
            return None;
        }
        let session = slot.session.take()?;
        slot.generation = slot.generation.wrapping_add(1).max(1);
        self.len -= 1;
        let hash = self.hasher.hash_one(&*session.client_id);
        if let Ok(entry) = self.by_client_id.find_entry(hash, |&j| j as usize == i) {
            entry.remove();
        }
        self.free.push(i as u32);
        Some(session)
    }

    /// Every session.
    pub(crate) fn values_mut(&mut self) -> impl Iterator<Item = &mut Session> {
        self.slots
            .iter_mut()
            .filter_map(|s| s.session.as_deref_mut())
    }

    /// Every session with its key.
    pub(crate) fn iter_mut(&mut self) -> impl Iterator<Item = (SessionKey, &mut Session)> {
        self.slots.iter_mut().enumerate().filter_map(|(i, s)| {
            let k = key(s.generation, i as u32);
            s.session.as_deref_mut().map(|s| (k, s))
        })
    }

    /// Every session.
    pub(crate) fn values(&self) -> impl Iterator<Item = &Session> {
        self.slots.iter().filter_map(|s| s.session.as_deref())
    }

    fn client_id_at(&self, i: u32) -> Option<&str> {
        self.slots[i as usize]
            .session
            .as_ref()
            .map(|s| &*s.client_id)
    }

    fn key_at(&self, i: u32) -> Option<SessionKey> {
        let slot = &self.slots[i as usize];
        slot.session.as_ref().map(|_| key(slot.generation, i))
    }
}

fn key(generation: u32, index: u32) -> SessionKey {
    SessionKey::new(generation, index)
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_mqtt::Protocol;

    fn session(id: &str) -> Box<Session> {
        Box::new(Session::new(id.into(), Protocol::V5))
    }

    #[test]
    fn finds_by_key_and_client_id_and_forgets_on_remove() {
        let mut t = SessionTable::new();
        let a = t.insert(session("a"), true);
        let b = t.insert(session("b"), true);
        let local = t.insert(session("$local-1"), false);
        assert_eq!(t.len(), 3);
        assert_eq!(t.key_of("a"), Some(a));
        assert_eq!(t.key_of("b"), Some(b));
        assert_eq!(
            t.key_of("$local-1"),
            None,
            "local sessions are not indexed by id"
        );
        assert_eq!(t.get(local).map(|s| &*s.client_id), Some("$local-1"));
        assert!(t.remove(a).is_some());
        assert_eq!(t.key_of("a"), None);
        assert!(t.get(a).is_none());
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn a_stale_key_does_not_reach_the_session_that_reused_its_slot() {
        let mut t = SessionTable::new();
        let old = t.insert(session("a"), true);
        t.remove(old);
        let predicted = t.next_key();
        let new = t.insert(session("b"), true);
        assert_eq!(predicted, new);
        assert_eq!(index(old), index(new), "the slot is reused");
        assert!(
            t.get(old).is_none(),
            "an old key must not find the new session"
        );
        assert!(t.remove(old).is_none());
        assert_eq!(t.key_of("b"), Some(new));
        assert_ne!(new, SessionKey::new(0, 0), "0 never names a session");
    }
}
