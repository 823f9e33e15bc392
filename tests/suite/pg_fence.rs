//! `Lock::fence` and the `<table>_fence` SQL function: the check inside the
//! caller's own transaction that the lease is current, which holds every next
//! grant back until that transaction ends.

use crate::common;

use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use common::*;
use lockbox::{AcquireOptions, Error, LeaseStatus, LockClient, LostReason};

/// The fence function of the default lease table.
const FENCE_FN: &str = "lockbox_leases_fence";

/// A connection of the test's own (not lockbox's), for the caller's transactions.
fn connect() -> postgres::Client {
    admin()
}

fn lease_status(client: &LockClient, name: &str) -> LeaseStatus {
    client.lease(name).unwrap().unwrap().status
}

/// The SQLSTATE of a failed statement.
fn sqlstate(e: &postgres::Error) -> String {
    e.code().map(|c| c.code().to_owned()).unwrap_or_default()
}

#[test]
fn renewals_go_on_while_a_fenced_transaction_is_open() {
    // Both renewal statements: a session shared by several locks, and one of
    // the lock's own.
    for dedicated in [false, true] {
        let (client, _) = client(ms(600));
        let name = unique("fence-renew");
        let lock = client
            .acquire(&name, &AcquireOptions::new().dedicated_session(dedicated))
            .unwrap()
            .unwrap();
        let mut db = connect();
        let mut tx = db.transaction().unwrap();
        lock.fence(&mut tx).unwrap();
        let before = client.metrics().renewals_ok;
        // Three renewals while the row is locked FOR KEY SHARE by `tx`: a
        // renewal that locked the row FOR UPDATE would wait for `tx`, and the
        // lock would be lost at its deadline.
        assert!(
            eventually(Duration::from_secs(10), || client.metrics().renewals_ok
                >= before + 3),
            "renewals stopped while a fenced transaction was open (dedicated: {dedicated})"
        );
        assert!(lock.is_held());
        assert_eq!(lock.lost().try_recv().ok(), None);
        tx.commit().unwrap();
        lock.release().unwrap();
    }
}

#[test]
fn a_frozen_holder_cannot_be_overtaken_between_check_and_commit() {
    admin()
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS fence_test_data (name text PRIMARY KEY, v text NOT NULL)",
        )
        .unwrap();
    for dedicated in [false, true] {
        let name = unique("fence-frozen");
        admin()
            .execute(
                "INSERT INTO fence_test_data VALUES ($1, 'initial')",
                &[&name],
            )
            .unwrap();
        let (holder_client, _) = client(ms(500));
        let holder = holder_client
            .acquire(&name, &AcquireOptions::new().dedicated_session(dedicated))
            .unwrap()
            .unwrap();
        let mut db = connect();
        let mut tx = db.transaction().unwrap();
        tx.execute(
            "UPDATE fence_test_data SET v = 'written by the first holder' WHERE name = $1",
            &[&name],
        )
        .unwrap();
        holder.fence(&mut tx).unwrap();
        // Frozen between the check and the commit: no more renewals.
        holder_client.__pause_renewals(true);
        let (next_client, next_app) = client(ms(500));
        let (tx_got, rx_got) = mpsc::channel();
        let waiter = {
            let name = name.clone();
            thread::spawn(move || {
                let lock = next_client
                    .lock_timeout(&name, Duration::from_secs(60))
                    .unwrap();
                let seen: String = admin()
                    .query_one("SELECT v FROM fence_test_data WHERE name = $1", &[&name])
                    .unwrap()
                    .get(0);
                tx_got.send((lock.fencing_token(), seen)).unwrap();
                lock.release().unwrap();
            })
        };
        // The holder's lease runs out (it is lost), and the next holder's
        // grant waits for the row: the fenced transaction holds it.
        assert_eq!(
            holder.lost().recv_timeout(Duration::from_secs(10)),
            Ok(LostReason::Expired)
        );
        assert!(eventually(Duration::from_secs(10), || matches!(
            lease_status(&holder_client, &name),
            LeaseStatus::Expired { .. }
        )));
        assert!(
            eventually(Duration::from_secs(10), || pids_of(&next_app)
                .into_iter()
                .any(blocked_on_lock)),
            "the next holder never waited for the lease row"
        );
        // Two round trips of the waiter's retries (a row wait is at most 1 s):
        // still not granted.
        assert!(
            rx_got.recv_timeout(Duration::from_millis(2500)).is_err(),
            "the next holder was granted while the fenced transaction was open"
        );
        tx.commit().unwrap();
        let (token, seen) = rx_got.recv_timeout(Duration::from_secs(30)).unwrap();
        assert!(token > holder.fencing_token());
        assert_eq!(seen, "written by the first holder");
        waiter.join().unwrap();
        assert!(matches!(holder.release(), Err(Error::LockLost { .. })));
    }
}

