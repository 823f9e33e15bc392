//! Hostile review (2) of the wait-and-grant function: a build by the table's
//! owner can be blocked without end by any role that may create in the lease
//! table's schema.
//!
//! When the function is missing (a table from before the function existed, or
//! one whose function was dropped), a build with `create_table(true)` by the
//! table's owner runs `CREATE OR REPLACE FUNCTION` in its setup transaction,
//! with the session's `lock_timeout` and `statement_timeout` pinned to 0. A
//! role with nothing but CREATE on the schema that has created a function of
//! the same signature in a transaction it keeps open makes that statement
//! wait for its transaction (the unique index on `pg_proc`), for as long as it
//! likes: `build()` never returns, and it holds lockbox's DDL advisory lock
//! meanwhile, so every other creating build of any lease table queues behind
//! it. A committed impostor is handled (the owner's replace fails, and waits
//! grant without the function); an uncommitted one is not. The function only
//! saves a round trip, so its creation should give up promptly (a bounded
//! `lock_timeout` in its savepoint) and fall back.

use crate::common;

use std::thread;
use std::time::Duration;

use common::wg::*;
use common::*;

#[test]
fn an_uncommitted_impostor_does_not_block_the_owners_build() {
    let mut f = WgFixture::new();
    // The table exists without its function (as after an upgrade).
    admin()
        .batch_execute(&format!("DROP FUNCTION {}", f.signature()))
        .unwrap();
    let mallory = f.role(
        "wgr2_mallory",
        "GRANT USAGE, CREATE ON SCHEMA {schema} TO {role};",
    );
    let mut m = f.connect_as(&mallory);
    let mallory_pid: i32 = m.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
    m.batch_execute(&format!(
        "BEGIN; CREATE FUNCTION {}({WG_ARGS}) RETURNS {WG_RESULT} LANGUAGE sql \
         AS $o$ SELECT false, NULL::bigint, 0::bigint $o$",
        f.function()
    ))
    .expect("a role with CREATE on the schema creates a function");

    let app = unique("wgr2-hang");
    let table = f.table();
    let build = {
        let app = app.clone();
        thread::spawn(move || builder_for(&app).table(&table).ttl(ttl()).build().map(drop))
    };
    // The build must finish while mallory's transaction is still open: it may
    // wait for it a bounded moment, never until it ends. (60 s only stops a
    // hang from stopping the test.)
    let finished = eventually(Duration::from_secs(60), || build.is_finished());
    let blocked: bool = admin()
        .query_one(
            "SELECT count(*) > 0 FROM pg_stat_activity \
             WHERE application_name = $1 AND $2 = ANY (pg_blocking_pids(pid))",
            &[&app, &mallory_pid],
        )
        .unwrap()
        .get(0);
    // Let the build go on either way, then judge.
    m.batch_execute("ROLLBACK").unwrap();
    let result = build.join().unwrap();
    assert!(
        finished && !blocked,
        "the owner's build waited without end for another role's open transaction that \
         created a function of the wait-and-grant signature"
    );
    result.expect("the build succeeds, waits granting without the function");
}
