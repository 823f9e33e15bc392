//! The call's check of the wait-and-grant function reads that function's row
//! by OID and checks that its schema (by the schema's name now) and its name
//! still name it; it parsed the signature on every call before. A function
//! (or its schema) renamed by an operator, and an impostor created under the
//! old name by another role, must never be called once the call is planned
//! again.

use crate::common;

use common::wg::*;
use common::*;

/// Renames with `rename` (SQL as the admin; `{schema}` replaced) what makes
/// the old name free, has `mallory` create the impostor there with `create`
/// (its schema too, when `rename` moved it), plans the waiters' call again,
/// and checks that a waiter is not granted a name that is held.
fn impostor_under_the_old_name_is_never_called(rename: &str, new_schema: bool, renamed_fn: &str) {
    let mut f = WgFixture::new();
    let mallory = f.role(
        "wgs_mallory",
        "GRANT USAGE, CREATE ON SCHEMA {schema} TO {role};",
    );
    admin()
        .batch_execute(&format!(
            "DO $$ BEGIN EXECUTE format('GRANT CREATE ON DATABASE %I TO {mallory}', \
             current_database()); END $$"
        ))
        .unwrap();
    let holder = f.app_client(&unique("wgs-h"), ttl());
    let waiter = f.app_client(&unique("wgs-w"), ttl());
    warm_pool(&waiter);
    let name = unique("wgs");
    let held = holder.try_lock(&name).unwrap().expect("a free lock");
    // The waiter finds the name held: its next acquire waits (and calls the
    // function) with its first statement, before any statement of the table.
    assert!(waiter.lock_timeout(&name, ms(300)).is_err());

    admin()
        .batch_execute(&rename.replace("{schema}", &f.schema))
        .unwrap();
    // Back as it was however this ends, so that the fixture drops both
    // schemas.
    let _restore = new_schema.then(|| Restore(f.schema.clone()));
    let mut create = f.impostor_sql("CREATE");
    if new_schema {
        create = format!(
            "CREATE SCHEMA {s}; GRANT USAGE ON SCHEMA {s} TO PUBLIC; {create}",
            s = f.schema
        );
    }
    f.connect_as(&mallory)
        .batch_execute(&format!(
            "{create}; GRANT EXECUTE ON FUNCTION {} TO PUBLIC",
            f.signature()
        ))
        .expect("mallory creates the impostor under the old name");
    // Lockbox's function changes (its cost): the prepared call is planned
    // again, and its name now resolves to the impostor.
    admin()
        .batch_execute(&format!(
            "ALTER FUNCTION {}({WG_ARGS}) COST 101",
            renamed_fn.replace("{schema}", &f.schema)
        ))
        .unwrap();

    let second = waiter.lock_timeout(&name, ms(2000));
    assert!(
        !matches!(&second, Ok(l) if l.fencing_token() == 999_999),
        "the impostor granted the lock while {} holds it",
        held.fencing_token()
    );
    assert!(second.is_err(), "two holders: {second:?}");
    drop(held);
}

/// Drops mallory's schema and gives the moved one its name back.
struct Restore(String);

impl Drop for Restore {
    fn drop(&mut self) {
        let _ = admin().batch_execute(&format!(
            "DROP SCHEMA IF EXISTS {s} CASCADE; ALTER SCHEMA {s}_moved RENAME TO {s}",
            s = self.0
        ));
    }
}

#[test]
fn a_function_in_a_schema_created_under_the_old_name_is_never_called() {
    impostor_under_the_old_name_is_never_called(
        "ALTER SCHEMA {schema} RENAME TO {schema}_moved",
        true,
        "{schema}_moved.leases_wait_grant_v3",
    );
}

#[test]
fn a_function_created_under_a_renamed_ones_name_is_never_called() {
    impostor_under_the_old_name_is_never_called(
        &format!("ALTER FUNCTION {{schema}}.leases_wait_grant_v3({WG_ARGS}) RENAME TO renamed_wg"),
        false,
        "{schema}.renamed_wg",
    );
}
