//! Splitting a serial byte stream into frames: newline-delimited or fixed length.

use crate::config::Framing;

/// A frame or a framing problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// One complete frame (without the line terminator).
    Data(Vec<u8>),
    /// A line discarded because it grew beyond the limit.
    TooLong,
}

/// Incremental framer.
#[derive(Debug)]
pub struct Framer {
    framing: Framing,
    limit: usize,
    buf: Vec<u8>,
    discarding: bool,
}

impl Framer {
    /// A framer; `limit` is the fixed frame size or the longest accepted line.
    pub fn new(framing: Framing, limit: usize) -> Self {
        Framer {
            framing,
            limit: limit.max(1),
            buf: Vec::new(),
            discarding: false,
        }
    }

    /// Drops any partial frame (after a reopen the old bytes mean nothing).
    pub fn reset(&mut self) {
        self.buf.clear();
        self.discarding = false;
    }

    /// Feeds bytes and returns the frames they complete.
    pub fn push(&mut self, data: &[u8]) -> Vec<Frame> {
        let mut out = Vec::new();
        match self.framing {
            Framing::Fixed => {
                for &b in data {
                    self.buf.push(b);
                    if self.buf.len() == self.limit {
                        out.push(Frame::Data(std::mem::take(&mut self.buf)));
                    }
                }
            }
            Framing::Lines => {
                for &b in data {
                    if b == b'\n' {
                        if self.discarding {
                            self.discarding = false;
                            self.buf.clear();
                            continue;
                        }
                        let mut line = std::mem::take(&mut self.buf);
                        if line.last() == Some(&b'\r') {
                            line.pop();
                        }
                        if !line.is_empty() {
                            out.push(Frame::Data(line));
                        }
                    } else if !self.discarding {
                        self.buf.push(b);
                        if self.buf.len() > self.limit {
                            out.push(Frame::TooLong);
                            self.buf.clear();
                            self.discarding = true;
                        }
                    }
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_across_chunks() {
        let mut f = Framer::new(Framing::Lines, 16);
        assert_eq!(f.push(b"a=1\r\nb="), vec![Frame::Data(b"a=1".to_vec())]);
        assert_eq!(f.push(b"2\n\n"), vec![Frame::Data(b"b=2".to_vec())]);
    }

    #[test]
    fn overlong_line_is_dropped_whole() {
        let mut f = Framer::new(Framing::Lines, 4);
        assert_eq!(f.push(b"abcdefgh"), vec![Frame::TooLong]);
        assert_eq!(f.push(b"ij\nok\n"), vec![Frame::Data(b"ok".to_vec())]);
    }

    #[test]
    fn fixed_frames() {
        let mut f = Framer::new(Framing::Fixed, 3);
        assert_eq!(f.push(b"abcd"), vec![Frame::Data(b"abc".to_vec())]);
        assert_eq!(f.push(b"ef"), vec![Frame::Data(b"def".to_vec())]);
    }
}
