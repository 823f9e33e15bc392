//! An operator's lock on the lease table (`LOCK TABLE`, an `ALTER TABLE`
//! migration, `VACUUM FULL`): a statement takes its tables' locks as it
//! starts, before anything in it could set a timeout, so every session pins
//! `lock_timeout` (200 ms) and each caller goes on as its own bound allows.
//! Acquires return by their timeout (a `try_lock` reports not acquired), on
//! a session of their own and on a shared one; a held lock's renewals and a
//! release wait the table lock out within the lease.

use crate::common;

use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use lockbox::{Error, LockClient};

/// A lease table of the test's own and a client of it, with a pooled
/// connection ready (a new one prepares its statements, which takes the
/// table's lock too: behind a table lock the pool fills no faster than the
/// lock ends, and an acquire then waits for a connection, as for an
/// unreachable server, up to the connect timeout).
fn own(ttl: Duration) -> (LockClient, String) {
    own_with(ttl, |b| b)
}

fn own_with(
    ttl: Duration,
    configure: impl FnOnce(lockbox::LockClientBuilder) -> lockbox::LockClientBuilder,
) -> (LockClient, String) {
    let table = unique("tlock").replace('-', "_") + "_leases";
    let client = configure(builder_for(&unique("app")).table(&table).ttl(ttl))
        .build()
        .unwrap();
    warm(&client);
    (client, table)
}

/// An operator's transaction holding `table` in ACCESS EXCLUSIVE mode until
/// dropped (rolled back).
struct TableLock(postgres::Client);

impl TableLock {
    fn take(table: &str) -> TableLock {
        let mut op = admin();
        op.batch_execute(&format!(
            "BEGIN; LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE"
        ))
        .unwrap();
        TableLock(op)
    }
}

impl Drop for TableLock {
    fn drop(&mut self) {
        let _ = self.0.batch_execute("ROLLBACK");
    }
}

/// Runs `f` on a thread; its answer and how long it took, or `None` when it
/// had not answered within `limit` (it is then left to finish later).
fn within<T: Send + 'static>(
    limit: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> Option<(T, Duration)> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let start = Instant::now();
        let out = f();
        let _ = tx.send((out, start.elapsed()));
    });
    rx.recv_timeout(limit).ok()
}

/// On a shared session: the pool's one connection serves a held lock, so
/// the tries go to its session first; told to go elsewhere (the table wait
/// ran past the session's bound) they wait for a connection of their own,
/// for the pool timeout.
fn acquires_return(shared: bool) {
    let (client, table) = if shared {
        own_with(ms(5000), |b| b.pool_size(1).pool_timeout(ms(500)))
    } else {
        own(ms(5000))
    };
    let held = shared.then(|| client.try_lock(&unique("held")).unwrap().unwrap());
    let name = unique("free");
    let op = TableLock::take(&table);
    let tried = {
        let (c, n) = (client.clone(), name.clone());
        within(Duration::from_secs(10), move || {
            c.try_lock(&n).map(|g| g.map(|g| g.fencing_token()))
        })
    };
    let timed = {
        let (c, n) = (client.clone(), name.clone());
        within(Duration::from_secs(10), move || {
            c.lock_timeout(&n, ms(700)).map(|g| g.fencing_token())
        })
    };
    drop(op);
    let (tried, _) = tried.expect("try_lock waited for the operator's table lock");
    let (timed, took) = timed.expect("lock_timeout waited for the operator's table lock");
    if shared {
        assert!(
            matches!(tried, Ok(None) | Err(Error::PoolTimeout { .. })),
            "{tried:?}"
        );
        assert!(
            matches!(
                timed,
                Err(Error::Timeout { .. } | Error::PoolTimeout { .. })
            ),
            "{timed:?}"
        );
    } else {
        assert!(matches!(tried, Ok(None)), "{tried:?}");
        assert!(matches!(timed, Err(Error::Timeout { .. })), "{timed:?}");
    }
    // Its own 700 ms, plus at most one bounded table wait and a retry pause.
    assert!(
        took < ms(700) + ms(1500),
        "lock_timeout(700 ms) took {took:?}"
    );
    if let Some(held) = &held {
        assert!(
            held.is_held(),
            "the neighbour on the shared session was lost"
        );
    }
    // The table free again, the name is free.
    client.try_lock(&name).unwrap().unwrap().release().unwrap();
    drop(held);
}

#[test]
fn acquires_return_by_their_timeout_behind_a_table_lock() {
    acquires_return(false);
}

#[test]
fn acquires_on_a_shared_session_return_by_their_timeout_behind_a_table_lock() {
    acquires_return(true);
}

