//! Unlogged leases (`LockClientBuilder::unlogged_leases`): no grant, renewal or
//! release waits for a WAL flush, and every guarantee holds across what empties
//! an unlogged table: a crash (`pg_ctl stop -m immediate`), a standby's
//! promotion, or (standing in for both on the shared server) an operator
//! emptying the tables. Tokens stay above every earlier one, and no lock is
//! granted until every lease granted before would have ended.

use crate::common;

use std::thread;
use std::time::{Duration, Instant};

use common::server::Cluster;
use common::*;
use lockbox::{AcquireOptions, Error, HealthStatus, Lock, LockClient, LostReason};

/// A lease table of the test's own.
fn table() -> String {
    unique("ul").replace('-', "_") + "_leases"
}

fn connect(url: &str) -> postgres::Client {
    postgres::Client::connect(url, postgres::NoTls).expect("admin connection")
}

/// A new unlogged lease table of the test's own, with its companions (the
/// client that created them dropped).
fn created() -> String {
    let table = table();
    drop(builder_of(&table).build().unwrap());
    table
}

/// A builder for a client of the unlogged lease table `table` (created if
/// missing) on the shared server.
fn builder_of(table: &str) -> lockbox::LockClientBuilder {
    builder_for(&unique("app"))
        .table(table)
        .unlogged_leases(true)
}

/// A client of the unlogged lease table `table` on `url`.
fn unlogged(url: &str, table: &str, ttl: Duration) -> LockClient {
    LockClient::builder(url)
        .table(table)
        .ttl(ttl)
        .unlogged_leases(true)
        .build()
        .unwrap()
}

/// `(epoch, token_ceiling, lease_horizon as epoch seconds)` of `table`.
fn bounds(db: &mut postgres::Client, table: &str) -> (i64, i64, f64) {
    let row = db
        .query_one(
            &format!(
                "SELECT epoch, token_ceiling, extract(epoch FROM lease_horizon)::float8 \
                 FROM {table}_epoch WHERE id = 1"
            ),
            &[],
        )
        .unwrap();
    (row.get(0), row.get(1), row.get(2))
}

/// The lease of `name` in `table`: `(token, acquired_at, expires_at)`, times
/// as epoch seconds by the database's clock.
fn lease(db: &mut postgres::Client, table: &str, name: &str) -> (i64, f64, f64) {
    let row = db
        .query_one(
            &format!(
                "SELECT token, extract(epoch FROM acquired_at)::float8, \
                        extract(epoch FROM expires_at)::float8 FROM {table} WHERE name = $1"
            ),
            &[&name],
        )
        .unwrap();
    (row.get(0), row.get(1), row.get(2))
}

/// A lock held when its lease is about to vanish (a crash, a failover, an
/// operator), as its holder and the database saw it.
struct Vanishing {
    lock: Lock,
    /// When its grant was sent: its lease ends no earlier than this + TTL.
    sent: Instant,
    /// Its lease's end, by the database clock (epoch seconds).
    end: f64,
    epoch: i64,
}

/// Takes `name` with `holder` on `url`'s `table`, and notes the lease.
fn hold(holder: &LockClient, url: &str, table: &str, name: &str) -> Vanishing {
    let sent = Instant::now();
    let lock = holder.try_lock(name).unwrap().unwrap();
    let mut db = connect(url);
    let (epoch, _, _) = bounds(&mut db, table);
    let (_, _, end) = lease(&mut db, table, name);
    Vanishing {
        lock,
        sent,
        end,
        epoch,
    }
}

/// Acquires `name` with `client` after `old`'s lease vanished: granted no
/// earlier than the old lease's end (by the holder's clock and by the
/// database's), above its token, in one new epoch.
fn acquire_after(
    old: &Vanishing,
    client: &LockClient,
    url: &str,
    table: &str,
    name: &str,
    ttl: Duration,
) -> Lock {
    let next = client.lock_timeout(name, ttl * 4).unwrap();
    let granted = Instant::now();
    assert!(
        granted >= old.sent + ttl,
        "granted {:?} after the vanished lease's grant, before its TTL {ttl:?}",
        granted - old.sent
    );
    let mut db = connect(url);
    let (token, acquired_at, _) = lease(&mut db, table, name);
    assert!(
        acquired_at >= old.end,
        "granted at {acquired_at}, before the vanished lease's end {}",
        old.end
    );
    assert_eq!(token as u64, next.fencing_token());
    let old_token = old.lock.fencing_token();
    assert!(token as u64 > old_token, "token {token} after {old_token}");
    assert_eq!(bounds(&mut db, table).0, old.epoch + 1, "one new epoch");
    next
}

#[test]
fn the_table_and_its_companions_are_created_as_they_must_be() {
    let table = table();
    let client = builder_of(&table).build().unwrap();
    let mut db = admin();
    let kinds: Vec<(String, String)> = db
        .query(
            "SELECT relname::text, relpersistence::text FROM pg_class \
             WHERE relname IN ($1, $2, $3, $4) ORDER BY relname",
            &[
                &table,
                &format!("{table}_epoch"),
                &format!("{table}_alive"),
                &format!("{table}_token_seq"),
            ],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        kinds,
        vec![
            (table.clone(), "u".to_owned()),
            (format!("{table}_alive"), "u".to_owned()),
            (format!("{table}_epoch"), "p".to_owned()),
            (format!("{table}_token_seq"), "u".to_owned()),
        ]
    );
    let held = client.try_lock(&unique("first")).unwrap().unwrap();
    // The first grant found the table without its row and began epoch 1.
    assert_eq!(bounds(&mut db, &table).0, 1);
    assert!(held.fencing_token() as i64 <= bounds(&mut db, &table).1);
    held.release().unwrap();
}

