//! The server-side scripts. Each one checks every key it will touch — type and,
//! for counters, value — before it writes anything, so a script that fails
//! leaves the store as it found it.
//!
//! Cost: a script is priced by the number of `redis.call`s it makes (about a
//! microsecond each, more than most commands themselves take), so a key the
//! script reads anyway has its type checked by that read (`read`: a key of
//! another type fails the read, and only then is `TYPE` asked, for the
//! message), not by a `TYPE` call of its own.
//!
//! And each script defines only the helpers it uses: a helper is a closure
//! made afresh at every run, and garbage after it.
//!
//! Numbers: Redis hands scripts integers as Lua numbers (doubles), exact up to
//! 2^53 − 1, and Lua's default formatting turns 10^14 into `1e+14`. Every
//! integer a script writes goes through `string.format('%d', n)` (Redis' Lua
//! converts to a 64-bit `long` for it: exact for every integer up to 2^53,
//! and a quarter of the cost of `'%.0f'`), and a token that would pass
//! 2^53 − 1 is refused rather than rounded.

/// Helpers every script uses (macros so that `concat!` can splice them).
macro_rules! prelude {
    () => {
        r"
local bad
local MAX_EXACT = 9007199254740991
local function wrong_type(key, t, want)
  if not bad then
    bad = 'lockbox: key ' .. key .. ' holds a ' .. t .. ' where a ' .. want ..
      ' belongs; nothing was changed'
  end
end
-- Whether `key` exists; notes (in `bad`) a key of another type than `want`.
local function need(key, want)
  local t = redis.call('TYPE', key)['ok']
  if t == 'none' then return false end
  if t ~= want then wrong_type(key, t, want) end
  return t == want
end
-- The reply to the read `...` of `key`, which must be a `want` (or absent):
-- a key of another type fails the read, and is noted in `bad` as `need`
-- notes it; the reply is then `false`. One call instead of `need`'s two.
-- Any other failure (a command the user may not run) is raised as it is.
local function read(key, want, ...)
  local r = redis.pcall(...)
  if type(r) == 'table' and r.err then
    if not string.find(r.err, 'WRONGTYPE', 1, true) then return error(r) end
    wrong_type(key, redis.call('TYPE', key)['ok'], want)
    return false
  end
  return r
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
local function fmt(n) return string.format('%d', n) end
-- Every field a name's state (`lockbox:meta:{name}`) may have: one of them
-- there is how a script knows the hash is there (`HLEN` and `EXISTS` are
-- not in the README's ACL rule, nor needed by any other script).
local META_FIELDS = {'owner', 'token', 'metadata', 'acquired_ms', 'renewed_ms',
  'released_ms', 'top'}
-- Whether an `HMGET` reply (or `false`) has any of its fields.
local function has_any(v)
  if not v then return false end
  for i = 1, #v do if v[i] then return true end end
  return false
end
-- The server's clock: milliseconds and microseconds since the epoch.
local function now()
  local t = redis.call('TIME')
  local s, us = tonumber(t[1]), tonumber(t[2])
  return s * 1000 + math.floor(us / 1000), s * 1000000 + us
end
-- The token in a shared holder's member `token|owner`.
local function member_token(m) return string.match(m, '^(%d+)|') end
"
    };
}

/// Waiters' marks and shared holders' sets.
macro_rules! marks {
    () => {
        r"
-- How long a waiter's mark (a writer waiting, a permit waiter's place in the
-- queue) lives unless refreshed: its TTL, at most this (`WAIT_MARK` in
-- mod.rs). A crashed waiter's mark ends by itself, no later than a crashed
-- holder's lease would.
local WAIT_MARK_MS = 3000
-- Makes `key` live for at least `ms` more (never shortens it); nothing when
-- it is absent.
local function extend(key, ms)
  local p = redis.call('PTTL', key)
  if p == -1 or (p >= 0 and p < ms) then redis.call('PEXPIRE', key, fmt(ms)) end
end
-- Drops a name's expired shared holders (score: expiry, ms) and their details.
local function purge(holders, group, now_ms)
  local gone = redis.call('ZRANGEBYSCORE', holders, '-inf', fmt(now_ms))
  for _, m in ipairs(gone) do
    redis.call('ZREM', holders, m)
    local tok = member_token(m)
    if tok then redis.call('HDEL', group, 'm:' .. tok, 'a:' .. tok, 'r:' .. tok) end
  end
end
"
    };
}

