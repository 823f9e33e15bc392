//! Concurrent process (history): the zombie probe recorded a
//! `zombie_terminated` event for every unreleased lease whose `holder_pid`
//! was the terminated session's pid, without matching its start time. The
//! probe itself identifies sessions by pid *and* start time (a pid is
//! reused); a lease left unreleased by an earlier session with the same pid
//! (crashed, its row not yet reclaimed) was recorded as terminated with the
//! zombie, a session that never held it.

mod common;

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
         DROP FUNCTION IF EXISTS {table}_wait_grant_hist_v3(integer, integer, text, text, \
             bigint, text, integer, timestamp with time zone, bigint, bigint, bigint); \
         DROP FUNCTION IF EXISTS {table}_fence(text, bigint);"
    ));
    assert!(
        wrong.is_empty(),
        "a lease of an earlier session with the zombie's pid was recorded as terminated \
         with it: {wrong:?}"
    );
}