#[test]
fn readers_and_semaphores_are_refused_on_an_unlogged_table() {
    let client = builder_for(&unique("app"))
        .table(&table())
        .unlogged_leases(true)
        .build()
        .unwrap();
    let err = client
        .rwlock(&unique("rw"))
        .and_then(|rw| rw.try_read().map(|_| ()))
        .unwrap_err();
    assert!(
        matches!(&err, Error::Unsupported(m) if m.contains("unlogged: true")),
        "{err:?}"
    );
    let err = client
        .semaphore(&unique("sem"), 2)
        .and_then(|s| s.try_acquire().map(|_| ()))
        .unwrap_err();
    assert!(matches!(err, Error::Unsupported(_)), "{err:?}");
}

#[test]
fn a_logged_table_is_never_converted() {
    let table = table();
    drop(builder_for(&unique("app")).table(&table).build().unwrap());
    let err = builder_for(&unique("app"))
        .table(&table)
        .unlogged_leases(true)
        .build()
        .unwrap_err();
    assert!(
        matches!(&err, Error::InvalidConfig(m) if m.contains("SET UNLOGGED")),
        "{err:?}"
    );
}

/// A logged table converted by hand (its clients stopped, a lease of theirs
/// left to expire): the bounds start above its tokens and its live lease.
#[test]
fn a_converted_table_starts_its_bounds_above_what_it_holds() {
    let table = table();
    let old = builder_for(&unique("app")).table(&table).build().unwrap();
    let name = unique("left");
    for _ in 0..3 {
        old.try_lock(&name).unwrap().unwrap().release().unwrap();
    }
    drop(old);
    let mut db = admin();
    // Its last holder stopped without releasing: the lease stays until it
    // expires, a minute from now.
    db.execute(
        &format!(
            "UPDATE {table} SET released_at = NULL, \
                 expires_at = clock_timestamp() + interval '1 minute' WHERE name = $1"
        ),
        &[&name],
    )
    .unwrap();
    let (token, _, end) = lease(&mut db, &table, &name);
    db.batch_execute(&format!("ALTER TABLE {table} SET UNLOGGED"))
        .unwrap();
    drop(builder_of(&table).build().unwrap());
    let (epoch, ceiling, horizon) = bounds(&mut db, &table);
    assert_eq!(epoch, 0);
    assert!(ceiling >= token, "ceiling {ceiling} below token {token}");
    assert!(
        horizon >= end,
        "horizon {horizon} before the live lease's end {end}"
    );
}

#[test]
fn a_companion_of_the_wrong_kind_is_refused() {
    let table = created();
    let mut db = admin();
    // A logged "alive" table would survive a crash that empties the leases.
    db.batch_execute(&format!("ALTER TABLE {table}_alive SET LOGGED"))
        .unwrap();
    let err = builder_for(&unique("app"))
        .table(&table)
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("must be unlogged"), "{err}");
    db.batch_execute(&format!(
        "ALTER TABLE {table}_alive SET UNLOGGED; DELETE FROM {table}_epoch"
    ))
    .unwrap();
    let err = builder_for(&unique("app"))
        .table(&table)
        .create_table(false)
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("row (id 1) is missing"), "{err}");
}

/// Every token granted is at most the ceiling and every lease end (granted
/// or renewed to) at most the horizon, at every moment, while a lease is
/// renewed past the horizon its grant set, on a session of its own or on a
/// shared one (each renews with a statement of its own), and other leases
/// come and go. One lease per table: a raise by one renewal would cover the
/// other's lease end.
fn bounds_hold(dedicated: bool) {
    let table = table();
    let ttl = ms(600);
    let client = builder_of(&table).ttl(ttl).build().unwrap();
    // Advisory keys are per database, not per table: a name of its own.
    let held = client
        .acquire(
            &unique("held"),
            &AcquireOptions::new().dedicated_session(dedicated),
        )
        .unwrap()
        .unwrap();
    let mut db = admin();
    let check = format!(
        "SELECT bool_and(l.token <= e.token_ceiling AND l.expires_at <= e.lease_horizon), \
                max(extract(epoch FROM l.expires_at))::float8 \
         FROM {table} l, {table}_epoch e WHERE e.id = 1 AND l.released_at IS NULL"
    );
    let start = Instant::now();
    let mut samples = 0;
    let mut latest_end = 0.0f64;
    let mut after_churn = None;
    while start.elapsed() < ttl * 6 {
        // Grants for the first TTL only: each raises the horizon it passes,
        // which would cover the renewals' lease ends too.
        let churn =
            (start.elapsed() < ttl).then(|| client.try_lock(&unique("churn")).unwrap().unwrap());
        if churn.is_none() && after_churn.is_none() {
            after_churn = Some(bounds(&mut db, &table).2);
        }
        let row = db.query_one(&check, &[]).unwrap();
        let covered: Option<bool> = row.get(0);
        assert_eq!(covered, Some(true), "a lease or token beyond the bounds");
        latest_end = latest_end.max(row.get::<_, Option<f64>>(1).unwrap_or(0.0));
        samples += 1;
        if let Some(g) = churn {
            g.release().unwrap();
        }
        thread::sleep(ms(10));
    }
    assert!(samples > 20, "{samples} samples");
    let first_horizon = after_churn.expect("a sample after the grants");
    // The renewals went past where the grants had put the horizon: they
    // raised it.
    assert!(
        latest_end > first_horizon,
        "lease ends up to {latest_end}, horizon {first_horizon}: renewals never passed the \
         horizon the grants left"
    );
    assert!(held.is_held());
    held.release().unwrap();
}

#[test]
fn the_bounds_cover_every_lease_end_renewed_on_a_shared_session() {
    bounds_hold(false);
}

