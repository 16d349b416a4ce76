//! Where WebSocket frames begin and end in one direction of a session, read from the bytes
//! as they pass (RFC 6455 §5.2), without holding them back: a frame's header is read by
//! `tungstenite`'s parser, its payload only counted. Knowing the boundaries lets ezgate
//! write a close frame of its own between two frames (control frames may come between the
//! fragments of a message, §5.4), and see a close frame the peer sent. The close frames
//! ezgate writes are `tungstenite`'s too.

use std::io::Cursor;

use bytes::Bytes;
use tungstenite::protocol::frame::coding::{CloseCode, Control, Data, OpCode};
use tungstenite::protocol::frame::{CloseFrame, Frame, FrameHeader, Utf8Bytes};

use super::usage::UsageWatch;

/// The longest frame header: 2 bytes, an 8-byte length and a 4-byte mask.
const MAX_HEADER: usize = 14;

/// The frame boundaries of one direction of a session.
pub struct Frames {
    head: [u8; MAX_HEADER],
    head_len: usize,
    /// Payload bytes left in the current frame; `None` while a header is being read.
    left: Option<u64>,
    opcode: OpCode,
    fin: bool,
    /// A close frame went by.
    pub close_seen: bool,
    /// A header could not be read: where frames begin is no longer known.
    pub lost: bool,
    /// Reads the upstream's `response.done` events (upstream → client only).
    usage: Option<Box<UsageWatch>>,
    /// Frames other than pongs went by, or their payload moved: the session is not idle.
    pub activity: u64,
    /// The payload of ezgate's last ping, while its pong is awaited (client → upstream).
    expect_pong: Option<[u8; PING_PAYLOAD]>,
    /// The current frame's mask and the first bytes of its payload (pongs only).
    mask: Option<[u8; 4]>,
    control: [u8; PING_PAYLOAD],
    control_len: usize,
    /// The pong awaited came.
    pub pong_heard: bool,
}

/// The length of the payload of ezgate's pings.
pub const PING_PAYLOAD: usize = 8;

impl Frames {
    /// `watch_usage`: read the usage of `response.done` events (the upstream's side).
    pub fn new(watch_usage: bool) -> Frames {
        Frames {
            head: [0; MAX_HEADER],
            head_len: 0,
            left: None,
            opcode: OpCode::Data(Data::Continue),
            fin: true,
            close_seen: false,
            lost: false,
            usage: watch_usage.then(Box::default),
            activity: 0,
            expect_pong: None,
            mask: None,
            control: [0; PING_PAYLOAD],
            control_len: 0,
            pong_heard: false,
        }
    }

    /// A ping of ezgate's with `payload` went out: the pong that echoes it is watched for.
    pub fn expect_pong(&mut self, payload: [u8; PING_PAYLOAD]) {
        self.expect_pong = Some(payload);
        self.pong_heard = false;
    }

    /// The estimated tokens of the text deltas of responses not done yet, while one is
    /// under way.
    pub fn unfinished(&self) -> Option<u64> {
        self.usage.as_ref().and_then(|u| u.unfinished())
    }

    fn is_pong(&self) -> bool {
        self.opcode == OpCode::Control(Control::Pong)
    }

    /// Between two frames: a close frame of ezgate's may be written now.
    pub fn at_boundary(&self) -> bool {
        !self.lost && self.left.is_none() && self.head_len == 0
    }

    /// The usage read so far, if any event carried some.
    pub fn usage(&self) -> Option<crate::outcome::Usage> {
        self.usage.as_ref().and_then(|u| u.total())
    }

