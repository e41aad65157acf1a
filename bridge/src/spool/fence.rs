//! The fence between `drop-oldest` and the uplink: which rows the uplink has taken for
//! sending (never dropped) and which rows the writer has claimed for dropping (never sent).
//!
//! Both sides move in id order. The uplink takes rows in order, up to `taken_through`;
//! the writer claims the oldest stage-0 rows above that mark, so each claim is a range
//! `(floor, last]` in which every row not in a QoS 2 exchange is being deleted. Each side
//! checks the other's marks and moves its own under one lock, so every row ends up either
//! taken or dropped, never both.

use std::sync::{Mutex, MutexGuard};

use super::Stage;

/// Shared marks of one spool.
#[derive(Debug, Default)]
pub(crate) struct Fence {
    marks: Mutex<Marks>,
}

/// The marks; see the module documentation.
#[derive(Debug, Default)]
pub(crate) struct Marks {
    /// Highest row id the uplink took for sending in the current session (0: none).
    taken_through: i64,
    /// Claimed ranges `(after, through]`, disjoint. Usually one: ranges the uplink has
    /// passed are pruned.
    claims: Vec<(i64, i64)>,
}

impl Fence {
    /// Lock the marks (held only for in-memory work or one short SELECT).
    pub(crate) fn lock(&self) -> MutexGuard<'_, Marks> {
        // The marks are plain integers that no panic can leave half-updated, so a
        // poisoned lock is still usable.
        self.marks.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Marks {
    /// True when the writer claimed row `id` for dropping: it is counted as dropped there
    /// and must not go up.
    pub(crate) fn claimed(&self, id: i64, stage: Stage) -> bool {
        // Rows in a QoS 2 exchange are never claimed, whatever their id.
        stage == Stage::New
            && self
                .claims
                .iter()
                .any(|&(after, through)| after < id && id <= through)
    }

    /// The uplink takes row `id` (not [`Marks::claimed`]) for sending: the writer spares
    /// it from now on.
    pub(crate) fn take(&mut self, id: i64) {
        self.taken_through = self.taken_through.max(id);
        self.pass(id);
    }

    /// The uplink moved past row `id` (taken or skipped): it reads in id order, so claims
    /// at or below it are never asked about again in this session, and the next session
    /// reads only after those deletes are committed.
    pub(crate) fn pass(&mut self, id: i64) {
        if !self.claims.is_empty() {
            self.claims.retain(|&(_, through)| through > id);
        }
    }

    /// Rows at or below this are spared from dropping.
    pub(crate) fn taken_through(&self) -> i64 {
        self.taken_through
    }

    /// The writer claims every droppable row in `(after, through]`.
    pub(crate) fn claim(&mut self, after: i64, through: i64) {
        if through <= after {
            return;
        }
        let (mut lo, mut hi) = (after, through);
        // Merge with every range it overlaps or touches, so the list stays short.
        self.claims.retain(|&(a, b)| {
            let apart = b < lo || hi < a;
            if !apart {
                lo = lo.min(a);
                hi = hi.max(b);
            }
            apart
        });
        self.claims.push((lo, hi));
    }

    /// Undo an [`Marks::untake_all`] whose transaction rolled back.
    pub(crate) fn respare(&mut self, taken_through: i64) {
        self.taken_through = self.taken_through.max(taken_through);
    }

    /// The session that took rows is over and its acknowledged rows are deleted: nothing
    /// is in flight any more.
    pub(crate) fn untake_all(&mut self) {
        self.taken_through = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_is_either_taken_or_dropped() {
        let fence = Fence::default();
        let mut m = fence.lock();
        m.take(1);
        m.take(2);
        assert_eq!(m.taken_through(), 2);
        m.claim(2, 5);
        assert!(m.claimed(3, Stage::New), "claimed for dropping");
        assert!(
            !m.claimed(4, Stage::Published),
            "QoS 2 in progress is never claimed"
        );
        assert!(!m.claimed(6, Stage::New));
        assert!(!m.claimed(2, Stage::New), "taken rows are below the claim");
        // A new session: rows 1 and 2 were spared and are still spooled; they are not
        // claimed, and may be claimed now that nothing is taken.
        m.untake_all();
        assert_eq!(m.taken_through(), 0);
        assert!(!m.claimed(1, Stage::New) && !m.claimed(2, Stage::New));
        m.claim(0, 1);
        assert!(m.claimed(1, Stage::New) && !m.claimed(2, Stage::New));
        assert!(m.claimed(3, Stage::New));
        m.claim(0, 9);
        assert_eq!(m.claims, vec![(0, 9)], "overlapping claims merge");
        m.take(10);
        assert!(m.claims.is_empty(), "passed claims are pruned");
    }
}