#[test]
fn the_bounds_cover_every_lease_end_renewed_on_a_session_of_its_own() {
    bounds_hold(true);
}

/// A client of `table` whose pool has one session, which has seen the
/// bounds (its first grant raised them).
fn one_session(table: &str, ttl: Duration) -> LockClient {
    let client = builder_of(table).ttl(ttl).pool_size(1).build().unwrap();
    warm(&client);
    client
}

/// The epoch row's version (`xmin`, `ctid`) and its longest TTL (ms).
fn epoch_version(db: &mut postgres::Client, table: &str) -> (String, i64) {
    let row = db
        .query_one(
            &format!("SELECT xmin::text || ctid::text, max_ttl_ms FROM {table}_epoch WHERE id = 1"),
            &[],
        )
        .unwrap();
    (row.get(0), row.get(1))
}

/// A try within the bounds its session last saw writes nothing to the epoch
/// row (so, on an unlogged table, nothing durable: no WAL flush); one that
/// would pass them (a longer TTL) raises them before it is granted, and is
/// covered. On a session of its own and on a shared one (a lock already
/// holds the pool's one connection, so the tries share it). Before the
/// raise moved out of the try's statement, every try wrote the epoch table
/// in its plan: with that table locked, the tries here said not acquired
/// (seen failing so).
fn raises_only_past_the_bounds(shared: bool) {
    let table = table();
    let client = builder_of(&table).pool_size(1).build().unwrap();
    let held = shared.then(|| {
        client
            .acquire(
                &unique("held"),
                &AcquireOptions::new().dedicated_session(false),
            )
            .unwrap()
            .unwrap()
    });
    let opts = AcquireOptions::new().dedicated_session(!shared);
    // The session's first grant raises (it has seen no bounds yet).
    client
        .acquire(&unique("first"), &opts)
        .unwrap()
        .unwrap()
        .release()
        .unwrap();
    let mut db = admin();
    let before = epoch_version(&mut db, &table);
    // An operator's transaction locks the epoch table against writes: a
    // grant with the epoch table in its plan would wait for it (and a try
    // then say not acquired); these have no need of it.
    let mut locker = admin();
    let mut operator = locker.transaction().unwrap();
    operator
        .batch_execute(&format!("LOCK TABLE {table}_epoch IN EXCLUSIVE MODE"))
        .unwrap();
    let mut tokens = Vec::new();
    for i in 0..20 {
        let g = client
            .acquire(&unique("within"), &opts)
            .unwrap()
            .unwrap_or_else(|| panic!("try {i} not granted while the epoch table was locked"));
        tokens.push(g.fencing_token());
        g.release().unwrap();
    }
    operator.commit().unwrap();
    assert_eq!(
        epoch_version(&mut db, &table),
        before,
        "a grant within the bounds its session saw wrote the epoch row"
    );
    let (_, ceiling, _) = bounds(&mut db, &table);
    assert!(
        tokens.iter().all(|&t| t as i64 <= ceiling),
        "{tokens:?} above {ceiling}"
    );
    // A TTL longer than any granted before passes the bounds.
    let name = unique("longer");
    let long = client
        .acquire(&name, &opts.clone().ttl(Duration::from_secs(120)))
        .unwrap()
        .unwrap();
    let after = epoch_version(&mut db, &table);
    assert_ne!(after.0, before.0, "a grant past the bounds raised nothing");
    assert_eq!(after.1, 120_000);
    let (_, ceiling, horizon) = bounds(&mut db, &table);
    let (token, _, end) = lease(&mut db, &table, &name);
    assert!(
        token <= ceiling && end <= horizon,
        "lease ({token}, {end}) beyond ({ceiling}, {horizon})"
    );
    long.release().unwrap();
    if let Some(held) = held {
        held.release().unwrap();
    }
}

#[test]
fn a_try_raises_the_bounds_only_past_what_its_session_saw() {
    raises_only_past_the_bounds(false);
}

#[test]
fn a_try_on_a_shared_session_raises_the_bounds_only_past_what_it_saw() {
    raises_only_past_the_bounds(true);
}

/// An operator lowers the epoch row by hand while a client runs (a review
/// of 56e1d75: its sessions' tries went on granting within the bounds they
/// had seen, above the row, for as long as those lasted — a TTL and more —
/// and a crash then repeated a token and ended the lock-delay early). What a
/// session saw is trusted for `FRESH_FOR` only: within a few seconds a try
/// raises the row again, and its grant is covered. Seen failing before.
#[test]
fn a_lowered_epoch_row_is_raised_again_by_the_next_tries() {
    let table = table();
    let client = one_session(&table, Duration::from_secs(30));
    let mut db = admin();
    db.batch_execute(&format!(
        "UPDATE {table}_epoch SET token_ceiling = (SELECT max(token) FROM {table}), \
             lease_horizon = clock_timestamp(), max_ttl_ms = 0"
    ))
    .unwrap();
    let covered = eventually(Duration::from_secs(10), || {
        let name = unique("after");
        let g = client.try_lock(&name).unwrap().unwrap();
        let (token, _, end) = lease(&mut db, &table, &name);
        let (_, ceiling, horizon) = bounds(&mut db, &table);
        let (_, max_ttl) = epoch_version(&mut db, &table);
        g.release().unwrap();
        token <= ceiling && end <= horizon && max_ttl >= 30_000
    });
    assert!(covered, "no try raised the lowered epoch row again");
}

