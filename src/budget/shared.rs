//! `store = "redis"`: one budget for the whole fleet, in the shared limits' Redis.
//!
//! Each account of each period is one Redis hash, `ezgate:budget:{<budget>|<window>|<account>}`
//! (the hash tag is the whole triple, so one Cluster slot holds it; the account is a name or
//! a fingerprint, never a key). Every gateway owns its fields there: `s:<gw>`, what it
//! charged this period (written whole, with its version `v:<gw>`, so a write that is
//! retried or arrives late never counts twice), `q:<gw>:<n>`, the reservation of each of
//! its requests in flight, and `t:<gw>`, when it last refreshed them (server clock). The
//! account's spend is the sum of the `s:` fields, its reservations the sum of the `q:`
//! fields of the gateways that refreshed within the lease (`redis.concurrency_lease`): the
//! reservations of a gateway that died are dropped by the next run of [`SCRIPT`].
//!
//! Admission (`reserve`) is one round trip: the script admits iff the spend, the live
//! reservations and the maximum cost add up to no more than the amount, and adds the
//! request's `q:` field. A settlement changes this gateway's own truth and writes it
//! (`sync`: its whole `s:`, and the `q:` fields of the requests that ended, deleted) from a
//! task, off the request's path; a background task refreshes this gateway's lease and
//! writes whatever Redis has not taken yet (a settlement made during an outage).
//!
//! Amounts are nano-units up to 1e18, beyond a Lua double's exact 2^53: the script reads
//! and adds them as two limbs of 9 decimal digits, exact to the nano-unit.
//!
//! While Redis does not answer, an account is admitted against this gateway's share of what
//! Redis last said was left ((amount − spent − reserved) ÷ [`RedisStore::share`]); an
//! account never seen before the outage follows `redis.on_failure` (`local`: the amount ÷
//! share; `deny`: refused). What was charged meanwhile reaches Redis when it answers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use redis::Value;

use super::ledger::{Account, Amount, Refusal, MAX_KEYS};
use super::period::Window;
use crate::limits::shared::{RedisStore, Script};

/// How many idle accounts each refresh re-reads (their mirror: `/status`, the fallback).
const MIRRORED: usize = 64;

/// How long an account's hash outlives its period (late settlements, `/status`).
const GRACE: Duration = Duration::from_secs(86_400);

/// The budget script. KEYS[1]: the account's hash. ARGV: op, gateway id, lease ms, ttl ms,
/// then `reserve`: max cost, amount, force (`1`: hold whether it fits), the request's
/// number; `sync`: version, spent (this gateway's, whole: taken unless a later version
/// was), then the numbers of the requests whose reservation ends. Replies one line: the
/// verdict (`ok`, `over` (held anyway, would not fit), `no`, `stale`), the account's spend
/// before the op, after it, its live reservations, and the count of writes the account
/// has had (`n`: a mirror takes a reply only if it is not older than the last).
pub const SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local key = KEYS[1]
local op, gw = ARGV[1], ARGV[2]
local lease, ttl = tonumber(ARGV[3]), tonumber(ARGV[4])
local B = 1000000000
local function num(s)
  if not s or s == '' then return {0, 0} end
  local n = #s
  if n <= 9 then return {0, tonumber(s)} end
  return {tonumber(string.sub(s, 1, n - 9)), tonumber(string.sub(s, n - 8))}
end
local function add(a, b)
  local hi, lo = a[1] + b[1], a[2] + b[2]
  if lo >= B then lo = lo - B hi = hi + 1 end
  return {hi, lo}
end
local function sub(a, b)
  local hi, lo = a[1] - b[1], a[2] - b[2]
  if lo < 0 then lo = lo + B hi = hi - 1 end
  if hi < 0 then return {0, 0} end
  return {hi, lo}
end
local function le(a, b) return a[1] < b[1] or (a[1] == b[1] and a[2] <= b[2]) end
local function str(a)
  if a[1] == 0 then return string.format('%.0f', a[2]) end
  return string.format('%.0f', a[1]) .. string.format('%09.0f', a[2])
end
local f = redis.call('HGETALL', key)
local fields = {}
for i = 1, #f, 2 do fields[f[i]] = f[i + 1] end
local function alive(who)
  return who == gw or (tonumber(fields['t:' .. who]) or 0) + lease >= now
end
local spent, live = {0, 0}, {0, 0}
for name, value in pairs(fields) do
  local kind = string.sub(name, 1, 2)
  if kind == 's:' then
    spent = add(spent, num(value))
  elseif kind == 'q:' then
    local who = string.match(name, '^q:(.*):[0-9]+$') or ''
    if alive(who) then live = add(live, num(value)) else redis.call('HDEL', key, name) end
  elseif kind == 't:' and not alive(string.sub(name, 3)) then
    redis.call('HDEL', key, name)
  end
