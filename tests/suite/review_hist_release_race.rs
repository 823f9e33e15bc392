//! Concurrent process (history): the `prev` snapshot race. A grant recorded
//! the expired lease it replaced as the statement's *snapshot* showed it,
//! while `ON CONFLICT` judges the row's latest version once it is locked. A
//! holder whose release of its (expired) lease was in flight — the release
//! statement frees the advisory key before it commits — holds the row; the
//! grant waits for it, finds it released, and grants; but it recorded an
//! `expired` (taken over) event for a lease that its holder released. The
//! history then says the same lease was both released and taken over.

use crate::common;

use std::time::Duration;

use common::*;
use lockbox::LeaseEventKind;

#[test]
fn a_lease_released_while_the_grant_waits_is_not_recorded_as_taken_over() {
    let table = unique("hist_race").replace('-', "_");
    let app = unique("hist-race");
    let client = builder_for(&app)
        .table(&table)
        .history(true)
        .ttl(Duration::from_secs(60))
        .build()
        .unwrap();
    let name = unique("hist-race");
    client.try_lock(&name).unwrap().unwrap().release().unwrap();

    // The previous holder: its lease expired unreleased; its release is in
    // flight (the row updated and locked, not yet committed; its advisory key
    // already freed, as the release statement does before it commits).
    let mut holder = admin();
    let pid = pid_of(&mut holder);
    holder
        .batch_execute(&format!(
            "UPDATE {table} SET owner = 'holder', token = token + 1, holder_pid = {pid}, \
                 released_at = NULL, \
                 holder_started = (SELECT backend_start FROM pg_stat_activity WHERE pid = {pid}), \
                 expires_at = clock_timestamp() - interval '1 second' \
             WHERE name = '{name}'"
        ))
        .unwrap();
    holder
        .batch_execute(&format!(
            "BEGIN; UPDATE {table} SET released_at = clock_timestamp() WHERE name = '{name}'"
        ))
        .unwrap();
    let handle = {
        let name = name.clone();
        std::thread::spawn(move || {
            let lock = client
                .try_lock(&name)
                .unwrap()
                .expect("granted once released");
            let token = lock.fencing_token();
            let events = client.history(&name, 10).unwrap();
            lock.release().unwrap();
            (token, events)
        })
    };
    assert!(
        eventually(Duration::from_secs(10), || pids_of(&app)
            .into_iter()
            .any(blocked_on_lock)),
        "the grant waits for the holder's row"
    );
    holder.batch_execute("COMMIT").unwrap();
    let (token, events) = handle.join().unwrap();
    let _ = admin().batch_execute(&format!(
        "DROP TABLE IF EXISTS {table}, {table}_history CASCADE; \
         DROP FUNCTION IF EXISTS {table}_wait_grant_hist_v2(integer, integer, text, text, \
             bigint, text, integer, timestamp with time zone, bigint, bigint, bigint); \
         DROP FUNCTION IF EXISTS {table}_wait_grant_hist_v5(integer, integer, text, text, \
             bigint, text, integer, timestamp with time zone, bigint, bigint, bigint); \
         DROP FUNCTION IF EXISTS {table}_fence(text, bigint);"
    ));
    assert_eq!(events[0].kind, LeaseEventKind::Granted, "{events:?}");
    assert_eq!(events[0].fencing_token, token);
    let taken_over: Vec<_> = events
        .iter()
        .filter(|e| e.kind == LeaseEventKind::Expired)
        .collect();
    assert!(
        taken_over.is_empty(),
        "a lease its holder released was recorded as taken over: {taken_over:?}"
    );
}
