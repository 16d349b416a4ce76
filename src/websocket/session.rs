//! One WebSocket session after the handshake: bytes copied both ways as they arrive (one
//! 8 KiB buffer per direction, nothing held back), frame boundaries read on the way
//! ([`Frames`]), until either side closes. ezgate ends a session itself with a close frame
//! to both sides (1001, going away) when nothing moved either way for the idle timeout or
//! the drain's grace is over; and when one side vanishes without a close frame, the other
//! gets one (1001 for the upstream when the client left, 1011 for the client when the
//! upstream connection was lost). A close frame is only ever written between two frames;
//! once ezgate sent one, what that side still sends is read and dropped until its own close
//! frame (the closing handshake, RFC 6455 §7.1.2), for at most [`CLOSE_WAIT`].
//!
//! A session lasts at most its lifetime (then 1008 to both sides), and ezgate checks that
//! its client still reads: every ping interval it pings the client (a ping frame slipped in
//! between two of the upstream's frames), and a client whose pong does not come within the
//! pong timeout is closed (1001). A client that stopped reading cannot answer, however many
//! of the upstream's pings sit unread in its socket, and once its socket is full the ping
//! cannot even be written: the timeout runs from the moment the ping was due.

use std::future::{poll_fn, Future as _};
use std::pin::{pin, Pin};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{sleep_until, Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tungstenite::protocol::frame::coding::CloseCode;

use super::frames::{close_frame, ping_frame, Frames, PING_PAYLOAD};
use crate::outcome::SessionEnd;

/// Bytes read at once in each direction.
const BUF: usize = 8 * 1024;
/// How long the closing handshake may take once ezgate sent its close frames, one side
/// left, or both sides exchanged theirs (the TCP closes that follow).
pub const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// How long a session may last, and how ezgate checks that its client still reads.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// The longest silence both ways, pongs aside (`upstream.stream_idle_timeout`).
    pub idle: Duration,
    /// `server.websocket_max_lifetime`.
    pub lifetime: Duration,
    /// `server.websocket_ping_interval`.
    pub ping_every: Duration,
    /// `server.websocket_pong_timeout`.
    pub pong_timeout: Duration,
}

/// The reasons of ezgate's close frames (at most 123 bytes each).
const LIFETIME_REASON: &str = "the session reached server.websocket_max_lifetime";
const NO_PONG_REASON: &str = "no pong to ezgate's ping within server.websocket_pong_timeout";
const IDLE_REASON: &str = "no frame either way for upstream.stream_idle_timeout";

/// What a session did, for its record.
#[derive(Debug)]
pub struct Report {
    pub end: SessionEnd,
    /// Bytes the client sent through, and the upstream.
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// The usage of the upstream's `response.done` events, summed.
    pub usage: Option<crate::outcome::Usage>,
    /// Responses were under way when the session ended (after their `response.created`,
    /// before their `response.done`): the estimated tokens of what they streamed.
    pub unfinished: Option<u64>,
    /// The upstream connection ended without a close frame.
    pub interrupted: bool,
}

/// Which way a pipe copies.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Way {
    /// Client → upstream: ezgate's close frames are masked (it is the upstream's client).
    ToUpstream,
    ToClient,
}

/// One direction: what the source sent, on its way to the destination.
struct Pipe {
    way: Way,
    buf: Box<[u8]>,
    /// `buf[start..end]` is read and not yet written.
    start: usize,
    end: usize,
    frames: Frames,
    /// What was written ends between two frames.
    out_at_boundary: bool,
    /// The source's close frame was passed on.
    carried_close: bool,
    /// ezgate's close frame, to write at the next boundary.
    close: Option<Bytes>,
    /// ezgate's ping, to write at the next boundary (the source's frames go on after it).
    ping: Option<Bytes>,
    /// The frame of ezgate's being written, how much of it is out, and whether it closes.
    sending: Option<(Bytes, usize, bool)>,
    /// `buf[end..held]` was read past the boundary where the ping goes: written after it.
    held: usize,
    held_at_boundary: bool,
    /// The source's bytes are read and dropped (ezgate closed this way, or the
    /// destination is gone), until its close frame or its end.
    discard: bool,
    /// The source ended (EOF) or failed.
    src_over: bool,
    dst_gone: bool,
    flush: bool,
    done: bool,
    bytes: u64,
}

impl Pipe {
    fn new(way: Way) -> Pipe {
        Pipe {
            way,
            buf: vec![0; BUF].into_boxed_slice(),
            start: 0,
            end: 0,
            frames: Frames::new(way == Way::ToClient),
            out_at_boundary: true,
            carried_close: false,
            close: None,
            ping: None,
            sending: None,
            held: 0,
            held_at_boundary: true,
            discard: false,
            src_over: false,
            dst_gone: false,
            flush: false,
            done: false,
            bytes: 0,
        }
    }

