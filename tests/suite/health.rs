//! Health: healthy when all is well; unhealthy when the database is down or hangs
//! (and back when it returns), or the renewal thread died; degraded when renewals
//! lag or the pool is saturated. Always within the health timeout.

use crate::common;

use std::time::{Duration, Instant};

use common::server::Cluster;
use common::*;
use lockbox::{HealthStatus, LockClient};

#[test]
fn a_working_client_is_healthy() {
    let (client, _) = client(ms(3000));
    let lock = client.try_lock(&unique("healthy")).unwrap().unwrap();
    let h = client.health();
    assert_eq!(h.status, HealthStatus::Healthy, "{h}");
    assert!(h.reasons.is_empty());
    assert!(h.database.reachable);
    assert!(h.database.latency.is_some());
    assert!(
        h.database
            .server_version
            .as_deref()
            .is_some_and(|v| !v.is_empty())
    );
    assert_eq!(h.database.session_state_kept, Some(true));
    // The unqualified default table, resolved once at build to where it is.
    assert_eq!(
        h.database.lease_table.as_deref(),
        Some("public.lockbox_leases")
    );
    assert!(
        h.to_string().contains("lease table public.lockbox_leases"),
        "{h}"
    );
    assert_eq!(h.pool.max_size, 10);
    assert_eq!(h.pool.in_use, 1);
    assert!(h.renewal.thread_alive);
    assert_eq!(h.renewal.held_locks, 1);
    drop(lock);
    assert_eq!(client.health().renewal.held_locks, 0);
}

#[test]
fn unreachable_and_hung_databases_are_unhealthy_within_the_timeout() {
    let cluster = Cluster::start().expect("throwaway cluster");
    let client = LockClient::builder(&cluster.url)
        .health_timeout(ms(1500))
        .build()
        .unwrap();
    assert_eq!(client.health().status, HealthStatus::Healthy);

    cluster.stop_server("fast").unwrap();
    let start = Instant::now();
    let h = client.health();
    assert!(start.elapsed() < ms(1500) + ms(500));
    assert_eq!(h.status, HealthStatus::Unhealthy, "{h}");
    assert!(!h.database.reachable);
    assert!(
        h.reasons[0].contains("store unreachable"),
        "{:?}",
        h.reasons
    );

    cluster.start_server().unwrap();
    assert_eq!(
        client.health().status,
        HealthStatus::Healthy,
        "recovers when the database returns"
    );

    // A hung server: the postmaster frozen, connections are accepted by the kernel
    // but never answered.
    let stopped = Stopped::new(cluster.postmaster_pid() as i32);
    let start = Instant::now();
    let h = client.health();
    let took = start.elapsed();
    drop(stopped);
    assert!(took < ms(1500) + ms(500), "health took {took:?}");
    assert_eq!(h.status, HealthStatus::Unhealthy, "{h}");
    assert!(
        h.database
            .error
            .as_deref()
            .is_some_and(|e| e.contains("no answer")),
        "{h}"
    );
    assert_eq!(client.health().status, HealthStatus::Healthy);
}

/// A renewal that cannot get through is rated at once and against the lock's
/// own TTL (here far shorter than the client's default): Degraded while the
/// renewal is overdue, Unhealthy while the lock is still held but close to its
/// deadline, and a lost lock keeps the client Degraded afterwards.
///
/// On a session of its own the renewal waits for the row (late); on a shared
/// session it skips the row and fails (retrying): both are rated the same.
#[test]
fn blocked_renewals_are_rated_against_the_locks_own_ttl_before_the_deadline() {
    held_up_renewals_are_rated(1, "late to renew");
    held_up_renewals_are_rated(1000, "failing to renew");
}

