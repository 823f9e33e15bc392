//! Hostile review of the wait-and-grant function: a session that has already
//! run the function (its grant's plan cached) and then sees DDL on the lease
//! table (which invalidates that plan) must still wait holding no lock on the
//! table: the plan is revalidated, and the table locked, only when the grant
//! runs, after the wait. DDL run while it waits does not queue behind it.

use crate::common;

use std::thread;

use common::wg::*;
use common::*;

#[test]
fn after_ddl_invalidated_its_cached_grant_a_waiter_still_holds_no_table_lock() {
    let f = WgFixture::new();
    let holder = f.app_client(&unique("wgr-ddl-h"), ttl());
    let w_app = unique("wgr-ddl-w");
    let waiter = f.app_client(&w_app, ttl());
    let name = unique("wgr-ddl");
    let handoff = |ddl_while_waiting: Option<&str>| {
        let held = holder.try_lock(&name).unwrap().expect("a free lock");
        thread::scope(|s| {
            let w = s.spawn(|| waiter.lock(&name).unwrap());
            let query = waiting_query(&w_app);
            assert!(query.contains("_wait_grant_v3"), "{query}");
            let locked: bool = admin()
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM pg_locks l JOIN pg_stat_activity a \
                     ON a.pid = l.pid WHERE a.application_name = $1 \
                     AND l.locktype = 'relation' AND l.relation = to_regclass($2))",
                    &[&w_app, &f.table()],
                )
                .unwrap()
                .get(0);
            assert!(!locked, "the waiter holds a lock on the lease table");
            if let Some(ddl) = ddl_while_waiting {
                // Bounded, so that queueing behind the waiter fails rather than hangs.
                admin()
                    .batch_execute(&format!("SET lock_timeout = '5s'; {ddl}"))
                    .expect("DDL does not queue behind a waiter");
            }
            held.release().unwrap();
            w.join().unwrap().release().unwrap();
        });
    };
    // The waiter's session runs the function once: its grant's plan is cached.
    handoff(None);
    // DDL that invalidates it.
    admin()
        .batch_execute(&format!(
            "ALTER TABLE {t} ADD COLUMN note text; CREATE INDEX ON {t} (owner);",
            t = f.table()
        ))
        .unwrap();
    handoff(Some(&format!(
        "ALTER TABLE {t} ADD COLUMN note2 text",
        t = f.table()
    )));
    handoff(None);
}
