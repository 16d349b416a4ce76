//! One policy as built from its config: what it covers, how it keys a request, what a
//! request is estimated to cost, and the `RateLimit` headers of its parts.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use governor::clock::Clock;
use http::header::{HeaderName, HeaderValue};
use wildmatch::WildMatch;

use super::shared::RedisStore;
use super::store::{ConcurrencyStore, RequestStore, TokenStore};
use super::LimitRequest;
use crate::config::{LimitConfig, LimitKey, Mode, OnLimit, Rate};
use crate::route::Route;

pub(super) struct Policy<C: Clock> {
    /// The policy's place in the config: how its verdicts are reported.
    pub index: usize,
    /// The settings it was built from: a reload keeps the state of an unchanged policy.
    pub config: LimitConfig,
    pub name: Arc<str>,
    pub key: LimitKey,
    pub mode: Mode,
    pub on_limit: OnLimit,
    pub max_wait: Duration,
    pub routes: Vec<Route>,
    pub models: Vec<WildMatch>,
    pub clients: Vec<String>,
    pub requests: Option<(Rate, Arc<RequestStore<C>>)>,
    pub tokens: Option<(Rate, Arc<TokenStore<C>>)>,
    pub concurrency: Option<Arc<ConcurrencyStore>>,
    pub default_tokens: u64,
    /// `store = "redis"`: the shared store; the local stores above are then the fallback,
    /// holding the whole limit, of which each check there takes this replica's share.
    pub shared: Option<Arc<RedisStore>>,
    /// Shared keys known to be over their limit, until when (clock nanos): not asked again.
    pub denied: Arc<DashMap<Arc<str>, u64>>,
    /// The configured (whole, not per-replica) rates and concurrency, for shared checks.
    pub full: (Option<(Rate, u32)>, Option<Rate>, Option<u32>),
    /// `RateLimit-Policy` values of the request and token parts, rendered once.
    pub policy_headers: [HeaderValue; 2],
}

impl<C: Clock> Policy<C> {
    pub(super) fn covers(&self, r: &LimitRequest<'_>) -> bool {
        (self.routes.is_empty() || self.routes.contains(&r.route))
            && (self.models.is_empty()
                || r.model
                    .is_some_and(|m| self.models.iter().any(|p| p.matches(m))))
            && (self.clients.is_empty()
                || r.client
                    .is_some_and(|c| self.clients.iter().any(|n| **n == **c)))
    }

    pub(super) fn key(&self, r: &LimitRequest<'_>) -> Arc<str> {
        match &self.key {
            LimitKey::Client => r
                .client
                .or(r.fingerprint)
                .cloned()
                .unwrap_or_else(|| Arc::from("anonymous")),
            LimitKey::ApiKey => r.fingerprint.cloned().unwrap_or_else(|| Arc::from("none")),
            LimitKey::Ip => ip_key(r.ip),
            LimitKey::Header(h) => match r.headers.get(h) {
                Some(v) => Arc::from(String::from_utf8_lossy(&v.as_bytes()[..v.len().min(128)])),
                None => Arc::from("none"),
            },
            LimitKey::Model => text_key(r.model.unwrap_or("none")),
            LimitKey::Global => text_key(""),
        }
    }

    pub(super) fn remaining_requests(&self, remaining: u64) -> Remaining<'_> {
        let (rate, burst, interval) = match (self.full.0, &self.requests) {
            (Some((rate, burst)), Some((_, store))) if self.shared.is_some() => {
                (rate, burst, store.interval.max(rate.interval()))
            }
            (_, Some((rate, store))) => (*rate, store.burst, store.interval),
            _ => (
                Rate {
                    count: 1,
                    per: Duration::from_secs(1),
                },
                1,
                Duration::from_secs(1),
            ),
        };
        let used = u64::from(burst).saturating_sub(remaining);
        Remaining {
            name: &self.name,
            policy_header: &self.policy_headers[0],
            quota: u64::from(rate.count),
            window: rate.per.as_secs(),
            remaining,
            reset: interval * u32::try_from(used).unwrap_or(u32::MAX),
        }
    }

    pub(super) fn remaining_tokens(&self, remaining: u64) -> Remaining<'_> {
        let rate = self
            .full
            .1
            .or(self.tokens.as_ref().map(|t| t.0))
            .unwrap_or(Rate {
                count: 1,
                per: Duration::from_secs(1),
            });
        let missing = u64::from(rate.count).saturating_sub(remaining);
        Remaining {
            name: &self.name,
            policy_header: &self.policy_headers[1],
            quota: u64::from(rate.count),
            window: rate.per.as_secs(),
            remaining,
            reset: rate.per.mul_f64(missing as f64 / f64::from(rate.count)),
        }
    }

    /// Whether this policy's token part charges the request: a `POST` on a model route
    /// or a realtime session (or a request on a route the policy's `match.routes` names).
    pub(super) fn charges_tokens(&self, r: &LimitRequest<'_>) -> bool {
        self.tokens.is_some()
            && r.post
            && (!self.routes.is_empty() || r.route.carries_tokens() || r.route == Route::Realtime)
    }

    pub(super) fn estimate(&self, r: &LimitRequest<'_>) -> Estimate {
        let completion = if r.route == Route::Embeddings {
            Completion::None
        } else {
            match r.max_tokens {
                Some(n) => Completion::MaxTokens(n),
                None => Completion::Default(self.default_tokens),
            }
        };
        Estimate {
            prompt: r.prompt_tokens,
            completion,
        }
    }
}

