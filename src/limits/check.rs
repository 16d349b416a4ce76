//! The admission: every policy that covers a request must admit it. Refundable parts
//! (concurrency, tokens) of all policies are taken first and given back if anything refuses;
//! request-rate cells are taken last (GCRA cells cannot be given back), so a request refused
//! on concurrency or tokens takes nothing from any request rate.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::Clock;

use super::permit::{Admission, Checked, Held, Reservation, Settle, Slot};
use super::policy::{consider, ratelimit_headers, thousands, Estimate, Policy, Remaining};
use super::shared::{redis_key, RedisStore, Shared, SharedSlot, SharedTokens};
use super::{cooldown_key, LimitRequest, Limits, Verdict, Verdicts, MAX_COOLDOWN_KEYS};
use crate::config::{Mode, OnLimit, Rate};
use crate::errors::{GatewayError, Quota};

/// A refusal candidate from one policy part.
pub(super) enum Refusal {
    Requests(Duration),
    Tokens {
        wait: Duration,
        remaining: u64,
        estimate: Estimate,
    },
    Concurrency,
}

impl<C: Clock + Clone + Send + Sync + 'static> Limits<C>
where
    C::Instant: Send + Sync,
{
    /// Admits the request under every policy that covers it, or refuses it.
    pub async fn check(&self, r: &LimitRequest<'_>) -> Checked {
        let mut verdicts = Verdicts::new();
        let result = self.admit(r, &mut verdicts).await;
        Checked { result, verdicts }
    }

    async fn admit(
        &self,
        r: &LimitRequest<'_>,
        v: &mut Verdicts,
    ) -> Result<Admission, GatewayError> {
        let inner = &self.inner;
        // Most of the time nothing is cooling down: then no key is even built.
        if inner.cooldowns.count.load(Ordering::Relaxed) > 0 {
            let key = cooldown_key(r.fingerprint.map(|f| &**f), r.model, r.managed);
            if let Some(until) = inner.cooldowns.map.get(&key).map(|u| *u) {
                let now = inner.now();
                if until > now {
                    return Err(GatewayError::UpstreamRateLimited {
                        retry_after: Duration::from_nanos(until - now),
                    });
                }
                if inner
                    .cooldowns
                    .map
                    .remove_if(&key, |_, u| *u <= now)
                    .is_some()
                {
                    inner.cooldowns.count.fetch_sub(1, Ordering::Relaxed);
                }
            }
        }
        let mut admission = Admission::default();
        if inner.policies.is_empty() {
            return Ok(admission);
        }
        // Set when the first policy holds the request (`on_limit = "wait"`).
        let mut started = None;
        let mut tightest: Option<Remaining> = None;
        let mut covering: Vec<(&Policy<C>, Arc<str>, Verdict)> = inner
            .policies
            .iter()
            .filter(|p| p.covers(r))
            .map(|p| (&**p, p.key(r), Verdict::Allowed))
            .collect();

        // Refundable parts first: concurrency and tokens.
        for (p, key, decision) in &mut covering {
            let mut waited = false;
            if p.concurrency.is_some() {
                loop {
                    match self.take_slot(p, key, v).await? {
                        Some(slot) => {
                            admission.permit.held.push(Held::Slot(slot));
                            break;
                        }
                        None => match self
                            .hold_or_refuse(
                                p,
                                v,
                                &mut started,
                                Duration::from_millis(5),
                                Refusal::Concurrency,
                            )
                            .await
                        {
                            Ok(true) => waited = true,
                            Ok(false) => break,
                            Err(e) => return self.refuse(p, v, e),
                        },
                    }
                }
            }
            if p.charges_tokens(r) {
                let estimate = p.estimate(r);
                loop {
                    match self.take_tokens(p, key, estimate.total(), v).await? {
                        Ok((reservation, remaining)) => {
                            admission.permit.held.push(Held::Tokens(Some(reservation)));
                            consider(&mut tightest, p.remaining_tokens(remaining));
                            break;
                        }
                        Err((wait, remaining)) => match self
                            .hold_or_refuse(
                                p,
                                v,
                                &mut started,
                                wait,
                                Refusal::Tokens {
                                    wait,
                                    remaining,
                                    estimate,
                                },
                            )
                            .await
                        {
                            Ok(true) => waited = true,
                            Ok(false) => break,
                            Err(e) => return self.refuse(p, v, e),
                        },
                    }
                }
            }
            if waited {
                *decision = Verdict::Waited;
            }
        }

        // Request rates last: a cell taken cannot be given back.
        for (p, key, decision) in &mut covering {
            if p.requests.is_none() {
                continue;
            }
            loop {
                match self.take_request(p, key, v).await? {
                    Ok(remaining) => {
                        consider(&mut tightest, p.remaining_requests(remaining));
                        break;
                    }
                    Err(wait) => match self
                        .hold_or_refuse(p, v, &mut started, wait, Refusal::Requests(wait))
                        .await
                    {
                        Ok(true) => *decision = Verdict::Waited,
                        Ok(false) => break,
                        Err(e) => return self.refuse(p, v, e),
                    },
                }
            }
        }
        v.extend(
            covering
                .into_iter()
                .map(|(p, _, decision)| (p.index, decision)),
        );
        if let Some(t) = tightest {
            admission.headers = ratelimit_headers(&t);
        }
        Ok(admission)
    }

    /// The shared store failed: fall back to the local limiter, or refuse (fail closed).
    fn store_down(
        &self,
        p: &Policy<C>,
        store: &RedisStore,
        v: &mut Verdicts,
    ) -> Result<(), GatewayError> {
        v.push((p.index, Verdict::StoreFallback));
        if store.fail_closed {
            return Err(GatewayError::Overloaded(format!(
                "the shared limit store of policy '{}' is unreachable and redis.on_failure = \"deny\"",
                p.name
            )));
        }
        Ok(())
    }

    /// A shared key known to be over its limit: the wait left, without asking Redis.
    fn known_denied(&self, p: &Policy<C>, key: &Arc<str>) -> Option<Duration> {
        let until = *p.denied.get(key)?;
        let now = self.inner.now();
        (until > now).then(|| Duration::from_nanos(until - now))
    }

    fn remember_denied(&self, p: &Policy<C>, key: &Arc<str>, wait: Duration) {
        if p.denied.len() < MAX_COOLDOWN_KEYS {
            p.denied
                .insert(Arc::clone(key), self.inner.now() + wait.as_nanos() as u64);
        }
    }

    async fn take_slot(
        &self,
        p: &Policy<C>,
        key: &Arc<str>,
        v: &mut Verdicts,
    ) -> Result<Option<Slot>, GatewayError> {
        let Some(local) = &p.concurrency else {
            return Ok(None);
        };
        let mut max = local.max;
        if let (Some(store), Some(full)) = (&p.shared, p.full.2) {
            let rkey: Arc<str> = Arc::from(redis_key(&p.name, key, "conc"));
            // Boxed: a local check's future stays small (it is moved on every request).
            match Box::pin(store.acquire(&rkey, full)).await {
                Ok(Some(n)) => {
                    return Ok(Some(Slot::Shared(SharedSlot {
                        store: Arc::clone(store),
                        key: rkey,
                        n,
                    })))
                }
                Ok(None) => return Ok(None),
                Err(_) => {
                    self.store_down(p, store, v)?;
                    max = (full / store.share()).max(1);
                }
            }
        }
        Ok(local
            .acquire_within(key, max)
            .map(|k| Slot::Local(Arc::clone(local), k)))
    }

    async fn take_tokens(
        &self,
        p: &Policy<C>,
        key: &Arc<str>,
        want: u64,
        v: &mut Verdicts,
    ) -> Result<Result<(Reservation, u64), (Duration, u64)>, GatewayError> {
        let Some((_, local)) = &p.tokens else {
            return Ok(Err((Duration::ZERO, 0)));
        };
        let mut share = 1;
        if let (Some(store), Some(rate)) = (&p.shared, p.full.1) {
            if let Some(wait) = self.known_denied(p, key) {
                return Ok(Err((wait, 0)));
            }
            let rkey = redis_key(&p.name, key, "tokens");
            let interval = rate.per / rate.count;
            match Box::pin(store.take(&rkey, interval, u64::from(rate.count), want)).await {
                Ok(Shared::Allowed { remaining }) => {
                    let tokens = Arc::new(SharedTokens {
                        store: Arc::clone(store),
                        key: rkey,
                        interval,
                    });
                    return Ok(Ok((Reservation::Shared(tokens, want), remaining)));
                }
                Ok(Shared::Limited { wait, remaining }) => {
                    // A later request may be small enough to fit: only a full bucket's
                    // worth of waiting is remembered.
                    if remaining == 0 {
                        self.remember_denied(p, key, wait);
                    }
                    return Ok(Err((wait, remaining)));
                }
                Err(_) => {
                    self.store_down(p, store, v)?;
                    share = u64::from(store.share());
                }
            }
        }
        // A replica's share of the bucket: every token counts `share` times.
        Ok(local
            .reserve(key, want.saturating_mul(share))
            .map(|remaining| {
                (
                    Reservation::Local(
                        Arc::clone(local) as Arc<dyn Settle>,
                        Arc::clone(key),
                        want,
                        share,
                    ),
                    remaining / share,
                )
            })
            .map_err(|(wait, remaining)| (wait, remaining / share)))
    }

    async fn take_request(
        &self,
        p: &Policy<C>,
        key: &Arc<str>,
        v: &mut Verdicts,
    ) -> Result<Result<u64, Duration>, GatewayError> {
        let Some((_, local)) = &p.requests else {
            return Ok(Ok(0));
        };
        let mut share = 1;
        if let (Some(store), Some((rate, burst))) = (&p.shared, p.full.0) {
            if let Some(wait) = self.known_denied(p, key) {
                return Ok(Err(wait));
            }
            let rkey = redis_key(&p.name, key, "requests");
            match Box::pin(store.take(&rkey, rate.interval(), u64::from(burst), 1)).await {
                Ok(Shared::Allowed { remaining }) => return Ok(Ok(remaining)),
                Ok(Shared::Limited { wait, .. }) => {
                    self.remember_denied(p, key, wait);
                    return Ok(Err(wait));
                }
                Err(_) => {
                    self.store_down(p, store, v)?;
                    share = store.share();
                }
            }
        }
        Ok(local.check_share(key, share).map(u64::from))
    }

    /// A policy part refused: in shadow mode count it and go on (`Ok(false)`); with
    /// `on_limit = "wait"` sleep if the wait fits in `max_wait` (`Ok(true)`); else refuse.
    async fn hold_or_refuse(
        &self,
        p: &Policy<C>,
        v: &mut Verdicts,
        started: &mut Option<tokio::time::Instant>,
        wait: Duration,
        refusal: Refusal,
    ) -> Result<bool, GatewayError> {
        if p.mode == Mode::Shadow {
            v.push((p.index, Verdict::ShadowLimited));
            return Ok(false);
        }
        if p.on_limit == OnLimit::Wait
            && started
                .get_or_insert_with(tokio::time::Instant::now)
                .elapsed()
                + wait
                <= p.max_wait
        {
            Box::pin(tokio::time::sleep(wait)).await;
            return Ok(true);
        }
        Err(refusal_error(p, refusal))
    }

    fn refuse(
        &self,
        p: &Policy<C>,
        v: &mut Verdicts,
        e: GatewayError,
    ) -> Result<Admission, GatewayError> {
        v.push((p.index, Verdict::Limited));
        Err(e)
    }
}

