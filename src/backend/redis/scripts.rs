//! The server-side scripts. Each one checks every key it will touch — type and,
//! for counters, value — before it writes anything, so a script that fails
//! leaves the store as it found it.
//!
//! Numbers: Redis hands scripts integers as Lua numbers (doubles), exact up to
//! 2^53 − 1, and Lua's default formatting turns 10^14 into `1e+14`. Every
//! integer a script writes goes through `string.format('%.0f', n)`, and a token
//! that would pass 2^53 − 1 is refused rather than rounded.

/// Helpers shared by the scripts (a macro so that `concat!` can splice it).
macro_rules! prelude {
    () => {
        r"
local bad
local MAX_EXACT = 9007199254740991
-- Whether `key` exists; notes (in `bad`) a key of another type than `want`.
local function need(key, want)
  local t = redis.call('TYPE', key)['ok']
  if t == 'none' then return false end
  if t ~= want and not bad then
    bad = 'lockbox: key ' .. key .. ' holds a ' .. t .. ' where a ' .. want ..
      ' belongs; nothing was changed'
  end
  return t == want
end
-- `v` as a non-negative integer Lua holds exactly; notes anything else.
local function int(key, v)
  local n = tonumber(v)
  if not n or n < 0 or n ~= math.floor(n) or n > MAX_EXACT then
    if not bad then
      bad = 'lockbox: key ' .. key .. ' holds ' .. tostring(v) ..
        ', not an integer in 0 ..= 2^53 - 1; nothing was changed'
    end
    return 0
  end
  return n
end
-- The same, for informational fields: anything else counts as absent.
local function soft_int(v)
  local n = tonumber(v)
  if not n or n < 0 or n ~= math.floor(n) or n > MAX_EXACT then return 0 end
  return n
end
local function fmt(n) return string.format('%.0f', n) end
-- The server's clock: milliseconds and microseconds since the epoch.
local function now()
  local t = redis.call('TIME')
  local s, us = tonumber(t[1]), tonumber(t[2])
  return s * 1000 + math.floor(us / 1000), s * 1000000 + us
end
-- The data-loss marker and the fence (see `epoch_write`), read and checked.
local function epoch_read(marker, fence)
  local e = {has = need(marker, 'hash'), run = '', max = 0}
  need(fence, 'string')
  if e.has then
    local v = redis.call('HMGET', marker, 'run_id', 'max_ttl')
    if v[1] then e.run = v[1] end
    if v[2] then e.max = soft_int(v[2]) end
  end
  return e
end
-- The marker (no TTL) says the store's data is intact since this server
-- process (`run`) first saw it. Missing — a restart without persistence, a
-- flush, a failover to a replica without it — or written under another server
-- process — a restart that may have reloaded an older snapshot, a failover —
-- means leases granted before may be gone while their holders still work:
-- grant nothing (the fence) for the longest TTL in use. Returns that TTL.
local function epoch_write(e, marker, fence, run, known, now_ms)
  local lost = (not e.has) or (run ~= '' and e.run ~= '' and e.run ~= run)
  local longest = math.max(known, e.max, 1)
  if lost then
    redis.call('SET', fence, fmt(now_ms), 'PX', fmt(longest))
    redis.call('DEL', marker)
    redis.call('HSET', marker, 'run_id', run, 'max_ttl', fmt(longest),
      'since_ms', fmt(now_ms))
  elseif (run ~= '' and e.run == '') or longest > e.max then
    if run == '' then run = e.run end
    redis.call('HSET', marker, 'run_id', run, 'max_ttl', fmt(longest))
  end
  return longest
end
"
    };
}

/// Takes the lock if no fence stands and the key is absent.
///
/// KEYS: lock, meta, store-wide counter, legacy per-name counter, marker, fence.
/// ARGV: owner, TTL ms, metadata, longest TTL the client knows (ms), server run
/// id (`''`: unknown), retention of released state (ms).
///
/// Returns `{1, token, longest_ttl}` when granted, `{0, pttl, longest_ttl}`
/// when held or fenced (`pttl` -1: no TTL).
///
/// The token is above the store-wide counter, the name's legacy per-name
/// counter and its last token (all kept ≤ every token issued), and no lower
/// than the server's clock in microseconds: after a loss of the counter the
/// clock still puts new tokens above the old ones (as long as it does not step
/// back, and fewer than one grant per microsecond was made on average).
pub(crate) const ACQUIRE: &str = concat!(
    prelude!(),
    r"
local ttl = tonumber(ARGV[2])
need(KEYS[1], 'string')
local has_meta = need(KEYS[2], 'hash')
local counter, legacy, last = 0, 0, 0
if need(KEYS[3], 'string') then counter = int(KEYS[3], redis.call('GET', KEYS[3])) end
local has_legacy = need(KEYS[4], 'string')
if has_legacy then legacy = int(KEYS[4], redis.call('GET', KEYS[4])) end
if has_meta then last = soft_int(redis.call('HGET', KEYS[2], 'token')) end
local e = epoch_read(KEYS[5], KEYS[6])
local now_ms, now_us = now()
local token = math.max(counter + 1, legacy + 1, last + 1, now_us)
if token > MAX_EXACT and not bad then
  bad = 'lockbox: fencing tokens are exhausted: the next would pass 2^53 - 1; nothing was changed'
end
if bad then return redis.error_reply(bad) end
local longest = epoch_write(e, KEYS[5], KEYS[6], ARGV[5], math.max(tonumber(ARGV[4]), ttl), now_ms)
local fenced = redis.call('PTTL', KEYS[6])
if fenced ~= -2 then return {0, fenced, longest} end
local pttl = redis.call('PTTL', KEYS[1])
if pttl ~= -2 then return {0, pttl, longest} end
local tok = fmt(token)
redis.call('SET', KEYS[3], tok)
redis.call('SET', KEYS[1], tok .. '|' .. ARGV[1], 'PX', ARGV[2])
-- The store-wide counter now stands above the old per-name one.
if has_legacy then redis.call('DEL', KEYS[4]) end
redis.call('HSET', KEYS[2], 'owner', ARGV[1], 'token', tok, 'metadata', ARGV[3],
  'acquired_ms', fmt(now_ms), 'renewed_ms', fmt(now_ms), 'released_ms', '')
redis.call('PEXPIRE', KEYS[2], fmt(ttl + tonumber(ARGV[6])))
return {1, token, longest}
"
);

