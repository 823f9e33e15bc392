//! Redis-specific faults: the key deleted or overwritten behind the holder's back
//! (loss is signalled, nothing is stolen or re-created), a waiter whose wake-up
//! message never comes, and a Redis restart while locks are held.

use crate::common;

use std::time::{Duration, Instant};

use common::redis_server::{RedisServer, redis_url};
use common::*;
use lockbox::{LockClient, LostReason};

fn redis() -> redis::Connection {
    redis::Client::open(redis_url())
        .unwrap()
        .get_connection()
        .unwrap()
}

fn client(ttl: Duration) -> LockClient {
    LockClient::redis(redis_url()).ttl(ttl).build().unwrap()
}

#[test]
fn a_deleted_key_is_a_signalled_loss_and_is_not_recreated() {
    let name = unique("redis-del");
    let holder = client(ms(900));
    let lock = holder.try_lock(&name).unwrap().unwrap();
    let key = format!("lockbox:lock:{name}");
    redis::cmd("DEL")
        .arg(&key)
        .query::<i64>(&mut redis())
        .unwrap();
    assert_eq!(lock.lost().recv_timeout(ms(900)), Ok(LostReason::NotOwner));
    let value: Option<String> = redis::cmd("GET").arg(&key).query(&mut redis()).unwrap();
    assert_eq!(value, None, "a renewal re-created the key");
    assert!(lock.release().unwrap_err().is_lock_lost());
}

#[test]
fn an_overwritten_key_is_a_signalled_loss_and_the_intruder_keeps_it() {
    let name = unique("redis-overwrite");
    let holder = client(ms(900));
    let lock = holder.try_lock(&name).unwrap().unwrap();
    let key = format!("lockbox:lock:{name}");
    redis::cmd("SET")
        .arg(&key)
        .arg("999|intruder")
        .query::<String>(&mut redis())
        .unwrap();
    assert_eq!(lock.lost().recv_timeout(ms(900)), Ok(LostReason::NotOwner));
    assert!(lock.release().unwrap_err().is_lock_lost());
    let value: String = redis::cmd("GET").arg(&key).query(&mut redis()).unwrap();
    assert_eq!(
        value, "999|intruder",
        "the release touched another holder's key"
    );
}

/// The key vanishes without a release message (deleted, or expired): a waiter
/// still wakes, at the holder's expiry at the latest, and gets the lock.
#[test]
fn a_waiter_that_misses_the_message_still_wakes() {
    let name = unique("redis-missed");
    let ttl = ms(1000);
    let (holder, waiter) = (client(ttl), client(ttl));
    let lock = holder.try_lock(&name).unwrap().unwrap();
    holder.__pause_renewals(true);
    let start = Instant::now();
    std::thread::scope(|s| {
        let w = s.spawn(|| waiter.lock_timeout(&name, ttl * 4).unwrap());
        assert!(eventually(ms(2000), || waiter.metrics().acquires_waiting == 1));
        // Silently gone: no PUBLISH.
        redis::cmd("DEL")
            .arg(format!("lockbox:lock:{name}"))
            .query::<i64>(&mut redis())
            .unwrap();
        let got = w.join().unwrap();
        assert!(got.fencing_token() > lock.fencing_token());
        assert!(
            start.elapsed() < ttl * 2,
            "woke only after {:?}",
            start.elapsed()
        );
    });
}

#[test]
fn a_redis_restart_ends_held_locks_and_the_client_recovers() {
    let mut server = RedisServer::start().expect("redis-server");
    let ttl = ms(900);
    let holder = LockClient::redis(&server.url).ttl(ttl).build().unwrap();
    let lock = holder.try_lock("restart").unwrap().unwrap();
    server.kill();
    server.run().unwrap();
    // Without persistence the key is gone: the next renewal finds it so; with the
    // server down meanwhile, the deadline ends the lock. Either way: lost.
    let reason = lock
        .lost()
        .recv_timeout(ttl * 2)
        .expect("the loss was signalled");
    assert!(
        matches!(reason, LostReason::NotOwner | LostReason::Expired),
        "{reason:?}"
    );
    assert!(!lock.is_held());
    let again = holder
        .lock_timeout("restart", ttl * 3)
        .expect("the client recovers");
    again.release().unwrap();
}

#[test]
fn leases_are_listed_from_the_whole_keyspace() {
    let names: Vec<String> = (0..3).map(|i| unique(&format!("redis-list-{i}"))).collect();
    let c = client(ms(5000));
    let held: Vec<_> = names
        .iter()
        .map(|n| c.try_lock(n).unwrap().unwrap())
        .collect();
    let all = c.leases().unwrap();
    for (name, lock) in names.iter().zip(&held) {
        let info = all.iter().find(|l| &l.name == name).expect("listed");
        assert_eq!(info.fencing_token, lock.fencing_token());
        assert!(matches!(info.status, lockbox::LeaseStatus::Held { .. }));
    }
    assert_eq!(
        all.iter().filter(|l| names.contains(&l.name)).count(),
        3,
        "listed once each"
    );
}