/// A waiting acquire goes on waiting through the table lock and is granted
/// once it ends, within its timeout.
#[test]
fn a_waiting_acquire_is_granted_once_the_table_lock_ends() {
    let (client, table) = own(ms(5000));
    let name = unique("wait");
    let op = TableLock::take(&table);
    let waiter = {
        let (c, n) = (client.clone(), name.clone());
        thread::spawn(move || c.lock_timeout(&n, ms(10_000)).map(|g| g.fencing_token()))
    };
    // The waiter meets the table lock, more than once.
    thread::sleep(ms(800));
    drop(op);
    let token = waiter
        .join()
        .unwrap()
        .expect("granted once the table was free");
    assert!(token > 0);
}

/// A held lock's renewals meet the table lock, fail within the session's
/// bound and are retried: a table lock shorter than the lease loses nothing,
/// and a release sent during it completes once it ends.
#[test]
fn a_held_lock_and_its_release_wait_out_a_short_table_lock() {
    let ttl = ms(1500);
    let (client, table) = own(ttl);
    let name = unique("held");
    let lock = client.try_lock(&name).unwrap().unwrap();
    let op = TableLock::take(&table);
    // Through a renewal or two (every TTL / 3).
    thread::sleep(ms(700));
    assert!(lock.is_held());
    let releasing = thread::spawn(move || lock.release());
    thread::sleep(ms(300));
    drop(op);
    releasing
        .join()
        .unwrap()
        .expect("released once the table was free");
    let released: bool = admin()
        .query_one(
            &format!("SELECT released_at IS NOT NULL FROM {table} WHERE name = $1"),
            &[&name],
        )
        .unwrap()
        .get(0);
    assert!(released, "the lease row was not marked released");
}

/// A waiting acquire whose wait slice ends while the table is locked (it
/// then reads the lease table, to look for a zombie holder) goes on waiting:
/// it times out, it does not fail with the table's 55P03.
#[test]
fn a_wait_slice_that_ends_behind_a_table_lock_goes_on_waiting() {
    let (client, table) = own(ms(3000));
    let name = unique("slice");
    let holder = client.try_lock(&name).unwrap().unwrap();
    let waiter = {
        let (c, n) = (client.clone(), name.clone());
        thread::spawn(move || c.lock_timeout(&n, ms(5000)).map(|g| g.fencing_token()))
    };
    // The first slice ends just after the holder's first lease (3 s).
    thread::sleep(ms(2200));
    let op = TableLock::take(&table);
    thread::sleep(ms(1400));
    drop(op);
    let waited = waiter.join().unwrap();
    assert!(matches!(waited, Err(Error::Timeout { .. })), "{waited:?}");
    assert!(holder.is_held());
    holder.release().unwrap();
}

/// `extend` on a session of its own waits a table lock out within the
/// lock's deadline, as it waits out a row's.
#[test]
fn extend_waits_out_a_short_table_lock() {
    let (client, table) = own(ms(3000));
    let lock = client
        .acquire(
            &unique("extend"),
            &lockbox::AcquireOptions::new().dedicated_session(true),
        )
        .unwrap()
        .unwrap();
    let op = TableLock::take(&table);
    let extended = {
        let lock = std::sync::Arc::new(lock);
        let l = lock.clone();
        let t = thread::spawn(move || l.extend(ms(3000)));
        thread::sleep(ms(600));
        drop(op);
        (t.join().unwrap(), lock)
    };
    extended.0.expect("extended once the table was free");
    assert!(extended.1.is_held());
}

