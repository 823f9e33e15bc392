//! A release (or a drop) of a lock whose session is held by a renewal stuck on
//! a frozen network path returns within the release's bound instead of
//! waiting for that statement without end; the renewal drops the session when
//! it ends, which frees the lock.

use crate::common;

use std::sync::mpsc;
use std::time::Duration;

use common::proxy::Proxy;
use common::*;
use lockbox::{Error, LockClient, LostReason};

#[test]
fn a_release_behind_a_stuck_renewal_returns() {
    for drop_it in [false, true] {
        let proxy = Proxy::to_test_server();
        let app = unique("stuck-release");
        let client = LockClient::builder(&proxy.app_url(&app))
            .ttl(ms(1000))
            .locks_per_session(1)
            .build()
            .unwrap();
        let name = unique("stuck-release");
        let lock = client.try_lock(&name).unwrap().unwrap();
        // The network path freezes: the next renewal is sent and never
        // answered, and the lock is lost at its deadline.
        proxy.pause();
        assert_eq!(
            lock.lost().recv_timeout(Duration::from_secs(10)),
            Ok(LostReason::Expired)
        );
        let (tx, rx) = mpsc::channel();
        let releaser = std::thread::spawn(move || {
            let result = if drop_it {
                drop(lock);
                Ok(())
            } else {
                lock.release()
            };
            tx.send(result).unwrap();
        });
        // Its bound is a second (the lock's time left, at least 1 s); the
        // path stays frozen far longer.
        let result = rx.recv_timeout(Duration::from_secs(10));
        proxy.resume();
        releaser.join().unwrap();
        match result {
            Ok(Ok(())) if drop_it => {}
            Ok(Err(Error::LockLost { reason, .. })) if !drop_it => {
                assert_eq!(reason, LostReason::Expired)
            }
            other => panic!("drop: {drop_it}: the release did not return: {other:?}"),
        }
        // Once the path thaws, the renewal ends and drops the session: the
        // name is free again (its lease ran out), nothing is left held.
        let other = LockClient::builder(database_url()).build().unwrap();
        other
            .lock_timeout(&name, Duration::from_secs(10))
            .unwrap()
            .release()
            .unwrap();
        assert!(eventually(Duration::from_secs(10), || advisory_locks_of(
            &app
        ) == 0));
    }
}
