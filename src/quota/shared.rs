//! `store = "redis"`: one picture of the upstream's quota for the whole fleet.
//!
//! Each key and model's picture is one Redis hash, changed only by [`PICTURE`], a Lua script
//! that runs atomically on the Redis server's clock: `take` (admission: refill, check, take,
//! or say how long until it carries), `learn` (a response's correction, with the fleet-wide
//! running total as the mark), `give` (a take never forwarded) and `hold` (an unreadable 429).
//! A take is one round trip, like a shared request policy's check; learning from a response
//! is a second one, made off the request's path. Each gateway keeps the last reply as its
//! mirror of the picture, which it paces on alone (its own share of it) while Redis is away.

use std::sync::Arc;
use std::time::Duration;

use redis::Value;

use super::picture::{Cost, Marks};
use super::Reading;
use crate::limits::shared::{RedisStore, Script};

/// The picture script (`take` also applies the reading it carries first: a correction costs
/// no round trip of its own). KEYS[1]: the hash (fields `<u>l` limit, `<u>v` level, `<u>k` refill
/// per ms, `<u>a` when the level was true, `<u>n` running total taken (never lowered by a
/// give-back, so a correction errs low), `<u>e` held empty until; `<u>` = `r` requests,
/// `t` tokens). Counts are written `%.0f` (exact to 2^53, which the readings are capped at). ARGV[1]: the op. Every reply that describes the
/// picture ends with, per unit, limit (-1: unknown), level, refill per ms and the ms it is
/// still held empty.
pub const PICTURE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local key = KEYS[1]
local op = ARGV[1]
local f = redis.call('HMGET', key, 'rl', 'rv', 'rk', 'ra', 'rn', 're', 'tl', 'tv', 'tk', 'ta', 'tn', 'te')
local names = {'r', 't'}
local units = {}
for i, u in ipairs(names) do
  local b = (i - 1) * 6
  local l = tonumber(f[b + 1])
  if l then
    local g = {l = l, v = tonumber(f[b + 2]) or l, k = tonumber(f[b + 3]) or (l / 60000),
               a = tonumber(f[b + 4]) or now, n = tonumber(f[b + 5]) or 0, e = tonumber(f[b + 6]) or 0}
    if g.e > now then
      g.v = math.min(g.v, 0)
    else
      g.v = math.min(g.l, g.v + g.k * math.max(0, now - math.max(g.a, g.e)))
      g.e = 0
    end
    g.a = now
    units[u] = g
  end
end
local function save()
  for u, g in pairs(units) do
    redis.call('HSET', key, u .. 'l', string.format('%.0f', g.l), u .. 'v', string.format('%.6f', g.v),
      u .. 'k', string.format('%.12f', g.k), u .. 'a', string.format('%.3f', g.a),
      u .. 'n', string.format('%.0f', g.n), u .. 'e', string.format('%.3f', g.e))
  end
  redis.call('PEXPIRE', key, 3600000)
end
local function view(out)
  for _, u in ipairs(names) do
    local g = units[u]
    if g then
      table.insert(out, string.format('%.0f', g.l))
      table.insert(out, string.format('%.6f', g.v))
      table.insert(out, string.format('%.12f', g.k))
      table.insert(out, string.format('%.3f', math.max(0, g.e - now)))
    else
      table.insert(out, '-1') table.insert(out, '0') table.insert(out, '0') table.insert(out, '0')
    end
  end
  return out
end
-- A response's reading, ARGV[b..b+9]: per unit has, limit, remaining, reset ms, mark.
local function learn(b)
  for i, u in ipairs(names) do
    local o = b + (i - 1) * 5
    if ARGV[o] == '1' then
      local limit = tonumber(ARGV[o + 1])
      local rem = tonumber(ARGV[o + 2])
      local reset = tonumber(ARGV[o + 3])
      local mark = tonumber(ARGV[o + 4])
      local deficit = limit - rem
      local rate = nil
      if deficit >= math.max(1, limit * 0.01) and reset >= 20 then rate = deficit / reset end
      local g = units[u]
      if not g then
        units[u] = {l = limit, v = rem, k = rate or (limit / 60000), a = now, n = 0, e = 0}
      else
        if rate then
          g.k = rate
        elseif limit ~= g.l then
          g.k = g.k * limit / math.max(g.l, 1)
          if g.k <= 0 then g.k = limit / 60000 end
        end
        g.l = limit
        if mark >= 0 then g.v = rem - math.max(0, g.n - mark) else g.v = math.min(g.v, rem) end
        g.v = math.max(-g.l, math.min(g.v, g.l))
      end
    end
  end
