//! `GET /v1/realtime?model=M`: a minimal Realtime API, a WebSocket (RFC 6455, HTTP/1.1).
//!
//! The handshake is answered `101` (with the first offered `Sec-WebSocket-Protocol`, if
//! any); a request that is not a handshake gets 400 `code: "websocket_required"`. The
//! `x-emu-*` faults apply to the handshake as to any request (`x-emu-status: 401` refuses
//! it). Then:
//!
//! * the emulator sends `{"type":"session.created","event_id":…,"session":{"id":"sess_N",
//!   "object":"realtime.session","model":M}}` (M: the query's `model`, else `gpt-realtime`);
//! * `{"type":"response.create"}` → `response.created`, N `response.output_text.delta`
//!   events (`delta` = piece `i`, N = `x-emu-stream-events` of the handshake, default 5,
//!   `x-emu-stream-interval-ms` before each event after the first), `response.output_text
//!   .done`, then `response.done` whose `response.usage` is `{"total_tokens":10+N,
//!   "input_tokens":10,"output_tokens":N}` (with `x-emu-cached-tokens: K` on the handshake
//!   and/or `x-emu-audio-tokens: A,B` also `"input_token_details":{"cached_tokens":
//!   min(K,10),"text_tokens":10−a,"audio_tokens":a}` and `"output_token_details":
//!   {"text_tokens":N−b,"audio_tokens":b}`, a = min(A,10), b = min(B,N)); the log entry's
//!   `usage` sums every response;
//!   with `"emu_hold":true` the response stops after its deltas: no `.done` event comes,
//!   and the emulator waits for the peer's close frame (or its end), as a response the
//!   client left before it finished;
//! * `{"type":"emu.echo",…}` comes back as it was sent, and so does a binary message;
//! * `{"type":"emu.close","code":C,"reason":R}` → the emulator closes (default 1000);
//! * `{"type":"emu.stall"}` → the emulator stops reading and writing: the connection
//!   stays open, unanswered (no pong, no close reply), until the peer drops it;
//! * `{"type":"emu.reset"}` → the connection is aborted (RST), no close frame;
//! * other events are ignored; pings are answered.
//!
//! The log entry stays `in_progress` while the session lasts, turns `completed` after a
//! close handshake (whoever began it) and `cancelled` when the connection ended without
//! one (reset, stall, peer gone); its `ws_close` is the close frame the emulator received
//! (`{"code":…,"reason":…}`), absent when none came.

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use http::header::{
    CONNECTION, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, SEC_WEBSOCKET_PROTOCOL,
    SEC_WEBSOCKET_VERSION, UPGRADE,
};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::json;
use tokio::io::AsyncReadExt;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::api::piece;
use crate::body::Payload;
use crate::conn::ConnCtl;
use crate::faults::openai_error;
use crate::log::Guard;
use crate::options::Opts;
use crate::service::State;

/// Input tokens every response reports.
const INPUT_TOKENS: u64 = 10;

type Socket = WebSocketStream<TokioIo<Upgraded>>;

pub fn is_realtime(method: &Method, path: &str) -> bool {
    method == Method::GET && path == "/v1/realtime"
}

/// Answers a realtime handshake: `101` and a session on a task of its own, which holds the
/// log entry's guard; or 400 when `request` is no handshake (the guard comes back).
pub fn accept(
    mut request: Request<Incoming>,
    opts: &Opts,
    state: &Arc<State>,
    conn: &Arc<ConnCtl>,
    guard: Guard,
) -> (Response<Payload>, Option<Guard>) {
    let headers = request.headers();
    let key = headers.get(SEC_WEBSOCKET_KEY).map(HeaderValue::as_bytes);
    let handshake = has_token(headers, UPGRADE, "websocket")
        && has_token(headers, CONNECTION, "upgrade")
        && headers
            .get(SEC_WEBSOCKET_VERSION)
            .is_some_and(|v| v.as_bytes() == b"13");
    let (true, Some(key)) = (handshake, key) else {
        let message = "GET /v1/realtime is a WebSocket: send Upgrade: websocket, \
                       Connection: Upgrade, Sec-WebSocket-Version: 13 and a Sec-WebSocket-Key";
        let response = openai_error(
            StatusCode::BAD_REQUEST,
            message,
            "invalid_request_error",
            Some("websocket_required"),
        );
        return (response, Some(guard));
    };
    let mut response = Response::new(Payload::Bytes(bytes::Bytes::new()));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = response.headers_mut();
    h.insert(UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    if let Ok(accept) = HeaderValue::from_str(&derive_accept_key(key)) {
        h.insert(SEC_WEBSOCKET_ACCEPT, accept);
    }
    let protocol = headers
        .get(SEC_WEBSOCKET_PROTOCOL)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(',').next())
        .and_then(|p| HeaderValue::from_str(p.trim()).ok());
    if let Some(p) = protocol {
        h.insert(SEC_WEBSOCKET_PROTOCOL, p);
    }
    let session = Session {
        id: state.next_id(),
        model: model(request.uri().query()),
        events: opts.stream.events,
        cached: opts.cached_tokens,
        audio: opts.audio_tokens,
        interval: opts.stream.interval,
        guard,
        conn: Arc::clone(conn),
        input: 0,
        output: 0,
    };
    let upgrade = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        // Once hyper has written the 101; an error means the client left first.
        if let Ok(upgraded) = upgrade.await {
            let ws =
                WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
            session.run(ws).await;
        }
    });
    (response, None)
}

