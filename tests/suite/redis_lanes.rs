//! Renewals never queue behind other work (a long `leases()`, acquires), and
//! `leases()` costs round trips per batch of keys, not per key. On a throwaway
//! server seeded with many name states.

use crate::common;

use std::thread;
use std::time::{Duration, Instant};

use common::redis_server::RedisServer;
use common::*;
use lockbox::LockClient;

/// Writes `n` name states (`lockbox:meta:seed-*`) in one script.
fn seed(s: &RedisServer, n: u32) {
    redis::cmd("EVAL")
        .arg(
            "for i = 1, tonumber(ARGV[1]) do \
               redis.call('HSET', 'lockbox:meta:seed-' .. i, 'owner', 'someone', 'token', i, \
                 'released_ms', '1700000000000') \
             end return 1",
        )
        .arg(0)
        .arg(n)
        .query::<i64>(&mut s.connection())
        .unwrap();
}

/// One pooled connection, kept busy by listings for several TTLs: the held
/// lock's renewals go on (before: they waited for that connection, and the
/// lock was lost with nothing wrong on the server).
#[test]
fn renewals_do_not_queue_behind_a_long_listing() {
    let s = RedisServer::start().unwrap();
    seed(&s, 30_000);
    let ttl = ms(300);
    let client = LockClient::redis(&s.url)
        .ttl(ttl)
        .pool_size(1)
        .build()
        .unwrap();
    let lock = client.try_lock("busy").unwrap().unwrap();
    let lost = lock.lost();
    let lister = client.clone();
    let listing = thread::spawn(move || {
        let end = Instant::now() + ttl * 6;
        let mut listed = 0;
        while Instant::now() < end {
            listed = lister.leases().unwrap().len();
        }
        listed
    });
    let listed = listing.join().unwrap();
    assert_eq!(listed, 30_001);
    assert!(lost.try_recv().is_err(), "the lock was lost");
    assert!(lock.is_held());
    assert!(client.metrics().renewals_ok >= 4);
    lock.release().unwrap();
}

/// Counts, with MONITOR, the commands the client sends while it lists `n`
/// leases: far fewer than one per key (commands run inside scripts are shown
/// as `[.. lua]` and not counted).
#[test]
fn a_listing_costs_round_trips_per_batch_not_per_key() {
    let s = RedisServer::start().unwrap();
    let n = 5_000;
    seed(&s, n);
    let client = LockClient::redis(&s.url).build().unwrap();
    let mut monitor = s.connection();
    monitor
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    monitor
        .send_packed_command(&redis::cmd("MONITOR").get_packed_command())
        .unwrap();
    assert_eq!(
        monitor.recv_response().unwrap(),
        redis::Value::Okay,
        "MONITOR refused"
    );
    let counter = thread::spawn(move || {
        let mut sent = 0;
        loop {
            let line = match monitor.recv_response().unwrap() {
                redis::Value::SimpleString(line) => line,
                other => panic!("unexpected monitor output {other:?}"),
            };
            if line.contains("lockbox-monitor-end") {
                return sent;
            }
            if !line.contains(" lua]") {
                sent += 1;
            }
        }
    });
    let listed = client.leases().unwrap();
    redis::cmd("ECHO")
        .arg("lockbox-monitor-end")
        .query::<String>(&mut s.connection())
        .unwrap();
    let sent = counter.join().unwrap();
    assert_eq!(listed.len(), n as usize);
    assert!(
        sent < n / 50,
        "{sent} commands for {n} leases: a round trip per key"
    );
}