/// Readers and permits: a try and a timed acquire behind a table lock
/// return not acquired and timed out; a release sent during a short one
/// completes once it ends, and frees the name at once (not at its lease's
/// end).
#[test]
fn readers_and_permits_behind_a_table_lock() {
    let (client, table) = own(ms(10_000));
    // Pooled sessions ready for readers and permits (each prepares their
    // statements on first use, which takes the tables' locks too).
    let warm = client.rwlock(&unique("warm")).unwrap();
    let warm_sem = client.semaphore(&unique("warm"), 1).unwrap();
    let ready = (
        warm.try_read().unwrap().unwrap(),
        warm.try_read().unwrap().unwrap(),
        warm.try_read().unwrap().unwrap(),
        warm.try_read().unwrap().unwrap(),
        warm_sem.try_acquire().unwrap().unwrap(),
    );
    drop(ready);
    let rw = client.rwlock(&unique("rw")).unwrap();
    let writer = rw.try_write().unwrap().unwrap();
    let op = TableLock::take(&table);
    let tried = {
        let rw = client.rwlock(rw.name()).unwrap();
        within(Duration::from_secs(10), move || {
            rw.try_read().map(|g| g.is_some())
        })
    };
    let timed = {
        let rw = client.rwlock(rw.name()).unwrap();
        within(Duration::from_secs(10), move || {
            rw.read_timeout(ms(700)).map(drop)
        })
    };
    drop(op);
    let (tried, _) = tried.expect("try_read waited for the table lock");
    let (timed, took) = timed.expect("read_timeout waited for the table lock");
    assert!(matches!(tried, Ok(false)), "{tried:?}");
    assert!(matches!(timed, Err(Error::Timeout { .. })), "{timed:?}");
    // Its own 700 ms (the slice's failed read is taken out of its wait, and
    // no zombie is looked for once nothing is left), not that plus two
    // table waits.
    assert!(took < ms(1000), "read_timeout(700 ms) took {took:?}");
    writer.release().unwrap();

    let reader = rw.try_read().unwrap().unwrap();
    let sem = client.semaphore(&unique("sem"), 1).unwrap();
    let permit = sem.try_acquire().unwrap().unwrap();
    let op = TableLock::take(&table);
    let released = thread::spawn(move || (reader.release(), permit.release()));
    thread::sleep(ms(500));
    drop(op);
    let (r, p) = released.join().unwrap();
    r.expect("the read lock released once the table was free");
    p.expect("the permit released once the table was free");
    assert!(
        rw.try_write().unwrap().is_some(),
        "the name stayed read-locked"
    );
    assert!(
        sem.try_acquire().unwrap().is_some(),
        "the permit stayed taken"
    );
}

/// A notifying commit queues on one lock for the whole cluster, which any
/// other notifying transaction holds through its commit (here through a
/// synchronous standby's wait for replay, paused for 1.5 s). An election's
/// announcement must wait for it, not give up at the session's 200 ms
/// table-lock bound: a watcher that saw no leader waits for the
/// announcement, and would never hear of the new one.
#[test]
fn an_election_announcement_waits_for_another_notifying_commit() {
    use common::server::Cluster;
    let primary = Cluster::start().expect("primary");
    let standby = Cluster::standby_of(&primary).expect("standby");
    let connect = |url: &str| postgres::Client::connect(url, postgres::NoTls).unwrap();
    let mut p = connect(&primary.url);
    p.batch_execute("ALTER SYSTEM SET synchronous_standby_names = '*'")
        .unwrap();
    p.batch_execute("SELECT pg_reload_conf()").unwrap();
    assert!(
        eventually(Duration::from_secs(20), || {
            p.query_one(
                "SELECT count(*) > 0 FROM pg_stat_replication WHERE sync_state = 'sync'",
                &[],
            )
            .unwrap()
            .get(0)
        }),
        "the standby never became synchronous"
    );
    let client = LockClient::builder(&primary.url)
        .ttl(ms(10_000))
        .build()
        .unwrap();
    let election = client.election("leader").unwrap();
    let watch = election.watch().unwrap();
    let first = watch.changes().recv_timeout(ms(5000)).unwrap();
    assert!(first.is_none(), "{first:?}");

    // Another application's notifying commit (it writes, so its commit
    // waits for the standby), held in its wait for the standby's replay.
    p.batch_execute("CREATE TABLE app_log (x int)").unwrap();
    let mut s = connect(&standby.url);
    s.batch_execute("SELECT pg_wal_replay_pause()").unwrap();
    let app_url = primary.url.clone();
    let app = thread::spawn(move || {
        let mut app = postgres::Client::connect(&app_url, postgres::NoTls).unwrap();
        app.batch_execute(
            "SET synchronous_commit = remote_apply; BEGIN; INSERT INTO app_log VALUES (1); \
             SELECT pg_notify('elsewhere', ''); COMMIT",
        )
        .unwrap();
    });
    let resume = thread::spawn(move || {
        thread::sleep(ms(1500));
        s.batch_execute("SELECT pg_wal_replay_resume()").unwrap();
    });
    assert!(
        eventually(ms(5000), || {
            p.query_one(
                "SELECT count(*) > 0 FROM pg_stat_activity WHERE wait_event = 'SyncRep'",
                &[],
            )
            .unwrap()
            .get(0)
        }),
        "the other application's commit never waited for the standby"
    );
    let leader = election
        .campaign("me", &lockbox::AcquireOptions::new())
        .unwrap()
        .expect("elected");
    resume.join().unwrap();
    app.join().unwrap();
    let seen = watch
        .changes()
        .recv_timeout(ms(5000))
        .expect("the watcher heard of the new leader")
        .expect("a leader");
    assert_eq!(seen.term, leader.term());
    leader.release().unwrap();
}
