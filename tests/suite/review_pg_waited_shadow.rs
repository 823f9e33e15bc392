//! Hostile review (of a design since dropped): a waiting acquire once granted in
//! its wait statement and took the lease's start from the wait the server
//! measured, `floor(extract(epoch FROM ..) * 1000)`: `numeric * integer`, for
//! which `pg_catalog` has no exact operator, so a `*(numeric, integer)` on the
//! role's search path could stretch the holder's local deadline past its lease
//! (two holders at once). Kept as a regression test: whatever a waiting
//! acquire computes, such an operator must not move a holder's deadline.

use crate::common;

use std::thread;
use std::time::{Duration, Instant};

use common::shadow::Shadow;
use common::*;

/// The shadowing operator: an exact-match `*(numeric, integer)` that adds 20 s
/// to what it returns.
const OPERATOR: &str = "\
    CREATE FUNCTION {evil}.mul(numeric, integer) RETURNS numeric \
        LANGUAGE sql IMMUTABLE AS \
        $$ SELECT pg_catalog.numeric_add(pg_catalog.numeric_mul($1, $2::numeric), 20000) $$; \
    CREATE OPERATOR {evil}.* (LEFTARG = numeric, RIGHTARG = integer, \
        FUNCTION = {evil}.mul);";

/// A hands the lock off to a waiter B (TTL 2 s). Two seconds and a half later
/// B's lease has ended on the server; B must no longer consider itself the
/// holder, and a third client C taking the name must not find B still holding.
#[test]
fn a_shadowed_numeric_times_integer_cannot_stretch_a_waiters_deadline() {
    let shadow = Shadow::create(OPERATOR);
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