end
local before = spent
local verdict = 'ok'
local n = tonumber(fields['n']) or 0
if op == 'reserve' then
  local max, amount = num(ARGV[5]), num(ARGV[6])
  if not le(add(add(spent, live), max), amount) then
    if ARGV[7] == '1' then verdict = 'over' else verdict = 'no' end
  end
  if verdict ~= 'no' then
    redis.call('HSET', key, 'q:' .. gw .. ':' .. ARGV[8], ARGV[5], 't:' .. gw, now)
    live = add(live, max)
    n = redis.call('HINCRBY', key, 'n', 1)
    redis.call('PEXPIRE', key, ttl)
  end
elseif op == 'sync' then
  for i = 7, #ARGV do
    local q = 'q:' .. gw .. ':' .. ARGV[i]
    if fields[q] then
      live = sub(live, num(fields[q]))
      redis.call('HDEL', key, q)
    end
  end
  if tonumber(ARGV[5]) >= (tonumber(fields['v:' .. gw]) or -1) then
    spent = add(sub(spent, num(fields['s:' .. gw])), num(ARGV[6]))
    redis.call('HSET', key, 's:' .. gw, ARGV[6], 'v:' .. gw, ARGV[5])
  else
    verdict = 'stale'
  end
  redis.call('HSET', key, 't:' .. gw, now)
  n = redis.call('HINCRBY', key, 'n', 1)
  redis.call('PEXPIRE', key, ttl)
else
  return redis.error_reply('unknown op')
end
return verdict .. ' ' .. str(before) .. ' ' .. str(spent) .. ' ' .. str(live) .. ' ' .. n
";

/// The most ended reservations one `sync` deletes (the rest go with the next).
const GONE_PER_SYNC: usize = 1000;
/// The most unanswered reserves an account remembers to delete (an outage of a frozen
/// Redis that runs them when it thaws); past it, one may hold its amount for the period.
const MAX_UNANSWERED: usize = 100_000;

/// Where a request's reservation was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// In Redis, as this gateway's request number `n` (`q:<gw>:<n>`).
    Redis(u64),
    /// In this gateway's share, while Redis did not answer.
    Local,
}

/// One reply of the script.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Reply {
    verdict: Verdict,
    before: Amount,
    spent: Amount,
    live: Amount,
    writes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Ok,
    Over,
    No,
    Stale,
}

/// What this gateway knows of one account of one period.
#[derive(Debug, Clone, Default)]
struct Record {
    account: Arc<str>,
    window: Arc<str>,
    /// When the window ends (the hash expires a [`GRACE`] later).
    end: jiff::Timestamp,
    /// This gateway's own truth: what it charged (`s:`), what Redis holds for it (`q:`).
    spent: Amount,
    held: Amount,
    /// Requests whose reservation ended (or whose reserve got no answer and may have run):
    /// their `q:` fields are deleted by the next sync.
    gone: Vec<u64>,
    /// Reservations sent and not answered yet.
    pending: Amount,
    /// Reservations made in this gateway's share during an outage.
    local: Amount,
    /// Bumped at every change of `spent` or `held`; `acked`: the version Redis took, with
    /// the spend it took.
    version: u64,
    acked: u64,
    acked_spent: Amount,
    /// The mirror: the account's spend and live reservations as Redis last said.
    seen: Option<(Amount, Amount)>,
    /// The account's count of writes when `seen` was read.
    seen_at: u64,
    warned: u8,
}

impl Record {
    /// Mirrors a reply, unless the mirror already holds a later picture.
    fn see(&mut self, reply: &Reply) {
        if reply.writes >= self.seen_at || self.seen.is_none() {
            self.seen = Some((reply.spent, reply.live));
            self.seen_at = reply.writes;
        }
    }

    /// What this gateway charged that Redis has not taken yet.
    fn unsynced(&self) -> Amount {
        self.spent.saturating_sub(self.acked_spent)
    }

    fn idle(&self) -> bool {
        !self.busy() && self.local == 0
    }

    /// Whether Redis has something of this gateway's to take or refresh.
    fn busy(&self) -> bool {
        self.held > 0 || self.pending > 0 || self.acked != self.version || !self.gone.is_empty()
    }
}

/// What the fleet budget's accounts are held to (changed by a reload).
struct Book {
    records: HashMap<String, Record>,
    /// The latest window an admission was made in.
    current: Arc<str>,
    amount: Amount,
    warn_at: Vec<f64>,
}

