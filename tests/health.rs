//! Health: healthy when all is well; unhealthy when the database is down or hangs
//! (and back when it returns), or the renewal thread died; degraded when renewals
//! lag or the pool is saturated. Always within the health timeout.

mod common;

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
        h.reasons[0].contains("database unreachable"),
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
    let pid = cluster.postmaster_pid();
    signal(pid, "STOP");
    let start = Instant::now();
    let h = client.health();
    let took = start.elapsed();
    signal(pid, "CONT");
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

fn signal(pid: u32, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

#[test]
fn renewal_lag_makes_it_degraded() {
    let ttl = ms(1500);
    let (client, _) = client(ttl);
    let name = unique("lag");
    let lock = client.try_lock(&name).unwrap().unwrap();
    // Block the renewal path: hold the lease row so the renewal statement waits.
    let row = RowHold::lease(&name);
    let degraded = eventually(ttl, || {
        let h = client.health();
        h.status == HealthStatus::Degraded && h.reasons.iter().any(|r| r.contains("renewal lag"))
    });
    let h = client.health();
    row.release();
    assert!(degraded, "never degraded: {h}");
    assert!(h.renewal.max_lag > ttl / 3);
    drop(lock);
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
