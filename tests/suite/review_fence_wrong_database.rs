//! Review (fence): the fence matched the lease row by name and token only.
//! Tokens are small integers drawn from each store's own sequence, so a
//! transaction on *another* database (staging next to production on one
//! server, a second deployment, a tenant database) that has a lease table of
//! the same name, with a lease of the same name and token, passed the check:
//! it locked a row that orders nothing against this lock's next grant. The
//! doc says "connected to the database that holds the lease table"; a
//! careless caller is not told when it is not. The row's owner (unique per
//! client) tells the two apart.

use crate::common;

use std::time::Duration;

use common::*;
use lockbox::{Error, LockClient};

const OTHER_DB: &str = "lockbox_review_fence_other";

/// A URL for database `db` on the test server.
fn url_of(db: &str) -> String {
    let ServerParts {
        host, port, user, ..
    } = server_parts();
    format!("host={host} port={port} dbname={db} user={user} sslmode=disable")
}

/// Creates the other database once (another test process may race us).
fn other_database() -> String {
    let mut admin = admin();
    let exists: bool = admin
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)",
            &[&OTHER_DB],
        )
        .unwrap()
        .get(0);
    if !exists && let Err(e) = admin.batch_execute(&format!("CREATE DATABASE {OTHER_DB}")) {
        // 42P04 duplicate_database: created meanwhile; 23505: the same race
        // seen on the catalog's unique index.
        let code = e.code().map(|c| c.code().to_owned()).unwrap_or_default();
        assert!(code == "42P04" || code == "23505", "{e}");
    }
    url_of(OTHER_DB)
}

#[test]
fn a_transaction_on_another_database_does_not_pass_the_fence() {
    let here = LockClient::builder(database_url())
        .ttl(Duration::from_secs(60))
        .build()
        .unwrap();
    let other_url = other_database();
    // Another deployment on the other database: it creates its own lease
    // table (same default name) and holds the same name.
    let there = LockClient::builder(&other_url)
        .ttl(Duration::from_secs(60))
        .build()
        .unwrap();
    let name = unique("fence-wrong-db");
    let lock = here.try_lock(&name).unwrap().unwrap();
    let theirs = there.try_lock(&name).unwrap().unwrap();
    // Same name, same token: tokens are small, per-store counters. Brought
    // level by the other store's operator (as its own grants would in time).
    let mut other = postgres::Client::connect(&other_url, postgres::NoTls).unwrap();
    other
        .execute(
            "UPDATE lockbox_leases SET token = $2 WHERE name = $1",
            &[&name, &(lock.fencing_token() as i64)],
        )
        .unwrap();
    let mut tx = other.transaction().unwrap();
    match lock.fence(&mut tx) {
        // The lock is held: not a loss, the caller's mistake.
        Err(Error::InvalidConfig(m)) => assert!(m.contains("database"), "{m}"),
        Ok(()) => panic!(
            "a transaction on another database passed the fence of {name:?} (its row \
             there is another client's)"
        ),
        Err(e) => panic!("expected InvalidConfig, got {e:?}"),
    }
    drop(tx);
    // On the right database it passes.
    let mut db = admin();
    let mut tx = db.transaction().unwrap();
    lock.fence(&mut tx).unwrap();
    tx.commit().unwrap();
    lock.release().unwrap();
    drop(theirs);
}
