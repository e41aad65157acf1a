//! What is out towards the cloud without its final answer, by packet identifier, and what
//! that says when the link drops: which row to blame, whether rows or an unanswered QoS 2
//! PUBLISH were out. Sans-I/O; the client keeps the window and identifiers in step.

use std::collections::{HashMap, HashSet};

use crate::spool::Stage;

/// One exchange out towards the cloud.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Inflight {
    /// A spooled row; `stage` is `Released` once PUBREC arrived (QoS 2).
    Row {
        /// The spool row.
        id: i64,
        /// `New` for QoS 1, `Published`/`Released` for QoS 2.
        stage: Stage,
    },
    /// Birth or offline status (not spooled).
    Control,
}

/// The exchanges out, by packet identifier (at most one window, plus the status).
#[derive(Debug, Default)]
pub(crate) struct Outstanding {
    by_pid: HashMap<u16, Inflight>,
}

impl Outstanding {
    /// How many exchanges are out.
    pub(crate) fn len(&self) -> usize {
        self.by_pid.len()
    }

    /// The exchange under `pid`.
    pub(crate) fn get(&self, pid: u16) -> Option<Inflight> {
        self.by_pid.get(&pid).copied()
    }

    /// True when `pid` is out.
    pub(crate) fn contains(&self, pid: u16) -> bool {
        self.by_pid.contains_key(&pid)
    }

    /// `pid` went out (or resumes) as `what`.
    pub(crate) fn insert(&mut self, pid: u16, what: Inflight) {
        self.by_pid.insert(pid, what);
    }

    /// `pid` got its final answer (or never went out).
    pub(crate) fn remove(&mut self, pid: u16) {
        self.by_pid.remove(&pid);
    }

    /// PUBREC arrived for the QoS 2 row under `pid`: true when it was at `Published` and
    /// is `Released` now, false when it was already released (a repeated PUBREC).
    pub(crate) fn release(&mut self, pid: u16) -> bool {
        match self.by_pid.get_mut(&pid) {
            Some(Inflight::Row { stage, .. }) if *stage == Stage::Published => {
                *stage = Stage::Released;
                true
            }
            _ => false,
        }
    }

    /// QoS 1 rows out without their PUBACK, with the identifiers they went out under.
    pub(crate) fn qos1_rows(&self) -> Vec<(i64, u16)> {
        self.by_pid
            .iter()
            .filter_map(|(pid, f)| match f {
                Inflight::Row { id, stage } if *stage == Stage::New => Some((*id, *pid)),
                _ => None,
            })
            .collect()
    }

    /// True when a status message is out.
    pub(crate) fn status_out(&self) -> bool {
        self.by_pid.values().any(|f| matches!(f, Inflight::Control))
    }

    /// True when a row's PUBLISH is out and not acknowledged (PUBREC counts as one).
    pub(crate) fn rows_out(&self) -> bool {
        self.by_pid
            .values()
            .any(|f| matches!(f, Inflight::Row { stage, .. } if *stage != Stage::Released))
    }

    /// The row to blame for a drop: the oldest whose PUBLISH went on the wire (not in
    /// `unsent`, still waiting for its stage commit) without an answer; nobody while a
    /// status message is out. See `Client::suspect` for why only that one.
    pub(crate) fn suspect(&self, unsent: &HashSet<i64>) -> Option<i64> {
        if self.status_out() {
            return None;
        }
        self.by_pid
            .values()
            .filter_map(|f| match f {
                // PUBREC came back: its PUBLISH was accepted.
                Inflight::Row { id, stage } if *stage != Stage::Released => Some(*id),
                _ => None,
            })
            .filter(|id| !unsent.contains(id))
            .min()
    }

    /// True when a QoS 2 PUBLISH went on the wire (not in `unsent`) and has no answer.
    pub(crate) fn qos2_out(&self, unsent: &HashSet<i64>) -> bool {
        self.by_pid.values().any(|f| {
            matches!(f, Inflight::Row { id, stage } if *stage == Stage::Published && !unsent.contains(id))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: i64, stage: Stage) -> Inflight {
        Inflight::Row { id, stage }
    }

    #[test]
    fn the_oldest_unanswered_row_on_the_wire_is_to_blame() {
        let mut out = Outstanding::default();
        assert_eq!(out.suspect(&HashSet::new()), None);
        out.insert(40, row(12, Stage::New));
        out.insert(7, row(10, Stage::Released)); // PUBREC came: accepted
        out.insert(41, row(11, Stage::Published)); // waits for its stage commit
        out.insert(42, row(13, Stage::Published));
        let unsent = HashSet::from([11]);
        assert_eq!(out.suspect(&unsent), Some(12));
        out.remove(40);
        assert_eq!(out.suspect(&unsent), Some(13));
        assert!(out.rows_out() && out.qos2_out(&unsent));
        out.remove(42);
        // Row 11's PUBLISH never reached the wire: nothing QoS 2 is unanswered out there.
        assert!(!out.qos2_out(&unsent));
        assert_eq!(out.suspect(&unsent), None);
    }

    #[test]
    fn no_row_is_blamed_while_the_status_is_out() {
        let mut out = Outstanding::default();
        out.insert(1, Inflight::Control);
        out.insert(2, row(5, Stage::New));
        assert!(out.status_out());
        assert_eq!(out.suspect(&HashSet::new()), None);
        out.remove(1);
        assert_eq!(out.suspect(&HashSet::new()), Some(5));
    }

    #[test]
    fn a_pubrec_releases_once_and_a_released_row_is_not_out() {
        let mut out = Outstanding::default();
        out.insert(3, row(9, Stage::Published));
        assert!(out.release(3));
        assert!(!out.release(3), "a repeated PUBREC");
        assert_eq!(out.get(3), Some(row(9, Stage::Released)));
        assert!(!out.rows_out());
        assert!(!out.release(4), "unknown id");
        out.insert(5, Inflight::Control);
        assert!(!out.release(5));
        assert_eq!(out.len(), 2);
    }
}
