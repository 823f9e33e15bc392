//! Shared leases under hostile but legal role defaults and connection
//! options (serializable by default, short statement, lock and idle
//! timeouts, a shadowed `clock_timestamp()`, odd date styles, …): readers,
//! writers and semaphore waits behave as under sane settings.

mod common;

use std::thread;
use std::time::Duration;

use common::*;
use lockbox::LockClient;

/// A throwaway login role with hostile defaults, owning a schema for its lease
/// table. Dropped (with everything it owns) at the end.
struct HostileRole {
    role: String,
    schema: String,
    evil: String,
}

impl HostileRole {
    fn create() -> HostileRole {
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
    fn url(&self, app: &str) -> String {
        let ServerParts { host, port, db, .. } = server_parts();
        format!(
            "host={host} port={port} dbname={db} user={} application_name={app} \
             options='-c default_transaction_isolation=serializable -c extra_float_digits=-15'",
            self.role
        )
    }

    fn table(&self) -> String {
        format!("{}.leases", self.schema)
    }

    fn client(&self, ttl: Duration) -> (LockClient, String) {
        let app = unique("hostile-app");
        let client = LockClient::builder(&self.url(&app))
            .table(&self.table())
            .ttl(ttl)
            .build()
            .expect("build a client under hostile defaults");
        (client, app)
    }

    #[allow(dead_code)]
    fn holder_pid(&self, name: &str) -> i32 {
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

#[test]
fn readers_writers_and_permits_work_under_hostile_role_defaults() {
    let role = HostileRole::create();
    let (a, _) = role.client(ms(2000));
    let (b, b_app) = role.client(ms(2000));

    // Readers share, a writer waits in the server and gets the lock at the
    // last reader's release, past the role's statement and idle timeouts.
    let name = unique("hostile-rw");
    let r1 = a
        .rwlock(&name)
        .unwrap()
        .try_read()
        .unwrap()
        .expect("reader");
    let r2 = b
        .rwlock(&name)
        .unwrap()
        .try_read()
        .unwrap()
        .expect("reader");
    let writer = {
        let b = b.clone();
        let name = name.clone();
        thread::spawn(move || {
            b.rwlock(&name)
                .unwrap()
                .write_timeout(Duration::from_secs(20))
        })
    };
    assert!(eventually(Duration::from_secs(5), || is_waiting(&b_app)));
    thread::sleep(ms(400));
    assert!(a.rwlock(&name).unwrap().try_read().unwrap().is_none());
    let top = r2.fencing_token();
    r1.release().unwrap();
    r2.release().unwrap();
    let w = writer.join().unwrap().expect("the writer");
    assert!(w.fencing_token() > top);
    w.release().unwrap();

    // A full semaphore's waiter listens past the role's idle_session_timeout
    // and wakes on the release.
    let name = unique("hostile-sem");
    let p = a
        .semaphore(&name, 1)
        .unwrap()
        .try_acquire()
        .unwrap()
        .unwrap();
    let waiter = {
        let b = b.clone();
        let name = name.clone();
        thread::spawn(move || {
            b.semaphore(&name, 1)
                .unwrap()
                .acquire_timeout(Duration::from_secs(20))
        })
    };
    assert!(eventually(Duration::from_secs(5), || b
        .metrics()
        .acquires_waiting
        >= 1));
    thread::sleep(ms(500));
    let held = p.fencing_token();
    p.release().unwrap();
    let q = waiter.join().unwrap().expect("the waiter");
    assert!(q.fencing_token() > held);
    let listed = b.leases_of(&name).unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert!(matches!(
        listed[0].status,
        lockbox::LeaseStatus::Held { .. }
    ));
    q.release().unwrap();
}
