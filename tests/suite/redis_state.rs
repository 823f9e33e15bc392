//! What Redis scripts write: nothing when they fail (17.14); tokens written
//! exactly from 10^14 up to 2^53 − 1, and refused past it (17.15); per-name
//! state reclaimed without letting a token repeat or go back, including across
//! the move from per-name counters (17.16).

use crate::common;

use std::time::{Duration, Instant};

use common::redis_server::{RedisServer, redis_url};
use common::*;
use lockbox::{LockClient, LostReason};

/// Every key and its serialized value.
fn snapshot(c: &mut redis::Connection) -> Vec<(String, Vec<u8>)> {
    let mut keys: Vec<String> = redis::cmd("KEYS").arg("*").query(c).unwrap();
    keys.sort();
    keys.into_iter()
        .map(|k| {
            let dump: Vec<u8> = redis::cmd("DUMP").arg(&k).query(c).unwrap();
            (k, dump)
        })
        .collect()
}

/// A key every grant (exclusive or shared) reads, broken in each way that
/// must fail it: a wrong type, or a counter that is no integer.
const GRANT_BREAKAGES: [&[&str]; 9] = [
    &["SET", "lockbox:meta:n", "not a hash"],
    &["SET", "lockbox:holders:n", "not a sorted set"],
    &["HSET", "lockbox:lock:n", "f", "v"],
    &["RPUSH", "lockbox:token", "x"],
    &["SET", "lockbox:token", "not a number"],
    &["SET", "lockbox:token:n", "-5"],
    &["SADD", "lockbox:token:n", "x"],
    &["SET", "lockbox:epoch", "not a hash"],
    &["HSET", "lockbox:fence", "f", "v"],
];

/// Breaks the key `breakage` names (the command's first argument) with that
/// command, checks that each of `attempts` then fails naming the key and
/// writes nothing, and puts the key back as it was.
fn fails_and_writes_nothing(
    c: &mut redis::Connection,
    breakage: &[&str],
    attempts: &mut [(&str, &mut dyn FnMut() -> lockbox::Result<bool>)],
) {
    let key = breakage[1];
    let saved: Option<Vec<u8>> = redis::cmd("DUMP").arg(key).query(c).unwrap();
    redis::cmd("DEL").arg(key).query::<i64>(c).unwrap();
    let mut cmd = redis::cmd(breakage[0]);
    for arg in &breakage[1..] {
        cmd.arg(*arg);
    }
    cmd.query::<redis::Value>(c).unwrap();
    let before = snapshot(c);
    for (what, attempt) in attempts.iter_mut() {
        let err = attempt().expect_err(&format!("{what}: {breakage:?}"));
        assert!(err.to_string().contains(key), "{what}: {breakage:?}: {err}");
        assert_eq!(snapshot(c), before, "{what}: {breakage:?} left writes");
    }
    redis::cmd("DEL").arg(key).query::<i64>(c).unwrap();
    if let Some(dump) = saved {
        redis::cmd("RESTORE")
            .arg(key)
            .arg(0)
            .arg(dump)
            .query::<String>(c)
            .unwrap();
    }
}

/// An acquire that finds any key it touches of the wrong type (or a counter
/// that is not an integer) fails and changes nothing. Before: with a wrong-typed
/// metadata key the counter was incremented and the lock key written, leaving
/// a lock owned by nobody.
#[test]
fn a_failing_acquire_writes_nothing() {
    let s = RedisServer::start().unwrap();
    let client = LockClient::redis(&s.url).ttl(ms(1000)).build().unwrap();
    drop(client.try_lock("n").unwrap().unwrap());
    let mut c = s.connection();
    for breakage in GRANT_BREAKAGES {
        let mut try_lock = || client.try_lock("n").map(|l| l.is_some());
        fails_and_writes_nothing(&mut c, breakage, &mut [("lock", &mut try_lock)]);
    }
    drop(
        client
            .try_lock("n")
            .unwrap()
            .expect("works again once repaired"),
    );
}