/// A `warn_at` share crossed by one of this gateway's writes.
pub struct Crossing {
    pub account: Arc<str>,
    pub share: f64,
    pub spent: Amount,
    pub amount: Amount,
}

/// One `store = "redis"` budget, as this gateway shares it.
pub struct Fleet {
    name: Arc<str>,
    store: Arc<RedisStore>,
    script: Script,
    /// This process: its fields in every account's hash.
    gateway: String,
    /// The number of this gateway's next reservation.
    next: std::sync::atomic::AtomicU64,
    book: Mutex<Book>,
    /// Logs the `warn_at` crossings of settlements (they are written off the request path).
    on_crossing: fn(&str, &Crossing),
}

impl Fleet {
    /// The shared side of budget `name`; starts the task that refreshes its reservations
    /// and writes what Redis has not taken (inside a tokio runtime).
    pub fn new(
        name: Arc<str>,
        store: Arc<RedisStore>,
        amount: Amount,
        warn_at: Vec<f64>,
        on_crossing: fn(&str, &Crossing),
    ) -> Arc<Fleet> {
        let fleet = Arc::new(Fleet {
            name,
            store,
            script: Script::new(SCRIPT),
            gateway: crate::headers::new_request_id(),
            next: std::sync::atomic::AtomicU64::new(0),
            book: Mutex::new(Book {
                records: HashMap::new(),
                current: Arc::from(""),
                amount,
                warn_at: sorted(warn_at),
            }),
            on_crossing,
        });
        if tokio::runtime::Handle::try_current().is_ok() {
            // It ends with the budget (it holds it only while it writes).
            tokio::spawn(refresh(Arc::downgrade(&fleet)));
        }
        fleet
    }

    pub fn same_store(&self, store: &Arc<RedisStore>) -> bool {
        Arc::ptr_eq(&self.store, store)
    }

    fn book(&self) -> MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A reload's amount and shares (the spend stays in Redis).
    pub fn configure(&self, amount: Amount, warn_at: Vec<f64>) {
        let mut book = self.book();
        book.amount = amount;
        book.warn_at = sorted(warn_at);
        let book = &mut *book;
        for r in book.records.values_mut() {
            let spent = r.seen.map_or(0, |s| s.0);
            r.warned = crossed(&book.warn_at, book.amount, spent);
        }
    }

    /// Reserves `max_cost` for `account` in `window`: in Redis, or, while Redis does not
    /// answer, in this gateway's share of what was left. `force` (shadow): held whether it
    /// fits; the second value says it would not have.
    pub async fn reserve(
        &self,
        account: &Arc<str>,
        window: &Window,
        max_cost: Amount,
        force: bool,
        now: jiff::Timestamp,
    ) -> Result<(Place, bool), Refusal> {
        let key = redis_key(&self.name, &window.id, account);
        let amount = {
            let mut book = self.book();
            let full = book.records.len() >= MAX_KEYS;
            let amount = book.amount;
            if !book.records.contains_key(&key) && full {
                return Err(Refusal::Full {
                    next_period: window.end,
                });
            }
            let book = &mut *book;
            let r = book.records.entry(key.clone()).or_insert_with(|| Record {
                account: Arc::clone(account),
                window: Arc::clone(&window.id),
                end: window.end,
                ..Record::default()
            });
            if book.current != window.id {
                book.current = Arc::clone(&window.id);
            }
            r.pending = r.pending.saturating_add(max_cost);
            amount
        };
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let args = [
            "reserve".to_owned(),
            self.gateway.clone(),
            self.lease_ms(),
            ttl_ms(&window.end, now),
            max_cost.to_string(),
            amount.to_string(),
            if force { "1" } else { "0" }.to_owned(),
            n.to_string(),
        ];
        let reply = self.run(&key, &args).await;
        let mut book = self.book();
        let Some(r) = book.records.get_mut(&key) else {
            return Err(Refusal::Unshared {
                error: "the account was dropped while it was reserved".into(),
            });
        };
        r.pending = r.pending.saturating_sub(max_cost);
        match reply {
            Ok(reply) => {
                r.see(&reply);
                match reply.verdict {
                    Verdict::Ok | Verdict::Over => {
                        r.held = r.held.saturating_add(max_cost);
                        Ok((Place::Redis(n), reply.verdict == Verdict::Over))
                    }
                    _ => Err(Refusal::Exceeded {
                        left: amount.saturating_sub(reply.before.saturating_add(reply.live)),
                        next_period: window.end,
                    }),
                }
            }
            Err(error) => {
                // The reserve may still run (a frozen Redis): the next sync deletes it.
                if r.gone.len() < MAX_UNANSWERED {
                    r.gone.push(n);
                }
                let allowed = match r.seen {
                    Some((spent, live)) => share_left(amount, spent, live, self.store.share()),
                    None if self.store.fail_closed => {
                        return Err(Refusal::Unshared { error });
                    }
                    None => share_left(amount, 0, 0, self.store.share()),
                };
                let used = r.local.saturating_add(r.unsynced());
                let fits = used.saturating_add(max_cost) <= allowed;
                if !(fits || force) {
                    return Err(Refusal::Exceeded {
                        left: allowed.saturating_sub(used),
                        next_period: window.end,
                    });
                }
                r.local = r.local.saturating_add(max_cost);
                Ok((Place::Local, !fits))
            }
        }
    }

