//! The body of a response read by ezgate's HTTP/1.1 client (`wire.rs`): read from the
//! connection by whoever polls it (the client connection's task), in frames that share the
//! connection's read buffer, to its length, its last chunk or the connection's end. When the
//! answer came before the whole request was written, it writes the rest as it reads.

use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use http::{HeaderMap, HeaderName, HeaderValue};
use http_body::{Frame, SizeHint};

use super::head::MAX_HEADERS;
use super::send::{is_write_error, Sender};
use super::wire::{closed_early, malformed, H1Conn, MAX_HEAD};
use super::BoxError;

/// The longest chunk-size line, extensions included (hyper allows 4 KiB of extensions).
const MAX_CHUNK_LINE: usize = 4096;

/// How a response body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Framing {
    /// This many bytes (0: no body).
    Length(u64),
    Chunked,
    /// Up to the end of the connection.
    Close,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Length(u64),
    Close,
    /// Expecting a chunk-size line.
    Size,
    /// Inside a chunk, this many bytes left.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailers, or the empty line.
    Trailers,
    Done,
    Failed,
}

/// A response body read from an HTTP/1.1 connection.
pub(super) struct OwnBody {
    conn: Option<H1Conn>,
    state: State,
    /// The connection may carry another request once this body ended.
    keep: bool,
    /// What is left to write of the request (an answer that came before all of it).
    sending: Option<Box<Sender>>,
}

impl OwnBody {
    pub(super) fn new(
        conn: H1Conn,
        framing: Framing,
        keep: bool,
        sending: Option<Box<Sender>>,
    ) -> OwnBody {
        let state = match framing {
            Framing::Length(0) => State::Done,
            Framing::Length(n) => State::Length(n),
            Framing::Chunked => State::Size,
            Framing::Close => State::Close,
        };
        let mut body = OwnBody {
            conn: Some(conn),
            state,
            keep,
            sending,
        };
        if body.state == State::Size {
            // A response that came whole ends with its head.
            let _ = body.settle();
        }
        body
    }

    pub(super) fn is_end(&self) -> bool {
        matches!(self.state, State::Done | State::Failed)
    }

    pub(super) fn size_hint(&self) -> SizeHint {
        match self.state {
            State::Length(n) => SizeHint::with_exact(n),
            State::Done | State::Failed => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }

    /// The connection, when this body ended cleanly, the whole request was written and it
    /// can carry another request.
    pub(super) fn take_conn(&mut self) -> Option<H1Conn> {
        let conn = self.conn.take()?;
        let clean = self.state == State::Done && self.sending.is_none() && conn.rd.is_empty();
        (clean && self.keep).then_some(conn)
    }

    /// Writes what it can of the rest of the request.
    fn send(&mut self, cx: &mut Context<'_>) -> Result<(), BoxError> {
        let (Some(sender), Some(conn)) = (self.sending.as_mut(), self.conn.as_mut()) else {
            return Ok(());
        };
        match sender.poll_send(conn, cx) {
            Poll::Ready(Ok(())) => self.sending = None,
            // The upstream stopped reading the request: its answer is what counts, and the
            // connection is not reused.
            Poll::Ready(Err(e)) if is_write_error(&e) => {
                self.sending = None;
                self.keep = false;
            }
            // The request body's own failure (too large, too slow, the client gone).
            Poll::Ready(Err(e)) => return Err(e),
            Poll::Pending => {}
        }
        Ok(())
    }

    fn fail(&mut self, e: BoxError) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.state = State::Failed;
        self.conn = None;
        self.sending = None;
        Poll::Ready(Some(Err(e)))
    }

