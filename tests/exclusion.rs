//! Mutual exclusion under contention, across threads and processes: a
//! read-modify-write done in two statements under the lock never loses an update,
//! and every writer's fencing token is above the previous writer's.

mod common;

use std::thread;

use common::*;
use lockbox::LockClient;

const ITERATIONS: i64 = 25;

/// Increments the counter `iterations` times, each under the lock, as a separate
/// read and write so that any overlap of two holders loses an update.
fn increment(client: &LockClient, name: &str, iterations: i64) {
    let mut db = admin();
    for _ in 0..iterations {
        let lock = client.lock(name).unwrap();
        let token = lock.fencing_token() as i64;
        let row = db
            .query_one(
                "SELECT value, last_token FROM lockbox_test_counter WHERE name = $1",
                &[&name],
            )
            .unwrap();
        let (value, last): (i64, i64) = (row.get(0), row.get(1));
        assert!(
            token > last,
            "token {token} not above the previous holder's {last}"
        );
        db.execute(
            "UPDATE lockbox_test_counter SET value = $2, last_token = $3 WHERE name = $1",
            &[&name, &(value + 1), &token],
        )
        .unwrap();
        lock.release().unwrap();
    }
}

#[test]
#[ignore = "child-process entry point, run by the other tests"]
fn child_entry() {
    let Some(role) = child_role() else { return };
    assert_eq!(role, "counter");
    let name = std::env::var("LOCK_NAME").unwrap();
    let threads: usize = std::env::var("THREADS").unwrap().parse().unwrap();
    let client = LockClient::builder(database_url()).build().unwrap();
    report("ready");
    assert_eq!(next_command(), "go");
    thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| increment(&client, &name, ITERATIONS));
        }
    });
    report("done");
}

#[test]
fn threads_and_processes_never_overlap() {
    let name = unique("exclusion");
    setup_counter(&name);
    let (client, app) = client(ms(2000));
    // A name's first token comes from the store-wide sequence; each later grant
    // of the name takes the next one after its own.
    let first = client.try_lock(&name).unwrap().unwrap();
    let first_token = first.fencing_token() as i64;
    first.release().unwrap();

    let mut children: Vec<ChildProc> = (0..3)
        .map(|_| ChildProc::spawn("counter", &[("LOCK_NAME", &name), ("THREADS", "2")]))
        .collect();
    for child in &mut children {
        assert_eq!(child.recv(), "ready");
    }
    for child in &mut children {
        child.send("go");
    }
    thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| increment(&client, &name, ITERATIONS));
        }
    });
    for mut child in children {
        assert_eq!(child.recv(), "done");
        child.wait_success();
    }

    assert_eq!(counter(&name), (4 + 3 * 2) * ITERATIONS);
    let lease = lease_row(&name);
    assert_eq!(
        lease.token - first_token,
        (4 + 3 * 2) * ITERATIONS,
        "one token per grant"
    );
    assert!(lease.released);
    assert_eq!(advisory_locks_of(&app), 0);
}

#[test]
fn a_second_acquire_in_the_same_process_waits_like_anyone_else() {
    let name = unique("not-reentrant");
    let (client, _) = client(ms(2000));
    let lock = client.try_lock(&name).unwrap().expect("free");
    assert!(
        client.try_lock(&name).unwrap().is_none(),
        "locks are not reentrant"
    );
    let other_clone = client.clone();
    assert!(
        other_clone
            .lock_timeout(&name, ms(200))
            .unwrap_err()
            .is_timeout()
    );
    lock.release().unwrap();
    assert!(client.try_lock(&name).unwrap().is_some());
}
