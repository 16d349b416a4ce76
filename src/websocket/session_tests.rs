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

/// The tests' timing: no ping or lifetime unless a test asks for one.
const TIMING: Timing = Timing {
    idle: IDLE,
    lifetime: Duration::from_secs(100 * 3600),
    ping_every: Duration::from_secs(10 * 3600),
    pong_timeout: Duration::from_secs(20),
};

/// Pings every 20 s, answered within 20 s.
const PINGING: Timing = Timing {
    ping_every: Duration::from_secs(20),
    ..TIMING
};

struct Session {
    client: Peer,
    upstream: Peer,
    relay: JoinHandle<Report>,
    cut: CancellationToken,
    usage: Arc<Mutex<Vec<(u64, u64)>>>,
}

async fn session() -> Session {
    session_with(TIMING).await
}

async fn session_with(timing: Timing) -> Session {
    let (client_app, client_gw) = tokio::io::duplex(64 * 1024);
    let (upstream_app, upstream_gw) = tokio::io::duplex(64 * 1024);
    let cut = CancellationToken::new();
    let usage = Arc::new(Mutex::new(Vec::new()));
    let heard = Arc::clone(&usage);
    let relay = tokio::spawn(relay(
        client_gw,
        upstream_gw,
        timing,
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
    assert_eq!(
        report.usage.map(|u| (u.prompt, u.completion)),
        Some((35, 10))
    );
}

#[tokio::test(start_paused = true)]
async fn a_client_that_never_reads_is_closed_though_the_upstream_pings_it() {
    let mut s = session_with(PINGING).await;
    // The upstream pings every 5 s (activity: the idle timeout never comes); the client
    // reads nothing, so it answers neither those pings nor ezgate's.
    let pinger = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            if s.upstream.send(Message::Ping(Bytes::new())).await.is_err() {
                return s.upstream;
            }
        }
    });
    let report = s.relay.await.unwrap();
    assert_eq!(report.end, SessionEnd::PingTimeout);
    // Once ezgate gave up: the ping was due at 20 s, its pong at 40 s, then a second for the
    // closing handshake.
    drop(s.client);
    let _ = pinger.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_client_whose_socket_is_full_is_closed_by_the_pong_timeout() {
    let mut s = session_with(PINGING).await;
    // The upstream streams more than the client's socket holds; the client never reads.
    let streamer = tokio::spawn(async move {
        while s
            .upstream
            .send(Message::binary(vec![1u8; 16_000]))
            .await
            .is_ok()
        {}
    });
    let report = s.relay.await.unwrap();
    assert_eq!(report.end, SessionEnd::PingTimeout);
    assert!(report.bytes_out >= 64 * 1024, "{}", report.bytes_out);
    drop(s.client);
    streamer.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_client_that_answers_pings_is_kept_and_pongs_are_not_activity() {
    let mut s = session_with(PINGING).await;
    let mut pings = 0;
    // The client reads (tungstenite answers each ping); nothing else moves: the session
    // ends by the idle timeout, not the pong timeout, after 60 s.
    let end = loop {
        match s.client.next().await {
            Some(Ok(Message::Ping(p))) => {
                assert_eq!(p.len(), PING_PAYLOAD);
                pings += 1;
            }
            Some(Ok(Message::Close(Some(f)))) => break f,
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(end.code, CloseCode::Away);
    assert_eq!(end.reason.as_str(), IDLE_REASON);
    assert!(pings >= 2, "{pings} pings");
    while s.client.next().await.is_some() {}
    drop(s.client);
    let _ = close_of(&mut s.upstream).await;
    let report = s.relay.await.unwrap();
    assert_eq!(report.end, SessionEnd::IdleTimeout);
}

#[tokio::test(start_paused = true)]
async fn the_lifetime_closes_both_sides_with_1008() {
    let mut s = session_with(Timing {
        lifetime: Duration::from_secs(30),
        ..PINGING
    })
    .await;
    let (client, upstream) = tokio::join!(close_of(&mut s.client), close_of(&mut s.upstream));
    assert_eq!(client, (CloseCode::Policy, LIFETIME_REASON.into()));
    assert_eq!(upstream, (CloseCode::Policy, LIFETIME_REASON.into()));
    let report = s.relay.await.unwrap();
    assert_eq!(report.end, SessionEnd::MaxLifetime);
}

#[tokio::test(start_paused = true)]
async fn a_ping_waits_for_the_end_of_the_frame_in_progress() {
    use tokio::io::AsyncWriteExt;
    let mut s = session_with(PINGING).await;
    let frame = |payload: &[u8]| {
        let mut out = Vec::new();
        tungstenite::protocol::frame::Frame::message(
            payload.to_vec(),
            tungstenite::protocol::frame::coding::OpCode::Data(
                tungstenite::protocol::frame::coding::Data::Text,
            ),
            true,
        )
        .format(&mut out)
        .unwrap();
        out
    };
    let first = frame(b"0123456789");
    let mut rest = first[7..].to_vec();
    rest.extend(frame(b"second"));
    // Half a frame, then the ping falls due (at 20 s), then the rest and another frame
    // in one piece.
    let raw = s.upstream.get_mut();
    raw.write_all(&first[..7]).await.unwrap();
    tokio::time::sleep(Duration::from_secs(25)).await;
    let raw = s.upstream.get_mut();
    raw.write_all(&rest).await.unwrap();
    assert_eq!(s.client.next().await.unwrap().unwrap(), text("0123456789"));
    assert!(matches!(
        s.client.next().await.unwrap().unwrap(),
        Message::Ping(_)
    ));
    assert_eq!(s.client.next().await.unwrap().unwrap(), text("second"));
    // The pong (sent as the client read on) kept the session.
    tokio::time::sleep(Duration::from_secs(30)).await;
    s.client.close(None).await.unwrap();
    let (c, u) = (&mut s.client, &mut s.upstream);
    tokio::join!(async { while c.next().await.is_some() {} }, async {
        while u.next().await.is_some() {}
    });
    drop(s.client);
    drop(s.upstream);
    let report = s.relay.await.unwrap();
    assert_eq!(report.end, SessionEnd::ClientClosed);
}

#[tokio::test(start_paused = true)]
async fn a_response_cut_before_its_done_reports_what_its_deltas_carried() {
    let mut s = session().await;
    let created = r#"{"type":"response.created","event_id":"e0","response":{"id":"resp_1"}}"#;
    let delta = r#"{"type":"response.output_text.delta","event_id":"e1","response_id":"resp_1","delta":"forty two characters of generated text!!"}"#;
    s.upstream.send(text(created)).await.unwrap();
    for _ in 0..5 {
        s.upstream.send(text(delta)).await.unwrap();
    }
    for _ in 0..6 {
        assert!(matches!(next(&mut s.client).await, Some(Message::Text(_))));
    }
    // The client leaves before `response.done`.
    drop(s.client);
    let _ = close_of(&mut s.upstream).await;
    let report = s.relay.await.unwrap();
    assert_eq!(report.usage, None);
    let all = "forty two characters of generated text!!".repeat(5);
    assert_eq!(
        report.unfinished,
        Some(crate::limits::estimate::text_tokens(all.as_bytes()))
    );
    assert!(s.usage.lock().unwrap().is_empty());
}
