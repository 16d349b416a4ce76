//! TLS both ways, against a CA made in the test: upstream over rustls with `ca_file`, and the
//! proxy listener serving h2 and HTTP/1.1 by ALPN.

use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};

use crate::harness::*;

pub struct Pki {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca_der: Vec<u8>,
}

/// A CA and a certificate it signed for `localhost` and 127.0.0.1.
pub fn make_pki() -> Pki {
    let dir = scratch_dir();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "ezgate test CA");
    let ca_key = KeyPair::generate().unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    params
        .subject_alt_names
        .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
    let pki = Pki {
        ca: dir.join("ca.pem"),
        cert: dir.join("server.pem"),
        key: dir.join("server.key"),
        ca_der: ca.der().to_vec(),
    };
    std::fs::write(&pki.ca, ca.pem()).unwrap();
    std::fs::write(&pki.cert, cert.pem()).unwrap();
    std::fs::write(&pki.key, key.serialize_pem()).unwrap();
    pki
}

/// The emulator serving TLS with a certificate of a new CA, and ezgate in front of it
/// trusting that CA (`ca_file`); `upstream` adds lines to ezgate's `[upstream]` table.
async fn gateway_to_tls_emulator(upstream: &str) -> (Emulator, Gateway) {
    let pki = make_pki();
    let emu = Emulator::start_tls(&pki.cert, &pki.key).await;
    let config = format!(
        "[upstream]\nca_file = {:?}\n{upstream}",
        pki.ca.display().to_string()
    );
    let gw = Gateway::start(&emu.url(), &config).await;
    (emu, gw)
}

#[tokio::test]
async fn upstream_over_tls_with_an_extra_ca() {
    let pki = make_pki();
    let emu = Emulator::start_tls(&pki.cert, &pki.key).await;
    let config = format!("[upstream]\nca_file = {:?}\n", pki.ca.display().to_string());
    let gw = Gateway::start(&emu.url(), &config).await;
    let r = gw.chat(&[]).await;
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["object"], "chat.completion");
    assert_streams_to_the_end(&gw).await;
    // `auto`, the default: with few requests in flight, HTTP/1.1 (cheaper per request),
    // though ALPN would pick h2.
    let r = gw.get("/inspect").await;
    assert_eq!(r.json()["version"], "HTTP/1.1");

    // `always` over TLS: h2 by ALPN, streams included.
    let config = format!(
        "[upstream]\nca_file = {:?}\nhttp2 = \"always\"\n",
        pki.ca.display().to_string()
    );
    let gw = Gateway::start(&emu.url(), &config).await;
    assert_streams_to_the_end(&gw).await;
    // Connection-specific headers would be a protocol error on the upstream's HTTP/2.
    let r = send(
        &http1(),
        http::Method::GET,
        &gw.url("/inspect"),
        &[
            ("connection", "keep-alive, x-hop"),
            ("x-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("upgrade", "websocket"),
            ("proxy-connection", "keep-alive"),
        ],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        r.json()["version"],
        "HTTP/2.0",
        "the upstream is reached over h2 by ALPN"
    );

    // Without the CA the upstream is untrusted: 502, counted as a TLS failure.
    let gw = Gateway::start(&emu.url(), "").await;
    let r = gw.chat(&[]).await;
    assert_eq!(r.status, 502);
    let e = r.error();
    assert_eq!(e["code"], "upstream_unreachable");
    assert!(e["message"].as_str().unwrap().contains("TLS"), "{e}");
    assert_eq!(
        gw.metric("ezgate_upstream_failures_total{kind=\"tls\"}")
            .await,
        1.0
    );
}

/// A streamed completion through `gw` arrives whole, down to its `[DONE]` event.
async fn assert_streams_to_the_end(gw: &Gateway) {
    let r = gw
        .post(
            "/v1/chat/completions",
            &[("content-type", "application/json")],
            r#"{"model":"m","stream":true,"messages":[]}"#,
        )
        .await;
    assert!(String::from_utf8_lossy(&r.body).ends_with("data: [DONE]\n\n"));
}

fn tls_client(
    ca_der: &[u8],
    h2: bool,
) -> Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Full<Bytes>,
> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from(ca_der.to_vec()))
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_only();
    let connector = if h2 {
        builder.enable_http2().build()
    } else {
        builder.enable_http1().build()
    };
    let mut b = Client::builder(TokioExecutor::new());
    if h2 {
        b.http2_only(true);
    }
    b.build(connector)
}

/// A JSON POST through `client` with `headers` beside its content type, answered within
/// the deadline.
async fn post_json<C>(
    client: &Client<C, Full<Bytes>>,
    url: String,
    headers: &[(&str, &str)],
    body: Bytes,
) -> http::Response<hyper::body::Incoming>
where
    C: hyper_util::client::legacy::connect::Connect + Clone + Send + Sync + 'static,
{
    let mut req = http::Request::post(url).header("content-type", "application/json");
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let req = req.body(Full::new(body)).unwrap();
    tokio::time::timeout(DEADLINE, client.request(req))
        .await
        .unwrap()
        .unwrap()
}

#[tokio::test]
async fn the_proxy_listener_serves_h2_and_http1_over_tls() {
    let pki = make_pki();
    let emu = Emulator::start().await;
    let config = format!(
        "[server]\ntls = {{ cert = {:?}, key = {:?} }}\n",
        pki.cert.display().to_string(),
        pki.key.display().to_string()
    );
    let gw = Gateway::start(&emu.url(), &config).await;
    for (h2, version) in [
        (true, http::Version::HTTP_2),
        (false, http::Version::HTTP_11),
    ] {
        let client = tls_client(&pki.ca_der, h2);
        let url = format!("https://localhost:{}/v1/chat/completions", gw.addr.port());
        let resp = post_json(&client, url, &[], Bytes::from(CHAT_BODY)).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.version(), version);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert!(body.starts_with(b"{"));
    }
}

#[tokio::test]
async fn upstream_http2_can_be_required_or_refused() {
    // `always` over plain HTTP: HTTP/2 with prior knowledge (h2c), streams included.
    let emu = Emulator::start().await;
    let gw = Gateway::start(&emu.url(), "[upstream]\nhttp2 = \"always\"\n").await;
    let r = gw.get("/inspect").await;
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["version"], "HTTP/2.0");
    let r = gw.chat(&[]).await;
    assert_eq!(r.status, 200);
    assert_streams_to_the_end(&gw).await;

    // `never` over TLS: ALPN offers HTTP/1.1 only, though the upstream speaks h2.
    let (_emu, gw) = gateway_to_tls_emulator("http2 = \"never\"\n").await;
    let r = gw.get("/inspect").await;
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["version"], "HTTP/1.1");
}

#[tokio::test]
async fn auto_carries_64_requests_in_flight_over_http1_and_more_over_h2() {
    let (_emu, gw) = gateway_to_tls_emulator("").await;
    // 64 streamed completions held open: the upstream pauses after their first event.
    let client = http1();
    let mut held = Vec::new();
    for _ in 0..64 {
        let resp = post_json(
            &client,
            gw.url("/v1/chat/completions"),
            &[("x-emu-stream-interval-ms", "30000")],
            Bytes::from_static(br#"{"model":"m","stream":true,"messages":[]}"#),
        )
        .await;
        assert_eq!(resp.status(), 200);
        held.push(resp);
    }
    let r = gw.get("/inspect").await;
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        r.json()["version"],
        "HTTP/2.0",
        "the 65th request in flight is a stream of an h2 connection"
    );
    drop(held);
}