/// `vandalism` done to `<table>_epoch` under a running client: its tries
/// stop granting within a few seconds (they fail with an error that says
/// `expected`), rather than for as long as the bounds they had seen lasted.
fn tries_stop_granting_after(vandalism: &str, expected: &str) {
    let table = table();
    let client = one_session(&table, Duration::from_secs(30));
    admin()
        .batch_execute(&vandalism.replace("{epoch}", &format!("{table}_epoch")))
        .unwrap();
    let refused = eventually(Duration::from_secs(10), || {
        match client.try_lock(&unique("after")) {
            Ok(Some(g)) => {
                g.release().unwrap();
                false
            }
            Ok(None) => false,
            Err(e) => {
                assert!(e.to_string().contains(expected), "{e}");
                true
            }
        }
    });
    assert!(refused, "tries went on granting after {vandalism}");
}

/// The epoch table dropped. Seen failing before a57d739 (granted for the
/// whole 10 s).
#[test]
fn tries_stop_granting_once_the_epoch_table_is_dropped() {
    tries_stop_granting_after("DROP TABLE {epoch}", "42P01");
}

/// The epoch row deleted: a grant that must raise finds nothing to raise,
/// and refuses as recovery does (a review of a57d739: every grant went on,
/// covered by nothing, before and since the bounds were kept per session).
#[test]
fn tries_stop_granting_once_the_epoch_row_is_deleted() {
    tries_stop_granting_after("DELETE FROM {epoch}", "is missing");
}

/// The epoch row deleted while a waiter waits in the wait-and-grant
/// function: handed the lock, it is refused as tries are, not granted a
/// lease no bound covers. Seen failing before: granted.
#[test]
fn a_waiter_is_refused_once_the_epoch_row_is_deleted() {
    let table = table();
    let ttl = Duration::from_secs(30);
    let (holder, waiter) = (one_session(&table, ttl), one_session(&table, ttl));
    let name = unique("waited");
    let held = holder.try_lock(&name).unwrap().expect("a free name");
    // Found held: the waiter's next blocking acquire waits in the function.
    assert!(waiter.try_lock(&name).unwrap().is_none());
    let waiting = {
        let name = name.clone();
        thread::spawn(move || {
            waiter
                .lock_timeout(&name, Duration::from_secs(20))
                .map(drop)
        })
    };
    let function = format!("%{table}_wait_grant_ul_v4%");
    assert!(
        eventually(Duration::from_secs(5), || a_statement_waits_on_lock(
            &function
        )),
        "the waiter waits in the wait-and-grant function"
    );
    admin()
        .batch_execute(&format!("DELETE FROM {table}_epoch"))
        .unwrap();
    held.release().unwrap();
    let err = waiting
        .join()
        .unwrap()
        .expect_err("a waiter granted with the epoch row missing");
    assert!(err.to_string().contains("is missing"), "{err}");
}

/// On the shared server an operator empties the unlogged tables (what a
/// crash does to them, sequence included). A client built without the
/// setting follows the table: it starts a new epoch, grants nothing until
/// the emptied lease would have ended (a `try_lock` says not acquired, health
/// says why), then grants above every earlier token.
#[test]
fn an_emptied_table_starts_a_new_epoch_and_waits_out_the_old_leases() {
    let table = table();
    let ttl = ms(1500);
    let holder = builder_of(&table).ttl(ttl).build().unwrap();
    let other = builder_for(&unique("app"))
        .table(&table)
        .ttl(ttl)
        .build()
        .unwrap();
    let name = &unique("emptied");
    // Some tokens first, so that a sequence back at its start would repeat one.
    for _ in 0..3 {
        holder.try_lock(name).unwrap().unwrap().release().unwrap();
    }
    let old = hold(&holder, database_url(), &table, name);
    let mut db = admin();
    db.batch_execute(&format!(
        "BEGIN; DELETE FROM {table}_alive; DELETE FROM {table}; \
         SELECT setval(pg_get_serial_sequence('{table}', 'token'), 1, false); COMMIT"
    ))
    .unwrap();
    // The holder learns at its next renewal that its lease is gone.
    assert_eq!(old.lock.lost().recv_timeout(ttl), Ok(LostReason::NotOwner));

    assert!(other.try_lock(name).unwrap().is_none());
    assert!(other.try_lock(&unique("another")).unwrap().is_none());
    assert_eq!(bounds(&mut db, &table).0, old.epoch + 1, "one new epoch");
    let health = other.health();
    assert_eq!(health.status, HealthStatus::Degraded, "{health:?}");
    assert!(
        health
            .database
            .warnings
            .iter()
            .any(|w| w.contains("lock-delay")),
        "{health:?}"
    );

    let next = acquire_after(&old, &other, database_url(), &table, name, ttl);
    next.release().unwrap();
}

/// A client of a new unlogged lease table of TTL `ttl` on the shared server,
/// that table, and a name granted once and released. Then, with `sql` run
/// (`{t}` the table), the table emptied as a crash would leave it.
fn emptied(ttl: Duration, sql: &str) -> (LockClient, String, String) {
    let table = table();
    let client = builder_of(&table).ttl(ttl).build().unwrap();
    let name = unique("emptied");
    client.try_lock(&name).unwrap().unwrap().release().unwrap();
    admin()
        .batch_execute(&format!(
            "{}; DELETE FROM {table}_alive",
            sql.replace("{t}", &table)
        ))
        .unwrap();
    (client, table, name)
}

