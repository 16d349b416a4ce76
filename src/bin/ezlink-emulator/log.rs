//! The request log behind `GET /__emu/log`: one entry per request, in arrival order, whose
//! state a [`Guard`] settles exactly once (completed, or cancelled when dropped unfinished).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use http::{HeaderMap, Method};
use serde::Serialize;

/// Oldest entries are dropped beyond this, so a long benchmark keeps bounded memory.
pub const CAPACITY: usize = 10_000;

const IN_PROGRESS: u8 = 0;
const COMPLETED: u8 = 1;
const CANCELLED: u8 = 2;

#[derive(Default)]
pub struct RequestLog {
    entries: Mutex<VecDeque<Arc<Entry>>>,
}

pub struct Entry {
    request_id: Option<String>,
    method: String,
    uri: String,
    headers: Vec<(String, String)>,
    state: AtomicU8,
    /// Tokens the emulator counted for this request ([`NONE`] until a route sets them).
    prompt_tokens: AtomicU64,
    completion_tokens: AtomicU64,
    /// A WebSocket session: the close frame the emulator received (code, reason).
    ws_close: Mutex<Option<(u16, String)>>,
    /// The model the route read in the request (the object routes, `objects.rs`).
    model: Mutex<Option<String>>,
}

const NONE: u64 = u64::MAX;

/// The token counts of one log entry, written by the route that answers it: a stream adds
/// each content event as it is sent, so a cancelled stream shows what was generated.
#[derive(Clone)]
pub struct Tokens(Option<Arc<Entry>>);

impl Tokens {
    pub fn set(&self, prompt: u64, completion: u64) {
        if let Some(e) = &self.0 {
            e.prompt_tokens.store(prompt, Ordering::Release);
            e.completion_tokens.store(completion, Ordering::Release);
        }
    }

    /// The model the route read in the request.
    pub fn set_model(&self, model: &str) {
        if let Some(e) = &self.0 {
            *e.model.lock().unwrap_or_else(PoisonError::into_inner) = Some(model.to_owned());
        }
    }

    pub fn add_completion(&self, n: u64) {
        if let Some(e) = &self.0 {
            e.completion_tokens.fetch_add(n, Ordering::AcqRel);
        }
    }
}

/// Held by the handler future, then by the response body. Dropping it before
/// [`Guard::complete`] marks the request cancelled.
pub struct Guard(Arc<Entry>);

impl RequestLog {
    pub fn record(&self, method: &Method, uri: &str, headers: &HeaderMap) -> Guard {
        let headers = headers
            .iter()
            .map(|(name, value)| {
                let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
                (name.as_str().to_owned(), value)
            })
            .collect();
        self.record_raw(method.as_str(), uri, headers)
    }

    /// Records a request that hyper never saw (the raw `x-emu-malformed` path).
    pub fn record_raw(&self, method: &str, uri: &str, headers: Vec<(String, String)>) -> Guard {
        let request_id = headers
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case("x-request-id"))
            .map(|(_, value)| value.clone());
        let entry = Arc::new(Entry {
            request_id,
            method: method.to_owned(),
            uri: uri.to_owned(),
            headers,
            state: AtomicU8::new(IN_PROGRESS),
            prompt_tokens: AtomicU64::new(NONE),
            completion_tokens: AtomicU64::new(NONE),
            ws_close: Mutex::new(None),
            model: Mutex::new(None),
        });
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        if entries.len() >= CAPACITY {
            entries.pop_front();
        }
        entries.push_back(Arc::clone(&entry));
        Guard(entry)
    }

    pub fn clear(&self) {
        self.entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    /// `{"requests":[…]}` in arrival order.
    pub fn to_json(&self) -> Vec<u8> {
        let snapshot: Vec<Arc<Entry>> = self
            .entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .cloned()
            .collect();
        let requests: Vec<EntryView<'_>> = snapshot.iter().map(|e| e.view()).collect();
        serde_json::to_vec(&LogView { requests }).unwrap_or_default()
    }
}

impl Entry {
    fn settle(&self, state: u8) {
        // First writer wins: a completed request never turns cancelled, and vice versa.
        let _ =
            self.state
                .compare_exchange(IN_PROGRESS, state, Ordering::AcqRel, Ordering::Acquire);
    }

    fn view(&self) -> EntryView<'_> {
        let state = match self.state.load(Ordering::Acquire) {
            COMPLETED => "completed",
            CANCELLED => "cancelled",
            _ => "in_progress",
        };
        let prompt_tokens = self.prompt_tokens.load(Ordering::Acquire);
        let usage = (prompt_tokens != NONE).then(|| UsageView {
            prompt_tokens,
            completion_tokens: self.completion_tokens.load(Ordering::Acquire),
        });
        let ws_close = self
            .ws_close
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .map(|(code, reason)| CloseView { code, reason });
        let model = self
            .model
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        EntryView {
            model,
            request_id: self.request_id.as_deref(),
            method: &self.method,
            uri: &self.uri,
            state,
            headers: &self.headers,
            usage,
            ws_close,
        }
    }
}

impl Guard {
    pub fn complete(&self) {
        self.0.settle(COMPLETED);
    }

    pub fn tokens(&self) -> Tokens {
        Tokens(Some(Arc::clone(&self.0)))
    }

    /// A WebSocket session received a close frame (`None`: one without a code).
    pub fn ws_closed(&self, frame: Option<(u16, &str)>) {
        let (code, reason) = frame.unwrap_or((1005, ""));
        *self
            .0
            .ws_close
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some((code, reason.to_owned()));
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.0.settle(CANCELLED);
    }
}

#[derive(Serialize)]
struct LogView<'a> {
    requests: Vec<EntryView<'a>>,
}

#[derive(Serialize)]
struct EntryView<'a> {
    request_id: Option<&'a str>,
    method: &'a str,
    uri: &'a str,
    state: &'static str,
    headers: &'a [(String, String)],
    usage: Option<UsageView>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ws_close: Option<CloseView>,
    #[serde(skip_serializing_if = "Option::is_none")]
    model: Option<String>,
}

#[derive(Serialize)]
struct CloseView {
    code: u16,
    reason: String,
}

#[derive(Serialize)]
struct UsageView {
    prompt_tokens: u64,
    completion_tokens: u64,
}
