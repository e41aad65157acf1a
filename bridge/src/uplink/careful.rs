//! Careful resend after repeated drops, without I/O. When the cloud dropped the link twice
//! with the same row blamed, the rows that were out then go up one at a time: a row goes
//! only when nothing else is out and the cloud has answered a PINGREQ sent after that (a
//! barrier), so a drop after it can only be about this row, not about something before it
//! that the cloud acknowledged and then disconnected us for.

/// After the cloud dropped a link: through which row the rows that were out are resent one
/// at a time, if at all. One drop with messages out is what any flaky link does, and one
/// at a time would then crawl (a window sized to a slow link is hundreds of round trips).
/// The same row oldest in flight at two drops in a row is what a poison message does: only
/// then, to tell which row it is. `last_drop` is the row blamed at the previous loss when
/// that was a drop too (`Some(None)`: nobody was blamed).
pub(crate) fn careful_after_drop(
    last_drop: Option<Option<i64>>,
    suspect: Option<i64>,
    out_through: Option<i64>,
    careful_through: i64,
    dead_letter_after: u32,
) -> Option<i64> {
    let through = out_through?;
    (dead_letter_after > 0 && through > careful_through && last_drop == Some(suspect))
        .then_some(through)
}

/// What a row must do before it may go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Gate {
    /// It may go.
    Go,
    /// Something is still out: wait for its answer.
    Wait,
    /// Nothing is out, but the cloud has not confirmed it is done with what went before:
    /// a PINGREQ barrier is due (unless one is out), then wait for its PINGRESP.
    Barrier,
}

/// Careful-resend state of one session.
#[derive(Debug, Default)]
pub(crate) struct Careful {
    /// Rows up to here were out when the cloud last dropped the link (0: not careful).
    through: i64,
    /// The newest row whose PUBLISH went out in this session.
    newest_sent: i64,
    /// The cloud answered a barrier sent while nothing was out; the next row may go.
    ready: bool,
    /// The outstanding PINGREQ is such a barrier.
    barrier_out: bool,
}

impl Careful {
    /// Careful through row `through` (0: not at all).
    pub(crate) fn new(through: i64) -> Self {
        Careful {
            through,
            ..Default::default()
        }
    }

    /// Whether row `id` may go; `anything_out` (rows or status out, or waiting for a
    /// stage commit) is asked only while careful, so the normal case scans nothing.
    pub(crate) fn gate(&self, id: i64, anything_out: impl FnOnce() -> bool) -> Gate {
        if self.through == 0 || (id > self.through && self.newest_sent > self.through) {
            return Gate::Go;
        }
        if anything_out() {
            Gate::Wait
        } else if self.ready {
            Gate::Go
        } else {
            Gate::Barrier
        }
    }

    /// A barrier PINGREQ went out.
    pub(crate) fn on_barrier_sent(&mut self) {
        self.barrier_out = true;
    }

    /// A PINGRESP came.
    pub(crate) fn on_pingresp(&mut self) {
        if std::mem::take(&mut self.barrier_out) {
            self.ready = true;
        }
    }

    /// Row `row`'s PUBLISH was given to the wire: the next row needs a new barrier.
    pub(crate) fn on_publish(&mut self, row: i64) {
        self.newest_sent = self.newest_sent.max(row);
        self.ready = false;
    }

    /// The newest row whose PUBLISH went out in this session (0: none).
    pub(crate) fn newest_sent(&self) -> i64 {
        self.newest_sent
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_careful_means_every_row_goes_without_looking_at_the_window() {
        let c = Careful::new(0);
        assert_eq!(c.gate(1, || unreachable!("scanned the window")), Gate::Go);
    }

    #[test]
    fn careful_rows_go_alone_each_behind_an_answered_barrier() {
        let mut c = Careful::new(2);
        assert_eq!(c.gate(1, || false), Gate::Barrier);
        c.on_barrier_sent();
        // The barrier is answered: the cloud is done with everything before.
        c.on_pingresp();
        assert_eq!(c.gate(1, || false), Gate::Go);
        c.on_publish(1);
        assert_eq!(c.gate(2, || true), Gate::Wait);
        // Row 1 acknowledged: a fresh barrier before row 2.
        assert_eq!(c.gate(2, || false), Gate::Barrier);
        c.on_pingresp(); // not a barrier's answer: nothing changes
        assert_eq!(c.gate(2, || false), Gate::Barrier);
        c.on_barrier_sent();
        c.on_pingresp();
        assert_eq!(c.gate(2, || false), Gate::Go);
        c.on_publish(2);
        // The first row past them still waits for the window to empty and a barrier;
        // once it is out, the rest go freely.
        assert_eq!(c.gate(3, || true), Gate::Wait);
        c.on_barrier_sent();
        c.on_pingresp();
        assert_eq!(c.gate(3, || false), Gate::Go);
        c.on_publish(3);
        assert_eq!(
            c.gate(4, || unreachable!("past the careful rows")),
            Gate::Go
        );
        assert_eq!(c.newest_sent(), 3);
    }

    #[test]
    fn one_drop_resends_the_window_pipelined() {
        assert_eq!(careful_after_drop(None, Some(10), Some(90), 0, 3), None);
        // A drop after a keep-alive loss (not a drop) starts over too.
        assert_eq!(careful_after_drop(None, Some(10), Some(90), 5, 3), None);
    }

    #[test]
    fn the_same_row_blamed_twice_in_a_row_goes_one_at_a_time() {
        assert_eq!(
            careful_after_drop(Some(Some(10)), Some(10), Some(90), 0, 3),
            Some(90)
        );
        // Nobody blamed twice (the status message was out both times) counts as the same.
        assert_eq!(
            careful_after_drop(Some(None), None, Some(90), 0, 3),
            Some(90)
        );
    }

    #[test]
    fn progress_between_drops_or_nothing_out_or_no_poison_guard_never_goes_careful() {
        assert_eq!(
            careful_after_drop(Some(Some(10)), Some(11), Some(90), 0, 3),
            None
        );
        assert_eq!(
            careful_after_drop(Some(Some(10)), Some(10), None, 0, 3),
            None
        );
        assert_eq!(
            careful_after_drop(Some(Some(10)), Some(10), Some(90), 0, 0),
            None
        );
        // Already careful through these rows.
        assert_eq!(
            careful_after_drop(Some(Some(10)), Some(10), Some(90), 90, 3),
            None
        );
    }
}