/// Recovery waits for what an operator's transaction holds (`lock`, SQL;
/// `{t}` the table) no longer than the acquire may wait: a `try_lock` says
/// not acquired and a timed acquire times out, and once the transaction
/// ends the next acquire recovers and is granted.
fn recovery_is_bounded_by_the_acquires_wait(lock: &str) {
    let (client, table, name) = emptied(ms(600), "SELECT 1");
    let mut db = admin();
    let mut op = admin();
    op.batch_execute(&format!("BEGIN; {}", lock.replace("{t}", &table)))
        .unwrap();
    // Each in a thread: unbounded, it would wait for as long as the
    // operator's transaction lasts, which ends only after both answered.
    let (tx, rx) = std::sync::mpsc::channel();
    thread::scope(|s| {
        s.spawn(|| {
            let tried = client.try_lock(&name).map(|g| g.is_some());
            let timed = client.lock_timeout(&name, ms(700)).map(|_| ());
            tx.send((tried, timed)).unwrap();
        });
        let answer = rx.recv_timeout(Duration::from_secs(20));
        op.batch_execute("ROLLBACK").unwrap();
        let (tried, timed) = answer.expect("the acquires waited for the operator's transaction");
        assert!(matches!(tried, Ok(false)), "{tried:?}");
        assert!(matches!(timed, Err(Error::Timeout { .. })), "{timed:?}");
    });
    let g = client.lock_timeout(&name, ms(5000)).unwrap();
    assert_eq!(
        bounds(&mut db, &table).0,
        2,
        "recovered once, after the operator"
    );
    g.release().unwrap();
}

#[test]
fn recovery_held_up_by_an_operator_is_bounded_by_the_acquires_wait() {
    recovery_is_bounded_by_the_acquires_wait("SELECT 1 FROM {t}_epoch WHERE id = 1 FOR UPDATE");
}

/// The same with a table lock that lets grants read `_alive` but not
/// recovery write it: taken as the statement starts, before anything in it
/// could set a timeout.
#[test]
fn recovery_held_up_by_a_table_lock_is_bounded_by_the_acquires_wait() {
    recovery_is_bounded_by_the_acquires_wait("LOCK TABLE {t}_alive IN SHARE MODE");
}

/// A horizon pushed far ahead (by a grant made while the server's clock ran
/// a month ahead, say) delays grants after a crash by no more than the
/// longest TTL ever granted plus the larger of it and a second, not until
/// that far-off time.
#[test]
fn a_horizon_pushed_far_ahead_delays_grants_by_the_longest_ttl_only() {
    let (client, table, name) = emptied(
        ms(1000),
        "UPDATE {t}_epoch SET lease_horizon = clock_timestamp() + interval '30 days'",
    );
    let mut db = admin();
    let (epoch, _, _) = bounds(&mut db, &table);
    let g = client.lock_timeout(&name, ms(10_000)).unwrap();
    assert_eq!(bounds(&mut db, &table).0, epoch + 1);
    g.release().unwrap();
}

/// A token at the top of `int8` is granted; the next name then fails with a
/// typed error (the sequence never cycles), and nothing wraps or panics.
#[test]
fn tokens_at_the_top_of_int8_stop_rather_than_wrap() {
    let table = table();
    let client = builder_of(&table).build().unwrap();
    let [a, b, c] = ["a", "b", "c"].map(unique);
    client.try_lock(&a).unwrap().unwrap().release().unwrap();
    let mut db = admin();
    // Two below the top: the try takes the next value, finds it past the
    // ceiling its session saw and is undone (a sequence does not roll
    // back); the raising grant then takes the top.
    db.batch_execute(&format!(
        "SELECT setval(pg_get_serial_sequence('{table}', 'token'), {})",
        i64::MAX - 2
    ))
    .unwrap();
    let top = client.try_lock(&b).unwrap().unwrap();
    assert_eq!(top.fencing_token(), i64::MAX as u64);
    assert_eq!(
        bounds(&mut db, &table).1,
        i64::MAX,
        "the ceiling at the top too"
    );
    let err = client.try_lock(&c).unwrap_err();
    assert!(matches!(err, Error::Database(_)), "{err:?}");
    assert!(err.to_string().contains("2200H"), "{err}");
    top.release().unwrap();
}

/// A crash with a lock held: the holder is told, nothing is granted before its
/// lease would have ended, and the next token is above it. A clean restart
/// keeps the leases and starts no epoch.
#[test]
fn a_crash_with_a_lock_held() {
    let cluster = Cluster::start().expect("throwaway cluster");
    let table = "crash_leases";
    let ttl = ms(3000);
    let (holder, other) = (
        unlogged(&cluster.url, table, ttl),
        unlogged(&cluster.url, table, ttl),
    );
    let name = "crash";
    let old = hold(&holder, &cluster.url, table, name);

    cluster.stop_server("immediate").unwrap();
    cluster.start_server().unwrap();
    assert_eq!(
        old.lock.lost().recv_timeout(ttl),
        Ok(LostReason::SessionLost)
    );
    let next = acquire_after(&old, &other, &cluster.url, table, name, ttl);

    // A clean restart: the unlogged tables are kept, so is the epoch; the
    // lease outlives its session and is waited out as on a logged table.
    cluster.stop_server("fast").unwrap();
    cluster.start_server().unwrap();
    assert_eq!(next.lost().recv_timeout(ttl), Ok(LostReason::SessionLost));
    let after = holder.lock_timeout(name, ttl * 4).unwrap();
    assert!(after.fencing_token() > next.fencing_token());
    let mut db = connect(&cluster.url);
    assert_eq!(bounds(&mut db, table).0, old.epoch + 1, "no new epoch");
    after.release().unwrap();
}

