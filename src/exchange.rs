//! One request's exchange, as the request path holds it: its [`Outcome`] (what happened,
//! plain data) and what it holds while it runs (the limits' permit, its place under
//! `server.max_inflight`, its place on its connection). When it drops — after the
//! response ended, or when the client went away — the permit is settled with what the
//! request spent, and the outcome is counted and logged, exactly once.

use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::time::Instant;

use crate::access_log;
use crate::budget::Hold;
use crate::cost::{Prices, Tokens};
use crate::errors::redact::Redactor;
use crate::gateway::{ConnSlot, InflightSlot};
use crate::limits::Permit;
use crate::metrics::Metrics;
use crate::outcome::{Outcome, CLIENT_CLOSED};
use crate::route::Route;
use crate::traces::RequestSpan;

pub struct Exchange {
    out: Outcome,
    pub permit: Option<Permit>,
    /// What the budgets that cover the request hold for it, settled with its cost.
    pub budget: Option<Hold>,
    pub slot: Option<InflightSlot>,
    /// Its place on its connection (ended with the response: the connection's task times
    /// the wait for the next request head, or counts the stream closed).
    pub conn: Option<ConnSlot>,
    /// The request's span, ended with the outcome.
    pub trace: Option<RequestSpan>,
    /// The organization's key (managed mode), replaced in what the upstream said before the
    /// outcome is logged and traced.
    pub redact: Option<Arc<Redactor>>,
    /// `[prices]`: the outcome's cost is computed from its usage when it is counted.
    pub prices: Option<Arc<Prices>>,
    metrics: Arc<Metrics>,
    access_log: bool,
}

impl Exchange {
    pub fn start(
        metrics: Arc<Metrics>,
        access_log: bool,
        request_id: String,
        method: &http::Method,
        route: Route,
    ) -> Exchange {
        metrics.inflight(route).inc();
        Exchange {
            out: Outcome::new(request_id, method, route),
            permit: None,
            budget: None,
            slot: None,
            conn: None,
            trace: None,
            redact: None,
            prices: None,
            metrics,
            access_log,
        }
    }
}

impl Deref for Exchange {
    type Target = Outcome;
    fn deref(&self) -> &Outcome {
        &self.out
    }
}

impl DerefMut for Exchange {
    fn deref_mut(&mut self) -> &mut Outcome {
        &mut self.out
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        let out = &mut self.out;
        if !out.finished {
            out.client_left();
        }
        if let Some(permit) = self.permit.take() {
            if permit.reserves_tokens() {
                let mut spent = out.tokens_spent();
                if out.usage_unreadable && out.usage.is_none() && spent > 0 {
                    spent = spent.max(permit.reserved());
                }
                out.charged = Some(spent);
                permit.settle(spent);
            }
        }
        // A body that ended just read the clock (the exchange drops right after).
        let ended = out.ended.unwrap_or_else(Instant::now);
        if let Some(conn) = self.conn.take() {
            conn.end(ended, out.status == CLIENT_CLOSED);
        }
        if let Some(r) = &self.redact {
            // The model too: without one in the request it is the response's.
            for said in [
                &mut out.upstream_code,
                &mut out.response_model,
                &mut out.model,
            ]
            .into_iter()
            .flatten()
            {
                r.string(said);
            }
        }
        if let (Some(prices), Some(u)) = (&self.prices, out.usage) {
            out.cost = priced(prices, out, u);
        }
        if let (Some(hold), Some(prices)) = (self.budget.take(), &self.prices) {
            settle(hold, prices, out);
        }
        let duration = ended.saturating_duration_since(out.started);
        self.metrics.record(out, duration);
        if self.access_log {
            access_log::record(out, duration);
        }
        // Out of flight only once counted and logged: a scrape that sees no request in
        // flight sees every finished one in the counters.
        self.metrics.inflight(out.route).dec();
        if let Some(span) = self.trace.take() {
            span.finish(out);
        }
    }
}

/// What `usage` cost, priced by the model the request named (else the one its response
/// named). A model with no price is not refused here (`Unpriced` is for budgets): its
/// request has no cost.
fn priced(prices: &Prices, out: &Outcome, u: crate::outcome::Usage) -> Option<u64> {
    let tokens = Tokens {
        prompt: u.prompt,
        completion: u.completion,
        cached: u.cached,
        audio_in: u.audio_in,
        audio_out: u.audio_out,
    };
    cost_of(prices, out, &tokens)
}

/// What `tokens` of the request's model (else its response's) cost; `None` for an unpriced
/// model or none named.
fn cost_of(prices: &Prices, out: &Outcome, tokens: &Tokens) -> Option<u64> {
    let model = out.model.as_deref().or(out.response_model.as_deref())?;
    match prices.cost(model, tokens) {
        Ok(cost) => Some(cost.0),
        Err(unpriced) => {
            tracing::debug!(request_id = %out.request_id, "{unpriced}");
            None
        }
    }
}

/// Settles the request's budgets with what it cost: its priced usage, and, for what the
/// upstream did not report (a stream cut before its usage, a session's unfinished
/// response), the estimate the token policies charge, at the model's prices.
fn settle(hold: Hold, prices: &Prices, out: &Outcome) {
    // What the upstream did not report: all of it without a usage, a session's unfinished
    // response beside its usages.
    let unreported = match (out.usage, out.session.is_some()) {
        (Some(_), false) => None,
        (Some(_), true) => Some((0, out.output_estimate)),
        (None, _) => Some(out.tokens_used()),
    };
    let estimated = unreported.map_or(0, |(prompt, completion)| {
        let tokens = Tokens {
            prompt,
            completion,
            ..Tokens::default()
        };
        cost_of(prices, out, &tokens).unwrap_or(0)
    });
    let mut actual = out.cost.unwrap_or(0).saturating_add(estimated);
    // A success whose usage could not be read, or a request the upstream may have spent
    // all it was allowed on unseen: charged what was reserved, at least.
    let unread = out.usage_unreadable && out.usage.is_none() && actual > 0;
    if unread || unaccounted(out) {
        actual = actual.max(hold.reserved());
    }
    let now = crate::budget::clock::now();
    for w in hold.settle(actual, now) {
        w.log();
    }
}

/// A request the upstream may have spent its whole allowance on without ezgate learning
/// what it spent: sent, and then its client left or the upstream's answer did not come in
/// `upstream.response_timeout` (a caller could do either at will, with a large
/// `max_tokens`); or a non-streamed success on a token route without a usage (a Responses
/// request run in the `background`, whose result is fetched later).
fn unaccounted(out: &Outcome) -> bool {
    if out.session.is_some() || !out.forwarded {
        return false;
    }
    match out.upstream_status {
        None => {
            out.status == CLIENT_CLOSED
                || out.upstream_failure == Some(crate::errors::FailureKind::Timeout)
        }
        Some(s) => {
            (200..300).contains(&s)
                && out.usage.is_none()
                && !out.streamed
                && out.route.carries_tokens()
        }
    }
}
