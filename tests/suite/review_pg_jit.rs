//! Hostile review: planner settings are left alone as "speed, not meaning", but
//! with JIT on (the server default where LLVM is installed) a role default such
//! as `enable_seqscan = off` (which adds `disable_cost` to plans) or a low
//! `jit_above_cost` makes PostgreSQL JIT-compile every lockbox statement at
//! every execution: about a second each, here. A lease of one second is then
//! over before its grant returns, and every renewal runs most of a TTL.

use crate::common;

use common::*;
use lockbox::LockClient;

#[test]
fn a_role_default_that_triggers_jit_does_not_lose_short_leases() {
    let url = url_with_options(&unique("revpg-jit"), "-c jit=on -c enable_seqscan=off");
    let client = LockClient::builder(&url)
        .ttl(ms(1000))
        .build()
        .expect("build a client");
    let name = unique("jit");
    for round in 0..3 {
        let lock = client
            .try_lock(&name)
            .unwrap_or_else(|e| panic!("round {round}: the grant was lost on arrival: {e}"))
            .expect("a free lock");
        lock.ensure_held()
            .unwrap_or_else(|e| panic!("round {round}: lost right after the grant: {e}"));
        lock.release()
            .unwrap_or_else(|e| panic!("round {round}: the release found it lost: {e}"));
    }
}