end
if op == 'take' then
  -- The correction of this gateway's latest answer rides on its next take.
  if ARGV[5] == '1' then learn(6) end
  if not units.r and not units.t then return 'none' end
  local cost = {r = tonumber(ARGV[2]), t = tonumber(ARGV[3])}
  local floor = tonumber(ARGV[4])
  local wait = -1
  for u, g in pairs(units) do
    local target = cost[u] + floor * g.l
    if g.v < target then
      local w = 86400000
      if g.k > 0 then w = math.min(w, (target - g.v) / g.k) end
      w = w + math.max(0, g.e - now)
      if w > wait then wait = w end
    end
  end
  if wait >= 0 then
    -- A correction it carried is kept, taken or not.
    if ARGV[5] == '1' then save() end
    return table.concat(view({'short', string.format('%.3f', wait)}), ' ')
  end
  local marks = {'-1', '-1'}
  for i, u in ipairs(names) do
    local g = units[u]
    if g then
      g.v = g.v - cost[u]
      g.n = g.n + cost[u]
      marks[i] = string.format('%.0f', g.n)
    end
  end
  save()
  return table.concat(view({'taken', marks[1], marks[2]}), ' ')
elseif op == 'learn' then
  learn(2)
  save()
  return table.concat(view({'learned'}), ' ')
elseif op == 'give' then
  local cost = {r = tonumber(ARGV[2]), t = tonumber(ARGV[3])}
  for u, g in pairs(units) do
    g.v = math.min(g.l, g.v + cost[u])
  end
  save()
  return table.concat(view({'given'}), ' ')
elseif op == 'hold' then
  if not units.r and not units.t then return 'none' end
  for _, g in pairs(units) do
    g.v = math.min(g.v, 0)
    g.e = math.max(g.e, now + tonumber(ARGV[2]))
  end
  save()
  return table.concat(view({'held'}), ' ')
end
return redis.error_reply('unknown op')
";

/// One unit of the picture as Redis replied it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UnitMirror {
    pub limit: u64,
    pub level: f64,
    /// Refill per second.
    pub rate: f64,
    /// Still held empty this long (an unreadable upstream 429).
    pub held: Duration,
}

/// The picture as Redis replied it.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Mirror {
    pub requests: Option<UnitMirror>,
    pub tokens: Option<UnitMirror>,
}

/// What a shared take did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Took {
    /// Nothing is known of the pair yet: the request goes unpaced.
    Unknown,
    Taken(Marks, Mirror),
    /// The picture cannot carry it for this long.
    Short(Duration, Mirror),
}

/// The fleet's pictures in Redis.
pub struct SharedPictures {
    store: Arc<RedisStore>,
    script: Script,
}

impl SharedPictures {
    pub fn new(store: Arc<RedisStore>) -> SharedPictures {
        SharedPictures {
            store,
            script: Script::new(PICTURE),
        }
    }

    /// How many gateways share the picture (what each falls back to a share of).
    pub fn share(&self) -> u32 {
        self.store.share()
    }

    pub fn same_store(&self, other: &Arc<RedisStore>) -> bool {
        Arc::ptr_eq(&self.store, other)
    }

    /// Runs the script; its reply is one line of words (one bulk string to read, not a
    /// dozen: the reply's parse is on every paced request's path).
    async fn run(&self, key: &str, model: &str, args: &[String]) -> Result<String, String> {
        let reply = self
            .store
            .eval(&self.script, &redis_key(key, model), args)
            .await?;
        match reply {
            Value::BulkString(b) => String::from_utf8(b)
                .map_err(|_| "a reply of the quota picture script that is not text".into()),
            Value::SimpleString(s) => Ok(s),
            _ => Err("unexpected reply to the quota picture script".into()),
        }
    }

    /// Takes `cost` leaving `floor` (a share of the limit), or says how long until it can;
    /// first corrects the picture with `pending`, the latest answer's reading and its marks.
    pub async fn take(
        &self,
        key: &str,
        model: &str,
        cost: Cost,
        floor: f64,
        pending: Option<&(Reading, Marks)>,
    ) -> Result<Took, String> {
        let mut args = vec![
            "take".to_owned(),
            cost.requests.to_string(),
            cost.tokens.to_string(),
            format!("{floor:.6}"),
        ];
        match pending {
            Some((reading, marks)) => {
                args.push("1".to_owned());
                reading_args(&mut args, reading, *marks);
            }
            None => args.push("0".to_owned()),
        }
        let line = self.run(key, model, &args).await?;
        let r: Vec<&str> = line.split(' ').collect();
        match r.first().copied() {
            Some("none") => Ok(Took::Unknown),
            Some("taken") => {
                let mark = |i: usize| r.get(i).and_then(|s| s.parse::<i64>().ok());
                let marks = Marks {
                    requests: mark(1).and_then(|m| u64::try_from(m).ok()),
                    tokens: mark(2).and_then(|m| u64::try_from(m).ok()),
                    shared: true,
                };
                Ok(Took::Taken(marks, mirror(r.get(3..).unwrap_or_default())?))
            }
            Some("short") => {
                let ms: f64 = r.get(1).and_then(|s| s.parse().ok()).unwrap_or(0.0);
                let wait = seconds(ms / 1000.0);
                Ok(Took::Short(wait, mirror(r.get(2..).unwrap_or_default())?))
            }
            _ => Err("unexpected reply to the quota picture's take".into()),
        }
    }