    /// Reads `data` up to the end of the frame it is in. Returns how many bytes that took
    /// when a frame ended inside `data` (the caller reads on from there), `None` when all of
    /// `data` belongs to a frame that goes on.
    pub fn next_boundary(&mut self, data: &[u8]) -> Option<usize> {
        if self.lost || data.is_empty() {
            return None;
        }
        let mut at = 0;
        let left = match self.left {
            Some(left) => left,
            None => {
                at = self.read_header(data)?;
                match self.left {
                    Some(0) => {
                        self.frame_ended();
                        return Some(at);
                    }
                    Some(left) => left,
                    None => return None,
                }
            }
        };
        let rest = &data[at..];
        let take = usize::try_from(left).map_or(rest.len(), |l| l.min(rest.len()));
        let data_frame = self.opcode_is_data();
        if let (Some(u), true) = (&mut self.usage, data_frame) {
            u.payload(&rest[..take]);
        }
        if self.is_pong() {
            if self.expect_pong.is_some() {
                self.pong_payload(&rest[..take]);
            }
        } else if take > 0 {
            self.activity += 1;
        }
        let left = left - take as u64;
        if left == 0 {
            self.frame_ended();
            Some(at + take)
        } else {
            self.left = Some(left);
            None
        }
    }

    /// Collects header bytes from `data`; returns how many it took once the header is
    /// complete (and `self.left` is set), `None` when it needs more.
    fn read_header(&mut self, data: &[u8]) -> Option<usize> {
        let mut at = 0;
        loop {
            let need = header_len(&self.head[..self.head_len]);
            if self.head_len == need {
                break;
            }
            let n = (need - self.head_len).min(data.len() - at);
            if n == 0 {
                return None;
            }
            self.head[self.head_len..self.head_len + n].copy_from_slice(&data[at..at + n]);
            self.head_len += n;
            at += n;
        }
        let parsed = FrameHeader::parse(&mut Cursor::new(&self.head[..self.head_len]));
        self.head_len = 0;
        match parsed {
            Ok(Some((header, len))) => {
                self.frame_started(&header);
                self.left = Some(len);
                Some(at)
            }
            // A reserved opcode (or, impossibly, a short header): the peer speaks something
            // else; its bytes still pass, but no close frame can be placed among them.
            _ => {
                self.lost = true;
                None
            }
        }
    }

    fn opcode_is_data(&self) -> bool {
        matches!(self.opcode, OpCode::Data(_))
    }

    fn frame_started(&mut self, header: &FrameHeader) {
        self.opcode = header.opcode;
        self.fin = header.is_final;
        self.mask = header.mask;
        self.control_len = 0;
        if !self.is_pong() {
            self.activity += 1;
        }
        if header.opcode == OpCode::Control(Control::Close) {
            self.close_seen = true;
        }
        if let (Some(u), OpCode::Data(data)) = (&mut self.usage, header.opcode) {
            match data {
                // A text message begins (compressed ones are not read).
                Data::Text => u.message_started(!header.rsv1),
                Data::Continue => {}
                _ => u.message_started(false),
            }
        }
    }

    /// Collects a pong's payload (unmasked), as far as a ping of ezgate's carries one.
    fn pong_payload(&mut self, data: &[u8]) {
        for &b in data {
            if self.control_len < PING_PAYLOAD {
                let key = self.mask.map_or(0, |m| m[self.control_len % 4]);
                self.control[self.control_len] = b ^ key;
            }
            self.control_len += 1;
        }
    }

    fn frame_ended(&mut self) {
        self.left = None;
        if self.is_pong()
            && self.control_len == PING_PAYLOAD
            && self.expect_pong == Some(self.control)
        {
            self.expect_pong = None;
            self.pong_heard = true;
        }
        let message_end = self.fin && self.opcode_is_data();
        if let (Some(u), true) = (&mut self.usage, message_end) {
            u.message_ended();
        }
    }
}

