//! A blocking acquire on PostgreSQL of a name its client lately found held
//! waits with its first statement (the wait-and-grant function), not a try
//! and then a wait: a waiter handed the lock costs one round trip. Other
//! blocking acquires try first (a free lock is granted by the cheaper
//! statement). What the try used to do for a waiter must still happen: a
//! zombie holder is taken over within a timed wait, and a pooled session
//! found dead on arrival is replaced. Statements are counted by the server
//! itself.

use crate::common;

use std::thread;
use std::time::Duration;

use common::server::Cluster;
use common::*;
use lockbox::{LockClient, advisory_key};

/// The try statement, as `pg_stat_statements` normalises it.
const TRY: &str = "%pg_try_advisory_lock($1::int4, $2::int4) AS got%";

fn calls(db: &mut postgres::Client, pattern: &str) -> i64 {
    db.query_one(
        "SELECT COALESCE(sum(calls), 0)::int8 FROM pg_stat_statements WHERE query LIKE $1",
        &[&pattern],
    )
    .unwrap()
    .get(0)
}

/// A throwaway cluster counting statements (`pg_stat_statements`), and two
/// warmed clients of it (one session each) in application `app`.
fn counting_cluster(app: &str) -> (Cluster, postgres::Client, LockClient, LockClient) {
    let cluster = Cluster::start_with(|c| {
        use std::io::Write;
        let mut conf = std::fs::OpenOptions::new()
            .append(true)
            .open(format!("{}/postgresql.conf", c.data()))
            .map_err(|e| e.to_string())?;
        writeln!(conf, "shared_preload_libraries = 'pg_stat_statements'").map_err(|e| e.to_string())
    })
    .expect("throwaway cluster");
    let mut db = postgres::Client::connect(&cluster.url, postgres::NoTls).unwrap();
    db.batch_execute("CREATE EXTENSION pg_stat_statements")
        .unwrap();
    let url = format!("{}?application_name={app}", cluster.url);
    let build = || {
        LockClient::builder(&url)
            .ttl(ms(10_000))
            .pool_size(1)
            .build()
            .unwrap()
    };
    let (holder, waiter) = (build(), build());
    warm(&holder);
    warm(&waiter);
    (cluster, db, holder, waiter)
}

/// Counted by the server: while a holder holds the name, a waiter that found
/// it held before, and is then handed it, sends no try.
#[test]
fn a_waiter_handed_a_contended_lock_sends_no_try() {
    let app = unique("wait-first");
    let (_cluster, mut db, holder, waiter) = counting_cluster(&app);
    let name = unique("handed");
    let held = holder.try_lock(&name).unwrap().expect("a free name");
    let token = held.fencing_token();
    assert!(waiter.try_lock(&name).unwrap().is_none());
    db.query_one("SELECT pg_stat_statements_reset()", &[])
        .unwrap();

    thread::scope(|s| {
        let waiting = s.spawn(|| waiter.lock_timeout(&name, Duration::from_secs(30)));
        assert!(
            eventually(Duration::from_secs(10), || {
                db.query_one(
                    "SELECT count(*) > 0 FROM pg_stat_activity \
                     WHERE application_name = $1 AND wait_event_type = 'Lock' \
                       AND wait_event = 'advisory'",
                    &[&app],
                )
                .unwrap()
                .get(0)
            }),
            "the waiter never waited for the key"
        );
        held.release().unwrap();
        let lock = waiting.join().unwrap().unwrap();
        assert!(lock.fencing_token() > token);
        lock.release().unwrap();
    });
    // The waiter waited and was granted by the function.
    assert_eq!(calls(&mut db, TRY), 0, "the waiter tried before it waited");
    assert!(calls(&mut db, "%wait_grant%") >= 1);
}

/// Counted by the server: a blocking acquire of a name its client never found
/// held tries first, and a free lock is granted by that one statement.
#[test]
fn an_uncontended_blocking_acquire_tries_first() {
    let app = unique("try-first");
    let (_cluster, mut db, _holder, client) = counting_cluster(&app);
    db.query_one("SELECT pg_stat_statements_reset()", &[])
        .unwrap();
    client
        .lock_timeout(&unique("free"), Duration::from_secs(5))
        .unwrap()
        .release()
        .unwrap();
    assert_eq!(calls(&mut db, TRY), 1);
    assert_eq!(calls(&mut db, "%wait_grant%"), 0);
}

/// A session holding `name`'s key with a lease of token `token` that a new
/// client (TTL 60 s, returned with its application name) finds live, so
/// that it remembers the key as contended; then the lease ends and the
/// session stays: a zombie.
fn contended_zombie(name: &str, token: i64) -> (postgres::Client, LockClient, String) {
    let mut zombie = admin();
    let (k1, k2) = advisory_key(name);
    zombie
        .execute("SELECT pg_advisory_lock($1, $2)", &[&k1, &k2])
        .unwrap();
    fake_lease(name, token, 60_000, pid_of(&mut zombie));
    let (client, app) = client(ms(60_000));
    assert!(client.try_lock(name).unwrap().is_none());
    admin()
        .execute(
            "UPDATE lockbox_leases SET expires_at = clock_timestamp() - interval '10 ms' \
             WHERE name = $1",
            &[&name],
        )
        .unwrap();
    (zombie, client, app)
}