fn held_up_renewals_are_rated(per_session: u32, degraded_reason: &str) {
    let ttl = ms(1500);
    // The client's default TTL is 30 s; the lock's own is 1.5 s.
    let client = builder_for(&unique("lag"))
        .locks_per_session(per_session)
        .build()
        .unwrap();
    let name = unique("lag");
    let opts = lockbox::AcquireOptions::new().ttl(ttl);
    let lock = client.acquire(&name, &opts).unwrap().unwrap();
    let lost = lock.lost();
    // Block the renewal path: hold the lease row so the renewal statement waits.
    let row = RowHold::lease(&name);
    let mut seen_degraded = false;
    let mut seen_unhealthy_while_held = false;
    let deadline_passed = eventually(ttl * 2, || {
        let h = client.health();
        // Judged after the report: the report was made while the lock was held.
        let held = lost.is_empty() && lock.is_held();
        if held && h.status == HealthStatus::Degraded {
            assert!(h.reasons.iter().any(|r| r.contains(degraded_reason)), "{h}");
            seen_degraded = true;
        }
        if held && h.status == HealthStatus::Unhealthy {
            assert!(h.reasons.iter().any(|r| r.contains("at risk")), "{h}");
            seen_unhealthy_while_held = true;
        }
        !lock.is_held()
    });
    row.release();
    assert!(deadline_passed, "the lock was never lost");
    assert!(
        seen_degraded,
        "never Degraded while the renewal was overdue"
    );
    assert!(
        seen_unhealthy_while_held,
        "never Unhealthy before the deadline"
    );
    // After the loss: the lost lock is rated.
    let h = client.health();
    assert_eq!(h.status, HealthStatus::Degraded, "{h}");
    assert!(h.reasons.iter().any(|r| r.contains("lost")), "{h}");
    assert_eq!(h.renewal.held_locks, 0);
    assert_eq!(h.renewal.locks_lost, 1);
}

/// Renewals that fail outright (the server refuses the write: here a trigger)
/// make the client Degraded at the first failure, not only once a lock is lost.
#[test]
fn failing_renewals_are_degraded_at_once() {
    let schema = unique("refuse").replace('-', "_");
    let table = format!("{schema}.leases");
    let mut db = admin();
    db.batch_execute(&format!("CREATE SCHEMA {schema}"))
        .unwrap();
    let ttl = ms(3000);
    let client = builder_for(&unique("refuse"))
        .table(&table)
        .ttl(ttl)
        .build()
        .unwrap();
    let name = unique("refused");
    let lock = client.try_lock(&name).unwrap().unwrap();
    assert_eq!(client.health().status, HealthStatus::Healthy);
    db.batch_execute(&format!(
        "CREATE FUNCTION {schema}.refuse() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN RAISE EXCEPTION 'writes refused by policy'; END $$; \
         CREATE TRIGGER refuse BEFORE UPDATE ON {table} \
         FOR EACH ROW EXECUTE FUNCTION {schema}.refuse();"
    ))
    .unwrap();
    // The first renewal fails a third of the TTL after the grant.
    let degraded = eventually(ttl / 2, || {
        client
            .health()
            .reasons
            .iter()
            .any(|r| r.contains("failing to renew"))
    });
    let h = client.health();
    let held = lock.is_held();
    drop(lock);
    db.batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
        .unwrap();
    assert!(degraded, "failing renewals not reported: {h}");
    assert!(held, "reported while the lock was still held");
    assert!(h.renewal.failing_locks == 1, "{h}");
}

#[test]
fn a_saturated_pool_makes_it_degraded() {
    let client = builder_for(&unique("sat")).pool_size(1).build().unwrap();
    let lock = client.try_lock(&unique("only")).unwrap().unwrap();
    let h = client.health();
    assert_eq!(h.status, HealthStatus::Degraded, "{h}");
    assert!(h.reasons.iter().any(|r| r.contains("pool saturated")));
    drop(lock);
    assert_eq!(client.health().status, HealthStatus::Healthy);
}

#[test]
fn a_dead_renewal_thread_makes_it_unhealthy() {
    let (client, _) = client(ms(3000));
    client.__inject_renewal_panic();
    assert!(eventually(Duration::from_secs(2), || !client.renewal_thread_alive()));
    let h = client.health();
    assert_eq!(h.status, HealthStatus::Unhealthy);
    assert!(h.reasons.iter().any(|r| r.contains("renewal thread")));
}
