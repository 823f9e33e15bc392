//! A database restart (fast and immediate, the latter a crash for the server) while
//! a lock is held and another waits: the holder sees the loss, the waiter gets an
//! error rather than a hang, the client recovers without being rebuilt, and fencing
//! tokens keep increasing because grants are committed durably.

use crate::common;

use std::thread;
use std::time::{Duration, Instant};

use common::server::Cluster;
use common::*;
use lockbox::{LockClient, LostReason};

fn restart_while_held(mode: &str) {
    let cluster = Cluster::start().expect("throwaway cluster");
    let ttl = ms(1200);
    let client = LockClient::builder(&cluster.url).ttl(ttl).build().unwrap();
    let waiter_client = LockClient::builder(&cluster.url).ttl(ttl).build().unwrap();
    let name = "restart";

    let first = client.try_lock(name).unwrap().unwrap();
    // On a session of its own, so that two connections end up in the pool.
    let spare = client
        .acquire(
            "spare",
            &lockbox::AcquireOptions::new().dedicated_session(true),
        )
        .unwrap()
        .unwrap();
    first.release().unwrap();
    spare.release().unwrap();
    let held = client.try_lock(name).unwrap().unwrap();
    let token = held.fencing_token();
    assert_eq!(token, 2);
    // The spare lock's connection went back to the pool: after the restart it is
    // dead, and the next acquire must get past it.
    assert!(client.health().pool.idle >= 1);

    thread::scope(|s| {
        let waiter = s.spawn(|| {
            let start = Instant::now();
            let res = waiter_client.lock_timeout(name, Duration::from_secs(30));
            (res, start.elapsed())
        });
        let mut db = postgres::Client::connect(&cluster.url, postgres::NoTls).unwrap();
        assert!(eventually(Duration::from_secs(5), || {
            db.query_one(
                "SELECT count(*) > 0 FROM pg_locks WHERE locktype = 'advisory' AND NOT granted",
                &[],
            )
            .unwrap()
            .get(0)
        }));
        drop(db);

        cluster.stop_server(mode).unwrap();
        // The holder learns at its next renewal (a third of the TTL).
        assert_eq!(held.lost().recv_timeout(ttl), Ok(LostReason::SessionLost));
        assert!(!held.is_held());
        // The waiter's session died with the server: an error, not a hang.
        let (res, waited) = waiter.join().unwrap();
        assert!(
            res.is_err(),
            "the waiter cannot have been granted by a stopped server: {res:?}"
        );
        assert!(
            waited < Duration::from_secs(10),
            "waiter hung for {waited:?}: {res:?}"
        );
    });

    cluster.start_server().unwrap();
    // Same client, no rebuild: the pool reconnects. The lease written before the
    // restart survived it, so the next grant waits it out and takes the next token.
    let next = client.lock_timeout(name, ttl * 4).unwrap();
    assert!(
        next.fencing_token() > token,
        "token {} after {token}",
        next.fencing_token()
    );
    assert!(held.release().unwrap_err().is_lock_lost());
    next.release().unwrap();
    drop(cluster);
}

#[test]
fn immediate_restart_while_held() {
    restart_while_held("immediate");
}

#[test]
fn fast_restart_while_held() {
    restart_while_held("fast");
}
