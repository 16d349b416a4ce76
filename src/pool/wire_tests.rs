//! ezgate's HTTP/1.1 client against upstreams that answer in every shape RFC 9112 allows,
//! and some it does not: each test's upstream reads a request and writes bytes it is given.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::uri::PathAndQuery;
use http::{Method, Request};
use http_body::Body as _;
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::pool::tests::pool;
use crate::pool::{Malformed, Pool, RequestBody};

/// One answer of a scripted upstream: written in these pieces (a pause between them), then
/// the connection closed if `close`.
struct Answer {
    pieces: Vec<&'static [u8]>,
    close: bool,
}

fn answer(pieces: &[&'static [u8]]) -> Answer {
    Answer {
        pieces: pieces.to_vec(),
        close: false,
    }
}

fn answer_and_close(pieces: &[&'static [u8]]) -> Answer {
    Answer {
        pieces: pieces.to_vec(),
        close: true,
    }
}

/// What a scripted upstream saw: the requests (head and body, as sent) and its connections.
#[derive(Clone, Default)]
struct Seen {
    requests: Arc<Mutex<Vec<String>>>,
    accepted: Arc<AtomicUsize>,
}

/// An upstream that answers each request it reads with the next of `answers`, on whichever
/// connection it arrives. `read_body`: read the request's body before answering.
async fn scripted(answers: Vec<Answer>, read_body: bool) -> (Pool, Seen) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let seen = Seen::default();
    let answers = Arc::new(Mutex::new(VecDeque::from(answers)));
    let s = seen.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            s.accepted.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(serve(tcp, Arc::clone(&answers), s.clone(), read_body));
        }
    });
    (pool(&base, Duration::from_secs(30)), seen)
}

async fn serve(
    mut tcp: TcpStream,
    answers: Arc<Mutex<VecDeque<Answer>>>,
    seen: Seen,
    read_body: bool,
) {
    let mut buf = Vec::new();
    loop {
        let Some(request) = read_request(&mut tcp, &mut buf, read_body).await else {
            return;
        };
        seen.requests.lock().unwrap().push(request);
        let Some(a) = answers.lock().unwrap().pop_front() else {
            return;
        };
        for (i, piece) in a.pieces.iter().enumerate() {
            if i > 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if tcp.write_all(piece).await.is_err() {
                return;
            }
        }
        if a.close {
            return;
        }
    }
}

