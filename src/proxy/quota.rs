//! The request path's side of the upstream's quota (`[upstream.quota]`): pacing a request
//! before it is forwarded (`enforce`) and learning from every response (`observe` too).

use std::sync::Arc;
use std::time::Instant;

use http::HeaderMap;

use crate::clients::Caller;
use crate::config::{Priority, DEFAULT_COMPLETION_TOKENS};
use crate::errors::GatewayError;
use crate::exchange::Exchange;
use crate::gateway::{Gateway, State};
use crate::quota::{Ask, Cost, Marks, Pacer, Reading, Ticket, ANY_MODEL};
use crate::route::Route;

/// The longest model name learned under its own name; a longer one (sent by a caller) is
/// learned under its fingerprint.
const MAX_MODEL_LEN: usize = 128;

/// The flow of a caller with neither a client nor a key.
const ANONYMOUS: &str = "anonymous";

/// The one flow of every caller with neither a client nor a key, made once (not an
/// allocation per paced request).
fn anonymous_flow() -> Arc<str> {
    static FLOW: std::sync::OnceLock<Arc<str>> = std::sync::OnceLock::new();
    Arc::clone(FLOW.get_or_init(|| Arc::from(ANONYMOUS)))
}

/// The (key, model) pair the upstream counts a request under: the organization's key
/// (managed), else the caller's fingerprint; the request's model, or [`ANY_MODEL`].
fn pair<'a>(state: &'a State, caller: &'a Caller, model: Option<&'a str>) -> (&'a str, Model<'a>) {
    let key = match (&state.quota_org_key, &caller.key_fingerprint) {
        (Some(org), _) => org.as_ref(),
        (None, Some(fp)) => fp.as_ref(),
        (None, None) => ANONYMOUS,
    };
    let model = match model.unwrap_or(ANY_MODEL) {
        m if m.len() > MAX_MODEL_LEN => Model::Hashed(crate::clients::fingerprint(
            &crate::clients::sha256(m.as_bytes()),
        )),
        m => Model::Named(m),
    };
    (key, model)
}

enum Model<'a> {
    Named(&'a str),
    Hashed(String),
}

impl Model<'_> {
    fn as_str(&self) -> &str {
        match self {
            Model::Named(m) => m,
            Model::Hashed(m) => m,
        }
    }
}

/// Whether `enforce` paces this request: one that spends a model's quota (a `POST` on a
/// model route, a realtime session).
pub(super) fn paced(route: Route, post: bool, session: bool) -> bool {
    session || (post && route.carries_model())
}

/// Waits until the learned quota carries the request (or refuses it); the ticket is what
/// it took, given back if it is never forwarded.
pub(super) async fn pace(
    pacer: &Arc<Pacer>,
    gw: &Gateway,
    state: &State,
    caller: &Caller,
    out: &mut Exchange,
    max_tokens: Option<u64>,
) -> Result<Ticket, GatewayError> {
    let (key, model) = pair(state, caller, out.model.as_deref());
    let tokens = if out.route.carries_tokens() {
        let completion = match out.route {
            Route::Embeddings => 0,
            _ => max_tokens.unwrap_or(u64::from(DEFAULT_COMPLETION_TOKENS)),
        };
        out.prompt_estimate.saturating_add(completion)
    } else {
        0
    };
    let client = caller.client.as_ref();
    let flow: Arc<str> = match (client, &caller.key_fingerprint) {
        (Some(c), _) => Arc::clone(&c.name),
        (None, Some(fp)) => Arc::clone(fp),
        (None, None) => anonymous_flow(),
    };
    let ask = Ask {
        key,
        model: model.as_str(),
        flow: &flow,
        priority: client.map_or(Priority::default(), |c| c.priority),
        cost: Cost {
            requests: 1,
            tokens,
        },
    };
    match pacer.admit(ask, gw.drain_token()).await {
        Ok((ticket, waited)) => {
            out.queue_wait = waited;
            Ok(ticket)
        }
        Err((refusal, waited)) => {
            out.queue_wait = waited;
            Err(refusal)
        }
    }
}

/// Learns what an upstream response (any status, a WebSocket `101` too) tells of its key's
/// quota: into the table `/status` and the metrics show, and into the pacer's picture.
/// One pass over the headers, nothing else without them. `true` when it read something.
pub(super) fn learn(
    headers: &HeaderMap,
    state: &State,
    caller: &Caller,
    model: Option<&str>,
    ticket: Option<&Ticket>,
) -> bool {
    let Some(learned) = &state.quota else {
        return false;
    };
    let reading = Reading::from_headers(headers);
    if reading.is_empty() {
        return false;
    }
    let (key, model) = pair(state, caller, model);
    let now = Instant::now();
    learned.learn(key, model.as_str(), &reading, now);
    if let Some(pacer) = &state.pacer {
        let marks = ticket.map_or(Marks::default(), Ticket::marks);
        pacer.learn(key, model.as_str(), &reading, marks, now);
    }
    true
}

/// An upstream 429 that said nothing readable of the quota, with a `Retry-After`: in
/// `enforce`, the picture stays empty until then (`true`); `false` when there is no
/// picture to hold (the caller then holds the key back as without pacing).
pub(super) fn hold_empty(
    state: &State,
    caller: &Caller,
    model: Option<&str>,
    wait: std::time::Duration,
) -> bool {
    let Some(pacer) = &state.pacer else {
        return false;
    };
    let (key, model) = pair(state, caller, model);
    pacer.hold_empty(key, model.as_str(), wait, Instant::now())
}