/// A reader's or a permit's acquire that finds any of its keys of the wrong
/// type, or a counter that is no integer, fails naming the key and writes
/// nothing. The shared acquire checks types with the reads it makes anyway
/// (the writers' marks for a reader, the queue for a permit), and with a
/// `TYPE` only for the set it does not read.
#[test]
fn a_failing_shared_acquire_writes_nothing() {
    let s = RedisServer::start().unwrap();
    let client = LockClient::redis(&s.url).ttl(ms(1000)).build().unwrap();
    let rw = client.rwlock("n").unwrap();
    let sem = client.semaphore("n", 2).unwrap();
    drop(rw.try_read().unwrap().unwrap());
    let mut c = s.connection();
    let shared: [&[&str]; 4] = [
        &["SET", "lockbox:group:n", "not a hash"],
        &["SET", "lockbox:writers:n", "not a sorted set"],
        &["SET", "lockbox:queue:n", "not a sorted set"],
        &["HSET", "lockbox:queue:n", "f", "v"],
    ];
    for breakage in GRANT_BREAKAGES.into_iter().chain(shared) {
        let mut read = || rw.try_read().map(|g| g.is_some());
        let mut permit = || sem.try_acquire().map(|p| p.is_some());
        fails_and_writes_nothing(
            &mut c,
            breakage,
            &mut [("reader", &mut read), ("permit", &mut permit)],
        );
    }
    drop(rw.try_read().unwrap().expect("works again once repaired"));
    drop(
        sem.try_acquire()
            .unwrap()
            .expect("works again once repaired"),
    );
}

/// A reader that looks at the waiting writers' marks removes the lapsed ones
/// (writers that stopped waiting), so such a writer's next try does not find
/// its old mark and keep it: readers would then queue behind a writer that
/// had given up. (Seen failing with a script that read only the latest mark.)
#[test]
fn a_reader_removes_lapsed_writers_marks() {
    let s = RedisServer::start().unwrap();
    let client = LockClient::redis(&s.url).ttl(ms(10_000)).build().unwrap();
    let rw = client.rwlock("n").unwrap();
    let mut c = s.connection();
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query(&mut c).unwrap();
    let now_ms = secs * 1000 + micros / 1000;
    redis::cmd("ZADD")
        .arg("lockbox:writers:n")
        .arg(now_ms - 1_000)
        .arg("gave-up")
        .arg(now_ms + 60_000)
        .arg("still-waiting")
        .query::<i64>(&mut c)
        .unwrap();
    assert!(
        rw.try_read().unwrap().is_none(),
        "a waiting writer holds readers back"
    );
    let marks: Vec<String> = redis::cmd("ZRANGE")
        .arg("lockbox:writers:n")
        .arg(0)
        .arg(-1)
        .query(&mut c)
        .unwrap();
    assert_eq!(marks, ["still-waiting"]);
}

/// A release that finds the metadata key of the wrong type fails and changes
/// nothing: the lock key stays ours (a later release, once the key is
/// repaired, ends it). The scripts check types with the reads they make
/// anyway; this is the release's.
#[test]
fn a_failing_release_writes_nothing() {
    let s = RedisServer::start().unwrap();
    let client = LockClient::redis(&s.url).ttl(ms(1000)).build().unwrap();
    let mut c = s.connection();
    let lock = client.try_lock("n").unwrap().unwrap();
    let value = format!("{}|{}", lock.fencing_token(), client.owner_id());
    redis::cmd("SET")
        .arg("lockbox:meta:n")
        .arg("not a hash")
        .query::<()>(&mut c)
        .unwrap();
    let before = snapshot(&mut c);
    let err = lock.release().expect_err("released past a broken key");
    assert!(err.to_string().contains("lockbox:meta:n"), "{err}");
    let mut after = snapshot(&mut c);
    // The lock key's TTL may have been renewed meanwhile: compare values.
    let held: Option<String> = redis::cmd("GET")
        .arg("lockbox:lock:n")
        .query(&mut c)
        .unwrap();
    assert_eq!(
        held.as_deref(),
        Some(value.as_str()),
        "the lock key was touched"
    );
    after.retain(|(k, _)| k != "lockbox:lock:n");
    let mut before = before;
    before.retain(|(k, _)| k != "lockbox:lock:n");
    assert_eq!(after, before, "the failed release left partial writes");
}