/// Tokens that pass the ceiling raise it durably in their own grant, on both
/// of the grant's paths (a name with a row takes its token + 1; a new name
/// the sequence's next): a crash right after still leaves every later token
/// above them.
#[test]
fn tokens_past_the_ceiling_stay_below_every_later_one_after_a_crash() {
    let cluster = Cluster::start().expect("throwaway cluster");
    let table = "ceiling_leases";
    let client = || unlogged(&cluster.url, table, ms(500));
    let before = client();
    let mut db = connect(&cluster.url);
    before.try_lock("row").unwrap().unwrap().release().unwrap();
    let (_, ceiling, _) = bounds(&mut db, table);
    // The row's token at the ceiling: its next grant takes ceiling + 1.
    db.execute(
        &format!("UPDATE {table} SET token = $1 WHERE name = 'row'"),
        &[&ceiling],
    )
    .unwrap();
    let by_row = before.try_lock("row").unwrap().unwrap();
    assert_eq!(by_row.fencing_token() as i64, ceiling + 1);
    by_row.release().unwrap();
    let (_, raised, _) = bounds(&mut db, table);
    assert!(raised > ceiling + 1);
    // The sequence at the new ceiling: a new name takes ceiling + 1.
    db.execute(
        &format!("SELECT setval(pg_get_serial_sequence('{table}', 'token'), $1)"),
        &[&raised],
    )
    .unwrap();
    let by_seq = before.try_lock("new").unwrap().unwrap();
    let highest = by_seq.fencing_token();
    // raised + 2: the try took raised + 1, past the ceiling its session saw,
    // and was undone; the raising grant took the next.
    assert!(highest as i64 > raised, "{highest} after {raised}");
    drop(db);

    cluster.stop_server("immediate").unwrap();
    cluster.start_server().unwrap();
    let after = client();
    // The crashed lease ends within its TTL; both paths then grant above it.
    for name in ["row", "new", "fresh"] {
        let g = after.lock_timeout(name, ms(5000)).unwrap();
        assert!(
            g.fencing_token() > highest,
            "{name}: token {} after {highest}",
            g.fencing_token()
        );
        g.release().unwrap();
    }
}

/// A failover: the standby has the durable bounds (replicated) but no
/// leases. Once promoted, it grants nothing before the old primary's lease
/// would have ended, and only above its token.
#[test]
fn a_promoted_standby_waits_out_the_old_primarys_leases() {
    let primary = Cluster::start().expect("primary");
    let table = "failover_leases";
    let ttl = ms(3000);
    let on = |url: &str| unlogged(url, table, ttl);
    let holder = on(&primary.url);
    // A grant before the standby exists, so its copy has the bounds.
    holder.try_lock("warm").unwrap().unwrap().release().unwrap();
    let standby = Cluster::standby_of(&primary).expect("standby");
    let old = hold(&holder, &primary.url, table, "failover");
    let wanted = bounds(&mut connect(&primary.url), table);
    // The standby has replayed the bounds as the primary has them (a
    // synchronous standby would have them before the grant returned).
    let mut sdb = connect(&standby.url);
    assert!(eventually(Duration::from_secs(10), || bounds(
        &mut sdb, table
    ) == wanted));
    drop(sdb);

    primary.stop_server("immediate").unwrap();
    standby.promote().unwrap();
    let next = acquire_after(
        &old,
        &on(&standby.url),
        &standby.url,
        table,
        "failover",
        ttl,
    );
    assert_eq!(wanted.0, old.epoch);
    assert!(!old.lock.is_held() || old.lock.lost().recv_timeout(ttl).is_ok());
    next.release().unwrap();
}

