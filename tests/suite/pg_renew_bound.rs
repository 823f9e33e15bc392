//! Renewals and releases are bounded by what the lease has left (`LeaseRef::limit`):
//! held up on the lease row by another transaction, they give up before the
//! holder's deadline instead of acting later, and a renewal held up past the
//! lease's end never revives it.

use crate::common;

use std::time::Duration;

use common::*;
use lockbox::LostReason;

/// Whether the lease of `name` has ended by the database's clock.
fn lease_ended(name: &str) -> bool {
    admin()
        .query_one(
            "SELECT expires_at <= clock_timestamp() FROM lockbox_leases WHERE name = $1",
            &[&name],
        )
        .unwrap()
        .get(0)
}

/// On a session of its own, the renewal waits for the row lock, bounded by
/// its limit.
#[test]
fn a_renewal_blocked_past_the_lease_end_does_not_revive_it() {
    held_up_renewal(1);
}

/// On a shared session, the renewal skips the held row (its neighbours are
/// renewed meanwhile) and the lock is lost at its deadline all the same.
#[test]
fn a_shared_renewal_held_up_by_a_row_lock_loses_the_lock_at_its_deadline() {
    held_up_renewal(1000);
}

fn held_up_renewal(per_session: u32) {
    let client = builder_for(&unique("app"))
        .ttl(ms(600))
        .locks_per_session(per_session)
        .build()
        .unwrap();
    let name = unique("renew-bound");
    let lock = client.try_lock(&name).unwrap().unwrap();
    let neighbour = client.try_lock(&unique("renew-bound-n")).unwrap().unwrap();
    let pid = holder_pid(&name);

    let row = RowHold::lease(&name);
    if per_session == 1 {
        assert!(
            eventually(Duration::from_secs(2), || blocked_on_lock(pid)),
            "the renewal never blocked on the row"
        );
    }
    // The renewal gives up by its limit, so the renewal thread is free to report
    // the loss at the holder's deadline, while the row is still held.
    assert_eq!(
        lock.lost().recv_timeout(Duration::from_secs(3)),
        Ok(LostReason::Expired),
        "the renewal was still blocked past the holder's deadline"
    );
    assert!(eventually(Duration::from_secs(3), || lease_ended(&name)));
    assert!(
        !blocked_on_lock(pid),
        "a renewal is still waiting on the row"
    );
    row.release();

    // Nothing that was waiting on the row may now extend the ended lease.
    assert!(eventually(Duration::from_secs(2), || !blocked_on_lock(pid)));
    assert!(
        lease_ended(&name),
        "the ended lease came back with a fresh expiry"
    );
    // And the name is free for the next holder.
    let (other, _) = common::client(ms(1000));
    let next = other.try_lock(&name).unwrap().expect("the lease ended");
    assert_eq!(next.fencing_token(), lock.fencing_token() + 1);
    next.release().unwrap();
    // The neighbour was renewed throughout (on the same session when shared).
    assert!(neighbour.is_held());
    neighbour.release().unwrap();
}

#[test]
fn a_release_blocked_on_the_row_gives_up_and_still_frees_the_lock() {
    let (client, app) = client(ms(1500));
    let name = unique("release-bound");
    let lock = client.try_lock(&name).unwrap().unwrap();
    let row = RowHold::lease(&name);
    let (tx, rx) = crossbeam_channel::bounded(1);
    std::thread::spawn(move || {
        let _ = tx.send(lock.release());
    });
    // The release (and any renewal in flight before it) is bounded by what the
    // lease has left, or one second at least: it returns while the row is held.
    let result = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("the release was still blocked on the row");
    assert!(
        result.is_err(),
        "the release cannot have marked the row: {result:?}"
    );
    // The connection that held the advisory lock was closed, which freed it.
    assert!(eventually(Duration::from_secs(2), || advisory_locks_of(
        &app
    ) == 0));
    row.release();
}
