//! Variable byte integers (MQTT 3.1.1 section 2.2.3, 5.0 section 1.5.5).

use bytes::BufMut;

/// Largest value a four-byte variable byte integer carries.
pub const MAX_VARINT: u32 = 268_435_455;

/// Why a variable byte integer could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum VarIntError {
    /// A fifth byte would be needed.
    TooLong,
    /// More bytes than the value needs (MQTT-1.5.5-1).
    NotMinimal,
}

/// Read a variable byte integer from the front of `bytes`: `Ok(None)` when more bytes are
/// needed, otherwise the value and how many bytes it took.
#[inline]
pub(crate) fn read(bytes: &[u8]) -> Result<Option<(u32, usize)>, VarIntError> {
    let mut value: u32 = 0;
    for (i, &b) in bytes.iter().enumerate().take(4) {
        value |= u32::from(b & 0x7F) << (7 * i);
        if b & 0x80 == 0 {
            // A multi-byte encoding ending in a zero group could have been shorter.
            if i > 0 && b == 0 {
                return Err(VarIntError::NotMinimal);
            }
            return Ok(Some((value, i + 1)));
        }
    }
    if bytes.len() >= 4 {
        Err(VarIntError::TooLong)
    } else {
        Ok(None)
    }
}

/// Number of bytes `value` takes on the wire (values above [`MAX_VARINT`] count as 4).
#[inline]
pub(crate) fn len(value: usize) -> usize {
    match value {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

/// Append `value`, which the caller has checked is at most [`MAX_VARINT`].
#[inline]
pub(crate) fn write(buf: &mut impl BufMut, value: u32) {
    let mut v = value;
    loop {
        let byte = (v & 0x7F) as u8;
        v >>= 7;
        if v == 0 {
            buf.put_u8(byte);
            return;
        }
        buf.put_u8(byte | 0x80);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(v: u32) -> Vec<u8> {
        let mut out = Vec::new();
        write(&mut out, v);
        out
    }

    // Boundary values from table 2.4 (3.1.1) / 1.5.5 (5.0).
    #[test]
    fn spec_boundaries_round_trip() {
        for (v, bytes) in [
            (0u32, vec![0x00]),
            (127, vec![0x7F]),
            (128, vec![0x80, 0x01]),
            (16_383, vec![0xFF, 0x7F]),
            (16_384, vec![0x80, 0x80, 0x01]),
            (2_097_151, vec![0xFF, 0xFF, 0x7F]),
            (2_097_152, vec![0x80, 0x80, 0x80, 0x01]),
            (MAX_VARINT, vec![0xFF, 0xFF, 0xFF, 0x7F]),
        ] {
            assert_eq!(encode(v), bytes, "encode {v}");
            assert_eq!(len(v as usize), bytes.len());
            assert_eq!(read(&bytes), Ok(Some((v, bytes.len()))));
        }
    }

    #[test]
    fn fifth_byte_is_malformed() {
        assert_eq!(
            read(&[0xFF, 0xFF, 0xFF, 0xFF, 0x01]),
            Err(VarIntError::TooLong)
        );
        assert_eq!(read(&[0x80, 0x80, 0x80, 0x80]), Err(VarIntError::TooLong));
    }

    #[test]
    fn incomplete_needs_more() {
        assert_eq!(read(&[]), Ok(None));
        assert_eq!(read(&[0x80]), Ok(None));
        assert_eq!(read(&[0xFF, 0xFF, 0xFF]), Ok(None));
    }

    // MQTT-1.5.5-1: the encoding must use the minimum number of bytes.
    #[test]
    fn non_minimal_encoding_is_rejected_mqtt_1_5_5_1() {
        assert_eq!(read(&[0x80, 0x00]), Err(VarIntError::NotMinimal));
        assert_eq!(read(&[0x81, 0x80, 0x00]), Err(VarIntError::NotMinimal));
    }
}
