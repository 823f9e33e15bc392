//! A blocking acquire on PostgreSQL waits with its first statement (the
//! wait-and-grant function), not a try and then a wait: a waiter handed the
//! lock costs one round trip. What the try used to do for it must still
//! happen: a zombie holder is taken over within a timed wait, and a pooled
//! session found dead on arrival is replaced. Statements are counted by the
//! server itself.

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

/// Counted by the server (`pg_stat_statements` on a throwaway cluster): while
/// a holder holds the name, a waiter that is then handed it sends no try.
#[test]
fn a_waiter_handed_the_lock_sends_no_try() {
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
    let app = unique("wait-first");
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
    let name = unique("handed");
    db.query_one("SELECT pg_stat_statements_reset()", &[])
        .unwrap();

    let held = holder.try_lock(&name).unwrap().expect("a free name");
    let token = held.fencing_token();
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
    // The holder's one try; the waiter waited and was granted by the function.
    assert_eq!(calls(&mut db, TRY), 1, "the waiter tried before it waited");
    assert!(calls(&mut db, "%wait_grant%") >= 1);
}

/// A timed acquire behind a zombie (its session holds the key, its lease
/// expired) takes it over within its timeout, though its first wait cannot
/// know the holder is one: the first slice is at most half the wait, and the
/// holder is probed when it ends. The TTL (60 s) is far longer than the wait.
#[test]
fn a_timed_wait_takes_a_zombie_over_before_its_time_is_up() {
    let name = unique("zombie-wait");
    let mut zombie = admin();
    let (k1, k2) = advisory_key(&name);
    zombie
        .execute("SELECT pg_advisory_lock($1, $2)", &[&k1, &k2])
        .unwrap();
    fake_lease(&name, 11, -10, pid_of(&mut zombie));

    let (client, app) = client(ms(60_000));
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

/// A blocking acquire whose pooled session ended while idle (here terminated
/// just before) is retried on another session, as a try is.
#[test]
fn a_blocking_acquire_on_a_session_gone_from_the_pool_is_retried() {
    let (client, app) = client(ms(5_000));
    warm(&client);
    for pid in pids_of(&app) {
        terminate(pid);
    }
    // Within a second of its last use, the connection is taken unchecked
    // (older ones are validated first): the acquire's first statement is what
    // finds the session gone.
    let lock = client
        .lock_timeout(&unique("after-terminate"), Duration::from_secs(5))
        .expect("retried on a new session");
    lock.release().unwrap();
}