#[test]
fn a_check_after_the_lease_ended_fails() {
    // Released behind the holder's back (an operator), the holder not yet told:
    // the fence says lost, and so does the SQL function.
    let client = LockClient::builder(database_url())
        .ttl(Duration::from_secs(60))
        .build()
        .unwrap();
    let name = unique("fence-released");
    let lock = client.try_lock(&name).unwrap().unwrap();
    let token = lock.fencing_token() as i64;
    let mut db = connect();
    {
        let mut tx = db.transaction().unwrap();
        lock.fence(&mut tx).unwrap();
        tx.execute(&format!("SELECT {FENCE_FN}($1, $2)"), &[&name, &token])
            .unwrap();
        tx.rollback().unwrap();
    }
    admin()
        .execute(
            "UPDATE lockbox_leases SET released_at = clock_timestamp() WHERE name = $1",
            &[&name],
        )
        .unwrap();
    let mut tx = db.transaction().unwrap();
    match lock.fence(&mut tx) {
        Err(Error::LockLost { reason, .. }) => assert_eq!(reason, LostReason::NotOwner),
        other => panic!("expected LockLost, got {other:?}"),
    }
    tx.rollback().unwrap();
    let mut tx = db.transaction().unwrap();
    let e = tx
        .execute(&format!("SELECT {FENCE_FN}($1, $2)"), &[&name, &token])
        .unwrap_err();
    assert_eq!(sqlstate(&e), lockbox::FENCE_SQLSTATE, "{e}");
    drop(tx);
    drop(lock);

    // Expired: the holder frozen past its lease. The guard knows it is lost
    // and sends nothing; the SQL function, asked on the database's clock,
    // refuses too.
    let (short, _) = common::client(ms(300));
    let name = unique("fence-expired");
    let lock = short.try_lock(&name).unwrap().unwrap();
    let token = lock.fencing_token() as i64;
    short.__pause_renewals(true);
    assert!(eventually(Duration::from_secs(10), || matches!(
        lease_status(&short, &name),
        LeaseStatus::Expired { .. }
    )));
    let mut tx = db.transaction().unwrap();
    match lock.fence(&mut tx) {
        Err(Error::LockLost { reason, .. }) => assert_eq!(reason, LostReason::Expired),
        other => panic!("expected LockLost, got {other:?}"),
    }
    let e = tx
        .execute(&format!("SELECT {FENCE_FN}($1, $2)"), &[&name, &token])
        .unwrap_err();
    assert_eq!(sqlstate(&e), lockbox::FENCE_SQLSTATE, "{e}");
}

