//! Quota mode: per (key, model) requests and tokens buckets, as EZLINK and OpenAI enforce
//! them, reported in the six `x-ratelimit-*` headers (see the reference in `main.rs`).
//!
//! The bucket arithmetic is a pure function of (state, now): [`Bucket`] and [`decide`]
//! take the instant, so the tests pass theirs.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use http::header::RETRY_AFTER;
use http::{HeaderMap, HeaderValue, Response, StatusCode};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::body::Payload;
use crate::faults::openai_error;

/// (key, model) pairs kept; beyond it the oldest-touched is dropped.
pub const MAX_PAIRS: usize = 10_000;

/// Slack for floating-point levels: 58.9999999999 remaining is 59.
const EPSILON: f64 = 1e-6;

/// A bucket's capacity and window: it refills at `limit / per`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limit {
    pub limit: u64,
    pub per: Duration,
}

impl Limit {
    fn rate(&self) -> f64 {
        self.limit as f64 / self.per.as_secs_f64()
    }

    fn to_json(self) -> Value {
        json!({"limit": self.limit, "per": go_duration(self.per)})
    }
}

/// The quota: either bucket may be unlimited (`None`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    pub requests: Option<Limit>,
    pub tokens: Option<Limit>,
}

impl Config {
    fn to_json(self) -> Value {
        json!({
            "requests": self.requests.map(Limit::to_json),
            "tokens": self.tokens.map(Limit::to_json),
        })
    }

    /// `--quota requests=60/1m,tokens=40000/1m` (either part optional).
    pub fn from_cli(text: &str) -> Result<Config, String> {
        let mut config = Config::default();
        let mut seen = 0;
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let bad = || format!("{part:?}: expected requests=LIMIT/PER or tokens=LIMIT/PER");
            let (unit, spec) = part.split_once('=').ok_or_else(bad)?;
            let (limit, per) = spec.split_once('/').ok_or_else(bad)?;
            let limit = limit.trim().parse().map_err(|_| bad())?;
            let limit = checked(limit, per.trim())?;
            let slot = match unit.trim() {
                "requests" => &mut config.requests,
                "tokens" => &mut config.tokens,
                _ => return Err(bad()),
            };
            if slot.replace(limit).is_some() {
                return Err(format!("{} given twice", unit.trim()));
            }
            seen += 1;
        }
        if seen == 0 {
            return Err("expected requests=LIMIT/PER and/or tokens=LIMIT/PER".to_owned());
        }
        Ok(config)
    }

    /// `PUT /__emu/quota`: `{"requests": {"limit": 60, "per": "1m"}, "tokens": null}`.
    pub fn from_json(body: &[u8]) -> Result<Config, String> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Json {
            #[serde(default)]
            requests: Option<JsonLimit>,
            #[serde(default)]
            tokens: Option<JsonLimit>,
        }
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct JsonLimit {
            limit: u64,
            per: String,
        }
        let json: Json = serde_json::from_slice(body).map_err(|e| e.to_string())?;
        let limit = |l: Option<JsonLimit>| l.map(|l| checked(l.limit, &l.per)).transpose();
        Ok(Config {
            requests: limit(json.requests)?,
            tokens: limit(json.tokens)?,
        })
    }
}

fn checked(limit: u64, per: &str) -> Result<Limit, String> {
    if limit == 0 {
        return Err("a limit must be at least 1".to_owned());
    }
    Ok(Limit {
        limit,
        per: parse_duration(per)?,
    })
}

/// A Go-style duration above zero: `20ms`, `2s`, `1.5s`, `1m`, `6m0s`, `1h2m3.5s`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let bad = || format!("{text:?} is not a duration such as 20ms, 2s, 1m or 1h");
    let mut rest = text.trim();
    if rest.is_empty() {
        return Err(bad());
    }
    let mut total = 0f64;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        let number: f64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit = rest
            .find(|c: char| !c.is_ascii_alphabetic())
            .unwrap_or(rest.len());
        let seconds = match &rest[..unit] {
            "ms" => 0.001,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(bad()),
        };
        total += number * seconds;
        rest = &rest[unit..];
    }
    if !(total > 0.0 && total < 1e9) {
        return Err(bad());
    }
    Ok(Duration::from_secs_f64(total))
}

