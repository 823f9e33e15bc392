//! A throwaway PostgreSQL login role whose defaults are hostile (isolation,
//! timeouts, DateStyle, search_path shadowing built-ins, …), for the tests
//! that show such settings change nothing.

use std::time::Duration;

use lockbox::LockClient;

use super::*;

/// A throwaway login role with hostile defaults, owning a schema for its lease
/// table. Dropped (with everything it owns) at the end.
pub struct HostileRole {
    pub role: String,
    pub schema: String,
    pub evil: String,
}

impl HostileRole {
    pub fn create() -> HostileRole {
        let role = unique("hostile").replace('-', "_");
        let schema = format!("{role}_s");
        let evil = format!("{role}_evil");
        let mut db = admin();
        db.batch_execute(&format!(
            "CREATE ROLE {role} LOGIN; \
             GRANT pg_signal_backend, pg_read_all_stats TO {role}; \
             CREATE SCHEMA {schema} AUTHORIZATION {role}; \
             CREATE SCHEMA {evil} AUTHORIZATION {role}; \
             /* Shadow the built-ins for anyone whose search_path puts them \
                first: every lease would look expired long ago. */ \
             CREATE FUNCTION {evil}.clock_timestamp() RETURNS timestamptz \
                 LANGUAGE sql AS $$ SELECT '2000-01-01 00:00:00+00'::timestamptz $$; \
             CREATE FUNCTION {evil}.now() RETURNS timestamptz \
                 LANGUAGE sql AS $$ SELECT '2000-01-01 00:00:00+00'::timestamptz $$; \
             ALTER FUNCTION {evil}.clock_timestamp() OWNER TO {role}; \
             ALTER FUNCTION {evil}.now() OWNER TO {role}; \
             ALTER ROLE {role} SET search_path = {evil}, pg_catalog, public; \
             ALTER ROLE {role} SET default_transaction_isolation = 'serializable'; \
             ALTER ROLE {role} SET default_transaction_deferrable = on; \
             ALTER ROLE {role} SET synchronous_commit = off; \
             ALTER ROLE {role} SET statement_timeout = '150ms'; \
             ALTER ROLE {role} SET lock_timeout = '20ms'; \
             ALTER ROLE {role} SET idle_in_transaction_session_timeout = '100ms'; \
             ALTER ROLE {role} SET idle_session_timeout = '300ms'; \
             ALTER ROLE {role} SET exit_on_error = on; \
             ALTER ROLE {role} SET DateStyle = 'German, DMY'; \
             ALTER ROLE {role} SET IntervalStyle = 'iso_8601'; \
             ALTER ROLE {role} SET TimeZone = 'Pacific/Chatham'; \
             ALTER ROLE {role} SET transform_null_equals = on; \
             ALTER ROLE {role} SET standard_conforming_strings = off; \
             ALTER ROLE {role} SET row_security = on; \
             /* PL/pgSQL's own checks, for the wait-and-grant function. */ \
             ALTER ROLE {role} SET plpgsql.extra_errors = 'all'; \
             ALTER ROLE {role} SET plpgsql.variable_conflict = 'use_column'; \
             ALTER ROLE {role} SET plpgsql.check_asserts = off;"
        ))
        .expect("create the hostile role");
        HostileRole { role, schema, evil }
    }

    /// A connection string as this role, with hostile `options` on top.
    pub fn url(&self, app: &str) -> String {
        let ServerParts { host, port, db, .. } = server_parts();
        format!(
            "host={host} port={port} dbname={db} user={} application_name={app} \
             options='-c default_transaction_isolation=serializable -c extra_float_digits=-15'",
            self.role
        )
    }

    pub fn table(&self) -> String {
        format!("{}.leases", self.schema)
    }

    pub fn client(&self, ttl: Duration) -> (LockClient, String) {
        let app = unique("hostile-app");
        let client = LockClient::builder(&self.url(&app))
            .table(&self.table())
            .ttl(ttl)
            .build()
            .expect("build a client under hostile defaults");
        (client, app)
    }

    pub fn holder_pid(&self, name: &str) -> i32 {
        admin()
            .query_one(
                &format!("SELECT holder_pid FROM {} WHERE name = $1", self.table()),
                &[&name],
            )
            .unwrap()
            .get(0)
    }
}

impl Drop for HostileRole {
    fn drop(&mut self) {
        let mut db = admin();
        let _ = db.execute(
            "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity WHERE usename = $1",
            &[&self.role],
        );
        let _ = db.batch_execute(&format!(
            "DROP SCHEMA IF EXISTS {} CASCADE; DROP SCHEMA IF EXISTS {} CASCADE; \
             DROP ROLE IF EXISTS {}",
            self.schema, self.evil, self.role
        ));
    }
}
