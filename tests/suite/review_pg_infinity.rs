//! Hostile review: an operator pins a lease with `expires_at = 'infinity'` (legal
//! for a `timestamptz`; inspection already lists such leases). Waiters must then
//! wait (and time out) like behind any live lease; instead the wait-slice and
//! lock-delay statements compute `expires_at - clock_timestamp()`, which
//! PostgreSQL refuses for an infinite timestamp ("cannot subtract infinite
//! timestamps"), so every acquire of the name fails with a database error.

use crate::common;

use common::*;

fn pin(name: &str) {
    let n = admin()
        .execute(
            "UPDATE lockbox_leases SET expires_at = 'infinity' WHERE name = $1",
            &[&name],
        )
        .unwrap();
    assert_eq!(n, 1);
}

/// The holder's session is gone and its lease was pinned: lock-delay.
#[test]
fn a_pinned_lease_of_a_dead_holder_makes_waiters_time_out_not_fail() {
    let (a, _) = client(ms(1000));
    let (b, _) = client(ms(1000));
    let name = unique("pinned-dead");
    let held = a.try_lock(&name).unwrap().expect("a free lock");
    pin(&name);
    terminate(holder_pid(&name));
    drop(held);
    match b.lock_timeout(&name, ms(500)) {
        Err(lockbox::Error::Timeout { .. }) => {}
        other => panic!("expected a timeout behind a pinned lease, got {other:?}"),
    }
}

/// The holder is alive (renewals paused, so the pin stays): waiting on the key.
#[test]
fn a_pinned_lease_of_a_live_holder_makes_waiters_time_out_not_fail() {
    let (a, _) = client(ms(1000));
    let (b, _) = client(ms(1000));
    let name = unique("pinned-live");
    let held = a.try_lock(&name).unwrap().expect("a free lock");
    a.__pause_renewals(true);
    pin(&name);
    let res = b.lock_timeout(&name, ms(500));
    a.__pause_renewals(false);
    drop(held);
    match res {
        Err(lockbox::Error::Timeout { .. }) => {}
        other => panic!("expected a timeout behind a pinned lease, got {other:?}"),
    }
}