/// A renewal that finds the metadata key of the wrong type fails without
/// extending the lock key (before: it extended it, then failed): the key
/// expires when the lease granted before the breakage ends.
#[test]
fn a_failing_renewal_writes_nothing() {
    let ttl = ms(1000);
    let client = LockClient::redis(redis_url()).ttl(ttl).build().unwrap();
    let name = unique("redis-bad-meta");
    let lock = client.try_lock(&name).unwrap().unwrap();
    let mut c = redis::Client::open(redis_url())
        .unwrap()
        .get_connection()
        .unwrap();
    let broken_at = Instant::now();
    redis::cmd("SET")
        .arg(format!("lockbox:meta:{name}"))
        .arg("not a hash")
        .query::<String>(&mut c)
        .unwrap();
    assert_eq!(lock.lost().recv_timeout(ttl * 2), Ok(LostReason::Expired));
    assert!(client.metrics().renewals_failed >= 1);
    assert!(eventually(ttl * 3, || {
        !redis::cmd("EXISTS")
            .arg(format!("lockbox:lock:{name}"))
            .query::<bool>(&mut c)
            .unwrap()
    }));
    let gone_after = broken_at.elapsed();
    assert!(
        gone_after <= ttl + ms(100),
        "a failed renewal extended the key: gone {gone_after:?} after the breakage"
    );
}

/// Tokens from 10^14 up are written exactly (before: Lua wrote `1e+14`, so the
/// first renewal found someone else's value and the lock was lost at once).
#[test]
fn a_token_above_1e14_is_written_exactly_and_renewed() {
    let ttl = ms(300);
    let client = LockClient::redis(redis_url()).ttl(ttl).build().unwrap();
    let name = unique("redis-big-token");
    let mut c = redis::Client::open(redis_url())
        .unwrap()
        .get_connection()
        .unwrap();
    // The per-name counter of earlier versions, at 10^14.
    redis::cmd("SET")
        .arg(format!("lockbox:token:{name}"))
        .arg(100_000_000_000_000u64)
        .query::<String>(&mut c)
        .unwrap();
    let lock = client.try_lock(&name).unwrap().unwrap();
    assert!(lock.fencing_token() > 100_000_000_000_000);
    let value: String = redis::cmd("GET")
        .arg(format!("lockbox:lock:{name}"))
        .query(&mut c)
        .unwrap();
    assert_eq!(
        value,
        format!("{}|{}", lock.fencing_token(), client.owner_id())
    );
    assert!(eventually(ttl * 4, || client.metrics().renewals_ok >= 3));
    assert!(lock.is_held(), "lost: {:?}", lock.lost_reason());
    lock.release().unwrap();
}

/// Up to 2^53 − 1 (the largest integer Redis' Lua holds exactly) tokens are
/// exact and renewable; past it acquires fail and write nothing.
#[test]
fn tokens_are_exact_up_to_2_pow_53_and_refused_past_it() {
    let s = RedisServer::start().unwrap();
    let mut c = s.connection();
    const MAX: u64 = (1 << 53) - 1;
    redis::cmd("SET")
        .arg("lockbox:token")
        .arg(MAX - 2)
        .query::<String>(&mut c)
        .unwrap();
    let ttl = ms(300);
    let client = LockClient::redis(&s.url).ttl(ttl).build().unwrap();
    for expected in [MAX - 1, MAX] {
        let lock = client.try_lock("edge").unwrap().unwrap();
        assert_eq!(lock.fencing_token(), expected);
        let renewed = client.metrics().renewals_ok;
        assert!(eventually(ttl * 4, || client.metrics().renewals_ok >= renewed + 2));
        assert!(lock.is_held(), "lost: {:?}", lock.lost_reason());
        lock.release().unwrap();
    }
    let before = snapshot(&mut c);
    let err = client.try_lock("edge").unwrap_err();
    assert!(err.to_string().contains("exhausted"), "{err}");
    assert_eq!(snapshot(&mut c), before);
}