fn has_token(headers: &HeaderMap, name: http::header::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.to_str()
            .is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    })
}

/// The query's `model` (not percent-decoded: the emulator echoes what it got).
pub fn model(query: Option<&str>) -> String {
    query
        .unwrap_or("")
        .split('&')
        .find_map(|pair| pair.strip_prefix("model="))
        .filter(|m| !m.is_empty())
        .unwrap_or("gpt-realtime")
        .to_owned()
}

struct Session {
    id: u64,
    model: String,
    events: usize,
    /// `x-emu-cached-tokens` of the handshake: each response's cached input tokens.
    cached: Option<u64>,
    /// `x-emu-audio-tokens: IN,OUT` of the handshake: each response's audio tokens.
    audio: Option<(u64, u64)>,
    interval: Duration,
    guard: Guard,
    conn: Arc<ConnCtl>,
    input: u64,
    output: u64,
}

#[derive(Deserialize)]
struct ClientEvent {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    code: Option<u16>,
    #[serde(default)]
    reason: Option<String>,
    /// `response.create`: stop after the deltas, before `response.done`.
    #[serde(default)]
    emu_hold: bool,
}

impl Session {
    async fn run(mut self, mut ws: Socket) {
        let created = event(
            "session.created",
            &format!("event_{}_0", self.id),
            json!({"session": {"id": format!("sess_{}", self.id), "object": "realtime.session", "model": self.model}}),
        );
        if ws.send(Message::text(created)).await.is_err() {
            return;
        }
        let mut seq = 0u64;
        while let Some(message) = ws.next().await {
            let Ok(message) = message else {
                // The connection failed: no close handshake (the guard marks it cancelled).
                return;
            };
            let text = match message {
                Message::Text(text) => text,
                Message::Binary(data) => {
                    if ws.send(Message::Binary(data)).await.is_err() {
                        return;
                    }
                    continue;
                }
                Message::Close(frame) => return self.closed(&mut ws, frame).await,
                _ => continue,
            };
            let Ok(event) = serde_json::from_str::<ClientEvent>(&text) else {
                continue;
            };
            let sent = match event.kind.as_str() {
                "response.create" => {
                    seq += 1;
                    self.respond(&mut ws, seq, event.emu_hold).await
                }
                "emu.echo" => ws.send(Message::Text(text)).await.map_err(drop),
                "emu.close" => {
                    let frame = CloseFrame {
                        code: CloseCode::from(event.code.unwrap_or(1000)),
                        reason: event.reason.unwrap_or_default().into(),
                    };
                    // Then on until the peer's close frame (or its end).
                    ws.close(Some(frame)).await.map_err(drop)
                }
                "emu.stall" => return stall(ws).await,
                "emu.reset" => {
                    self.conn.abort();
                    return;
                }
                _ => Ok(()),
            };
            if sent.is_err() {
                return;
            }
        }
        // The stream ended: after a close handshake the emulator began, or without one.
    }

    /// The peer's close frame came: it is answered (by tungstenite) and the session ends.
    async fn closed(&self, ws: &mut Socket, frame: Option<CloseFrame>) {
        let frame = frame
            .as_ref()
            .map(|f| (u16::from(f.code), f.reason.as_str()));
        self.guard.ws_closed(frame);
        while ws.next().await.is_some() {}
        self.guard.complete();
    }

