//! What a connection's requests tell the connection's task: on HTTP/1.1, whether a request
//! is in service and since when none has been ([`HeadClock`], for `server.header_read_timeout`);
//! on HTTP/2, which streams are open and how many the client reset ([`ConnWatch`]).

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::resets::{self, AddressResets, Counted};

/// One HTTP/1.1 connection's requests, as its task times the wait for a request head
/// (`server.header_read_timeout`): from the start of the connection, or the end of the last
/// response (its last bytes written), to the next request whose head is whole. The
/// connection's task keeps one timer, and looks here only when it fires (`src/server/mod.rs`).
///
/// hyper's own header read timer cost ~1,300 instructions per request (a timer allocated,
/// registered and dropped per request head, and an extra pass of the connection's loop after
/// each response to start it: `benches/instructions.sh`, TLS, as shipped); this costs a
/// request four atomic operations on its connection's clock.
pub struct HeadClock {
    /// The start of the connection: the times below are nanoseconds after it.
    base: Instant,
    /// Requests whose head was read and whose response has not ended (one at a time on
    /// HTTP/1.1; a WebSocket session's outlives its connection).
    busy: AtomicU32,
    /// A request's head was read, ever.
    served: AtomicBool,
    /// When the last response ended, or when its last bytes went out if the client was slow
    /// to take them.
    idle_since: AtomicU64,
    /// The connection's last write could not go out: the client is not reading.
    write_blocked: AtomicBool,
}

/// What an HTTP/1.1 connection is doing, for its header read timer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadWait {
    /// A request is in service: no head is awaited.
    Serving,
    /// A head is awaited since `since` (the connection's start, or the last response's end);
    /// `served` once a request was; `blocked` while bytes of the last response are waiting
    /// for the client to read them.
    Awaited {
        since: Instant,
        served: bool,
        blocked: bool,
    },
}

impl HeadClock {
    pub fn new() -> HeadClock {
        HeadClock {
            base: Instant::now(),
            busy: AtomicU32::new(0),
            served: AtomicBool::new(false),
            idle_since: AtomicU64::new(0),
            write_blocked: AtomicBool::new(false),
        }
    }

    /// A request's head was read: it is in service until the slot drops.
    pub fn begin(self: &Arc<Self>) -> InService {
        self.busy.fetch_add(1, Ordering::Relaxed);
        self.served.store(true, Ordering::Relaxed);
        InService(Some(Arc::clone(self)))
    }

    pub fn wait(&self) -> HeadWait {
        // Acquire: pairs with the release in `end`, so the end's time is seen with it.
        if self.busy.load(Ordering::Acquire) > 0 {
            return HeadWait::Serving;
        }
        let nanos = self.idle_since.load(Ordering::Relaxed);
        HeadWait::Awaited {
            since: self.base + Duration::from_nanos(nanos),
            served: self.served.load(Ordering::Relaxed),
            blocked: self.write_blocked.load(Ordering::Relaxed),
        }
    }

    /// The connection's last write or flush could not go out.
    pub fn is_write_blocked(&self) -> bool {
        self.write_blocked.load(Ordering::Relaxed)
    }

    /// A write or flush on the connection could not go out (the socket is full).
    pub fn write_blocked(&self) {
        self.write_blocked.store(true, Ordering::Relaxed);
    }

    /// Bytes went out after a write had been blocked. Between requests, they are the last
    /// response's: the wait for the next head starts again now, as it starts when a response
    /// is written whole. (The usual response goes out at once: this runs only for a client
    /// slow to read.)
    pub fn wrote_after_block(&self) {
        self.write_blocked.store(false, Ordering::Relaxed);
        if self.busy.load(Ordering::Acquire) == 0 {
            self.idle_since
                .fetch_max(self.nanos(Instant::now()), Ordering::Relaxed);
        }
    }

    fn end(&self, at: Instant) {
        self.idle_since.fetch_max(self.nanos(at), Ordering::Relaxed);
        self.busy.fetch_sub(1, Ordering::Release);
    }

    fn nanos(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.base).as_nanos()).unwrap_or(u64::MAX)
    }
}