    pub(super) fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.sending.is_some() && !self.is_end() {
            if let Err(e) = self.send(cx) {
                return self.fail(e);
            }
        }
        loop {
            let frame = match self.state {
                State::Done | State::Failed => return Poll::Ready(None),
                State::Length(left) => self.take(left).map(|(data, left)| {
                    self.state = if left == 0 {
                        State::Done
                    } else {
                        State::Length(left)
                    };
                    Frame::data(data)
                }),
                State::Close => self.take(u64::MAX).map(|(data, _)| Frame::data(data)),
                _ => match self.chunked() {
                    Ok(frame) => frame,
                    Err(e) => return self.fail(e),
                },
            };
            if let Some(frame) = frame {
                return Poll::Ready(Some(Ok(frame)));
            }
            if self.is_end() {
                return Poll::Ready(None);
            }
            let Some(conn) = self.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match ready!(conn.poll_fill(cx)) {
                Ok(0) if self.state == State::Close => {
                    self.state = State::Done;
                    return Poll::Ready(None);
                }
                Ok(0) => return self.fail(closed_early()),
                Ok(_) => {}
                Err(e) => return self.fail(Box::new(e)),
            }
        }
    }

    /// Up to `left` bytes of what was read, and what is left after them.
    fn take(&mut self, left: u64) -> Option<(Bytes, u64)> {
        let rd = &mut self.conn.as_mut()?.rd;
        if rd.is_empty() {
            return None;
        }
        let n = rd.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        Some((rd.split_to(n).freeze(), left - n as u64))
    }

    /// The next frame of a chunked body from what was read; `None` when more must be read.
    fn chunked(&mut self) -> Result<Option<Frame<Bytes>>, BoxError> {
        self.settle()?;
        match self.state {
            State::Data(left) => {
                let Some((data, left)) = self.take(left) else {
                    return Ok(None);
                };
                self.state = if left == 0 {
                    State::DataEnd
                } else {
                    State::Data(left)
                };
                // The framing that follows, when already read: the last frame says it is.
                self.settle()?;
                Ok(Some(Frame::data(data)))
            }
            State::Trailers => self.trailers(),
            _ => Ok(None),
        }
    }

    /// Steps over chunk framing (sizes, ends, an empty trailer section) as far as what was
    /// read allows; stops at data, trailers or where more must be read.
    fn settle(&mut self) -> Result<(), BoxError> {
        let Some(conn) = self.conn.as_mut() else {
            return Ok(());
        };
        let rd = &mut conn.rd;
        loop {
            match self.state {
                State::Size => {
                    let Some(eol) = memchr::memchr(b'\n', rd) else {
                        if rd.len() > MAX_CHUNK_LINE {
                            return Err(malformed("chunk size line too long"));
                        }
                        return Ok(());
                    };
                    if eol > MAX_CHUNK_LINE {
                        return Err(malformed("chunk size line too long"));
                    }
                    let size = chunk_size(&rd[..eol])?;
                    rd.advance(eol + 1);
                    self.state = if size == 0 {
                        State::Trailers
                    } else {
                        State::Data(size)
                    };
                }
                State::DataEnd => {
                    if rd.len() < 2 {
                        return Ok(());
                    }
                    if &rd[..2] != b"\r\n" {
                        return Err(malformed("chunk data not followed by CRLF"));
                    }
                    rd.advance(2);
                    self.state = State::Size;
                }
                State::Trailers if rd.starts_with(b"\r\n") => {
                    rd.advance(2);
                    self.state = State::Done;
                }
                _ => return Ok(()),
            }
        }
    }

    /// The trailer section after the last chunk, as a frame once it is whole.
    fn trailers(&mut self) -> Result<Option<Frame<Bytes>>, BoxError> {
        let Some(conn) = self.conn.as_mut() else {
            return Ok(None);
        };
        let rd = &mut conn.rd;
        let Some(end) = memchr::memmem::find(rd, b"\r\n\r\n") else {
            if rd.len() > MAX_HEAD {
                return Err(malformed("trailers too large"));
            }
            return Ok(None);
        };
        let mut raw = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut map = HeaderMap::new();
        match httparse::parse_headers(&rd[..end + 4], &mut raw) {
            Ok(httparse::Status::Complete((_, fields))) => {
                for f in fields {
                    let name = HeaderName::from_bytes(f.name.as_bytes())
                        .map_err(|_| malformed("invalid trailer name"))?;
                    let value = HeaderValue::from_bytes(f.value)
                        .map_err(|_| malformed("invalid trailer value"))?;
                    map.append(name, value);
                }
            }
            _ => return Err(malformed("invalid trailers")),
        }
        rd.advance(end + 4);
        self.state = State::Done;
        Ok(Some(Frame::trailers(map)))
    }
}

/// The size of a chunk-size line (`1a;ext=1\r`, without its LF): hex digits, optional
/// extensions, a CR at the end.
fn chunk_size(line: &[u8]) -> Result<u64, BoxError> {
    let line = line
        .strip_suffix(b"\r")
        .ok_or_else(|| malformed("chunk size line not ended by CRLF"))?;
    let digits = line
        .iter()
        .position(|&b| !b.is_ascii_hexdigit())
        .unwrap_or(line.len());
    let rest = &line[digits..];
    if digits == 0 || digits > 16 || !(rest.is_empty() || matches!(rest[0], b';' | b' ' | b'\t')) {
        return Err(malformed("invalid chunk size"));
    }
    let hex = std::str::from_utf8(&line[..digits]).map_err(|_| malformed("invalid chunk size"))?;
    u64::from_str_radix(hex, 16).map_err(|_| malformed("invalid chunk size"))
}

#[cfg(test)]
mod tests {
    use super::chunk_size;

    #[test]
    fn chunk_sizes_are_hex_with_optional_extensions_and_crlf() {
        assert_eq!(chunk_size(b"1a\r").unwrap(), 26);
        assert_eq!(chunk_size(b"0\r").unwrap(), 0);
        assert_eq!(chunk_size(b"FF;name=value\r").unwrap(), 255);
        assert_eq!(chunk_size(b"10 ;x\r").unwrap(), 16);
        for bad in [
            &b"1a"[..],
            b"\r",
            b"-1\r",
            b"+1\r",
            b"0x10\r",
            b"1g\r",
            b"11111111111111111\r",
        ] {
            assert!(
                chunk_size(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
