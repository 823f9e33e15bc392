//! A write fence applied by a configuration reload (`ALTER SYSTEM SET
//! default_transaction_read_only = on` plus `pg_reload_conf()`, as an operator
//! or a failover tool fences the old primary): sessions lockbox already pooled
//! must refuse like new ones, and held locks whose renewals fail are reported
//! lost. A throwaway cluster of its own: the setting is server-wide.

mod common;

use std::time::Duration;

use common::server::Cluster;
use common::*;
use lockbox::{Error, LockClient, LostReason};

#[test]
fn a_write_fence_applied_by_reload_reaches_pooled_sessions_and_held_locks() {
    let cluster = Cluster::start().unwrap();
    let app = unique("fence");
    let url = format!("{}?sslmode=disable&application_name={app}", cluster.url);
    let ttl = Duration::from_secs(2);
    // Two sessions: one pinned by the held lock, one idle in the pool.
    let client = LockClient::builder(&url)
        .ttl(ttl)
        .pool_size(2)
        .pool_timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let held = client.try_lock(&unique("fence-held")).unwrap().unwrap();
    client
        .acquire(
            &unique("fence-idle"),
            &lockbox::AcquireOptions::new().dedicated_session(true),
        )
        .unwrap()
        .unwrap()
        .release()
        .unwrap();
    let connect = || postgres::Client::connect(&url, postgres::NoTls).unwrap();
    let pids = |db: &mut postgres::Client| -> Vec<i32> {
        db.query(
            "SELECT pid FROM pg_stat_activity WHERE application_name = $1 ORDER BY pid",
            &[&app],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
    };
    let mut admin = connect();
    let pooled = pids(&mut admin);
    assert_eq!(pooled.len(), 3, "{pooled:?}"); // two pooled, and this one
    admin
        .batch_execute("ALTER SYSTEM SET default_transaction_read_only = on")
        .unwrap();
    admin.batch_execute("SELECT pg_reload_conf()").unwrap();
    // A new session shows the fence once the postmaster has reloaded, and the
    // postmaster signals every running session before it forks a new one:
    // the pooled sessions apply it before their next statement.
    assert!(eventually(Duration::from_secs(10), || {
        connect()
            .query_one("SHOW default_transaction_read_only", &[])
            .unwrap()
            .get::<_, String>(0)
            == "on"
    }));
    // The idle pooled session refuses the acquire (the pool is full: it is
    // the only one the acquire can use).
    match client.try_lock(&unique("fence-new")) {
        Err(e @ Error::Unsupported(_)) => assert!(e.to_string().contains("read-only"), "{e}"),
        other => panic!("expected Unsupported naming read-only, got {other:?}"),
    }
    // The held lock's renewals fail: it is reported lost.
    assert_eq!(held.lost().recv_timeout(ttl * 3), Ok(LostReason::Expired));
    drop(held);
    // No session was opened meanwhile besides the checks': the pooled ones
    // were the ones refusing.
    let mut admin = connect();
    let now: Vec<i32> = pids(&mut admin)
        .into_iter()
        .filter(|p| !pooled.contains(p))
        .collect();
    assert!(now.len() <= 1, "new lockbox sessions: {now:?}");
}
