//! A release that gives up waiting for a renewal in flight (its answer stuck
//! on a frozen network path) must not leave behind a lease that renewal
//! extended: once the answer arrives and the session is let go, the name is
//! free at once, as it was when the release waited for the renewal, not
//! blocked for a full TTL with no holder.

use crate::common;

use std::sync::mpsc;
use std::time::Duration;

use common::proxy::Proxy;
use common::*;
use lockbox::LockClient;

#[test]
fn a_renewal_that_succeeds_after_the_release_gave_up_leaves_no_live_lease() {
    // A session of its own (a shared one renews in a transaction of several
    // round trips: its renewal never commits with the answers stopped).
    {
        let per_session = 1;
        let proxy = Proxy::to_test_server();
        let app = unique("rr-renewed");
        let client = LockClient::builder(&proxy.app_url(&app))
            .ttl(Duration::from_secs(6))
            .renew_interval(Duration::from_secs(3))
            .locks_per_session(per_session)
            .build()
            .unwrap();
        let name = unique("rr-renewed");
        let lock = client.try_lock(&name).unwrap().unwrap();
        let granted = lease_row(&name);
        // The server's answers stop: the next renewal reaches the server and
        // renews the lease there, its answer never arrives.
        proxy.pause_replies();
        assert!(
            eventually(Duration::from_secs(20), || lease_row(&name).expires_at
                > granted.expires_at),
            "the renewal never reached the server"
        );
        let (tx, rx) = mpsc::channel();
        let releaser = std::thread::spawn(move || tx.send(lock.release()).unwrap());
        // The release gives up at the lock's deadline: the renewal holds the
        // session.
        let result = rx.recv_timeout(Duration::from_secs(20));
        releaser.join().unwrap();
        assert!(
            matches!(result, Ok(Err(_))),
            "per session {per_session}: a release that could not end the lease \
             reported {result:?}"
        );
        proxy.resume();
        // The renewal's answer arrives; the session it held is let go.
        assert!(
            eventually(Duration::from_secs(20), || advisory_locks_of(&app) == 0),
            "per session {per_session}: the advisory lock stayed held"
        );
        // Nobody holds the lock: the name must be free now.
        let other = LockClient::builder(database_url()).build().unwrap();
        let row = lease_row(&name);
        let again = other.try_lock(&name).unwrap();
        assert!(
            again.is_some(),
            "per session {per_session}: the name is blocked by a lease nobody holds \
             (released: {}, expires in {:.1}s)",
            row.released,
            row.expires_at - now_epoch(),
        );
        again.unwrap().release().unwrap();
    }
}

fn now_epoch() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}