/// What only recovery after a crash touches is checked at build: a
/// companion it could not use, or that could lose a raise of the bounds, is
/// refused with the reason. Each change is made to a working pair of
/// companions, refused, and undone.
#[test]
fn a_companion_recovery_could_not_use_is_refused_at_build() {
    let table = created();
    let mut db = admin();
    let cases = [
        // A logged child of `_alive` keeps its row through a crash.
        (
            "CREATE TABLE {t}_alive_kid () INHERITS ({t}_alive)",
            "DROP TABLE {t}_alive_kid",
            "child tables",
        ),
        // Recovery's ON CONFLICT (id) needs the unique index.
        (
            "ALTER TABLE {t}_alive DROP CONSTRAINT {t}_alive_pkey",
            "ALTER TABLE {t}_alive ADD PRIMARY KEY (id)",
            "unique, non-deferrable index on id",
        ),
        (
            "ALTER TABLE {t}_alive DROP CONSTRAINT {t}_alive_pkey; \
             ALTER TABLE {t}_alive ADD PRIMARY KEY (id) DEFERRABLE",
            "ALTER TABLE {t}_alive DROP CONSTRAINT {t}_alive_pkey; \
             ALTER TABLE {t}_alive ADD PRIMARY KEY (id)",
            "unique, non-deferrable index on id",
        ),
        // Two rows of id 1 in `_epoch`: recovery could set the sequence
        // from the lower ceiling.
        (
            "ALTER TABLE {t}_epoch DROP CONSTRAINT {t}_epoch_pkey; \
             INSERT INTO {t}_epoch SELECT 1, epoch, 1, lease_horizon, 0, NULL FROM {t}_epoch",
            "DELETE FROM {t}_epoch WHERE token_ceiling = 1; \
             ALTER TABLE {t}_epoch ADD PRIMARY KEY (id)",
            "unique, non-deferrable index on id",
        ),
        // Recovery's writes would fail: a column it does not write (required,
        // with a default that fails, of a domain that refuses NULL), or one
        // of its own made identity or generated.
        (
            "ALTER TABLE {t}_alive ADD COLUMN note text NOT NULL",
            "ALTER TABLE {t}_alive DROP COLUMN note",
            "not lockbox's plain columns",
        ),
        (
            "ALTER TABLE {t}_alive ADD COLUMN note int; \
             ALTER TABLE {t}_alive ALTER COLUMN note SET DEFAULT (1 / 0)",
            "ALTER TABLE {t}_alive DROP COLUMN note",
            "not lockbox's plain columns",
        ),
        (
            "CREATE DOMAIN {t}_d AS int CHECK (VALUE IS NOT NULL); \
             ALTER TABLE {t}_alive ADD COLUMN note {t}_d",
            "ALTER TABLE {t}_alive DROP COLUMN note; DROP DOMAIN {t}_d",
            "not lockbox's plain columns",
        ),
        (
            "ALTER TABLE {t}_epoch ADD COLUMN g bigint GENERATED ALWAYS AS (1 / (3 - epoch)) STORED",
            "ALTER TABLE {t}_epoch DROP COLUMN g",
            "not lockbox's plain columns",
        ),
        (
            "ALTER TABLE {t}_epoch ALTER COLUMN epoch ADD GENERATED ALWAYS AS IDENTITY",
            "ALTER TABLE {t}_epoch ALTER COLUMN epoch DROP IDENTITY",
            "not lockbox's plain columns",
        ),
        (
            "ALTER TABLE {t}_alive ALTER COLUMN epoch ADD GENERATED ALWAYS AS IDENTITY",
            "ALTER TABLE {t}_alive ALTER COLUMN epoch DROP IDENTITY",
            "not lockbox's plain columns",
        ),
        // A partition whose bounds refuse recovery's rows.
        (
            "CREATE TABLE {t}_alive_all (LIKE {t}_alive) PARTITION BY RANGE (epoch); \
             ALTER TABLE {t}_alive_all ATTACH PARTITION {t}_alive FOR VALUES FROM (MINVALUE) TO (2)",
            "ALTER TABLE {t}_alive_all DETACH PARTITION {t}_alive; DROP TABLE {t}_alive_all",
            "a parent or child tables",
        ),
        (
            "CREATE TABLE {t}_epoch_all (LIKE {t}_epoch) PARTITION BY RANGE (epoch); \
             ALTER TABLE {t}_epoch_all ATTACH PARTITION {t}_epoch FOR VALUES FROM (MINVALUE) TO (2)",
            "ALTER TABLE {t}_epoch_all DETACH PARTITION {t}_epoch; DROP TABLE {t}_epoch_all",
            "a parent or child tables",
        ),
        // Recovery sets the sequence up to a million above the last token.
        (
            "DO $$ BEGIN EXECUTE 'ALTER SEQUENCE ' || pg_get_serial_sequence('{t}', 'token') \
                 || ' MAXVALUE 100000'; END $$",
            "DO $$ BEGIN EXECUTE 'ALTER SEQUENCE ' || pg_get_serial_sequence('{t}', 'token') \
                 || ' NO MAXVALUE'; END $$",
            "MAXVALUE",
        ),
        (
            "ALTER TABLE {t}_alive ADD CONSTRAINT never CHECK (epoch < 0) NOT VALID",
            "ALTER TABLE {t}_alive DROP CONSTRAINT never",
            "constraints lockbox does not define",
        ),
        (
            "CREATE FUNCTION {t}_no() RETURNS trigger LANGUAGE plpgsql AS \
                 $$ BEGIN RAISE 'no'; END $$; \
             CREATE TRIGGER no AFTER INSERT ON {t}_alive FOR EACH ROW EXECUTE FUNCTION {t}_no()",
            "DROP TRIGGER no ON {t}_alive",
            "it has triggers",
        ),
        // A view in `_epoch`'s place.
        (
            "ALTER TABLE {t}_epoch RENAME TO {t}_epoch_real; \
             CREATE VIEW {t}_epoch AS SELECT * FROM {t}_epoch_real",
            "DROP VIEW {t}_epoch; ALTER TABLE {t}_epoch_real RENAME TO {t}_epoch",
            "ordinary table",
        ),
    ];
    for (change, undo, why) in cases {
        db.batch_execute(&change.replace("{t}", &table)).unwrap();
        let built = builder_for(&unique("app")).table(&table).build();
        db.batch_execute(&undo.replace("{t}", &table)).unwrap();
        let err = built.expect_err(change);
        assert!(err.to_string().contains(why), "{change}: {err}");
    }
    // Undone, the companions serve again.
    let c = builder_for(&unique("app")).table(&table).build().unwrap();
    c.try_lock(&unique("again"))
        .unwrap()
        .unwrap()
        .release()
        .unwrap();
}

/// Row-level security in force on a companion could hide its row from the
/// role a client runs as: refused at build.
#[test]
fn row_level_security_on_a_companion_is_refused() {
    let table = created();
    let role = unique("rls").replace('-', "_");
    let mut db = admin();
    acl_change(&format!(
        "CREATE ROLE {role} LOGIN; \
         GRANT SELECT, INSERT, UPDATE, DELETE ON {table}, {table}_epoch, {table}_alive TO {role}; \
         GRANT USAGE, SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA public TO {role}; \
         GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA public TO {role}"
    ))
    .unwrap();
    let build = || {
        LockClient::builder(&url_as_user(&role))
            .table(&table)
            .create_table(false)
            .build()
    };
    let before = build().map(drop);
    db.batch_execute(&format!(
        "ALTER TABLE {table}_epoch ENABLE ROW LEVEL SECURITY"
    ))
    .unwrap();
    let after = build().map(drop);
    acl_change(&format!(
        "ALTER TABLE {table}_epoch DISABLE ROW LEVEL SECURITY; \
         REVOKE ALL ON {table}, {table}_epoch, {table}_alive FROM {role}; \
         REVOKE ALL ON ALL SEQUENCES IN SCHEMA public FROM {role}; \
         REVOKE ALL ON ALL FUNCTIONS IN SCHEMA public FROM {role}; \
         DROP ROLE {role}"
    ))
    .unwrap();
    before.expect("the role may use the tables");
    let err = after.unwrap_err();
    assert!(err.to_string().contains("row-level security"), "{err}");
}

