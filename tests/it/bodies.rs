//! One body, one reading: a JSON body ezgate reads means to the upstream what it meant to
//! ezgate. Spellings that two parsers read differently (a member twice once escapes are
//! decoded, a name in another case, `\u0000` or a lone surrogate in a name, a count written
//! `1e3`, a BOM, invalid UTF-8, bytes after the object, deep nesting) are refused with 400
//! before the upstream sees them; the models named inside a body (Responses tools) are held
//! to the allow-list like the top-level one. docs/security.md lists each.

use bytes::Bytes;
use http::Method;

use crate::harness::*;

const JSON: (&str, &str) = ("content-type", "application/json");
const AUTH: (&str, &str) = ("authorization", "Bearer key-mini");

/// A gateway whose one client may use `models` only.
async fn allow_list(emu: &Emulator, models: &str) -> Gateway {
    let config = format!(
        "[upstream]\napi_key = \"${{ORG_KEY}}\"\n\n[[clients]]\nname = \"mini-only\"\nkey_sha256 = \"{}\"\nmodels = [{models}]\n",
        sha256_hex("key-mini")
    );
    Gateway::start_env(&emu.url(), &config, &[("ORG_KEY", "sk-org")]).await
}

/// Posts each body (request ids `{tag}00`, `{tag}01`, …) and checks that ezgate refused it
/// with 400 `bad_request`, its message containing the body's expected reason; then that
/// none of them reached the upstream.
async fn all_refused(gw: &Gateway, emu: &Emulator, path: &str, tag: &str, cases: &[(&[u8], &str)]) {
    let mut ids = Vec::new();
    for (n, (body, why)) in cases.iter().enumerate() {
        let rid = format!("{tag}{n:02}");
        let r = gw
            .post(
                path,
                &[JSON, AUTH, ("x-request-id", &rid)],
                Bytes::copy_from_slice(body),
            )
            .await;
        let shown = String::from_utf8_lossy(body);
        assert_eq!(r.status, 400, "{shown}: {:?}", r.body);
        let error = r.error();
        assert_eq!(error["code"], "bad_request", "{shown}");
        let message = error["message"].as_str().unwrap();
        assert!(
            message.contains("is ambiguous") && message.contains(why),
            "{shown}: {message:?} should say {why:?}"
        );
        ids.push(rid);
    }
    // ezgate answered each before any byte went upstream: the log is complete already.
    let seen: Vec<String> = emu
        .log()
        .await
        .iter()
        .filter_map(|e| e["request_id"].as_str().map(str::to_owned))
        .collect();
    for rid in &ids {
        assert!(!seen.contains(rid), "{rid} reached the upstream");
    }
}

/// What the emulator served for a request: the `model` of its answer.
fn served(r: &Resp) -> String {
    assert_eq!(r.status, 200, "{:?}", r.body);
    r.json()["model"].as_str().unwrap().to_owned()
}

/// The attack is real: an upstream that parses JSON as Python, JavaScript or Go do serves
/// the last of two `model` members, however the second is spelled; a strict one refuses.
#[tokio::test]
async fn upstreams_read_a_member_given_twice_their_own_way() {
    let emu = Emulator::start().await;
    let url = format!("{}/v1/chat/completions", emu.url());
    let body = r#"{"model":"gpt-4o-mini","mod\u0065l":"gpt-4.1","messages":[{"role":"user","content":"hi"}]}"#;
    for duplicates in [None, Some("last"), Some("LAST")] {
        let headers: Vec<_> = duplicates
            .map(|d| ("x-emu-duplicates", d))
            .into_iter()
            .chain([JSON])
            .collect();
        let r = send(&http1(), Method::POST, &url, &headers, body.into()).await;
        assert_eq!(served(&r), "gpt-4.1", "{duplicates:?}");
    }
    let r = send(
        &http1(),
        Method::POST,
        &url,
        &[JSON, ("x-emu-duplicates", "reject")],
        body.into(),
    )
    .await;
    assert_eq!(r.status, 400);
    let message = r.json()["error"]["message"].as_str().unwrap().to_owned();
    assert!(
        message.contains("member `model` appears twice"),
        "{message}"
    );
    let r = send(
        &http1(),
        Method::POST,
        &url,
        &[JSON, ("x-emu-duplicates", "first")],
        body.into(),
    )
    .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["code"], "emulator_bad_header");
}

