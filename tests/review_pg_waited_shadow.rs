//! Attack on "the waiting acquire grants in the wait statement and reports the
//! wait the server measured": the grant's local start is `sent_at + waited_ms`,
//! and `waited_ms` is computed as
//! `floor(extract(epoch FROM clock_timestamp() - w.t0) * 1000)::int8`.
//! `extract(epoch FROM interval)` is `numeric`, `1000` is an `integer` literal,
//! and `pg_catalog` has no `*(numeric, integer)`: an exact-match operator in any
//! schema of the role's search path wins over `pg_catalog`'s `numeric *
//! numeric` (the same class as review_pg_operator_shadow, which was fixed for
//! `bigint * interval`). It decides how long the holder believes its lease
//! lasts: the local deadline then ends after the lease does on the server, and
//! two clients hold the lock at once. Guarantees (c) and (g).

mod common;

use std::thread;
use std::time::{Duration, Instant};

use common::*;
use lockbox::LockClient;

/// A schema for the lease table and another, on the connection's search path,
/// with an exact-match `*(numeric, integer)` that adds 20 s to what it returns.
struct Shadow {
    schema: String,
    evil: String,
}

impl Shadow {
    fn create() -> Shadow {
        let base = unique("atk_wait").replace('-', "_");
        let schema = format!("{base}_s");
        let evil = format!("{base}_evil");
        admin()
            .batch_execute(&format!(
                "CREATE SCHEMA {schema}; CREATE SCHEMA {evil}; \
                 CREATE FUNCTION {evil}.mul(numeric, integer) RETURNS numeric \
                     LANGUAGE sql IMMUTABLE AS \
                     $$ SELECT pg_catalog.numeric_add(pg_catalog.numeric_mul($1, $2::numeric), 20000) $$; \
                 CREATE OPERATOR {evil}.* (LEFTARG = numeric, RIGHTARG = integer, \
                     FUNCTION = {evil}.mul);"
            ))
            .expect("create the shadowing schema");
        Shadow { schema, evil }
    }

    fn client(&self, ttl: Duration) -> (LockClient, String) {
        let ServerParts {
            host,
            port,
            user,
            db,
        } = server_parts();
        let app = unique("atk-wait");
        let url = format!(
            "host={host} port={port} dbname={db} user={user} application_name={app} \
             options='-c search_path={},public'",
            self.evil
        );
        let client = LockClient::builder(&url)
            .table(&format!("{}.leases", self.schema))
            .ttl(ttl)
            .build()
            .expect("build a client");
        (client, app)
    }

    /// What the name's lease has left on the server (ms; negative: expired).
    fn server_left_ms(&self, name: &str) -> f64 {
        admin()
            .query_one(
                &format!(
                    "SELECT extract(epoch FROM expires_at - clock_timestamp())::float8 * 1000 \
                     FROM {}.leases WHERE name = $1",
                    self.schema
                ),
                &[&name],
            )
            .unwrap()
            .get(0)
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

/// A hands the lock off to a waiter B (TTL 2 s). Two seconds and a half later
/// B's lease has ended on the server; B must no longer consider itself the
/// holder, and a third client C taking the name must not find B still holding.
#[test]
fn a_shadowed_numeric_times_integer_cannot_stretch_a_waiters_deadline() {
    let shadow = Shadow::create();
    let ttl = Duration::from_secs(2);
    let (a, _) = shadow.client(ttl);
    let (b, b_app) = shadow.client(ttl);
    let (c, _) = shadow.client(ttl);
    let name = unique("shadow-wait");
    let first = a.try_lock(&name).unwrap().expect("a free lock");
    let waiter = {
        let name = name.clone();
        thread::spawn(move || {
            let lock = b.lock_timeout(&name, Duration::from_secs(10));
            (lock, b)
        })
    };
    assert!(eventually(Duration::from_secs(5), || is_waiting(&b_app)));
    thread::sleep(ms(300));
    first.release().unwrap();
    let (second, _b) = waiter.join().unwrap();
    let second = second.expect("B is handed the lock");
    let granted = Instant::now();
    // Let B's lease run out on the server (B's first renewal is due a third of
    // a TTL after its grant as B reckons it).
    thread::sleep(ttl + ms(500));
    let left = shadow.server_left_ms(&name);
    let b_thinks_held = second.is_held();
    // C takes the name over (B's session holds the key with only an expired
    // lease: a zombie to the server).
    let third = c.lock_timeout(&name, Duration::from_secs(5));
    let both = third.as_ref().is_ok_and(|_| second.is_held());
    assert!(
        !(both || b_thinks_held && left < 0.0),
        "B's lease ended on the server {:.0} ms ago ({:?} after B's grant), yet B still \
         reports the lock held; C {} (token {:?}) while B still says held = {}",
        -left,
        granted.elapsed(),
        if third.is_ok() {
            "was granted it"
        } else {
            "was not granted it"
        },
        third.as_ref().map(|l| l.fencing_token()).ok(),
        second.is_held()
    );
    drop(third);
    drop(second);
}
