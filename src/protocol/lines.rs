//! Newline-delimited JSON-RPC framing for stdio: a byte buffer that yields whole lines.
//!
//! Pure data structure (no I/O), so the stdio front and stdio backends share it, and the
//! unparsed tail can be handed over intact (e.g. across an in-place upgrade).

use bytes::{Buf, BytesMut};

/// One framed item.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    /// A complete line without its trailing `\n` (and `\r`), never empty.
    Line(BytesMut),
    /// A line longer than the limit was dropped; carries its length so far.
    TooLong(usize),
}

/// Accumulates bytes and splits them into lines no longer than `max`.
#[derive(Debug)]
pub struct LineBuffer {
    buf: BytesMut,
    max: usize,
    /// Bytes of an oversized line being skipped until its newline.
    skipping: Option<usize>,
    /// How far `buf` has already been searched for a newline.
    scanned: usize,
}

impl LineBuffer {
    pub fn new(max: usize) -> Self {
        LineBuffer {
            buf: BytesMut::with_capacity(8192),
            max,
            skipping: None,
            scanned: 0,
        }
    }

    /// The buffer to read into (append-only).
    pub fn extend(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// Mutable access for reading straight into spare capacity.
    pub fn buf_mut(&mut self) -> &mut BytesMut {
        &mut self.buf
    }

    /// Bytes received but not yet returned as a line.
    pub fn pending(&self) -> &[u8] {
        &self.buf
    }

    /// The next complete frame, if any.
    pub fn next_frame(&mut self) -> Option<Frame> {
        loop {
            let found = self.buf[self.scanned..].iter().position(|&b| b == b'\n');
            match found {
                None => {
                    self.scanned = self.buf.len();
                    if let Some(skipped) = self.skipping.as_mut() {
                        *skipped += self.buf.len();
                        self.buf.clear();
                        self.scanned = 0;
                    } else if self.buf.len() > self.max {
                        self.skipping = Some(self.buf.len());
                        self.buf.clear();
                        self.scanned = 0;
                    }
                    return None;
                }
                Some(rel) => {
                    let end = self.scanned + rel;
                    let mut line = self.buf.split_to(end);
                    self.buf.advance(1);
                    self.scanned = 0;
                    if let Some(skipped) = self.skipping.take() {
                        return Some(Frame::TooLong(skipped + line.len()));
                    }
                    if line.last() == Some(&b'\r') {
                        line.truncate(line.len() - 1);
                    }
                    if line.len() > self.max {
                        return Some(Frame::TooLong(line.len()));
                    }
                    if line.iter().all(u8::is_ascii_whitespace) {
                        continue;
                    }
                    return Some(Frame::Line(line));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(chunks: &[&[u8]], max: usize) -> Vec<Frame> {
        let mut b = LineBuffer::new(max);
        let mut out = Vec::new();
        for c in chunks {
            b.extend(c);
            while let Some(f) = b.next_frame() {
                out.push(f);
            }
        }
        out
    }

    #[test]
    fn splits_across_chunks() {
        let f = lines(&[b"{\"a\":", b"1}\n\n{\"b\"", b":2}\r\n{\"c\""], 100);
        assert_eq!(
            f,
            vec![
                Frame::Line(BytesMut::from(&b"{\"a\":1}"[..])),
                Frame::Line(BytesMut::from(&b"{\"b\":2}"[..]))
            ]
        );
    }

    #[test]
    fn oversized_line_is_dropped_and_next_survives() {
        let f = lines(&[b"0123456789", b"0123456789", b"xx\n{}\n"], 8);
        assert_eq!(
            f,
            vec![Frame::TooLong(22), Frame::Line(BytesMut::from(&b"{}"[..]))]
        );
    }
}
