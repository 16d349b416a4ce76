//! The relay between two real WebSocket peers (tokio-tungstenite over in-memory pipes), on
//! tokio's paused clock: timeouts fire when nothing else can happen, never by wall time.

use std::sync::{Arc, Mutex};

use futures_util::{SinkExt, StreamExt};
use tokio::io::DuplexStream;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::*;

type Peer = WebSocketStream<DuplexStream>;

const IDLE: Duration = Duration::from_secs(60);

struct Session {
    client: Peer,
    upstream: Peer,
    relay: JoinHandle<Report>,
    cut: CancellationToken,
    usage: Arc<Mutex<Vec<(u64, u64)>>>,
}

async fn session() -> Session {
    let (client_app, client_gw) = tokio::io::duplex(64 * 1024);
    let (upstream_app, upstream_gw) = tokio::io::duplex(64 * 1024);
    let cut = CancellationToken::new();
    let usage = Arc::new(Mutex::new(Vec::new()));
    let heard = Arc::clone(&usage);
    let relay = tokio::spawn(relay(
        client_gw,
        upstream_gw,
        IDLE,
        cut.clone(),
        move |i, o| heard.lock().unwrap().push((i, o)),
    ));
    Session {
        client: WebSocketStream::from_raw_socket(client_app, Role::Client, None).await,
        upstream: WebSocketStream::from_raw_socket(upstream_app, Role::Server, None).await,
        relay,
        cut,
        usage,
    }
}

/// The next message that is not a ping or pong (tungstenite answers pings itself).
async fn next(peer: &mut Peer) -> Option<Message> {
    loop {
        match peer.next().await {
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            Some(Ok(m)) => return Some(m),
            Some(Err(_)) | None => return None,
        }
    }
}

/// Reads until the peer's close frame; returns its code and reason. The peer answers it.
async fn close_of(peer: &mut Peer) -> (CloseCode, String) {
    loop {
        match next(peer).await {
            Some(Message::Close(Some(CloseFrame { code, reason }))) => {
                // Drive the reply out.
                while peer.next().await.is_some() {}
                return (code, reason.to_string());
            }
            Some(Message::Close(None)) => panic!("a close frame without a code"),
            Some(_) => {}
            None => panic!("the connection ended without a close frame"),
        }
    }
}

fn text(s: &str) -> Message {
    Message::text(s.to_owned())
}

#[tokio::test(start_paused = true)]
async fn messages_pass_both_ways_and_the_client_closes_first() {
    let mut s = session().await;
    s.client.send(text("hello upstream")).await.unwrap();
    assert_eq!(next(&mut s.upstream).await, Some(text("hello upstream")));
    s.upstream
        .send(Message::binary(vec![7u8; 100_000]))
        .await
        .unwrap();
    assert_eq!(
        next(&mut s.client).await,
        Some(Message::binary(vec![7u8; 100_000]))
    );
    s.client.close(None).await.unwrap();
    let Some(Message::Close(None)) = next(&mut s.upstream).await else {
        panic!("the client's close frame reaches the upstream as it was")
    };
    // The upstream answers (tungstenite replies to a close) and ends the connection.
    while s.upstream.next().await.is_some() {}
    drop(s.upstream);
    while s.client.next().await.is_some() {}
    drop(s.client);
    let report = s.relay.await.unwrap();
    assert_eq!(report.end, SessionEnd::ClientClosed);
    assert!(!report.interrupted);
    // Frames as written by tungstenite: 2 + 4 mask + 14 text and the close from the client;
    // 2 + 8 length + 100,000 binary and the close reply from the upstream.
    assert_eq!(report.bytes_in, (6 + 14) + 6);
    assert_eq!(report.bytes_out, (10 + 100_000) + 2);
    assert_eq!(report.usage, None);
}

#[tokio::test(start_paused = true)]
async fn the_upstream_closes_first() {
    let mut s = session().await;
    s.upstream
        .close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: "done".into(),
        }))
        .await
        .unwrap();
    assert_eq!(
        close_of(&mut s.client).await,
        (CloseCode::Normal, "done".into())
    );
    while s.upstream.next().await.is_some() {}
    drop(s.upstream);
    let report = s.relay.await.unwrap();
    assert_eq!(report.end, SessionEnd::UpstreamClosed);
    assert!(!report.interrupted);
}

