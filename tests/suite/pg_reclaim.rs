//! Per-name state is reclaimed: a row whose lease ended (released, or expired with
//! its holder's session gone) more than the retention ago is deleted by the
//! release of one grant in every [`EVERY`] of a client, at most [`BATCH`] rows at
//! a time from the next window of a sweep over the table (off the grant's own
//! path, with no index that would keep a name's updates from being HOT), and a
//! reclaimed name's tokens still never repeat or go back (names without a row
//! draw from a store-wide sequence).

use crate::common;

use common::*;
use lockbox::LockClient;

/// One release in this many grants of a client reclaims (`sql::RECLAIM_EVERY`).
const EVERY: usize = 16;
/// The most rows one release reclaims (`sql::RECLAIM_BATCH`).
const BATCH: i64 = 32;

struct Table(String);

impl Table {
    fn new() -> Table {
        Table(format!("{}_leases", unique("reclaim").replace('-', "_")))
    }

    fn client(&self) -> LockClient {
        self.client_recording(false)
    }

    fn client_recording(&self, history: bool) -> LockClient {
        LockClient::builder(database_url())
            .table(&self.0)
            .ttl(ms(1000))
            .history(history)
            .build()
            .unwrap()
    }

    fn rows(&self, names: &[&String]) -> i64 {
        let names: Vec<&str> = names.iter().map(|n| n.as_str()).collect();
        admin()
            .query_one(
                &format!("SELECT count(*) FROM {} WHERE name = ANY($1)", self.0),
                &[&names],
            )
            .unwrap()
            .get(0)
    }

    /// Ends the session holding `name`'s lease, as its process's crash would.
    fn end_holder_session(&self, name: &str) {
        let pid: i32 = admin()
            .query_one(
                &format!("SELECT holder_pid FROM {} WHERE name = $1", self.0),
                &[&name],
            )
            .unwrap()
            .get(0);
        terminate(pid);
    }

    /// Moves the lease of `name` two hours into the past, as if it had ended then.
    fn age(&self, name: &str) {
        admin()
            .execute(
                &format!(
                    "UPDATE {} SET acquired_at = acquired_at - interval '2 hours', \
                         renewed_at = renewed_at - interval '2 hours', \
                         expires_at = expires_at - interval '2 hours', \
                         released_at = released_at - interval '2 hours' WHERE name = $1",
                    self.0
                ),
                &[&name],
            )
            .unwrap();
    }
}

/// Enough grants and releases of fresh names by `client` that one release
/// reclaims.
fn reclaiming_release(client: &LockClient) {
    fresh_cycles(client, EVERY);
}

impl Drop for Table {
    fn drop(&mut self) {
        let _ = admin().batch_execute(&format!(
            "DROP TABLE IF EXISTS {0}, {0}_history CASCADE",
            self.0
        ));
    }
}

#[test]
fn released_names_are_reclaimed_boundedly_and_tokens_never_go_back() {
    let table = Table::new();
    let client = table.client();
    // More old rows than one release reclaims.
    let names: Vec<String> = (0..40).map(|i| unique(&format!("old{i}"))).collect();
    let mut tokens = Vec::new();
    for name in &names {
        // Several grants each, so that per-name counters run ahead.
        for _ in 0..3 {
            let lock = client.try_lock(name).unwrap().unwrap();
            tokens.push((name.clone(), lock.fencing_token()));
            lock.release().unwrap();
        }
    }
    for name in &names {
        table.age(name);
    }
    let all: Vec<&String> = names.iter().collect();
    assert_eq!(table.rows(&all), 40);

    // Fresh names, one cycle at a time: rows go in steps of at most BATCH, one
    // step within every EVERY cycles, until none is left.
    let mut left = 40;
    let mut since_step = 0;
    for _ in 0..3 * EVERY {
        fresh_cycles(&client, 1);
        let now = table.rows(&all);
        assert!(
            left - now <= BATCH,
            "one release reclaimed {} rows",
            left - now
        );
        since_step = if now < left { 0 } else { since_step + 1 };
        assert!(since_step < EVERY, "{EVERY} cycles reclaimed nothing");
        left = now;
        if left == 0 {
            break;
        }
    }
    assert_eq!(left, 0, "every old row was reclaimed");

    // Reclaimed names start again above every token they were ever given.
    for name in &names {
        let before = tokens
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, t)| *t)
            .max()
            .unwrap();
        let lock = client.try_lock(name).unwrap().unwrap();
        assert!(
            lock.fencing_token() > before,
            "{name}: token {} after {before}",
            lock.fencing_token()
        );
        lock.release().unwrap();
    }
}

