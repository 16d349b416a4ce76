//! Request paths: made canonical before anything looks at them ([`normalize`]), then mapped
//! to the bounded set of route templates used in metric labels and limit matches, and to
//! where each request names the model it spends, for the model allow-lists ([`model_at`]).

use percent_encoding::{percent_decode, percent_encode, AsciiSet, CONTROLS};

/// Why a request path cannot be forwarded (answered with 400).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    /// `..` past the first segment.
    AboveRoot,
    /// A `\`, a control character or a NUL, plain or percent-encoded.
    Forbidden,
    /// A `%` not followed by two hex digits.
    BadEscape,
    /// Not an origin-form path (`*`, or a target without a leading `/`).
    NotAPath,
}

impl std::fmt::Display for PathError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PathError::AboveRoot => "the path climbs above the root (`..`)",
            PathError::Forbidden => "the path holds a backslash or a control character",
            PathError::BadEscape => "the path holds a `%` that is not followed by two hex digits",
            PathError::NotAPath => {
                "the request target is not a path (ezgate forwards paths only, not `*`)"
            }
        })
    }
}

/// Bytes re-encoded in a normalized path segment: everything but RFC 3986's `pchar`
/// (unreserved, sub-delims, `:` and `@`).
const SEGMENT: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'/')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'[')
    .add(b'\\')
    .add(b']')
    .add(b'^')
    .add(b'`')
    .add(b'{')
    .add(b'|')
    .add(b'}');

/// The bytes [`normalize`]'s first pass stops at: `%`, `\`, `/` and the control characters.
/// One load per byte for the rest (a `match` on every byte cost ~15 instructions per byte).
const NOTABLE: [bool; 256] = {
    let mut t = [false; 256];
    let mut c = 0;
    while c < 0x20 {
        t[c] = true;
        c += 1;
    }
    t[0x7f] = true;
    t[b'%' as usize] = true;
    t[b'\\' as usize] = true;
    t[b'/' as usize] = true;
    t
};

/// The canonical form of a request path, as nginx makes it before matching locations:
/// percent-escapes decoded, `.` and `..` segments resolved, repeated slashes merged, then
/// each segment re-encoded. `Ok(None)` when the path is canonical already (the usual case,
/// found in one pass without allocating). A path that climbs above the root, or holds a
/// backslash or a control character (plain or encoded), is refused: no upstream ever sees
/// one, whatever it would make of it.
pub fn normalize(path: &str) -> Result<Option<String>, PathError> {
    let b = path.as_bytes();
    if b.first() != Some(&b'/') {
        return Err(PathError::NotAPath);
    }
    let mut canonical = true;
    for (i, &c) in b.iter().enumerate() {
        if !NOTABLE[usize::from(c)] {
            continue;
        }
        match c {
            b'%' | b'\\' => canonical = false,
            b'/' => {
                let next = b.get(i + 1).copied();
                let dot_segment = next == Some(b'.') && matches!(b.get(i + 2), None | Some(b'/'))
                    || (next == Some(b'.')
                        && b.get(i + 2) == Some(&b'.')
                        && matches!(b.get(i + 3), None | Some(b'/')));
                if next == Some(b'/') || dot_segment {
                    canonical = false;
                }
            }
            c if c < 0x20 || c == 0x7f => return Err(PathError::Forbidden),
            _ => {}
        }
        if !canonical {
            break;
        }
    }
    if canonical {
        return Ok(None);
    }
    // Every `%` must be an escape: `%zz` is refused, as nginx refuses it.
    for (i, _) in b.iter().enumerate().filter(|(_, c)| **c == b'%') {
        let hex = b.get(i + 1..i + 3).ok_or(PathError::BadEscape)?;
        if !hex.iter().all(u8::is_ascii_hexdigit) {
            return Err(PathError::BadEscape);
        }
    }
    let decoded: Vec<u8> = percent_decode(b).collect();
    if decoded.iter().any(|&c| c == b'\\' || c < 0x20 || c == 0x7f) {
        return Err(PathError::Forbidden);
    }
    let mut segments: Vec<&[u8]> = Vec::new();
    for segment in decoded.split(|&c| c == b'/') {
        match segment {
            b"" | b"." => {}
            b".." => {
                segments.pop().ok_or(PathError::AboveRoot)?;
            }
            s => segments.push(s),
        }
    }
    let trailing = decoded.ends_with(b"/") && !segments.is_empty();
    let mut out = String::with_capacity(path.len());
    for s in &segments {
        out.push('/');
        out.extend(percent_encode(s, SEGMENT));
    }
    if trailing || out.is_empty() {
        out.push('/');
    }
    Ok(Some(out))
}