    /// One response to `response.create`.
    async fn respond(&mut self, ws: &mut Socket, seq: u64, hold: bool) -> Result<(), ()> {
        let id = format!("resp_{}_{seq}", self.id);
        let event_id = |n: usize| format!("event_{}_{seq}_{n}", self.id);
        let item = format!("item_{}_{seq}", self.id);
        let mut events = vec![event(
            "response.created",
            &event_id(0),
            json!({"response": {"id": id, "object": "realtime.response", "status": "in_progress"}}),
        )];
        for i in 0..self.events {
            events.push(event(
                "response.output_text.delta",
                &event_id(i + 1),
                json!({"response_id": id, "item_id": item, "output_index": 0, "content_index": 0, "delta": piece(i)}),
            ));
        }
        let text: String = (0..self.events).map(piece).collect();
        events.push(event(
            "response.output_text.done",
            &event_id(self.events + 1),
            json!({"response_id": id, "item_id": item, "output_index": 0, "content_index": 0, "text": text}),
        ));
        let output = self.events as u64;
        let mut usage = json!({"total_tokens": INPUT_TOKENS + output, "input_tokens": INPUT_TOKENS, "output_tokens": output});
        if self.cached.is_some() || self.audio.is_some() {
            let cached = self.cached.unwrap_or(0).min(INPUT_TOKENS);
            let (audio_in, audio_out) = self.audio.unwrap_or((0, 0));
            let (audio_in, audio_out) = (audio_in.min(INPUT_TOKENS), audio_out.min(output));
            usage["input_token_details"] = json!({"cached_tokens": cached, "text_tokens": INPUT_TOKENS - audio_in, "audio_tokens": audio_in});
            usage["output_token_details"] =
                json!({"text_tokens": output - audio_out, "audio_tokens": audio_out});
        }
        events.push(event(
            "response.done",
            &event_id(self.events + 2),
            json!({"response": {"id": id, "object": "realtime.response", "status": "completed", "usage": usage}}),
        ));
        if hold {
            // The deltas only; then the peer's close frame ends the session.
            events.truncate(events.len() - 2);
        }
        for (i, event) in events.into_iter().enumerate() {
            if i > 0 && !self.interval.is_zero() {
                // The peer is heard meanwhile: a close frame ends the response.
                let pause = tokio::time::sleep(self.interval);
                tokio::pin!(pause);
                loop {
                    tokio::select! {
                        () = &mut pause => break,
                        message = ws.next() => match message {
                            Some(Ok(Message::Close(frame))) => {
                                self.closed(ws, frame).await;
                                return Err(());
                            }
                            // Other events wait for no response under way: dropped.
                            Some(Ok(_)) => {}
                            Some(Err(_)) | None => return Err(()),
                        },
                    }
                }
            }
            ws.send(Message::text(event)).await.map_err(|_| ())?;
        }
        if hold {
            while let Some(message) = ws.next().await {
                match message {
                    Ok(Message::Close(frame)) => {
                        self.closed(ws, frame).await;
                        return Err(());
                    }
                    Ok(_) => {}
                    Err(_) => return Err(()),
                }
            }
            return Err(());
        }
        self.input += INPUT_TOKENS;
        self.output += output;
        self.guard.tokens().set(self.input, self.output);
        Ok(())
    }
}

/// An event as OpenAI's are written: `type` first, then `event_id`, then the members of
/// `rest` (an object).
fn event(kind: &str, event_id: &str, rest: serde_json::Value) -> String {
    let mut out = json!({"type": kind}).to_string();
    out.pop();
    out.push_str(",\"event_id\":");
    out.push_str(&serde_json::Value::from(event_id).to_string());
    if let serde_json::Value::Object(members) = rest {
        for (name, value) in members {
            out.push(',');
            out.push_str(&serde_json::Value::from(name).to_string());
            out.push(':');
            out.push_str(&value.to_string());
        }
    }
    out.push('}');
    out
}

/// Reads and drops whatever comes, writes nothing, until the peer leaves.
async fn stall(ws: Socket) {
    let mut io = ws.into_inner();
    let mut sink = [0u8; 4096];
    while matches!(io.read(&mut sink).await, Ok(n) if n > 0) {}
}
