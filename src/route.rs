//! Request paths: made canonical before anything looks at them ([`normalize`]), then mapped
//! to the bounded set of route templates used in metric labels and limit matches.

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

#[cfg(test)]
mod tests {
    use super::Route;

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
}
