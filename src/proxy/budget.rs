//! The request path's side of `[[budgets]]`: before a request is forwarded, its maximum
//! cost is reserved in every budget that covers it (docs/budgets.md); the hold rides in the
//! exchange and is settled with what the request cost when it ends.

use std::time::Duration;

use http::HeaderMap;

use crate::budget::ledger::Refusal;
use crate::budget::{clock, Ask, Refused};
use crate::clients::Caller;
use crate::config::{BudgetMode, DEFAULT_COMPLETION_TOKENS};
use crate::cost::{self, Nanos, Tokens};
use crate::errors::GatewayError;
use crate::exchange::Exchange;
use crate::gateway::State;
use crate::route::Route;

/// What the request may ask of the model, as its body said.
pub(super) struct Asked {
    pub max_tokens: Option<u64>,
    pub choices: u64,
    pub spends: bool,
}

/// Reserves the request's maximum cost in the budgets that cover it; the hold goes into
/// `out`. Refuses it when one has not enough left, or when its model has no price.
pub(super) async fn admit(
    state: &State,
    caller: &Caller,
    headers: &HeaderMap,
    asked: Asked,
    out: &mut Exchange,
) -> Result<(), GatewayError> {
    let budgets = &state.budgets;
    if budgets.is_empty() {
        return Ok(());
    }
    let client = caller.client.as_ref();
    let ask = Ask {
        route: out.route,
        spends: asked.spends,
        model: out.model.as_deref(),
        team: client.and_then(|c| c.team.as_ref()),
        client: client.map(|c| &c.name),
        clients_configured: !state.clients.is_empty(),
        fingerprint: caller.key_fingerprint.as_ref(),
        headers,
    };
    let Some((first, mode)) = budgets.applies(&ask) else {
        return Ok(());
    };
    let Some(prices) = &state.prices else {
        // Validation refuses budgets without [prices].
        return Err(GatewayError::Internal("budgets without [prices]".into()));
    };
    let priced = match out.model.as_deref() {
        Some(model) => prices.rates(model).map_err(|e| GatewayError::Unpriced {
            budget: std::sync::Arc::clone(first),
            model: e.model,
        }),
        None => prices.rates("").map_err(|_| {
            GatewayError::BadRequest(format!(
                "the request names no model, and budget '{first}' applies to it: ezgate prices a request by its model; name one"
            ))
        }),
    };
    let rates = match priced {
        Ok(rates) => rates,
        // Only shadow budgets cover it: they count what they would have refused, and it
        // goes on.
        Err(unpriced) if mode == BudgetMode::Shadow => {
            budgets.shadow_refused(&ask, &unpriced);
            return Ok(());
        }
        Err(unpriced) => return Err(unpriced),
    };
    let completion = match out.route {
        Route::Embeddings => 0,
        // A cap of 0 is read by some upstreams as no cap: reserved as none given.
        _ => asked.max_tokens.filter(|&m| m > 0).unwrap_or_else(|| {
            u64::from(DEFAULT_COMPLETION_TOKENS).saturating_mul(asked.choices.max(1))
        }),
    };
    // The most it can cost: every prompt token at the dearer of the text and audio input
    // prices (none at the cached price), every completion token at the dearer output price.
    let mut dearest = rates;
    dearest.input = rates.input.max(rates.audio_input.unwrap_or(0));
    dearest.output = rates.output.max(rates.audio_output.unwrap_or(0));
    let max_cost = cost::cost(
        &dearest,
        &Tokens {
            prompt: out.prompt_estimate,
            completion,
            ..Tokens::default()
        },
    );
    let now = clock::now();
    match budgets.admit(&ask, max_cost.0, now).await {
        Ok(hold) => {
            out.budget = hold;
            Ok(())
        }
        Err(refused) => Err(exceeded(
            &refused,
            out.route,
            asked.max_tokens,
            prices.currency(),
            now,
        )),
    }
}

/// The refusal a client reads: which budget, what is left, what the request may cost, and
/// what to do.
fn exceeded(
    r: &Refused,
    route: Route,
    max_tokens: Option<u64>,
    currency: &str,
    now: jiff::Timestamp,
) -> GatewayError {
    let (message, next) = match &r.refusal {
        Refusal::Exceeded { left, next_period } => {
            // What the client can change: an embedding has no completion to cap, and a
            // realtime session names no cap when it opens.
            let lower = match (route, max_tokens) {
                (Route::Embeddings, _) => "send less input (an embedding costs its input tokens) or wait for the next period".to_owned(),
                (Route::Realtime, _) => format!("wait for the next period (a realtime session reserves {DEFAULT_COMPLETION_TOKENS} output tokens when it opens)"),
                (_, Some(m)) => format!("send a lower max_tokens (this request asks for up to {m} completion tokens) or wait for the next period"),
                (_, None) => format!("set max_tokens (without it ezgate reserves {DEFAULT_COMPLETION_TOKENS} completion tokens) or wait for the next period"),
            };
            (
                format!(
                    "Budget '{}' has {} {currency} left of {} {currency} until {next_period}; this request may cost up to {} {currency}. To fit, {lower}.",
                    r.budget,
                    Nanos(*left),
                    Nanos(r.amount),
                    Nanos(r.max_cost),
                ),
                *next_period,
            )
        }
        Refusal::Unshared { error } => {
            return GatewayError::Overloaded(format!(
                "budget '{}' is kept in Redis, which does not answer ({error}), and this account has no spend known to this gateway; with redis.on_failure = \"deny\" it is refused until Redis answers",
                r.budget
            ))
        }
        Refusal::Full { next_period } => (
            format!(
                "Budget '{}' already tracks {} accounts this period, the most it keeps; a new one is refused until {next_period}.",
                r.budget,
                crate::budget::ledger::MAX_KEYS
            ),
            *next_period,
        ),
    };
    // Exact to the millisecond: `Retry-After` rounds it up, so a client that waits that
    // long arrives in the new period.
    let wait = Duration::try_from(next.duration_since(now)).unwrap_or(Duration::ZERO);
    GatewayError::BudgetExceeded {
        budget: std::sync::Arc::clone(&r.budget),
        message,
        retry_after: wait.max(Duration::from_millis(1)),
    }
}
