//! Hostile review of the wait-and-grant function: its body is spliced into
//! `CREATE FUNCTION … AS $lockbox$<body>$lockbox$` and sent as a simple-query
//! batch, and the body names the lease table as `schema.table` from the
//! catalog. `table()` only accepts lower-case identifiers, but an unqualified
//! table (the default, `lockbox_leases`) is resolved, or created, through the
//! role's search_path, in a schema of any name. A schema name containing
//! `$lockbox$` ends the dollar quote early; with `check_function_bodies = off`
//! (a role or database setting SESSION_SETUP does not pin) the truncated
//! function is created without complaint and the rest of the name runs as SQL
//! statements of their own, as the building role, inside `build()`. Whoever
//! can set a role's or database's defaults and name a schema (a database
//! owner: `ALTER DATABASE … SET search_path/check_function_bodies`) runs SQL
//! as whatever role builds a lockbox client there.

use crate::common;

use common::*;

#[test]
fn a_schema_name_cannot_inject_sql_into_the_function_s_creation() {
    // Short: identifiers are cut at 63 bytes.
    let base = format!(
        "wq{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_micros()
            % 1_000_000
    );
    let injected = format!("{base}p");
    let schema = format!("{base}$lockbox$;CREATE TABLE {injected}();SELECT $lockbox$");
    assert!(schema.len() <= 63);
    let quoted = format!("\"{}\"", schema.replace('"', "\"\""));
    let role = format!("{base}_role");
    admin()
        .batch_execute(&format!(
            "CREATE SCHEMA {quoted}; CREATE ROLE {role} LOGIN; \
             GRANT USAGE, CREATE ON SCHEMA {quoted} TO {role}; \
             ALTER ROLE {role} SET search_path = {quoted}; \
             ALTER ROLE {role} SET check_function_bodies = off;"
        ))
        .unwrap();
    let built = lockbox::LockClient::builder(&url_with_app(&url_as_user(&role), &unique("wgr-dq")))
        .ttl(ms(30_000))
        .build();
    let found: Option<String> = admin()
        .query_one(
            "SELECT (SELECT n.nspname || '.' || c.relname FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relname = $1)",
            &[&injected],
        )
        .unwrap()
        .get(0);
    drop(built);
    let mut db = admin();
    let _ = db.execute(
        "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity WHERE usename = $1",
        &[&role],
    );
    let _ = db.batch_execute(&format!(
        "DROP SCHEMA {quoted} CASCADE; DROP OWNED BY {role}; DROP ROLE IF EXISTS {role}"
    ));
    assert!(
        found.is_none(),
        "build() ran SQL spliced from the schema's name: it created {found:?}"
    );
}