/// `d` as Go's `time.Duration.String()` writes it, rounded up to the millisecond: `0s`,
/// `20ms`, `1.5s`, `59.999s`, `6m0s`, `1h2m3.5s`.
pub fn go_duration(d: Duration) -> String {
    let ms = u64::try_from(d.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX);
    if ms == 0 {
        return "0s".to_owned();
    }
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let (hours, minutes) = (ms / 3_600_000, ms / 60_000 % 60);
    let (seconds, millis) = (ms / 1000 % 60, ms % 1000);
    let mut out = String::new();
    if hours > 0 {
        let _ = write!(out, "{hours}h");
    }
    if hours > 0 || minutes > 0 {
        let _ = write!(out, "{minutes}m");
    }
    let _ = write!(out, "{seconds}");
    if millis > 0 {
        let fraction = format!("{millis:03}");
        let _ = write!(out, ".{}", fraction.trim_end_matches('0'));
    }
    out.push('s');
    out
}

/// A bucket's level at an instant; it refills continuously up to its limit.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Bucket {
    level: f64,
    at: Instant,
}

impl Bucket {
    pub fn full(limit: &Limit, now: Instant) -> Bucket {
        Bucket {
            level: limit.limit as f64,
            at: now,
        }
    }

    pub fn level(&self, limit: &Limit, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        (self.level + elapsed * limit.rate()).min(limit.limit as f64)
    }

    /// The bucket brought to `now` (never backwards).
    pub fn at(self, limit: &Limit, now: Instant) -> Bucket {
        Bucket {
            level: self.level(limit, now),
            at: now.max(self.at),
        }
    }

    /// `floor(level)`.
    pub fn remaining(&self, limit: &Limit, now: Instant) -> u64 {
        (self.level(limit, now) + EPSILON).floor() as u64
    }

    pub fn can_carry(&self, limit: &Limit, cost: u64, now: Instant) -> bool {
        self.level(limit, now) + EPSILON >= cost as f64
    }

    /// The time until the bucket is full.
    pub fn reset(&self, limit: &Limit, now: Instant) -> Duration {
        seconds(limit.limit as f64 - self.level(limit, now), limit)
    }

    /// The time until the bucket can carry `cost` (until full when it never can).
    pub fn wait(&self, limit: &Limit, cost: u64, now: Instant) -> Duration {
        let cost = cost.min(limit.limit) as f64;
        seconds(cost - self.level(limit, now), limit)
    }

    /// Takes `cost` (the caller checked [`Bucket::can_carry`]).
    pub fn take(self, limit: &Limit, cost: u64, now: Instant) -> Bucket {
        let bucket = self.at(limit, now);
        Bucket {
            level: (bucket.level - cost as f64).max(0.0),
            at: bucket.at,
        }
    }

    /// The bucket under a changed limit: its level at `now` under the old one, capped at
    /// the new one, refilling at the new rate from `now`.
    pub fn rebased(self, old: &Limit, new: &Limit, now: Instant) -> Bucket {
        let bucket = self.at(old, now);
        Bucket {
            level: bucket.level.min(new.limit as f64),
            at: bucket.at,
        }
    }
}

/// `tokens` worth of refill at `limit`'s rate, in whole milliseconds rounded up.
fn seconds(tokens: f64, limit: &Limit) -> Duration {
    let ms = (tokens / limit.rate() * 1000.0 - EPSILON).ceil().max(0.0);
    Duration::from_millis(ms as u64)
}

/// A bucket's three headers at the moment a request was decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Snapshot {
    pub limit: u64,
    pub remaining: u64,
    pub reset: Duration,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub requests: Option<Snapshot>,
    pub tokens: Option<Snapshot>,
}

