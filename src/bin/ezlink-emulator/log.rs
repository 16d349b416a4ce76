//! The request log behind `GET /__emu/log`: one entry per request, in arrival order, whose
//! state a [`Guard`] settles exactly once (completed, or cancelled when dropped unfinished).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU8, Ordering};
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
        EntryView {
            request_id: self.request_id.as_deref(),
            method: &self.method,
            uri: &self.uri,
            state,
            headers: &self.headers,
        }
    }
}

impl Guard {
    pub fn complete(&self) {
        self.0.settle(COMPLETED);
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
}
