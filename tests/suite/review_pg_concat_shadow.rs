//! A review of 65b6eb9: the reclaim sweep built its page bounds as
//! `'(' || lo || ',0)'` with `lo` a `bigint`. `pg_catalog` has no exact
//! `||(text, bigint)` (only the polymorphic `textanycat`), so an exact-type
//! operator in any schema of the role's search path won, and ran inside every
//! reclaiming release (one grant in 16) as lockbox's role: a stealthy one
//! unseen, a failing one failing the release with the lease left live. The
//! health probe (`|| pg_backend_pid() || … || clock_timestamp()`) and
//! `build()`'s reading of the table's name (`nspname || '.' || relname`, of
//! type `name`) had the same hole. Every concatenation now has `text` on both
//! sides. Seen failing before the fix: 80 calls, releases failing with the
//! operator's error, and `build()` failing on `||(name, name)`; the health
//! probe's write is rolled back, and the stealthy operator's record with it,
//! so only the failing operator shows that one (health said "not writable").

use crate::common;

use std::time::Duration;

use common::shadow::Shadow;
use common::*;

/// Operators with the exact operand types of every concatenation lockbox
/// wrote before the fix, each recording its calls, or failing when `fail`.
fn shadow(fail: bool) -> Shadow {
    let act = if fail {
        "RAISE EXCEPTION 'evil operator ran inside lockbox';"
    } else {
        "INSERT INTO {evil}.calls (op) VALUES (TG_NAME); RETURN $1::text OPERATOR(pg_catalog.||) $2::text;"
    };
    let mut sql =
        "CREATE TABLE {evil}.calls (at timestamptz DEFAULT clock_timestamp(), op text);".to_owned();
    for (i, (left, right)) in [
        ("text", "bigint"),
        ("text", "integer"),
        ("text", "timestamptz"),
        ("name", "name"),
    ]
    .iter()
    .enumerate()
    {
        // TG_NAME is not set outside triggers: the function's own name goes in.
        let body = act.replace("TG_NAME", &format!("'{left} || {right}'"));
        sql.push_str(&format!(
            "CREATE FUNCTION {{evil}}.cat{i}({left}, {right}) RETURNS text LANGUAGE plpgsql \
                 AS $f$ BEGIN {body} END $f$; \
             CREATE OPERATOR {{evil}}.|| (LEFTARG = {left}, RIGHTARG = {right}, \
                 FUNCTION = {{evil}}.cat{i});"
        ));
    }
    Shadow::create(&sql)
}

/// Rows of old, released leases (what reclaiming exists for): without them
/// the planner never evaluates the bounds' operator.
fn old_rows(shadow: &Shadow, client: &lockbox::LockClient) {
    for _ in 0..40 {
        client
            .try_lock(&unique("old"))
            .unwrap()
            .unwrap()
            .release()
            .unwrap();
    }
    admin()
        .batch_execute(&format!(
            "UPDATE {}.leases SET acquired_at = acquired_at - interval '2 hours', \
                 renewed_at = renewed_at - interval '2 hours', \
                 expires_at = expires_at - interval '2 hours', \
                 released_at = released_at - interval '2 hours'",
            shadow.schema
        ))
        .unwrap();
}

#[test]
fn no_shadowing_concatenation_runs_in_build_releases_or_health() {
    let shadow = shadow(false);
    let (client, _) = shadow.client(Duration::from_secs(10));
    old_rows(&shadow, &client);
    let rows = || -> i64 {
        admin()
            .query_one(
                &format!("SELECT count(*) FROM {}.leases", shadow.schema),
                &[],
            )
            .unwrap()
            .get(0)
    };
    let before = rows();
    fresh_cycles(&client, 32);
    let after = rows();
    // The sweep ran (it is what could call the operator): old rows went.
    assert!(
        after < before + 32,
        "no reclaiming release swept the old rows ({before} rows, then {after})"
    );
    let health = client.health();
    assert!(health.is_healthy(), "{health:?}");
    let calls: Vec<String> = admin()
        .query(
            &format!("SELECT op FROM {}.calls ORDER BY at", shadow.evil),
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        calls.is_empty(),
        "a role's operators ran inside lockbox: {calls:?}"
    );
}

#[test]
fn a_failing_shadowing_concatenation_fails_no_release() {
    let shadow = shadow(true);
    let (client, _) = shadow.client(Duration::from_secs(10));
    old_rows(&shadow, &client);
    for i in 0..32 {
        let name = unique("fresh");
        let lock = client.try_lock(&name).unwrap().unwrap();
        if let Err(e) = lock.release() {
            panic!("release {i} failed: {e}");
        }
        assert!(
            client.try_lock(&name).unwrap().is_some(),
            "the name of release {i} is still held"
        );
    }
    let health = client.health();
    assert!(health.is_healthy(), "{health:?}");
}
