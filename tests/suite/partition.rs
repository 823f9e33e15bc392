//! The database unreachable while its TCP connections stay up (a paused proxy):
//! shorter than TTL − renewal interval, nothing is lost and nobody else is granted;
//! longer than the TTL, the holder's local deadline passes before anyone else is
//! granted. A cut connection is a lost session.

use crate::common;

use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use common::proxy::Proxy;
use common::*;
use lockbox::{LockClient, LostReason};

fn proxied(ttl: Duration) -> (Proxy, LockClient, String) {
    let server = server_parts();
    let proxy = Proxy::start(&format!("{}:{}", server.host, server.port));
    let app = unique("proxied");
    let (user, db) = (server.user, server.db);
    let client = LockClient::builder(&proxy.url(&user, &db, &app))
        .ttl(ttl)
        .build()
        .unwrap();
    (proxy, client, app)
}

#[test]
fn a_partition_shorter_than_ttl_minus_interval_loses_nothing() {
    let ttl = ms(1500); // renewed every 500 ms: 1000 ms of slack
    let (proxy, holder, _) = proxied(ttl);
    let (contender, _) = client(ttl);
    let name = unique("short-partition");
    let lock = holder.try_lock(&name).unwrap().unwrap();
    let token = lock.fencing_token();

    proxy.pause();
    let start = Instant::now();
    while start.elapsed() < ms(700) {
        assert!(
            contender.try_lock(&name).unwrap().is_none(),
            "granted during the partition"
        );
        thread::sleep(ms(50));
    }
    proxy.resume();

    let renewed = holder.metrics().renewals_ok;
    assert!(eventually(ms(2000), || holder.metrics().renewals_ok > renewed));
    assert!(lock.is_held());
    assert_eq!(
        lock.lost().try_recv(),
        Err(crossbeam_channel::TryRecvError::Empty)
    );
    assert_eq!(lease_row(&name).token as u64, token);
    assert!(contender.try_lock(&name).unwrap().is_none());
    lock.release().unwrap();
}

#[test]
fn a_partition_longer_than_ttl_ends_the_holder_before_anyone_else_is_granted() {
    let ttl = ms(1200);
    let (proxy, holder, _) = proxied(ttl);
    let (contender, _) = client(ttl);
    let name = unique("long-partition");
    let lock = holder.try_lock(&name).unwrap().unwrap();
    let token = lock.fencing_token();

    proxy.pause();
    let paused = lease_row(&name);
    let lost_at: Mutex<Option<Instant>> = Mutex::new(None);
    let granted_at = thread::scope(|s| {
        s.spawn(|| {
            // The signal itself, not a poll of `is_held`: it must fire at the
            // deadline although the renewal statement is stuck in the partition.
            let reason = lock.lost().recv_timeout(ttl * 4);
            *lost_at.lock().unwrap() = Some(Instant::now());
            assert_eq!(reason, Ok(LostReason::Expired));
            assert!(!lock.is_held());
        });
        let next = contender.lock_timeout(&name, ttl * 4).unwrap();
        let granted_at = Instant::now();
        assert_eq!(next.fencing_token(), token + 1);
        granted_at
    });
    let lost_at = lost_at.lock().unwrap().expect("the holder saw the loss");
    assert!(
        lost_at < granted_at,
        "the holder still believed it held the lock when another was granted"
    );
    assert_granted_after(&name, &paused);
    proxy.resume();
    assert_eq!(lock.lost_reason(), Some(LostReason::Expired));
    assert!(lock.release().unwrap_err().is_lock_lost());
}

#[test]
fn a_cut_connection_is_a_lost_session() {
    let ttl = ms(900);
    let (proxy, holder, _) = proxied(ttl);
    let name = unique("cut");
    let lock = holder.try_lock(&name).unwrap().unwrap();
    proxy.cut();
    assert_eq!(lock.lost().recv_timeout(ttl), Ok(LostReason::SessionLost));
    assert!(lock.release().unwrap_err().is_lock_lost());
}