/// Member names are read decoded: `mod\u0065l` is `model`, held to the allow-list.
#[tokio::test]
async fn escaped_member_names_are_read_as_the_upstream_reads_them() {
    let emu = Emulator::start().await;
    let gw = allow_list(&emu, "\"gpt-4o-mini\"").await;
    let r = gw
        .post(
            "/v1/chat/completions",
            &[JSON, AUTH],
            r#"{"mod\u0065l":"gpt-4.1","messages":[]}"#,
        )
        .await;
    assert_eq!(r.status, 403);
    assert_eq!(r.error()["code"], "model_not_allowed");
    let r = gw
        .post(
            "/v1/chat/completions",
            &[JSON, AUTH],
            r#"{"\u006d\u006f\u0064\u0065\u006c":"gpt-4o-mini","messages":[]}"#,
        )
        .await;
    assert_eq!(served(&r), "gpt-4o-mini");
}

/// A member ezgate reads, given twice however spelled, never reaches the upstream: not the
/// model, not what token accounting reads, not inside `stream_options`.
#[tokio::test]
async fn a_member_given_twice_is_refused_before_the_upstream() {
    let emu = Emulator::start().await;
    let gw = allow_list(&emu, "\"gpt-4o-mini\"").await;
    let cases: &[(&[u8], &str)] = &[
        (
            br#"{"model":"gpt-4o-mini","mod\u0065l":"gpt-4.1","messages":[]}"#,
            "member `model` appears twice",
        ),
        (
            br#"{"model":"gpt-4o-mini","messages":[],"model":"gpt-4.1"}"#,
            "member `model` appears twice",
        ),
        (
            br#"{"\u006d\u006f\u0064\u0065\u006c":"gpt-4.1","model":"gpt-4o-mini"}"#,
            "member `model` appears twice",
        ),
        (
            br#"{"model":"gpt-4o-mini","max_tokens":1,"max\u005ftokens":100000,"messages":[]}"#,
            "member `max_tokens` appears twice",
        ),
        (
            br#"{"model":"gpt-4o-mini","stream":false,"str\u0065am":true,"messages":[]}"#,
            "member `stream` appears twice",
        ),
        (
            br#"{"model":"gpt-4o-mini","messages":[],"m\u0065ssages":[{"role":"user","content":"long"}]}"#,
            "member `messages` appears twice",
        ),
        (
            br#"{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true,"include\u005fusage":false}}"#,
            "member `stream_options.include_usage` appears twice",
        ),
    ];
    all_refused(&gw, &emu, "/v1/chat/completions", "dup", cases).await;
}

/// Names other parsers read as a member ezgate reads: another case (Go matches names
/// ignoring case, `ſ` and the Kelvin sign `K` included), `\u0000`, control characters and
/// lone surrogates.
#[tokio::test]
async fn names_another_parser_reads_differently_are_refused() {
    let emu = Emulator::start().await;
    let gw = allow_list(&emu, "\"gpt-4o-mini\"").await;
    let cases: &[(&[u8], &str)] = &[
        (
            br#"{"model":"gpt-4o-mini","MODEL":"gpt-4.1"}"#,
            "member `MODEL` is `model` to parsers that match names ignoring case",
        ),
        (
            br#"{"Model":"gpt-4.1"}"#,
            "member `Model` is `model` to parsers",
        ),
        (
            "{\"model\":\"gpt-4o-mini\",\"\u{17f}tream\":true}".as_bytes(),
            "is `stream` to parsers",
        ),
        (
            br#"{"model":"gpt-4o-mini","max_to\u212aens":100000}"#,
            "is `max_tokens` to parsers",
        ),
        (
            br#"{"model":"gpt-4o-mini","stream":true,"stream_options":{"Include_Usage":false}}"#,
            "is `stream_options.include_usage` to parsers",
        ),
        (
            br#"{"model":"gpt-4o-mini","model\u0000":"gpt-4.1"}"#,
            "holds `\\u0000` or another control character",
        ),
        (
            b"{\"model\":\"gpt-4o-mini\",\"mo\x01del\":\"gpt-4.1\"}",
            "another control character",
        ),
        (
            br#"{"model":"gpt-4o-mini","mod\ud800el":"gpt-4.1"}"#,
            "lone surrogate",
        ),
    ];
    all_refused(&gw, &emu, "/v1/chat/completions", "nam", cases).await;
}

