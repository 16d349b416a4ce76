//! A small Redis client for shared limits: one multiplexed connection per gateway, commands
//! pipelined (every command waiting when the writer runs goes out in one write), RESP2,
//! `redis://` or `rediss://` (rustls), optional `AUTH` and `SELECT`, reconnect with backoff.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, Mutex};

use crate::config::RedisTarget;

/// A RESP2 reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Status(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Reply>>),
}

impl Reply {
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Reply::Int(i) => Some(*i),
            Reply::Bulk(Some(b)) => std::str::from_utf8(b).ok()?.parse().ok(),
            _ => None,
        }
    }
}

type Pending = oneshot::Sender<Result<Reply, String>>;

/// A live connection: commands go to its task, replies come back in order.
struct Conn {
    tx: mpsc::UnboundedSender<(Vec<u8>, Pending)>,
}

pub struct Client {
    target: RedisTarget,
    tls: Option<tokio_rustls::TlsConnector>,
    connect_timeout: Duration,
    conn: Mutex<Option<Conn>>,
    /// After a failed connect, no new attempt before this instant.
    retry_at: std::sync::Mutex<Option<Instant>>,
}

const RECONNECT_BACKOFF: Duration = Duration::from_millis(500);

impl Client {
    pub fn new(
        target: RedisTarget,
        tls: Option<rustls::ClientConfig>,
        connect_timeout: Duration,
    ) -> Client {
        Client {
            target,
            tls: tls.map(|c| tokio_rustls::TlsConnector::from(Arc::new(c))),
            connect_timeout,
            conn: Mutex::new(None),
            retry_at: std::sync::Mutex::new(None),
        }
    }

    /// Sends one command; the caller bounds the wait with its own timeout.
    pub async fn call(&self, args: &[&[u8]]) -> Result<Reply, String> {
        let tx = self.sender().await?;
        let (done, reply) = oneshot::channel();
        tx.send((encode(args), done))
            .map_err(|_| "connection closed".to_owned())?;
        reply.await.map_err(|_| "connection closed".to_owned())?
    }

    async fn sender(&self) -> Result<mpsc::UnboundedSender<(Vec<u8>, Pending)>, String> {
        let mut conn = self.conn.lock().await;
        if let Some(c) = conn.as_ref() {
            if !c.tx.is_closed() {
                return Ok(c.tx.clone());
            }
        }
        {
            let retry = self.retry_at.lock().unwrap_or_else(|p| p.into_inner());
            if retry.is_some_and(|t| Instant::now() < t) {
                return Err("not connected (reconnecting)".into());
            }
        }
        match tokio::time::timeout(self.connect_timeout, self.connect()).await {
            Ok(Ok(c)) => {
                let tx = c.tx.clone();
                *conn = Some(c);
                Ok(tx)
            }
            failed => {
                *self.retry_at.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some(Instant::now() + RECONNECT_BACKOFF);
                *conn = None;
                Err(match failed {
                    Ok(Err(e)) => e,
                    _ => format!("no connection within {:?}", self.connect_timeout),
                })
            }
        }
    }

    async fn connect(&self) -> Result<Conn, String> {
        let t = &self.target;
        let tcp = tokio::net::TcpStream::connect((t.host.as_str(), t.port))
            .await
            .map_err(|e| format!("connect {}:{}: {e}", t.host, t.port))?;
        let _ = tcp.set_nodelay(true);
        let (tx, rx) = mpsc::unbounded_channel();
        match &self.tls {
            Some(tls) => {
                let name = rustls::pki_types::ServerName::try_from(t.host.clone())
                    .map_err(|e| format!("TLS name {}: {e}", t.host))?;
                let stream = tls
                    .connect(name, tcp)
                    .await
                    .map_err(|e| format!("TLS handshake with {}: {e}", t.host))?;
                tokio::spawn(run(stream, rx));
            }
            None => {
                tokio::spawn(run(tcp, rx));
            }
        }
        let conn = Conn { tx };
        let call = |args: Vec<Vec<u8>>| {
            let (done, reply) = oneshot::channel();
            let refs: Vec<&[u8]> = args.iter().map(Vec::as_slice).collect();
            let sent = conn.tx.send((encode(&refs), done));
            async move {
                sent.map_err(|_| "connection closed".to_owned())?;
                match reply.await.map_err(|_| "connection closed".to_owned())?? {
                    Reply::Error(e) => Err(e),
                    r => Ok(r),
                }
            }
        };
        if let Some(password) = &t.password {
            let mut args = vec![b"AUTH".to_vec()];
            if let Some(user) = &t.username {
                args.push(user.clone().into_bytes());
            }
            args.push(password.clone().into_bytes());
            call(args).await.map_err(|e| format!("AUTH refused: {e}"))?;
        }
        if t.db != 0 {
            call(vec![b"SELECT".to_vec(), t.db.to_string().into_bytes()])
                .await
                .map_err(|e| format!("SELECT {}: {e}", t.db))?;
        }
        Ok(conn)
    }
}

