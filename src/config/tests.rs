use super::*;

fn no_env(_: &str) -> Option<String> {
    None
}

fn load(text: &str) -> Result<Settings, ConfigError> {
    Settings::from_toml("ezgate.toml", text, &Overrides::default(), &no_env)
}

fn problems(text: &str) -> String {
    match load(text) {
        Ok(_) => panic!("config should be refused"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn empty_config_is_all_defaults() {
    let s = load("").unwrap();
    assert_eq!(s.config.server.listen.to_string(), "127.0.0.1:8080");
    assert_eq!(s.config.upstream.base_url, DEFAULT_UPSTREAM);
    assert!(!s.managed());
}

#[test]
fn shipped_config_is_valid() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/ezgate.toml"))
        .unwrap();
    load(&text).unwrap();
}

#[test]
fn unknown_key_names_file_and_path() {
    let e = problems("[server]\nlisen = \"127.0.0.1:1\"\n");
    assert!(
        e.starts_with("ezgate.toml: server.lisen: unknown field `lisen`"),
        "{e}"
    );
}

#[test]
fn bad_units_name_the_key() {
    let e = problems("[upstream]\nconnect_timeout = \"5 parsecs\"\n");
    assert!(
        e.contains("upstream.connect_timeout") && e.contains("not a duration"),
        "{e}"
    );
    let e = problems("[[limits]]\nname = \"a\"\nkey = \"global\"\nrequests = \"10/week\"\n");
    assert!(
        e.contains("limits[0].requests") && e.contains("N/min"),
        "{e}"
    );
    load("[[limits]]\nname = \"a\"\nkey = \"global\"\nrequests = \"10/minute\"\n").unwrap();
    let e = problems("[server]\nmax_request_body = 5\n");
    assert!(
        e.contains("server.max_request_body") && e.contains("invalid type"),
        "{e}"
    );
}

#[test]
fn missing_env_secret_is_named() {
    let e = problems("[upstream]\napi_key = \"${EZLINK_TEST_UNSET}\"\n");
    assert!(
        e.contains("upstream.api_key") && e.contains("EZLINK_TEST_UNSET"),
        "{e}"
    );
    let env = |k: &str| (k == "K").then(|| "sk-1".to_owned());
    let s = Settings::from_toml(
        "x",
        "[upstream]\napi_key = \"${K}\"\n",
        &Overrides::default(),
        &env,
    )
    .unwrap();
    assert_eq!(s.config.upstream.api_key.unwrap().expose(), "sk-1");
}

#[test]
fn policy_problems_are_all_reported() {
    // Four problems: a key that does not exist, a zero burst, a name used twice, an unknown
    // client; and, in the first version, a zero rate.
    const POLICIES: &str = r#"
[[limits]]
name = "a"
key = "tenant"
requests = "1/s"
[[limits]]
name = "b"
key = "global"
requests = "5/s"
burst = 0
[[limits]]
name = "b"
key = "client"
concurrency = 2
match = { clients = ["ghost"] }
"#;
    for text in [
        POLICIES.to_owned(),
        POLICIES.replacen(r#"requests = "1/s""#, r#"requests = "0/s""#, 1),
    ] {
        let e = problems(&text);
        for needle in [
            "limits[0] (\"a\").key: \"tenant\" is not a key kind",
            "limits[1] (\"b\").burst: must be at least 1 (line 10)",
            "limits[2] (\"b\").name: duplicate policy name; each policy needs its own (line 12)",
            "client \"ghost\" is not defined in [[clients]] (line 15)",
        ] {
            assert!(e.contains(needle), "missing {needle:?} in {e}");
        }
    }
    // The zero rate is reported with the others, and the policy it leaves without a limit
    // is not reported again as "sets no limit".
    let e = problems(&POLICIES.replacen(r#"requests = "1/s""#, r#"requests = "0/s""#, 1));
    assert!(
        e.contains("limits[0].requests: \"0/s\" is a zero rate") && !e.contains("sets no limit"),
        "{e}"
    );
    assert_eq!(e.lines().count(), 5, "{e}");
}

#[test]
fn every_mistake_is_reported_at_once_with_its_line() {
    // Three mistakes: a misspelt key (line 4), a level that is not one (line 7), a rate in
    // an unknown unit (line 12).
    let text = "# ezgate\n[server]\nlisten = \"127.0.0.1:8080\"\nlisen = \"127.0.0.1:1\"\n\n[log]\nlevel = \"warning\"\n\n[[limits]]\nname = \"a\"\nkey = \"global\"\nrequests = \"10/week\"\n";
    let e = problems(text);
    let lines: Vec<&str> = e.lines().collect();
    assert_eq!(lines.len(), 3, "{e}");
    assert!(
        lines[0].starts_with("ezgate.toml: server.lisen: unknown field `lisen`")
            && lines[0].ends_with("(line 4)"),
        "{e}"
    );
    assert_eq!(
        lines[1],
        "ezgate.toml: log.level: \"warning\" is not a level; use trace, debug, info, warn, error or off, or target=level directives such as \"info,ezgate::access=off\" (line 7)"
    );
    assert!(
        lines[2].starts_with("ezgate.toml: limits[0].requests: \"10/week\" is not a rate")
            && lines[2].ends_with("(line 12)"),
        "{e}"
    );
}

#[test]
fn a_key_on_line_21_is_reported_on_line_21() {
    let text = format!("{}[server]\nlisen = 1\n", "#\n".repeat(19));
    assert_eq!(text.lines().position(|l| l.starts_with("lisen")), Some(20));
    let e = problems(&text);
    assert!(e.ends_with("(line 21)"), "{e}");
}

#[test]
fn problems_after_a_removed_table_keep_their_index() {
    // limits[0] has no name and is dropped to read on; limits[1]'s bad rate is still
    // limits[1], on its own line.
    let text = "[[limits]]\nkey = \"global\"\nrequests = \"1/s\"\n\n[[limits]]\nname = \"b\"\nkey = \"global\"\nrequests = \"1/week\"\n";
    let e = problems(text);
    assert_eq!(
        e.lines().collect::<Vec<_>>(),
        [
            "ezgate.toml: limits[0]: missing field `name` (line 1)",
            "ezgate.toml: limits[1].requests: \"1/week\" is not a rate; use N/s, N/min, N/h or N/day (the unit may be s, sec, second, m, min, minute, h, hour, d or day) (line 8)",
        ]
    );
}

#[test]
fn a_value_of_the_wrong_type_is_reported_once() {
    // Removed for its type, `name` is then missing: one problem, not two.
    let e = problems("[[limits]]\nname = 5\nkey = \"global\"\nrequests = \"1/s\"\n");
    assert_eq!(e.lines().count(), 1, "{e}");
    assert!(
        e.contains("limits[0].name: invalid type") && e.ends_with("(line 2)"),
        "{e}"
    );
}

#[test]
fn not_toml_names_the_line() {
    let e = problems("[server]\nlisten = \n");
    assert!(
        e.starts_with("ezgate.toml: not valid TOML: ")
            && e.ends_with("(line 2)")
            && !e.contains('\n'),
        "{e}"
    );
}

#[test]
fn listen_addresses_must_be_ip_addresses() {
    let e = problems("[server]\nadmin_listen = \"localhost:9090\"\n");
    assert!(
        e.contains("server.admin_listen: \"localhost:9090\" is not an IP address and port; write e.g. 127.0.0.1:8080")
            && e.ends_with("(line 2)"),
        "{e}"
    );
}

#[test]
fn a_bad_value_set_by_a_flag_gets_no_file_line() {
    let o = Overrides {
        upstream: Some("ftp://x".into()),
        ..Overrides::default()
    };
    let e = Settings::from_toml("x", "[upstream]\nbase_url = \"https://a\"\n", &o, &no_env)
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("x: upstream.base_url: ") && !e.contains("(line"),
        "{e}"
    );
}

#[test]
fn log_levels_are_checked() {
    for level in ["warning", "info,ezgate=verbose"] {
        let e = problems(&format!("[log]\nlevel = \"{level}\"\n"));
        assert!(
            e.contains("log.level: ") && e.contains("is not a level"),
            "{e}"
        );
    }
    load("[log]\nlevel = \"warn,ezgate::access=off\"\n").unwrap();
}

#[test]
fn overrides_beat_the_file() {
    let o = Overrides {
        listen: Some("127.0.0.1:1".parse().unwrap()),
        upstream: Some("http://127.0.0.1:2".into()),
        ..Overrides::default()
    };
    let s = Settings::from_toml("x", "[server]\nlisten = \"127.0.0.1:3\"\n", &o, &no_env).unwrap();
    assert_eq!(s.config.server.listen.port(), 1);
    assert_eq!(s.upstream_uri.port_u16(), Some(2));
}

#[test]
fn redacted_display() {
    let env = |_: &str| Some("sk-very-secret".to_owned());
    let s = Settings::from_toml(
        "x",
        "[upstream]\napi_key = \"${K}\"\n",
        &Overrides::default(),
        &env,
    )
    .unwrap();
    let shown = s.to_string();
    assert!(
        !shown.contains("sk-very-secret") && shown.contains("<redacted>"),
        "{shown}"
    );
}
