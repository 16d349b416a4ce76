//! HTTP/1.1 connections: one request at a time each, kept between requests on a stack of
//! idle connections (the most recently used is taken first).

use std::sync::atomic::Ordering;

use super::wire::H1Conn;
use super::{Pool, Shared};

pub(super) struct Idle {
    pub(super) conn: H1Conn,
    pub(super) since: u64,
}

impl Shared {
    pub(super) fn put_back(&self, conn: H1Conn) {
        let since = self.tick.load(Ordering::Relaxed);
        let mut idle = self.idle();
        if idle.len() < self.max_idle {
            idle.push(Idle { conn, since });
        }
    }

    /// The most recently used idle connection that is still open (the others are closed).
    pub(super) fn take(&self) -> Option<H1Conn> {
        let mut idle = self.idle();
        while let Some(mut c) = idle.pop() {
            if c.conn.is_open() {
                return Some(c.conn);
            }
        }
        None
    }
}

impl Pool {
    /// Idle HTTP/1.1 connections (for tests).
    pub fn idle_count(&self) -> usize {
        self.shared.idle().len()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    use http_body_util::BodyExt;

    use crate::pool::tests::{get, pool, upstream, upstream_with};

    #[tokio::test]
    async fn sequential_requests_share_one_connection() {
        let (base, accepted) = upstream(false).await;
        let pool = pool(&base, Duration::from_secs(30));
        for _ in 0..5 {
            let resp = get(&pool, "/").await;
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(&body[..], b"{\"ok\":true}");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        assert_eq!(pool.idle_count(), 1);
    }

    #[tokio::test]
    async fn connections_the_upstream_closes_are_replaced() {
        let (base, accepted) = upstream(true).await;
        let pool = pool(&base, Duration::from_secs(30));
        for _ in 0..3 {
            let resp = get(&pool, "/").await;
            assert_eq!(
                resp.into_body().collect().await.unwrap().to_bytes().len(),
                11
            );
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_connection_the_upstream_closed_while_idle_is_not_used() {
        let (base, accepted) = upstream_with(false, Some(Duration::from_millis(30))).await;
        let pool = pool(&base, Duration::from_secs(30));
        for _ in 0..3 {
            let resp = get(&pool, "/").await;
            assert_eq!(
                resp.into_body().collect().await.unwrap().to_bytes().len(),
                11
            );
            // Long past the upstream's keep-alive timeout.
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }
}
