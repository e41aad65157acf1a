//! Per-publisher bookkeeping on the subscriber side: which sequence numbers arrived, so
//! loss, duplicates and reordering are counted exactly.

/// Tracks the sequence numbers one subscriber has seen from one publisher.
#[derive(Debug, Default, Clone)]
pub struct SeqTracker {
    seen: Vec<u64>,
    highest: Option<u64>,
    /// Distinct sequence numbers received.
    pub unique: u64,
    /// Messages whose sequence number had already been received.
    pub duplicates: u64,
    /// New messages that arrived after a higher sequence number.
    pub reordered: u64,
}

/// What one received sequence number was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// First time this number was seen.
    New,
    /// Seen before.
    Duplicate,
}

impl SeqTracker {
    /// Records `seq` and says whether it is new.
    pub fn record(&mut self, seq: u64) -> Arrival {
        let (word, bit) = ((seq / 64) as usize, seq % 64);
        if word >= self.seen.len() {
            // Grow geometrically: sequence numbers arrive (nearly) in order.
            let len = (word + 1).max(self.seen.len() * 2);
            self.seen.resize(len, 0);
        }
        let mask = 1u64 << bit;
        if self.seen[word] & mask != 0 {
            self.duplicates += 1;
            return Arrival::Duplicate;
        }
        self.seen[word] |= mask;
        self.unique += 1;
        match self.highest {
            Some(h) if seq < h => self.reordered += 1,
            _ => self.highest = Some(seq),
        }
        Arrival::New
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_new_duplicate_and_reordered() {
        let mut t = SeqTracker::default();
        assert_eq!(t.record(0), Arrival::New);
        assert_eq!(t.record(2), Arrival::New);
        assert_eq!(t.record(1), Arrival::New);
        assert_eq!(t.record(2), Arrival::Duplicate);
        assert_eq!(t.record(1000), Arrival::New);
        assert_eq!((t.unique, t.duplicates, t.reordered), (4, 1, 1));
    }
}