#[tokio::test(start_paused = true)]
async fn silence_both_ways_closes_both_sides_with_1001() {
    let mut s = session().await;
    s.client.send(text("one")).await.unwrap();
    assert_eq!(next(&mut s.upstream).await, Some(text("one")));
    // Nothing more either way: the idle timeout ends the session.
    let (client, upstream) = tokio::join!(close_of(&mut s.client), close_of(&mut s.upstream));
    let reason = "no frame either way for upstream.stream_idle_timeout".to_owned();
    assert_eq!(client, (CloseCode::Away, reason.clone()));
    assert_eq!(upstream, (CloseCode::Away, reason));
    let report = s.relay.await.unwrap();
    assert_eq!(report.end, SessionEnd::IdleTimeout);
}

#[tokio::test(start_paused = true)]
async fn the_cut_closes_both_sides_with_1001_between_two_frames() {
    let mut s = session().await;
    // A message in fragments is under way when the cut comes: ezgate's close frame follows
    // the fragment that is complete (control frames may come between fragments).
    s.upstream
        .send(Message::Frame(
            tungstenite::protocol::frame::Frame::message(
                b"part one".to_vec(),
                tungstenite::protocol::frame::coding::OpCode::Data(
                    tungstenite::protocol::frame::coding::Data::Text,
                ),
                false,
            ),
        ))
        .await
        .unwrap();
    tokio::task::yield_now().await;
    s.cut.cancel();
    let (client, upstream) = tokio::join!(close_of(&mut s.client), close_of(&mut s.upstream));
    assert_eq!(client, (CloseCode::Away, "ezgate is shutting down".into()));
    assert_eq!(
        upstream,
        (CloseCode::Away, "ezgate is shutting down".into())
    );
    let report = s.relay.await.unwrap();
    assert_eq!(report.end, SessionEnd::Shutdown);
}

#[tokio::test(start_paused = true)]
async fn a_client_that_vanishes_is_told_to_the_upstream() {
    let mut s = session().await;
    s.client.send(text("bye")).await.unwrap();
    assert_eq!(next(&mut s.upstream).await, Some(text("bye")));
    drop(s.client);
    assert_eq!(
        close_of(&mut s.upstream).await,
        (CloseCode::Away, "the client went away".into())
    );
    let report = s.relay.await.unwrap();
    assert_eq!(report.end, SessionEnd::ClientClosed);
    assert!(!report.interrupted);
}

#[tokio::test(start_paused = true)]
async fn an_upstream_that_vanishes_is_told_to_the_client() {
    let mut s = session().await;
    s.upstream.send(text("partial answer")).await.unwrap();
    assert_eq!(next(&mut s.client).await, Some(text("partial answer")));
    drop(s.upstream);
    assert_eq!(
        close_of(&mut s.client).await,
        (CloseCode::Error, "the upstream connection was lost".into())
    );
    let report = s.relay.await.unwrap();
    assert_eq!(report.end, SessionEnd::UpstreamClosed);
    assert!(report.interrupted);
}

#[tokio::test(start_paused = true)]
async fn response_done_usage_is_heard_as_it_passes() {
    let mut s = session().await;
    let done = |i: u64, o: u64| {
        format!(
            r#"{{"type":"response.done","event_id":"event_1","response":{{"usage":{{"input_tokens":{i},"output_tokens":{o}}}}}}}"#
        )
    };
    for (i, o) in [(10, 3), (25, 7)] {
        s.upstream
            .send(text(
                r#"{"type":"response.output_text.delta","delta":"tok"}"#,
            ))
            .await
            .unwrap();
        s.upstream.send(text(&done(i, o))).await.unwrap();
        assert!(matches!(next(&mut s.client).await, Some(Message::Text(_))));
        assert_eq!(next(&mut s.client).await, Some(text(&done(i, o))));
    }
    // Heard once per report, as totals.
    assert_eq!(*s.usage.lock().unwrap(), [(10, 3), (35, 10)]);
    s.client.close(None).await.unwrap();
    while s.client.next().await.is_some() {}
    drop(s.client);
    let _ = s.upstream.next().await;
    drop(s.upstream);
    let report = s.relay.await.unwrap();
    assert_eq!(report.usage, Some((35, 10)));
}