/// Released names leave no counter behind and their state expires; once it is
/// reclaimed, tokens still go up. Earlier per-name counters are honoured, then
/// removed.
#[test]
fn per_name_state_is_reclaimed_and_tokens_still_increase() {
    const RETENTION_MS: i64 = 5 * 60 * 1000; // RELEASED_RETENTION
    let s = RedisServer::start().unwrap();
    let mut c = s.connection();
    let ttl = ms(2000);
    let client = LockClient::redis(&s.url).ttl(ttl).build().unwrap();
    let mut last = 0;
    for i in 0..50 {
        let name = format!("order-{i}");
        let lock = client.try_lock(&name).unwrap().unwrap();
        assert!(lock.fencing_token() > last);
        last = lock.fencing_token();
        let held: i64 = redis::cmd("PTTL")
            .arg(format!("lockbox:meta:{name}"))
            .query(&mut c)
            .unwrap();
        assert!(held > 0 && held <= 2000 + RETENTION_MS, "{held}");
        lock.release().unwrap();
        let kept: i64 = redis::cmd("PTTL")
            .arg(format!("lockbox:meta:{name}"))
            .query(&mut c)
            .unwrap();
        assert!(kept > 0 && kept <= RETENTION_MS, "{kept}");
    }
    let counters: Vec<String> = redis::cmd("KEYS")
        .arg("lockbox:token:*")
        .query(&mut c)
        .unwrap();
    assert!(counters.is_empty(), "per-name counters: {counters:?}");
    let locks: Vec<String> = redis::cmd("KEYS")
        .arg("lockbox:lock:*")
        .query(&mut c)
        .unwrap();
    assert!(locks.is_empty(), "{locks:?}");
    assert_eq!(client.leases().unwrap().len(), 50);

    // The retention ends (forced): the state is gone, tokens still go up.
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("lockbox:meta:*")
        .query(&mut c)
        .unwrap();
    for k in &keys {
        redis::cmd("PEXPIRE")
            .arg(k)
            .arg(1)
            .query::<i64>(&mut c)
            .unwrap();
    }
    assert!(eventually(Duration::from_secs(2), || client
        .leases()
        .unwrap()
        .is_empty()));
    let again = client.try_lock("order-0").unwrap().unwrap();
    assert!(again.fencing_token() > last);
    last = again.fencing_token();
    again.release().unwrap();

    // A per-name counter of an earlier version, far ahead: honoured, then gone.
    let ahead = last + 1_000_000_000_000;
    redis::cmd("SET")
        .arg("lockbox:token:legacy")
        .arg(ahead)
        .query::<String>(&mut c)
        .unwrap();
    let lock = client.try_lock("legacy").unwrap().unwrap();
    assert!(lock.fencing_token() > ahead);
    let left: bool = redis::cmd("EXISTS")
        .arg("lockbox:token:legacy")
        .query(&mut c)
        .unwrap();
    assert!(!left, "the legacy counter was not removed");
    let other = client.try_lock("order-1").unwrap().unwrap();
    assert!(other.fencing_token() > lock.fencing_token());
}

/// Odd values where lockbox keeps its state — timestamps past the end of
/// time, negative or garbage fields, a lock that expires in ages — are shown
/// or waited on, never a panic (before: a timestamp past `SystemTime`'s range
/// panicked in `leases()`).
#[test]
fn odd_values_in_the_store_never_panic() {
    let client = LockClient::redis(redis_url())
        .ttl(ms(1000))
        .build()
        .unwrap();
    let mut c = redis::Client::open(redis_url())
        .unwrap()
        .get_connection()
        .unwrap();
    let name = unique("redis-odd");
    redis::cmd("HSET")
        .arg(format!("lockbox:meta:{name}"))
        .arg(&[
            ("owner", "x"),
            ("token", "-3"),
            ("acquired_ms", "18446744073709551615"),
            ("renewed_ms", "99999999999999999999999"),
            ("released_ms", "18446744073709551615"),
        ])
        .query::<i64>(&mut c)
        .unwrap();
    let info = client.lease(&name).unwrap().expect("listed");
    assert_eq!(info.fencing_token, 0);
    assert!(client.leases().unwrap().iter().any(|l| l.name == name));
    // A lock that runs for a thousand years: waiters time out as asked.
    redis::cmd("HSET")
        .arg(format!("lockbox:meta:{name}"))
        .arg("released_ms")
        .arg("")
        .query::<i64>(&mut c)
        .unwrap();
    redis::cmd("SET")
        .arg(format!("lockbox:lock:{name}"))
        .arg("7|someone")
        .arg("PX")
        .arg(31_536_000_000_000u64)
        .query::<String>(&mut c)
        .unwrap();
    assert!(
        client
            .lock_timeout(&name, ms(200))
            .unwrap_err()
            .is_timeout()
    );
    assert!(client.lease(&name).unwrap().is_some());
    redis::cmd("DEL")
        .arg(format!("lockbox:lock:{name}"))
        .query::<i64>(&mut c)
        .unwrap();
}