impl Report {
    /// The `x-ratelimit-*` headers of the limited buckets.
    pub fn write(&self, headers: &mut HeaderMap) {
        for (unit, snapshot) in [("requests", self.requests), ("tokens", self.tokens)] {
            let Some(s) = snapshot else { continue };
            let values = [
                ("limit", s.limit.to_string()),
                ("remaining", s.remaining.to_string()),
                ("reset", go_duration(s.reset)),
            ];
            for (what, value) in values {
                if let (Ok(name), Ok(value)) = (
                    http::HeaderName::try_from(format!("x-ratelimit-{what}-{unit}")),
                    HeaderValue::from_str(&value),
                ) {
                    headers.insert(name, value);
                }
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    Requests,
    Tokens,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Short {
    pub unit: Unit,
    pub limit: u64,
    pub used: u64,
    pub requested: u64,
    pub wait: Duration,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Admitted(Report),
    Limited(Report, Short),
}

impl Decision {
    pub fn report(&self) -> &Report {
        match self {
            Decision::Admitted(r) | Decision::Limited(r, _) => r,
        }
    }
}

/// One (key, model) pair: its buckets (`None` while unlimited) and counters.
#[derive(Clone, Debug, Default)]
pub struct Pair {
    requests: Option<Bucket>,
    tokens: Option<Bucket>,
    touched: u64,
    admitted: u64,
    limited: u64,
    admitted_tokens: u64,
}

/// Decides a request costing 1 request and `tokens` tokens: taken only if both buckets
/// can carry it.
pub fn decide(config: &Config, pair: &mut Pair, tokens: u64, now: Instant) -> Decision {
    let units = [
        (Unit::Requests, config.requests, &mut pair.requests, 1),
        (Unit::Tokens, config.tokens, &mut pair.tokens, tokens),
    ];
    let mut short: Option<Short> = None;
    let mut live = Vec::with_capacity(2);
    for (unit, limit, bucket, cost) in units {
        let Some(limit) = limit else {
            *bucket = None;
            continue;
        };
        let b = bucket
            .get_or_insert_with(|| Bucket::full(&limit, now))
            .at(&limit, now);
        *bucket = Some(b);
        if cost > limit.limit || !b.can_carry(&limit, cost, now) {
            let remaining = b.remaining(&limit, now);
            let candidate = Short {
                unit,
                limit: limit.limit,
                used: limit.limit - remaining.min(limit.limit),
                requested: cost,
                wait: b.wait(&limit, cost, now),
            };
            if short.as_ref().is_none_or(|s| candidate.wait > s.wait) {
                short = Some(candidate);
            }
        }
        live.push((unit, limit, bucket, cost, b));
    }
    let mut report = Report::default();
    for (unit, limit, bucket, cost, mut b) in live {
        if short.is_none() {
            b = b.take(&limit, cost, now);
            *bucket = Some(b);
        }
        let snapshot = Snapshot {
            limit: limit.limit,
            remaining: b.remaining(&limit, now),
            reset: b.reset(&limit, now),
        };
        match unit {
            Unit::Requests => report.requests = Some(snapshot),
            Unit::Tokens => report.tokens = Some(snapshot),
        }
    }
    match short {
        None => {
            pair.admitted += 1;
            pair.admitted_tokens += tokens;
            Decision::Admitted(report)
        }
        Some(short) => {
            pair.limited += 1;
            Decision::Limited(report, short)
        }
    }
}

/// The 429 OpenAI answers for a short bucket, with `retry-after` and the six headers.
pub fn too_many(model: &str, report: &Report, short: &Short) -> Response<Payload> {
    let (kind, per) = match short.unit {
        Unit::Requests => ("requests", "requests per min (RPM)"),
        Unit::Tokens => ("tokens", "tokens per min (TPM)"),
    };
    let message = format!(
        "Rate limit reached for {model} in organization org-emu on {per}: Limit {}, Used {}, \
         Requested {}. Please try again in {}.",
        short.limit,
        short.used,
        short.requested,
        go_duration(short.wait)
    );
    let code = Some("rate_limit_exceeded");
    let mut response = openai_error(StatusCode::TOO_MANY_REQUESTS, &message, kind, code);
    let seconds = short.wait.as_millis().div_ceil(1000);
    let headers = response.headers_mut();
    headers.insert(RETRY_AFTER, HeaderValue::from(seconds as u64));
    report.write(headers);
    response
}

/// The first 12 hex digits of the key's SHA-256: how `GET /__emu/quota` names it.
pub fn fingerprint(key: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, key.as_bytes());
    digest.as_ref()[..6].iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Quota mode's state, shared by every connection.
#[derive(Default)]
pub struct Quota {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// `None`: quota mode is off.
    config: Option<Config>,
    /// By (key fingerprint, model).
    pairs: HashMap<(String, String), Pair>,
    /// Touch tick → pair, oldest first.
    touched: BTreeMap<u64, (String, String)>,
    tick: u64,
    admitted: u64,
    limited: u64,
    admitted_tokens: u64,
}

impl Quota {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn is_on(&self) -> bool {
        self.lock().config.is_some()
    }

    /// Sets, changes (`Some`) or ends (`None`) quota mode. Buckets keep their level,
    /// capped at a new limit; a bucket that was unlimited starts full.
    pub fn set(&self, config: Option<Config>, now: Instant) {
        let mut inner = self.lock();
        let old = inner.config.take();
        match (old, config) {
            (_, None) => {
                inner.pairs.clear();
                inner.touched.clear();
            }
            (old, Some(new)) => {
                let old = old.unwrap_or_default();
                for pair in inner.pairs.values_mut() {
                    pair.requests = rebase(pair.requests, old.requests, new.requests, now);
                    pair.tokens = rebase(pair.tokens, old.tokens, new.tokens, now);
                }
            }
        }
        inner.config = config;
    }

    /// `POST /__emu/reset`: counters zeroed, buckets full again; the config stays.
    pub fn reset(&self) {
        let mut inner = self.lock();
        inner.pairs.clear();
        inner.touched.clear();
        inner.admitted = 0;
        inner.limited = 0;
        inner.admitted_tokens = 0;
    }

    /// Decides a request of `key` for `model` costing `tokens`; `None` when quota mode is
    /// off.
    pub fn decide(&self, key: &str, model: &str, tokens: u64, now: Instant) -> Option<Decision> {
        let mut guard = self.lock();
        let inner = &mut *guard;
        let config = inner.config?;
        let id = (fingerprint(key), model.to_owned());
        inner.tick += 1;
        let tick = inner.tick;
        if let Some(pair) = inner.pairs.get(&id) {
            inner.touched.remove(&pair.touched);
        } else if inner.pairs.len() >= MAX_PAIRS {
            if let Some((_, oldest)) = inner.touched.pop_first() {
                inner.pairs.remove(&oldest);
            }
        }
        inner.touched.insert(tick, id.clone());
        let pair = inner.pairs.entry(id).or_default();
        pair.touched = tick;
        let decision = decide(&config, pair, tokens, now);
        match decision {
            Decision::Admitted(_) => {
                inner.admitted += 1;
                inner.admitted_tokens += tokens;
            }
            Decision::Limited(..) => inner.limited += 1,
        }
        Some(decision)
    }

    /// `GET /__emu/quota`.
    pub fn to_json(&self, now: Instant) -> String {
        let inner = self.lock();
        let config = inner.config.unwrap_or_default();
        let remaining = |b: Option<Bucket>, l: Option<Limit>| match (b, l) {
            (Some(b), Some(l)) => Some(b.remaining(&l, now)),
            (None, Some(l)) => Some(l.limit),
            _ => None,
        };
        let pairs: Vec<Value> = inner
            .touched
            .values()
            .filter_map(|id| inner.pairs.get(id).map(|p| (id, p)))
            .map(|((key, model), p)| {
                json!({
                    "key": key, "model": model,
                    "requests_remaining": remaining(p.requests, config.requests),
                    "tokens_remaining": remaining(p.tokens, config.tokens),
                    "admitted": p.admitted, "limited": p.limited,
                    "admitted_tokens": p.admitted_tokens,
                })
            })
            .collect();
        json!({
            "quota": inner.config.map(Config::to_json),
            "admitted": inner.admitted,
            "limited": inner.limited,
            "admitted_tokens": inner.admitted_tokens,
            "pairs": pairs,
        })
        .to_string()
    }
}

fn rebase(
    bucket: Option<Bucket>,
    old: Option<Limit>,
    new: Option<Limit>,
    now: Instant,
) -> Option<Bucket> {
    match (bucket, old, new) {
        (Some(b), Some(old), Some(new)) => Some(b.rebased(&old, &new, now)),
        (_, _, Some(new)) => Some(Bucket::full(&new, now)),
        (_, _, None) => None,
    }
}

#[cfg(test)]
#[path = "quota_tests.rs"]
mod tests;
