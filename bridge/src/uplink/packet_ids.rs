//! Packet identifier allocation for the cloud session.

/// Which of the 65,535 identifiers are taken; allocation rotates so a freed identifier is
/// not reused at once (helps when reading captures and server logs).
pub struct PacketIds {
    used: Vec<bool>,
    next: u16,
    in_use: usize,
}

impl Default for PacketIds {
    fn default() -> Self {
        PacketIds {
            used: vec![false; 65_536],
            next: 1,
            in_use: 0,
        }
    }
}

impl PacketIds {
    /// Mark an identifier (restored from the spool) as taken.
    pub fn reserve(&mut self, id: u16) {
        if id != 0 && !self.used[id as usize] {
            self.used[id as usize] = true;
            self.in_use += 1;
        }
    }

    /// A free identifier, `None` when all are taken.
    pub fn alloc(&mut self) -> Option<u16> {
        if self.in_use >= 65_535 {
            return None;
        }
        loop {
            let id = self.next;
            self.next = if self.next == u16::MAX {
                1
            } else {
                self.next + 1
            };
            if !self.used[id as usize] {
                self.used[id as usize] = true;
                self.in_use += 1;
                return Some(id);
            }
        }
    }

    /// Free an identifier.
    pub fn release(&mut self, id: u16) {
        if self.used[id as usize] {
            self.used[id as usize] = false;
            self.in_use -= 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_hands_out_zero_or_a_reserved_id() {
        let mut ids = PacketIds::default();
        ids.reserve(2);
        assert_eq!(ids.alloc(), Some(1));
        assert_eq!(ids.alloc(), Some(3));
        let mut n = 2;
        while ids.alloc().is_some() {
            n += 1;
        }
        assert_eq!(n, 65_534, "every id but 0 and the reserved one");
        ids.release(40_000);
        assert_eq!(ids.alloc(), Some(40_000));
        assert_eq!(ids.alloc(), None);
    }
}
