//! PostgreSQL's lock table is finite (`max_locks_per_transaction ×
//! (max_connections + max_prepared_transactions)`), and held locks share
//! sessions, so one client can fill it. In a file of its own: the throwaway
//! cluster's `initdb` is heavy, and must not starve the renewals of tests
//! running beside it.

use crate::common;

use std::time::{Duration, Instant};

use common::ms;
use common::server::Cluster;
use lockbox::{Error, LockClient};

/// Running out of the server's lock table is a typed error naming the setting,
/// not a hang, a leak or a panic; what was held stays held, and once locks are
/// released acquires work again.
#[test]
fn a_full_lock_table_is_a_clear_error() {
    let cluster = Cluster::start_with(|c| {
        use std::io::Write;
        let mut conf = std::fs::OpenOptions::new()
            .append(true)
            .open(format!("{}/postgresql.conf", c.data()))
            .map_err(|e| e.to_string())?;
        writeln!(conf, "max_locks_per_transaction = 10").map_err(|e| e.to_string())
    })
    .expect("throwaway cluster");
    let client = LockClient::builder(&cluster.url)
        .ttl(ms(5000))
        .pool_timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    // Opened first: once the table is full, a new session cannot even start
    // (its startup needs a lock: FATAL 53200).
    let mut db = postgres::Client::connect(&cluster.url, postgres::NoTls).unwrap();
    let mut held = Vec::new();
    let started = Instant::now();
    let err = loop {
        match client.try_lock(&format!("full-{}", held.len())) {
            Ok(Some(lock)) => held.push(lock),
            Ok(None) => panic!("a free name was not acquired"),
            Err(e) => break e,
        }
        assert!(
            held.len() < 100_000,
            "the lock table never ran out ({} locks)",
            held.len()
        );
    };
    eprintln!(
        "lock table full after {} locks, {:?}: {err}",
        held.len(),
        started.elapsed()
    );
    assert!(matches!(err, Error::LockTableFull(_)), "{err:?}");
    assert_eq!(err.sqlstate(), Some("53200"));
    assert!(
        err.to_string().contains("max_locks_per_transaction"),
        "{err}"
    );
    assert!(
        held.len() > 100,
        "only {} locks before it ran out",
        held.len()
    );
    // What was held is still held; the failed acquire left nothing behind.
    assert!(held.iter().all(|l| l.is_held()));
    let advisory = |db: &mut postgres::Client| -> i64 {
        db.query_one(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'",
            &[],
        )
        .unwrap()
        .get(0)
    };
    assert_eq!(advisory(&mut db), held.len() as i64);
    // Free a few: acquiring works again.
    for lock in held.drain(..10) {
        lock.release().unwrap();
    }
    let again = client.try_lock("full-again").unwrap().expect("room again");
    again.release().unwrap();
    for lock in held {
        lock.release().unwrap();
    }
    assert_eq!(advisory(&mut db), 0);
}