/// Reads one request: its head, then a `content-length` or chunked body.
async fn read_request(tcp: &mut TcpStream, buf: &mut Vec<u8>, read_body: bool) -> Option<String> {
    let mut chunk = [0u8; 16 * 1024];
    let head_end = loop {
        if let Some(i) = memchr::memmem::find(buf, b"\r\n\r\n") {
            break i + 4;
        }
        let n = tcp.read(&mut chunk).await.ok().filter(|&n| n > 0)?;
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let end = if !read_body {
        head_end
    } else if let Some(len) = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
    {
        head_end + len.trim().parse::<usize>().unwrap()
    } else if head.contains("transfer-encoding: chunked") {
        loop {
            if let Some(i) = memchr::memmem::find(&buf[head_end..], b"0\r\n\r\n") {
                break head_end + i + 5;
            }
            let n = tcp.read(&mut chunk).await.ok().filter(|&n| n > 0)?;
            buf.extend_from_slice(&chunk[..n]);
        }
    } else {
        head_end
    };
    while buf.len() < end {
        let n = tcp.read(&mut chunk).await.ok().filter(|&n| n > 0)?;
        buf.extend_from_slice(&chunk[..n]);
    }
    let request = String::from_utf8_lossy(&buf[..end]).into_owned();
    buf.drain(..end);
    Some(request)
}

fn post(body: &'static [u8]) -> Request<RequestBody> {
    let mut req = Request::new(RequestBody::full(Bytes::from_static(body)));
    *req.method_mut() = Method::POST;
    req
}

/// Sends `req`; the response's status, body and trailers, or the error.
async fn exchange(
    pool: &Pool,
    req: Request<RequestBody>,
) -> Result<(u16, String, Option<http::HeaderMap>), crate::errors::BoxError> {
    let resp = pool
        .send(req, PathAndQuery::from_static("/v1/x"), None)
        .await?;
    let status = resp.status().as_u16();
    let collected = resp.into_body().collect().await?;
    let trailers = collected.trailers().cloned();
    let body = String::from_utf8(collected.to_bytes().to_vec()).unwrap();
    Ok((status, body, trailers))
}

#[tokio::test]
async fn the_request_goes_out_with_its_length_host_and_headers_and_not_the_clients_framing() {
    let ok: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
    let (pool, seen) = scripted(vec![answer(&[ok]), answer(&[ok])], true).await;
    let mut req = post(b"{\"a\":1}");
    req.headers_mut()
        .insert("transfer-encoding", "chunked".parse().unwrap());
    req.headers_mut()
        .insert("host", "client.example".parse().unwrap());
    req.headers_mut().insert("x-kept", "yes".parse().unwrap());
    assert_eq!(exchange(&pool, req).await.unwrap().1, "ok");
    let mut get = Request::new(RequestBody::full(Bytes::new()));
    *get.method_mut() = Method::GET;
    assert_eq!(exchange(&pool, get).await.unwrap().1, "ok");
    let requests = seen.requests.lock().unwrap().clone();
    let host = format!("host: {}\r\n", pool.authority);
    assert!(
        requests[0].starts_with("POST /v1/x HTTP/1.1\r\n"),
        "{}",
        requests[0]
    );
    assert!(requests[0].contains(&host), "{}", requests[0]);
    assert!(
        requests[0].contains("content-length: 7\r\n"),
        "{}",
        requests[0]
    );
    assert!(requests[0].contains("x-kept: yes\r\n"), "{}", requests[0]);
    assert!(
        requests[0].ends_with("\r\n\r\n{\"a\":1}"),
        "{}",
        requests[0]
    );
    for r in &requests {
        assert!(!r.contains("transfer-encoding"), "{r}");
        assert!(!r.contains("client.example"), "{r}");
    }
    // A GET without a body says nothing of one.
    assert!(!requests[1].contains("content-length"), "{}", requests[1]);
    assert_eq!(
        seen.accepted.load(Ordering::SeqCst),
        1,
        "one connection, reused"
    );
}

#[tokio::test]
async fn chunked_bodies_with_extensions_and_trailers_arrive_whole_in_pieces() {
    let (pool, seen) = scripted(
        vec![
            answer(&[
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5;ext=\"a\"\r\nhel",
                b"lo\r\n",
                b"6\r\n world\r\n0\r\nx-trailer: t\r\n\r\n",
            ]),
            answer(&[
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, CHUNKED\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            ]),
        ],
        true,
    )
    .await;
    let (status, body, trailers) = exchange(&pool, post(b"x")).await.unwrap();
    assert_eq!((status, body.as_str()), (200, "hello world"));
    assert_eq!(trailers.unwrap()["x-trailer"], "t");
    assert_eq!(exchange(&pool, post(b"x")).await.unwrap().1, "abc");
    assert_eq!(
        seen.accepted.load(Ordering::SeqCst),
        1,
        "both on one connection"
    );
    assert_eq!(pool.idle_count(), 1);
}

#[tokio::test]
async fn a_head_split_anywhere_and_interim_answers_are_read_through() {
    let (pool, seen) = scripted(
        vec![
            answer(&[
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTT",
                b"P/1.1 201 Created\r\ncontent-le",
                b"ngth: 5\r\nx-a: 1\r\nx-a: 2\r\n\r\n12",
                b"345",
            ]),
            answer(&[b"HTTP/1.1 204 No Content\r\ncontent-length: 99\r\n\r\n"]),
            answer(&[b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\n"]),
            answer(&[b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"]),
        ],
        true,
    )
    .await;
    let resp = pool
        .send(post(b"x"), PathAndQuery::from_static("/"), None)
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let values: Vec<_> = resp.headers().get_all("x-a").iter().collect();
    assert_eq!(values, ["1", "2"]);
    assert_eq!(
        resp.into_body().collect().await.unwrap().to_bytes(),
        "12345"
    );
    // No body after a 204, nor after a HEAD request's answer, whatever their length says.
    assert_eq!(
        exchange(&pool, post(b"x")).await.unwrap(),
        (204, String::new(), None)
    );
    let mut head = Request::new(RequestBody::full(Bytes::new()));
    *head.method_mut() = Method::HEAD;
    let resp = pool
        .send(head, PathAndQuery::from_static("/"), None)
        .await
        .unwrap();
    assert!(resp.body().is_end_stream());
    drop(resp);
    assert_eq!(exchange(&pool, post(b"x")).await.unwrap().1, "ok");
    assert_eq!(
        seen.accepted.load(Ordering::SeqCst),
        1,
        "all on one connection"
    );
}

#[tokio::test]
async fn every_header_of_a_long_head_arrives_in_order() {
    let mut head = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n".to_vec();
    for i in 0..98 {
        head.extend_from_slice(format!("x-h{}: v{i}\r\n", i % 40).as_bytes());
    }
    head.extend_from_slice(b"\r\nok");
    let head: &'static [u8] = Box::leak(head.into_boxed_slice());
    let (pool, _) = scripted(vec![answer(&[head])], true).await;
    let resp = pool
        .send(post(b"x"), PathAndQuery::from_static("/"), None)
        .await
        .unwrap();
    assert_eq!(resp.headers().len(), 99);
    let h7: Vec<_> = resp.headers().get_all("x-h7").iter().collect();
    assert_eq!(h7, ["v7", "v47", "v87"]);
    assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), "ok");
}

#[tokio::test]
async fn a_body_to_the_close_or_a_close_asked_for_leaves_its_connection_unpooled() {
    let (pool, seen) = scripted(
        vec![
            answer_and_close(&[b"HTTP/1.1 200 OK\r\n\r\nuntil", b" the end"]),
            answer(&[b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 1\r\n\r\na"]),
            answer(&[b"HTTP/1.0 200 OK\r\ncontent-length: 1\r\n\r\nb"]),
            answer(&[
                b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ntransfer-encoding: chunked\r\n\r\n",
                b"1\r\nc\r\n0\r\n\r\n",
            ]),
            answer(&[b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\ndextra"]),
            answer(&[b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"]),
        ],
        true,
    )
    .await;
    for expected in ["until the end", "a", "b", "c", "d", "ok"] {
        let resp = pool
            .send(post(b"x"), PathAndQuery::from_static("/"), None)
            .await
            .unwrap();
        if expected == "c" {
            // The coding overrides the length, which is not passed on.
            assert!(!resp.headers().contains_key("content-length"));
        }
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, expected);
    }
    assert_eq!(
        seen.accepted.load(Ordering::SeqCst),
        6,
        "each on its own connection"
    );
}

#[tokio::test]
async fn malformed_answers_are_malformed_errors() {
    let mut many = b"HTTP/1.1 200 OK\r\n".to_vec();
    for i in 0..101 {
        many.extend_from_slice(format!("x-{i}: 1\r\n").as_bytes());
    }
    many.extend_from_slice(b"\r\n");
    let huge = [b"HTTP/1.1 200 OK\r\nx: ".to_vec(), vec![b'a'; 500 * 1024]].concat();
    let leak = |v: Vec<u8>| -> &'static [u8] { Box::leak(v.into_boxed_slice()) };
    for bad in [
        leak(many),
        leak(huge),
        &b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\na"[..],
        b"HTTP/1.1 200 OK\r\ncontent-length: +1\r\n\r\na",
        b"HTTP/1.1 200 OK\r\ncontent-length: \r\n\r\na",
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
        b"SSH-2.0-OpenSSH\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nbad name: x\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n1\r\nab\r\n",
    ] {
        let (pool, _) = scripted(vec![answer(&[bad])], true).await;
        let err = exchange(&pool, post(b"x")).await.unwrap_err();
        assert!(
            err.is::<Malformed>(),
            "{:?}: {err}",
            String::from_utf8_lossy(&bad[..bad.len().min(120)])
        );
    }
}

#[tokio::test]
async fn a_connection_closed_before_the_answer_ends_is_an_error() {
    for cut in [
        &b""[..],
        b"HTTP/1.1 200 OK\r\ncontent-",
        b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nab",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nab\r\n",
    ] {
        let (pool, _) = scripted(vec![answer_and_close(&[cut])], true).await;
        let err = exchange(&pool, post(b"x")).await.unwrap_err();
        let io = err.downcast_ref::<std::io::Error>();
        assert_eq!(
            io.map(std::io::Error::kind),
            Some(std::io::ErrorKind::UnexpectedEof),
            "{:?}: {err}",
            String::from_utf8_lossy(cut)
        );
        assert_eq!(pool.idle_count(), 0);
    }
}

#[tokio::test]
async fn an_answer_to_a_body_the_upstream_will_not_read_is_read_and_its_connection_dropped() {
    // The upstream answers after the head, never reading the 8 MiB body.
    let (pool, seen) = scripted(
        vec![answer(&[
            b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 8\r\n\r\ntoo big!",
        ])],
        false,
    )
    .await;
    let body = Bytes::from(vec![b'x'; 8 << 20]);
    let mut req = Request::new(RequestBody::full(body));
    *req.method_mut() = Method::POST;
    let (status, body, _) = tokio::time::timeout(Duration::from_secs(10), exchange(&pool, req))
        .await
        .expect("the answer was read while the body could not be written")
        .unwrap();
    assert_eq!((status, body.as_str()), (413, "too big!"));
    assert_eq!(
        pool.idle_count(),
        0,
        "a connection with a half-sent request is dropped"
    );
    assert_eq!(seen.accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn an_upstream_that_answers_while_it_reads_gets_the_whole_body() {
    // An echo: each frame of the request body goes back as it arrives, so the answer starts
    // long before the request ends, and the request must go on being written.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async {
                    Ok::<_, std::convert::Infallible>(http::Response::new(req.into_body()))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    let pool = pool(&base, Duration::from_secs(30));
    let body: Vec<u8> = (0..6u32 << 20).map(|i| (i % 251) as u8).collect();
    for _ in 0..2 {
        let req = Request::new(RequestBody::full(Bytes::from(body.clone())));
        let resp = tokio::time::timeout(
            Duration::from_secs(20),
            pool.send(req, PathAndQuery::from_static("/echo"), None),
        )
        .await
        .expect("the answer began")
        .unwrap();
        let echoed = tokio::time::timeout(Duration::from_secs(20), resp.into_body().collect())
            .await
            .expect("the whole body was echoed")
            .unwrap()
            .to_bytes();
        assert!(echoed == body, "the echo differs");
        assert_eq!(pool.idle_count(), 1, "request and answer ended: pooled");
    }
}

/// The response timeout: on a pooled connection its timer is moved to each exchange's
/// deadline (the first answer came in time; the second, never sent, times out on the same
/// connection); a new connection's exchange times out the same way.
#[tokio::test]
async fn an_answer_that_does_not_come_by_the_deadline_times_out_on_a_reused_connection() {
    use crate::pool::ResponseTimedOut;
    use tokio::time::Instant;

    let ok: &'static [u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
    let (pool, seen) = scripted(vec![answer(&[ok]), answer(&[])], false).await;
    let path = || PathAndQuery::from_static("/v1/x");
    let soon = || Some(Instant::now() + Duration::from_millis(200));
    // Sent with a deadline on a new connection, answered in time, then the connection idles
    // past that deadline in the pool: its timer fires there, harmlessly.
    let resp = pool.send(post(b"{}"), path(), soon()).await.unwrap();
    assert_eq!(resp.status(), 200);
    resp.into_body().collect().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Taken from the pool; the reset timer is the new deadline's.
    let sent = Instant::now();
    let Err(err) = within_5s(pool.send(post(b"{}"), path(), soon())).await else {
        panic!("an answer that never came");
    };
    assert!(err.is::<ResponseTimedOut>(), "{err}");
    assert!(sent.elapsed() >= Duration::from_millis(200));
    assert_eq!(
        seen.accepted.load(Ordering::SeqCst),
        1,
        "the connection was reused"
    );
    assert_eq!(seen.requests.lock().unwrap().len(), 2);
    // No answer on a new connection either: the same error.
    let (pool, _) = scripted(vec![answer(&[])], false).await;
    let Err(err) = within_5s(pool.send(post(b"{}"), path(), soon())).await else {
        panic!("an answer that never came");
    };
    assert!(err.is::<ResponseTimedOut>(), "{err}");
}

/// A deadline that passed ends the exchange even when the task's budget is used up: an
/// upstream that keeps the reads busy (a stream of `1xx` answers) cannot hide it.
#[tokio::test]
async fn a_passed_deadline_ends_the_exchange_whatever_the_tasks_budget() {
    use crate::pool::ResponseTimedOut;
    use std::future::Future;
    use tokio::task::coop::{consume_budget, has_budget_remaining};
    use tokio::time::Instant;

    let ok: &'static [u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
    let (pool, seen) = scripted(vec![answer(&[ok]), answer(&[])], false).await;
    let path = || PathAndQuery::from_static("/v1/x");
    let resp = pool.send(post(b"{}"), path(), None).await.unwrap();
    resp.into_body().collect().await.unwrap();
    // On the pooled connection, sent with a deadline that passes while nothing arrives.
    let soon = Instant::now() + Duration::from_millis(10);
    let mut sending = Box::pin(pool.send(post(b"{}"), path(), Some(soon)));
    let first = std::future::poll_fn(|cx| std::task::Poll::Ready(sending.as_mut().poll(cx))).await;
    assert!(first.is_pending());
    tokio::time::sleep(Duration::from_millis(50)).await;
    // Polled again with the task's budget used up.
    let polled = std::future::poll_fn(|cx| {
        while has_budget_remaining() {
            let _ = std::pin::pin!(consume_budget()).poll(cx);
        }
        std::task::Poll::Ready(sending.as_mut().poll(cx))
    })
    .await;
    let std::task::Poll::Ready(Err(err)) = polled else {
        panic!("a passed deadline went unseen with the budget used up");
    };
    assert!(err.is::<ResponseTimedOut>(), "{err}");
    assert_eq!(
        seen.accepted.load(Ordering::SeqCst),
        1,
        "the connection was reused"
    );
}

/// `f`'s output, failing the test if the deadline it was given did not end it.
async fn within_5s<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(5), f)
        .await
        .expect("the exchange outlived its deadline")
}
