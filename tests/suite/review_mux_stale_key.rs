//! Review of multiplexed sessions: the advisory key of a lock lost on a shared
//! session is freed only by the session's *next renewal*, whenever that is. With
//! a neighbour of a longer TTL, that is the neighbour's renewal interval (a
//! third of its TTL), not the lost lock's: the name stays unobtainable for
//! everyone long after its lease ended, and no zombie takeover can help (the
//! session holds a live lease). On a session of its own, a lost lock's session
//! is dropped at once and its key freed.

use crate::common;

use common::*;
use lockbox::{AcquireOptions, LockClient, LostReason};

#[test]
fn a_lost_locks_key_is_freed_soon_even_when_its_neighbours_renew_rarely() {
    let app = unique("mux-stale");
    let ttl = ms(1000);
    let client = builder_for(&app).ttl(ttl).build().unwrap();
    let (a_name, a, _, b, pid) = two_on_one_session(&client, "stale");

    // `a`'s lease is taken from it behind its back, then given up: the name
    // is free in the lease table.
    admin()
        .execute(
            "UPDATE lockbox_leases SET owner = 'someone else' WHERE name = $1",
            &[&a_name],
        )
        .unwrap();
    assert_eq!(a.lost().recv_timeout(ttl * 2), Ok(LostReason::NotOwner));
    admin()
        .execute(
            "UPDATE lockbox_leases SET released_at = now() WHERE name = $1",
            &[&a_name],
        )
        .unwrap();
    drop(a);

    // Anyone may take the name now; a waiter gets it within a few of its TTLs.
    let other = LockClient::builder(database_url())
        .ttl(ttl)
        .build()
        .unwrap();
    let got = other
        .acquire(&a_name, &AcquireOptions::new().wait(ttl * 4))
        .unwrap();
    let still_held: i64 = admin()
        .query_one(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = $1",
            &[&pid],
        )
        .unwrap()
        .get(0);
    assert!(
        got.is_some(),
        "lock {a_name:?} lost and released, yet nobody could take it for {:?}: its key is \
         still held by the shared session ({still_held} advisory locks on backend {pid}) \
         until the next renewal of its 60 s neighbour",
        ttl * 4
    );
    assert!(b.is_held());
    drop(got);
    b.release().unwrap();
}