/// The length of the header that begins with `head` (2 while fewer bytes are known).
fn header_len(head: &[u8]) -> usize {
    let [_, second, ..] = head else {
        return 2;
    };
    let length = match second & 0x7f {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    let mask = if second & 0x80 != 0 { 4 } else { 0 };
    2 + length + mask
}

/// A ping of ezgate's to the client (unmasked: it goes from the server side).
pub fn ping_frame(payload: [u8; PING_PAYLOAD]) -> Bytes {
    let frame = Frame::ping(payload.to_vec());
    let mut out = Vec::with_capacity(2 + PING_PAYLOAD);
    // Writing into a Vec cannot fail.
    let _ = frame.format(&mut out);
    Bytes::from(out)
}

/// A close frame with `code` and `reason` (at most 123 bytes), masked with `mask` when it
/// goes to the upstream (a client's frames are masked, §5.3).
pub fn close_frame(code: CloseCode, reason: &'static str, mask: Option<[u8; 4]>) -> Bytes {
    let mut frame = Frame::close(Some(CloseFrame {
        code,
        reason: Utf8Bytes::from_static(reason),
    }));
    frame.header_mut().mask = mask;
    let mut out = Vec::with_capacity(2 + 4 + 2 + reason.len());
    // Writing into a Vec cannot fail.
    let _ = frame.format(&mut out);
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame as a peer sends it.
    fn frame(opcode: OpCode, fin: bool, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
        let mut f = match opcode {
            OpCode::Control(Control::Ping) => Frame::ping(payload.to_vec()),
            _ => Frame::message(payload.to_vec(), opcode, fin),
        };
        f.header_mut().mask = mask;
        let mut out = Vec::new();
        f.format(&mut out).unwrap();
        out
    }

    /// Every boundary `Frames` finds in `bytes` fed in pieces of `step`.
    fn boundaries(bytes: &[u8], step: usize) -> Vec<usize> {
        let mut frames = Frames::new(true);
        let mut found = Vec::new();
        for (i, piece) in bytes.chunks(step).enumerate() {
            let mut at = 0;
            while let Some(n) = frames.next_boundary(&piece[at..]) {
                at += n;
                found.push(i * step + at);
                if at == piece.len() {
                    break;
                }
            }
        }
        found
    }

    #[test]
    fn boundaries_are_found_however_the_bytes_are_split() {
        let text = OpCode::Data(Data::Text);
        let mut bytes = frame(text, true, b"hello", None);
        let a = bytes.len();
        bytes.extend(frame(
            OpCode::Data(Data::Binary),
            true,
            &[7; 300],
            Some([1, 2, 3, 4]),
        ));
        let b = bytes.len();
        bytes.extend(frame(OpCode::Control(Control::Ping), true, b"", None));
        let c = bytes.len();
        bytes.extend(frame(text, false, &[b'x'; 70_000], None));
        let d = bytes.len();
        bytes.extend(frame(
            OpCode::Data(Data::Continue),
            true,
            b"end",
            Some([9; 4]),
        ));
        let e = bytes.len();
        for step in [1, 2, 3, 7, 13, 1000, 100_000] {
            assert_eq!(
                boundaries(&bytes, step),
                [a, b, c, d, e],
                "pieces of {step}"
            );
        }
    }

    #[test]
    fn a_close_frame_is_seen_and_a_reserved_opcode_loses_the_boundaries() {
        let mut frames = Frames::new(false);
        let close = close_frame(CloseCode::Away, "bye", Some([1, 2, 3, 4]));
        assert_eq!(frames.next_boundary(&close), Some(close.len()));
        assert!(frames.close_seen && frames.at_boundary());
        let mut frames = Frames::new(false);
        assert_eq!(frames.next_boundary(&[0x83, 0x00, 1, 2]), None);
        assert!(frames.lost && !frames.at_boundary());
    }

    #[test]
    fn close_frames_read_back_with_their_code() {
        for mask in [None, Some([0xa1, 0xb2, 0xc3, 0xd4])] {
            let bytes = close_frame(CloseCode::Away, "ezgate is shutting down", mask);
            let mut cursor = Cursor::new(&bytes[..]);
            let (header, len) = FrameHeader::parse(&mut cursor).unwrap().unwrap();
            assert_eq!(header.opcode, OpCode::Control(Control::Close));
            assert_eq!(header.mask, mask);
            let at = cursor.position() as usize;
            let mut payload = bytes[at..].to_vec();
            assert_eq!(payload.len() as u64, len);
            if let Some(m) = mask {
                for (i, b) in payload.iter_mut().enumerate() {
                    *b ^= m[i % 4];
                }
            }
            assert_eq!(&payload[..2], &1001u16.to_be_bytes());
            assert_eq!(&payload[2..], b"ezgate is shutting down");
        }
    }
}
