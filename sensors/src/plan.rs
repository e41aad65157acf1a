//! Coalescing of point reads into the fewest requests the register map allows.

use crate::point::Area;

/// An item to read: one point's span in an area.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    /// Caller's index of the point.
    pub point: usize,
    /// Area.
    pub area: Area,
    /// First address (0-based, on the wire).
    pub start: u16,
    /// Registers or bits.
    pub count: u16,
}

/// One read request covering several points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Read {
    /// Area (selects the function code).
    pub area: Area,
    /// First address.
    pub start: u16,
    /// Registers or bits.
    pub count: u16,
    /// Points served by this read, in address order.
    pub points: Vec<usize>,
}

/// Limits that bound a coalesced read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest unused run a read may span.
    pub max_gap: u16,
    /// Largest register read.
    pub max_registers: u16,
    /// Largest bit read.
    pub max_bits: u16,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_gap: 8,
            max_registers: 125,
            max_bits: 2000,
        }
    }
}

/// Groups spans into reads: left to right, each read grows while the next point starts within
/// `max_gap` of its end and the read stays within the size limit. Greedy is optimal here:
/// every read starts at the first uncovered point and reaches as far as the limits allow.
pub fn plan(spans: &[Span], limits: Limits) -> Vec<Read> {
    let mut sorted: Vec<Span> = spans.to_vec();
    sorted.sort_by_key(|s| (s.area, s.start, s.count));
    let mut reads: Vec<Read> = Vec::new();
    for s in sorted {
        let max = if s.area.is_bit() {
            limits.max_bits
        } else {
            limits.max_registers
        };
        let s_end = u32::from(s.start) + u32::from(s.count);
        if let Some(r) = reads.last_mut()
            && r.area == s.area
        {
            let r_end = u32::from(r.start) + u32::from(r.count);
            let gap = u32::from(s.start).saturating_sub(r_end);
            let new_end = r_end.max(s_end);
            if gap <= u32::from(limits.max_gap) && new_end - u32::from(r.start) <= u32::from(max) {
                r.count = (new_end - u32::from(r.start)) as u16;
                r.points.push(s.point);
                continue;
            }
        }
        reads.push(Read {
            area: s.area,
            start: s.start,
            count: s.count,
            points: vec![s.point],
        });
    }
    reads
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sp(point: usize, area: Area, start: u16, count: u16) -> Span {
        Span {
            point,
            area,
            start,
            count,
        }
    }

    fn shape(reads: &[Read]) -> Vec<(Area, u16, u16, Vec<usize>)> {
        reads
            .iter()
            .map(|r| (r.area, r.start, r.count, r.points.clone()))
            .collect()
    }

    #[test]
    fn adjacent_points_join() {
        let spans = [
            sp(0, Area::Holding, 0, 2),
            sp(1, Area::Holding, 2, 1),
            sp(2, Area::Holding, 3, 4),
        ];
        assert_eq!(
            shape(&plan(&spans, Limits::default())),
            vec![(Area::Holding, 0, 7, vec![0, 1, 2])]
        );
    }

    #[test]
    fn gap_limit_splits() {
        let spans = [
            sp(0, Area::Input, 0, 1),
            sp(1, Area::Input, 5, 1),
            sp(2, Area::Input, 20, 2),
        ];
        let l = Limits {
            max_gap: 4,
            ..Limits::default()
        };
        assert_eq!(
            shape(&plan(&spans, l)),
            vec![
                (Area::Input, 0, 6, vec![0, 1]),
                (Area::Input, 20, 2, vec![2])
            ]
        );
        let l = Limits {
            max_gap: 3,
            ..Limits::default()
        };
        assert_eq!(plan(&spans, l).len(), 3);
    }

    #[test]
    fn register_limit_splits_at_125() {
        // 70 two-register points back to back: 140 registers need two reads (124 + 16).
        let spans: Vec<Span> = (0..70)
            .map(|i| sp(i, Area::Holding, (i * 2) as u16, 2))
            .collect();
        let reads = plan(&spans, Limits::default());
        assert_eq!(reads.len(), 2);
        assert_eq!((reads[0].start, reads[0].count), (0, 124));
        assert_eq!((reads[1].start, reads[1].count), (124, 16));
        assert!(reads.iter().all(|r| r.count <= 125));
    }

    #[test]
    fn areas_never_mix_and_order_is_by_address() {
        let spans = [
            sp(0, Area::Holding, 10, 1),
            sp(1, Area::Input, 10, 1),
            sp(2, Area::Holding, 9, 1),
            sp(3, Area::Coil, 0, 1),
            sp(4, Area::Coil, 100, 1),
            sp(5, Area::Discrete, 3, 1),
        ];
        assert_eq!(
            shape(&plan(&spans, Limits::default())),
            vec![
                (Area::Coil, 0, 1, vec![3]),
                (Area::Coil, 100, 1, vec![4]),
                (Area::Discrete, 3, 1, vec![5]),
                (Area::Input, 10, 1, vec![1]),
                (Area::Holding, 9, 2, vec![2, 0]),
            ]
        );
    }

    #[test]
    fn overlapping_points_share_registers() {
        // A u32 and its low word as u16, plus a bit of the high word.
        let spans = [
            sp(0, Area::Holding, 0, 2),
            sp(1, Area::Holding, 1, 1),
            sp(2, Area::Holding, 0, 1),
        ];
        assert_eq!(
            shape(&plan(&spans, Limits::default())),
            vec![(Area::Holding, 0, 2, vec![2, 0, 1])]
        );
    }

    #[test]
    fn top_of_address_space() {
        let spans = [
            sp(0, Area::Holding, 65534, 2),
            sp(1, Area::Holding, 65530, 1),
        ];
        assert_eq!(
            shape(&plan(&spans, Limits::default())),
            vec![(Area::Holding, 65530, 6, vec![1, 0])]
        );
    }
}