    /// ezgate's close frame with `code` and `reason`, for this pipe's destination.
    fn close_with(&mut self, code: CloseCode, reason: &'static str) {
        if self.carried_close || self.discard || self.done || self.close.is_some() {
            return;
        }
        let mask = (self.way == Way::ToUpstream).then(mask);
        self.close = Some(close_frame(code, reason, mask));
        // Nothing may follow a close frame.
        self.ping = None;
    }

    /// ezgate's ping with `payload`, for the client (between two of the upstream's frames).
    fn ping_with(&mut self, payload: [u8; PING_PAYLOAD]) {
        if self.way == Way::ToClient && !self.closing() {
            self.ping = Some(ping_frame(payload));
        }
    }

    /// ezgate closes this way, or it is over.
    fn closing(&self) -> bool {
        self.carried_close || self.discard || self.done || self.close.is_some()
    }

    /// The destination will not get more: the source is read and dropped.
    fn stop_forwarding(&mut self) {
        self.discard = true;
        self.close = None;
        self.ping = None;
    }

    /// Copies until nothing more can be done now; `Ready` once this way is over (the
    /// destination was shut down, or is gone).
    /// `heard` sees the frames after each read, before what was read is written on.
    fn poll<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        src: &mut R,
        dst: &mut W,
        read: &mut bool,
        heard: &mut impl FnMut(&Frames),
    ) -> Poll<()>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        loop {
            if self.done {
                return Poll::Ready(());
            }
            // What was read goes out first.
            if self.start < self.end {
                if self.dst_gone {
                    self.start = self.end;
                    continue;
                }
                match Pin::new(&mut *dst).poll_write(cx, &self.buf[self.start..self.end]) {
                    Poll::Ready(Ok(n)) if n > 0 => {
                        self.start += n;
                        self.bytes += n as u64;
                        self.flush = true;
                    }
                    Poll::Ready(_) => self.dst_gone = true,
                    Poll::Pending => return Poll::Pending,
                }
                continue;
            }
            // ezgate's close frame or ping, between two frames.
            if self.sending.is_none() && self.out_at_boundary && !self.frames.lost {
                self.sending = match (self.close.take(), self.ping.take()) {
                    (Some(close), _) => Some((close, 0, true)),
                    (None, Some(ping)) => Some((ping, 0, false)),
                    (None, None) => None,
                };
            }
            if let Some((frame, at, closes)) = &mut self.sending {
                let written = if self.dst_gone {
                    Poll::Ready(Ok(0))
                } else {
                    Pin::new(&mut *dst).poll_write(cx, &frame[*at..])
                };
                match written {
                    Poll::Ready(Ok(n)) if n > 0 => {
                        *at += n;
                        self.flush = true;
                        if *at < frame.len() {
                            continue;
                        }
                    }
                    Poll::Ready(_) => self.dst_gone = true,
                    Poll::Pending => return Poll::Pending,
                }
                self.discard |= *closes;
                self.sending = None;
                continue;
            }
            // What was read past the ping's place goes out after it (unless ezgate closed).
            if self.held > self.end {
                if !self.discard {
                    (self.start, self.end) = (self.end, self.held);
                    self.out_at_boundary = self.held_at_boundary;
                }
                self.held = 0;
                continue;
            }
            (self.start, self.end, self.held) = (0, 0, 0);
            // The source is over (or said its last word after ezgate's close): the
            // destination's write side is shut.
            if self.src_over || (self.discard && self.frames.close_seen) {
                // An error here means the peer is gone already: done all the same.
                if !self.dst_gone && Pin::new(&mut *dst).poll_shutdown(cx).is_pending() {
                    return Poll::Pending;
                }
                self.done = true;
                continue;
            }
            let mut rb = ReadBuf::new(&mut self.buf);
            match Pin::new(&mut *src).poll_read(cx, &mut rb) {
                Poll::Pending => {
                    if self.flush && !self.dst_gone {
                        match Pin::new(&mut *dst).poll_flush(cx) {
                            Poll::Ready(Ok(())) => self.flush = false,
                            Poll::Ready(Err(_)) => self.dst_gone = true,
                            Poll::Pending => {}
                        }
                    }
                    return Poll::Pending;
                }
                Poll::Ready(Err(_)) => self.source_over(),
                Poll::Ready(Ok(())) => {
                    let n = rb.filled().len();
                    if n == 0 {
                        self.source_over();
                    } else {
                        *read = true;
                        self.take(n);
                        heard(&self.frames);
                    }
                }
            }
        }
    }

    /// The source ended or failed. If it left without a close frame, the destination hears
    /// why from ezgate: 1001 for the upstream when the client left, 1011 for the client when
    /// the upstream connection was lost.
    fn source_over(&mut self) {
        self.src_over = true;
        if !self.carried_close {
            match self.way {
                Way::ToUpstream => self.close_with(CloseCode::Away, "the client went away"),
                Way::ToClient => {
                    self.close_with(CloseCode::Error, "the upstream connection was lost");
                }
            }
        }
    }

    /// `buf[..n]` was just read: what of it is written on.
    fn take(&mut self, n: usize) {
        if self.discard {
            self.scan(0, n);
            return;
        }
        if self.close.is_some() {
            // Closing: on up to the end of the frame in progress, nothing after it.
            match self.frames.next_boundary(&self.buf[..n]) {
                Some(k) => {
                    self.end = k;
                    self.out_at_boundary = true;
                    self.carried_close |= self.frames.close_seen;
                    self.scan(k, n);
                }
                None => {
                    self.end = n;
                    self.out_at_boundary = false;
                    self.carried_close |= self.frames.close_seen;
                }
            }
            return;
        }
        if self.ping.is_some() && !self.out_at_boundary {
            // A ping waits: on up to the end of the frame in progress, then the ping, then
            // the rest.
            if let Some(k) = self.frames.next_boundary(&self.buf[..n]) {
                self.end = k;
                self.out_at_boundary = true;
                self.scan(k, n);
                self.held = n;
                self.held_at_boundary = self.frames.at_boundary();
                self.carried_close |= self.frames.close_seen;
                return;
            }
            self.end = n;
            self.out_at_boundary = false;
            self.carried_close |= self.frames.close_seen;
            return;
        }
        self.scan(0, n);
        self.end = n;
        self.out_at_boundary = self.frames.at_boundary();
        self.carried_close |= self.frames.close_seen;
    }

    fn scan(&mut self, mut at: usize, n: usize) {
        while at < n {
            match self.frames.next_boundary(&self.buf[at..n]) {
                Some(k) => at += k,
                None => break,
            }
        }
    }
}

