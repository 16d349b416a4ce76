//! The API routes that create an object or answer with one, beside the completions: realtime
//! sessions and client secrets, assistants, runs, fine-tuning jobs, batches, images and audio
//! translations. Each reads the model the real API would use (a JSON body's `model`, a
//! client secret's `session.model`, a multipart form's `model` field), logs it, and answers
//! with a small object of the real API's shape.

use http::header::CONTENT_TYPE;
use http::{HeaderMap, Method, Response, StatusCode};
use serde_json::{json, Value};

use crate::body::Payload;
use crate::faults::{openai_error, respond, JSON};
use crate::log::Tokens;
use crate::service::State;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Object {
    RealtimeSession,
    ClientSecret,
    Assistant,
    Run,
    FineTuningJob,
    Batch,
    Image,
    AudioText,
}

/// The object route of `method path`, if it is one.
pub fn route(method: &Method, path: &str) -> Option<Object> {
    if method != Method::POST {
        return None;
    }
    let segments: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
    Some(match segments[..] {
        ["v1", "realtime", "sessions"] => Object::RealtimeSession,
        ["v1", "realtime", "client_secrets"] => Object::ClientSecret,
        ["v1", "assistants"] | ["v1", "assistants", _] => Object::Assistant,
        ["v1", "threads", "runs"] | ["v1", "threads", _, "runs"] => Object::Run,
        ["v1", "fine_tuning", "jobs"] => Object::FineTuningJob,
        ["v1", "batches"] => Object::Batch,
        ["v1", "images", "generations" | "edits" | "variations"] => Object::Image,
        ["v1", "audio", "transcriptions" | "translations"] => Object::AudioText,
        _ => return None,
    })
}

/// Answers an object route; the model read is written to the request's log entry.
pub fn create(
    state: &State,
    object: Object,
    headers: &HeaderMap,
    body: &[u8],
    log: &Tokens,
) -> Response<Payload> {
    let model = match model(object, headers, body) {
        Ok(model) => model,
        Err(why) => return bad_request(why),
    };
    if let Some(m) = &model {
        log.set_model(m);
    }
    let n = state.next_id();
    let t = 1_700_000_000_u64;
    let m = model.as_deref();
    let body = match object {
        Object::RealtimeSession => json!({
            "id": format!("sess_emu{n}"), "object": "realtime.session",
            "model": m.unwrap_or("gpt-realtime"),
            "client_secret": {"value": format!("ek_emu{n}"), "expires_at": t + 60},
        }),
        Object::ClientSecret => json!({
            "value": format!("ek_emu{n}"), "expires_at": t + 600,
            "session": {"type": "realtime", "object": "realtime.session",
                        "id": format!("sess_emu{n}"), "model": m.unwrap_or("gpt-realtime")},
        }),
        Object::Assistant => json!({
            "id": format!("asst_emu{n}"), "object": "assistant", "created_at": t, "model": m,
        }),
        Object::Run => json!({
            "id": format!("run_emu{n}"), "object": "thread.run", "created_at": t,
            "status": "queued", "model": m.unwrap_or("gpt-4o"),
        }),
        Object::FineTuningJob => json!({
            "id": format!("ftjob-emu{n}"), "object": "fine_tuning.job", "created_at": t,
            "status": "validating_files", "model": m,
        }),
        Object::Batch => json!({
            "id": format!("batch_emu{n}"), "object": "batch", "created_at": t,
            "status": "validating",
        }),
        Object::Image => json!({"created": t, "data": [{"b64_json": "iVBORw0KGgo="}]}),
        Object::AudioText => json!({"text": "tok0 "}),
    };
    respond(StatusCode::OK, JSON, body.to_string())
}

/// The model the real API would use: a JSON body's `model` (a client secret's
/// `session.model`) or a multipart form's last `model` field; `Err` when the body does not
/// parse.
pub fn model(
    object: Object,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Option<String>, &'static str> {
    let content_type = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if content_type
        .to_ascii_lowercase()
        .starts_with("multipart/form-data")
    {
        form_field(content_type, body, "model")
    } else if body.is_empty() {
        Ok(None)
    } else {
        let Ok(value) = serde_json::from_slice::<Value>(body) else {
            return Err("We could not parse the JSON body of your request.");
        };
        let model = match object {
            Object::ClientSecret => &value["session"]["model"],
            _ => &value["model"],
        };
        Ok(model.as_str().map(str::to_owned))
    }
}

/// Whether quota mode counts the route: realtime sessions and client secrets, images and
/// audio (not assistants, runs, jobs or batches).
pub fn counted(object: Object) -> bool {
    matches!(
        object,
        Object::RealtimeSession | Object::ClientSecret | Object::Image | Object::AudioText
    )
}

/// The model quota mode charges when the request names none (or does not parse).
pub fn default_model(object: Object) -> &'static str {
    match object {
        Object::RealtimeSession | Object::ClientSecret => "gpt-realtime",
        _ => "-",
    }
}

fn bad_request(message: &str) -> Response<Payload> {
    openai_error(
        StatusCode::BAD_REQUEST,
        message,
        "invalid_request_error",
        None,
    )
}

/// The text of the last form field `name` of a multipart body (the way common form parsers
/// keep the last of repeated fields); `Ok(None)` when there is none.
fn form_field(content_type: &str, body: &[u8], name: &str) -> Result<Option<String>, &'static str> {
    const BAD: &str = "The multipart body of your request could not be parsed.";
    let boundary = content_type
        .split(';')
        .filter_map(|p| p.trim().split_once('='))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("boundary"))
        .map(|(_, v)| v.trim().trim_matches('"'))
        .filter(|b| !b.is_empty())
        .ok_or(BAD)?;
    let delimiter = format!("--{boundary}");
    let text = String::from_utf8_lossy(body);
    let mut found = None;
    let mut closed = false;
    for part in text.split(delimiter.as_str()).skip(1) {
        if part.starts_with("--") {
            closed = true;
            break;
        }
        let part = part.strip_prefix("\r\n").ok_or(BAD)?;
        let (head, value) = part.split_once("\r\n\r\n").ok_or(BAD)?;
        let value = value.strip_suffix("\r\n").ok_or(BAD)?;
        let named = head.lines().any(|line| {
            line.split_once(':').is_some_and(|(h, v)| {
                h.trim().eq_ignore_ascii_case("content-disposition")
                    && v.split(';').any(|p| {
                        p.trim() == format!("name=\"{name}\"") || p.trim() == format!("name={name}")
                    })
            })
        });
        if named {
            found = Some(value.to_owned());
        }
    }
    if closed {
        Ok(found)
    } else {
        Err(BAD)
    }
}
