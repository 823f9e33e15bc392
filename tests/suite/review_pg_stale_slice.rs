//! Attack on "the first wait slice is timed by the client from the try's
//! answer" (and on the server-timed slice, which also reads the name's lease
//! from before its wait): a waiter's slice is set from the lease that was live
//! when it *started* waiting. If the key then passes to another session with a
//! shorter lease, and that session is frozen or cut off (a zombie: it keeps the
//! key, its lease runs out), the waiter keeps sleeping in `pg_advisory_lock`
//! until the *old* lease would have ended, and only then looks for a zombie.
//! Guarantee (f): a stale snapshot must not make a waiter sleep on a dead lease
//! or block the name.
//!
//! (`__pause_renewals` is not a frozen process here: the paused client's
//! scheduler still closes the lock's session at its local deadline, which
//! frees the key. The successor is cut off behind a paused proxy instead, as
//! in review_pg_stranded_key: its session is granted key and lease, its client
//! never hears, nobody renews.)

use crate::common;

use std::thread;
use std::time::{Duration, Instant};

use common::proxy::Proxy;
use common::*;
use lockbox::LockClient;

/// H holds the name with a `h_ttl` lease (or a 1 s lease extended to
/// `h_ttl`); W1 (behind a proxy, TTL 1 s) then W2 (TTL 1 s) wait. The proxy is
/// paused, H releases, W1's session is granted key and a 1 s lease that is
/// never renewed. W2 must take over from that zombie within a few seconds.
fn stale_slice(extend: bool) {
    let h_ttl = Duration::from_secs(600);
    let ttl = Duration::from_secs(1);
    let proxy = Proxy::to_test_server();
    let name = unique("stale-slice");
    let h = if extend {
        client(ttl).0
    } else {
        LockClient::builder(database_url())
            .ttl(h_ttl)
            .build()
            .unwrap()
    };
    let app1 = unique("atk-stale-w1");
    let w1 = LockClient::builder(&proxy.app_url(&app1))
        .ttl(ttl)
        .build()
        .unwrap();
    let (w2, app2) = client(ttl);
    let held = h.try_lock(&name).unwrap().unwrap();
    if extend {
        held.extend(h_ttl).unwrap();
    }
    let first = {
        let name = name.clone();
        thread::spawn(move || {
            let r = w1.lock_timeout(&name, Duration::from_secs(10));
            drop(r);
        })
    };
    assert!(eventually(Duration::from_secs(5), || is_waiting(&app1)));
    let second = {
        let name = name.clone();
        thread::spawn(move || {
            let r = w2.lock_timeout(&name, Duration::from_secs(12));
            (r, w2)
        })
    };
    assert!(eventually(Duration::from_secs(5), || is_waiting(&app2)));
    proxy.pause();
    held.release().unwrap();
    let released_at = Instant::now();
    assert!(
        eventually(Duration::from_secs(5), || advisory_locks_of(&app1) == 1
            && !is_waiting(&app1)),
        "W1's session was not granted the key"
    );
    let w1_row = lease_row(&name);
    let (got, _w2) = second.join().unwrap();
    let took = released_at.elapsed();
    proxy.resume();
    proxy.cut();
    let _ = first.join();
    match got {
        Ok(lock) => {
            assert!(lock.fencing_token() as i64 > w1_row.token);
            assert!(
                took < Duration::from_secs(5),
                "W2 was granted only {took:?} after H's release, though W1's 1 s lease \
                 (token {}) ended ~1 s after it: W2 slept on H's stale lease",
                w1_row.token
            );
            lock.release().unwrap();
        }
        Err(e) => panic!(
            "W2 never got the lock ({e}); {took:?} after H's release. W1's session holds \
             the key with a 1 s lease (token {}, owner {}) that ended ~1 s after the \
             release and is never renewed (a zombie), but W2's wait slice was timed \
             from H's stale {h_ttl:?} lease",
            w1_row.token, w1_row.owner
        ),
    }
}

#[test]
fn a_waiter_does_not_sleep_on_a_stale_long_lease_behind_a_zombie_successor() {
    stale_slice(false);
}

/// The same with one TTL for everyone: the holder had `extend`ed its lease.
#[test]
fn a_waiter_does_not_sleep_on_a_stale_extended_lease_behind_a_zombie_successor() {
    stale_slice(true);
}
