//! `ezlink-emulator` — a local stand-in for the EZLINK AI API (OpenAI-compatible) that can
//! also produce every failure the real one can. It is the upstream of ezgate's integration
//! tests and benchmarks; this comment and `HEADERS` below (printed by `--help`) are its
//! reference.
//!
//! # Command line
//!
//! ```text
//! ezlink-emulator --listen ADDR [--tls-cert PEM_PATH --tls-key PEM_PATH] [--quota SPEC]
//! ezlink-emulator --help        # these options and every x-emu-* request header
//! ezlink-emulator --version     # version, git commit, build profile
//! ```
//!
//! * `--listen 127.0.0.1:0` picks a free port. Once bound, exactly one line
//!   `listening on 127.0.0.1:PORT` is printed to stdout (flushed). Diagnostics go to stderr;
//!   nothing is logged per request.
//! * Plain: HTTP/1.1 and h2c with prior knowledge. With `--tls-cert`/`--tls-key` (PEM; both
//!   or neither): TLS via rustls, ALPN `h2` and `http/1.1`.
//! * Exits 0 on SIGTERM or SIGINT, dropping open connections.
//! * `--quota requests=60/1m,tokens=40000/1m` starts in quota mode (below); either part may
//!   be left out (unlimited); a window is a number with `ms`, `s`, `m` or `h` (`20/2s`,
//!   Go-style compounds such as `1m30s` too); a limit is at least 1.
//!
//! # Normal API
//!
//! * `GET /v1/models` → 200 `{"object":"list","data":[{"id":"gpt-4o","object":"model",
//!   "created":…,"owned_by":"ezlink"},…]}` with gpt-4o, gpt-4o-mini, gpt-4.1,
//!   text-embedding-3-small, text-embedding-3-large.
//! * `POST /v1/chat/completions`, `POST /v1/completions` (OpenAI JSON body). `model` is
//!   echoed (default `gpt-4o`). `P` = prompt_tokens = max(1, characters of all message
//!   contents / 4) (completions: of `prompt`; text parts `{"text": …}` count, a number
//!   counts as 4 characters). Content piece `i` (0-based) is the text `"tok{i} "`.
//!   * Non-stream → 200 `chat.completion` (resp. `text_completion`) JSON whose content is
//!     pieces `0..min(C, 64)` concatenated, `finish_reason: "stop"`, and
//!     `usage: {prompt_tokens: P, completion_tokens: C, total_tokens: P+C}`, where `C` is
//!     header `x-emu-completion-tokens` (default 7); with `x-emu-cached-tokens: K` the
//!     usage (here and in a stream's usage chunk) also has `prompt_tokens_details:
//!     {cached_tokens: min(K, P)}`, and a Responses usage's `input_tokens_details`.
//!   * `"stream": true` → 200 `content-type: text/event-stream`, each event its own body
//!     frame, produced when polled: `N` events `data: {chunk}\n\n` (header
//!     `x-emu-stream-events`, default 5), one content piece each (chat: `delta.content`,
//!     the first also `delta.role: "assistant"`; completions: `choices[0].text`), the last
//!     with `finish_reason: "stop"`; with `"stream_options": {"include_usage": true}` every
//!     chunk also ends with `"usage":null` (as OpenAI's do), then a chunk with
//!     `"choices": []` and `"usage": {"prompt_tokens":P,"completion_tokens":N,
//!     "total_tokens":P+N}`; then `data: [DONE]\n\n`. `x-emu-stream-interval-ms` (default
//!     0) is waited before every event after the first (including usage and `[DONE]`).
//!   * Body not valid JSON (or fields of the wrong type, e.g. `"stream": "yes"`) → 400
//!     `{"error":{"message":"We could not parse the JSON body of your request. (…)",
//!     "type":"invalid_request_error","param":null,"code":null}}`. Body over 32 MiB → 413.
//! * `POST /v1/responses` (the Responses API; `P` from `input` and `instructions`) →
//!   non-stream: a `response` object (`status: "completed"`, one `output_text` of
//!   pieces `0..min(C, 64)`, `usage: {input_tokens: P, output_tokens: C, total_tokens}`);
//!   `"stream": true`: `event: response.created`, `N` `event: response.output_text.delta`
//!   (`delta` = piece `i`), then `event: response.completed` whose `response.usage` has
//!   `input_tokens: P, output_tokens: N`; no `[DONE]`. The stream faults apply.
//! * `POST /v1/embeddings` → one embedding of 8 floats per input (`input` a string or a
//!   token array: 1; an array of strings/arrays: its length), `usage: {prompt_tokens: P,
//!   total_tokens: P}`, `model` echoed (default `text-embedding-3-small`).
//! * Any method, path starting `/echo` → 200, the request body streamed back frame by frame
//!   (never buffered: bounded memory for any size), `content-type` copied from the request
//!   (else `application/octet-stream`), `x-echo-method`, and `x-echo-uri` (path and query
//!   as received). A request `content-length` is kept on the response.
//! * Any method, path starting `/inspect` → 200 `{"method":"…","uri":"/inspect?x=1",
//!   "version":"HTTP/1.1"|"HTTP/2.0","headers":[["name","value"],…],"body_len":n}`. Header
//!   names are lowercase, in order of first appearance with repeated names kept but grouped
//!   (hyper's `HeaderMap` order); HTTP/2 without a `host` header gets `["host", authority]`
//!   first.
//! * `GET /v1/realtime?model=M` → a WebSocket (the Realtime API): `session.created`, then
//!   `response.create` answered with `response.*` events and a `response.done` with usage,
//!   and `emu.echo`, `emu.close`, `emu.stall`, `emu.reset` events that make it echo, close,
//!   stall or reset; the whole reference is in `realtime.rs`.
//! * `POST /v1/realtime/sessions`, `/v1/realtime/client_secrets`, `/v1/assistants[/ID]`,
//!   `/v1/threads/runs`, `/v1/threads/ID/runs`, `/v1/fine_tuning/jobs`, `/v1/batches`,
//!   `/v1/images/{generations,edits,variations}`, `/v1/audio/{transcriptions,translations}`
//!   → 200, a small object of the real API's shape (a session's or client secret's
//!   ephemeral key is `ek_emuN`). The model the real API would use — a JSON body's `model`
//!   (a client secret's: `session.model`), or a `multipart/form-data` body's `model` field
//!   (the last one) — is the log entry's `model`. A body that does not parse → 400.
//! * Anything else → 404 `{"error":{"message":"Invalid URL (METHOD /path)","type":
//!   "invalid_request_error","param":null,"code":"unknown_url"}}`.
//!
//! # Control endpoints (never logged, never faulted)
//!
//! * `GET /__emu/log` → `{"requests":[{"request_id": <x-request-id or null>, "method":
//!   "POST", "uri": "/v1/…?q", "state": "in_progress"|"completed"|"cancelled", "headers":
//!   [["name","value"],…], "usage": {"prompt_tokens":P,"completion_tokens":C} | null}]}` in
//!   arrival order (the newest 10 000 are kept). `usage` is what the emulator generated for
//!   a completion, a response or embeddings (null for faults and other routes); a stream
//!   counts each content event as it is sent, so a cancelled stream shows what it sent.
//!   `completed`: the last byte of the response body was handed to hyper (for `HEAD`: the
//!   response head). `cancelled`: the handler or its body was dropped before that — the
//!   client went away during a header delay, a stall or a stream, or the emulator aborted
//!   on purpose (`x-emu-reset`, `x-emu-cut-after`). A raw `x-emu-malformed` reply counts as
//!   completed.
//! * `GET /__emu/connections` → `{"accepted": n}`: TCP connections accepted since start.
//! * `POST /__emu/reset` → 200 `{"reset":true}`; clears the log, zeroes the quota
//!   counters and drops every quota bucket (so all are full again); the quota config stays.
//! * `PUT /__emu/quota` with `{"requests": {"limit": 60, "per": "1m"}, "tokens": {"limit":
//!   40000, "per": "1m"}}` (either part null or absent = unlimited; `per` as for `--quota`;
//!   unknown members refused) turns quota mode on or changes it at once: existing buckets
//!   keep their level (capped at the new limit) and refill at the new rate from now; a
//!   bucket that was unlimited starts full. → 200 and the `GET` document. A bad body → 400
//!   `{"error":{"message":"ezlink-emulator: bad quota: …","type":"invalid_request_error",
//!   "param":null,"code":"emulator_bad_quota"}}`. `{}` is quota mode with both unlimited:
//!   requests are counted, never limited, and carry no quota headers.
//! * `DELETE /__emu/quota` → quota mode off: buckets dropped, no headers (the global
//!   counters stay until `/__emu/reset`); → 200 and the `GET` document.
//! * `GET /__emu/quota` → `{"quota": {"requests": {"limit":60,"per":"1m0s"} | null,
//!   "tokens": … | null} | null, "admitted": n, "limited": n, "admitted_tokens": n,
//!   "pairs": [{"key": K, "model": "m", "requests_remaining": n | null,
//!   "tokens_remaining": n | null, "admitted": n, "limited": n, "admitted_tokens": n}]}`:
//!   `per` as a Go duration, `K` the first 12 hex digits of the SHA-256 of the key,
//!   `*_remaining` floor(level) now (null: unlimited), pairs oldest-touched first,
//!   `admitted_tokens` the tokens charged to admitted requests.
//!
//! # Quota mode
//!
//! Off unless `--quota` or `PUT /__emu/quota` turns it on. Then every (key, model) pair has
//! a requests bucket and a tokens bucket (each unless unlimited): capacity `limit`, starting
//! full, refilling continuously at `limit / per`. At most 10 000 pairs are kept; beyond,
//! the oldest-touched is dropped (it starts full if it comes back).
//!
//! * Key: the value of `Authorization: Bearer <value>` (the header without its `Bearer `
//!   prefix, any case), `anonymous` when absent or empty. Never printed or logged as such.
//! * Model: a completion's, response's or embeddings' JSON `model` (default `gpt-4o`,
//!   embeddings `text-embedding-3-small`; the `x-emu-echo-key` model is ignored); the
//!   realtime handshake's query `model` (default `gpt-realtime`); an object route's model as
//!   logged (default `gpt-realtime` for sessions and client secrets, `-` for images and
//!   audio).
//! * Counted: `POST` chat/completions, completions, responses, embeddings,
//!   `/v1/images/{generations,edits,variations}`, `/v1/audio/{transcriptions,translations}`,
//!   `/v1/realtime/{sessions,client_secrets}`, and `GET /v1/realtime` (the handshake). Not
//!   counted, no quota headers: everything else (models, echo, inspect, assistants, runs,
//!   jobs, batches, 404s, control endpoints) and a request refused for a bad `x-emu-*`
//!   header.
//! * Cost: 1 request and `P + M` tokens. `P` as in usage above (embeddings: its `P`); `M` =
//!   chat and completions: `max_tokens`, else `max_completion_tokens`; responses:
//!   `max_output_tokens` (a non-negative integer; else as absent); without one: a stream's `N`
//!   (`x-emu-stream-events`), else `C` (`x-emu-completion-tokens`); embeddings 0. A body
//!   that does not parse costs `P` = 1 (and `M` = `C`, embeddings 0) under the default
//!   model. Realtime handshakes, sessions, client secrets, images and audio cost 0 tokens.
//! * Decided when the request arrives (its body read, before `x-emu-header-delay-ms`): the
//!   cost is taken only if BOTH buckets can carry it (level ≥ cost); never refunded.
//!   Otherwise nothing is taken and the answer is 429 `{"error":{"message":"Rate limit
//!   reached for MODEL in organization org-emu on tokens per min (TPM): Limit L, Used U,
//!   Requested R. Please try again in WAIT.","type":"tokens","param":null,"code":
//!   "rate_limit_exceeded"}}` (`requests per min (RPM)` and `"type":"requests"` when the
//!   requests bucket is the short one; both short: the longer wait, requests on a tie),
//!   `U` = L − remaining, `WAIT` the time until that bucket can carry the request (a Go
//!   duration, ms rounded up), `retry-after` WAIT in whole seconds rounded up. A token cost
//!   above the token limit can never pass: same 429, WAIT = the time until full (`0s` and
//!   `retry-after: 0` when full).
//! * Precedence: `x-emu-malformed` > `x-emu-reset` > the quota's 429 > `x-emu-status` >
//!   the route (a charge taken stays taken whatever follows).
//! * Every counted response (200, 101, streams, 429, any error of those routes) carries,
//!   per limited bucket, `x-ratelimit-limit-{requests,tokens}` (the limit),
//!   `x-ratelimit-remaining-{requests,tokens}` (floor(level) after the take) and
//!   `x-ratelimit-reset-{requests,tokens}` (time until full, (limit − level) / rate), as at
//!   the decision, as Go's `time.Duration.String()` writes it rounded up to the
//!   millisecond: `0s`, `20ms`, `1.5s`, `59.999s`, `6m0s`, `1h2m3.5s`. An unlimited
//!   bucket's three headers are absent. `x-emu-ratelimit-headers` and `x-emu-ratelimit`
//!   are applied after, overriding.
//!
//! # Request headers: faults and response shapes
//!
//! Every `x-emu-*` header is described once, in [`HEADERS`] below, which `--help` prints.
//!
//! # Modules
//!
//! * `conn` — accept, TLS, first-request sniffing (`x-emu-malformed`), the RST switch
//! * `service` — one request: record → fault plan → body → delay → fault or route → finalize
//! * `options` — the `x-emu-*` headers; `faults` — error shapes, reset body
//! * `quota` — quota mode: buckets, `x-ratelimit-*` headers, the 429, `/__emu/quota`
//! * `api` — models, completions, embeddings; `sse` — the streamed completions body
//! * `realtime` — `/v1/realtime`, the WebSocket session
//! * `echo` — `/echo`, `/inspect`; `encoding` — gzip/deflate/br; `body` — body types,
//!   `Tracked` (completion); `log` — `/__emu/log`

