//! The sweeper: a task that advances the pool's coarse clock and drops the connections idle
//! too long.

use std::sync::atomic::Ordering;
use std::sync::Weak;
use std::time::Duration;

use super::Shared;

impl Shared {
    fn sweep(&self) {
        let now = self.tick.fetch_add(1, Ordering::Relaxed) + 1;
        self.idle()
            .retain_mut(|c| now.saturating_sub(c.since) <= self.idle_ticks && c.conn.is_open());
        self.h2().retain(|c| {
            let idle = c.load.streams.load(Ordering::Relaxed) == 0
                && now.saturating_sub(c.load.since.load(Ordering::Relaxed)) > self.idle_ticks;
            !c.tx.is_closed() && !idle
        });
    }
}

pub(super) async fn sweep_forever(shared: Weak<Shared>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        shared.sweep();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http_body_util::BodyExt;

    use crate::pool::tests::{get, pool, pool_with, upstream, upstream_h2, upstream_with};

    #[tokio::test]
    async fn the_sweeper_drops_a_connection_the_upstream_closed() {
        let (base, _) = upstream_with(false, Some(Duration::from_millis(30))).await;
        // Expiry is 10 s away: only noticing the close can empty the pool sooner.
        let pool = pool(&base, Duration::from_secs(10));
        let resp = get(&pool, "/").await;
        let _ = resp.into_body().collect().await.unwrap();
        assert_eq!(pool.idle_count(), 1);
        for _ in 0..100 {
            if pool.idle_count() == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("a connection the upstream closed stayed in the pool");
    }

    #[tokio::test]
    async fn idle_connections_expire() {
        let (base, _) = upstream(false).await;
        let pool = pool(&base, Duration::from_millis(50));
        let resp = get(&pool, "/").await;
        let _ = resp.into_body().collect().await.unwrap();
        assert_eq!(pool.idle_count(), 1);
        // Well past the timeout (the sweeper ticks every 12.5 ms here).
        for _ in 0..200 {
            if pool.idle_count() == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("an idle connection outlived pool_idle_timeout by seconds");
    }

    #[tokio::test]
    async fn http2_connections_without_streams_expire() {
        let (base, _) = upstream_h2(100).await;
        let pool = pool_with(&base, Duration::from_millis(50), true);
        let _ = get(&pool, "/").await.into_body().collect().await.unwrap();
        assert_eq!(pool.h2_streams(), [0]);
        for _ in 0..200 {
            if pool.h2_streams().is_empty() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("an HTTP/2 connection without streams outlived pool_idle_timeout by seconds");
    }
}
