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
    let e = problems("[server]\nmax_request_body = true\n");
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

#[test]
fn redis_deployment_shapes() {
    let shape = |text: &str| load(text).unwrap().config.redis.unwrap().shape().unwrap();
    match shape("[redis]\nurl = \"rediss://app:pw@cache:6380/2\"\n") {
        RedisShape::Standalone(t) => assert_eq!(
            (t.host.as_str(), t.port, t.db, t.tls),
            ("cache", 6380, 2, true)
        ),
        other => panic!("{other:?}"),
    }
    match shape("[redis]\nmode = \"cluster\"\nnodes = [\"redis://:pw@10.0.0.1:7000\", \"redis://10.0.0.2:7000\"]\n") {
        RedisShape::Cluster(nodes) => assert_eq!(nodes.len(), 2),
        other => panic!("{other:?}"),
    }
    match shape("[redis]\nmode = \"sentinel\"\nnodes = [\"redis://10.0.0.1:26379\"]\nmaster_name = \"mymaster\"\nurl = \"redis://:pw@mymaster/1\"\n") {
        RedisShape::Sentinel { sentinels, master_name, master } => {
            assert_eq!((sentinels.len(), master_name.as_str()), (1, "mymaster"));
            let m = master.unwrap();
            assert_eq!((m.db, m.password.as_deref()), (1, Some("pw")));
        }
        other => panic!("{other:?}"),
    }
    let s = load(
        "[redis]\nmode = \"sentinel\"\nnodes = [\"redis://10.0.0.1:26379\"]\nmaster_name = \"m\"\n",
    )
    .unwrap();
    assert!(matches!(
        s.config.redis.unwrap().shape().unwrap(),
        RedisShape::Sentinel { master: None, .. }
    ));
}

#[test]
fn redis_problems_name_the_key() {
    for (text, says) in [
        ("[redis]\n", "redis.url: mode = \"standalone\" needs url"),
        ("[redis]\nurl = \"http://cache:6379\"\n", "redis.url: a http:// URL; write redis://"),
        ("[redis]\nurl = \"redis://c\"\nnodes = [\"redis://d\"]\n", "redis.nodes: only read with mode = \"cluster\""),
        ("[redis]\nurl = \"redis://c\"\nmaster_name = \"m\"\n", "redis.master_name: only read with mode = \"sentinel\""),
        ("[redis]\nmode = \"cluster\"\n", "redis.nodes: mode = \"cluster\" needs seed nodes"),
        ("[redis]\nmode = \"cluster\"\nurl = \"redis://c\"\nnodes = [\"redis://d\"]\n", "redis.url: not read with mode = \"cluster\""),
        ("[redis]\nmode = \"cluster\"\nnodes = [\"redis://d/1\"]\n", "redis.nodes[0]: Redis Cluster has only database 0"),
        ("[redis]\nmode = \"cluster\"\nnodes = [\"redis://d\", \"rediss://e\"]\n", "redis.nodes[1]: mixes redis:// and rediss://"),
        ("[redis]\nmode = \"cluster\"\nnodes = [\"redis://:a@d\", \"redis://:b@e\"]\n", "redis.nodes[1]: its user or password differs from redis.nodes[0]'s"),
        ("[redis]\nmode = \"cluster\"\nnodes = [\"redis://d\", \"redis:/e\"]\n", "redis.nodes[1]: is not a URL"),
        ("[redis]\nmode = \"sentinel\"\nnodes = [\"redis://s:26379\"]\n", "redis.master_name: mode = \"sentinel\" needs the name"),
        ("[redis]\nmode = \"sentinel\"\nmaster_name = \"m\"\n", "redis.nodes: mode = \"sentinel\" needs the sentinels"),
        ("[redis]\nmode = \"sentinel\"\nnodes = [\"redis://s/2\"]\nmaster_name = \"m\"\n", "redis.nodes[0]: a sentinel has no database"),
        ("[redis]\nmode = \"sentinel\"\nnodes = [\"redis://s\"]\nmaster_name = \"m\"\nurl = \"redis://10.0.0.5:6379\"\n", "redis.url: with mode = \"sentinel\" the URL names the master"),
        ("[redis]\nmode = \"sentinel\"\nnodes = [\"redis://s\"]\nmaster_name = \"m\"\nurl = \"redis://m:6379\"\n", "write redis://[user:password@]m[/db]"),
        ("[redis]\nmode = \"primary\"\n", "redis.mode"),
        ("[redis]\nurl = \"redis://c\"\nreplicas = 0\n", "redis.replicas: must be at least 1"),
        ("[redis]\nurl = \"redis://c\"\nconcurrency_lease = \"2500ms\"\n", "redis.concurrency_lease: \"2500ms\" is too short; use at least \"3s\""),
        ("[redis]\nurl = \"${NOPE}\"\n", "redis.url: environment variable NOPE is not set"),
        ("[redis]\nmode = \"cluster\"\nnodes = [\"${NOPE}\"]\n", "redis.nodes[0]: environment variable NOPE is not set"),
        ("[[limits]]\nname = \"a\"\nkey = \"global\"\nrequests = \"1/s\"\nstore = \"redis\"\n", "needs a [redis] table"),
    ] {
        let e = problems(text);
        assert!(e.contains(says), "{text}\n→ {e}");
    }
    // Every problem at once, each with its line.
    let e = problems(
        "[redis]\nmode = \"sentinel\"\nurl = \"redis://:pw@x:1\"\nnodes = [\"redis://s/2\"]\n",
    );
    assert!(
        e.contains("redis.master_name") && e.contains("redis.nodes[0]") && e.contains("(line 4)"),
        "{e}"
    );
    assert!(!e.contains("pw"), "{e}");
}

