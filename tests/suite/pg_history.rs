//! The lease history (`LockClientBuilder::history`): every grant, release,
//! expired lease taken over and zombie session terminated is recorded by the
//! statement that makes the change; old events are pruned without making
//! anyone wait.

use crate::common;

use std::time::Duration;

use common::*;
use lockbox::{Error, LeaseEventKind, LockClient, LockClientBuilder};

/// A lease table of the test's own (its history table beside it).
fn table() -> String {
    unique("hist").replace('-', "_") + "_leases"
}

fn builder(table: &str, app: &str) -> LockClientBuilder {
    builder_for(app).table(table).history(true)
}

fn kinds(client: &LockClient, name: &str) -> Vec<(LeaseEventKind, u64)> {
    client
        .history(name, 100)
        .unwrap()
        .into_iter()
        .map(|e| (e.kind, e.fencing_token))
        .collect()
}

/// Terminates the session holding `name`'s lease in `table`, as a crash of
/// its process would end it: the lease stays, unreleased, until it expires.
fn end_holder_session(db: &mut postgres::Client, table: &str, name: &str) {
    let pid: i32 = db
        .query_one(
            &format!("SELECT holder_pid FROM {table} WHERE name = $1"),
            &[&name],
        )
        .unwrap()
        .get(0);
    db.execute("SELECT pg_terminate_backend($1)", &[&pid])
        .unwrap();
}

/// A thread in which `waiter` waits for `name` (up to `limit`), then releases
/// it; joined, the token it was granted.
fn waits_and_releases(
    waiter: LockClient,
    name: &str,
    limit: Duration,
) -> std::thread::JoinHandle<u64> {
    let name = name.to_owned();
    std::thread::spawn(move || {
        let lock = waiter.lock_timeout(&name, limit).unwrap();
        let token = lock.fencing_token();
        lock.release().unwrap();
        token
    })
}

fn drop_tables(table: &str) {
    admin()
        .batch_execute(&format!(
            "DROP TABLE IF EXISTS {table}, {table}_history CASCADE; \
             DROP FUNCTION IF EXISTS {table}_wait_grant_hist_v5(integer, integer, text, text, \
                 bigint, text, integer, timestamp with time zone, bigint, bigint, bigint); \
             DROP FUNCTION IF EXISTS {table}_fence(text, bigint);"
        ))
        .unwrap();
}

#[test]
fn grants_releases_takeovers_and_terminations_are_recorded() {
    let table = table();
    let app = unique("hist-app");
    let client = builder(&table, &app).ttl(ms(400)).build().unwrap();
    let name = unique("hist-name");

    // A grant and its release.
    let first = client
        .acquire(&name, &lockbox::AcquireOptions::new().metadata("first"))
        .unwrap()
        .unwrap();
    let t1 = first.fencing_token();
    first.release().unwrap();
    let events = client.history(&name, 10).unwrap();
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(events[0].kind, LeaseEventKind::Released);
    assert_eq!(events[1].kind, LeaseEventKind::Granted);
    assert_eq!(events[1].metadata.as_deref(), Some("first"));
    assert_eq!(events[1].owner, client.owner_id());
    assert!(
        events
            .iter()
            .all(|e| e.fencing_token == t1 && e.name == name)
    );
    assert!(events[0].at >= events[1].at);

    // A zombie: a session of another process holding the key, its lease run
    // out. The next acquire terminates it and takes the expired lease over.
    let mut zombie = admin();
    let (hi, lo) = lockbox::advisory_key(&name);
    zombie
        .execute("SELECT pg_advisory_lock($1, $2)", &[&hi, &lo])
        .unwrap();
    let t2 = t1 as i64 + 1;
    zombie
        .execute(
            &format!(
                "UPDATE {table} SET owner = 'another-process', token = $2, \
                     holder_pid = pg_backend_pid(), released_at = NULL, \
                     holder_started = (SELECT backend_start FROM pg_stat_activity \
                         WHERE pid = pg_backend_pid()), \
                     expires_at = clock_timestamp() + interval '100 milliseconds' \
                 WHERE name = $1"
            ),
            &[&name, &t2],
        )
        .unwrap();
    let t2 = t2 as u64;
    let next = client.lock_timeout(&name, Duration::from_secs(10)).unwrap();
    let t3 = next.fencing_token();
    assert!(t3 > t2 && t2 > t1);
    assert!(zombie.is_closed() || zombie.simple_query("SELECT 1").is_err());
    let got = kinds(&client, &name);
    assert_eq!(
        &got[..4],
        &[
            (LeaseEventKind::Granted, t3),
            (LeaseEventKind::Expired, t2),
            (LeaseEventKind::ZombieTerminated, t2),
            (LeaseEventKind::Released, t1),
        ],
        "{got:?}"
    );

    // A waiter granted through the wait-and-grant function (history variant).
    let waiter = builder(&table, &unique("hist-waiter")).build().unwrap();
    let handle = waits_and_releases(waiter, &name, Duration::from_secs(10));
    assert!(eventually(Duration::from_secs(10), || {
        a_statement_waits_on_lock("%_wait_grant_hist_v5%")
    }));
    next.release().unwrap();
    let t4 = handle.join().unwrap();
    let got = kinds(&client, &name);
    assert_eq!(
        &got[..3],
        &[
            (LeaseEventKind::Released, t4),
            (LeaseEventKind::Granted, t4),
            (LeaseEventKind::Released, t3),
        ],
        "{got:?}"
    );
    drop(client);
    drop_tables(&table);
}

