//! Connections: accept (TCP_NODELAY, optional TLS with ALPN h2/http1.1), sniff the first
//! request head for `x-emu-malformed`, then hand the socket to hyper's auto builder
//! (HTTP/1.1 or h2 prior knowledge) through [`Io`], which can turn the close into an RST.

use std::future::Future;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::service::{self, State};

/// The response `x-emu-malformed` gets: not HTTP.
const GARBAGE: &[u8] = b"HTTP/1.1 abc garbage\r\n\r\n";
/// Sniffing gives up looking for the end of the first request head after this many bytes.
const SNIFF_LIMIT: usize = 16 * 1024;
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Per-connection switches the service can flip.
#[derive(Default)]
pub struct ConnCtl {
    abort: AtomicBool,
}

impl ConnCtl {
    /// Close this connection with an RST instead of a FIN when hyper drops it.
    pub fn abort(&self) {
        self.abort.store(true, Ordering::Relaxed);
    }
}

pub fn tls_acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, String> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
    };
    let cert_pem = read(cert)?;
    let certs = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: no PEM certificate: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no PEM certificate", cert.display()));
    }
    let key = PrivateKeyDer::from_pem_slice(&read(key)?)
        .map_err(|e| format!("{}: no PEM private key: {e}", key.display()))?;
    let mut config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("TLS certificate and key do not fit together: {e}"))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Accepts until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    state: Arc<State>,
    shutdown: impl Future<Output = ()>,
) {
    let mut http = auto::Builder::new(TokioExecutor::new());
    http.http2().max_concurrent_streams(1024);
    let http = Arc::new(http);
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            () = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(err) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    eprintln!("ezlink-emulator: accept failed: {err}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        state.connection_accepted();
        let (tls, state, http) = (tls.clone(), Arc::clone(&state), Arc::clone(&http));
        tokio::spawn(async move {
            match tls {
                None => connection(stream, state, &http).await,
                Some(tls) => {
                    let handshake = tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, tls.accept(stream));
                    if let Ok(Ok(stream)) = handshake.await {
                        connection(stream, state, &http).await;
                    }
                }
            }
        });
    }
}

async fn connection<S: Socket>(
    mut socket: S,
    state: Arc<State>,
    http: &auto::Builder<TokioExecutor>,
) {
    let prefix = match sniff(&mut socket).await {
        Ok(Sniffed::Pass(prefix)) => prefix,
        Ok(Sniffed::Malformed(head)) => return malformed(socket, &head, &state).await,
        Err(_) => return,
    };
    let ctl = Arc::new(ConnCtl::default());
    let io = Io {
        inner: socket,
        prefix,
        ctl: Arc::clone(&ctl),
    };
    let service =
        service_fn(move |request| service::handle(Arc::clone(&state), Arc::clone(&ctl), request));
    // Connection errors (client gone, emulated aborts) are the normal course here.
    // With upgrades: `/v1/realtime` turns its connection into a WebSocket.
    let _ = http
        .serve_connection_with_upgrades(TokioIo::new(io), service)
        .await;
}

enum Sniffed {
    /// Bytes already read, to be replayed to hyper.
    Pass(Bytes),
    /// The first request head asks for `x-emu-malformed`.
    Malformed(Bytes),
}

/// Reads until the first request head is complete (the h2 preface counts as one).
async fn sniff<S: AsyncRead + Unpin>(socket: &mut S) -> io::Result<Sniffed> {
    let mut buf = BytesMut::with_capacity(4096);
    loop {
        let searched = buf.len().saturating_sub(3);
        if socket.read_buf(&mut buf).await? == 0 {
            return Ok(Sniffed::Pass(buf.freeze()));
        }
        if let Some(end) = find(&buf[searched..], b"\r\n\r\n") {
            let head = &buf[..searched + end];
            return Ok(if asks_malformed(head) {
                Sniffed::Malformed(buf.freeze())
            } else {
                Sniffed::Pass(buf.freeze())
            });
        }
        if buf.len() >= SNIFF_LIMIT {
            return Ok(Sniffed::Pass(buf.freeze()));
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn asks_malformed(head: &[u8]) -> bool {
    const NAME: &[u8] = b"x-emu-malformed:";
    head.split(|&b| b == b'\n').skip(1).any(|line| {
        line.len() >= NAME.len() && line[..NAME.len()].eq_ignore_ascii_case(NAME) && {
            let value = line[NAME.len()..].trim_ascii();
            !(value == b"0" || value.eq_ignore_ascii_case(b"false"))
        }
    })
}

/// Logs the request, writes [`GARBAGE`], closes, and waits briefly for the client to
/// leave (closing with unread input would turn our FIN into an RST).
async fn malformed<S: Socket>(mut socket: S, head: &[u8], state: &State) {
    let text = String::from_utf8_lossy(head);
    let mut lines = text.split("\r\n");
    let mut request_line = lines.next().unwrap_or_default().split(' ');
    let method = request_line.next().unwrap_or_default();
    let uri = request_line.next().unwrap_or_default();
    let headers = lines
        .take_while(|line| !line.is_empty())
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
        .collect();
    let guard = state.log.record_raw(method, uri, headers);
    if socket.write_all(GARBAGE).await.is_ok() && socket.shutdown().await.is_ok() {
        guard.complete();
        let mut sink = [0u8; 4096];
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while matches!(socket.read(&mut sink).await, Ok(n) if n > 0) {}
        })
        .await;
    }
}

/// A socket hyper can serve and the emulator can reset.
pub trait Socket: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// Make the coming close an RST.
    fn zero_linger(&self);
}

impl Socket for TcpStream {
    fn zero_linger(&self) {
        let _ = self.set_zero_linger();
    }
}

impl Socket for TlsStream<TcpStream> {
    fn zero_linger(&self) {
        let _ = self.get_ref().0.set_zero_linger();
    }
}

/// The socket as hyper sees it: the sniffed bytes first, then the socket itself.
struct Io<S: Socket> {
    inner: S,
    prefix: Bytes,
    ctl: Arc<ConnCtl>,
}

impl<S: Socket> Drop for Io<S> {
    fn drop(&mut self) {
        if self.ctl.abort.load(Ordering::Relaxed) {
            self.inner.zero_linger();
        }
    }
}

impl<S: Socket> AsyncRead for Io<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.prefix.is_empty() {
            return Pin::new(&mut self.inner).poll_read(cx, buf);
        }
        let n = self.prefix.len().min(buf.remaining());
        buf.put_slice(&self.prefix[..n]);
        self.prefix.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<S: Socket> AsyncWrite for Io<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
