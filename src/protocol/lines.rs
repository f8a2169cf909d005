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
    /// A line longer than the limit was dropped: its length, and its first and last bytes
    /// (up to [`EDGE`] each), enough to find the id of a typical JSON-RPC message.
    TooLong {
        size: usize,
        head: Vec<u8>,
        tail: Vec<u8>,
    },
}

/// How many bytes of each end of a dropped line are kept.
pub const EDGE: usize = 128;

fn head_of(b: &[u8]) -> Vec<u8> {
    b[..b.len().min(EDGE)].to_vec()
}

/// The last `EDGE` bytes of `before` followed by `b`.
fn tail_of(before: &[u8], b: &[u8]) -> Vec<u8> {
    let mut t = before.to_vec();
    t.extend_from_slice(&b[b.len().saturating_sub(EDGE)..]);
    t.split_off(t.len().saturating_sub(EDGE))
}

/// Accumulates bytes and splits them into lines no longer than `max`.
#[derive(Debug)]
pub struct LineBuffer {
    buf: BytesMut,
    max: usize,
    /// An oversized line being skipped until its newline: bytes so far, head, tail.
    skipping: Option<(usize, Vec<u8>, Vec<u8>)>,
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

    /// Takes the bytes received but not yet returned as a line (the start of the next
    /// message), leaving the buffer empty: what an upgrade hands to the next image. (The
    /// rest of an oversized line being skipped is not carried; the next image reports it as
    /// a malformed message.)
    pub fn take_rest(&mut self) -> Vec<u8> {
        self.skipping = None;
        self.scanned = 0;
        self.buf.split().to_vec()
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
                    if let Some((skipped, _, tail)) = self.skipping.as_mut() {
                        *skipped += self.buf.len();
                        *tail = tail_of(tail, &self.buf);
                        self.buf.clear();
                        self.scanned = 0;
                    } else if self.buf.len() > self.max {
                        self.skipping =
                            Some((self.buf.len(), head_of(&self.buf), tail_of(&[], &self.buf)));
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
                    if let Some((skipped, head, tail)) = self.skipping.take() {
                        return Some(Frame::TooLong {
                            size: skipped + line.len(),
                            head,
                            tail: tail_of(&tail, &line),
                        });
                    }
                    if line.last() == Some(&b'\r') {
                        line.truncate(line.len() - 1);
                    }
                    if line.len() > self.max {
                        return Some(Frame::TooLong {
                            size: line.len(),
                            head: head_of(&line),
                            tail: tail_of(&[], &line),
                        });
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

/// Whether a message known only by its ends is a request or notification (has `"method"`).
pub fn has_method(head: &[u8], tail: &[u8]) -> bool {
    let key = br#""method""#;
    head.windows(key.len()).any(|w| w == key) || tail.windows(key.len()).any(|w| w == key)
}

/// The id of a JSON-RPC message known only by its ends (an oversized line): the id is
/// either near the start (`{"jsonrpc":"2.0","id":7,...`) or the last member
/// (`...,"id":7}`), as the common SDKs write it. Returns the raw id token.
pub fn sniff_id(head: &[u8], tail: &[u8]) -> Option<String> {
    fn token(s: &str) -> Option<&str> {
        let s = s.trim_start().strip_prefix(':')?.trim_start();
        let end = if let Some(quoted) = s.strip_prefix('"') {
            quoted.find('"')? + 2
        } else {
            s.find(|c: char| !(c.is_ascii_digit() || c == '-'))
                .unwrap_or(s.len())
        };
        Some(&s[..end]).filter(|t| {
            *t != "\"\""
                && !t.contains('\\')
                && serde_json::from_str::<serde_json::Value>(t).is_ok()
        })
    }
    let head = String::from_utf8_lossy(head);
    let mut h = head.trim_start().strip_prefix('{')?.trim_start();
    if let Some(rest) = h.strip_prefix(r#""jsonrpc""#) {
        h = rest.split_once(',').map(|(_, r)| r.trim_start())?;
    }
    if let Some(t) = h.strip_prefix(r#""id""#).and_then(token) {
        return Some(t.to_owned());
    }
    let tail = String::from_utf8_lossy(tail);
    let t = tail.trim_end().strip_suffix('}')?;
    let at = t.rfind(r#""id""#)?;
    let rest = &t[at + 4..];
    let id = token(rest)?;
    let after = rest.trim_start().strip_prefix(':')?.trim_start();
    after[id.len()..].trim().is_empty().then(|| id.to_owned())
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
    fn sniffs_the_id_of_an_oversized_message() {
        assert_eq!(
            sniff_id(br#"{"jsonrpc":"2.0","id":12,"result":{"x":"#, b"...}}"),
            Some("12".into())
        );
        assert_eq!(
            sniff_id(br#" { "id" : "a-1", "method":"#, b""),
            Some(r#""a-1""#.into())
        );
        assert_eq!(
            sniff_id(
                br#"{"result":{"content":["#,
                br#"]},"jsonrpc":"2.0","id":7}"#
            ),
            Some("7".into())
        );
        // An "id" inside the payload is not the message's id.
        assert_eq!(
            sniff_id(br#"{"result":{"id":3,"#, br#""x":{"id":4},"more":1}}"#),
            None
        );
        assert_eq!(sniff_id(b"garbage", b"garbage"), None);
    }

    #[test]
    fn oversized_line_is_dropped_and_next_survives() {
        let f = lines(&[b"0123456789", b"0123456789", b"xx\n{}\n"], 8);
        assert_eq!(
            f,
            vec![
                Frame::TooLong {
                    size: 22,
                    head: b"0123456789".to_vec(),
                    tail: b"01234567890123456789xx".to_vec()
                },
                Frame::Line(BytesMut::from(&b"{}"[..]))
            ]
        );
    }
}