#[test]
fn old_events_are_pruned_and_pruning_waits_for_no_one() {
    let table = table();
    let client = builder(&table, &unique("hist-prune"))
        .history_retention(Duration::from_secs(60))
        .build()
        .unwrap();
    let history = format!("{table}_history");
    // Old events (of other names), one of them locked by an operator's open
    // transaction: pruning skips it rather than wait.
    admin()
        .batch_execute(&format!(
            "INSERT INTO {history} (name, token, owner, event, at) \
             SELECT 'old-' || i, i, 'someone', 'granted', clock_timestamp() - interval '2 minutes' \
             FROM generate_series(1, 40) i"
        ))
        .unwrap();
    let mut operator = admin();
    let mut held = operator.transaction().unwrap();
    held.query(
        &format!("SELECT 1 FROM {history} WHERE name = 'old-1' FOR UPDATE"),
        &[],
    )
    .unwrap();
    let name = unique("hist-cycle");
    // Every sixteenth release prunes up to 32 events: 64 cycles prune them all.
    for _ in 0..64 {
        client.try_lock(&name).unwrap().unwrap().release().unwrap();
    }
    let left: Vec<String> = admin()
        .query(
            &format!("SELECT name FROM {history} WHERE name LIKE 'old-%' ORDER BY name"),
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(left, vec!["old-1".to_owned()]);
    held.rollback().unwrap();
    // The recent events stay.
    assert_eq!(client.history(&name, 1000).unwrap().len(), 128);
    drop(client);
    drop_tables(&table);
}

#[test]
fn history_settings_are_checked() {
    let (client, _) = client(Duration::from_secs(30));
    match client.history("anything", 10) {
        Err(e @ Error::Unsupported(_)) => assert!(e.to_string().contains("history(true)"), "{e}"),
        other => panic!("expected Unsupported, got {other:?}"),
    }
    assert!(matches!(
        LockClient::memory().history(true).build(),
        Err(Error::InvalidConfig(_))
    ));
    for retention in [
        Duration::from_secs(59),
        Duration::from_secs(3651 * 24 * 3600),
    ] {
        assert!(matches!(
            LockClient::builder(database_url())
                .history(true)
                .history_retention(retention)
                .build(),
            Err(Error::InvalidConfig(_))
        ));
    }
    // Without create_table, a missing history table is a clear error.
    let table = table();
    LockClient::builder(database_url())
        .table(&table)
        .build()
        .unwrap();
    match LockClient::builder(database_url())
        .table(&table)
        .create_table(false)
        .history(true)
        .build()
    {
        Err(Error::MissingTable { table: missing }) => {
            assert!(missing.ends_with("_history"), "{missing}")
        }
        other => panic!("expected MissingTable, got {other:?}"),
    }
    drop_tables(&table);
}

#[test]
fn a_forced_release_is_recorded() {
    let table = table();
    let holder = builder(&table, &unique("hist-forced-holder"))
        .build()
        .unwrap();
    let operator = builder(&table, &unique("hist-forced-op")).build().unwrap();
    let name = unique("hist-forced");
    let lock = holder
        .acquire(&name, &lockbox::AcquireOptions::new().metadata("held"))
        .unwrap()
        .unwrap();
    let token = lock.fencing_token();
    assert_eq!(operator.force_release(&name).unwrap(), Some(token));
    let events = operator.history(&name, 10).unwrap();
    assert_eq!(events[0].kind, LeaseEventKind::ForceReleased, "{events:?}");
    assert_eq!(events[0].fencing_token, token);
    assert_eq!(events[0].owner, holder.owner_id());
    assert_eq!(events[0].metadata.as_deref(), Some("held"));
    drop(lock);
    drop((holder, operator));
    drop_tables(&table);
}

/// A try that finds an expired lease whose holder's session is gone takes it
/// over and records the takeover (`Expired`, then `Granted`) — on a session
/// of its own, and on a session shared with another lock of the client (no
/// connection to spare). With a history, the try's own statement leaves an
/// expired lease to the full grant, which records it; before that grant ran
/// on the shared session, such a try waited for a connection the pool did not
/// have and failed with `PoolTimeout`.
#[test]
fn a_try_takes_over_an_expired_lease_and_records_it() {
    let table = table();
    let ttl = ms(300);
    let holder = builder(&table, &unique("hist-crashed"))
        .ttl(ttl)
        .build()
        .unwrap();
    for shared in [false, true] {
        let name = unique("hist-try");
        let crashed = holder.try_lock(&name).unwrap().unwrap();
        let t1 = crashed.fencing_token();
        // Its process "crashes": the session is gone, the lease stays
        // unreleased until it expires.
        let mut db = admin();
        end_holder_session(&mut db, &table, &name);
        assert!(crashed.lost().recv_timeout(ttl * 4).is_ok());
        drop(crashed);

        let (taker, _busy) = if shared {
            // One connection, busy with a lock of its own: the try goes to
            // that session.
            let taker = builder(&table, &unique("hist-taker"))
                .pool_size(1)
                .ttl(ms(5_000))
                .build()
                .unwrap();
            let busy = taker.try_lock(&unique("hist-busy")).unwrap().unwrap();
            (taker, Some(busy))
        } else {
            (
                builder(&table, &unique("hist-taker")).build().unwrap(),
                None,
            )
        };
        assert!(eventually(Duration::from_secs(10), || db
            .query_one(
                &format!("SELECT expires_at <= clock_timestamp() FROM {table} WHERE name = $1"),
                &[&name],
            )
            .unwrap()
            .get(0)));
        let taken = taker
            .try_lock(&name)
            .unwrap()
            .expect("the expired lease is taken over");
        let t2 = taken.fencing_token();
        assert!(t2 > t1);
        assert_eq!(
            &kinds(&holder, &name)[..3],
            &[
                (LeaseEventKind::Granted, t2),
                (LeaseEventKind::Expired, t1),
                (LeaseEventKind::Granted, t1),
            ],
            "shared: {shared}"
        );
        taken.release().unwrap();
    }
    drop(holder);
    drop_tables(&table);
}

/// A lease that ends between the moment the grant looks at it (live: nothing
/// to record) and the moment the grant would replace it (expired) is not
/// taken over silently: the grant then grants nothing, and the next one
/// records the takeover. The window is widened here by a trigger that sleeps
/// until the lease ends: the holder's session is terminated while a waiter
/// waits for the key, whose grant then finds the lease still live. Before,
/// the grant took it over with no `Expired` event. Through the wait-and-grant
/// function, and without it (the key waited for by a statement of its own,
/// then `upsert`, then the lock-delay path, which finds the lease ended).
#[test]
fn a_lease_that_ends_during_the_grant_is_recorded_when_taken_over() {
    ends_during_the_grant(true);
}

#[test]
fn a_lease_that_ends_during_an_upsert_is_recorded_when_taken_over() {
    ends_during_the_grant(false);
}

fn ends_during_the_grant(function: bool) {
    let table = table();
    let holder = builder(&table, &unique("hist-window-holder"))
        .ttl(ms(1_500))
        .build()
        .unwrap();
    let name = unique("hist-window");
    let held = holder.try_lock(&name).unwrap().unwrap();
    let t1 = held.fencing_token();
    // Built first: lockbox refuses a lease table with such triggers at build.
    let waiter = builder(&table, &unique("hist-window-waiter"))
        .build()
        .unwrap();
    let mut db = admin();
    if !function {
        // Gone before the waiter's session checks it: that session waits
        // and grants with statements of its own.
        db.batch_execute(&format!(
            "DROP FUNCTION {table}_wait_grant_hist_v5(integer, integer, text, text, bigint, \
                 text, integer, timestamp with time zone, bigint, bigint, bigint)"
        ))
        .unwrap();
    }
    // Counts the grants tried (a spin would show), and sleeps until the
    // name's unreleased lease ends.
    db.batch_execute(&format!(
        "CREATE TABLE {table}_tries (n int); INSERT INTO {table}_tries VALUES (0); \
         CREATE FUNCTION {table}_slow() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
             UPDATE {table}_tries SET n = n + 1; \
             PERFORM pg_sleep(GREATEST(0, extract(epoch FROM (SELECT expires_at FROM {table} \
                 WHERE name = NEW.name AND released_at IS NULL) - clock_timestamp()) + 0.05)); \
             RETURN NEW; END $$; \
         CREATE TRIGGER slow BEFORE INSERT ON {table} FOR EACH ROW EXECUTE FUNCTION {table}_slow();"
    ))
    .unwrap();
    let handle = waits_and_releases(waiter, &name, Duration::from_secs(20));
    let waiting = if function {
        "%_wait_grant_hist_v%"
    } else {
        "%SELECT pg_advisory_lock(%"
    };
    assert!(eventually(Duration::from_secs(10), || {
        a_statement_waits_on_lock(waiting)
    }));
    // The holder's session ends; its lease stays live for a while yet.
    end_holder_session(&mut db, &table, &name);
    let t2 = handle.join().unwrap();
    assert!(t2 > t1);
    drop(held);
    let tries: i32 = db
        .query_one(&format!("SELECT n FROM {table}_tries"), &[])
        .unwrap()
        .get(0);
    assert!(tries <= 4, "{tries} grants tried");
    let got = kinds(&holder, &name);
    assert_eq!(
        &got[..got.len().min(4)],
        &[
            (LeaseEventKind::Released, t2),
            (LeaseEventKind::Granted, t2),
            (LeaseEventKind::Expired, t1),
            (LeaseEventKind::Granted, t1),
        ],
        "{got:?}"
    );
    drop(holder);
    db.batch_execute(&format!(
        "DROP FUNCTION {table}_slow() CASCADE; DROP TABLE {table}_tries"
    ))
    .unwrap();
    drop_tables(&table);
}
