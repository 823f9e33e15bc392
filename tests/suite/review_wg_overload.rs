//! Hostile review of the wait-and-grant function: an overload makes the call
//! ambiguous.
//!
//! The call names the function by schema and name, with every argument
//! exactly typed. PostgreSQL still counts, as a candidate of the same
//! signature, any function of that name in that schema with *more* arguments
//! that have defaults; two such candidates in one schema are "not unique"
//! (42725). `WAIT_GRANT_CHECK` looks the function up by its exact signature
//! (`to_regprocedure`), so it passes, and then preparing the call fails: every
//! new session fails to open, so `build()` fails and acquires fail once the
//! pool needs a new connection. Anyone who may create in the lease table's
//! schema (no right on the table needed) can do this; the function is only a
//! round-trip saving, and was meant to be skipped when it cannot be used.

use crate::common;

use common::wg::*;
use common::*;

#[test]
fn an_overload_with_defaults_in_the_schema_does_not_stop_clients() {
    let mut f = WgFixture::new();
    // May create objects in the schema; no privilege on the lease table.
    let mallory = f.role(
        "wgr_mallory",
        "GRANT USAGE, CREATE ON SCHEMA {schema} TO {role};",
    );
    f.connect_as(&mallory)
        .batch_execute(&format!(
            "CREATE FUNCTION {}({WG_ARGS}, extra integer DEFAULT 0) RETURNS {WG_RESULT} \
             LANGUAGE sql AS $o$ SELECT false, NULL::bigint, 0::bigint $o$",
            f.function()
        ))
        .expect("a role with CREATE on the schema creates an overload");
    let built =
        lockbox::LockClient::builder(&url_with_app(&url_as_user(&f.app_role), &unique("wgr-ovl")))
            .table(&f.table())
            .ttl(ttl())
            .build();
    let client = match built {
        Ok(c) => c,
        Err(e) => panic!("a client could not be built because of the overload: {e}"),
    };
    let name = unique("wgr-ovl");
    client
        .try_lock(&name)
        .expect("acquires work")
        .expect("a free lock")
        .release()
        .unwrap();
}