/// An expired lease is reclaimed only once its holder's session is gone: a
/// zombie's (live session, expired lease) is kept, so that it is still found
/// and terminated by the next waiter.
#[test]
fn expired_leases_are_reclaimed_only_when_their_holder_is_gone() {
    let table = Table::new();
    let client = table.client();
    let (dead_name, zombie_name) = (unique("dead"), unique("zombie"));
    let dead_client = table.client();
    let zombie_client = table.client();
    let dead = dead_client.try_lock(&dead_name).unwrap().unwrap();
    let zombie = zombie_client.try_lock(&zombie_name).unwrap().unwrap();
    // The dead holder's session ends; the zombie's stays, holding its key.
    dead_client.__pause_renewals(true);
    zombie_client.__pause_renewals(true);
    table.end_holder_session(&dead_name);
    table.age(&dead_name);
    table.age(&zombie_name);

    reclaiming_release(&client);
    assert_eq!(
        table.rows(&[&dead_name]),
        0,
        "the dead holder's row was reclaimed"
    );
    assert_eq!(table.rows(&[&zombie_name]), 1, "the zombie's row must stay");
    let taken = client
        .try_lock(&zombie_name)
        .unwrap()
        .expect("the zombie is still found and taken over");
    assert_eq!(taken.fencing_token(), zombie.fencing_token() + 1);
    taken.release().unwrap();
    drop((dead, zombie));
}

/// With the lease history, an expired lease whose holder is gone, deleted by
/// reclaiming, is recorded as expired (as a grant taking it over would record
/// it): its grant does not stay without an end. A released one adds nothing.
#[test]
fn a_reclaimed_expired_lease_is_recorded_in_the_history() {
    let table = Table::new();
    let client = table.client_recording(true);
    let (dead_name, released_name) = (unique("dead"), unique("released"));
    let dead_client = table.client_recording(true);
    let dead = dead_client.try_lock(&dead_name).unwrap().unwrap();
    dead_client.__pause_renewals(true);
    client
        .try_lock(&released_name)
        .unwrap()
        .unwrap()
        .release()
        .unwrap();
    table.end_holder_session(&dead_name);
    table.age(&dead_name);
    table.age(&released_name);
    reclaiming_release(&client);
    assert_eq!(
        table.rows(&[&dead_name, &released_name]),
        0,
        "both reclaimed"
    );
    let events = |name: &str| -> Vec<(lockbox::LeaseEventKind, u64)> {
        client
            .history(name, 10)
            .unwrap()
            .into_iter()
            .map(|e| (e.kind, e.fencing_token))
            .collect()
    };
    let token = dead.fencing_token();
    assert_eq!(
        events(&dead_name),
        [
            (lockbox::LeaseEventKind::Expired, token),
            (lockbox::LeaseEventKind::Granted, token),
        ]
    );
    assert_eq!(
        events(&released_name)
            .iter()
            .map(|e| e.0)
            .collect::<Vec<_>>(),
        [
            lockbox::LeaseEventKind::Released,
            lockbox::LeaseEventKind::Granted
        ]
    );
    drop(dead);
}

/// A table of lockbox 0.1 (per-name tokens, no sequence) is upgraded at build:
/// the sequence starts above every token issued, so reclaiming never lets one
/// repeat.
#[test]
fn an_old_table_is_upgraded_above_its_highest_token() {
    let table = Table::new();
    admin()
        .batch_execute(&format!(
            "CREATE TABLE {t} (name text PRIMARY KEY, owner text NOT NULL, \
                 token bigint NOT NULL CHECK (token > 0), holder_pid integer NOT NULL, \
                 holder_started timestamptz NOT NULL, metadata text, \
                 acquired_at timestamptz NOT NULL, renewed_at timestamptz NOT NULL, \
                 expires_at timestamptz NOT NULL, released_at timestamptz); \
             INSERT INTO {t} VALUES ('old-high', 'x', 1000, 1, now(), NULL, now(), now(), now(), now())",
            t = table.0
        ))
        .unwrap();
    let client = table.client();
    table.age("old-high");
    let fresh = client.try_lock(&unique("fresh")).unwrap().unwrap();
    assert!(
        fresh.fencing_token() > 1000,
        "token {}",
        fresh.fencing_token()
    );
    fresh.release().unwrap();
    let again = client.try_lock("old-high").unwrap().unwrap();
    assert!(
        again.fencing_token() > 1000,
        "token {}",
        again.fencing_token()
    );
    again.release().unwrap();
}

