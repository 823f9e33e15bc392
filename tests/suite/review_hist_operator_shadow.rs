//! Hostile review (history): the pruning CTE computed its cutoff as
//! `statement_timestamp() - {ms}::int8 * interval '1 millisecond'`.
//! `pg_catalog` has no `bigint * interval` (only `float8 * interval`), so a
//! `*(bigint, interval)` operator in any schema of the role's search path is
//! an exact match and beats it: it decides which events a pruning release
//! deletes. Here it turns the 60 s retention into "everything", and every
//! sixteenth release silently deletes up to 32 fresh events.

use crate::common;

use std::time::Duration;

use common::shadow::Shadow;
use common::*;
use lockbox::LockClient;

#[test]
fn a_shadowing_bigint_times_interval_operator_cannot_prune_fresh_events() {
    let shadow = Shadow::create(
        "CREATE FUNCTION {evil}.mul(bigint, interval) RETURNS interval \
             LANGUAGE sql IMMUTABLE AS $$ SELECT interval '-1 hour' $$; \
         CREATE OPERATOR {evil}.* (LEFTARG = bigint, RIGHTARG = interval, \
             FUNCTION = {evil}.mul);",
    );
    let app = unique("hist-shadowed");
    let url = url_with_options(&app, &format!("-c search_path={},public", shadow.evil));
    let client = LockClient::builder(&url)
        .table(&format!("{}.leases", shadow.schema))
        .history(true)
        .history_retention(Duration::from_secs(60))
        .ttl(Duration::from_secs(10))
        .build()
        .expect("build a client");
    let name = unique("hist-shadowed");
    // Sixteen cycles: the sixteenth release prunes.
    for _ in 0..16 {
        client.try_lock(&name).unwrap().unwrap().release().unwrap();
    }
    let events = client.history(&name, 1000).unwrap();
    assert_eq!(
        events.len(),
        32,
        "fresh events (a 60 s retention) were pruned: {} of 32 left",
        events.len()
    );
}