#[test]
fn an_old_snapshot_cannot_pass_the_check() {
    let client = LockClient::builder(database_url())
        .ttl(Duration::from_secs(60))
        .build()
        .unwrap();
    let other = LockClient::builder(database_url()).build().unwrap();
    for isolation in ["REPEATABLE READ", "SERIALIZABLE"] {
        // Granted to another holder since the snapshot: the old row is not
        // locked as if current (40001 under these isolation levels).
        let name = unique("fence-snapshot");
        let lock = client
            .acquire(&name, &AcquireOptions::new().dedicated_session(true))
            .unwrap()
            .unwrap();
        let token = lock.fencing_token() as i64;
        let mut db = connect();
        let mut function_db = connect();
        let mut tx = db
            .build_transaction()
            .isolation_level(level(isolation))
            .start()
            .unwrap();
        tx.query("SELECT count(*) FROM lockbox_leases", &[])
            .unwrap();
        let mut ftx = function_db
            .build_transaction()
            .isolation_level(level(isolation))
            .start()
            .unwrap();
        ftx.query("SELECT count(*) FROM lockbox_leases", &[])
            .unwrap();
        admin()
            .execute(
                "UPDATE lockbox_leases SET released_at = clock_timestamp() WHERE name = $1",
                &[&name],
            )
            .unwrap();
        // Its session gone too (its next renewal, 20 s away, would say so):
        // nothing holds the key.
        terminate(holder_pid(&name));
        let next = other.try_lock(&name).unwrap().unwrap();
        assert!(next.fencing_token() > lock.fencing_token());
        match lock.fence(&mut tx) {
            Err(Error::LockLost { reason, .. }) => assert_eq!(reason, LostReason::NotOwner),
            other => panic!("{isolation}: expected LockLost, got {other:?}"),
        }
        drop(tx);
        let e = ftx
            .execute(&format!("SELECT {FENCE_FN}($1, $2)"), &[&name, &token])
            .unwrap_err();
        assert_eq!(sqlstate(&e), "40001", "{isolation}: {e}");
        drop(ftx);
        next.release().unwrap();
        drop(lock);

        // Released since the snapshot, not granted: the snapshot still shows
        // the lease live, and the guard confirms it on a fresh snapshot.
        let name = unique("fence-snapshot-released");
        let lock = client.try_lock(&name).unwrap().unwrap();
        let mut tx = db
            .build_transaction()
            .isolation_level(level(isolation))
            .start()
            .unwrap();
        tx.query("SELECT count(*) FROM lockbox_leases", &[])
            .unwrap();
        admin()
            .execute(
                "UPDATE lockbox_leases SET released_at = clock_timestamp() WHERE name = $1",
                &[&name],
            )
            .unwrap();
        match lock.fence(&mut tx) {
            Err(Error::LockLost { reason, .. }) => assert_eq!(reason, LostReason::NotOwner),
            other => panic!("{isolation}: expected LockLost, got {other:?}"),
        }
        drop(tx);
        drop(lock);

        // Live: the check passes, and holds the next grant back.
        let name = unique("fence-snapshot-live");
        let lock = client.try_lock(&name).unwrap().unwrap();
        let mut tx = db
            .build_transaction()
            .isolation_level(level(isolation))
            .start()
            .unwrap();
        tx.query("SELECT count(*) FROM lockbox_leases", &[])
            .unwrap();
        lock.fence(&mut tx).unwrap();
        lock.release().unwrap();
        // Released, but the fenced transaction is open: a try waits for the
        // row (at most its bounded row wait) and does not get it.
        assert!(other.try_lock(&name).unwrap().is_none());
        tx.commit().unwrap();
        other.try_lock(&name).unwrap().unwrap().release().unwrap();
    }
}

fn level(name: &str) -> postgres::IsolationLevel {
    match name {
        "REPEATABLE READ" => postgres::IsolationLevel::RepeatableRead,
        _ => postgres::IsolationLevel::Serializable,
    }
}

#[test]
fn misuse_is_refused_and_the_callers_settings_are_kept() {
    let client = LockClient::builder(database_url()).build().unwrap();
    let name = unique("fence-misuse");
    let lock = client.try_lock(&name).unwrap().unwrap();
    let mut db = connect();
    // Outside a transaction block the row lock would end with the statement.
    match lock.fence(&mut db) {
        Err(e @ Error::InvalidConfig(_)) => assert!(e.to_string().contains("transaction"), "{e}"),
        other => panic!("expected InvalidConfig, got {other:?}"),
    }
    // The caller's lock_timeout is what it was.
    let mut tx = db.transaction().unwrap();
    tx.batch_execute("SET LOCAL lock_timeout = '7s'").unwrap();
    lock.fence(&mut tx).unwrap();
    let now: String = tx.query_one("SHOW lock_timeout", &[]).unwrap().get(0);
    assert_eq!(now, "7s");
    tx.commit().unwrap();
    lock.release().unwrap();

    // A lock of another store has no lease in the caller's database.
    let memory = LockClient::memory().build().unwrap();
    let lock = memory.try_lock(&name).unwrap().unwrap();
    let mut tx = db.transaction().unwrap();
    assert!(matches!(lock.fence(&mut tx), Err(Error::Unsupported(_))));
}

