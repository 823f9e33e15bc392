//! Hostile but legal session defaults change nothing: a role whose defaults (and
//! connection `options`) set serializable or deferrable transactions, short
//! timeouts, odd date and time zone styles, a search path that shadows
//! `clock_timestamp()`, … still gets zombie takeover, lock-delay and hand-off
//! right. And a system-wide `synchronous_commit = off` plus a reload does not
//! make grants asynchronous, not even on sessions already pooled.

use crate::common;

use std::thread;
use std::time::Duration;

use common::server::Cluster;
use common::*;
use lockbox::LockClient;

use common::hostile::HostileRole;

#[test]
fn hand_off_lock_delay_and_zombie_takeover_work_under_hostile_role_defaults() {
    let role = HostileRole::create();
    // The defaults really are hostile for a plain session of the role.
    let mut plain = postgres::Client::connect(&role.url("plain"), postgres::NoTls).unwrap();
    let row = plain
        .query_one(
            "SELECT clock_timestamp() < '2001-01-01', current_setting('transaction_isolation'), \
                    current_setting('transaction_deferrable'), current_setting('statement_timeout')",
            &[],
        )
        .unwrap();
    assert!(row.get::<_, bool>(0), "clock_timestamp() is not shadowed");
    assert_eq!(row.get::<_, String>(1), "serializable");
    assert_eq!(row.get::<_, String>(2), "on");
    assert_eq!(row.get::<_, String>(3), "150ms");
    drop(plain);
    // Leases of 3 s: a durable renewal stalled by the disk (seen on this
    // machine under a CI run's load) must not let the holder look like a
    // zombie to the waiter's probe (the mechanism of issue 9, item 11).
    let (a, _) = role.client(ms(3000));
    let (b, b_app) = role.client(ms(3000));

    // Hand-off: a waiter blocked in the server gets the lock when it is
    // released (under repeatable read or serializable its write fails 40001).
    let name = unique("handoff");
    let first = a.try_lock(&name).unwrap().expect("free lock");
    let token = first.fencing_token();
    let waiter = {
        let b = b.clone();
        let name = name.clone();
        thread::spawn(move || b.lock_timeout(&name, Duration::from_secs(10)))
    };
    assert!(
        eventually(Duration::from_secs(5), || is_waiting(&b_app)),
        "the waiter never blocked"
    );
    // It waits inside the wait-and-grant function, which the role's PL/pgSQL
    // settings must not break.
    let waiting: String = admin()
        .query_one(
            "SELECT query FROM pg_stat_activity WHERE application_name = $1 \
             AND wait_event_type = 'Lock'",
            &[&b_app],
        )
        .unwrap()
        .get(0);
    assert!(waiting.contains("_wait_grant_v3"), "{waiting}");
    // Idle longer than the role's idle_session_timeout and statement_timeout:
    // neither the holder's nor the waiter's session may be cut.
    thread::sleep(ms(400));
    first.release().unwrap();
    let second = waiter
        .join()
        .unwrap()
        .expect("handed off after the release");
    assert!(second.fencing_token() > token);
    // The lease is read by the database's real clock, not the shadowing one.
    let info = b.lease(&name).unwrap().expect("a lease row");
    assert!(
        matches!(info.status, lockbox::LeaseStatus::Held { .. }),
        "{info:?}"
    );
    second.release().unwrap();

    // Lock-delay: the holder's session dies with its lease still live; the next
    // acquire waits the lease out instead of taking it at once.
    let name = unique("delay");
    let held = a.try_lock(&name).unwrap().expect("free lock");
    let token = held.fencing_token();
    assert!(
        b.try_lock(&name).unwrap().is_none(),
        "a live lease must not be taken"
    );
    terminate(role.holder_pid(&name));
    assert!(
        b.try_lock(&name).unwrap().is_none(),
        "the dead holder's live lease must still be waited out"
    );
    let next = b
        .lock_timeout(&name, Duration::from_secs(10))
        .expect("granted once the lease ran out");
    assert!(next.fencing_token() > token);
    drop(held);
    next.release().unwrap();

    // Zombie takeover: the holder stops renewing but its session (and advisory
    // lock) lives on; once the lease expires, an acquirer terminates it.
    let name = unique("zombie");
    let (z, _) = role.client(ms(600));
    let zombie = z.try_lock(&name).unwrap().expect("free lock");
    let token = zombie.fencing_token();
    let zombie_pid = role.holder_pid(&name);
    z.__pause_renewals(true);
    let taken = b
        .lock_timeout(&name, Duration::from_secs(10))
        .expect("taken over from the zombie");
    assert!(taken.fencing_token() > token);
    let alive: i64 = admin()
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = $1",
            &[&zombie_pid],
        )
        .unwrap()
        .get(0);
    assert_eq!(alive, 0, "the zombie session was not terminated");
    taken.release().unwrap();
    drop(zombie);
}

/// The system-wide `synchronous_commit` is turned `off` and the configuration
/// reloaded while a client has a pooled session. With a synchronous standby
/// named that never connects, a commit that waits for durability blocks in
/// `SyncRep`; an asynchronous one would not. Grants must block.
#[test]
fn grants_stay_synchronous_after_a_system_wide_synchronous_commit_off_and_reload() {
    let cluster = Cluster::start().expect("throwaway cluster");
    let app = unique("sync-app");
    let client = LockClient::builder(&url_with_app(&cluster.url, &app))
        .pool_size(1)
        .build()
        .unwrap();
    // The pool's one session exists before the reload.
    warm(&client);

    let mut db = postgres::Client::connect(&cluster.url, postgres::NoTls).unwrap();
    // One statement each: ALTER SYSTEM cannot run in a (multi-statement) block.
    for stmt in [
        "ALTER SYSTEM SET synchronous_commit = off",
        "ALTER SYSTEM SET synchronous_standby_names = 'never_connects'",
        "SELECT pg_reload_conf()",
    ] {
        db.batch_execute(stmt).unwrap();
    }
    // The reload reaches the backends asynchronously: wait until a new session
    // sees it (a pooled one processes it before its next statement).
    assert!(eventually(Duration::from_secs(5), || {
        let mut c = postgres::Client::connect(&cluster.url, postgres::NoTls).unwrap();
        let v: String = c
            .query_one("SELECT current_setting('synchronous_standby_names')", &[])
            .unwrap()
            .get(0);
        v == "never_connects"
    }));

    let name = unique("sync");
    let acquire = {
        let client = client.clone();
        let name = name.clone();
        thread::spawn(move || client.try_lock(&name).map(|l| l.map(|l| l.fencing_token())))
    };
    let in_syncrep = eventually(Duration::from_secs(5), || {
        db.query_one(
            "SELECT count(*) > 0 FROM pg_stat_activity \
             WHERE application_name = $1 AND wait_event = 'SyncRep'",
            &[&app],
        )
        .unwrap()
        .get(0)
    });
    // Let the commit finish either way, so the thread ends.
    for stmt in [
        "ALTER SYSTEM RESET synchronous_standby_names",
        "SELECT pg_reload_conf()",
    ] {
        db.batch_execute(stmt).unwrap();
    }
    let token = acquire.join().unwrap().unwrap();
    assert!(
        in_syncrep,
        "the grant committed without waiting for durability (synchronous_commit off)"
    );
    // Granted once the commit could finish (tokens come from the table's
    // store-wide sequence: the warm-up took the first).
    assert!(token.is_some_and(|t| t > 1), "{token:?}");
}
