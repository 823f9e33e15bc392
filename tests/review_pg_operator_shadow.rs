//! Hostile review: pinning `pg_catalog` first in the `search_path` does not stop
//! shadowing. PostgreSQL resolves operators (and functions) by *best match*
//! across every schema on the path: an operator with the exact argument types
//! in a later schema beats a `pg_catalog` one that needs an implicit cast.
//! lockbox's statements compute the lease's end as
//! `clock_timestamp() + $5::int8 * interval '1 millisecond'`, and
//! `pg_catalog` has no `bigint * interval` (only `float8 * interval`), so a
//! `*(bigint, interval)` operator in any schema of the role's search path (an
//! extension's, or one writable by others) decides how long every lease lasts.

mod common;

use std::time::Duration;

use common::*;
use lockbox::LockClient;

/// A throwaway schema for the lease table and another, on the role's search
/// path (via the connection's `options`), holding an exact-match `*` operator.
struct Shadow {
    schema: String,
    evil: String,
}

impl Shadow {
    fn create(result: &str) -> Shadow {
        let base = unique("revpg_op").replace('-', "_");
        let schema = format!("{base}_s");
        let evil = format!("{base}_evil");
        admin()
            .batch_execute(&format!(
                "CREATE SCHEMA {schema}; CREATE SCHEMA {evil}; \
                 CREATE FUNCTION {evil}.mul(bigint, interval) RETURNS interval \
                     LANGUAGE sql IMMUTABLE AS $$ SELECT {result} $$; \
                 CREATE OPERATOR {evil}.* (LEFTARG = bigint, RIGHTARG = interval, \
                     FUNCTION = {evil}.mul);"
            ))
            .expect("create the shadowing schema");
        Shadow { schema, evil }
    }

    fn client(&self, ttl: Duration) -> LockClient {
        let ServerParts {
            host,
            port,
            user,
            db,
        } = server_parts();
        let url = format!(
            "host={host} port={port} dbname={db} user={user} application_name={} \
             options='-c search_path={},public'",
            unique("revpg-op"),
            self.evil
        );
        LockClient::builder(&url)
            .table(&format!("{}.leases", self.schema))
            .ttl(ttl)
            .build()
            .expect("build a client")
    }
}

impl Drop for Shadow {
    fn drop(&mut self) {
        let _ = admin().batch_execute(&format!(
            "DROP SCHEMA IF EXISTS {} CASCADE; DROP SCHEMA IF EXISTS {} CASCADE",
            self.schema, self.evil
        ));
    }
}

/// With `bigint * interval` shadowed to return a negative interval, every lease
/// is written already expired: a second client is granted the name while the
/// first still holds it (its guard is held, its local deadline far away).
#[test]
fn a_shadowing_bigint_times_interval_operator_cannot_shorten_leases() {
    let shadow = Shadow::create("interval '-1 hour'");
    let a = shadow.client(Duration::from_secs(10));
    let b = shadow.client(Duration::from_secs(10));
    let name = unique("shadowed");
    let first = a.try_lock(&name).unwrap().expect("a free lock");
    let second = b.try_lock(&name).unwrap();
    assert!(
        second.is_none(),
        "two holders: the second client was granted a name the first still holds \
         (token {} while the first holds {})",
        second.as_ref().map_or(0, |l| l.fencing_token()),
        first.fencing_token()
    );
    let expires_in_ms: f64 = admin()
        .query_one(
            &format!(
                "SELECT extract(epoch FROM expires_at - clock_timestamp())::float8 * 1000 \
                 FROM {}.leases WHERE name = $1",
                shadow.schema
            ),
            &[&name],
        )
        .unwrap()
        .get(0);
    assert!(
        expires_in_ms > 5_000.0,
        "a 10 s lease was written to end in {expires_in_ms} ms"
    );
    first.release().unwrap();
}
