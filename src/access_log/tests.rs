use super::*;
use serde_json::Value;

fn entry() -> Entry<'static> {
    Entry {
        request_id: "req-1",
        method: "POST",
        route: "/v1/chat/completions",
        status: 200,
        source: "upstream",
        code: "",
        upstream_status: Some(200),
        duration: Duration::from_nanos(2_682_861),
        upstream: Duration::from_micros(2_644),
        queued: None,
        bytes: 356,
        client: Some("search-team"),
        model: Some("gpt-4o"),
        prompt_tokens: Some(223),
        completion_tokens: Some(7),
        cached_tokens: None,
        cost: None,
        charged_tokens: None,
        trace_id: None,
        session_end: None,
        bytes_in: None,
    }
}

fn at(secs: u64, micros: u32) -> SystemTime {
    UNIX_EPOCH + Duration::new(secs, micros * 1000)
}

fn line(format: LogFormat, e: &Entry<'_>) -> String {
    let mut buf = Vec::new();
    super::format(&mut buf, format, e, at(1_795_580_985, 443_892));
    String::from_utf8(buf).unwrap()
}

fn json(e: &Entry<'_>) -> Value {
    let l = line(LogFormat::Json, e);
    assert!(l.ends_with('\n') && l.matches('\n').count() == 1, "{l:?}");
    serde_json::from_str(&l).unwrap()
}

#[test]
fn json_line_has_every_field_in_tracing_shape() {
    let l = line(LogFormat::Json, &entry());
    assert_eq!(
        l,
        concat!(
            r#"{"timestamp":"2026-11-25T04:29:45.443892Z","level":"INFO","#,
            r#""request_id":"req-1","method":"POST","route":"/v1/chat/completions","#,
            r#""status":200,"source":"upstream","code":"","upstream_status":200,"#,
            r#""duration_ms":2.682861,"upstream_ms":2.644,"bytes":356,"#,
            r#""client":"search-team","model":"gpt-4o","prompt_tokens":223,"#,
            r#""completion_tokens":7,"target":"ezgate::access"}"#,
            "\n"
        )
    );
    let v = json(&entry());
    assert_eq!(v["duration_ms"].as_f64(), Some(2.682861));
    assert_eq!(v["target"], TARGET);
}

