//! A cursor over one packet's body that hands out fields without copying.

use bytes::Bytes;
use bytestring::ByteString;

use super::varint;
use crate::error::DecodeError;

/// Reads fields from the body of one packet; every read checks the bounds first.
pub(crate) struct Reader<'a> {
    buf: &'a Bytes,
    pos: usize,
    end: usize,
}

impl<'a> Reader<'a> {
    /// A reader over the whole of `buf`.
    pub(crate) fn new(buf: &'a Bytes) -> Self {
        Reader {
            buf,
            pos: 0,
            end: buf.len(),
        }
    }

    /// Bytes left to read.
    #[inline]
    pub(crate) fn remaining(&self) -> usize {
        self.end - self.pos
    }

    /// True when every byte has been read.
    #[inline]
    pub(crate) fn is_empty(&self) -> bool {
        self.pos == self.end
    }

    /// Fail unless every byte has been read.
    pub(crate) fn finish(&self) -> Result<(), DecodeError> {
        if self.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes)
        }
    }

    #[inline]
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.remaining() < n {
            return Err(DecodeError::Truncated);
        }
        let start = self.pos;
        self.pos += n;
        Ok(&self.buf[start..self.pos])
    }

    /// Split off the next `n` bytes as a reader of their own (a property block).
    pub(crate) fn sub(&mut self, n: usize) -> Result<Reader<'a>, DecodeError> {
        if self.remaining() < n {
            return Err(DecodeError::Truncated);
        }
        let sub = Reader {
            buf: self.buf,
            pos: self.pos,
            end: self.pos + n,
        };
        self.pos += n;
        Ok(sub)
    }

    /// One byte.
    #[inline]
    pub(crate) fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    /// A big-endian two-byte integer.
    #[inline]
    pub(crate) fn u16(&mut self) -> Result<u16, DecodeError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    /// A big-endian four-byte integer.
    pub(crate) fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A variable byte integer.
    pub(crate) fn varint(&mut self) -> Result<u32, DecodeError> {
        match varint::read(&self.buf[self.pos..self.end]) {
            Ok(Some((v, n))) => {
                self.pos += n;
                Ok(v)
            }
            Ok(None) => Err(DecodeError::Truncated),
            Err(_) => Err(DecodeError::MalformedVarInt),
        }
    }

    /// A non-zero packet identifier (MQTT-2.3.1-1, 5.0 MQTT-2.2.1-3).
    pub(crate) fn packet_id(&mut self) -> Result<u16, DecodeError> {
        match self.u16()? {
            0 => Err(DecodeError::ZeroPacketId),
            id => Ok(id),
        }
    }

    /// The raw bytes of a length-prefixed field.
    #[inline]
    pub(crate) fn prefixed(&mut self) -> Result<&'a [u8], DecodeError> {
        let n = usize::from(self.u16()?);
        self.take(n)
    }

    /// A UTF-8 string, borrowed (MQTT-1.5.3-1/2: well-formed, no U+0000).
    pub(crate) fn str(&mut self) -> Result<&'a str, DecodeError> {
        let raw = self.prefixed()?;
        let s = std::str::from_utf8(raw).map_err(|_| DecodeError::InvalidUtf8)?;
        if raw.contains(&0) {
            return Err(DecodeError::InvalidUtf8);
        }
        Ok(s)
    }

    /// A UTF-8 string, owned.
    pub(crate) fn string(&mut self) -> Result<String, DecodeError> {
        self.str().map(str::to_owned)
    }

    /// A UTF-8 string sharing the packet's memory.
    pub(crate) fn byte_string(&mut self) -> Result<ByteString, DecodeError> {
        let n = usize::from(self.u16()?);
        if self.remaining() < n {
            return Err(DecodeError::Truncated);
        }
        let bytes = self.buf.slice(self.pos..self.pos + n);
        self.pos += n;
        if bytes.contains(&0) {
            return Err(DecodeError::InvalidUtf8);
        }
        ByteString::try_from(bytes).map_err(|_| DecodeError::InvalidUtf8)
    }

    /// Length-prefixed binary data sharing the packet's memory.
    pub(crate) fn binary(&mut self) -> Result<Bytes, DecodeError> {
        let n = usize::from(self.u16()?);
        if self.remaining() < n {
            return Err(DecodeError::Truncated);
        }
        let bytes = self.buf.slice(self.pos..self.pos + n);
        self.pos += n;
        Ok(bytes)
    }
}