/// A logged lease table whose token sequence is unlogged: a crash would
/// reset the sequence below tokens issued, and no client of a logged table
/// recovers. Refused at build.
#[test]
fn a_logged_table_with_an_unlogged_sequence_is_refused() {
    let table = table();
    let c = builder_for(&unique("app")).table(&table).build().unwrap();
    c.try_lock(&unique("seq"))
        .unwrap()
        .unwrap()
        .release()
        .unwrap();
    drop(c);
    let mut db = admin();
    let seq = seq_of(&mut db, &table);
    db.batch_execute(&format!("ALTER SEQUENCE {seq} SET UNLOGGED"))
        .unwrap();
    let err = builder_for(&unique("app"))
        .table(&table)
        .build()
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("sequence of its token column is unlogged"),
        "{err}"
    );
}

fn seq_of(db: &mut postgres::Client, table: &str) -> String {
    db.query_one("SELECT pg_get_serial_sequence($1, 'token')", &[&table])
        .unwrap()
        .get(0)
}

/// A row trigger on a partition of the lease table rewrites the rows
/// written there as surely as one on the table: refused.
#[test]
fn a_trigger_on_a_partition_of_the_lease_table_is_refused() {
    let table = table();
    let mut db = admin();
    db.batch_execute(&partitioned_lease_table(&table, false))
        .unwrap();
    let build = || builder_for(&unique("app")).table(&table).build().map(drop);
    build().expect("a partitioned table without triggers serves");
    db.batch_execute(&format!(
        "CREATE FUNCTION {table}_tok() RETURNS trigger LANGUAGE plpgsql AS \
             $$ BEGIN NEW.token := 1; RETURN NEW; END $$; \
         CREATE TRIGGER tok BEFORE INSERT OR UPDATE ON {table}_p0 \
             FOR EACH ROW EXECUTE FUNCTION {table}_tok()"
    ))
    .unwrap();
    let err = build().unwrap_err();
    assert!(
        err.to_string().contains(&format!("{table}_p0")) && err.to_string().contains("tok"),
        "{err}"
    );
}

/// The bounds are raised to cover what the table holds at build, in a
/// transaction of its own whose wait for the epoch row is bounded by the
/// connect timeout: an operator's transaction holding the row fails the
/// build rather than hanging it, and once it ends the build raises them.
#[test]
fn covering_the_rows_at_build_waits_no_longer_than_the_connect_timeout() {
    let table = table();
    let c = builder_of(&table).build().unwrap();
    let name = unique("cover");
    c.try_lock(&name).unwrap().unwrap().release().unwrap();
    drop(c);
    let mut db = admin();
    // Bounds below the table's token: the next build must raise them.
    db.batch_execute(&format!("UPDATE {table}_epoch SET token_ceiling = 0"))
        .unwrap();
    let mut op = admin();
    op.batch_execute(&format!(
        "BEGIN; SELECT 1 FROM {table}_epoch WHERE id = 1 FOR UPDATE"
    ))
    .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    thread::scope(|s| {
        s.spawn(|| {
            let built = builder_for(&unique("app"))
                .table(&table)
                .connect_timeout(ms(700))
                .build()
                .map(drop);
            tx.send(built).unwrap();
        });
        let answer = rx.recv_timeout(Duration::from_secs(20));
        op.batch_execute("ROLLBACK").unwrap();
        let built = answer.expect("the build waited for the operator's transaction");
        let err = built.unwrap_err();
        assert!(err.to_string().contains("55P03"), "{err}");
    });
    assert_eq!(bounds(&mut db, &table).1, 0, "nothing raised meanwhile");
    let c = builder_for(&unique("app")).table(&table).build().unwrap();
    let (token, _, _) = lease(&mut db, &table, &name);
    assert!(bounds(&mut db, &table).1 >= token, "raised at build");
    drop(c);
}

/// An operator's `ACCESS EXCLUSIVE` lock on a companion or on the lease
/// table (taken by a statement as it starts, before any timeout inside it):
/// a `try_lock` returns not acquired, and a build fails by its connect
/// timeout, rather than either waiting for as long as the lock lasts. A try
/// within the bounds its session saw has no need of the epoch table, and is
/// granted (a TTL long enough that the try comes well within the horizon
/// the warm-up's grant raised, and well within `FRESH_FOR` of it).
#[test]
fn table_locks_on_the_companions_bound_acquires_and_builds() {
    let table = table();
    let client = one_session(&table, Duration::from_secs(60));
    for locked in [
        format!("{table}_alive"),
        format!("{table}_epoch"),
        table.clone(),
    ] {
        // The pool's one session sees the bounds just before the lock.
        warm(&client);
        let mut op = admin();
        op.batch_execute(&format!(
            "BEGIN; LOCK TABLE {locked} IN ACCESS EXCLUSIVE MODE"
        ))
        .unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        thread::scope(|s| {
            s.spawn(|| {
                let tried = client.try_lock(&unique("x")).map(|g| g.is_some());
                let built = builder_for(&unique("app"))
                    .table(&table)
                    .connect_timeout(ms(700))
                    .build()
                    .map(drop);
                tx.send((tried, built)).unwrap();
            });
            let answer = rx.recv_timeout(Duration::from_secs(20));
            op.batch_execute("ROLLBACK").unwrap();
            let (tried, built) =
                answer.unwrap_or_else(|_| panic!("waited for the lock on {locked}"));
            let granted = locked.ends_with("_epoch");
            assert!(
                matches!(tried, Ok(g) if g == granted),
                "{locked}: {tried:?}"
            );
            let err = built.expect_err(&locked);
            assert!(err.to_string().contains("55P03"), "{locked}: {err}");
        });
    }
    client
        .try_lock(&unique("after"))
        .unwrap()
        .unwrap()
        .release()
        .unwrap();
}
