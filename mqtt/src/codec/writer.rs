//! Appending length-prefixed fields, with the 65,535-byte limit checked.

use bytes::{BufMut, BytesMut};

use crate::error::EncodeError;

/// Wire size of a length-prefixed string or binary field.
#[inline]
pub(crate) fn prefixed_len(data: &[u8]) -> usize {
    2 + data.len()
}

/// Append a two-byte length and the bytes.
#[inline]
pub(crate) fn put_prefixed(buf: &mut BytesMut, data: &[u8]) -> Result<(), EncodeError> {
    let n = u16::try_from(data.len()).map_err(|_| EncodeError::StringTooLong)?;
    buf.put_u16(n);
    buf.put_slice(data);
    Ok(())
}

/// Append a UTF-8 string.
#[inline]
pub(crate) fn put_str(buf: &mut BytesMut, s: &str) -> Result<(), EncodeError> {
    put_prefixed(buf, s.as_bytes())
}