#[test]
fn a_hostile_caller_session_cannot_fool_the_check() {
    // The caller's search_path puts its own clock_timestamp() and text `=`
    // before the catalog's: an expired lease must still fail, a foreign
    // name must still not match.
    let schema = unique("fence_hostile").replace('-', "_");
    admin()
        .batch_execute(&format!(
            "CREATE SCHEMA {schema};
             CREATE FUNCTION {schema}.clock_timestamp() RETURNS timestamptz
                 LANGUAGE sql AS $$ SELECT '-infinity'::timestamptz $$;
             CREATE FUNCTION {schema}.texteq_any(text, text) RETURNS boolean
                 LANGUAGE sql AS $$ SELECT true $$;
             CREATE OPERATOR {schema}.= (LEFTARG = text, RIGHTARG = text,
                 FUNCTION = {schema}.texteq_any);"
        ))
        .unwrap();
    let (client, _) = client(ms(300));
    let name = unique("fence-hostile");
    let lock = client.try_lock(&name).unwrap().unwrap();
    let token = lock.fencing_token() as i64;
    client.__pause_renewals(true);
    assert!(eventually(Duration::from_secs(10), || matches!(
        lease_status(&client, &name),
        LeaseStatus::Expired { .. }
    )));
    let mut db = connect();
    let mut tx = db.transaction().unwrap();
    tx.batch_execute(&format!("SET LOCAL search_path = {schema}, pg_catalog"))
        .unwrap();
    let e = tx
        .execute(
            &format!("SELECT public.{FENCE_FN}($1, $2)"),
            &[&name, &token],
        )
        .unwrap_err();
    assert_eq!(sqlstate(&e), lockbox::FENCE_SQLSTATE, "{e}");
    drop(tx);
    // The guard's own check, on a live lock, in the same hostile session: a
    // lease of another name with the same token does not pass for it.
    let (long, _) = common::client(Duration::from_secs(60));
    let live = long
        .try_lock(&unique("fence-hostile-live"))
        .unwrap()
        .unwrap();
    let mut tx = db.transaction().unwrap();
    tx.batch_execute(&format!("SET LOCAL search_path = {schema}, pg_catalog"))
        .unwrap();
    live.fence(&mut tx).unwrap();
    drop(tx);
    admin()
        .execute(
            "UPDATE lockbox_leases SET released_at = clock_timestamp() WHERE name = $1",
            &[&live.name()],
        )
        .unwrap();
    let mut tx = db.transaction().unwrap();
    tx.batch_execute(&format!("SET LOCAL search_path = {schema}, pg_catalog"))
        .unwrap();
    assert!(matches!(live.fence(&mut tx), Err(Error::LockLost { .. })));
    drop(tx);
    drop(live);
    admin()
        .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
        .unwrap();
}

#[test]
fn a_rollback_to_a_savepoint_before_the_check_undoes_it() {
    // As documented: the check's row lock belongs to the subtransaction it
    // ran in.
    let client = LockClient::builder(database_url()).build().unwrap();
    let other = LockClient::builder(database_url()).build().unwrap();
    let name = unique("fence-savepoint");
    let lock = client.try_lock(&name).unwrap().unwrap();
    let mut db = connect();
    let mut tx = db.transaction().unwrap();
    tx.batch_execute("SAVEPOINT before_check").unwrap();
    lock.fence(&mut tx).unwrap();
    tx.batch_execute("ROLLBACK TO SAVEPOINT before_check")
        .unwrap();
    lock.release().unwrap();
    // Not held back: the transaction no longer locks the row.
    let next = other.try_lock(&name).unwrap();
    assert!(next.is_some(), "the rolled-back check still held the name");
    drop(next);
    // Checked again after the rollback, it holds the next grant back.
    let lock = client.try_lock(&name).unwrap().unwrap();
    lock.fence(&mut tx).unwrap();
    lock.release().unwrap();
    assert!(other.try_lock(&name).unwrap().is_none());
    tx.commit().unwrap();
    other.try_lock(&name).unwrap().unwrap().release().unwrap();
}
