//! No connection goes back to the pool holding an advisory lock: after release,
//! drop, loss, a given-up wait, or an error.

use crate::common;

use std::time::Duration;

use common::*;
use lockbox::{AcquireOptions, LostReason};

#[test]
fn release_and_drop_leave_no_advisory_lock() {
    let (client, app) = client(ms(1000));
    let a = client.try_lock(&unique("released")).unwrap().unwrap();
    let b = client.try_lock(&unique("dropped")).unwrap().unwrap();
    assert_eq!(advisory_locks_of(&app), 2);
    a.release().unwrap();
    assert_eq!(advisory_locks_of(&app), 1);
    drop(b);
    assert_eq!(advisory_locks_of(&app), 0);
    // The connections were returned, not closed: reused by the next acquires.
    let sessions = sessions_of(&app);
    for _ in 0..5 {
        drop(client.try_lock(&unique("reuse")).unwrap().unwrap());
    }
    assert_eq!(sessions_of(&app), sessions);
    assert_eq!(advisory_locks_of(&app), 0);
}

#[test]
fn a_lost_lock_frees_its_session() {
    let (client, app) = client(ms(600));
    let name = unique("lost");
    let lock = client.try_lock(&name).unwrap().unwrap();
    terminate(holder_pid(&name));
    assert_eq!(
        lock.lost().recv_timeout(Duration::from_secs(2)),
        Ok(LostReason::SessionLost)
    );
    assert_eq!(advisory_locks_of(&app), 0);
    assert!(lock.release().unwrap_err().is_lock_lost());
    // The pool replaced the dead connection and works on.
    drop(client.try_lock(&unique("after-loss")).unwrap().unwrap());
    assert_eq!(advisory_locks_of(&app), 0);
}

/// A live lease whose session is gone makes an acquirer hold the advisory lock
/// while it waits the lease out; giving up must free it.
#[test]
fn giving_up_during_lock_delay_frees_the_advisory_lock() {
    let (client, app) = client(ms(600));
    let name = unique("delay-give-up");
    let lock = client
        .acquire(&name, &AcquireOptions::new().ttl(ms(3000)))
        .unwrap()
        .unwrap();
    terminate(holder_pid(&name));
    assert!(lock.lost().recv_timeout(Duration::from_secs(3)).is_ok());

    let (other, other_app) = common::client(ms(600));
    assert!(
        other.try_lock(&name).unwrap().is_none(),
        "the dead holder's lease is still live"
    );
    assert!(other.lock_timeout(&name, ms(200)).unwrap_err().is_timeout());
    assert_eq!(advisory_locks_of(&other_app), 0);
    assert_eq!(advisory_locks_of(&app), 0);
}

#[test]
fn refused_input_sends_nothing_and_holds_nothing() {
    let (client, app) = client(ms(600));
    assert!(client.try_lock("").unwrap_err().is_invalid_input());
    let opts = AcquireOptions::new().ttl(ms(1));
    assert!(
        client
            .acquire(&unique("bad-ttl"), &opts)
            .unwrap_err()
            .is_invalid_input()
    );
    assert_eq!(advisory_locks_of(&app), 0);
}

/// Pooled connections are not validated by a round trip on every checkout; one
/// whose session ended while idle (an operator's `pg_terminate_backend`, a server
/// restart) is skipped, whether just returned or long idle.
#[test]
fn idle_connections_whose_session_ended_are_skipped() {
    let (client, app) = client(ms(2000));
    for idle_for in [ms(0), ms(1200)] {
        drop(client.try_lock(&unique("warm")).unwrap().unwrap());
        let pids = pids_of(&app);
        assert!(!pids.is_empty());
        for pid in pids {
            terminate(pid);
        }
        std::thread::sleep(idle_for);
        let lock = client
            .try_lock(&unique("after-kill"))
            .unwrap()
            .expect("acquired on a live connection");
        lock.release().unwrap();
    }
}

/// Dropping a guard while its renewal is in flight waits for that one statement,
/// then releases: nothing is left held. (On a session of its own, where a
/// renewal waits for a row lock; a shared session's renewal skips the row.)
#[test]
fn drop_during_a_renewal_waits_for_it_then_releases() {
    let app = unique("app");
    let client = builder_for(&app)
        .ttl(ms(900))
        .locks_per_session(1)
        .build()
        .unwrap();
    let name = unique("drop-mid-renewal");
    let lock = client.try_lock(&name).unwrap().unwrap();
    let pid = holder_pid(&name);
    let row = RowHold::lease(&name);
    // The renewal is now blocked on the row.
    assert!(eventually(Duration::from_secs(2), || blocked_on_lock(pid)));
    std::thread::scope(|s| {
        let dropper = s.spawn(move || drop(lock));
        std::thread::sleep(ms(100));
        assert!(
            !dropper.is_finished(),
            "the drop did not wait for the renewal in flight"
        );
        row.release();
        dropper.join().unwrap();
    });
    assert_eq!(advisory_locks_of(&app), 0);
    assert!(lease_row(&name).released);
}