/// A timed acquire behind a zombie (its session holds the key, its lease
/// expired) takes it over within its timeout, though its first wait cannot
/// know the holder is one: the first slice is at most half the wait, and the
/// holder is probed when it ends. The TTL (60 s) is far longer than the wait.
/// The client found the name held (live) just before, so it waits first.
#[test]
fn a_timed_wait_takes_a_zombie_over_before_its_time_is_up() {
    let name = unique("zombie-wait");
    let (mut zombie, client, app) = contended_zombie(&name, 11);

    let lock = client
        .lock_timeout(&name, Duration::from_secs(3))
        .expect("taken over from the zombie within the wait");
    assert_eq!(lock.fencing_token(), 12);
    assert!(
        zombie.simple_query("SELECT 1").is_err(),
        "the zombie session survived"
    );
    lock.release().unwrap();
    assert_eq!(advisory_locks_of(&app), 0);
}

/// A blocking acquire that waits first, whose pooled session ended while idle
/// (here terminated just before), is retried on another session, as a try
/// is.
#[test]
fn a_blocking_acquire_on_a_session_gone_from_the_pool_is_retried() {
    let name = unique("after-terminate");
    let (holder, _) = client(ms(5_000));
    let (client, app) = client(ms(5_000));
    let held = holder.try_lock(&name).unwrap().expect("a free name");
    assert!(client.try_lock(&name).unwrap().is_none());
    held.release().unwrap();
    for pid in pids_of(&app) {
        terminate(pid);
    }
    // Within a second of its last use, the connection is taken unchecked
    // (older ones are validated first): the acquire's first statement is what
    // finds the session gone.
    let lock = client
        .lock_timeout(&name, Duration::from_secs(5))
        .expect("retried on a new session");
    lock.release().unwrap();
}

/// A timed acquire behind a holder it must terminate (here one holding the
/// key with no lease, idle past the waiter's TTL) whose backend cannot exit
/// (stopped with SIGSTOP) returns by its timeout: the probe waits for the
/// exit no longer than the acquire may wait (it waited 5 s).
#[test]
fn a_timed_wait_is_not_held_up_by_a_zombie_that_cannot_exit() {
    let name = unique("frozen-zombie");
    let mut stranded = admin();
    let (k1, k2) = advisory_key(&name);
    stranded
        .execute("SELECT pg_advisory_lock($1, $2)", &[&k1, &k2])
        .unwrap();
    let pid = pid_of(&mut stranded);
    let (client, app) = client(ms(1000));
    // Found held (live, not idle long enough yet), so the acquire waits first.
    assert!(client.try_lock(&name).unwrap().is_none());
    assert!(eventually(Duration::from_secs(5), || {
        admin()
            .query_one(
                "SELECT now() - state_change > interval '1.2 s' FROM pg_stat_activity \
                 WHERE pid = $1",
                &[&pid],
            )
            .unwrap()
            .get(0)
    }));
    let stopped = Stopped::new(pid);
    let start = std::time::Instant::now();
    let res = client.lock_timeout(&name, ms(1500));
    let took = start.elapsed();
    drop(stopped);
    assert!(res.unwrap_err().is_timeout());
    assert!(
        took < ms(3000),
        "lock_timeout(1.5 s) returned after {took:?}"
    );
    assert_eq!(advisory_locks_of(&app), 0);
}

/// With a pool of one, an acquire whose only pooled session ended while idle
/// is retried on a new one: the dead connection goes back (and is closed)
/// before the retry takes one.
#[test]
fn a_pool_of_one_replaces_a_session_found_dead() {
    for blocking in [false, true] {
        let app = unique("pool-of-one");
        let client = builder_for(&app)
            .ttl(ms(5000))
            .pool_size(1)
            .build()
            .unwrap();
        warm(&client);
        for pid in pids_of(&app) {
            terminate(pid);
        }
        let name = unique("one");
        let lock = if blocking {
            client.lock_timeout(&name, Duration::from_secs(5))
        } else {
            client.try_lock(&name).map(|l| l.expect("a free name"))
        };
        lock.unwrap_or_else(|e| panic!("blocking: {blocking}: {e}"))
            .release()
            .unwrap();
    }
}

/// A short timed wait (150 ms) on a contended key whose holder became a
/// zombie: its probe has 100 ms or less left, and `pg_terminate_backend`
/// with such a timeout sleeps through it and reports no exit. The wait may
/// run out, but the zombie is terminated and that is counted (it was not),
/// and the next acquire is granted.
#[test]
fn a_short_wait_counts_the_zombie_it_terminated() {
    let name = unique("short-zombie");
    let (mut zombie, client, app) = contended_zombie(&name, 21);
    if let Ok(lock) = client.lock_timeout(&name, ms(150)) {
        lock.release().unwrap();
    }
    assert_eq!(client.metrics().zombie_terminations, 1);
    assert!(zombie.simple_query("SELECT 1").is_err());
    let lock = client.try_lock(&name).unwrap().expect("the key is free");
    assert_eq!(lock.fencing_token(), 22);
    lock.release().unwrap();
    assert_eq!(advisory_locks_of(&app), 0);
}