fn mask() -> [u8; 4] {
    let mut m = [0u8; 4];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut m);
    m
}

/// Copies between `client` and `upstream` until the session ends, within `timing`; `cut`
/// is the end of the drain's grace. `on_usage` hears the input and output tokens of the
/// upstream's `response.done` events so far, after each one.
pub async fn relay<C, U>(
    mut client: C,
    mut upstream: U,
    timing: Timing,
    cut: CancellationToken,
    mut on_usage: impl FnMut(u64, u64),
) -> Report
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let mut up = Pipe::new(Way::ToUpstream);
    let mut down = Pipe::new(Way::ToClient);
    let mut end: Option<SessionEnd> = None;
    let mut interrupted = false;
    let started = Instant::now();
    let mut last = started;
    let mut activity = 0;
    let mut idle_timer = Box::pin(sleep_until(last + timing.idle));
    let mut lifetime = Box::pin(sleep_until(started + timing.lifetime));
    // The next ping is due at `ping_timer`; once sent, its pong at `pong_timer`.
    let mut ping_timer = Box::pin(sleep_until(started + timing.ping_every));
    let mut pong_timer: Option<Pin<Box<Sleep>>> = None;
    let mut deadline: Option<Pin<Box<Sleep>>> = None;
    let mut cut_wait = pin!(cut.cancelled_owned());
    let (mut cut_seen, mut idle_seen, mut up_noted, mut down_noted) = (false, false, false, false);
    let mut lifetime_seen = false;
    let arm = |deadline: &mut Option<Pin<Box<Sleep>>>| {
        if deadline.is_none() {
            *deadline = Some(Box::pin(tokio::time::sleep(CLOSE_WAIT)));
        }
    };
    // ezgate ends the session itself: a close frame to each side, `why`.
    let close_both = |up: &mut Pipe, down: &mut Pipe, code: CloseCode, why: &'static str| {
        up.close_with(code, why);
        down.close_with(code, why);
    };
    // A response's tokens are charged before its `response.done` is passed on.
    let mut reported = None;
    let mut hear_usage = |frames: &Frames| {
        let usage = frames.usage();
        if usage != reported {
            reported = usage;
            if let Some(u) = usage {
                on_usage(u.prompt, u.completion);
            }
        }
    };
    poll_fn(|cx| loop {
        let mut read = false;
        let up_done = up
            .poll(cx, &mut client, &mut upstream, &mut read, &mut |_| {})
            .is_ready();
        let down_done = down
            .poll(cx, &mut upstream, &mut client, &mut read, &mut hear_usage)
            .is_ready();
        // Pongs alone do not keep a session from being idle: a client answers them.
        let moved = up.frames.activity + down.frames.activity;
        if read && (moved != activity || up.frames.lost || down.frames.lost) {
            activity = moved;
            last = Instant::now();
        }
        if up_done && down_done {
            return Poll::Ready(());
        }
        let mut changed = false;
        // Who closed first: the first close frame, else the first side to leave.
        if end.is_none() {
            if up.frames.close_seen {
                end = Some(SessionEnd::ClientClosed);
            } else if down.frames.close_seen {
                end = Some(SessionEnd::UpstreamClosed);
            }
        }
        if up.carried_close && down.carried_close {
            arm(&mut deadline);
        }
        if up.src_over && !up_noted {
            up_noted = true;
            end.get_or_insert(SessionEnd::ClientClosed);
            if !up.carried_close {
                // The client left without a word (the upstream got ezgate's close frame):
                // what the upstream still sends has no reader.
                down.stop_forwarding();
                arm(&mut deadline);
                changed = true;
            }
        }
        if down.src_over && !down_noted {
            down_noted = true;
            end.get_or_insert(SessionEnd::UpstreamClosed);
            if !down.carried_close {
                interrupted = true;
                up.stop_forwarding();
                arm(&mut deadline);
                changed = true;
            }
        }
        if !cut_seen && cut_wait.as_mut().poll(cx).is_ready() {
            cut_seen = true;
            end.get_or_insert(SessionEnd::Shutdown);
            close_both(
                &mut up,
                &mut down,
                CloseCode::Away,
                "ezgate is shutting down",
            );
            arm(&mut deadline);
            changed = true;
        }
        if !lifetime_seen && lifetime.as_mut().poll(cx).is_ready() {
            lifetime_seen = true;
            end.get_or_insert(SessionEnd::MaxLifetime);
            close_both(&mut up, &mut down, CloseCode::Policy, LIFETIME_REASON);
            arm(&mut deadline);
            changed = true;
        }
        if deadline.is_none() {
            // Liveness: a ping when due, then its pong within the timeout.
            if up.frames.pong_heard {
                up.frames.pong_heard = false;
                pong_timer = None;
                ping_timer
                    .as_mut()
                    .reset(Instant::now() + timing.ping_every);
            }
            match &mut pong_timer {
                None => {
                    if ping_timer.as_mut().poll(cx).is_ready() {
                        let payload = ping_payload();
                        down.ping_with(payload);
                        up.frames.expect_pong(payload);
                        let due = Instant::now() + timing.pong_timeout;
                        pong_timer = Some(Box::pin(sleep_until(due)));
                        changed = true;
                    }
                }
                Some(t) => {
                    if t.as_mut().poll(cx).is_ready() {
                        pong_timer = None;
                        end.get_or_insert(SessionEnd::PingTimeout);
                        close_both(&mut up, &mut down, CloseCode::Away, NO_PONG_REASON);
                        arm(&mut deadline);
                        changed = true;
                    }
                }
            }
        }
        if !idle_seen {
            let due = last + timing.idle;
            if idle_timer.deadline() != due {
                idle_timer.as_mut().reset(due);
            }
            if idle_timer.as_mut().poll(cx).is_ready() {
                idle_seen = true;
                end.get_or_insert(SessionEnd::IdleTimeout);
                close_both(&mut up, &mut down, CloseCode::Away, IDLE_REASON);
                arm(&mut deadline);
                changed = true;
            }
        }
        if let Some(d) = &mut deadline {
            if d.as_mut().poll(cx).is_ready() {
                return Poll::Ready(());
            }
        }
        if !changed {
            return Poll::Pending;
        }
    })
    .await;
    Report {
        end: end.unwrap_or(SessionEnd::ClientClosed),
        bytes_in: up.bytes,
        bytes_out: down.bytes,
        usage: down.frames.usage(),
        unfinished: down.frames.unfinished(),
        interrupted,
    }
}

/// The payload of one of ezgate's pings: random, so that only a client that read the ping
/// can answer it.
fn ping_payload() -> [u8; PING_PAYLOAD] {
    let mut p = [0u8; PING_PAYLOAD];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut p);
    p
}

#[cfg(test)]
#[path = "session_tests.rs"]
mod tests;