mod api;
mod body;
mod conn;
mod echo;
mod encoding;
mod faults;
mod log;
mod objects;
mod options;
mod quota;
mod realtime;
mod service;
mod sse;

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use tokio::net::TcpListener;

/// `--version`: as ezgate's, from build.rs.
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("EZGATE_BUILD_COMMIT"),
    ", ",
    env!("EZGATE_BUILD_PROFILE"),
    " build)"
);

/// The `x-emu-*` request headers: the reference, printed after `--help`'s options.
/// A test checks that every header the emulator reads is named here.
const HEADERS: &str = r##"Request headers (x-emu-*), combinable, on any request but the control endpoints:

Response shape (normal API):

* `x-emu-completion-tokens: C` — completion tokens of a non-streamed completion (default 7);
  the content holds min(C, 64) pieces.
* `x-emu-stream-events: N` — content events of a streamed completion (default 5).
* `x-emu-cached-tokens: K` — the usage reports min(K, P) prompt tokens read from the
  cache: `prompt_tokens_details: {"cached_tokens": …}` (chat and completions, JSON and the
  stream's usage chunk), `input_tokens_details.cached_tokens` (Responses), and, on a
  realtime handshake, `input_token_details.cached_tokens` of every `response.done`
  (min(K, 10)). Without it chat usage has no details and Responses report 0.
* `x-emu-audio-tokens: A,B` — on a realtime handshake: every `response.done` reports
  min(A, 10) input and min(B, N) output tokens as audio (`input_token_details` and
  `output_token_details`).
* `x-emu-stream-interval-ms: MS` — wait before every streamed event after the first,
  usage and `[DONE]` included (default 0).
* `x-emu-id: ID` — the response's `id` is ID and its creation time is fixed
  (1700000000), so that two answers can be compared byte for byte.
* `x-emu-duplicates: last|reject` — how chat, completions, responses and embeddings read
  a JSON member given twice (names compared with escapes decoded, at any depth): `last`
  (default) serves the last one, as Python, JavaScript and Go parsers do; `reject`
  answers 400 `invalid_request_error` naming the member, as strict parsers do.

Faults:

Precedence: `x-emu-malformed` > `x-emu-reset: headers` > `x-emu-reset: body` >
quota mode's 429 (`--quota`) > `x-emu-status` > the route. An `x-emu-*` value that cannot be parsed → 400 OpenAI error
with `code: "emulator_bad_header"` naming the header. Request bodies are always read
(drained) before the fault, so HTTP/1 connections stay reusable.

* `x-emu-header-delay-ms: N` — wait N ms before the response (headers). If the client
  closes meanwhile, the request is cancelled at once (HTTP/1: hyper notices the EOF;
  HTTP/2: the stream reset drops the handler).
* `x-emu-status: S` (200–599), `x-emu-body: SHAPE` (default `openai`), `x-emu-message:
  TEXT` (default `emulated upstream failure`), `x-emu-code: CODE` (default
  `emulated_error`; the literal `null` gives JSON null) → status S, any path, body:
  * `openai` `{"error":{"message":TEXT,"type":"invalid_request_error","param":null,
    "code":CODE}}`
  * `error-string` `{"error":TEXT}`; `detail` `{"detail":TEXT}`; `detail-list`
    `{"detail":[{"loc":["body","model"],"msg":TEXT,"type":"value_error"}]}`;
    `detail-object` `{"detail":{"message":TEXT,"code":CODE}}`; `message`
    `{"message":TEXT}`; `errors` `{"errors":[{"message":TEXT,"code":CODE}]}` — all
    `application/json` (keys of these shapes are serialized in alphabetical order)
  * `html` (`text/html`) `<!DOCTYPE html><html><head><title>S TEXT</title><style>body{…}
    </style></head><body><h1>TEXT</h1><hr><center>ezlink-lb</center></body></html>`
    (TEXT HTML-escaped)
  * `text` TEXT as `text/plain`; `empty` no body, `content-length: 0`, no content-type;
    `invalid-utf8` bytes `\xff\xfe` + TEXT + `\xc3\x28` as `text/plain`;
    `invalid-json` `{"error": {"message": "TEXT"` (truncated) as `application/json`
  * `huge` the `openai` shape whose message is TEXT followed by 2 MiB of `x`,
    `application/json`, sent in 64 KiB frames without `content-length` (chunked).
* `x-emu-encoding: gzip|deflate|br` — compress whatever body is sent (deflate = zlib
  format) and set `content-encoding`. Complete bodies keep a `content-length`; streamed
  ones (SSE, echo, huge) are compressed frame by frame with a sync flush, so every SSE
  event is decodable on arrival. `empty` bodies are not encoded.
* `x-emu-retry-after: V` → `retry-after: V`. `x-emu-ratelimit-headers: 1` →
  `x-ratelimit-limit-requests: 100`, `x-ratelimit-remaining-requests: 0`,
  `x-ratelimit-reset-requests: 1s`. Both on any response.
* `x-emu-ratelimit: SUFFIX=VALUE,…` (SUFFIX: `limit-requests`, `limit-tokens`,
  `remaining-requests`, `remaining-tokens`, `reset-requests`, `reset-tokens`) →
  `x-ratelimit-SUFFIX: VALUE` on any response (a WebSocket `101` too), VALUE sent as given
  (nonsense included); after `x-emu-ratelimit-headers`. Both override quota mode's
  headers of the same names.
* `x-emu-echo-key: 1` — echo the key of the request's `Authorization` as a careless
  upstream does: the `x-emu-status` message becomes `Incorrect API key provided: KEY.
  Manage it at https://ezlink.example/keys?key=PCT. TEXT` (PCT: KEY percent-encoded), a
  CODE other than `null` gets ` KEY` appended, a completion names KEY as its `model`, and
  any response carries `x-emu-seen-key: Bearer KEY`.
* `x-emu-reset: headers` — no response at all: HTTP/1 closes the TCP connection with an
  RST and zero bytes written; HTTP/2 resets the stream (RST_STREAM INTERNAL_ERROR).
* `x-emu-reset: body` — 200 with `content-length: 1000`, 10 body bytes, then (~20 ms
  later) the abort: HTTP/1 closes the connection (FIN, body incomplete), HTTP/2 resets
  the stream.
* `x-emu-malformed: 1` — on the first request of an HTTP/1 connection (plain or TLS):
  `HTTP/1.1 abc garbage\r\n\r\n`, then close. Elsewhere (HTTP/2, later keep-alive
  requests) it acts like `x-emu-reset: headers`.
* Streamed chat/completions only, `k` counts content events (`k` ≥ N applies after all
  N, before any error/usage/`[DONE]` event):
  * `x-emu-cut-after: k` — after k events, ~20 ms later, abort (HTTP/1: connection
    closed inside the chunked body; HTTP/2: stream reset).
  * `x-emu-stall-after: k` — after k events send nothing more, keeping the connection
    open until the client leaves (then the request is cancelled).
  * `x-emu-stream-error-event: 1` — after the content events send
    `event: error\ndata: {"error":{"message":"emulated in-stream error","type":
    "server_error","code":"stream_error"}}\n\n` (after the usage chunk, if any), then
    `data: [DONE]\n\n`.
"##;

#[derive(Parser, Debug)]
#[command(
    name = "ezlink-emulator",
    version = VERSION,
    about = "Local stand-in for the EZLINK AI API, with per-request fault injection",
    after_help = HEADERS
)]
struct Cli {
    /// Address to listen on; port 0 picks a free port.
    #[arg(long, value_name = "ADDR")]
    listen: SocketAddr,
    /// PEM certificate chain: serve TLS (ALPN h2, http/1.1).
    #[arg(long, value_name = "PEM_PATH", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, value_name = "PEM_PATH", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Quota mode from the start: `requests=60/1m,tokens=40000/1m` (either part optional;
    /// windows in ms, s, m, h, e.g. `20/2s`). Changeable at run time: `/__emu/quota`.
    #[arg(long, value_name = "SPEC", value_parser = quota::Config::from_cli)]
    quota: Option<quota::Config>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("ezlink-emulator: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(cli));
    runtime.shutdown_timeout(Duration::from_millis(100));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("ezlink-emulator: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<(), String> {
    let tls = match (&cli.tls_cert, &cli.tls_key) {
        (Some(cert), Some(key)) => {
            // Err only if a provider is already installed, which is just as good.
            let _ = rustls::crypto::ring::default_provider().install_default();
            Some(conn::tls_acceptor(cert, key)?)
        }
        _ => None,
    };
    let listener = TcpListener::bind(cli.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", cli.listen))?;
    let addr = listener
        .local_addr()
        .map_err(|e| format!("cannot read the bound address: {e}"))?;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "listening on {addr}")
        .and_then(|()| stdout.flush())
        .map_err(|e| format!("cannot write to stdout: {e}"))?;
    drop(stdout);
    let state = service::State::default();
    if let Some(config) = cli.quota {
        state.quota.set(Some(config), std::time::Instant::now());
    }
    let state = Arc::new(state);
    conn::serve(listener, tls, state, shutdown_signal()).await;
    Ok(())
}

/// SIGINT or SIGTERM.
async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(err) => {
                eprintln!("ezlink-emulator: cannot watch SIGTERM: {err}");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
}
