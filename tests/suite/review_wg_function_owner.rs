//! Hostile review of the wait-and-grant function: whose function is it?
//!
//! `WAIT_GRANT_CHECK` compares the body, the language, SECURITY INVOKER, the
//! settings, the result and EXECUTE, but never the owner. Whoever owns the
//! function may `CREATE OR REPLACE` it at any moment, and a session that
//! checked it when it was opened keeps calling it (the check runs once per
//! session; a replaced PL/pgSQL function is recompiled on its next call). So a
//! role that may only CREATE in the lease table's schema (no right on the table
//! at all: `public` on PostgreSQL 14 and older, or any shared schema) plants
//! lockbox's own body byte for byte before lockbox creates it (the table of an
//! earlier version, without the function; or after an operator dropped it),
//! lets the application check and adopt it, and then swaps in a body of its
//! choosing, which runs as the application's role (SECURITY INVOKER): here one
//! that grants at once. The README's "it belongs to the lease table's owner"
//! is not checked anywhere.

use crate::common;

use common::wg::*;
use common::*;

#[test]
fn a_function_planted_by_a_role_that_may_only_create_in_the_schema_is_never_used() {
    let mut f = WgFixture::new();
    // May create objects in the schema; no privilege on the lease table.
    let mallory = f.role(
        "wgr_mallory",
        "GRANT USAGE, CREATE ON SCHEMA {schema} TO {role};",
    );
    let body = f.body();
    // The table as an earlier lockbox left it (or an operator dropped the function).
    admin()
        .batch_execute(&format!("DROP FUNCTION {}", f.signature()))
        .unwrap();
    // The planted function: lockbox's body, byte for byte, owned by mallory.
    let mut m = f.connect_as(&mallory);
    m.batch_execute(&f.create_sql("CREATE", &body))
        .expect("a role with CREATE on the schema creates the function");

    let holder = f.app_client(&unique("wgr-own-h"), ttl());
    let w_app = unique("wgr-own-w");
    let waiter = f.app_client(&w_app, ttl());
    // A pooled session of the waiter, which checked the function when it opened.
    warm_pool(&waiter);
    // Its owner swaps the body (allowed to fail: a function it does not own).
    let swapped = m
        .batch_execute(&f.impostor_sql("CREATE OR REPLACE"))
        .is_ok();

    let name = unique("wgr-own");
    let held = holder.try_lock(&name).unwrap().expect("a free lock");
    let second = waiter.lock_timeout(&name, ms(2000));
    assert!(
        second.is_err(),
        "two holders: the waiter was granted token {} while the holder holds {} \
         (the function's owner {mallory} replaced its body: {swapped})",
        second.as_ref().map_or(0, |l| l.fencing_token()),
        held.fencing_token()
    );
    assert!(held.is_held());
    held.release().unwrap();
}

/// The same, with no planting by hand: a role that may read the lease table
/// (a dashboard listing leases) and create in its schema merely builds a
/// lockbox client, with the default `create_table(true)`, before any
/// application of the new version: lockbox creates the function, owned by
/// that role, which may then rewrite it.
#[test]
fn a_function_created_by_a_read_only_role_s_build_is_never_used() {
    let mut f = WgFixture::new();
    let reader = f.role(
        "wgr_reader",
        "GRANT USAGE, CREATE ON SCHEMA {schema} TO {role}; \
         GRANT SELECT ON ALL TABLES IN SCHEMA {schema} TO {role};",
    );
    // The table as an earlier lockbox left it: no function.
    admin()
        .batch_execute(&format!("DROP FUNCTION {}", f.signature()))
        .unwrap();
    // The reader's client: its build creates the function (whether or not it
    // then succeeds is beside the point).
    let _dashboard =
        lockbox::LockClient::builder(&url_with_app(&url_as_user(&reader), &unique("wgr-own-r")))
            .table(&f.table())
            .build();
    let owner = f.function_owner();

    let holder = f.app_client(&unique("wgr-own-h"), ttl());
    let w_app = unique("wgr-own-w");
    let waiter = f.app_client(&w_app, ttl());
    warm_pool(&waiter);
    let swapped = f
        .connect_as(&reader)
        .batch_execute(&f.impostor_sql("CREATE OR REPLACE"))
        .is_ok();

    let name = unique("wgr-own");
    let held = holder.try_lock(&name).unwrap().expect("a free lock");
    let second = waiter.lock_timeout(&name, ms(2000));
    assert!(
        second.is_err(),
        "two holders: the waiter was granted token {} while the holder holds {} \
         (function owned by {owner:?}, body replaced by the reader {reader}: {swapped})",
        second.as_ref().map_or(0, |l| l.fencing_token()),
        held.fencing_token()
    );
    assert!(held.is_held());
    held.release().unwrap();
}