impl Default for HeadClock {
    fn default() -> Self {
        HeadClock::new()
    }
}

/// One request in service on an HTTP/1.1 connection, until its response ends
/// ([`InService::end`]) or, failing that, until it drops. (An `Option`, not a flag beside the
/// clock: the slot is a pointer's size in every request's exchange.)
pub struct InService(Option<Arc<HeadClock>>);

impl InService {
    /// The response ended at `at` (the exchange read the clock for its duration).
    pub fn end(mut self, at: Instant) {
        if let Some(clock) = self.0.take() {
            clock.end(at);
        }
    }
}

impl Drop for InService {
    fn drop(&mut self) {
        if let Some(clock) = self.0.take() {
            clock.end(Instant::now());
        }
    }
}

/// What one HTTP/2 connection's requests tell its task: whether any stream is open (an
/// idle connection is closed), and how many accepted streams the client reset lately, on
/// this connection (too many, and it gets GOAWAY) and from its address over all its
/// connections (too many, and the address's streams are refused for a while).
pub struct ConnWatch {
    state: Mutex<ConnState>,
    changed: tokio::sync::Notify,
    max_resets: u32,
    window: Duration,
    /// The client's address and the gateway's count of resets per address.
    address: Option<(IpAddr, Arc<AddressResets>)>,
    /// The address is penalized: streams are refused without going upstream.
    refusing: AtomicBool,
    /// The gateway's count of penalties when this connection last looked up its address.
    penalties_seen: AtomicU64,
}

struct ConnState {
    open: u32,
    /// When the last stream ended, while none is open.
    idle_since: Option<Instant>,
    resets: u32,
    window_start: Instant,
}