#[test]
fn redis_urls_are_shown_without_passwords() {
    let env = |_: &str| Some("redis://app:hunter2@cache:6380".to_owned());
    let s = Settings::from_toml(
        "x",
        "[redis]\nmode = \"cluster\"\nnodes = [\"${R}\", \"redis://app:hunter2@other\"]\n",
        &Overrides::default(),
        &env,
    )
    .unwrap();
    let shown = s.to_string();
    assert!(!shown.contains("hunter2"), "{shown}");
    assert!(
        shown.contains("mode = \"cluster\"")
            && shown.contains("nodes = [\"redis://app:<redacted>@cache:6380\", \"redis://app:<redacted>@other:6379\"]"),
        "{shown}"
    );
}

/// A reload keeps the shared store of an unchanged `[redis]`: equality covers every key.
#[test]
fn redis_sections_compare_by_every_key() {
    let redis = |text: &str| load(text).unwrap().config.redis.unwrap();
    let base = "[redis]\nmode = \"cluster\"\nnodes = [\"redis://a:1\", \"redis://b:2\"]\ntimeout = \"50ms\"\n";
    assert_eq!(redis(base), redis(base));
    for changed in [
        "[redis]\nmode = \"cluster\"\nnodes = [\"redis://a:1\"]\ntimeout = \"50ms\"\n",
        "[redis]\nmode = \"cluster\"\nnodes = [\"redis://a:1\", \"redis://b:2\"]\ntimeout = \"60ms\"\n",
        "[redis]\nmode = \"cluster\"\nnodes = [\"redis://a:1\", \"redis://b:2\"]\ntimeout = \"50ms\"\nreplicas = 2\n",
    ] {
        assert_ne!(redis(base), redis(changed), "{changed}");
    }
}

#[test]
fn websocket_limits_default_safe_and_refuse_zero() {
    let s = load("").unwrap();
    let server = &s.config.server;
    assert_eq!(server.max_websocket_sessions, 1000);
    assert_eq!(
        server.websocket_max_lifetime.0,
        Duration::from_secs(4 * 3600)
    );
    assert_eq!(server.websocket_ping_interval.0, Duration::from_secs(20));
    assert_eq!(server.websocket_pong_timeout.0, Duration::from_secs(20));
    let e = problems(
        "[server]\nmax_websocket_sessions = 0\nwebsocket_max_lifetime = \"0s\"\nwebsocket_ping_interval = \"0s\"\nwebsocket_pong_timeout = \"0s\"\n",
    );
    for key in [
        "server.max_websocket_sessions: must be above zero",
        "server.websocket_max_lifetime: must be above zero",
        "server.websocket_ping_interval: must be above zero",
        "server.websocket_pong_timeout: must be above zero",
    ] {
        assert!(e.contains(key), "{key} in {e}");
    }
}

