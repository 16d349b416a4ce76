//! The bounded set of route templates used in metric labels and limit matches.

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
    Other,
}

impl Route {
    pub const ALL: [Route; 12] = [
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
            Route::Other => "other",
        }
    }

    pub fn from_template(s: &str) -> Option<Route> {
        Route::ALL.into_iter().find(|r| r.as_str() == s)
    }

    /// Routes whose JSON request names the model that serves it.
    pub fn carries_model(self) -> bool {
        self.carries_tokens()
            || matches!(
                self,
                Route::Moderations | Route::ImagesGenerations | Route::AudioSpeech
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
        for r in Route::ALL {
            assert_eq!(Route::from_template(r.as_str()), Some(r));
        }
    }
}