impl ConnWatch {
    pub fn new(
        max_resets: u32,
        window: Duration,
        address: Option<(IpAddr, Arc<AddressResets>)>,
    ) -> ConnWatch {
        let now = Instant::now();
        let penalties_seen = address.as_ref().map_or(0, |(_, r)| r.penalties());
        let refusing = address
            .as_ref()
            .is_some_and(|(ip, resets)| resets.penalized(*ip, now));
        ConnWatch {
            state: Mutex::new(ConnState {
                open: 0,
                idle_since: Some(now),
                resets: 0,
                window_start: now,
            }),
            changed: tokio::sync::Notify::new(),
            max_resets,
            window,
            address,
            refusing: AtomicBool::new(refusing),
            penalties_seen: AtomicU64::new(penalties_seen),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ConnState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Since when no stream has been open (`None` while one is).
    pub fn idle_since(&self) -> Option<Instant> {
        self.lock().idle_since
    }

    /// The connection should get GOAWAY: its client reset too many accepted streams on it,
    /// or its address is penalized.
    pub fn too_many_resets(&self) -> bool {
        self.refusing() || self.lock().resets > self.max_resets
    }

    /// The client's address reset too many accepted streams over its connections lately:
    /// its streams are refused without going upstream. Two atomic loads, unless a penalty
    /// started (for any address) since this connection last looked.
    pub fn refusing(&self) -> bool {
        if self.refusing.load(Ordering::Relaxed) {
            return true;
        }
        let Some((ip, resets)) = &self.address else {
            return false;
        };
        let now_seen = resets.penalties();
        if self.penalties_seen.load(Ordering::Relaxed) == now_seen {
            return false;
        }
        self.penalties_seen.store(now_seen, Ordering::Relaxed);
        let penalized = resets.penalized(*ip, Instant::now());
        if penalized {
            self.refusing.store(true, Ordering::Relaxed);
        }
        penalized
    }

    /// Resolves when a stream ended (the connection may be idle now, or over its resets).
    pub async fn changed(&self) {
        self.changed.notified().await;
    }

    fn started(&self) {
        let mut s = self.lock();
        s.open += 1;
        s.idle_since = None;
    }

    /// A stream ended; `reset` when its client cancelled it.
    fn ended(&self, reset: bool) {
        let mut s = self.lock();
        s.open = s.open.saturating_sub(1);
        let now = Instant::now();
        if s.open == 0 {
            s.idle_since = Some(now);
        }
        if reset {
            if now.duration_since(s.window_start) > self.window {
                s.window_start = now;
                s.resets = 0;
            }
            s.resets += 1;
        }
        drop(s);
        if let (true, Some((ip, resets))) = (reset, &self.address) {
            match resets.reset(*ip, now) {
                Counted::Below => {}
                Counted::PenaltyStarts => {
                    self.refusing.store(true, Ordering::Relaxed);
                    tracing::warn!(
                        address = %resets::address_key(*ip),
                        limit = resets::MAX_ADDRESS_RESETS,
                        window = ?resets::ADDRESS_RESET_WINDOW,
                        penalty = ?resets::ADDRESS_PENALTY,
                        "an HTTP/2 client address reset too many accepted streams over its connections; refusing its streams (503) and closing its connections (GOAWAY) for the penalty"
                    );
                }
                Counted::Penalized => self.refusing.store(true, Ordering::Relaxed),
            }
        }
        self.changed.notify_one();
    }
}

/// One open stream of an HTTP/2 connection, reported to its [`ConnWatch`] when it ends
/// ([`StreamSlot::end`]) or, failing that (its request future dropped before its exchange
/// took it), when it drops.
pub struct StreamSlot(Option<Arc<ConnWatch>>);

impl StreamSlot {
    pub fn new(watch: Arc<ConnWatch>) -> StreamSlot {
        watch.started();
        StreamSlot(Some(watch))
    }

    /// The stream ended; `reset` when its client cancelled it.
    pub fn end(mut self, reset: bool) {
        if let Some(watch) = self.0.take() {
            watch.ended(reset);
        }
    }

    fn refusing(&self) -> bool {
        self.0.as_ref().is_some_and(|w| w.refusing())
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        if let Some(watch) = self.0.take() {
            watch.ended(false);
        }
    }
}

/// What a request holds of its connection while it is served: taken when its head was read,
/// ended with its exchange.
pub enum ConnSlot {
    Http1(InService),
    Http2(StreamSlot),
}

impl ConnSlot {
    /// The connection's client address is penalized for resets (HTTP/2): the request is
    /// refused without going upstream.
    pub fn refusing(&self) -> bool {
        match self {
            ConnSlot::Http1(_) => false,
            ConnSlot::Http2(stream) => stream.refusing(),
        }
    }

    /// The response ended at `at`; `reset` when the client cancelled it.
    pub fn end(self, at: Instant, reset: bool) {
        match self {
            ConnSlot::Http1(request) => request.end(at),
            ConnSlot::Http2(stream) => stream.end(reset),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_head_is_awaited_from_the_start_and_from_each_responses_end() {
        let clock = Arc::new(HeadClock::new());
        let start = clock.base;
        assert_eq!(
            clock.wait(),
            HeadWait::Awaited {
                since: start,
                served: false,
                blocked: false
            }
        );
        let request = clock.begin();
        assert_eq!(clock.wait(), HeadWait::Serving);
        let end = start + Duration::from_secs(3);
        request.end(end);
        assert_eq!(
            clock.wait(),
            HeadWait::Awaited {
                since: end,
                served: true,
                blocked: false
            }
        );
        // A slot dropped without its end set ends when it drops; an earlier end never
        // moves the wait back.
        drop(clock.begin());
        let HeadWait::Awaited { since, .. } = clock.wait() else {
            panic!("no request is in service");
        };
        assert!(since >= end);
        clock.begin().end(start);
        assert_eq!(
            clock.wait(),
            HeadWait::Awaited {
                since,
                served: true,
                blocked: false
            }
        );
    }

    #[test]
    fn a_stream_is_closed_however_its_request_ends() {
        let watch = Arc::new(ConnWatch::new(10, Duration::from_secs(10), None));
        let ended = StreamSlot::new(Arc::clone(&watch));
        let dropped = StreamSlot::new(Arc::clone(&watch));
        ended.end(false);
        assert!(watch.idle_since().is_none(), "one stream is still open");
        // A request future dropped before its exchange took the slot.
        drop(dropped);
        assert!(watch.idle_since().is_some());
    }
}
