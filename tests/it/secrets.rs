//! Secrets read from files (`${file:/path}`, a mounted Kubernetes Secret), read again on
//! every reload.

use std::time::Duration;

use crate::harness::*;

/// Waits until the gateway's log holds `needle` `n` times.
async fn logged(gw: &Gateway, needle: &str, n: usize) {
    let start = std::time::Instant::now();
    while gw.logs.text().matches(needle).count() < n {
        assert!(
            start.elapsed() < DEADLINE,
            "no {needle:?} (x{n}):\n{}",
            gw.logs.text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The `Authorization` the upstream saw for one request.
async fn upstream_key(emu: &Emulator, request_id: &str) -> String {
    let entry = emu.entry(request_id).await.expect("forwarded");
    logged_header(&entry, "authorization")
        .expect("an authorization header")
        .to_owned()
}

/// Connections the emulator has accepted so far.
async fn accepted_connections(emu: &Emulator) -> u64 {
    let url = format!("http://{}/__emu/connections", emu.addr);
    send(&http1(), http::Method::GET, &url, &[], bytes::Bytes::new())
        .await
        .json()["accepted"]
        .as_u64()
        .unwrap()
}

#[tokio::test]
async fn a_rotated_key_file_is_read_again_on_sighup() {
    let emu = Emulator::start().await;
    let key_file = scratch_dir().join("api-key");
    std::fs::write(&key_file, "sk-org-one\n").unwrap();
    // A limit on requests that carry `x-bucket: kept`, to see its state outlive the reload.
    let config = format!(
        "[upstream]\napi_key = \"${{file:{}}}\"\n\n[[limits]]\nname = \"kept\"\nkey = \"header:x-bucket\"\nrequests = \"2/min\"\n",
        key_file.display()
    );
    let gw = Gateway::start(&emu.url(), &config).await;
    let kept = ("x-bucket", "kept");
    let r = gw.chat(&[kept, ("x-request-id", "rot-1")]).await;
    assert_eq!(r.status, 200);
    assert_eq!(upstream_key(&emu, "rot-1").await, "Bearer sk-org-one");
    let before = accepted_connections(&emu).await;

    // The file changes (as a mounted Secret does), nothing else: SIGHUP applies it.
    std::fs::write(&key_file, "sk-org-two\n").unwrap();
    gw.signal("HUP");
    logged(&gw, "config reloaded", 1).await;
    let r = gw.chat(&[kept, ("x-request-id", "rot-2")]).await;
    assert_eq!(r.status, 200);
    // One more: the question's own connection to the emulator.
    assert_eq!(
        accepted_connections(&emu).await,
        before + 1,
        "the upstream's pooled connection outlived the key's rotation"
    );
    assert_eq!(upstream_key(&emu, "rot-2").await, "Bearer sk-org-two");
    // The limiter kept its count across the reload: the third is refused.
    let r = gw.chat(&[kept, ("x-request-id", "rot-3")]).await;
    assert_eq!(
        r.status, 429,
        "the policy's state outlived the key's rotation"
    );

    // A broken file: the reload is refused, naming the file, and the old key keeps serving.
    std::fs::write(&key_file, "sk-broken\nsecond-line\n").unwrap();
    gw.signal("HUP");
    logged(&gw, "config reload refused", 1).await;
    let logs = gw.logs.text();
    assert!(
        logs.contains(&format!("the file {}", key_file.display()))
            && logs.contains("a header cannot carry"),
        "{logs}"
    );
    std::fs::remove_file(&key_file).unwrap();
    gw.signal("HUP");
    logged(&gw, "config reload refused", 2).await;
    let logs = gw.logs.text();
    assert!(logs.contains("cannot be read"), "{logs}");
    let r = gw.chat(&[("x-request-id", "rot-4")]).await;
    assert_eq!(r.status, 200);
    assert_eq!(upstream_key(&emu, "rot-4").await, "Bearer sk-org-two");
    for secret in ["sk-org-one", "sk-org-two", "sk-broken", "second-line"] {
        assert!(!logs.contains(secret), "no secret in the logs:\n{logs}");
    }
}

#[tokio::test]
async fn check_config_reads_a_file_secret_and_shows_it_redacted() {
    let dir = scratch_dir();
    let key_file = dir.join("api-key");
    std::fs::write(&key_file, "sk-file-secret\r\n").unwrap();
    let path = dir.join("ezgate.toml");
    let run = |config: String| {
        std::fs::write(&path, config).unwrap();
        let out = tokio::process::Command::new(bin("ezgate"))
            .args(["check-config", "--config"])
            .arg(&path)
            .env_remove("EZGATE_UPSTREAM")
            .output();
        async move {
            tokio::time::timeout(DEADLINE, out)
                .await
                .expect("check-config exits")
                .unwrap()
        }
    };
    let out = run(format!(
        "[upstream]\napi_key = \"${{file:{}}}\"\n",
        key_file.display()
    ))
    .await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("api_key = \"<redacted>\"") && !text.contains("sk-file-secret"),
        "{text}"
    );
    // A relative path is refused: it would depend on where ezgate was started.
    let out = run("[upstream]\napi_key = \"${file:secrets/api-key}\"\n".to_owned()).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("upstream.api_key: the secret file secrets/api-key is not an absolute path"),
        "{err}"
    );
}