#[test]
fn cost_is_a_decimal_of_the_currency() {
    let e = Entry {
        cached_tokens: Some(100),
        cost: Some(7_500_000),
        ..entry()
    };
    let mut line = Vec::new();
    format(&mut line, LogFormat::Json, &e, at(0, 0));
    let text = String::from_utf8(line).unwrap();
    assert!(
        text.contains(r#""cached_tokens":100,"cost":0.0075,"#),
        "{text}"
    );
    let v = json(&e);
    assert_eq!(v["cost"].as_f64(), Some(0.0075));
    let whole = Entry {
        cost: Some(3_000_000_001),
        ..entry()
    };
    assert_eq!(json(&whole)["cost"].to_string(), "3.000000001");
}

#[test]
fn none_fields_are_left_out() {
    let e = Entry {
        upstream_status: None,
        client: None,
        model: None,
        prompt_tokens: None,
        completion_tokens: None,
        ..entry()
    };
    let v = json(&e);
    let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    let mut want = vec![
        "timestamp",
        "level",
        "request_id",
        "method",
        "route",
        "status",
        "source",
        "code",
        "duration_ms",
        "upstream_ms",
        "bytes",
        "target",
    ];
    let mut keys = keys;
    keys.sort_unstable();
    want.sort_unstable();
    assert_eq!(keys, want);
    let text = line(LogFormat::Text, &e);
    for absent in ["upstream_status", "client", "model", "tokens"] {
        assert!(!text.contains(absent), "{text}");
    }
}

#[test]
fn every_string_round_trips_through_a_json_parser() {
    let controls: String = (0u8..0x20).map(char::from).collect();
    let cases = [
        controls.as_str(),
        "\"",
        "\\",
        "\\\"\\\\\"",
        "a\"b\\c",
        "\u{7f}",
        "é☃ 日本語 🦀",
        "mixed \u{1}é\"\n🦀\\end",
        "",
        "/",
    ];
    for s in cases {
        let e = Entry {
            request_id: s,
            model: Some(s),
            client: Some(s),
            code: s,
            ..entry()
        };
        let l = line(LogFormat::Json, &e);
        assert_eq!(l.matches('\n').count(), 1, "a raw newline in {l:?}");
        let v: Value = serde_json::from_str(&l).unwrap();
        for field in ["request_id", "model", "client", "code"] {
            assert_eq!(v[field], s, "{field} of {l:?}");
        }
        // The same escaping as serde_json's.
        let mut quoted = Vec::new();
        push_quoted(&mut quoted, s);
        assert_eq!(
            String::from_utf8(quoted).unwrap(),
            serde_json::to_string(s).unwrap()
        );
    }
}

#[test]
fn every_control_char_is_escaped() {
    for b in 0u8..0x20 {
        let s = char::from(b).to_string();
        let mut quoted = Vec::new();
        push_quoted(&mut quoted, &s);
        assert!(quoted.iter().all(|&c| c >= 0x20), "{b:#x}: {quoted:?}");
        let back: String = serde_json::from_slice(&quoted).unwrap();
        assert_eq!(back, s);
    }
}

#[test]
fn text_line_is_tracing_shaped() {
    assert_eq!(
        line(LogFormat::Text, &entry()),
        concat!(
            "2026-11-25T04:29:45.443892Z  INFO ezgate::access: request_id=req-1 ",
            r#"method="POST" route="/v1/chat/completions" status=200 source="upstream" "#,
            r#"code="" upstream_status=200 duration_ms=2.682861 upstream_ms=2.644 "#,
            r#"bytes=356 client="search-team" model="gpt-4o" prompt_tokens=223 "#,
            "completion_tokens=7\n"
        )
    );
    let e = Entry {
        request_id: "a\"b",
        model: Some("line\nbreak"),
        ..entry()
    };
    let l = line(LogFormat::Text, &e);
    assert!(l.contains(r#"request_id="a\"b""#), "{l}");
    assert!(l.contains(r#"model="line\nbreak""#), "{l}");
    assert_eq!(l.matches('\n').count(), 1);
}

#[test]
fn numbers_and_durations() {
    for n in [0, 7, 10, 99, 100, 65_535, u64::MAX] {
        let mut b = Vec::new();
        push_u64(&mut b, n);
        assert_eq!(String::from_utf8(b).unwrap(), n.to_string());
    }
    for (d, want) in [
        (Duration::ZERO, "0.0"),
        (Duration::from_millis(3), "3.0"),
        (Duration::from_micros(2_500), "2.5"),
        (Duration::from_nanos(206_748), "0.206748"),
        (Duration::from_nanos(1), "0.000001"),
        (Duration::from_secs(90), "90000.0"),
        (Duration::new(1, 999_999_999), "1999.999999"),
        // Past u64 milliseconds: saturated, as before.
        (Duration::new(u64::MAX, 0), "18446744073709551615.0"),
    ] {
        let mut b = Vec::new();
        push_millis(&mut b, d);
        assert_eq!(String::from_utf8(b).unwrap(), want);
    }
}

#[test]
fn timestamps_are_rfc3339_utc() {
    for (secs, micros, want) in [
        (0, 0, "1970-01-01T00:00:00.000000Z"),
        (951_782_400, 1, "2000-02-29T00:00:00.000001Z"),
        (1_709_251_199, 999_999, "2024-02-29T23:59:59.999999Z"),
        (4_102_444_799, 500_000, "2099-12-31T23:59:59.500000Z"),
    ] {
        let mut b = Vec::new();
        push_timestamp(&mut b, at(secs, micros));
        assert_eq!(String::from_utf8(b).unwrap(), want);
    }
}

#[test]
fn the_word_check_finds_what_the_byte_check_finds() {
    let slow = |b: &[u8]| b.iter().any(|&c| c < 0x20 || c == b'"' || c == b'\\');
    let mut cases: Vec<Vec<u8>> = vec![
        b"".to_vec(),
        b"01a2505e-a58a-7208-93f0-47595e5034a6".to_vec(),
        "modèle-東京 ok".as_bytes().to_vec(),
    ];
    // Every byte value at every position of a word and of the remainder, among plain bytes
    // and among high ones (a borrow from a neighbour must not hide or invent a match).
    for fill in [b'a', 0xff, 0x80, 0x21] {
        for at in 0..12 {
            for v in 0..=255u8 {
                let mut c = vec![fill; 12];
                c[at] = v;
                cases.push(c);
            }
        }
    }
    for c in cases {
        assert_eq!(needs_escape(&c), slow(&c), "{c:?}");
    }
}

#[test]
fn a_cached_second_is_rewritten_when_the_second_changes() {
    let mut second = Second::NONE;
    for (secs, micros) in [
        (1_709_251_199, 1),
        (1_709_251_199, 999_999),
        (1_709_251_200, 0),
        (1_709_251_199, 7),
        (4_102_444_799, 500_000),
    ] {
        let (mut cached, mut fresh) = (Vec::new(), Vec::new());
        push_timestamp_cached(&mut cached, at(secs, micros), &mut second);
        push_timestamp(&mut fresh, at(secs, micros));
        assert_eq!(
            String::from_utf8(cached).unwrap(),
            String::from_utf8(fresh).unwrap()
        );
    }
    // A year past 9999 is written whole, never cached.
    let mut far = Vec::new();
    push_timestamp_cached(&mut far, at(253_402_300_800, 0), &mut second);
    assert!(far.starts_with(b"+10000-01-01T00:00:00"));
    assert_eq!(second.unix, 4_102_444_799);
}

#[test]
fn calendar_matches_counting_days() {
    let (mut y, mut m, mut d) = (1970u64, 1u64, 1u64);
    for days in 0..(400 * 366) {
        assert_eq!(civil_from_days(days), (y, m, d), "day {days}");
        let leap = y % 4 == 0 && (y % 100 != 0 || y % 400 == 0);
        let len = match m {
            2 if leap => 29,
            2 => 28,
            4 | 6 | 9 | 11 => 30,
            _ => 31,
        };
        d += 1;
        if d > len {
            d = 1;
            m += 1;
            if m > 12 {
                m = 1;
                y += 1;
            }
        }
    }
}
