//! Hostile operator (history): DDL on `<table>_history` (a plain `CREATE
//! INDEX` on a large audit table, `VACUUM FULL`, an `ALTER`) holds a lock that
//! conflicts with the `ROW EXCLUSIVE` every grant, release and zombie probe
//! takes on it. That lock is taken as the statement is parsed (or its cached
//! plan revalidated), before the `lock_timeout` the statement sets, and
//! sessions pin `lock_timeout = 0`: the statement waits for as long as the
//! DDL holds its lock. With the default multiplexing (many locks on one
//! session) a `try_lock` stuck there holds the shared session, so the
//! renewals of every lock on that session stop, and they are lost. Renewals
//! never name the history table, so without the history (or without
//! multiplexing) the same DDL would cost held locks nothing.
//!
//! OPEN: reproduced (held lock lost after ~1 s while an operator holds
//! `SHARE` on the history table), not fixed: a bound needs the history
//! insert to take its table lock after the statement's `lock_timeout` is set
//! (e.g. inside a checked function, as the wait-and-grant function does for
//! its grant), or a non-zero session `lock_timeout`; neither is a contained
//! change. Ignored so the suite stays green; run with `--ignored`.

use crate::common;

use std::time::Duration;

use common::*;

#[test]
#[ignore = "open hole: DDL on the history table stops a shared session's renewals (see the header)"]
fn ddl_on_the_history_holds_grants_back_but_not_renewals() {
    let table = unique("hist_ddl").replace('-', "_");
    let app = unique("hist-ddl");
    let client = builder_for(&app)
        .table(&table)
        .history(true)
        .ttl(ms(1000))
        .build()
        .unwrap();
    let held_name = unique("hist-ddl-held");
    let held = client.try_lock(&held_name).unwrap().unwrap();
    let renewed_at = |db: &mut postgres::Client| -> std::time::SystemTime {
        db.query_one(
            &format!("SELECT renewed_at FROM {table} WHERE name = $1"),
            &[&held_name],
        )
        .unwrap()
        .get(0)
    };
    let mut operator = admin();
    operator
        .batch_execute(&format!("BEGIN; LOCK TABLE {table}_history IN SHARE MODE"))
        .unwrap();
    let history_oid: u32 = admin()
        .query_one(&format!("SELECT '{table}_history'::regclass::oid"), &[])
        .unwrap()
        .get(0);
    let other = unique("hist-ddl-other");
    let outcome = std::thread::scope(|s| {
        let waiter = s.spawn(|| client.try_lock(&other).map(|l| l.is_some()));
        let waits_for_history = eventually(Duration::from_secs(10), || {
            admin()
                .query_one(
                    "SELECT count(*) > 0 FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
                     WHERE a.application_name = $1 AND NOT l.granted AND l.relation = $2",
                    &[&app, &history_oid],
                )
                .unwrap()
                .get(0)
        });
        // Three renewals of the held lock while the DDL's lock is held.
        let mut db = admin();
        let mut last = renewed_at(&mut db);
        let mut renewals = 0;
        let kept = eventually(Duration::from_secs(10), || {
            let now = renewed_at(&mut db);
            if now > last {
                renewals += 1;
                last = now;
            }
            renewals >= 3
        });
        let still_held = held.ensure_held().is_ok();
        operator.batch_execute("ROLLBACK").unwrap();
        let granted = waiter.join().unwrap();
        (waits_for_history, kept, still_held, granted)
    });
    let released = held.release();
    drop(client);
    let _ = admin().batch_execute(&format!(
        "DROP TABLE IF EXISTS {table}, {table}_history CASCADE; \
         DROP FUNCTION IF EXISTS {table}_wait_grant_hist_v5(integer, integer, text, text, \
             bigint, text, integer, timestamp with time zone, bigint, bigint, bigint); \
         DROP FUNCTION IF EXISTS {table}_fence(text, bigint);"
    ));
    let (waits_for_history, kept, still_held, granted) = outcome;
    assert!(
        waits_for_history,
        "the grant did not wait for the history's lock"
    );
    assert!(
        kept && still_held && released.is_ok(),
        "renewals stopped while DDL held the history table: the held lock was lost \
         ({released:?})"
    );
    assert!(matches!(granted, Ok(true)), "{granted:?}");
}
