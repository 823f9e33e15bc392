//! A release that gives up waiting for a renewal stuck on its session does so
//! at the lock's deadline: the lock was lost meanwhile (`is_held` turned
//! false), and `lost()` says so, as it did when the release waited for that
//! renewal and then found the lease expired. It must not disconnect the
//! channel as if the lock had simply been released.

use crate::common;

use std::sync::mpsc;
use std::time::Duration;

use common::proxy::Proxy;
use common::*;
use lockbox::{Error, LockClient, LostReason};

#[test]
fn a_release_that_gives_up_at_the_deadline_signals_the_loss() {
    let proxy = Proxy::to_test_server();
    let app = unique("rr-lostsig");
    let client = LockClient::builder(&proxy.app_url(&app))
        .ttl(Duration::from_secs(4))
        .renew_interval(Duration::from_secs(2))
        .locks_per_session(1)
        .build()
        .unwrap();
    let name = unique("rr-lostsig");
    let lock = client.try_lock(&name).unwrap().unwrap();
    let lost = lock.lost();
    let granted = lease_row(&name);
    // The next renewal reaches the server; its answer never arrives, so it
    // holds the lock's session past the deadline.
    proxy.pause_replies();
    assert!(
        eventually(Duration::from_secs(20), || lease_row(&name).expires_at
            > granted.expires_at),
        "the renewal never reached the server"
    );
    let (tx, rx) = mpsc::channel();
    let releaser = std::thread::spawn(move || tx.send(lock.release()).unwrap());
    let result = rx.recv_timeout(Duration::from_secs(20));
    releaser.join().unwrap();
    proxy.resume();
    match result {
        Ok(Err(Error::LockLost { reason, .. })) => assert_eq!(reason, LostReason::Expired),
        other => panic!("a release that gave up at the deadline returned {other:?}"),
    }
    assert_eq!(lost.try_recv(), Ok(LostReason::Expired));
    assert!(eventually(Duration::from_secs(20), || advisory_locks_of(
        &app
    ) == 0));
}
