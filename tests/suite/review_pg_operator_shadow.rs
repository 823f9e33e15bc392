//! Hostile review: pinning `pg_catalog` first in the `search_path` does not stop
//! shadowing. PostgreSQL resolves operators (and functions) by *best match*
//! across every schema on the path: an operator with the exact argument types
//! in a later schema beats a `pg_catalog` one that needs an implicit cast.
//! lockbox's statements compute the lease's end as
//! `clock_timestamp() + $5::int8 * interval '1 millisecond'`, and
//! `pg_catalog` has no `bigint * interval` (only `float8 * interval`), so a
//! `*(bigint, interval)` operator in any schema of the role's search path (an
//! extension's, or one writable by others) decides how long every lease lasts.

use crate::common;

use std::time::Duration;

use common::shadow::Shadow;
use common::*;

/// With `bigint * interval` shadowed to return a negative interval, every lease
/// is written already expired: a second client is granted the name while the
/// first still holds it (its guard is held, its local deadline far away).
#[test]
fn a_shadowing_bigint_times_interval_operator_cannot_shorten_leases() {
    let shadow = Shadow::create(
        "CREATE FUNCTION {evil}.mul(bigint, interval) RETURNS interval \
             LANGUAGE sql IMMUTABLE AS $$ SELECT interval '-1 hour' $$; \
         CREATE OPERATOR {evil}.* (LEFTARG = bigint, RIGHTARG = interval, \
             FUNCTION = {evil}.mul);",
    );
    let (a, _) = shadow.client(Duration::from_secs(10));
    let (b, _) = shadow.client(Duration::from_secs(10));
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
    let expires_in_ms = shadow.server_left_ms(&name);
    assert!(
        expires_in_ms > 5_000.0,
        "a 10 s lease was written to end in {expires_in_ms} ms"
    );
    first.release().unwrap();
}