/// What a request is estimated to cost before it is sent.
#[derive(Debug, Clone, Copy)]
pub(super) struct Estimate {
    pub prompt: u64,
    pub completion: Completion,
}

#[derive(Debug, Clone, Copy)]
pub(super) enum Completion {
    /// Embeddings: no completion.
    None,
    MaxTokens(u64),
    /// The request sets no cap: the policy's `default_tokens`.
    Default(u64),
}

impl Estimate {
    pub(super) fn total(&self) -> u64 {
        self.prompt
            + match self.completion {
                Completion::None => 0,
                Completion::MaxTokens(n) | Completion::Default(n) => n,
            }
    }

    /// `1,050 tokens (50 prompt + 1,000 max_tokens; set max_tokens to lower the estimate)`.
    pub(super) fn describe(&self) -> String {
        let (total, prompt) = (thousands(self.total()), thousands(self.prompt));
        match self.completion {
            Completion::None => format!("{total} tokens ({prompt} prompt)"),
            Completion::MaxTokens(n) => format!(
                "{total} tokens ({prompt} prompt + {} max_tokens; set max_tokens to lower the estimate)",
                thousands(n)
            ),
            Completion::Default(n) => format!(
                "{total} tokens ({prompt} prompt + {} default_tokens, as the request sets no max_tokens; set max_tokens to lower the estimate)",
                thousands(n)
            ),
        }
    }
}

/// `1234567` → `1,234,567`.
pub(super) fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

pub(super) fn consider<'a>(tightest: &mut Option<Remaining<'a>>, candidate: Remaining<'a>) {
    let ratio = |r: &Remaining| r.remaining as f64 / r.quota.max(1) as f64;
    if tightest
        .as_ref()
        .is_none_or(|t| ratio(&candidate) < ratio(t))
    {
        *tightest = Some(candidate);
    }
}

/// `RateLimit-Policy: "name";q=<quota>;w=<window seconds>`; fixed per policy part.
pub(super) fn policy_header(t: &Remaining<'_>) -> HeaderValue {
    HeaderValue::from_str(&format!("\"{}\";q={};w={}", t.name, t.quota, t.window))
        .unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// `RateLimit-Policy` and `RateLimit: "name";r=<remaining>;t=<seconds to reset>`.
pub(super) fn ratelimit_headers(t: &Remaining<'_>) -> Vec<(HeaderName, HeaderValue)> {
    let mut now = Vec::with_capacity(t.name.len() + 48);
    let reset = t.reset.as_secs() + u64::from(t.reset.subsec_nanos() > 0);
    // `"name";r=R;t=T`, without the formatting machinery (this is on every admitted request).
    now.push(b'"');
    now.extend_from_slice(t.name.as_bytes());
    now.extend_from_slice(b"\";r=");
    let mut digits = itoa::Buffer::new();
    now.extend_from_slice(digits.format(t.remaining).as_bytes());
    now.extend_from_slice(b";t=");
    now.extend_from_slice(digits.format(reset).as_bytes());
    let mut headers = Vec::with_capacity(2);
    if !t.policy_header.is_empty() {
        headers.push((
            HeaderName::from_static("ratelimit-policy"),
            t.policy_header.clone(),
        ));
    }
    if let Ok(v) = HeaderValue::try_from(now) {
        headers.push((HeaderName::from_static("ratelimit"), v));
    }
    headers
}

/// A text key (a model, or the one global key). Requests mostly name the same few models, so
/// each thread remembers the last key it built.
pub(super) fn text_key(text: &str) -> Arc<str> {
    thread_local! {
        static LAST: std::cell::RefCell<Option<Arc<str>>> = const { std::cell::RefCell::new(None) };
    }
    LAST.with(|last| {
        let mut last = last.borrow_mut();
        match &*last {
            Some(key) if **key == *text => Arc::clone(key),
            _ => {
                let key: Arc<str> = Arc::from(text);
                *last = Some(Arc::clone(&key));
                key
            }
        }
    })
}

/// An IP address as a key. A sidecar hears from very few peers (often only 127.0.0.1), so
/// each thread remembers the last one and hands out the same key.
pub(super) fn ip_key(ip: IpAddr) -> Arc<str> {
    thread_local! {
        static LAST: std::cell::RefCell<Option<(IpAddr, Arc<str>)>> =
            const { std::cell::RefCell::new(None) };
    }
    LAST.with(|last| {
        let mut last = last.borrow_mut();
        match &*last {
            Some((seen, key)) if *seen == ip => Arc::clone(key),
            _ => {
                let key: Arc<str> = Arc::from(ip.to_string());
                *last = Some((ip, Arc::clone(&key)));
                key
            }
        }
    })
}

/// One part's remaining quota, for the `RateLimit` headers of the tightest policy.
pub(super) struct Remaining<'a> {
    pub name: &'a str,
    pub policy_header: &'a HeaderValue,
    pub quota: u64,
    pub window: u64,
    pub remaining: u64,
    pub reset: Duration,
}
