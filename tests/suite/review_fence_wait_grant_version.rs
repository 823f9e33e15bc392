//! Review (fence): the grant inside the wait-and-grant function changed
//! (`SET name = excluded.name`, so that it locks the lease row `FOR UPDATE`
//! and waits for a fenced transaction) but the function kept its name,
//! `<table>_wait_grant_v1`, against the rule that the version changes
//! whenever the body does. A process of the previous release (a rolling
//! upgrade, or another deployment's build as the table's owner) restores its
//! own body with `CREATE OR REPLACE`, which keeps the function's OID and
//! owner: a session of the new release that checked the function before then
//! goes on calling it, now with the old grant, which locks the row only `FOR
//! NO KEY UPDATE`, does not conflict with the fence's `FOR KEY SHARE`, and
//! grants the name while the fenced transaction is still open.

use crate::common;

use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use common::*;
use lockbox::LockClient;

/// Whether backend `pid` is waiting for a row lock (a transaction holding
/// the row), not for an advisory key.
fn waits_for_row(pid: i32) -> bool {
    admin()
        .query_one(
            "SELECT count(*) > 0 FROM pg_stat_activity WHERE pid = $1 \
             AND wait_event_type = 'Lock' AND wait_event IN ('transactionid', 'tuple')",
            &[&pid],
        )
        .unwrap()
        .get(0)
}

#[test]
fn an_old_release_restoring_its_function_does_not_let_a_grant_past_a_fence() {
    let schema = unique("fence_wgv").replace('-', "_");
    admin()
        .batch_execute(&format!("CREATE SCHEMA {schema}"))
        .unwrap();
    let _drop = DropSchema(schema.clone());
    let table = format!("{schema}.leases");
    // The table's owner builds: the table and this release's function.
    let holder = LockClient::builder(database_url())
        .table(&table)
        .ttl(Duration::from_secs(60))
        .build()
        .unwrap();
    let app = unique("fence-wgv-app");
    let waiter = builder_for(&app)
        .table(&table)
        .ttl(Duration::from_secs(2))
        .pool_size(1)
        .build()
        .unwrap();
    // The waiter's one session is open, and has checked the function.
    waiter
        .try_lock(&unique("fence-wgv-warm"))
        .unwrap()
        .unwrap()
        .release()
        .unwrap();

    // A process of the previous release builds as the table's owner: it
    // restores the function it knows, by the name it knows.
    let mut admin_db = admin();
    let body: String = admin_db
        .query_one(
            "SELECT p.prosrc FROM pg_proc p WHERE p.pronamespace = $1::text::regnamespace \
             AND p.proname LIKE 'leases\\_wait\\_grant\\_v%' \
             AND p.prosrc LIKE '%SET name = excluded.name, owner%'",
            &[&schema],
        )
        .unwrap()
        .get(0);
    let old_body = body.replace("SET name = excluded.name, owner", "SET owner");
    assert_ne!(old_body, body);
    admin_db
        .batch_execute(&format!(
            "CREATE OR REPLACE FUNCTION {schema}.leases_wait_grant_v1({}) RETURNS {} \
             LANGUAGE plpgsql VOLATILE SECURITY INVOKER AS $lockbox${old_body}$lockbox$",
            wg::WG_ARGS,
            wg::WG_RESULT,
        ))
        .unwrap();

    let name = unique("fence-wgv");
    let lock = holder.try_lock(&name).unwrap().unwrap();
    let (tx_got, rx_got) = mpsc::channel();
    let wait = {
        let name = name.clone();
        thread::spawn(move || {
            let next = waiter.lock_timeout(&name, Duration::from_secs(60)).unwrap();
            tx_got.send(next.fencing_token()).unwrap();
            next.release().unwrap();
        })
    };
    assert!(
        eventually(Duration::from_secs(10), || is_waiting(&app)),
        "the waiter never waited for the key"
    );
    let mut db = admin();
    let mut tx = db.transaction().unwrap();
    lock.fence(&mut tx).unwrap();
    let token = lock.fencing_token();
    lock.release().unwrap();
    // The waiter is woken with the key; its grant must wait for the fenced
    // transaction's row lock, not be made.
    let mut granted_early = None;
    let waited = eventually(Duration::from_secs(20), || {
        if let Ok(t) = rx_got.try_recv() {
            granted_early = Some(t);
            return true;
        }
        pids_of(&app).into_iter().any(waits_for_row)
    });
    assert_eq!(
        granted_early, None,
        "the next holder was granted while the fenced transaction was open"
    );
    assert!(
        waited,
        "the waiter neither waited for the row nor was granted"
    );
    tx.commit().unwrap();
    let next = rx_got.recv_timeout(Duration::from_secs(30)).unwrap();
    assert!(next > token);
    wait.join().unwrap();
    drop(holder);
}

/// Drops the test's schema however the test ends.
struct DropSchema(String);

impl Drop for DropSchema {
    fn drop(&mut self) {
        let _ = admin().batch_execute(&format!(
            "SET lock_timeout = '10s'; DROP SCHEMA {} CASCADE",
            self.0
        ));
    }
}
