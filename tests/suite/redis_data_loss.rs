//! Redis data loss: evicting `maxmemory-policy`s are refused at build (unless
//! allowed) and reported by health; a restart without persistence, or one that
//! reloads an older snapshot, gives the store a lock-delay of the longest TTL in
//! use, with tokens above every earlier one, and the old holder's renewal
//! reports the loss.

use crate::common;

use std::time::{Duration, Instant};

use common::redis_server::RedisServer;
use common::*;
use lockbox::{Error, LockClient, LostReason};

#[test]
fn an_evicting_policy_is_refused_at_build_unless_allowed_and_health_reports_it() {
    for policy in [
        "allkeys-lru",
        "volatile-lru",
        "volatile-ttl",
        "allkeys-random",
    ] {
        let s = RedisServer::start_with(&["--maxmemory-policy", policy]).unwrap();
        match LockClient::redis(&s.url).build() {
            Err(Error::Unsupported(msg)) => {
                assert!(
                    msg.contains("maxmemory-policy") && msg.contains(policy),
                    "{msg}"
                );
                assert!(msg.contains("allow_evicting_redis"), "{msg}");
            }
            other => panic!("{policy}: expected a refusal, got {other:?}"),
        }
        let client = LockClient::redis(&s.url)
            .allow_evicting_redis(true)
            .build()
            .expect("allowed");
        let health = client.health();
        let reported = health.database.warnings.join("; ");
        assert!(health.database.reachable);
        assert!(reported.contains(policy), "{health:?}");
        // Allowed, so a warning: Degraded, not Unhealthy.
        assert_eq!(health.status, lockbox::HealthStatus::Degraded, "{health}");
        drop(client.try_lock("still works").unwrap().unwrap());
    }
}

/// The policy can change after build: health says so.
#[test]
fn health_reports_a_policy_changed_after_build() {
    let s = RedisServer::start().unwrap();
    let client = LockClient::redis(&s.url).build().unwrap();
    assert_eq!(client.health().database.error, None);
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory-policy")
        .arg("volatile-lfu")
        .query::<String>(&mut s.connection())
        .unwrap();
    let health = client.health();
    let error = health.database.error.clone().unwrap_or_default();
    assert!(error.contains("volatile-lfu"), "{error}");
    // Not allowed: locking is unsafe.
    assert_eq!(health.status, lockbox::HealthStatus::Unhealthy, "{health}");
}

/// Holds a lock on `s` with client `a` (TTL `ttl_a`), restarts the server the
/// way `restart` does, and checks that `b` (a short-TTL client built before)
/// is not granted the lock before `a`'s lease would have ended, that its token
/// is above `a`'s, and that `a`'s renewal reports the loss.
fn lock_delay_after(mut s: RedisServer, restart: impl FnOnce(&mut RedisServer)) {
    let ttl_a = ms(2000);
    let a = LockClient::redis(&s.url).ttl(ttl_a).build().unwrap();
    let b = LockClient::redis(&s.url).ttl(ms(500)).build().unwrap();
    // `b` learns from the store that TTLs of 2 s are in use.
    drop(b.try_lock("warm-up").unwrap().unwrap());
    let name = unique("redis-restart");
    let held = a.try_lock(&name).unwrap().unwrap();
    let killed_at = Instant::now();
    restart(&mut s);
    let next = b
        .lock_timeout(&name, Duration::from_secs(8))
        .expect("granted after the lock-delay");
    let granted_after = killed_at.elapsed();
    // `a`'s lease ended at most `ttl_a` after the kill (it was renewed before).
    assert!(
        granted_after >= ttl_a,
        "granted {granted_after:?} after the restart, while the old lease could still run"
    );
    assert!(
        next.fencing_token() > held.fencing_token(),
        "token {} after {}",
        next.fencing_token(),
        held.fencing_token()
    );
    assert_eq!(
        held.lost().recv_timeout(ms(100)),
        Ok(LostReason::NotOwner),
        "the old holder's renewal did not report the loss"
    );
    next.release().unwrap();
}

#[test]
fn a_restart_without_persistence_gives_a_lock_delay_and_higher_tokens() {
    lock_delay_after(RedisServer::start().unwrap(), |s| {
        s.kill();
        s.run().unwrap();
    });
}

/// The snapshot was taken before the lock was granted: the restarted server
/// has the marker but not the lock. Its new run id gives it away.
#[test]
fn a_restart_from_an_older_snapshot_gives_a_lock_delay() {
    let dir = std::env::temp_dir().join(unique("lockbox-rdb"));
    std::fs::create_dir_all(&dir).unwrap();
    let s = RedisServer::start_with(&["--dir", &dir.display().to_string()]).unwrap();
    let mut snapshot_taken = false;
    lock_delay_after(s, |s| {
        // (Called after the lock was granted: snapshot, then drop the lock key,
        // so that what reloads is the store as it was before the grant.)
        let mut c = s.connection();
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("lockbox:lock:redis-restart-*")
            .query(&mut c)
            .unwrap();
        let saved: Vec<(String, Vec<u8>, i64)> = keys
            .iter()
            .map(|k| {
                let dump: Vec<u8> = redis::cmd("DUMP").arg(k).query(&mut c).unwrap();
                let pttl: i64 = redis::cmd("PTTL").arg(k).query(&mut c).unwrap();
                (k.clone(), dump, pttl)
            })
            .collect();
        redis::cmd("DEL").arg(&keys).query::<i64>(&mut c).unwrap();
        redis::cmd("SAVE").query::<String>(&mut c).unwrap();
        for (k, dump, pttl) in saved {
            redis::cmd("RESTORE")
                .arg(k)
                .arg(pttl)
                .arg(dump)
                .query::<String>(&mut c)
                .unwrap();
        }
        snapshot_taken = true;
        s.kill();
        s.run().unwrap();
    });
    assert!(snapshot_taken);
    let _ = std::fs::remove_dir_all(&dir);
}
