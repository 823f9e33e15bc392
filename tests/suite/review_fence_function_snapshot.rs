//! Review (fence): the SQL function `<table>_fence` judges the lease on the
//! caller's snapshot. Under `REPEATABLE READ` / `SERIALIZABLE` a snapshot
//! taken before the lease was released still shows it live, and the function
//! passes (it promised LB001 for a released lease); one taken before the
//! latest renewals may show it expired, and the function fails for a held
//! lease. `Lock::fence` confirms on a fresh snapshot of its own; the function
//! cannot, so its doc now says so (call it first in the transaction, or
//! under `READ COMMITTED`). What still holds either way, and what this test
//! pins: once the function has passed, no next grant comes before the
//! transaction ends.

use crate::common;

use std::time::Duration;

use common::*;
use lockbox::LockClient;

#[test]
fn under_repeatable_read_the_function_judges_the_snapshot_but_still_orders_the_next_grant() {
    let client = LockClient::builder(database_url())
        .ttl(Duration::from_secs(60))
        .build()
        .unwrap();
    let other = LockClient::builder(database_url()).build().unwrap();
    let name = unique("fence-fn-snapshot");
    let lock = client.try_lock(&name).unwrap().unwrap();
    let token = lock.fencing_token() as i64;
    let mut db = admin();
    let mut tx = db
        .build_transaction()
        .isolation_level(postgres::IsolationLevel::RepeatableRead)
        .start()
        .unwrap();
    tx.query("SELECT count(*) FROM lockbox_leases", &[])
        .unwrap();
    lock.release().unwrap();
    // Released since the snapshot: the function cannot see it.
    tx.execute("SELECT lockbox_leases_fence($1, $2)", &[&name, &token])
        .expect("the function judges the snapshot, which shows the lease live");
    // But it locked the row: the next grant waits for the transaction.
    assert!(other.try_lock(&name).unwrap().is_none());
    tx.commit().unwrap();
    other.try_lock(&name).unwrap().unwrap().release().unwrap();

    // The same check as the transaction's first statement sees the release.
    let name = unique("fence-fn-snapshot-first");
    let lock = client.try_lock(&name).unwrap().unwrap();
    let token = lock.fencing_token() as i64;
    lock.release().unwrap();
    let mut tx = db
        .build_transaction()
        .isolation_level(postgres::IsolationLevel::RepeatableRead)
        .start()
        .unwrap();
    let e = tx
        .execute("SELECT lockbox_leases_fence($1, $2)", &[&name, &token])
        .unwrap_err();
    assert_eq!(
        e.code().map(|c| c.code()),
        Some(lockbox::FENCE_SQLSTATE),
        "{e}"
    );
}