#[test]
fn the_memory_ceiling_holds_at_least_one_body_and_the_deadline_is_set() {
    let s = load("").unwrap();
    assert_eq!(s.config.server.max_buffered_bytes, ByteSize(64 << 20));
    assert_eq!(
        s.config.server.request_body_deadline,
        Dur(std::time::Duration::from_secs(60))
    );
    let e = problems(
        "[server]\nmax_request_body = \"16MiB\"\nmax_buffered_bytes = \"1MiB\"\nrequest_body_deadline = \"0s\"\n",
    );
    assert!(
        e.contains("server.max_buffered_bytes: 1MiB is below server.max_request_body (16MiB)"),
        "{e}"
    );
    assert!(
        e.contains("server.request_body_deadline: must be above zero"),
        "{e}"
    );
    assert!(load("[server]\nmax_request_body = \"1MiB\"\nmax_buffered_bytes = \"1MiB\"\n").is_ok());
}

#[test]
fn unchecked_routes_are_checked_paths() {
    let key = "a".repeat(64);
    let client = |models: &str, routes: &str| {
        format!(
            "[upstream]\napi_key = \"sk-org\"\n[[clients]]\nname = \"c\"\nkey_sha256 = \"{key}\"\n{models}\nunchecked_routes = {routes}\n"
        )
    };
    let ok = load(&client(
        "models = [\"gpt-4o-mini\"]",
        r#"["/v1/batches", "/v1/threads/*"]"#,
    ))
    .unwrap();
    assert_eq!(
        ok.config.clients[0].unchecked_routes,
        ["/v1/batches", "/v1/threads/*"]
    );
    assert!(ok
        .to_string()
        .contains("unchecked_routes = [\"/v1/batches\""));
    let e = problems(&client(
        "models = [\"gpt-4o-mini\"]",
        r#"["v1/batches", "/v1/batches?x=1", "/v1/../batches", "/v1//batches", "/v1/%62atches", "/v1/batches"]"#,
    ));
    for needle in [
        "clients[0].unchecked_routes[0]: \"v1/batches\" must be a path under /v1/",
        "clients[0].unchecked_routes[1]: \"/v1/batches?x=1\" must be a plain path",
        "clients[0].unchecked_routes[2]: \"/v1/../batches\" must be a canonical path",
        "clients[0].unchecked_routes[3]: \"/v1//batches\" must be a canonical path",
        "clients[0].unchecked_routes[4]: \"/v1/%62atches\" must be a plain path",
    ] {
        assert!(e.contains(needle), "missing {needle:?} in {e}");
    }
    assert!(!e.contains("unchecked_routes[5]"), "{e}");
    let e = problems(&client("", r#"["/v1/batches"]"#));
    assert!(
        e.contains("clients[0].unchecked_routes: has no effect without a models allow-list"),
        "{e}"
    );
}

/// `check-config` prints a config that reads back as the same config: every duration, size
/// and rate written the way the docs write them, none lost to rounding.
#[test]
fn printed_config_parses_back_to_the_same_settings() {
    let shipped =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/ezgate.toml"))
            .unwrap();
    let varied = r#"
[server]
max_request_body = 1048577
shutdown_grace = "1.5s"
header_read_timeout = "90s"
request_body_timeout = "250ms"
request_body_deadline = "2m"
max_buffered_bytes = "10MB"
websocket_max_lifetime = "1d"
websocket_ping_interval = "1500ms"
websocket_pong_timeout = "2.000250s"

[upstream]
connect_timeout = "2.25s"
response_timeout = "120s"
max_retry_after = "4h"

[redis]
url = "redis://127.0.0.1:6379"
timeout = "0.05s"
connect_timeout = "1s"

[[limits]]
name = "mixed"
key = "api_key"
requests = "5000/minute"
burst = 10
tokens = "100000/hour"
on_limit = "wait"
max_wait = "2.5s"

[[limits]]
name = "in-flight"
key = "ip"
concurrency = 4
store = "redis"
"#;
    // The print writes every default out: a default left unset reads back as set to it.
    let effective = |c: &Config| {
        let mut c = c.clone();
        for l in &mut c.limits {
            l.max_keys = Some(l.effective_max_keys());
            if l.tokens.is_some() {
                l.default_tokens = Some(l.effective_default_tokens());
            }
            l.burst = l.effective_burst();
        }
        c
    };
    for text in [shipped.as_str(), varied] {
        let first = load(text).unwrap();
        let printed = first.to_string();
        let again = load(&printed).unwrap_or_else(|e| panic!("{e}\n{printed}"));
        assert_eq!(
            effective(&again.config),
            effective(&first.config),
            "{printed}"
        );
        assert_eq!(again.to_string(), printed);
    }
    let printed = load(varied).unwrap().to_string();
    for line in [
        "max_request_body = \"1048577B\"",
        "shutdown_grace = \"1500ms\"",
        "header_read_timeout = \"90s\"",
        "request_body_timeout = \"250ms\"",
        "request_body_deadline = \"2m\"",
        "max_buffered_bytes = \"10MB\"",
        "websocket_max_lifetime = \"1d\"",
        "websocket_pong_timeout = \"2000.25ms\"",
        "max_retry_after = \"4h\"",
        "timeout = \"50ms\"",
        "requests = \"5000/min\"",
        "tokens = \"100000/h\"",
        "max_wait = \"2500ms\"",
    ] {
        assert!(printed.lines().any(|l| l == line), "{line}:\n{printed}");
    }
    let shipped = load(&shipped).unwrap().to_string();
    for line in [
        "max_request_body = \"16MiB\"",
        "shutdown_grace = \"30s\"",
        "max_retry_after = \"5m\"",
        "websocket_max_lifetime = \"4h\"",
    ] {
        assert!(shipped.lines().any(|l| l == line), "{line}:\n{shipped}");
    }
}

#[test]
fn sizes_read_a_toml_integer_as_bytes() {
    let s = load("[server]\nmax_request_body = 1048576\nmax_buffered_bytes = 2097152\n").unwrap();
    assert_eq!(s.config.server.max_request_body, ByteSize(1 << 20));
    assert_eq!(s.config.server.max_buffered_bytes, ByteSize(2 << 20));
    let e = problems("[server]\nmax_request_body = -5\nmax_buffered_bytes = 1.5\n");
    assert!(
        e.contains("server.max_request_body: -5 is not a size; write a whole number of bytes (e.g. 1048576) or a size with its unit (e.g. \"1MiB\") (line 2)"),
        "{e}"
    );
    assert!(
        e.contains("server.max_buffered_bytes: 1.5 is not a size"),
        "{e}"
    );
}

#[test]
fn a_rate_without_its_unit_is_refused_with_a_hint() {
    let e = problems(
        "[[limits]]\nname = \"a\"\nkey = \"global\"\nrequests = 5000\n\n[[limits]]\nname = \"b\"\nkey = \"global\"\ntokens = \"5000\"\n\n[server]\nshutdown_grace = 30\n",
    );
    for want in [
        "limits[0].requests: 5000 is not a rate; write it with its unit, e.g. \"5000/min\" (line 4)",
        "limits[1].tokens: 5000 is not a rate; write it with its unit, e.g. \"5000/min\" (line 9)",
        "server.shutdown_grace: 30 is not a duration; write it with its unit, e.g. \"30s\" or \"30ms\" (line 12)",
    ] {
        assert!(e.contains(want), "{want}\n{e}");
    }
    let e = problems(
        "[[limits]]\nname = \"a\"\nkey = \"global\"\nrequests = -5\n\n[server]\nshutdown_grace = -1\n",
    );
    for want in [
        "limits[0].requests: -5 is not a rate; write a whole positive count and its unit, e.g. \"600/min\" (line 4)",
        "server.shutdown_grace: -1 is not a duration; write a positive number and a unit, e.g. \"30s\" (line 7)",
    ] {
        assert!(e.contains(want), "{want}\n{e}");
    }
}

/// A file of its own under the system's temporary directory, for `${file:/path}`.
fn secret_file(name: &str, content: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("ezgate-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, content).unwrap();
    p
}

#[test]
fn secrets_are_read_from_files_each_time_the_config_is() {
    let key = secret_file("api-key", "sk-from-file-1\n");
    let url = secret_file("redis-url", "redis://app:hunter2@cache:6380\r\n");
    let text = format!(
        "[upstream]\napi_key = \"${{file:{}}}\"\n\n[redis]\nurl = \"${{file:{}}}\"\n",
        key.display(),
        url.display()
    );
    let s = load(&text).unwrap();
    assert!(s.managed());
    assert_eq!(
        s.config.upstream.api_key.as_ref().unwrap().expose(),
        "sk-from-file-1"
    );
    assert_eq!(
        s.config
            .redis
            .as_ref()
            .unwrap()
            .url
            .as_ref()
            .unwrap()
            .expose(),
        "redis://app:hunter2@cache:6380"
    );
    let shown = s.to_string();
    assert!(
        !shown.contains("sk-from-file") && !shown.contains("hunter2"),
        "{shown}"
    );
    assert!(shown.contains("api_key = \"<redacted>\""), "{shown}");
    // Read again, not remembered: a rotated file gives the new key.
    std::fs::write(&key, "sk-from-file-2").unwrap();
    assert_eq!(
        load(&text)
            .unwrap()
            .config
            .upstream
            .api_key
            .unwrap()
            .expose(),
        "sk-from-file-2"
    );
    // A key a header cannot carry is refused, naming the file, not quoting it.
    std::fs::write(&key, "sk-line-one\nsk-line-two\n").unwrap();
    let e = problems(&text);
    assert!(
        e.contains(&format!(
            "upstream.api_key: the file {} holds a character a header cannot carry",
            key.display()
        )),
        "{e}"
    );
    assert!(!e.contains("sk-line"), "{e}");
    let env = |_: &str| Some("sk-env\r\nx-evil: 1".to_owned());
    let e = Settings::from_toml(
        "x",
        "[upstream]\napi_key = \"${K}\"\n",
        &Overrides::default(),
        &env,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("upstream.api_key: the value of K holds a character"),
        "{e}"
    );
    let e = problems("[upstream]\napi_key = \"sk-literal\\u0007\"\n");
    assert!(e.contains("upstream.api_key: holds a character"), "{e}");
    assert!(!e.contains("sk-literal") && !e.contains("x-evil"), "{e}");
    std::fs::remove_file(&key).unwrap();
    let e = problems(&text);
    assert!(
        e.contains(&format!(
            "upstream.api_key: the secret file {} cannot be read",
            key.display()
        )),
        "{e}"
    );
}

#[test]
fn clients_identify_callers_in_passthrough_mode_too() {
    let s = load(&format!(
        "[[clients]]\nname = \"search\"\nkey_sha256 = \"{}\"\nmodels = [\"gpt-4o*\"]\n",
        "ab".repeat(32)
    ))
    .unwrap();
    assert!(!s.managed());
    assert_eq!(s.config.clients.len(), 1);
    assert!(!s.config.upstream.forward_client_ip, "off by default");
    assert!(s.to_string().contains("forward_client_ip = false"));
}

#[test]
fn the_admin_token_is_resolved_checked_and_redacted() {
    let env = |k: &str| match k {
        "T" => Some("admin-token-0123456789".to_owned()),
        "SHORT" => Some("abc".to_owned()),
        _ => None,
    };
    let load = |text: &str| Settings::from_toml("x", text, &Overrides::default(), &env);
    let s = load("[server]\nadmin_token = \"${T}\"\n").unwrap();
    assert_eq!(
        s.config.server.admin_token.as_ref().map(|t| t.expose()),
        Some("admin-token-0123456789")
    );
    let shown = s.to_string();
    assert!(
        !shown.contains("admin-token-0123456789") && shown.contains("admin_token = \"<redacted>\""),
        "{shown}"
    );
    for (text, says) in [
        ("[server]\nadmin_token = \"${UNSET}\"\n", "UNSET is not set"),
        ("[server]\nadmin_token = \"${SHORT}\"\n", "shorter than 16"),
        ("[server]\nadmin_token = \"short\"\n", "shorter than 16"),
        ("[server]\nadmin_token = \"x${T}\"\n", "exactly"),
    ] {
        let e = load(text).map(|_| ()).unwrap_err().to_string();
        assert!(e.contains("server.admin_token") && e.contains(says), "{e}");
        assert!(!e.contains("admin-token-0123456789"), "{e}");
    }
    assert!(load("").unwrap().config.server.admin_token.is_none());
    // From a file, as every secret: one trailing newline dropped.
    let file = secret_file("admin-token", "admin-token-from-a-file-01\n");
    let s = load(&format!(
        "[server]\nadmin_token = \"${{file:{}}}\"\n",
        file.display()
    ))
    .unwrap();
    assert_eq!(
        s.config.server.admin_token.as_ref().map(|t| t.expose()),
        Some("admin-token-from-a-file-01")
    );
}

#[test]
fn the_config_hash_follows_the_effective_config_not_its_secrets() {
    let env = |k: &str| Some(format!("secret-value-of-{k}-0123456789"));
    let hash = |text: &str| {
        Settings::from_toml("x", text, &Overrides::default(), &env)
            .unwrap()
            .hash()
    };
    let base = hash("[upstream]\napi_key = \"${A}\"\n");
    assert_eq!(base.len(), 16);
    assert!(base.bytes().all(|b| b.is_ascii_hexdigit()), "{base}");
    assert_eq!(
        base,
        hash("[upstream]\napi_key = \"${B}\"\n"),
        "secrets are redacted first"
    );
    assert_ne!(
        base,
        hash("[upstream]\napi_key = \"${A}\"\nresponse_timeout = \"61s\"\n")
    );
}

#[test]
fn upstream_quota_is_read_checked_and_printed() {
    let s = load("").unwrap();
    assert_eq!(s.config.upstream.quota.mode, super::QuotaMode::Observe);
    let text = "[upstream.quota]\nmode = \"off\"\nheadroom = \"7.5%\"\nreserve = { critical = \"5%\", interactive = \"20%\" }\nmax_wait = { critical = \"3s\", interactive = \"1s\", batch = \"2m\" }\n";
    let s = load(text).unwrap();
    let q = &s.config.upstream.quota;
    assert_eq!(q.mode, super::QuotaMode::Off);
    assert_eq!(q.headroom.fraction(), 0.075);
    let printed = s.to_string();
    assert!(
        printed.contains("[upstream.quota]\nmode = \"off\"\nheadroom = \"7.5%\""),
        "{printed}"
    );
    assert!(printed.contains("batch = \"2m\""), "{printed}");
    // What check-config prints reads back to the same config.
    let section = printed
        .split("[upstream.quota]")
        .nth(1)
        .and_then(|t| t.split("\n[").next())
        .unwrap();
    let again = load(&format!("[upstream.quota]{section}")).unwrap();
    assert_eq!(&again.config.upstream.quota, q);

    let enforce = load("[upstream.quota]\nmode = \"enforce\"\n[[clients]]\nname = \"etl\"\nkey_sha256 = \"0000000000000000000000000000000000000000000000000000000000000000\"\npriority = \"batch\"\n").unwrap();
    assert_eq!(
        enforce.config.upstream.quota.mode,
        crate::config::QuotaMode::Enforce
    );
    assert_eq!(
        enforce.config.clients[0].priority,
        crate::config::Priority::Batch
    );
    let e = problems("[[clients]]\nname = \"etl\"\nkey_sha256 = \"0000000000000000000000000000000000000000000000000000000000000000\"\npriority = \"low\"\n");
    assert!(e.contains("priority"), "{e}");
    let e = problems("[upstream.quota]\nmode = \"pace\"\n");
    assert!(e.contains("upstream.quota.mode"), "{e}");
    let e = problems("[upstream.quota]\nheadroom = \"5\"\n");
    assert!(
        e.contains("upstream.quota.headroom") && e.contains("percentage"),
        "{e}"
    );
    let e = problems("[upstream.quota]\nwindow = \"1s\"\n");
    assert!(e.contains("window"), "{e}");
}
