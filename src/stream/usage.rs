//! Reading a response's JSON where the few members ezgate needs stand: `usage`, `model`, and
//! how much content a streamed chunk carried. Nothing is parsed whole: keys are found with a
//! SIMD substring search. A key is `"name"` followed by `:`; inside a JSON string every quote
//! is escaped, so that byte pattern cannot come from string content.

use memchr::memmem::Finder;

use crate::limits::estimate::Counts;
use crate::limits::scan;
use crate::outcome::Usage;

const USAGE_KEY: &[u8] = b"\"usage\"";
const MODEL_KEY: &[u8] = b"\"model\"";
/// Members whose string values are generated text: chat deltas and messages, text
/// completions, Responses API deltas, tool-call arguments, refusals.
const CONTENT_KEYS: [&[u8]; 5] = [
    b"\"content\"",
    b"\"delta\"",
    b"\"text\"",
    b"\"arguments\"",
    b"\"refusal\"",
];

/// Searchers for the keys, built once (building one costs more than a search).
struct Finders {
    usage: Finder<'static>,
    model: Finder<'static>,
    content: [Finder<'static>; 5],
}

fn finders() -> &'static Finders {
    static FINDERS: std::sync::OnceLock<Finders> = std::sync::OnceLock::new();
    FINDERS.get_or_init(|| Finders {
        usage: Finder::new(USAGE_KEY),
        model: Finder::new(MODEL_KEY),
        content: CONTENT_KEYS.map(Finder::new),
    })
}

/// True when `doc` holds the bytes `"usage"` anywhere (a cheap first look).
pub fn mentions_usage(doc: &[u8]) -> bool {
    finders().usage.find(doc).is_some()
}

/// Where the last `"usage"` key of `doc` stands (OpenAI writes it last).
pub fn find_usage(doc: &[u8]) -> Option<usize> {
    last_usage(doc).map(|(at, _)| at)
}

/// The last `usage` key of `doc` and the text where its value starts. Forward (SIMD) and
/// keep the last: the reverse searcher is not vectorized, and costs more on a chunk and on
/// a whole answer alike (~350 instructions per 1 KB answer, `benches/instructions.sh`).
fn last_usage(doc: &[u8]) -> Option<(usize, &[u8])> {
    members(doc, &finders().usage, USAGE_KEY.len()).last()
}

/// `usage` and `model` of a JSON response or chunk: the last `usage` key (OpenAI writes it
/// last) and the first `model` key. `None` when there is no usable usage (absent,
/// `null`, or not whole numbers).
pub fn json_usage(doc: &[u8]) -> Option<(Usage, Option<String>)> {
    let counts = scan::usage_counts(last_usage(doc)?.1)?;
    let model = members(doc, &finders().model, MODEL_KEY.len())
        .next()
        .and_then(|(_, v)| scan::string_at(v))
        .map(String::from);
    let usage = Usage {
        prompt: counts.prompt,
        completion: counts.completion,
        cached: counts.cached,
        audio_in: counts.audio_in,
        audio_out: counts.audio_out,
    };
    Some((usage, model))
}

/// Adds the generated text of one streamed chunk to `text`; false when it carries none.
pub fn content_text(doc: &[u8], text: &mut Counts) -> bool {
    let f = finders();
    // Keys in the order chunks most often carry them; the first that holds text is the
    // chunk's content (a chunk carries one kind), so the usual chunk costs one search.
    for (finder, key) in f.content.iter().zip(CONTENT_KEYS) {
        let mut any = false;
        for (_, value) in members(doc, finder, key.len()) {
            if let Some(piece) = scan::string_at(value).filter(|p| !p.is_empty()) {
                text.add_utf8(piece.as_bytes());
                any = true;
            }
        }
        if any {
            return true;
        }
    }
    false
}