    /// Gives back what a request took and never forwarded.
    pub async fn give(
        &self,
        key: &str,
        model: &str,
        cost: Cost,
        marks: Marks,
    ) -> Result<(), String> {
        let args = [
            "give".to_owned(),
            if marks.requests.is_some() {
                cost.requests
            } else {
                0
            }
            .to_string(),
            if marks.tokens.is_some() {
                cost.tokens
            } else {
                0
            }
            .to_string(),
        ];
        self.run(key, model, &args).await.map(|_| ())
    }

    /// Holds the picture empty for `wait` (an upstream 429 that said nothing readable).
    pub async fn hold(&self, key: &str, model: &str, wait: Duration) -> Result<(), String> {
        let args = ["hold".to_owned(), wait.as_millis().to_string()];
        self.run(key, model, &args).await.map(|_| ())
    }
}

/// A reading as the script's arguments: per unit has, limit, remaining, reset ms and the
/// request's shared mark (`-1`: none).
fn reading_args(args: &mut Vec<String>, reading: &Reading, marks: Marks) {
    for (part, mark) in [
        (reading.requests, marks.requests),
        (reading.tokens, marks.tokens),
    ] {
        match part {
            Some(p) => args.extend([
                "1".to_owned(),
                p.limit.to_string(),
                p.remaining.to_string(),
                format!("{:.3}", p.reset.as_secs_f64() * 1000.0),
                mark.filter(|_| marks.shared)
                    .map_or("-1".to_owned(), |m| m.to_string()),
            ]),
            None => args.extend(["0", "0", "0", "0", "-1"].map(str::to_owned)),
        }
    }
}

/// The picture's Redis key: one hash slot per pair (Cluster), named by a digest of the key
/// id and model (whatever characters a model name holds).
fn redis_key(key: &str, model: &str) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(&(key.len() as u64).to_le_bytes());
    ctx.update(key.as_bytes());
    ctx.update(model.as_bytes());
    let digest = ctx.finish();
    let hex: String = digest.as_ref()[..12]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("ezgate:{{quota:{hex}}}")
}

/// A duration of `secs` seconds from a reply: what is not a finite number is none, and at
/// most a day.
fn seconds(secs: f64) -> Duration {
    if secs.is_finite() && secs > 0.0 {
        Duration::from_secs_f64(secs.min(86_400.0))
    } else {
        Duration::ZERO
    }
}

/// Reads the eight values that describe a picture.
fn mirror(v: &[&str]) -> Result<Mirror, String> {
    let unit = |i: usize| -> Result<Option<UnitMirror>, String> {
        let num = |j: usize| -> Result<f64, String> {
            v.get(i + j)
                .and_then(|s| s.parse::<f64>().ok())
                .ok_or_else(|| "a short reply from the quota picture script".to_owned())
        };
        let limit = num(0)?;
        if limit < 0.0 {
            return Ok(None);
        }
        let (level, rate) = (num(1)?, num(2)?);
        if !(limit.is_finite() && level.is_finite() && rate.is_finite()) {
            return Err("a reply from the quota picture script that is not a number".to_owned());
        }
        Ok(Some(UnitMirror {
            limit: limit as u64,
            level,
            rate: rate * 1000.0,
            held: seconds(num(3)? / 1000.0),
        }))
    };
    Ok(Mirror {
        requests: unit(0)?,
        tokens: unit(4)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_reads_into_a_mirror() {
        let r = ["100", "42.5", "0.010000000", "0", "-1", "0", "0", "0"];
        let m = mirror(&r).unwrap();
        let req = m.requests.unwrap();
        assert_eq!(req.limit, 100);
        assert!((req.level - 42.5).abs() < 1e-9);
        assert!((req.rate - 10.0).abs() < 1e-9);
        assert_eq!(m.tokens, None);
        assert!(mirror(&r[..3]).is_err());
        let nan = ["100", "nan", "0.01", "0", "-1", "0", "0", "0"];
        assert!(mirror(&nan).is_err());
        assert_eq!(seconds(f64::NAN), Duration::ZERO);
        assert_eq!(seconds(-1.0), Duration::ZERO);
        assert_eq!(seconds(1e300), Duration::from_secs(86_400));
    }

    #[test]
    fn one_slot_per_pair_whatever_the_model_holds() {
        let a = redis_key("org:abc", "gpt-4o");
        assert!(a.starts_with("ezgate:{quota:") && a.ends_with('}'), "{a}");
        assert_ne!(a, redis_key("org:abc", "gpt-4o-mini"));
        assert_ne!(redis_key("a", "b\0c"), redis_key("a\0b", "c"));
        assert!(!redis_key("k", "m}{x").contains("m}"));
    }
}