/// A known API route, or `Other`. Never a raw path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Route {
    ChatCompletions,
    Completions,
    Embeddings,
    Models,
    Model,
    Responses,
    Moderations,
    ImagesGenerations,
    AudioTranscriptions,
    AudioSpeech,
    Files,
    /// The Realtime API: a WebSocket session (`GET /v1/realtime?model=…` upgraded).
    Realtime,
    Other,
}

impl Route {
    pub const ALL: [Route; 13] = [
        Route::ChatCompletions,
        Route::Completions,
        Route::Embeddings,
        Route::Models,
        Route::Model,
        Route::Responses,
        Route::Moderations,
        Route::ImagesGenerations,
        Route::AudioTranscriptions,
        Route::AudioSpeech,
        Route::Files,
        Route::Realtime,
        Route::Other,
    ];

    pub fn from_path(path: &str) -> Route {
        let path = path.strip_suffix('/').unwrap_or(path);
        match path {
            "/v1/chat/completions" => Route::ChatCompletions,
            "/v1/completions" => Route::Completions,
            "/v1/embeddings" => Route::Embeddings,
            "/v1/models" => Route::Models,
            "/v1/responses" => Route::Responses,
            "/v1/moderations" => Route::Moderations,
            "/v1/images/generations" => Route::ImagesGenerations,
            "/v1/audio/transcriptions" => Route::AudioTranscriptions,
            "/v1/audio/speech" => Route::AudioSpeech,
            "/v1/files" => Route::Files,
            "/v1/realtime" => Route::Realtime,
            p if p.starts_with("/v1/models/") && !p[11..].is_empty() => Route::Model,
            p if p.starts_with("/v1/files/") => Route::Files,
            _ => Route::Other,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Route::ChatCompletions => "/v1/chat/completions",
            Route::Completions => "/v1/completions",
            Route::Embeddings => "/v1/embeddings",
            Route::Models => "/v1/models",
            Route::Model => "/v1/models/{model}",
            Route::Responses => "/v1/responses",
            Route::Moderations => "/v1/moderations",
            Route::ImagesGenerations => "/v1/images/generations",
            Route::AudioTranscriptions => "/v1/audio/transcriptions",
            Route::AudioSpeech => "/v1/audio/speech",
            Route::Files => "/v1/files",
            Route::Realtime => "/v1/realtime",
            Route::Other => "other",
        }
    }

    pub fn from_template(s: &str) -> Option<Route> {
        Route::ALL.into_iter().find(|r| r.as_str() == s)
    }

    /// Routes whose request names the model that serves it (in a JSON body; audio
    /// transcriptions in a multipart form).
    pub fn carries_model(self) -> bool {
        self.carries_tokens()
            || matches!(
                self,
                Route::Moderations
                    | Route::ImagesGenerations
                    | Route::AudioSpeech
                    | Route::AudioTranscriptions
            )
    }

    /// Routes whose JSON request names a model and whose response reports token usage.
    pub fn carries_tokens(self) -> bool {
        matches!(
            self,
            Route::ChatCompletions | Route::Completions | Route::Embeddings | Route::Responses
        )
    }
}

/// Where a request names the model it spends: what a client's model allow-list reads
/// (docs/security.md, "Which routes a model allow-list reads"). Kept apart from [`Route`],
/// whose variants are metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelAt {
    /// The JSON body's `model`; a body without one is refused for a client with an
    /// allow-list (the upstream would pick a model itself: a default, or a run's assistant's).
    Json,
    /// A realtime client secret's `session.model`, inside the JSON body (its top-level
    /// `model` is not what the upstream uses); without one the upstream picks its default.
    Session,
    /// The JSON body's `model` when present; without one the request changes no model
    /// (modifying an assistant).
    JsonIfPresent,
    /// A multipart form's one `model` field (or, sent as JSON, the body's `model`).
    Form,
    /// A WebSocket handshake's `model` query parameter (`GET /v1/realtime?model=…`).
    Query,
    /// The request spends no model: reads, deletions, uploads, cancellations, threads and
    /// their messages. A WebSocket handshake is not one of these: its model is in its query.
    Nowhere,
    /// The request may spend a model ezgate cannot read; the text says why.
    Unreadable(&'static str),
}

