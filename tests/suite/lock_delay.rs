//! The lease is authoritative: a live lease whose session died delays the next
//! holder until it expires, and an expired lease whose session still holds the
//! advisory lock (a zombie) is taken over by terminating that session.

use crate::common;

use common::*;
use lockbox::advisory_key;

#[test]
fn a_live_lease_of_a_dead_session_is_waited_out() {
    let name = unique("delay");
    // Built first, so that the lease below is checked well within its 1.5 s.
    let (client, app) = client(ms(1000));
    let mut dead = admin();
    fake_lease(&name, 41, 1500, pid_of(&mut dead));
    drop(dead);
    let before = lease_row(&name);
    assert!(
        client.try_lock(&name).unwrap().is_none(),
        "the lease is still live"
    );
    let lock = client.lock_timeout(&name, ms(5000)).unwrap();
    assert_granted_after(&name, &before);
    assert_eq!(lock.fencing_token(), 42);
    lock.release().unwrap();
    assert_eq!(advisory_locks_of(&app), 0);
}

#[test]
fn a_zombie_holder_is_terminated_and_taken_over() {
    let name = unique("zombie");
    let mut zombie = admin();
    let (k1, k2) = advisory_key(&name);
    zombie
        .execute("SELECT pg_advisory_lock($1, $2)", &[&k1, &k2])
        .unwrap();
    fake_lease(&name, 7, -10, pid_of(&mut zombie));
    let zombie_pid = holder_pid(&name);

    let (client, _) = client(ms(1000));
    let lock = client
        .try_lock(&name)
        .unwrap()
        .expect("taken over from the zombie");
    assert_eq!(lock.fencing_token(), 8);
    assert!(
        zombie.is_closed() || zombie.simple_query("SELECT 1").is_err(),
        "zombie session survived"
    );
    let alive: i64 = admin()
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = $1",
            &[&zombie_pid],
        )
        .unwrap()
        .get(0);
    assert_eq!(alive, 0);
    lock.release().unwrap();
}

#[test]
fn a_live_holder_is_never_terminated() {
    let name = unique("not-zombie");
    let mut holder = admin();
    let (k1, k2) = advisory_key(&name);
    holder
        .execute("SELECT pg_advisory_lock($1, $2)", &[&k1, &k2])
        .unwrap();
    fake_lease(&name, 3, 60_000, pid_of(&mut holder));

    let (client, _) = client(ms(1000));
    assert!(client.try_lock(&name).unwrap().is_none());
    assert!(
        client
            .lock_timeout(&name, ms(300))
            .unwrap_err()
            .is_timeout()
    );
    holder
        .simple_query("SELECT 1")
        .expect("the live holder's session was touched");
}

/// Raw users of `pg_advisory_lock(bigint)` — small integers included — never meet
/// lockbox's two-key locks.
#[test]
fn raw_advisory_locks_on_small_integers_do_not_interfere() {
    let mut raw = admin();
    let (client, _) = client(ms(1000));
    let name = unique("raw");
    let (_, k2) = advisory_key(&name);
    for key in [
        0i64,
        1,
        2,
        42,
        i64::from(k2),
        i64::from(lockbox_namespace()),
    ] {
        raw.execute("SELECT pg_advisory_lock($1)", &[&key]).unwrap();
    }
    let lock = client
        .try_lock(&name)
        .unwrap()
        .expect("not blocked by raw keys");
    lock.release().unwrap();
    raw.execute("SELECT pg_advisory_unlock_all()", &[]).unwrap();
}

fn lockbox_namespace() -> i32 {
    advisory_key("anything").0
}
