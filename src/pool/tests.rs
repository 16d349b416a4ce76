//! Local upstreams, and pools that dial them, for the tests of every file of the pool; and
//! the tests of connecting.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::AtomicUsize;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::client::conn::http1;
use tokio::net::TcpListener;

use super::*;

#[test]
fn connection_tasks_are_not_sized_for_tls() {
    // One of these is held per open stream with an HTTP/1.1 upstream (1,752 bytes with the
    // connector's stream inline).
    let h1 = std::mem::size_of::<http1::Connection<UpstreamIo, RequestBody>>();
    assert!(h1 <= 1024, "HTTP/1.1 connection future is {h1} bytes");
}

/// An HTTP/1.1 upstream that counts the connections it accepted. `close` answers with
/// `Connection: close`; a path `/big` answers 1 MiB.
pub(super) async fn upstream(close: bool) -> (String, Arc<AtomicUsize>) {
    upstream_with(close, None).await
}

/// A local upstream: each accepted connection is counted and handed to `serve`.
async fn counting_upstream<F, Fut>(serve: F) -> (String, Arc<AtomicUsize>)
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&accepted);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(serve(tcp));
        }
    });
    (format!("http://{addr}"), accepted)
}

/// As [`upstream`]; `idle_close` closes keep-alive connections idle that long.
pub(super) async fn upstream_with(
    close: bool,
    idle_close: Option<Duration>,
) -> (String, Arc<AtomicUsize>) {
    counting_upstream(move |tcp| async move {
        let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
            let big = req.uri().path() == "/big";
            let _ = req.into_body().collect().await;
            let body = if big {
                Bytes::from(vec![b'x'; 1 << 20])
            } else {
                Bytes::from_static(b"{\"ok\":true}")
            };
            Ok::<_, std::convert::Infallible>(Response::new(http_body_util::Full::new(body)))
        });
        let mut b = hyper::server::conn::http1::Builder::new();
        b.keep_alive(!close);
        if let Some(idle) = idle_close {
            b.timer(TokioTimer::new()).header_read_timeout(idle);
        }
        let _ = b
            .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
            .await;
    })
    .await
}

/// A body that sends one byte, then ends after `hold`.
struct Held {
    first: bool,
    hold: Pin<Box<tokio::time::Sleep>>,
}

impl Body for Held {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.first {
            self.first = false;
            return Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"x")))));
        }
        self.hold.as_mut().poll(cx).map(|()| None)
    }
}

/// An h2c upstream (prior knowledge) that allows `max_streams` at once and counts its
/// connections; each response body lasts 300 ms.
pub(super) async fn upstream_h2(max_streams: u32) -> (String, Arc<AtomicUsize>) {
    counting_upstream(move |tcp| async move {
        let svc = hyper::service::service_fn(|_req: Request<Incoming>| async move {
            Ok::<_, std::convert::Infallible>(Response::new(Held {
                first: true,
                hold: Box::pin(tokio::time::sleep(Duration::from_millis(300))),
            }))
        });
        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .max_concurrent_streams(max_streams)
            .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
            .await;
    })
    .await
}

pub(super) fn pool(base: &str, idle_timeout: Duration) -> Pool {
    pool_with(base, idle_timeout, false)
}

pub(super) fn pool_with(base: &str, idle_timeout: Duration, http2_only: bool) -> Pool {
    let tls = crate::tls::client_tls(None).unwrap();
    build_pool(base, idle_timeout, tls, http2_only, http2_only, 0)
}

/// A pool as `upstream.rs` builds one: `offer_h2` is ALPN's h2 on `https://` (and
/// prior knowledge on `http://` when `http2_only`); `http2_above` as in [`PoolConfig`].
fn build_pool(
    base: &str,
    idle_timeout: Duration,
    tls: rustls::ClientConfig,
    http2_only: bool,
    offer_h2: bool,
    http2_above: usize,
) -> Pool {
    let uri: Uri = base.parse().unwrap();
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    let h1_only = crate::upstream::http1_connector(&tls, http.clone());
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http();
    let https = if offer_h2 && !http2_only {
        https.enable_http1().enable_http2().wrap_connector(http)
    } else {
        https.enable_http1().wrap_connector(http)
    };
    Pool::new(
        https,
        uri.scheme().unwrap().clone(),
        uri.authority().unwrap().clone(),
        PoolConfig {
            max_idle: 8,
            idle_timeout,
            http2_only,
            http2_offered: offer_h2,
            http2_above,
        },
    )
    .unwrap()
    .with_upgrades(h1_only)
}

/// A TLS upstream on 127.0.0.1, signed by a CA made here, whose ALPN offers only
/// `alpn`; it counts its connections and serves [`Held`] bodies over what ALPN chose.
/// Returns a pool that trusts the CA and offers h2 and HTTP/1.1, and the connection count.
pub(super) async fn tls_upstream(alpn: &'static [u8]) -> (Arc<Pool>, Arc<AtomicUsize>) {
    tls_upstream_with(&[alpn], 0).await
}

/// As [`tls_upstream`], the upstream's ALPN offering `alpn` (in its order of preference),
/// the pool's `http2_above` set.
pub(super) async fn tls_upstream_with(
    alpn: &[&[u8]],
    http2_above: usize,
) -> (Arc<Pool>, Arc<AtomicUsize>) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .subject_alt_names
        .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
        )
        .unwrap();
    server.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let (base, accepted) = counting_upstream(move |tcp| {
        let acceptor = acceptor.clone();
        async move {
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
            let io = hyper_util::rt::TokioIo::new(tls);
            let svc = hyper::service::service_fn(|_req: Request<Incoming>| async move {
                Ok::<_, std::convert::Infallible>(Response::new(Held {
                    first: true,
                    hold: Box::pin(tokio::time::sleep(Duration::from_millis(300))),
                }))
            });
            if h2 {
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(io, svc)
                    .await;
            } else {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, svc)
                    .await;
            }
        }
    })
    .await;
    let ca_file = std::env::temp_dir().join(format!(
        "ezgate-pool-ca-{}-{}.pem",
        std::process::id(),
        base.rsplit(':').next().unwrap_or("0")
    ));
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let tls = crate::tls::client_tls(Some(&ca_file)).unwrap();
    let _ = std::fs::remove_file(&ca_file);
    let base = base.replace("http://", "https://");
    let pool = build_pool(
        &base,
        Duration::from_secs(30),
        tls,
        false,
        true,
        http2_above,
    );
    (Arc::new(pool), accepted)
}

pub(super) async fn get(pool: &Pool, path: &'static str) -> Response<UpstreamBody> {
    let req = Request::new(RequestBody::full(Bytes::new()));
    pool.send(req, PathAndQuery::from_static(path), None)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_refused_connection_is_a_connect_error() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let pool = pool(&base, Duration::from_secs(30));
    let req = Request::new(RequestBody::full(Bytes::new()));
    let Err(err) = pool.send(req, PathAndQuery::from_static("/"), None).await else {
        panic!("a closed port answered");
    };
    assert!(err.is::<ConnectError>(), "{err}");
}

#[tokio::test]
async fn the_send_future_of_a_pooled_http1_request_is_small() {
    // Every request carries this future, and moves it into the response timeout's box: the
    // path through a new connection or an HTTP/2 stream (1.6 KiB) is boxed apart.
    let pool = pool("http://127.0.0.1:1", Duration::from_secs(1));
    let req = Request::new(RequestBody::full(Bytes::new()));
    let sending = pool.send(req, PathAndQuery::from_static("/"), None);
    let size = std::mem::size_of_val(&sending);
    assert!(size <= 512, "Pool::send's future is {size} bytes");
}
