//! One stuck renewal must not silence any other lock: renewals run on workers of
//! their own, and every loss is signalled at its deadline by a scheduler that does
//! no I/O, however long the lock's own statement is blocked.

use crate::common;

use std::time::Instant;

use common::*;
use crossbeam_channel::{after, select};
use lockbox::{LockClient, LostReason};

/// Two locks; the lease row of one is held `FOR UPDATE` by another transaction
/// for three TTLs. The other keeps renewing and never fires `lost()`; the blocked
/// one's `lost()` fires at its deadline, while its statement is still blocked.
#[test]
fn a_blocked_renewal_holds_up_only_its_own_lock() {
    let ttl = ms(600);
    let (client, _) = client(ttl);
    let (blocked_name, free_name) = (unique("stuck"), unique("free"));
    let blocked = client.try_lock(&blocked_name).unwrap().unwrap();
    let free = client.try_lock(&free_name).unwrap().unwrap();
    let row = RowHold::lease(&blocked_name);
    let start = Instant::now();
    let renewed_before = client.metrics().renewals_ok;

    let mut blocked_lost_at = None;
    let end = after(ttl * 3);
    loop {
        select! {
            recv(blocked.lost()) -> reason => {
                if blocked_lost_at.is_none() {
                    assert_eq!(reason, Ok(LostReason::Expired));
                    blocked_lost_at = Some(start.elapsed());
                }
            }
            recv(free.lost()) -> reason => panic!("the free lock was lost: {reason:?}"),
            recv(end) -> _ => break,
        }
    }
    row.release();
    let lost_at = blocked_lost_at.expect("the blocked lock's lost() never fired");
    // Its deadline is under one TTL after its last renewal, itself before the row
    // was locked; the row stayed locked for three. (Generous: this proves the
    // signal did not wait for the statement, not how fast it is.)
    assert!(
        lost_at < ttl * 2,
        "lost() fired {lost_at:?} after the block began"
    );
    assert!(free.is_held());
    assert!(
        client.metrics().renewals_ok >= renewed_before + 6,
        "the free lock was not renewed on schedule: {} renewals",
        client.metrics().renewals_ok - renewed_before
    );
    free.release().unwrap();
    assert!(blocked.release().unwrap_err().is_lock_lost());
}

/// A grant or renewal whose statement answers late is counted and logged, so a
/// loss it causes is no mystery. The grant: its answer held up for half the
/// TTL by a paused network path (a stalled WAL flush looks the same from the
/// client; a locked lease row no longer can: an acquire waits for one at most
/// a quarter of its TTL per statement). The renewal: the lease row locked by
/// another transaction for a third of the TTL, on a session of its own, whose
/// renewal waits for the row (a shared session's skips it and is retried:
/// `pg_renew_bound.rs`).
#[test]
fn slow_grants_and_renewals_are_reported() {
    let ttl = ms(1000);
    let proxy = common::proxy::Proxy::to_test_server();
    let client = LockClient::builder(&proxy.app_url(&unique("app")))
        .ttl(ttl)
        .pool_size(1)
        .locks_per_session(1)
        .build()
        .unwrap();
    let name = unique("slow");
    // The row exists (released) so that the next grant updates it; and the
    // pooled connection was just used, so the next checkout sends nothing
    // before the grant.
    client.try_lock(&name).unwrap().unwrap().release().unwrap();

    proxy.pause();
    let slow_grant = std::thread::scope(|s| {
        let acquire = s.spawn(|| client.lock_timeout(&name, ttl * 5));
        std::thread::sleep(ttl / 2);
        proxy.resume();
        acquire.join().unwrap()
    });
    let lock = slow_grant.expect("granted once the row was free");
    assert_eq!(client.metrics().slow_grants, 1);
    assert_eq!(client.metrics().slow_renewals, 0);

    // The next renewal (a third of the TTL in) waits on the row for half the TTL.
    let row = RowHold::lease(&name);
    let pid = holder_pid(&name);
    assert!(eventually(ttl, || blocked_on_lock(pid)));
    std::thread::sleep(ttl / 3);
    row.release();
    assert!(eventually(ttl, || client.metrics().slow_renewals == 1));
    assert!(lock.is_held(), "a slow renewal is not a lost lock");
    lock.release().unwrap();
}

/// A renewal stuck behind an operator's DDL (waiting for the lease table's
/// lock, which a statement takes as it starts, before anything in it could set
/// a timeout) ends once the lock's deadline has passed, so its worker and
/// connection are freed: on a shared session (this test) its transaction set
/// the lock timeout first; a session of its own is sent a cancel request
/// (pg_tls.rs). The session is then closed, never handed back to the pool.
#[test]
fn a_renewal_stuck_behind_ddl_is_cancelled_at_the_deadline() {
    let ttl = ms(600);
    let schema = unique("ddl").replace('-', "_");
    let table = format!("{schema}.leases");
    let mut db = admin();
    db.batch_execute(&format!("CREATE SCHEMA {schema}"))
        .unwrap();
    let app = unique("ddl");
    let client = builder_for(&app).table(&table).ttl(ttl).build().unwrap();
    let name = unique("ddl");
    let lock = client.try_lock(&name).unwrap().unwrap();
    let holder: i32 = db
        .query_one(
            &format!("SELECT holder_pid FROM {table} WHERE name = $1"),
            &[&name],
        )
        .unwrap()
        .get(0);

    let mut ddl = admin();
    ddl.batch_execute(&format!(
        "BEGIN; LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE"
    ))
    .unwrap();
    assert!(
        eventually(ttl, || blocked_on_lock(holder)),
        "renewal not blocked"
    );
    assert_eq!(lock.lost().recv_timeout(ttl * 2), Ok(LostReason::Expired));
    // Cancelled while the table lock is still held.
    let cancelled = eventually(ttl * 3, || !blocked_on_lock(holder));
    ddl.batch_execute("ROLLBACK").unwrap();
    let err = lock.release().unwrap_err();
    assert!(cancelled, "the stuck renewal was never cancelled");
    assert!(err.is_lock_lost(), "{err}");
    // Closed, not pooled: the holder's session is gone.
    assert!(eventually(ttl * 3, || {
        admin()
            .query_one(
                "SELECT count(*) = 0 FROM pg_stat_activity WHERE pid = $1",
                &[&holder],
            )
            .unwrap()
            .get(0)
    }));
    assert_eq!(advisory_locks_of(&app), 0);
    drop(client);
    db.batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
        .unwrap();
}
