//! Rows the cloud acknowledged whose delete has not been committed yet (a full disk, an I/O
//! error): the writer retries the delete with every transaction, and the reader leaves them
//! out, so the uplink does not send them again while the process lives.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

/// A set of row ids kept as disjoint inclusive ranges: acknowledgements come mostly in id
/// order, so even a long outage of the disk costs a few ranges, not one entry per row.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct IdRanges {
    /// start -> end (inclusive), disjoint and never touching.
    ranges: BTreeMap<i64, i64>,
    len: u64,
}

impl IdRanges {
    /// True when no id is in the set.
    pub(crate) fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Number of ids in the set.
    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// True when `id` is in the set.
    pub(crate) fn contains(&self, id: i64) -> bool {
        self.ranges
            .range(..=id)
            .next_back()
            .is_some_and(|(_, &end)| id <= end)
    }

    /// Add every id of `lo..=hi`.
    pub(crate) fn insert_range(&mut self, lo: i64, hi: i64) {
        if hi < lo {
            return;
        }
        let (mut lo, mut hi) = (lo, hi);
        // Merge with every range that overlaps or touches `lo..=hi`.
        let touching: Vec<(i64, i64)> = self
            .ranges
            .range(..=hi.saturating_add(1))
            .rev()
            .take_while(|&(_, &end)| end >= lo.saturating_sub(1))
            .map(|(&s, &e)| (s, e))
            .collect();
        for (s, e) in touching {
            self.ranges.remove(&s);
            self.len -= (e - s + 1) as u64;
            lo = lo.min(s);
            hi = hi.max(e);
        }
        self.ranges.insert(lo, hi);
        self.len += (hi - lo + 1) as u64;
    }

    /// Add ids (any order, duplicates allowed; sorted in place).
    pub(crate) fn insert_all(&mut self, ids: &mut Vec<i64>) {
        for (lo, hi) in runs(ids) {
            self.insert_range(lo, hi);
        }
    }

    /// The ranges, in id order.
    pub(crate) fn ranges(&self) -> impl Iterator<Item = (i64, i64)> + '_ {
        self.ranges.iter().map(|(&s, &e)| (s, e))
    }

    /// Remove everything.
    pub(crate) fn clear(&mut self) {
        self.ranges.clear();
        self.len = 0;
    }
}

/// Sorts and deduplicates `ids` in place (no copy: this runs for every batch of deletes)
/// and yields its consecutive runs `(lo, hi)`.
pub(crate) fn runs(ids: &mut Vec<i64>) -> impl Iterator<Item = (i64, i64)> + '_ {
    ids.sort_unstable();
    ids.dedup();
    ids.chunk_by(|a, b| *b == *a + 1)
        .map(|run| (run[0], run[run.len() - 1]))
}

/// The writer's set of undeleted acknowledged rows, shared with the reader.
#[derive(Debug, Default)]
pub(crate) struct Undeleted {
    ids: Mutex<IdRanges>,
}

impl Undeleted {
    /// Lock the set (held for in-memory work only).
    pub(crate) fn lock(&self) -> MutexGuard<'_, IdRanges> {
        // Plain data that no panic leaves half-updated.
        self.ids.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A copy when the set is not empty (the reader filters with it outside the lock).
    pub(crate) fn snapshot(&self) -> Option<IdRanges> {
        let ids = self.lock();
        (!ids.is_empty()).then(|| ids.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_merge_only_ids_that_touch() {
        let mut s = IdRanges::default();
        s.insert_all(&mut vec![5, 3, 4, 9, 9, 11]);
        assert_eq!(s.ranges().collect::<Vec<_>>(), [(3, 5), (9, 9), (11, 11)]);
        assert_eq!(s.len(), 5);
        assert!(s.contains(4) && s.contains(9) && s.contains(11));
        assert!(!s.contains(2) && !s.contains(6) && !s.contains(10) && !s.contains(12));
        s.insert_range(6, 8);
        assert_eq!(s.ranges().collect::<Vec<_>>(), [(3, 9), (11, 11)]);
        s.insert_range(1, 20);
        assert_eq!(s.ranges().collect::<Vec<_>>(), [(1, 20)]);
        assert_eq!(s.len(), 20);
        s.insert_range(30, 31);
        assert_eq!(s.ranges().collect::<Vec<_>>(), [(1, 20), (30, 31)]);
        assert_eq!(s.len(), 22);
        s.clear();
        assert!(s.is_empty());
        assert_eq!(s.len(), 0);
        assert_eq!(
            runs(&mut vec![7, 1, 2, 2, 8]).collect::<Vec<_>>(),
            [(1, 2), (7, 8)]
        );
    }
}