/// The lease table has no index on a lease's end (reclaiming sweeps the
/// table instead), so grants and releases of a name update its row in place
/// (HOT): no new index entry and no dead version a vacuum must remove. With
/// the index there was, none was (measured: hand-offs 10–15 % slower).
#[test]
fn a_names_grants_and_releases_are_hot_updates() {
    let table = Table::new();
    let client = table.client();
    let name = unique("hot");
    let stats = || -> (i64, i64) {
        let row = admin()
            .query_one(
                "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables \
                 WHERE relid = $1::text::regclass",
                &[&table.0],
            )
            .unwrap();
        (row.get(0), row.get(1))
    };
    // A session reports its counts at most once a second: cycle until the
    // reported ones are many.
    assert!(
        eventually(ms(30_000), || {
            for _ in 0..20 {
                client.try_lock(&name).unwrap().unwrap().release().unwrap();
            }
            stats().0 >= 200
        }),
        "no counts reported: {:?}",
        stats()
    );
    let (updates, hot) = stats();
    assert!(
        hot * 10 >= updates * 9,
        "{hot} of {updates} updates of the lease table were HOT"
    );
}

/// Reclaiming sweeps the whole table, a window of pages per reclaiming
/// release, around and around: old rows far past the first window are
/// reclaimed too, at most `BATCH` at a time.
#[test]
fn reclaiming_sweeps_a_table_larger_than_its_window() {
    sweeps_the_whole_table(false);
}

/// The same on a partitioned lease table, whose own size is 0: the sweep
/// goes as far as its largest partition.
#[test]
fn reclaiming_sweeps_a_partitioned_table() {
    sweeps_the_whole_table(true);
}

/// Clients that each reclaim once only (a process making a few dozen
/// grants) start their sweeps at random pages: between them they reach old
/// rows anywhere in the table, not only in its first window.
#[test]
fn short_lived_clients_reclaim_past_the_first_window() {
    let table = Table::new();
    drop(table.client());
    // About 12 pages: past the first window, not far.
    let old = fill_with_old_rows(&table, 700);
    let mut left = old();
    // A few hundred at most, as simulated: each reclaims at most 32 rows,
    // from the first pages of its window, and the table grows by the rows
    // of their own grants meanwhile.
    for _ in 0..2000 {
        reclaiming_release(&table.client());
        left = old();
        if left == 0 {
            break;
        }
    }
    assert_eq!(left, 0, "old rows were left behind");
}

/// `rows` rows released three hours ago (about 60 a page); returns how many
/// are left.
fn fill_with_old_rows(table: &Table, rows: i32) -> impl Fn() -> i64 + '_ {
    admin()
        .batch_execute(&format!(
            "INSERT INTO {} (name, owner, holder_pid, holder_started, acquired_at, renewed_at, \
                 expires_at, released_at) \
             SELECT 'sweep-' || g, 'gone', 0, now(), now() - interval '3 hours', \
                 now() - interval '3 hours', now() - interval '3 hours', now() - interval '3 hours' \
             FROM generate_series(1, {rows}) g",
            table.0
        ))
        .unwrap();
    move || {
        admin()
            .query_one(
                &format!("SELECT count(*) FROM {} WHERE name LIKE 'sweep-%'", table.0),
                &[],
            )
            .unwrap()
            .get(0)
    }
}

fn sweeps_the_whole_table(partitioned: bool) {
    let table = Table::new();
    if partitioned {
        admin()
            .batch_execute(&partitioned_lease_table(&table.0, false))
            .unwrap();
    }
    let client = table.client();
    // About 25 pages.
    let old = fill_with_old_rows(&table, 1500);
    let pages: i64 = admin()
        .query_one(
            &format!(
                "SELECT GREATEST(pg_relation_size('{0}'), \
                     (SELECT max(pg_relation_size(relid)) FROM pg_partition_tree('{0}'))) / 8192",
                table.0
            ),
            &[],
        )
        .unwrap()
        .get(0);
    assert!(pages > 16, "only {pages} pages");
    let mut left = old();
    // Enough reclaiming releases to sweep the table ten times over.
    for _ in 0..10 * pages {
        reclaiming_release(&client);
        let now = old();
        assert!(left - now <= BATCH, "one release reclaimed {}", left - now);
        left = now;
        if left == 0 {
            break;
        }
    }
    assert_eq!(left, 0, "old rows were left behind");
}