/// The connection task: writes every queued command in one batch, reads replies in order.
async fn run<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    mut rx: mpsc::UnboundedReceiver<(Vec<u8>, Pending)>,
) {
    let (mut reader, mut writer) = tokio::io::split(stream);
    let mut pending: VecDeque<Pending> = VecDeque::new();
    let mut buf = BytesMut::with_capacity(4096);
    let mut out = Vec::with_capacity(4096);
    let failure = loop {
        tokio::select! {
            cmd = rx.recv() => {
                let Some((bytes, done)) = cmd else { break "client dropped".to_owned() };
                out.clear();
                out.extend_from_slice(&bytes);
                pending.push_back(done);
                while let Ok((bytes, done)) = rx.try_recv() {
                    out.extend_from_slice(&bytes);
                    pending.push_back(done);
                }
                if let Err(e) = writer.write_all(&out).await {
                    break format!("write: {e}");
                }
            }
            read = reader.read_buf(&mut buf) => {
                match read {
                    Ok(0) => break "server closed the connection".to_owned(),
                    Err(e) => break format!("read: {e}"),
                    Ok(_) => {}
                }
                loop {
                    match parse(&buf) {
                        Ok(Some((reply, used))) => {
                            buf.advance(used);
                            if let Some(done) = pending.pop_front() {
                                let _ = done.send(Ok(reply));
                            }
                        }
                        Ok(None) => break,
                        Err(e) => {
                            for done in pending.drain(..) {
                                let _ = done.send(Err(e.clone()));
                            }
                            return;
                        }
                    }
                }
            }
        }
    };
    for done in pending.drain(..) {
        let _ = done.send(Err(failure.clone()));
    }
}

fn encode(args: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + args.iter().map(|a| a.len() + 16).sum::<usize>());
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Parses one reply from the front of `buf`: `Ok(None)` when more bytes are needed.
pub fn parse(buf: &[u8]) -> Result<Option<(Reply, usize)>, String> {
    let Some(line_end) = buf.windows(2).position(|w| w == b"\r\n") else {
        return Ok(None);
    };
    if line_end == 0 {
        return Err("protocol error: empty reply header".to_owned());
    }
    let Some(&kind) = buf.first() else {
        return Ok(None);
    };
    let line = std::str::from_utf8(&buf[1..line_end])
        .map_err(|_| "protocol error: non-UTF-8 header".to_owned())?;
    let after = line_end + 2;
    let int = || {
        line.parse::<i64>()
            .map_err(|_| format!("protocol error: bad length {line:?}"))
    };
    match kind {
        b'+' => Ok(Some((Reply::Status(line.to_owned()), after))),
        b'-' => Ok(Some((Reply::Error(line.to_owned()), after))),
        b':' => Ok(Some((Reply::Int(int()?), after))),
        b'$' => {
            let n = int()?;
            if n < 0 {
                return Ok(Some((Reply::Bulk(None), after)));
            }
            let n = usize::try_from(n).map_err(|_| "protocol error".to_owned())?;
            if buf.len() < after + n + 2 {
                return Ok(None);
            }
            Ok(Some((
                Reply::Bulk(Some(buf[after..after + n].to_vec())),
                after + n + 2,
            )))
        }
        b'*' => {
            let n = int()?;
            if n < 0 {
                return Ok(Some((Reply::Array(None), after)));
            }
            let mut items = Vec::with_capacity(usize::try_from(n).unwrap_or(0).min(1024));
            let mut pos = after;
            for _ in 0..n {
                match parse(&buf[pos..])? {
                    Some((item, used)) => {
                        items.push(item);
                        pos += used;
                    }
                    None => return Ok(None),
                }
            }
            Ok(Some((Reply::Array(Some(items)), pos)))
        }
        other => Err(format!("protocol error: unexpected byte {other:#x}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_replies_and_waits_for_more() {
        assert_eq!(
            parse(b"+OK\r\n").unwrap(),
            Some((Reply::Status("OK".into()), 5))
        );
        assert_eq!(parse(b":-3\r\n").unwrap(), Some((Reply::Int(-3), 5)));
        assert_eq!(
            parse(b"$3\r\nabc\r\n").unwrap(),
            Some((Reply::Bulk(Some(b"abc".to_vec())), 9))
        );
        assert_eq!(parse(b"$-1\r\n").unwrap(), Some((Reply::Bulk(None), 5)));
        assert_eq!(parse(b"$3\r\nab").unwrap(), None);
        let arr = b"*2\r\n:1\r\n$2\r\nhi\r\n";
        assert_eq!(
            parse(arr).unwrap(),
            Some((
                Reply::Array(Some(vec![Reply::Int(1), Reply::Bulk(Some(b"hi".to_vec()))])),
                arr.len()
            ))
        );
        assert_eq!(parse(&arr[..10]).unwrap(), None);
        assert!(parse(b"?x\r\n").is_err());
        assert!(parse(b"\r\n").is_err());
        assert_eq!(
            parse(b"-NOSCRIPT No matching script\r\n")
                .unwrap()
                .unwrap()
                .0,
            Reply::Error("NOSCRIPT No matching script".into())
        );
    }

    #[test]
    fn encodes_commands() {
        assert_eq!(encode(&[b"GET", b"k"]), b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n");
    }
}
