//! Many held locks on few database sessions (multiplexing): what locks on one
//! session share, and what they do not.

use crate::common;

use std::time::Instant;

use common::*;
use lockbox::{AcquireOptions, LockClient, LostReason};

/// Thousands of locks held through three TTLs on a handful of sessions, none
/// lost, and nothing left behind once they are released.
#[test]
fn thousands_of_locks_share_a_few_sessions() {
    const LOCKS: usize = 2000;
    let app = unique("mux-many");
    let ttl = ms(1000);
    let client = builder_for(&app).ttl(ttl).build().unwrap();
    let prefix = unique("many");
    let locks: Vec<_> = (0..LOCKS)
        .map(|i| {
            client
                .try_lock(&format!("{prefix}-{i}"))
                .unwrap()
                .expect("free name")
        })
        .collect();
    let sessions = sessions_of(&app);
    assert!(
        sessions <= 10,
        "{LOCKS} locks took {sessions} sessions (the pool holds 10)"
    );
    assert_eq!(advisory_locks_of(&app), LOCKS as i64);
    let end = Instant::now() + ttl * 3;
    while Instant::now() < end {
        std::thread::sleep(ms(100));
        let lost = locks.iter().filter(|l| !l.is_held()).count();
        assert_eq!(lost, 0, "{lost} of {LOCKS} locks lost while merely held");
    }
    // The leases really were renewed: every one runs past the first TTL.
    let expired: i64 = admin()
        .query_one(
            "SELECT count(*) FROM lockbox_leases WHERE name LIKE $1 || '-%' \
             AND released_at IS NULL AND expires_at <= now()",
            &[&prefix],
        )
        .unwrap()
        .get(0);
    assert_eq!(expired, 0);
    assert!(client.metrics().renewals_ok >= LOCKS as u64 * 3);
    for lock in locks {
        lock.release().unwrap();
    }
    assert_eq!(advisory_locks_of(&app), 0);
}

/// A terminated shared session loses every lock on it, each with `lost()`, and
/// no lock on another session.
#[test]
fn a_terminated_session_loses_its_locks_and_only_those() {
    let app = unique("mux-term");
    let client = builder_for(&app)
        .ttl(ms(1500))
        .locks_per_session(3)
        .build()
        .unwrap();
    let prefix = unique("term");
    let names: Vec<String> = (0..6).map(|i| format!("{prefix}-{i}")).collect();
    let locks: Vec<_> = names
        .iter()
        .map(|n| client.try_lock(n).unwrap().unwrap())
        .collect();
    let pids: Vec<i32> = names.iter().map(|n| holder_pid(n)).collect();
    assert_eq!(
        pids.iter().collect::<std::collections::HashSet<_>>().len(),
        2,
        "six locks at three per session: two sessions ({pids:?})"
    );
    let victim = pids[0];
    terminate(victim);
    for (lock, pid) in locks.iter().zip(&pids) {
        if *pid == victim {
            let reason = lock
                .lost()
                .recv_timeout(ms(1500))
                .expect("lost() fired for a lock on the terminated session");
            assert!(
                matches!(reason, LostReason::SessionLost | LostReason::Expired),
                "{reason:?}"
            );
        }
    }
    // Past the victims' deadlines, the others are still held and renewed.
    std::thread::sleep(ms(1600));
    for (lock, pid) in locks.iter().zip(&pids) {
        assert_eq!(lock.is_held(), *pid != victim, "lock on session {pid}");
    }
    drop(locks);
    assert!(eventually(ms(2000), || advisory_locks_of(&app) == 0));
}

