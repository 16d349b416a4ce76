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
    let e = problems("[[limits]]\nname = \"a\"\nkey = \"global\"\nrequests = \"10/minute\"\n");
    assert!(
        e.contains("limits[0].requests") && e.contains("N/min"),
        "{e}"
    );
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
    let e = problems(&POLICIES.replacen(r#"requests = "1/s""#, r#"requests = "0/s""#, 1));
    assert!(e.contains("zero rate"), "{e}");
    // Serde stops at the first type error; fix it and the rest are reported together.
    let e = problems(POLICIES);
    for needle in [
        "limits[0] (\"a\").key",
        "not a key kind",
        "limits[1] (\"b\").burst",
        "limits[2] (\"b\").name: duplicate",
        "client \"ghost\" is not defined",
    ] {
        assert!(e.contains(needle), "missing {needle:?} in {e}");
    }
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