/// Where a WebSocket handshake for `path` names the model of its session: in the query on
/// `/v1/realtime`; elsewhere (a Responses WebSocket names its models in the events it sends)
/// ezgate does not read it.
pub fn handshake_model_at(path: &str) -> ModelAt {
    match path.strip_suffix('/').unwrap_or(path) {
        "/v1/realtime" => ModelAt::Query,
        _ => ModelAt::Unreadable(
            "ezgate reads the model of a WebSocket session only on /v1/realtime, in its query",
        ),
    }
}

/// Where the request `method path` names its model. `path` is canonical ([`normalize`]);
/// a trailing slash is ignored. Anything not in the table that can change something upstream
/// (a `POST` to another path, `PUT`, `PATCH`, any other method) is [`ModelAt::Unreadable`].
pub fn model_at(method: &http::Method, path: &str) -> ModelAt {
    use http::Method;
    const NOT_READ: ModelAt = ModelAt::Unreadable("ezgate does not read the model of this route");
    if matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::DELETE
    ) {
        return ModelAt::Nowhere;
    }
    if *method != Method::POST {
        return ModelAt::Unreadable("ezgate reads models only in POST bodies");
    }
    let path = path.strip_suffix('/').unwrap_or(path);
    let mut segments = [""; 7];
    let mut n = 0;
    for s in path.split('/').skip(1) {
        match segments.get_mut(n) {
            Some(slot) => *slot = s,
            None => return NOT_READ,
        }
        n += 1;
    }
    match segments[..n] {
        ["v1", "chat", "completions"]
        | ["v1", "completions"]
        | ["v1", "embeddings"]
        | ["v1", "responses"]
        | ["v1", "responses", "input_tokens"]
        | ["v1", "moderations"]
        | ["v1", "images", "generations"]
        | ["v1", "audio", "speech"]
        | ["v1", "realtime", "sessions"]
        | ["v1", "assistants"]
        | ["v1", "threads", "runs"]
        | ["v1", "threads", _, "runs"]
        | ["v1", "fine_tuning", "jobs"] => ModelAt::Json,
        ["v1", "realtime", "client_secrets"] => ModelAt::Session,
        ["v1", "assistants", _] => ModelAt::JsonIfPresent,
        ["v1", "audio", "transcriptions"]
        | ["v1", "audio", "translations"]
        | ["v1", "images", "edits"]
        | ["v1", "images", "variations"] => ModelAt::Form,
        ["v1", "batches"] => {
            ModelAt::Unreadable("a batch's models are inside its uploaded input file")
        }
        ["v1", "files"]
        | ["v1", "uploads"]
        | ["v1", "uploads", _, "parts" | "complete" | "cancel"]
        | ["v1", "threads"]
        | ["v1", "threads", _]
        | ["v1", "threads", _, "messages"]
        | ["v1", "threads", _, "messages", _]
        | ["v1", "threads", _, "runs", _, "cancel"]
        | ["v1", "responses", _, "cancel"]
        | ["v1", "batches", _, "cancel"]
        | ["v1", "fine_tuning", "jobs", _, "cancel"] => ModelAt::Nowhere,
        _ => NOT_READ,
    }
}

#[cfg(test)]
mod tests {
    use super::{model_at, ModelAt, Route};

    #[test]
    fn templates_are_bounded() {
        assert_eq!(
            Route::from_path("/v1/chat/completions"),
            Route::ChatCompletions
        );
        assert_eq!(
            Route::from_path("/v1/chat/completions/"),
            Route::ChatCompletions
        );
        assert_eq!(Route::from_path("/v1/models/gpt-4o"), Route::Model);
        assert_eq!(Route::from_path("/v1/files/file-123/content"), Route::Files);
        assert_eq!(Route::from_path("/etc/passwd"), Route::Other);
        assert_eq!(Route::from_path("/v1/realtime"), Route::Realtime);
        assert_eq!(Route::from_path("/v1/realtime/sessions"), Route::Other);
        for r in Route::ALL {
            assert_eq!(Route::from_template(r.as_str()), Some(r));
        }
    }

