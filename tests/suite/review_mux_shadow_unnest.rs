//! The batched renewal of a shared session reads its leases' TTLs from arrays
//! (`unnest`). A function `unnest(bigint[])` in a schema on the role's search
//! path is an exact-type match, which PostgreSQL would pick over `pg_catalog`'s
//! polymorphic `unnest(anyarray)`: here it returns a tenth of every TTL. The
//! renewal must still write the full lease (the holder's deadline rests on it).

use crate::common;

use std::time::Duration;

use common::shadow::Shadow;
use common::*;

#[test]
fn a_shadowing_unnest_cannot_shorten_batched_renewals() {
    let shadow = Shadow::create(
        "CREATE FUNCTION {evil}.unnest(bigint[]) RETURNS SETOF bigint \
             LANGUAGE sql IMMUTABLE AS $$ SELECT x / 10 FROM pg_catalog.unnest($1) AS x $$; \
         CREATE FUNCTION {evil}.unnest(text[]) RETURNS SETOF text \
             LANGUAGE sql IMMUTABLE AS $$ SELECT 'nobody'::text FROM pg_catalog.unnest($1) $$;",
    );
    let ttl = Duration::from_secs(3);
    let (client, _) = shadow.client(ttl);
    let names = [unique("unnest-a"), unique("unnest-b")];
    let locks: Vec<_> = names
        .iter()
        .map(|n| client.try_lock(n).unwrap().unwrap())
        .collect();
    let before = client.metrics().renewals_ok;
    // Two renewal rounds (every second).
    assert!(eventually(ttl, || client.metrics().renewals_ok >= before + 4));
    for name in &names {
        let left = shadow.server_left_ms(name);
        assert!(
            left > 1_500.0,
            "a renewal of a 3 s lease wrote one ending in {left} ms"
        );
    }
    for lock in locks {
        assert!(lock.is_held());
        lock.release().unwrap();
    }
}
