//! The 16-byte header every benchmark payload starts with: which publisher, which
//! sequence number, and when it was sent, so subscribers can measure latency and find
//! loss, duplicates and reordering without any shared state.

/// Bytes of header at the start of every payload; the rest is padding.
pub const HEADER_LEN: usize = 16;

/// Sequence numbers use the low 48 bits; the publisher index takes the top 16.
const SEQ_BITS: u32 = 48;
const SEQ_MASK: u64 = (1 << SEQ_BITS) - 1;

/// What a payload header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Index of the publisher that sent it.
    pub publisher: u16,
    /// Sequence number within that publisher, from 0.
    pub seq: u64,
    /// Send time, nanoseconds since the run's shared epoch.
    pub sent_ns: u64,
}

/// Writes `h` into the first [`HEADER_LEN`] bytes of `dst` (which must be that long).
pub fn write_header(dst: &mut [u8], h: Header) {
    let tagged = ((h.publisher as u64) << SEQ_BITS) | (h.seq & SEQ_MASK);
    dst[..8].copy_from_slice(&tagged.to_be_bytes());
    dst[8..16].copy_from_slice(&h.sent_ns.to_be_bytes());
}

/// Reads a header, `None` if the payload is too short to hold one.
pub fn read_header(src: &[u8]) -> Option<Header> {
    let tagged = u64::from_be_bytes(src.get(..8)?.try_into().ok()?);
    let sent_ns = u64::from_be_bytes(src.get(8..16)?.try_into().ok()?);
    Some(Header {
        publisher: (tagged >> SEQ_BITS) as u16,
        seq: tagged & SEQ_MASK,
        sent_ns,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips() {
        let h = Header {
            publisher: 65535,
            seq: (1 << 48) - 1,
            sent_ns: u64::MAX - 7,
        };
        let mut buf = [0u8; 64];
        write_header(&mut buf, h);
        assert_eq!(read_header(&buf), Some(h));
    }

    #[test]
    fn short_payload_has_no_header() {
        assert_eq!(read_header(&[0u8; 15]), None);
    }
}