/// Extends the TTL only while the key still holds our `token|owner`; never
/// re-creates it. KEYS: lock, meta, marker. ARGV: `token|owner`, TTL ms,
/// retention ms. Returns 1 when renewed, 0 when the lease is not ours.
pub(crate) const RENEW: &str = concat!(
    prelude!(),
    r"
local ttl = tonumber(ARGV[2])
need(KEYS[1], 'string')
local has_meta = need(KEYS[2], 'hash')
local has_marker = need(KEYS[3], 'hash')
local recorded = 0
if has_marker then recorded = soft_int(redis.call('HGET', KEYS[3], 'max_ttl')) end
if bad then return redis.error_reply(bad) end
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
local now_ms = now()
if has_meta then
  redis.call('HSET', KEYS[2], 'renewed_ms', fmt(now_ms))
  redis.call('PEXPIRE', KEYS[2], fmt(ttl + tonumber(ARGV[3])))
end
if has_marker and ttl > recorded then redis.call('HSET', KEYS[3], 'max_ttl', fmt(ttl)) end
return 1
"
);

/// Deletes the key only while it holds our `token|owner`, keeps the name's
/// state for the retention period only, and wakes waiters. KEYS: lock, meta.
/// ARGV: `token|owner`, channel, retention ms. Returns 1 when released, 0 when
/// the lease was not ours.
pub(crate) const RELEASE: &str = concat!(
    prelude!(),
    r"
need(KEYS[1], 'string')
local has_meta = need(KEYS[2], 'hash')
if bad then return redis.error_reply(bad) end
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
if has_meta then
  redis.call('HSET', KEYS[2], 'released_ms', fmt(now()))
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
end
redis.call('PUBLISH', ARGV[2], '1')
return 1
"
);

/// The data-loss check alone (at build and in health). KEYS: marker, fence.
/// ARGV: server run id, longest TTL the client knows (ms). Returns
/// `{fence_pttl, longest_ttl}` (`fence_pttl` -2: no fence).
pub(crate) const EPOCH: &str = concat!(
    prelude!(),
    r"
local e = epoch_read(KEYS[1], KEYS[2])
if bad then return redis.error_reply(bad) end
local now_ms = now()
local longest = epoch_write(e, KEYS[1], KEYS[2], ARGV[1], tonumber(ARGV[2]), now_ms)
return {redis.call('PTTL', KEYS[2]), longest}
"
);

/// Reads a batch of leases in one round trip. KEYS: meta and lock key of each
/// lease, in pairs. Returns `{fields, lock value or '', lock pttl}` per pair;
/// keys of another type read as absent.
pub(crate) const LIST: &str = r"
local out = {}
for i = 1, #KEYS - 1, 2 do
  local fields, value, pttl = {}, '', -2
  if redis.call('TYPE', KEYS[i])['ok'] == 'hash' then
    fields = redis.call('HGETALL', KEYS[i])
  end
  if redis.call('TYPE', KEYS[i + 1])['ok'] == 'string' then
    value = redis.call('GET', KEYS[i + 1])
    pttl = redis.call('PTTL', KEYS[i + 1])
  end
  out[#out + 1] = {fields, value, pttl}
end
return out
";

/// An operator's forced release: deletes the lock key whoever holds it, keeps
/// the name's state (its last token) and the store-wide counter, so the next
/// grant's token is above the ended one, and wakes waiters. The holder's next
/// renewal finds the key gone (not its own) and reports the loss. KEYS: lock,
/// meta. ARGV: channel, retention ms. Returns `{1, token}` when a lease was
/// ended (`token` 0 when the key's value does not name one), `{0, 0}` when
/// the key was absent.
pub(crate) const FORCE_RELEASE: &str = concat!(
    prelude!(),
    r"
need(KEYS[1], 'string')
local has_meta = need(KEYS[2], 'hash')
if bad then return redis.error_reply(bad) end
local v = redis.call('GET', KEYS[1])
if not v then return {0, 0} end
local token = soft_int(string.match(v, '^(%d+)|'))
redis.call('DEL', KEYS[1])
if has_meta then
  redis.call('HSET', KEYS[2], 'released_ms', fmt(now()))
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
end
redis.call('PUBLISH', ARGV[1], '1')
return {1, token}
"
);