    /// Replaces a reservation by what the request cost; the write to Redis is made by a
    /// task (or, failing, by the refresh task once Redis answers).
    pub fn settle(
        self: &Arc<Self>,
        account: &str,
        window: &str,
        place: Place,
        held: u64,
        actual: u64,
    ) {
        let key = redis_key(&self.name, window, account);
        {
            let mut book = self.book();
            let Some(r) = book.records.get_mut(&key) else {
                return;
            };
            match place {
                Place::Redis(n) => {
                    r.held = r.held.saturating_sub(held);
                    r.gone.push(n);
                }
                Place::Local => r.local = r.local.saturating_sub(held),
            }
            r.spent = r.spent.saturating_add(actual);
            r.version += 1;
        }
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let this = Arc::clone(self);
            handle.spawn(async move {
                let _ = this.sync(&key).await;
            });
        }
    }

    /// Writes this gateway's truth of one account (absolute, versioned) and mirrors the
    /// reply; logs the `warn_at` shares the write crossed.
    async fn sync(&self, key: &str) -> Result<(), String> {
        let (args, version, spent, gone) = {
            let book = self.book();
            let Some(r) = book.records.get(key) else {
                return Ok(());
            };
            let gone: Vec<u64> = r.gone.iter().take(GONE_PER_SYNC).copied().collect();
            let mut args = vec![
                "sync".to_owned(),
                self.gateway.clone(),
                self.lease_ms(),
                ttl_ms(&r.end, super::clock::now()),
                r.version.to_string(),
                r.spent.to_string(),
            ];
            args.extend(gone.iter().map(u64::to_string));
            (args, r.version, r.spent, gone)
        };
        let reply = self.run(key, &args).await?;
        let mut book = self.book();
        let (amount, warn_at) = (book.amount, book.warn_at.clone());
        let Some(r) = book.records.get_mut(key) else {
            return Ok(());
        };
        r.gone.retain(|n| !gone.contains(n));
        if reply.verdict == Verdict::Ok && version > r.acked {
            r.acked = version;
            r.acked_spent = spent;
        }
        r.see(&reply);
        r.warned = crossed(&warn_at, amount, r.seen.map_or(0, |s| s.0));
        let account = Arc::clone(&r.account);
        drop(book);
        // Only the write that moved the spend across a share tells it: one gateway.
        for share in warn_at {
            let mark = share * amount as f64;
            if (reply.before as f64) < mark && reply.spent as f64 >= mark {
                let c = Crossing {
                    account: Arc::clone(&account),
                    share,
                    spent: reply.spent,
                    amount,
                };
                (self.on_crossing)(&self.name, &c);
            }
        }
        Ok(())
    }

    fn lease_ms(&self) -> String {
        self.store.lease.as_millis().to_string()
    }

    async fn run(&self, key: &str, args: &[String]) -> Result<Reply, String> {
        let v = self.store.eval(&self.script, key, args).await?;
        let line = match v {
            Value::BulkString(b) => String::from_utf8(b)
                .map_err(|_| "a reply of the budget script that is not text".to_owned())?,
            Value::SimpleString(s) => s,
            _ => return Err("unexpected reply to the budget script".into()),
        };
        parse(&line)
    }

    /// The accounts of `window` this gateway saw, with what Redis last said of them (and
    /// what it charged since that Redis has not taken yet).
    pub fn mirror(&self, window: &str) -> Vec<(Arc<str>, Account)> {
        let book = self.book();
        book.records
            .values()
            .filter(|r| *r.window == *window)
            .map(|r| {
                let (spent, live) = r.seen.unwrap_or_default();
                let a = Account {
                    spent: spent.saturating_add(r.unsynced()),
                    reserved: live.saturating_add(r.local),
                    warned: r.warned,
                };
                (Arc::clone(&r.account), a)
            })
            .collect()
    }

    /// Writes what Redis has not taken and refreshes this gateway's lease (the refresh
    /// task, and once more after the drain); stops at the first failure (Redis does not
    /// answer: the rest waits). Returns the spend Redis has not taken yet.
    pub async fn push(&self) -> Amount {
        'keys: for key in self.due() {
            // An outage's ended reservations go a thousand a write.
            let writes = self
                .book()
                .records
                .get(&key)
                .map_or(1, |r| 1 + r.gone.len() / GONE_PER_SYNC);
            for _ in 0..writes {
                if self.sync(&key).await.is_err() {
                    break 'keys;
                }
            }
        }
        self.book().records.values().map(Record::unsynced).sum()
    }

    pub fn name(&self) -> &Arc<str> {
        &self.name
    }

    /// The keys to write now: reservations to refresh, spend Redis has not taken, and (at
    /// most [`MIRRORED`]) idle accounts of the period, to keep their mirror fresh; drops the
    /// idle accounts of past periods.
    fn due(&self) -> Vec<String> {
        let mut book = self.book();
        let book = &mut *book;
        let current = &book.current;
        book.records
            .retain(|_, r| !(r.idle() && r.window != *current));
        let (mut busy, mut idle): (Vec<_>, Vec<_>) = book
            .records
            .iter()
            .map(|(k, r)| (k, r.busy()))
            .partition(|(_, busy)| *busy);
        idle.truncate(MIRRORED);
        busy.append(&mut idle);
        busy.into_iter().map(|(k, _)| k.clone()).collect()
    }
}

