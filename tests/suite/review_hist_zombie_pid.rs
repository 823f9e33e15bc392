//! Concurrent process (history): the zombie probe recorded a
//! `zombie_terminated` event for every unreleased lease whose `holder_pid`
//! was the terminated session's pid, without matching its start time. The
//! probe itself identifies sessions by pid *and* start time (a pid is
//! reused); a lease left unreleased by an earlier session with the same pid
//! (crashed, its row not yet reclaimed) was recorded as terminated with the
//! zombie, a session that never held it.

use crate::common;

use std::time::Duration;

use common::*;
use lockbox::{LeaseEventKind, LockClient};

#[test]
fn a_zombies_termination_records_only_its_own_leases() {
    let table = unique("hist_zpid").replace('-', "_");
    let client = LockClient::builder(database_url())
        .table(&table)
        .history(true)
        .ttl(ms(1000))
        .build()
        .unwrap();
    let name = unique("hist-zombie");
    let other = unique("hist-pid-reused");
    client.try_lock(&name).unwrap().unwrap().release().unwrap();

    let mut zombie = admin();
    let (hi, lo) = lockbox::advisory_key(&name);
    zombie
        .execute("SELECT pg_advisory_lock($1, $2)", &[&hi, &lo])
        .unwrap();
    let pid = pid_of(&mut zombie);
    admin()
        .batch_execute(&format!(
            "UPDATE {table} SET owner = 'zombie', token = token + 1, holder_pid = {pid}, \
                 released_at = NULL, \
                 holder_started = (SELECT backend_start FROM pg_stat_activity WHERE pid = {pid}), \
                 expires_at = clock_timestamp() - interval '1 second' \
             WHERE name = '{name}'; \
             INSERT INTO {table} (name, owner, token, holder_pid, holder_started, acquired_at, \
                 renewed_at, expires_at) \
             VALUES ('{other}', 'an-earlier-session', 1000000, {pid}, \
                 timestamptz '2001-01-01 00:00:00+00', now() - interval '1 minute', \
                 now() - interval '1 minute', now() - interval '1 minute');"
        ))
        .unwrap();
    let lock = client.lock_timeout(&name, Duration::from_secs(10)).unwrap();
    assert!(
        zombie.simple_query("SELECT 1").is_err(),
        "the zombie was terminated"
    );
    let zombie_events: Vec<_> = client
        .history(&name, 10)
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == LeaseEventKind::ZombieTerminated)
        .collect();
    assert_eq!(zombie_events.len(), 1, "{zombie_events:?}");
    let wrong = client.history(&other, 10).unwrap();
    lock.release().unwrap();
    drop(client);
    let _ = admin().batch_execute(&format!(
        "DROP TABLE IF EXISTS {table}, {table}_history CASCADE; \
         DROP FUNCTION IF EXISTS {table}_wait_grant_hist_v2(integer, integer, text, text, \
             bigint, text, integer, timestamp with time zone, bigint, bigint, bigint); \
         DROP FUNCTION IF EXISTS {table}_wait_grant_hist_v5(integer, integer, text, text, \
             bigint, text, integer, timestamp with time zone, bigint, bigint, bigint); \
         DROP FUNCTION IF EXISTS {table}_fence(text, bigint);"
    ));
    assert!(
        wrong.is_empty(),
        "a lease of an earlier session with the zombie's pid was recorded as terminated \
         with it: {wrong:?}"
    );
}

/// A zombie session that held many leases (a multiplexed one): its
/// termination records one event for each of them, and the later grants of
/// the others record their expired leases too.
#[test]
fn a_multiplexed_zombies_termination_records_each_of_its_leases() {
    let table = unique("hist_zmany").replace('-', "_");
    let client = LockClient::builder(database_url())
        .table(&table)
        .history(true)
        .ttl(ms(1000))
        .build()
        .unwrap();
    let names: Vec<String> = (0..3).map(|i| unique(&format!("hist-many-{i}"))).collect();
    let mut zombie = admin();
    let pid = pid_of(&mut zombie);
    for (i, name) in names.iter().enumerate() {
        let (hi, lo) = lockbox::advisory_key(name);
        zombie
            .execute("SELECT pg_advisory_lock($1, $2)", &[&hi, &lo])
            .unwrap();
        admin()
            .execute(
                &format!(
                    "INSERT INTO {table} (name, owner, token, holder_pid, holder_started, \
                         acquired_at, renewed_at, expires_at) \
                     SELECT $1, 'multiplexed', $2, pid, backend_start, now(), now(), \
                         clock_timestamp() - interval '1 second' \
                     FROM pg_stat_activity WHERE pid = $3"
                ),
                &[name, &(100 + i as i64), &pid],
            )
            .unwrap();
    }
    let first = client
        .lock_timeout(&names[0], Duration::from_secs(10))
        .unwrap();
    assert!(
        zombie.simple_query("SELECT 1").is_err(),
        "the zombie was terminated"
    );
    let others: Vec<_> = names[1..]
        .iter()
        .map(|n| {
            let lock = client.lock_timeout(n, Duration::from_secs(10)).unwrap();
            let token = lock.fencing_token();
            lock.release().unwrap();
            (n.clone(), token)
        })
        .collect();
    first.release().unwrap();
    let mut got = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let kinds: Vec<(LeaseEventKind, u64)> = client
            .history(name, 10)
            .unwrap()
            .into_iter()
            .map(|e| (e.kind, e.fencing_token))
            .collect();
        got.push((i, kinds));
    }
    drop(client);
    let _ = admin().batch_execute(&format!(
        "DROP TABLE IF EXISTS {table}, {table}_history CASCADE; \
         DROP FUNCTION IF EXISTS {table}_wait_grant_hist_v5(integer, integer, text, text, \
             bigint, text, integer, timestamp with time zone, bigint, bigint, bigint); \
         DROP FUNCTION IF EXISTS {table}_fence(text, bigint);"
    ));
    for (i, kinds) in got {
        let old = 100 + i as u64;
        let new = if i == 0 { old + 1 } else { others[i - 1].1 };
        assert_eq!(
            kinds,
            vec![
                (LeaseEventKind::Released, new),
                (LeaseEventKind::Granted, new),
                (LeaseEventKind::Expired, old),
                (LeaseEventKind::ZombieTerminated, old),
            ],
            "name {i}"
        );
    }
}