    #[test]
    fn paths_are_made_canonical_or_refused() {
        use super::{normalize, PathError};
        for canonical in [
            "/",
            "/v1/chat/completions",
            "/v1/models/",
            "/v1/files/a.b/..c",
        ] {
            assert_eq!(normalize(canonical), Ok(None), "{canonical}");
        }
        for (path, want) in [
            ("//v1/chat/completions", "/v1/chat/completions"),
            ("/v1/./chat/completions", "/v1/chat/completions"),
            ("/v1/%63hat/completions", "/v1/chat/completions"),
            ("/v1/x/../chat/completions", "/v1/chat/completions"),
            ("/v1/x/%2e%2e/chat/completions", "/v1/chat/completions"),
            ("/v1/x/%2E%2E%2fchat/completions", "/v1/chat/completions"),
            ("/v1/x/..%2fchat/completions", "/v1/chat/completions"),
            ("/v1//models/", "/v1/models/"),
            ("/v1/models/.", "/v1/models"),
            ("/v1/files/a%20b%3F", "/v1/files/a%20b%3F"),
            ("/v1/files/%C3%A9", "/v1/files/%C3%A9"),
            ("/a/..", "/"),
        ] {
            assert_eq!(normalize(path), Ok(Some(want.to_owned())), "{path}");
            assert_eq!(
                normalize(want).map(|n| n.unwrap_or_else(|| want.to_owned())),
                Ok(want.to_owned()),
                "{want} is a fixed point"
            );
        }
        for (path, err) in [
            ("/..", PathError::AboveRoot),
            ("/v1/../../admin", PathError::AboveRoot),
            ("/%2e%2e/admin", PathError::AboveRoot),
            ("/v1\\..\\admin", PathError::Forbidden),
            ("/v1/%5c", PathError::Forbidden),
            ("/v1/%00", PathError::Forbidden),
            ("/v1/%zz", PathError::BadEscape),
            ("/v1/%2", PathError::BadEscape),
            ("*", PathError::NotAPath),
        ] {
            assert_eq!(normalize(path), Err(err), "{path}");
        }
        assert_eq!(
            Route::from_path(&normalize("//v1//chat/./completions").unwrap().unwrap()),
            Route::ChatCompletions
        );
    }

    #[test]
    fn the_model_of_each_route_is_read_or_refused() {
        use http::Method;
        let post = |p: &str| model_at(&Method::POST, p);
        for p in [
            "/v1/chat/completions",
            "/v1/responses/",
            "/v1/realtime/sessions",
            "/v1/assistants",
            "/v1/threads/runs",
            "/v1/threads/thread_1/runs",
            "/v1/fine_tuning/jobs",
        ] {
            assert_eq!(post(p), ModelAt::Json, "{p}");
        }
        assert_eq!(post("/v1/assistants/asst_1"), ModelAt::JsonIfPresent);
        assert_eq!(post("/v1/realtime/client_secrets"), ModelAt::Session);
        for p in [
            "/v1/audio/transcriptions",
            "/v1/audio/translations",
            "/v1/images/edits",
            "/v1/images/variations",
        ] {
            assert_eq!(post(p), ModelAt::Form, "{p}");
        }
        for p in [
            "/v1/files",
            "/v1/uploads/u_1/parts",
            "/v1/threads",
            "/v1/threads/thread_1/messages",
            "/v1/batches/b_1/cancel",
            "/v1/threads/t/runs/r/cancel",
        ] {
            assert_eq!(post(p), ModelAt::Nowhere, "{p}");
        }
        // Spends a model ezgate cannot see, or is not in the table: unreadable.
        for p in [
            "/v1/batches",
            "/v1/threads/t/runs/r/submit_tool_outputs",
            "/v1/fine_tuning/jobs/j/resume",
            "/v1/realtime/transcription_sessions",
            "/v1/vector_stores",
            "/v1/chat/completions/extra",
            "/v1/x/y/z/a/b/c/d/e",
            "/",
            "/chat/completions",
        ] {
            assert!(matches!(post(p), ModelAt::Unreadable(_)), "{p}");
        }
        assert_eq!(model_at(&Method::GET, "/v1/batches"), ModelAt::Nowhere);
        assert_eq!(super::handshake_model_at("/v1/realtime/"), ModelAt::Query);
        assert!(matches!(
            super::handshake_model_at("/v1/responses"),
            ModelAt::Unreadable(_)
        ));
        assert_eq!(
            model_at(&Method::DELETE, "/v1/assistants/a"),
            ModelAt::Nowhere
        );
        for m in [
            Method::PUT,
            Method::PATCH,
            Method::from_bytes(b"SPEND").unwrap(),
        ] {
            assert!(matches!(
                model_at(&m, "/v1/chat/completions"),
                ModelAt::Unreadable(_)
            ));
        }
    }
}