/// Counts and flags token accounting reads are plain: `1e3` is not "no cap".
#[tokio::test]
async fn counts_and_flags_another_parser_reads_differently_are_refused() {
    let emu = Emulator::start().await;
    let gw = Gateway::start(
        &emu.url(),
        "[[limits]]\nname = \"tpm\"\nkey = \"global\"\ntokens = \"100000/min\"\n",
    )
    .await;
    let mut cases: Vec<(Vec<u8>, &str)> = Vec::new();
    for member in ["max_tokens", "max_completion_tokens", "max_output_tokens"] {
        for count in [
            "1e3",
            "1E3",
            "1000.0",
            "-0",
            "01",
            "18446744073709551616",
            "\"1000\"",
        ] {
            let body = format!(r#"{{"model":"gpt-4o","{member}":{count},"messages":[]}}"#);
            cases.push((body.into_bytes(), "must be a whole number written plainly"));
        }
    }
    for flag in ["1", "\"true\""] {
        let body = format!(r#"{{"model":"gpt-4o","stream":{flag},"messages":[]}}"#);
        cases.push((body.into_bytes(), "`stream` must be true, false or null"));
    }
    let cases: Vec<(&[u8], &str)> = cases.iter().map(|(b, w)| (&b[..], *w)).collect();
    all_refused(&gw, &emu, "/v1/chat/completions", "cnt", &cases).await;
    // Written plainly, the same counts are read and charged.
    let r = gw
        .post(
            "/v1/chat/completions",
            &[JSON, ("x-request-id", "plain-count")],
            r#"{"model":"gpt-4o","max_tokens":1000,"messages":[]}"#,
        )
        .await;
    assert_eq!(r.status, 200);
}

/// What makes a whole document read differently: a BOM, invalid UTF-8 in a name, a second
/// object after the first, nesting past 128 levels.
#[tokio::test]
async fn documents_another_parser_reads_differently_are_refused() {
    let emu = Emulator::start().await;
    let gw = allow_list(&emu, "\"gpt-4o-mini\"").await;
    let deep = format!(
        r#"{{"model":"gpt-4o-mini","metadata":{}1{}}}"#,
        "[".repeat(200),
        "]".repeat(200)
    );
    let cases: &[(&[u8], &str)] = &[
        (
            b"\xEF\xBB\xBF{\"model\":\"gpt-4o-mini\"}",
            "byte order mark",
        ),
        (
            b"{\"model\":\"gpt-4o-mini\",\"mod\xe9l\":\"gpt-4.1\"}",
            "invalid UTF-8",
        ),
        (
            br#"{"model":"gpt-4o-mini"}{"model":"gpt-4.1"}"#,
            "bytes follow the JSON object",
        ),
        (deep.as_bytes(), "nests deeper than 128 levels"),
    ];
    all_refused(&gw, &emu, "/v1/chat/completions", "doc", cases).await;
}

/// No check applies, ezgate reads the body only to ask a stream for its usage: an
/// ambiguous body is refused all the same; one that is not JSON at all still goes through
/// untouched; escaped names are edited in place, not doubled.
#[tokio::test]
async fn a_body_read_only_for_stream_usage_is_held_to_one_reading() {
    let emu = Emulator::start().await;
    let gw = Gateway::start(&emu.url(), "").await;
    let cases: &[(&[u8], &str)] = &[
        (
            br#"{"model":"gpt-4o","stream":true,"stream_options":{"include_usage":true},"stream\u005foptions":null}"#,
            "member `stream_options` appears twice",
        ),
        (
            br#"{"model":"gpt-4o","stream":true,"Stream":false}"#,
            "is `stream` to parsers",
        ),
    ];
    all_refused(&gw, &emu, "/v1/chat/completions", "use", cases).await;

    let r = gw
        .post(
            "/v1/chat/completions",
            &[JSON, ("x-request-id", "notjson")],
            "{not json",
        )
        .await;
    // The upstream's own answer to a body it cannot parse.
    assert_eq!(r.status, 400);
    assert!(emu.entry("notjson").await.is_some(), "forwarded untouched");

    let body = r#"{"model":"gpt-4o","stream":true,"stream\u005foptions":{"include\u005fusage":false},"messages":[{"role":"user","content":"hi"}]}"#;
    let r = gw
        .post(
            "/v1/chat/completions",
            &[
                JSON,
                ("x-request-id", "escaped-usage"),
                ("x-emu-stream-events", "6"),
            ],
            body,
        )
        .await;
    assert_eq!(r.status, 200);
    let text = String::from_utf8_lossy(&r.body);
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    assert!(
        !text.contains("\"usage\""),
        "the client did not ask: {text}"
    );
    // The upstream was asked for the usage (one `stream_options`, edited): metered.
    let line = gw.access_log("escaped-usage").await;
    assert_eq!(line["completion_tokens"], 6, "{line}");
}

/// The models a Responses body names in its tools are held to the allow-list; a tool that
/// spends a model without naming it (the upstream's default) is refused.
#[tokio::test]
async fn models_named_inside_a_body_are_held_to_the_allow_list() {
    let emu = Emulator::start().await;
    let gw = allow_list(&emu, "\"gpt-4o-mini\"").await;
    let image = |tool: &str| {
        format!(
            r#"{{"model":"gpt-4o-mini","input":"draw a cat","tools":[{{"type":"web_search"}},{tool}]}}"#
        )
    };
    for (tool, model) in [
        (
            r#"{"type":"image_generation","model":"gpt-image-1"}"#,
            "gpt-image-1",
        ),
        (
            r#"{"type":"image_generation","mod\u0065l":"dall-e-3"}"#,
            "dall-e-3",
        ),
    ] {
        let r = gw.post("/v1/responses", &[JSON, AUTH], image(tool)).await;
        assert_eq!(r.status, 403, "{tool}");
        let error = r.error();
        assert_eq!(error["code"], "model_not_allowed");
        assert!(
            error["message"].as_str().unwrap().contains(model),
            "{error}"
        );
    }
    for tool in [
        r#"{"type":"image_generation"}"#,
        r#"{"type":"image_generation","model":null,"size":"1024x1024"}"#,
    ] {
        let r = gw.post("/v1/responses", &[JSON, AUTH], image(tool)).await;
        assert_eq!(r.status, 403, "{tool}");
        let error = r.error();
        assert_eq!(error["code"], "model_not_allowed");
        assert!(
            error["message"].as_str().unwrap().contains("names none"),
            "{error}"
        );
    }
    // Two `model` members in one tool: ambiguous, as at the top level.
    let r = gw
        .post(
            "/v1/responses",
            &[JSON, AUTH],
            image(r#"{"type":"image_generation","model":"gpt-4o-mini","model":"gpt-image-1"}"#),
        )
        .await;
    assert_eq!(r.status, 400);
    assert!(r.error()["message"]
        .as_str()
        .unwrap()
        .contains("member `tools[].model` appears twice"));

    // Allowed, the tool's model passes.
    let gw = allow_list(&emu, "\"gpt-4o-mini\", \"gpt-image-1\"").await;
    let r = gw
        .post(
            "/v1/responses",
            &[JSON, AUTH],
            image(r#"{"type":"image_generation","model":"gpt-image-1"}"#),
        )
        .await;
    assert_eq!(served(&r), "gpt-4o-mini");
}
