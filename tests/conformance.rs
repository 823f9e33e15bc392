//! One behavioural suite, run against every backend.

mod common;

use common::*;
use lockbox::{LockClient, MemoryBackend};

conformance_suite!(postgres, LockClient::builder(database_url()));
// Every lock on a session of its own (no multiplexing).
conformance_suite!(
    postgres_unshared,
    LockClient::builder(database_url()).locks_per_session(1)
);
// Recording the lease history (every grant, release and takeover statement
// writes it), on a lease table of its own.
conformance_suite!(
    postgres_history,
    LockClient::builder(database_url())
        .table("lockbox_conformance_history")
        .history(true)
);
conformance_suite!(memory, LockClient::with_backend(shared_memory()));
conformance_suite!(redis, LockClient::redis(common::redis_server::redis_url()));

/// One in-memory store for the whole test process (names are unique per test).
fn shared_memory() -> MemoryBackend {
    MemoryBackend::global()
}

/// Child processes incrementing a shared counter (held in the same store's
/// neighbour, PostgreSQL) under a lock of the given store.
#[test]
#[ignore = "child-process entry point, run by the other tests"]
fn child_entry() {
    let Some(role) = child_role() else { return };
    assert_eq!(role, "increment");
    let name = std::env::var("LOCK_NAME").unwrap();
    let client = store_builder(&std::env::var("STORE").unwrap())
        .build()
        .unwrap();
    let mut db = admin();
    report("ready");
    assert_eq!(next_command(), "go");
    for _ in 0..20 {
        let lock = client
            .lock_timeout(&name, std::time::Duration::from_secs(30))
            .unwrap();
        let v: i64 = db
            .query_one(
                "SELECT value FROM lockbox_test_counter WHERE name = $1",
                &[&name],
            )
            .unwrap()
            .get(0);
        db.execute(
            "UPDATE lockbox_test_counter SET value = $2 WHERE name = $1",
            &[&name, &(v + 1)],
        )
        .unwrap();
        lock.release().unwrap();
    }
    report("done");
}

/// Exclusion across processes, for the stores that span processes.
fn exclusion_across_processes(store: &str) {
    let name = unique(&format!("conf-procs-{store}"));
    setup_counter(&name);
    let mut children: Vec<ChildProc> = (0..3)
        .map(|_| {
            ChildProc::spawn(
                "increment",
                &[
                    ("LOCK_NAME", &name),
                    ("STORE", store),
                    ("REDIS_URL", common::redis_server::redis_url()),
                ],
            )
        })
        .collect();
    for c in &mut children {
        assert_eq!(c.recv(), "ready");
    }
    for c in &mut children {
        c.send("go");
    }
    for mut c in children {
        assert_eq!(c.recv(), "done");
        c.wait_success();
    }
    assert_eq!(
        counter(&name),
        60,
        "{store}: an update was lost, two processes overlapped"
    );
}

#[test]
fn postgres_exclusion_across_processes() {
    exclusion_across_processes("postgres");
}

#[test]
fn redis_exclusion_across_processes() {
    exclusion_across_processes("redis");
}