/// Every few seconds (a third of the lease, at least 1 s): writes the accounts where this
/// gateway holds reservations (their lease is refreshed) or charged what Redis has not
/// taken yet (an outage's charges reach Redis when it answers).
async fn refresh(fleet: Weak<Fleet>) {
    let every = match fleet.upgrade() {
        Some(f) => (f.store.lease / 3).max(Duration::from_secs(1)),
        None => return,
    };
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(f) = fleet.upgrade() else { return };
        let _ = f.push().await;
    }
}

fn sorted(mut warn_at: Vec<f64>) -> Vec<f64> {
    warn_at.sort_by(f64::total_cmp);
    warn_at
}

/// How many of `warn_at` (ascending shares of `amount`) `spent` has reached.
fn crossed(warn_at: &[f64], amount: Amount, spent: Amount) -> u8 {
    let n = warn_at
        .iter()
        .take_while(|&&share| spent as f64 >= share * amount as f64)
        .count();
    u8::try_from(n).unwrap_or(u8::MAX)
}

/// This gateway's share of what Redis last said was left: (amount − spent − reserved) ÷
/// the gateways sharing it.
fn share_left(amount: Amount, spent: Amount, reserved: Amount, share: u32) -> Amount {
    amount.saturating_sub(spent.saturating_add(reserved)) / u64::from(share.max(1))
}

/// The hash of one account of one period: one Cluster slot (the whole triple is the hash
/// tag; braces in a name cannot end it early).
fn redis_key(budget: &str, window: &str, account: &str) -> String {
    let clean = |s: &str| -> String {
        s.chars()
            .map(|c| if c == '{' || c == '}' { '_' } else { c })
            .collect()
    };
    format!(
        "ezgate:budget:{{{}|{}|{}}}",
        clean(budget),
        clean(window),
        clean(account)
    )
}

/// Milliseconds until the hash may expire: the window's end, plus [`GRACE`].
fn ttl_ms(end: &jiff::Timestamp, now: jiff::Timestamp) -> String {
    let left = end.duration_since(now).as_millis().max(0);
    let grace = i128::try_from(GRACE.as_millis()).unwrap_or(i128::MAX);
    left.saturating_add(grace).to_string()
}

/// Reads a reply line: verdict, spend before, spend after, live reservations.
fn parse(line: &str) -> Result<Reply, String> {
    let mut words = line.split(' ');
    let verdict = match words.next() {
        Some("ok") => Verdict::Ok,
        Some("over") => Verdict::Over,
        Some("no") => Verdict::No,
        Some("stale") => Verdict::Stale,
        _ => return Err(format!("unexpected reply to the budget script: {line:?}")),
    };
    let mut amount = || -> Result<Amount, String> {
        words
            .next()
            .and_then(|w| w.parse::<Amount>().ok())
            .ok_or_else(|| format!("a reply of the budget script that is not a number: {line:?}"))
    };
    Ok(Reply {
        verdict,
        before: amount()?,
        spent: amount()?,
        live: amount()?,
        writes: amount()?,
    })
}

#[cfg(test)]
mod tests;
