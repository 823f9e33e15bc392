//! Hostile review of the wait-and-grant function: the session's check is of an
//! object, the call is by name.
//!
//! Each session checks the function once, when it opens, then prepares
//! `SELECT … FROM "schema"."…_wait_grant_v3"(…)`. A prepared statement is
//! re-analysed from its text whenever a function it uses changes: after
//! `DROP FUNCTION`, the next call resolves the *name* again. The change
//! assumes that then fails with 42883 ("gone": wait without it). But if,
//! before that call, anyone who may create in the schema (no right on the
//! table needed) creates a function of that name and signature, the pooled
//! session calls that one, unchecked. Here it grants at once: two holders.

use crate::common;

use common::wg::*;
use common::*;

#[test]
fn a_function_recreated_by_another_role_after_a_drop_is_never_called() {
    let mut f = WgFixture::new();
    // May create objects in the schema; no privilege on the lease table.
    let mallory = f.role(
        "wgr_mallory",
        "GRANT USAGE, CREATE ON SCHEMA {schema} TO {role};",
    );
    let holder = f.app_client(&unique("wgr-rec-h"), ttl());
    let w_app = unique("wgr-rec-w");
    let waiter = f.app_client(&w_app, ttl());
    assert!(
        f.body().contains("pg_advisory_lock($1, $2)"),
        "build() created lockbox's function"
    );
    // A pooled session of the waiter, which checked lockbox's function and
    // prepared the call.
    warm_pool(&waiter);
    // An operator drops the function (the README: "dropped … waits grant with a
    // statement of their own"); another role creates one of that name.
    admin()
        .batch_execute(&format!("DROP FUNCTION {}", f.signature()))
        .unwrap();
    f.connect_as(&mallory)
        .batch_execute(&f.impostor_sql("CREATE"))
        .expect("a role with CREATE on the schema creates a function of that name");

    let name = unique("wgr-rec");
    let held = holder.try_lock(&name).unwrap().expect("a free lock");
    let second = waiter.lock_timeout(&name, ms(2000));
    assert!(
        second.is_err(),
        "two holders: the waiter was granted token {} while the holder holds {} \
         (by the function {mallory} created after the drop)",
        second.as_ref().map_or(0, |l| l.fencing_token()),
        held.fencing_token()
    );
    assert!(held.is_held());
    held.release().unwrap();
}