/// The data-loss check (see the backend's module docs).
macro_rules! epoch {
    () => {
        r"
-- The data-loss marker and the fence (see `epoch_write`), read and checked.
-- A marker without any of its fields counts as missing (a lock-delay, the
-- safe side). `fenced`: a fence stands.
local function epoch_read(marker, fence)
  local v = read(marker, 'hash', 'HMGET', marker, 'run_id', 'max_ttl', 'since_ms') or {}
  local e = {has = has_any(v), run = v[1] or '', max = soft_int(v[2])}
  e.fenced = read(fence, 'string', 'GET', fence) and true or false
  return e
end
-- The marker (no TTL) says the store's data is intact since this server
-- process (`run`) first saw it. Missing — a restart without persistence, a
-- flush, a failover to a replica without it — or written under another server
-- process — a restart that may have reloaded an older snapshot, a failover —
-- means leases granted before may be gone while their holders still work:
-- grant nothing (the fence) for the longest TTL in use. Returns that TTL;
-- `e.fenced` is then true when a fence stands, this one or an earlier one.
local function epoch_write(e, marker, fence, run, known, now_ms)
  local lost = (not e.has) or (run ~= '' and e.run ~= '' and e.run ~= run)
  local longest = math.max(known, e.max, 1)
  if lost then
    e.fenced = true
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

/// What both grants (exclusive and shared) read first: the lock key
/// (`held`), the name's last tokens (`last`), the store-wide and legacy
/// counters, and the data-loss marker and fence (`e`). KEYS 1 to 6 of both.
macro_rules! grant_reads {
    () => {
        r"-- Each key read once, its type checked by that read.
local held = read(KEYS[1], 'string', 'GET', KEYS[1])
local v = read(KEYS[2], 'hash', 'HMGET', KEYS[2], 'token', 'top') or {}
local last = math.max(soft_int(v[1]), soft_int(v[2]))
local counter, legacy = 0, 0
local c = read(KEYS[3], 'string', 'GET', KEYS[3])
if c then counter = int(KEYS[3], c) end
local l = read(KEYS[4], 'string', 'GET', KEYS[4])
local has_legacy = l and true or false
if has_legacy then legacy = int(KEYS[4], l) end
local e = epoch_read(KEYS[5], KEYS[6])
"
    };
}

/// Takes the lock if no fence stands, the key is absent and no shared lease
/// of the name is live.
///
/// KEYS: lock, meta, store-wide counter, legacy per-name counter, marker, fence,
/// shared holders, waiting writers.
/// ARGV: owner, TTL ms, metadata, longest TTL the client knows (ms), server run
/// id (`''`: unknown), retention of released state (ms), this acquire's waiter
/// id (`''`: it does not wait), channel to announce the grant on (`''`: none).
///
/// Returns `{1, token, longest_ttl, 0}` when granted, `{0, pttl, longest_ttl,
/// marked}` when held or fenced (`pttl` -1: no TTL; `marked` 1: the waiter was
/// recorded as a waiting writer, which keeps new readers out until it is
/// granted, gives up, or stops refreshing the mark). A waiter is marked when
/// live shared leases block it, and keeps (refreshes) its mark while the fence
/// or another exclusive lease blocks it, or when the name has shared holders'
/// state: readers never overtake a writer that still waits.
///
/// The token is above the store-wide counter, the name's legacy per-name
/// counter and its last token of any kind (all kept ≤ every token issued), and
/// no lower than the server's clock in microseconds: after a loss of the
/// counter the clock still puts new tokens above the old ones (as long as it
/// does not step back, and fewer than one grant per microsecond was made on
/// average).
///
/// The shared holders are looked at with one `ZRANGE` (their latest end):
/// the cost of readers and permits to a name that never has any.
pub(crate) const ACQUIRE: &str = concat!(
    prelude!(),
    marks!(),
    epoch!(),
    r"
local ttl = tonumber(ARGV[2])
",
    grant_reads!(),
    r"-- The latest-ending shared holder, if the name has any (a sorted set is
-- never empty: it exists only while it has members).
local latest = read(KEYS[7], 'zset', 'ZRANGE', KEYS[7], -1, -1, 'WITHSCORES') or {}
local has_holders = latest[1] and true or false
local waiter = ARGV[7]
local has_writers = waiter ~= '' and need(KEYS[8], 'zset')
local now_ms, now_us = now()
local token = math.max(counter + 1, legacy + 1, last + 1, now_us)
if token > MAX_EXACT and not bad then
  bad = 'lockbox: fencing tokens are exhausted: the next would pass 2^53 - 1; nothing was changed'
end
if bad then return redis.error_reply(bad) end
local longest = epoch_write(e, KEYS[5], KEYS[6], ARGV[5], math.max(tonumber(ARGV[4]), ttl), now_ms)
-- Records (or refreshes) this waiter as a waiting writer: 1 when it did.
local function mark()
  if waiter == '' then return 0 end
  local mark_ms = math.min(ttl, WAIT_MARK_MS)
  -- Lapsed marks (crashed writers) go: the set stays as small as the waiters.
  if has_writers then redis.call('ZREMRANGEBYSCORE', KEYS[8], '-inf', fmt(now_ms)) end
  redis.call('ZADD', KEYS[8], fmt(now_ms + mark_ms), waiter)
  extend(KEYS[8], mark_ms)
  return 1
end
-- Refused by the fence or another exclusive lease: a writer already marked
-- keeps its mark (else it would lapse while the writer still waits, and the
-- readers it held back would overtake it when that lease ends), and so does
-- one on a name with shared holders (they may come back in between). A
-- name that never had shared holders costs nothing more.
local function keep_mark()
  if waiter == '' then return 0 end
  if has_holders or (has_writers and redis.call('ZSCORE', KEYS[8], waiter)) then
    return mark()
  end
  return 0
end
if e.fenced then return {0, redis.call('PTTL', KEYS[6]), longest, keep_mark()} end
if held then return {0, redis.call('PTTL', KEYS[1]), longest, keep_mark()} end
if has_holders then
  -- The latest end of a shared lease: the name is free of them after it.
  local ends = tonumber(latest[2] or '0') or 0
  if ends > now_ms then return {0, ends - now_ms, longest, mark()} end
end
local tok = fmt(token)
redis.call('SET', KEYS[3], tok)
redis.call('SET', KEYS[1], tok .. '|' .. ARGV[1], 'PX', ARGV[2])
-- The store-wide counter now stands above the old per-name one.
if has_legacy then redis.call('DEL', KEYS[4]) end
local at = fmt(now_ms)
redis.call('HSET', KEYS[2], 'owner', ARGV[1], 'token', tok, 'metadata', ARGV[3],
  'acquired_ms', at, 'renewed_ms', at, 'released_ms', '')
redis.call('PEXPIRE', KEYS[2], fmt(ttl + tonumber(ARGV[6])))
-- Its mark, if it had one (none on a name without readers: no write).
if has_writers then redis.call('ZREM', KEYS[8], waiter) end
if ARGV[8] ~= '' then redis.call('PUBLISH', ARGV[8], 'granted') end
return {1, token, longest, 0}
"
);

/// Grants a shared lease — a reader, or a permit of a semaphore of `n` — if no
/// fence stands, no exclusive lease is live, the live shared leases are of the
/// same kind and (readers) no writer waits or (permits) fewer than `n` are
/// live and no earlier waiter is owed the free permit.
///
/// Each holder is a member `token|owner` of the name's holders (a sorted set
/// scored by its lease's end, in ms of the server's clock: a crashed holder's
/// lease ends by itself, and the set's own TTL is never below its latest
/// member's), with its details in the name's group hash (`kind`, and `m:`,
/// `a:`, `r:` + token: metadata, acquired, renewed). The meta key keeps `top`,
/// the name's last token of any kind, for the listing and as a floor for
/// tokens.
///
/// KEYS: lock, meta, store-wide counter, legacy per-name counter, marker,
/// fence, holders, group, waiting writers, permit queue.
/// ARGV: owner, TTL ms, metadata, longest TTL known (ms), server run id,
/// retention ms, kind (`shared` or `permits:N`), N (0 for readers), this
/// waiter's place in the queue (`''`: none yet), whether the acquire waits
/// (`1`), a nonce for a new place, channel to announce on (`''`: none).
///
/// Returns `{1, token, longest, ''}` when granted; `{0, wake_ms, longest,
/// place}` when refused (`wake_ms`: when what blocks it may end, -1 unknown;
/// `place`: its place in the permit queue, to pass on the next try, `''` for
/// none); `{2, live_n, longest, ''}` when the live shared leases are of another
/// kind (`live_n`: their permits, 0 for readers). Live holders whose kind is
/// unknown (the group key was lost: evicted, deleted) admit nobody until the
/// last of them ends; a kind that is neither `shared` nor `permits:N` is an
/// error naming the key.
///
/// Permit waiters queue in arrival order: the queue is a sorted set of places
/// `arrival_us|nonce` scored by when the place lapses unless refreshed
/// (its TTL, at most `WAIT_MARK_MS`), and a permit goes to a waiter only when fewer waiters
/// are ahead of it than permits are free, and to a newcomer only when more
/// permits are free than waiters queue.
pub(crate) const SHARED_ACQUIRE: &str = concat!(
    prelude!(),
    marks!(),
    epoch!(),
    r"
local ttl = tonumber(ARGV[2])
local n = tonumber(ARGV[8])
",
    grant_reads!(),
    r"local now_ms, now_us = now()
-- Live shared holders (an absent set counts none), and their kind.
local live = read(KEYS[7], 'zset', 'ZCOUNT', KEYS[7], '(' .. fmt(now_ms), '+inf') or 0
local kind = read(KEYS[8], 'hash', 'HGET', KEYS[8], 'kind')
-- What a reader queues behind: the waiting writers' marks that have not
-- lapsed (a lapsed mark is a writer that stopped waiting), by when the
-- last of them lapses. What a permit waiter counts: the places in the
-- queue that have not lapsed. Either set is small (one member per waiter)
-- and read whole, once; its lapsed members are removed, where the reader
-- or permit waiter gets to look at it, only when there are some.
local writers_end, queued, lapsed = 0, {}, false
if n == 0 then
  local w = read(KEYS[9], 'zset', 'ZRANGE', KEYS[9], 0, -1, 'WITHSCORES') or {}
  for i = 2, #w, 2 do
    local ends = tonumber(w[i])
    if ends > now_ms then writers_end = math.max(writers_end, ends) else lapsed = true end
  end
  need(KEYS[10], 'zset')
else
  need(KEYS[9], 'zset')
  local q = read(KEYS[10], 'zset', 'ZRANGE', KEYS[10], 0, -1, 'WITHSCORES') or {}
  for i = 1, #q, 2 do
    if tonumber(q[i + 1]) > now_ms then queued[#queued + 1] = q[i] else lapsed = true end
  end
end
-- The live holders' kind and count (0: readers); nil when its key is lost.
local live_kind, live_n
if live > 0 and kind then live_kind = kind end
if live_kind then
  if live_kind == 'shared' then
    live_n = 0
  else
    live_n = tonumber(string.match(live_kind, '^permits:(%d+)$') or '')
    if (not live_n or live_n < 1 or live_n > 4294967295) and not bad then
      bad = 'lockbox: key ' .. KEYS[8] .. ' holds kind ' .. live_kind ..
        ', neither shared nor permits:N; nothing was changed'
    end
  end
end
local token = math.max(counter + 1, legacy + 1, last + 1, now_us)
if token > MAX_EXACT and not bad then
  bad = 'lockbox: fencing tokens are exhausted: the next would pass 2^53 - 1; nothing was changed'
end
if bad then return redis.error_reply(bad) end
local longest = epoch_write(e, KEYS[5], KEYS[6], ARGV[5], math.max(tonumber(ARGV[4]), ttl), now_ms)
local place = ARGV[9]
-- Refused: a permit waiter takes (or keeps) its place in the queue.
local function refuse(wake)
  if n > 0 and ARGV[10] == '1' then
    if place == '' then place = string.format('%016.0f', now_us) .. '|' .. ARGV[11] end
    local mark_ms = math.min(ttl, WAIT_MARK_MS)
    redis.call('ZADD', KEYS[10], fmt(now_ms + mark_ms), place)
    extend(KEYS[10], mark_ms)
  end
  return {0, wake, longest, place}
end
if e.fenced then return refuse(redis.call('PTTL', KEYS[6])) end
purge(KEYS[7], KEYS[8], now_ms)
if live > 0 then
  if not live_kind then
    -- Live holders of a kind nobody knows (their group key was lost): they
    -- could be readers or permits of any count, so nothing joins them until
    -- the last of them ends.
    local latest = redis.call('ZRANGE', KEYS[7], -1, -1, 'WITHSCORES')
    return refuse(tonumber(latest[2]) - now_ms)
  end
  if live_kind ~= ARGV[7] then
    if place ~= '' then redis.call('ZREM', KEYS[10], place) end
    return {2, live_n, longest, ''}
  end
end
if held then return refuse(redis.call('PTTL', KEYS[1])) end
if n == 0 then
  -- Readers queue behind a waiting writer.
  if lapsed then redis.call('ZREMRANGEBYSCORE', KEYS[9], '-inf', fmt(now_ms)) end
  if writers_end > now_ms then return refuse(writers_end - now_ms) end
else
  if lapsed then redis.call('ZREMRANGEBYSCORE', KEYS[10], '-inf', fmt(now_ms)) end
  table.sort(queued)
  local ahead = #queued
  for i, m in ipairs(queued) do
    if m == place then ahead = i - 1; break end
  end
  if live + ahead >= n then
    local wake = math.min(ttl, WAIT_MARK_MS)
    if live >= n then
      -- The earliest end of a live permit: one is free then at the latest.
      local first = redis.call('ZRANGEBYSCORE', KEYS[7], '(' .. fmt(now_ms), '+inf',
        'WITHSCORES', 'LIMIT', 0, 1)
      if first[2] then wake = tonumber(first[2]) - now_ms end
    end
    return refuse(wake)
  end
end
local tok = fmt(token)
redis.call('SET', KEYS[3], tok)
redis.call('ZADD', KEYS[7], fmt(now_ms + ttl), tok .. '|' .. ARGV[1])
extend(KEYS[7], ttl)
local at = fmt(now_ms)
redis.call('HSET', KEYS[8], 'kind', ARGV[7], 'm:' .. tok, ARGV[3], 'a:' .. tok, at, 'r:' .. tok, at)
extend(KEYS[8], ttl)
if has_legacy then redis.call('DEL', KEYS[4]) end
redis.call('HSET', KEYS[2], 'top', tok)
extend(KEYS[2], ttl + tonumber(ARGV[6]))
if place ~= '' then redis.call('ZREM', KEYS[10], place) end
if ARGV[12] ~= '' then redis.call('PUBLISH', ARGV[12], 'granted') end
return {1, token, longest, ''}
"
);

/// A waiter that gives up: drops its mark (a waiting writer's, or a permit
/// waiter's place) and wakes the name's waiters, whom the mark held back.
/// KEYS: the set holding the mark. ARGV: the mark, channel. Returns 1.
pub(crate) const CANCEL_WAIT: &str = r"
if redis.call('TYPE', KEYS[1])['ok'] == 'zset' then
  redis.call('ZREM', KEYS[1], ARGV[1])
end
redis.call('PUBLISH', ARGV[2], 'gave-up')
return 1
";

/// Extends the lease only while it is still ours and live; never re-creates
/// it. An exclusive lease: the lock key holds our `token|owner`. A shared one:
/// our `token|owner` is a member of the holders whose lease has not ended by
/// the server's clock. KEYS: lock, meta, marker, holders, group. ARGV:
/// `token|owner`, TTL ms, retention ms. Returns 1 when renewed, 0 when the
/// lease is not ours.
pub(crate) const RENEW: &str = concat!(
    prelude!(),
    marks!(),
    r"
local ttl = tonumber(ARGV[2])
local held = read(KEYS[1], 'string', 'GET', KEYS[1])
local has_meta = has_any(read(KEYS[2], 'hash', 'HMGET', KEYS[2], unpack(META_FIELDS)))
-- The marker is only raised where it stands (a missing one is the next
-- acquire's business: it starts a lock-delay).
local r = read(KEYS[3], 'hash', 'HMGET', KEYS[3], 'run_id', 'max_ttl', 'since_ms') or {}
local has_marker = has_any(r)
local recorded = soft_int(r[2])
if bad then return redis.error_reply(bad) end
if held == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  local now_ms = now()
  if has_meta then
    redis.call('HSET', KEYS[2], 'renewed_ms', fmt(now_ms))
    redis.call('PEXPIRE', KEYS[2], fmt(ttl + tonumber(ARGV[3])))
  end
  if has_marker and ttl > recorded then redis.call('HSET', KEYS[3], 'max_ttl', fmt(ttl)) end
  return 1
end
-- Not the exclusive holder: perhaps a shared one.
local has_holders = need(KEYS[4], 'zset')
need(KEYS[5], 'hash')
if bad then return redis.error_reply(bad) end
if not has_holders then return 0 end
local score = redis.call('ZSCORE', KEYS[4], ARGV[1])
local now_ms = now()
-- Ended (by the server's clock) is not ours any more, even if not yet purged.
if not score or tonumber(score) <= now_ms then return 0 end
redis.call('ZADD', KEYS[4], 'XX', fmt(now_ms + ttl), ARGV[1])
extend(KEYS[4], ttl)
local tok = member_token(ARGV[1])
if tok then redis.call('HSET', KEYS[5], 'r:' .. tok, fmt(now_ms)) end
extend(KEYS[5], ttl)
if has_meta then extend(KEYS[2], ttl + tonumber(ARGV[3])) end
if has_marker and ttl > recorded then redis.call('HSET', KEYS[3], 'max_ttl', fmt(ttl)) end
return 1
"
);

/// Ends the lease only while it is ours, keeps the name's state for the
/// retention period only, and wakes waiters. KEYS: lock, meta, holders, group.
/// ARGV: `token|owner`, channel, retention ms. Returns 1 when released, 2 when
/// it was a shared lease of ours that had already ended (now removed), 0 when
/// the lease was not ours.
pub(crate) const RELEASE: &str = concat!(
    prelude!(),
    r"
local held = read(KEYS[1], 'string', 'GET', KEYS[1])
local has_meta = has_any(read(KEYS[2], 'hash', 'HMGET', KEYS[2], unpack(META_FIELDS)))
if bad then return redis.error_reply(bad) end
if held == ARGV[1] then
  redis.call('DEL', KEYS[1])
  if has_meta then
    redis.call('HSET', KEYS[2], 'released_ms', fmt(now()))
    redis.call('PEXPIRE', KEYS[2], ARGV[3])
  end
  redis.call('PUBLISH', ARGV[2], '1')
  return 1
end
local has_holders = need(KEYS[3], 'zset')
need(KEYS[4], 'hash')
if bad then return redis.error_reply(bad) end
if not has_holders then return 0 end
local score = redis.call('ZSCORE', KEYS[3], ARGV[1])
if not score then return 0 end
redis.call('ZREM', KEYS[3], ARGV[1])
local tok = member_token(ARGV[1])
if tok then redis.call('HDEL', KEYS[4], 'm:' .. tok, 'a:' .. tok, 'r:' .. tok) end
redis.call('PUBLISH', ARGV[2], '1')
if tonumber(score) <= now() then return 2 end
return 1
"
);

/// The data-loss check alone (at build and in health). KEYS: marker, fence.
/// ARGV: server run id, longest TTL the client knows (ms). Returns
/// `{fence_pttl, longest_ttl}` (`fence_pttl` -2: no fence).
pub(crate) const EPOCH: &str = concat!(
    prelude!(),
    epoch!(),
    r"
local e = epoch_read(KEYS[1], KEYS[2])
if bad then return redis.error_reply(bad) end
local now_ms = now()
local longest = epoch_write(e, KEYS[1], KEYS[2], ARGV[1], tonumber(ARGV[2]), now_ms)
return {redis.call('PTTL', KEYS[2]), longest}
"
);

/// Reads a batch of names in one round trip. KEYS: meta, lock, holders and
/// group key of each name, in fours. Returns per name `{fields, lock value or
/// '', lock pttl, holders with scores, group fields, server ms}`; keys of
/// another type read as absent.
pub(crate) const LIST: &str = r"
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
for i = 1, #KEYS - 3, 4 do
  local fields, value, pttl, holders, group = {}, '', -2, {}, {}
  if redis.call('TYPE', KEYS[i])['ok'] == 'hash' then
    fields = redis.call('HGETALL', KEYS[i])
  end
  if redis.call('TYPE', KEYS[i + 1])['ok'] == 'string' then
    value = redis.call('GET', KEYS[i + 1])
    pttl = redis.call('PTTL', KEYS[i + 1])
  end
  if redis.call('TYPE', KEYS[i + 2])['ok'] == 'zset' then
    holders = redis.call('ZRANGE', KEYS[i + 2], 0, -1, 'WITHSCORES')
  end
  if redis.call('TYPE', KEYS[i + 3])['ok'] == 'hash' then
    group = redis.call('HGETALL', KEYS[i + 3])
  end
  out[#out + 1] = {fields, value, pttl, holders, group, string.format('%.0f', now_ms)}
end
return out
";

/// An operator's forced release: ends every live lease of the name — the
/// exclusive one (the lock key, whoever holds it) and every live shared one —
/// keeps the name's state (its last token) and the store-wide counter, so the
/// next grant's token is above the ended ones, and wakes waiters. The
/// holders' next renewals find their leases gone (not their own) and report
/// the loss. KEYS: lock, meta, holders, group. ARGV: channel, retention ms.
/// Returns `{1, token}` when a lease was ended (`token`: the highest ended,
/// 0 when no value names one), `{0, 0}` when none was live.
pub(crate) const FORCE_RELEASE: &str = concat!(
    prelude!(),
    r"
need(KEYS[1], 'string')
local has_meta = need(KEYS[2], 'hash')
local has_holders = need(KEYS[3], 'zset')
need(KEYS[4], 'hash')
if bad then return redis.error_reply(bad) end
local ended, top = false, 0
local now_ms = now()
local v = redis.call('GET', KEYS[1])
if v then
  top = soft_int(string.match(v, '^(%d+)|'))
  ended = true
  redis.call('DEL', KEYS[1])
  if has_meta then
    redis.call('HSET', KEYS[2], 'released_ms', fmt(now_ms))
    redis.call('PEXPIRE', KEYS[2], ARGV[2])
  end
end
if has_holders then
  local live = redis.call('ZRANGEBYSCORE', KEYS[3], '(' .. fmt(now_ms), '+inf')
  for _, m in ipairs(live) do
    ended = true
    top = math.max(top, soft_int(member_token(m)))
  end
  redis.call('DEL', KEYS[3], KEYS[4])
end
if not ended then return {0, 0} end
redis.call('PUBLISH', ARGV[1], '1')
return {1, top}
"
);