/// One lease lost on a shared session (taken over behind its holder's back)
/// is lost alone; its advisory key is freed by the session's next renewal, so
/// a waiter gets the lock without any session being terminated.
#[test]
fn a_lost_lease_on_a_shared_session_frees_its_key_by_itself() {
    let app = unique("mux-lease");
    let ttl = ms(900);
    let client = builder_for(&app).ttl(ttl).build().unwrap();
    let a = unique("lease-a");
    let b = unique("lease-b");
    let lock_a = client.try_lock(&a).unwrap().unwrap();
    let lock_b = client.try_lock(&b).unwrap().unwrap();
    let pid = holder_pid(&a);
    assert_eq!(holder_pid(&b), pid, "both on one session");
    // The lease of `a` is made to look like another owner's: its next renewal
    // finds it is no longer ours.
    admin()
        .execute(
            "UPDATE lockbox_leases SET owner = 'someone else' WHERE name = $1",
            &[&a],
        )
        .unwrap();
    let reason = lock_a.lost().recv_timeout(ttl).expect("lost() for a");
    assert_eq!(reason, LostReason::NotOwner);
    // Give the lease back to nobody: released, so a waiter may take it.
    admin()
        .execute(
            "UPDATE lockbox_leases SET released_at = now() WHERE name = $1",
            &[&a],
        )
        .unwrap();
    let other = LockClient::builder(database_url())
        .ttl(ttl)
        .build()
        .unwrap();
    let taken = other
        .acquire(&a, &AcquireOptions::new().wait(ms(3000)))
        .unwrap()
        .expect("the key of the lost lease is freed by its session's next renewal");
    assert!(lock_b.is_held());
    assert_eq!(
        pids_of(&app),
        vec![pid],
        "no session was terminated or added"
    );
    assert_eq!(client.metrics().zombie_terminations, 0);
    assert_eq!(other.metrics().zombie_terminations, 0);
    taken.release().unwrap();
    lock_b.release().unwrap();
    drop(lock_a);
    assert!(eventually(ms(2000), || advisory_locks_of(&app) == 0));
}

/// Two names on one advisory key: never both on one session (advisory locks
/// are reentrant there, so the second would not be excluded and its release
/// would free the first's key). The second waits for the first, as names
/// sharing a key always do.
#[test]
fn two_names_on_one_key_never_share_a_session() {
    let app = unique("mux-key");
    let client = builder_for(&app)
        .ttl(ms(2000))
        .__advisory_key_fn(|_| 0x5EED_0000_0000_0042)
        .build()
        .unwrap();
    let a = unique("key-a");
    let b = unique("key-b");
    let held_a = client.try_lock(&a).unwrap().unwrap();
    assert!(client.try_lock(&b).unwrap().is_none(), "b shares a's key");
    assert_eq!(advisory_locks_of(&app), 1);
    let started = Instant::now();
    let waiter = std::thread::scope(|s| {
        let w = s.spawn(|| {
            client
                .acquire(&b, &AcquireOptions::new().wait(ms(5000)))
                .unwrap()
        });
        std::thread::sleep(ms(300));
        assert!(!w.is_finished(), "b must wait while a holds the key");
        held_a.release().unwrap();
        w.join().unwrap()
    });
    let held_b = waiter.expect("b granted once a was released");
    assert!(started.elapsed() >= ms(300));
    assert_eq!(advisory_locks_of(&app), 1);
    held_b.release().unwrap();
    assert_eq!(advisory_locks_of(&app), 0);
}

/// `dedicated_session` and `locks_per_session(1)` give a lock a session of its
/// own; by default locks share one.
#[test]
fn a_lock_may_have_a_session_of_its_own() {
    let app = unique("mux-own");
    let client = builder_for(&app).ttl(ms(2000)).build().unwrap();
    let n = |i| format!("{app}-{i}");
    let l0 = client.try_lock(&n(0)).unwrap().unwrap();
    let l1 = client.try_lock(&n(1)).unwrap().unwrap();
    let own = client
        .acquire(&n(2), &AcquireOptions::new().dedicated_session(true))
        .unwrap()
        .unwrap();
    let l3 = client.try_lock(&n(3)).unwrap().unwrap();
    assert_eq!(holder_pid(&n(0)), holder_pid(&n(1)));
    assert_eq!(holder_pid(&n(0)), holder_pid(&n(3)));
    assert_ne!(holder_pid(&n(2)), holder_pid(&n(0)));
    // Terminating the dedicated lock's session loses it alone.
    terminate(holder_pid(&n(2)));
    assert!(own.lost().recv_timeout(ms(2000)).is_ok());
    assert!(l0.is_held() && l1.is_held() && l3.is_held());
    drop((l0, l1, l3, own));

    let app = unique("mux-off");
    let client = builder_for(&app)
        .ttl(ms(2000))
        .locks_per_session(1)
        .build()
        .unwrap();
    let locks: Vec<_> = (0..3)
        .map(|i| client.try_lock(&format!("{app}-{i}")).unwrap().unwrap())
        .collect();
    let pids: std::collections::HashSet<i32> =
        (0..3).map(|i| holder_pid(&format!("{app}-{i}"))).collect();
    assert_eq!(pids.len(), 3);
    drop(locks);
}