pub(super) fn refusal_error<C: Clock>(p: &Policy<C>, refusal: Refusal) -> GatewayError {
    match refusal {
        Refusal::Requests(wait) => {
            let (rate, store) = match &p.requests {
                Some((rate, store)) => (*rate, store.burst),
                None => (
                    Rate {
                        count: 1,
                        per: Duration::from_secs(1),
                    },
                    1,
                ),
            };
            GatewayError::RateLimited {
                policy: Arc::clone(&p.name),
                limit: format!(
                    "{} requests per {} (burst {store})",
                    rate.count,
                    rate.unit_word()
                ),
                retry_after: wait,
                quota: Quota {
                    count: u64::from(rate.count),
                    window: rate.per.as_secs(),
                },
            }
        }
        Refusal::Tokens {
            wait,
            remaining,
            estimate,
        } => {
            // The whole policy's rate (a shared policy's local rate is this replica's share).
            let rate = p.full.1.or(p.tokens.as_ref().map(|t| t.0)).unwrap_or(Rate {
                count: 1,
                per: Duration::from_secs(1),
            });
            GatewayError::TokenRateLimited {
                policy: Arc::clone(&p.name),
                limit: format!(
                    "{} tokens per {}",
                    thousands(u64::from(rate.count)),
                    rate.unit_word()
                ),
                retry_after: wait,
                quota: Quota {
                    count: u64::from(rate.count),
                    window: rate.per.as_secs(),
                },
                remaining,
                estimate: estimate.describe(),
            }
        }
        Refusal::Concurrency => GatewayError::ConcurrencyLimited {
            policy: Arc::clone(&p.name),
            limit: p.full.2.unwrap_or(0),
        },
    }
}