/// Each hit of `key` (found by `finder`, `key_len` bytes long) that is a key (`"key":`), in
/// order: where it stands, and the text where its value starts.
fn members<'a>(
    doc: &'a [u8],
    finder: &'a Finder<'static>,
    key_len: usize,
) -> impl Iterator<Item = (usize, &'a [u8])> + 'a {
    finder.find_iter(doc).filter_map(move |i| {
        let value = doc[i + key_len..].trim_ascii_start().strip_prefix(b":")?;
        Some((i, value))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_usage_is_read_where_it_stands() {
        let doc = br#"{"id":"x","model":"gpt-4o","choices":[{"message":{"content":"say \"usage\": {} and \"model\":1"}}],"usage": {"prompt_tokens":9,"completion_tokens":3,"total_tokens":12}}"#;
        assert_eq!(
            json_usage(doc),
            Some((Usage::new(9, 3), Some("gpt-4o".into())))
        );
        assert_eq!(json_usage(br#"{"usage":null}"#), None);
        assert_eq!(json_usage(br#"{"choices":[]}"#), None);
        assert_eq!(
            json_usage(br#"{"usage":{"input_tokens":4,"output_tokens":5}}"#),
            Some((Usage::new(4, 5), None))
        );
        assert_eq!(json_usage(b"\"usage\":"), None);
        // The Responses API: usage inside the completed response.
        let done = br#"{"type":"response.completed","response":{"id":"r","model":"gpt-4o","usage":{"input_tokens":12,"input_tokens_details":{"cached_tokens":0},"output_tokens":30,"output_tokens_details":{"reasoning_tokens":0},"total_tokens":42}}}"#;
        assert_eq!(json_usage(done).map(|(u, _)| u), Some(Usage::new(12, 30)));
    }

    #[test]
    fn cached_and_audio_tokens_are_read_from_the_details() {
        let chat = br#"{"model":"gpt-4o","usage":{"prompt_tokens":2006,"completion_tokens":300,"total_tokens":2306,"prompt_tokens_details":{"cached_tokens":1920,"audio_tokens":6},"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":12,"accepted_prediction_tokens":0}}}"#;
        let want = Usage {
            prompt: 2006,
            completion: 300,
            cached: 1920,
            audio_in: 6,
            audio_out: 12,
        };
        assert_eq!(json_usage(chat).map(|(u, _)| u), Some(want));
        let responses = br#"{"type":"response.completed","response":{"usage":{"input_tokens":12,"input_tokens_details":{"cached_tokens":8},"output_tokens":30,"output_tokens_details":{"reasoning_tokens":4},"total_tokens":42}}}"#;
        let mut want = Usage::new(12, 30);
        want.cached = 8;
        assert_eq!(json_usage(responses).map(|(u, _)| u), Some(want));
        // Details that are null, or hold what is not a count, add nothing.
        let odd = br#"{"usage":{"prompt_tokens":5,"prompt_tokens_details":null,"completion_tokens_details":{"audio_tokens":"x"},"completion_tokens":1}}"#;
        assert_eq!(json_usage(odd).map(|(u, _)| u), Some(Usage::new(5, 1)));
    }

    #[test]
    fn counts_are_whole_numbers_as_serde_reads_them() {
        let usage = |prompt: &str| {
            let doc = format!(r#"{{"usage":{{"prompt_tokens":{prompt},"completion_tokens":1}}}}"#);
            json_usage(doc.as_bytes()).map(|(u, _)| u.prompt)
        };
        assert_eq!(usage("0"), Some(0));
        assert_eq!(usage("2006"), Some(2006));
        assert_eq!(usage("18446744073709551615"), Some(u64::MAX));
        for not_a_count in [
            "18446744073709551616",
            "+5",
            "007",
            "-1",
            "1.5",
            "1e3",
            "\"9\"",
        ] {
            assert_eq!(usage(not_a_count), None, "{not_a_count}");
        }
    }

    fn content_chars(doc: &[u8]) -> usize {
        let mut text = Counts::default();
        let any = content_text(doc, &mut text);
        assert_eq!(any, text.chars() > 0);
        text.chars()
    }

    #[test]
    fn content_is_counted_in_every_shape() {
        let chat = br#"{"choices":[{"index":0,"delta":{"role":"assistant","content":"h\u00e9llo"},"finish_reason":null}]}"#;
        assert_eq!(content_chars(chat), 5);
        assert_eq!(
            content_chars(br#"{"choices":[{"text":"abc","index":0}]}"#),
            3
        );
        assert_eq!(
            content_chars(r#"{"type":"response.output_text.delta","delta":"你好"}"#.as_bytes()),
            2
        );
        assert_eq!(
            content_chars(br#"{"choices":[{"delta":{"tool_calls":[{"function":{"arguments":"{\"a\":1}"}}]}}]}"#),
            7
        );
        assert_eq!(
            content_chars(br#"{"choices":[{"delta":{},"finish_reason":"stop"}]}"#),
            0
        );
        assert_eq!(
            content_chars(br#"{"choices":[],"usage":{"prompt_tokens":1}}"#),
            0
        );
    }
}
