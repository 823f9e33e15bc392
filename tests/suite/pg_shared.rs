//! Shared leases on the PostgreSQL store: readers and writers of a
//! reader-writer lock, permits of a semaphore, elections' watches; against
//! the real server.

use crate::common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use lockbox::{AcquireOptions, Error, LeaseKind, LeaseStatus, LockClient};

fn client_app(ttl: Duration) -> (LockClient, String) {
    client(ttl)
}

/// Live permits of `name` by the store's record (the shared-lease table).
fn live_rows(db: &mut postgres::Client, name: &str) -> i64 {
    db.query_one(
        "SELECT count(*) FROM lockbox_leases_shared WHERE name = $1 \
         AND released_at IS NULL AND expires_at > clock_timestamp()",
        &[&name],
    )
    .unwrap()
    .get(0)
}

/// Readers share; a writer waits for all of them; tokens rise across kinds.
#[test]
fn readers_share_and_exclude_writers() {
    let (client, _app) = client_app(ms(5000));
    let name = unique("rw");
    let rw = client.rwlock(&name).unwrap();
    let r1 = rw.try_read().unwrap().expect("first reader");
    let r2 = rw.try_read().unwrap().expect("second reader");
    assert!(r2.fencing_token() > r1.fencing_token());
    assert!(rw.try_write().unwrap().is_none(), "a writer beside readers");
    let leases = client.leases_of(&name).unwrap();
    assert_eq!(leases.len(), 2, "one listing per reader: {leases:?}");
    assert!(leases.iter().all(|l| l.kind == LeaseKind::Shared));
    assert!(
        leases
            .iter()
            .all(|l| matches!(l.status, LeaseStatus::Held { .. }) && l.holder_alive)
    );
    let top = r2.fencing_token();
    r1.release().unwrap();
    assert!(
        rw.try_write().unwrap().is_none(),
        "a writer beside a reader"
    );
    r2.release().unwrap();
    let w = rw
        .try_write()
        .unwrap()
        .expect("writer once readers are gone");
    assert!(w.fencing_token() > top);
    assert!(rw.try_read().unwrap().is_none(), "a reader beside a writer");
    let wt = w.fencing_token();
    w.release().unwrap();
    let r3 = rw.try_read().unwrap().expect("reader after the writer");
    assert!(r3.fencing_token() > wt);
    r3.release().unwrap();
}

/// A writer waiting for readers is queued in the server; a new reader's try
/// then fails (it would queue behind the writer), and the writer gets the
/// lock as soon as the reader it waited for releases.
#[test]
fn a_waiting_writer_holds_new_readers_back() {
    let (readers, _) = client_app(ms(5000));
    let (writers, wapp) = client_app(ms(5000));
    let name = unique("wpref");
    let rw = readers.rwlock(&name).unwrap();
    let r1 = rw.try_read().unwrap().expect("reader");
    let wrw = writers.rwlock(&name).unwrap();
    let writer = thread::spawn(move || {
        let w = wrw.write_timeout(Duration::from_secs(20)).unwrap();
        let t = w.fencing_token();
        w.release().unwrap();
        t
    });
    assert!(
        eventually(Duration::from_secs(10), || is_waiting(&wapp)),
        "the writer never waited in the server"
    );
    assert!(
        rw.try_read().unwrap().is_none(),
        "a reader came in ahead of a waiting writer"
    );
    let r1_token = r1.fencing_token();
    r1.release().unwrap();
    let w_token = writer.join().unwrap();
    assert!(w_token > r1_token);
    let r = rw.try_read().unwrap().expect("reader after the writer");
    assert!(r.fencing_token() > w_token);
}

/// Many threads of several clients cycling permits: never more than N live,
/// by the holders' own count and by the store's record.
#[test]
fn permits_never_exceed_n() {
    const N: u32 = 3;
    const THREADS: usize = 12;
    let name = unique("sem");
    let inside = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..3).map(|_| client_app(ms(5000)).0).collect();
    let handles: Vec<_> = (0..THREADS)
        .map(|i| {
            let sem = clients[i % clients.len()].semaphore(&name, N).unwrap();
            let (inside, peak, name) = (inside.clone(), peak.clone(), name.clone());
            thread::spawn(move || {
                let mut db = admin();
                for _ in 0..8 {
                    let p = sem.acquire_timeout(Duration::from_secs(60)).unwrap();
                    let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(now, Ordering::SeqCst);
                    let rows = live_rows(&mut db, &name);
                    assert!(rows <= i64::from(N), "{rows} live permits of {N}");
                    thread::sleep(ms(5));
                    inside.fetch_sub(1, Ordering::SeqCst);
                    p.release().unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let peak = peak.load(Ordering::SeqCst);
    assert!(peak <= N as usize, "peak {peak} above {N}");
    assert!(peak >= 2, "the permits were never shared (peak {peak})");
}

/// The stale-snapshot race: many tries of a one-permit semaphore released
/// at once, each grant waiting for the name's row while another commits.
/// A count read on a snapshot from before the wait would grant two.
#[test]
fn simultaneous_tries_grant_one_permit() {
    const THREADS: usize = 8;
    let name = unique("race");
    let clients: Vec<_> = (0..THREADS).map(|_| client_app(ms(5000)).0).collect();
    for round in 0..15 {
        let barrier = Arc::new(Barrier::new(THREADS));
        let handles: Vec<_> = clients
            .iter()
            .map(|c| {
                let sem = c.semaphore(&name, 1).unwrap();
                let barrier = barrier.clone();
                thread::spawn(move || {
                    barrier.wait();
                    sem.try_acquire().unwrap()
                })
            })
            .collect();
        let permits: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let got: Vec<_> = permits.into_iter().flatten().collect();
        assert_eq!(got.len(), 1, "round {round}: {} permits of 1", got.len());
    }
}

/// A semaphore of another count, or a reader, on a name whose permits are
/// live: refused as a mismatch.
#[test]
fn mismatched_kinds_are_refused() {
    let (client, _) = client_app(ms(5000));
    let name = unique("mismatch");
    let p = client
        .semaphore(&name, 3)
        .unwrap()
        .try_acquire()
        .unwrap()
        .expect("permit");
    let other = client.semaphore(&name, 5).unwrap().try_acquire();
    assert!(matches!(other, Err(Error::InvalidConfig(_))), "{other:?}");
    let reader = client.rwlock(&name).unwrap().try_read();
    assert!(matches!(reader, Err(Error::InvalidConfig(_))), "{reader:?}");
    p.release().unwrap();
    let five = client.semaphore(&name, 5).unwrap().try_acquire().unwrap();
    assert!(five.is_some(), "the count is free once no permit is live");
}

/// A full semaphore's waiter wakes on a release (long before any lease
/// end), and its session listens on nothing once back in the pool.
#[test]
fn a_permit_waiter_wakes_on_release() {
    let (client, app) = builder_for_pool(1);
    let client = Arc::new(client);
    let name = unique("wake");
    let sem = client.semaphore(&name, 1).unwrap();
    let (other, _) = client_app(ms(30_000));
    let held = other
        .semaphore(&name, 1)
        .unwrap()
        .try_acquire()
        .unwrap()
        .unwrap();
    let waiter = thread::spawn(move || {
        let start = Instant::now();
        let p = sem.acquire_timeout(Duration::from_secs(20)).unwrap();
        let waited = start.elapsed();
        p.release().unwrap();
        waited
    });
    assert!(eventually(Duration::from_secs(10), || client
        .metrics()
        .acquires_waiting
        >= 1));
    held.release().unwrap();
    let waited = waiter.join().unwrap();
    assert!(
        waited < Duration::from_secs(15),
        "woken by the lease end, not the release ({waited:?})"
    );
    // Its session went back to the pool (not closed): the pool of one
    // serves the next acquire on it.
    assert_eq!(sessions_of(&app), 1);
}

/// A client with a one-connection pool and a long TTL.
fn builder_for_pool(size: u32) -> (LockClient, String) {
    let app = unique("pool");
    let c = builder_for(&app)
        .ttl(ms(30_000))
        .pool_size(size)
        .build()
        .unwrap();
    (c, app)
}

/// A permit holder whose session dies: its permit returns at its lease
/// end, not before.
#[test]
fn a_crashed_permit_holder_returns_its_permit_at_lease_end() {
    let (holder, happ) = client_app(ms(3000));
    let name = unique("crash");
    let p = holder
        .semaphore(&name, 1)
        .unwrap()
        .try_acquire()
        .unwrap()
        .unwrap();
    let (waiters, _) = client_app(ms(3000));
    let sem = waiters.semaphore(&name, 1).unwrap();
    let mut db = admin();
    let pid: i32 = db
        .query_one(
            "SELECT holder_pid FROM lockbox_leases_shared WHERE name = $1",
            &[&name],
        )
        .unwrap()
        .get(0);
    terminate(pid);
    assert_eq!(advisory_locks_of(&happ), 0);
    // The lease is live: no permit yet.
    assert!(sem.try_acquire().unwrap().is_none());
    let left_ms: f64 = db
        .query_one(
            "SELECT (extract(epoch FROM expires_at - clock_timestamp()) * 1000)::float8 \
             FROM lockbox_leases_shared WHERE name = $1",
            &[&name],
        )
        .unwrap()
        .get(0);
    let start = Instant::now();
    let q = sem.acquire_timeout(Duration::from_secs(20)).unwrap();
    let waited = start.elapsed().as_secs_f64() * 1000.0;
    assert!(
        waited >= left_ms - 50.0,
        "granted {waited} ms in, the crashed lease had {left_ms} ms left"
    );
    drop(p);
    q.release().unwrap();
}

/// A writer after a reader whose session died waits for that reader's
/// lease to end.
#[test]
fn a_writer_waits_out_a_crashed_reader() {
    let (holder, _) = client_app(ms(3000));
    let name = unique("crashr");
    let r = holder.rwlock(&name).unwrap().try_read().unwrap().unwrap();
    let mut db = admin();
    let pid: i32 = db
        .query_one(
            "SELECT holder_pid FROM lockbox_leases_shared WHERE name = $1",
            &[&name],
        )
        .unwrap()
        .get(0);
    terminate(pid);
    let (writers, _) = client_app(ms(3000));
    let rw = writers.rwlock(&name).unwrap();
    assert!(
        rw.try_write().unwrap().is_none(),
        "a writer beside a live lease"
    );
    let expires: f64 = db
        .query_one(
            "SELECT extract(epoch FROM expires_at)::float8 FROM lockbox_leases_shared WHERE name = $1",
            &[&name],
        )
        .unwrap()
        .get(0);
    let w = rw.write_timeout(Duration::from_secs(20)).unwrap();
    let now: f64 = db
        .query_one("SELECT extract(epoch FROM clock_timestamp())::float8", &[])
        .unwrap()
        .get(0);
    assert!(
        now >= expires,
        "the writer came in {} s early",
        expires - now
    );
    assert!(w.fencing_token() > r.fencing_token());
}

/// force_release ends every reader (their sessions too) and returns the
/// highest token; the next grant is above it.
#[test]
fn force_release_ends_the_group() {
    let (client, app) = client_app(ms(5000));
    let name = unique("force");
    let rw = client.rwlock(&name).unwrap();
    let r1 = rw.try_read().unwrap().unwrap();
    let r2 = rw.try_read().unwrap().unwrap();
    let (op, _) = client_app(ms(5000));
    let ended = op.force_release(&name).unwrap();
    assert_eq!(ended, Some(r2.fencing_token()));
    assert!(eventually(Duration::from_secs(10), || advisory_locks_of(
        &app
    ) == 0));
    let w = op
        .rwlock(&name)
        .unwrap()
        .try_write()
        .unwrap()
        .expect("writer");
    assert!(w.fencing_token() > r2.fencing_token());
    assert!(
        r1.lost().recv_timeout(Duration::from_secs(10)).is_ok(),
        "reader 1 never heard"
    );
    assert!(
        r2.lost().recv_timeout(Duration::from_secs(10)).is_ok(),
        "reader 2 never heard"
    );
}

/// An election's watch wakes on an announced grant and on the release, long
/// before the leader's lease would end.
#[test]
fn watch_wakes_on_announced_grant_and_release() {
    let (client, _) = client_app(ms(60_000));
    let name = unique("elect");
    let election = client.election(&name).unwrap();
    let watch = election.watch().unwrap();
    let first = watch
        .changes()
        .recv_timeout(Duration::from_secs(10))
        .unwrap();
    assert!(first.is_none());
    let (other, _) = client_app(ms(60_000));
    let leader = other
        .election(&name)
        .unwrap()
        .campaign("me", &AcquireOptions::new())
        .unwrap()
        .unwrap();
    let seen = watch
        .changes()
        .recv_timeout(Duration::from_secs(10))
        .unwrap()
        .expect("the new leader");
    assert_eq!(seen.term, leader.term());
    assert_eq!(seen.identity, "me");
    leader.release().unwrap();
    let after = watch
        .changes()
        .recv_timeout(Duration::from_secs(10))
        .unwrap();
    assert!(after.is_none(), "{after:?}");
}

/// A reader fences its transaction: live while held, refused once the group
/// was force-released.
#[test]
fn a_reader_fences_a_transaction() {
    let (client, _) = client_app(ms(5000));
    let name = unique("fence");
    let r = client.rwlock(&name).unwrap().try_read().unwrap().unwrap();
    let mut db = admin();
    {
        let mut tx = db.transaction().unwrap();
        r.fence(&mut tx).unwrap();
        tx.commit().unwrap();
    }
    client.force_release(&name).unwrap();
    let mut tx = db.transaction().unwrap();
    let fenced = r.fence(&mut tx);
    assert!(matches!(fenced, Err(Error::LockLost { .. })), "{fenced:?}");
}

/// A reader whose lease expired while its session lives on (a paused
/// process) holds the key shared: a waiting writer terminates that zombie
/// session and takes the lock.
#[test]
fn a_writer_terminates_a_zombie_reader() {
    let (readers, rapp) = client_app(ms(60_000));
    let name = unique("zombie");
    let r = readers.rwlock(&name).unwrap().try_read().unwrap().unwrap();
    let mut db = admin();
    db.execute(
        "UPDATE lockbox_leases_shared SET expires_at = clock_timestamp() - interval '1 second' \
         WHERE name = $1",
        &[&name],
    )
    .unwrap();
    db.execute(
        "UPDATE lockbox_leases SET expires_at = clock_timestamp() - interval '1 second' \
         WHERE name = $1",
        &[&name],
    )
    .unwrap();
    assert_eq!(
        advisory_locks_of(&rapp),
        1,
        "the zombie still holds the key"
    );
    let (writers, _) = client_app(ms(1000));
    let w = writers
        .rwlock(&name)
        .unwrap()
        .write_timeout(Duration::from_secs(20))
        .expect("the writer, after terminating the zombie");
    assert!(w.fencing_token() > r.fencing_token());
    assert_eq!(writers.metrics().zombie_terminations, 1);
    assert_eq!(advisory_locks_of(&rapp), 0);
}

/// A live reader idle between renewals longer than a waiting writer's (much
/// shorter) TTL is no zombie: the writer's probes leave it alone.
#[test]
fn a_live_idle_reader_is_not_taken_for_a_zombie() {
    let (readers, rapp) = client_app(ms(30_000));
    let name = unique("idle");
    let r = readers.rwlock(&name).unwrap().try_read().unwrap().unwrap();
    let (writers, _) = client_app(ms(200));
    let w = writers
        .rwlock(&name)
        .unwrap()
        .write_timeout(Duration::from_millis(2000));
    assert!(matches!(w, Err(Error::Timeout { .. })), "{w:?}");
    assert_eq!(writers.metrics().zombie_terminations, 0);
    assert!(r.is_held());
    assert_eq!(advisory_locks_of(&rapp), 1);
    r.release().unwrap();
}

/// With a history, shared grants and releases are recorded like exclusive
/// ones.
#[test]
fn shared_grants_and_releases_are_recorded() {
    let app = unique("hist");
    let client = builder_for(&app)
        .ttl(ms(5000))
        .history(true)
        .build()
        .unwrap();
    let name = unique("shist");
    let sem = client.semaphore(&name, 2).unwrap();
    let p1 = sem.try_acquire().unwrap().unwrap();
    let p2 = sem.try_acquire().unwrap().unwrap();
    let (t1, t2) = (p1.fencing_token(), p2.fencing_token());
    p1.release().unwrap();
    p2.release().unwrap();
    let events: Vec<_> = client
        .history(&name, 10)
        .unwrap()
        .into_iter()
        .map(|e| (e.fencing_token, e.event))
        .collect();
    for want in [
        (t1, "granted"),
        (t2, "granted"),
        (t1, "released"),
        (t2, "released"),
    ] {
        assert!(
            events.iter().any(|(t, e)| *t == want.0 && e == want.1),
            "{want:?} missing from {events:?}"
        );
    }
}

/// A role that may use an existing lease table but not create tables beside
/// it builds as before: exclusive locks work, readers and permits are
/// refused as unsupported (the shared-lease table is missing).
#[test]
fn without_the_shared_table_exclusive_locks_still_work() {
    let role = unique("noshare").replace('-', "_");
    let schema = format!("{role}_s");
    let mut db = admin();
    db.batch_execute(&format!(
        "CREATE ROLE {role} LOGIN; CREATE SCHEMA {schema}; GRANT USAGE ON SCHEMA {schema} TO {role}"
    ))
    .unwrap();
    let table = format!("{schema}.leases");
    drop(
        LockClient::builder(database_url())
            .table(&table)
            .build()
            .unwrap(),
    );
    db.batch_execute(&format!(
        "DROP TABLE {schema}.leases_shared; \
         GRANT SELECT, INSERT, UPDATE, DELETE ON {table} TO {role}; \
         GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA {schema} TO {role}"
    ))
    .unwrap();
    let built = LockClient::builder(&url_as_user(&role))
        .table(&table)
        .build();
    let outcome = built.map(|client| {
        let name = unique("noshare-lock");
        let lock = client.try_lock(&name).unwrap().expect("an exclusive lock");
        lock.release().unwrap();
        client
            .rwlock(&name)
            .unwrap()
            .try_read()
            .map(|r| r.is_some())
    });
    let _ = db.batch_execute(&format!(
        "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity WHERE usename = '{role}'; \
         DROP SCHEMA {schema} CASCADE; DROP ROLE {role}"
    ));
    let read = outcome.expect("build without CREATE on the schema");
    assert!(matches!(read, Err(Error::Unsupported(_))), "{read:?}");
}

/// Permit waiters of a full semaphore are served in arrival order: they
/// queue at the name's gate in the server (one holds it, the others wait
/// for it), and only the first of them waits for a permit.
#[test]
fn permit_waiters_are_served_in_arrival_order() {
    let name = unique("order");
    let (a, _) = client_app(ms(30_000));
    let (b, _) = client_app(ms(30_000));
    let (c, _) = client_app(ms(30_000));
    let mut db = admin();
    let mut queued = |n: usize| {
        let (holders, waiters) = pg_gate(&mut db, &name);
        (holders.len(), waiters.len()) == (1, n - 1)
    };
    common::coordination::permit_waiters_in_arrival_order((&a, &b, &c), &name, &mut queued, false);
    assert_eq!(
        pg_gate(&mut db, &name),
        (vec![], vec![]),
        "a gate left held"
    );
}

/// A permit waiter that gives up while queued at the gate (its wait ran
/// out) returns its connection to the pool as it found it, without the
/// gate's `idle_session_timeout`: the server does not end that session
/// while it idles in the pool (and with it the locks later taken on it).
#[test]
fn a_waiter_that_gives_up_at_the_gate_leaves_no_timeout_on_its_session() {
    let name = unique("gate-leak");
    let (holder, _) = client_app(ms(60_000));
    let held = holder
        .semaphore(&name, 1)
        .unwrap()
        .try_acquire()
        .unwrap()
        .unwrap();
    let (head, _) = client_app(ms(60_000));
    let app = unique("gate-leaker");
    let b = builder_for(&app).ttl(ms(100)).pool_size(1).build().unwrap();
    let mut db = admin();
    thread::scope(|s| {
        let first = s.spawn(|| {
            head.semaphore(&name, 1)
                .unwrap()
                .acquire_timeout(Duration::from_secs(20))
                .unwrap()
        });
        assert!(eventually(ms(5000), || pg_gate(&mut db, &name).0.len() == 1));
        let gave_up = b.semaphore(&name, 1).unwrap().acquire_timeout(ms(300));
        assert!(matches!(gave_up, Err(Error::Timeout { .. })), "{gave_up:?}");
        assert_eq!(sessions_of(&app), 1);
        // Idle in the pool well past the gate's timeout (2 × 100 ms + 1 s).
        thread::sleep(ms(2500));
        assert_eq!(
            sessions_of(&app),
            1,
            "the pooled session kept the gate's idle_session_timeout"
        );
        held.release().unwrap();
        first.join().unwrap().release().unwrap();
    });
}

/// A gate holder frozen right after its grant transaction's `BEGIN` (before
/// the transaction's first statement sets its own bound: the session is idle
/// in a transaction, which `idle_session_timeout` does not cover) holds the
/// waiters behind it up for its gate timeout at most: the waiter behind gets
/// the free permit. The freeze is a proxy that stops forwarding right after
/// the first `START TRANSACTION` the client sends once it is at the gate.
#[test]
fn a_gate_holder_frozen_after_begin_holds_nobody_up_for_long() {
    let name = unique("gate-begin");
    let (owner, _) = client_app(ms(60_000));
    let held = owner
        .semaphore(&name, 1)
        .unwrap()
        .try_acquire()
        .unwrap()
        .unwrap();
    let proxy = common::proxy::Proxy::to_test_server();
    let mut at_gate = false;
    proxy.pause_when(move |sent| {
        let text = String::from_utf8_lossy(sent);
        if let Some(at) = text.find("SET idle_session_timeout = ") {
            at_gate = text.as_bytes().get(at + 27) != Some(&b'0');
        }
        at_gate && text.contains("START TRANSACTION")
    });
    // In plain text, so that the proxy can read what the client sends.
    let url = format!("{} sslmode=disable", proxy.app_url(&unique("frozen-begin")));
    let frozen = LockClient::builder(&url)
        .ttl(ms(1000))
        .pool_size(1)
        .build()
        .unwrap();
    let (waiter, _) = client_app(ms(1000));
    let mut db = admin();
    thread::scope(|s| {
        let head = s.spawn(|| {
            frozen
                .semaphore(&name, 1)
                .unwrap()
                .acquire_timeout(Duration::from_secs(60))
        });
        assert!(eventually(ms(5000), || pg_gate(&mut db, &name).0.len() == 1));
        let behind = s.spawn(|| {
            waiter
                .semaphore(&name, 1)
                .unwrap()
                .acquire_timeout(Duration::from_secs(30))
        });
        assert!(eventually(ms(5000), || pg_gate(&mut db, &name).1.len() == 1));
        let freed = held.fencing_token();
        held.release().unwrap();
        let got = behind.join().unwrap();
        // Thawed (its connections cut) whatever happened, so the test ends.
        proxy.cut();
        let head = head.join().unwrap();
        let permit = got.expect("held up past its wait by a gate holder frozen after BEGIN");
        assert!(permit.fencing_token() > freed);
        permit.release().unwrap();
        assert!(head.is_err(), "the frozen head was granted");
    });
}

/// A permit's grant that finds the name's row busy (an operator's
/// transaction holds it) rolls its transaction back and tries again. Here
/// an operator's cancel lands on that `ROLLBACK` (gdb, see
/// `common::gdb`): left so, the session stayed in the aborted transaction
/// and the next try's `BEGIN` failed with 25P02, ending the acquire with an
/// error. The `ROLLBACK` is now sent again (6945785, from a review that
/// read it), and the permit is granted once the row is free.
#[test]
fn a_cancel_on_a_busy_permit_grants_rollback_does_not_end_the_acquire() {
    let name = unique("permit-rollback");
    let (setup, _) = client_app(ms(5000));
    // The name's rows exist (a permit granted and released).
    let sem = setup.semaphore(&name, 2).unwrap();
    sem.try_acquire()
        .unwrap()
        .expect("a free permit")
        .release()
        .unwrap();
    let app = unique("permit-rb");
    let client = builder_for(&app)
        .ttl(ms(5000))
        .pool_size(1)
        .build()
        .unwrap();
    client.lease(&name).unwrap();
    let pid = only_session_pid(&app);
    // An operator's transaction holds the name's row.
    let row = RowHold::lease(&name);
    let gdb = common::gdb::cancel_first_rollback(pid);
    let sem = client.semaphore(&name, 2).unwrap();
    thread::scope(|s| {
        let acquiring = s.spawn(|| sem.acquire_timeout(Duration::from_secs(10)));
        common::gdb::said_hit(gdb);
        row.release();
        let permit = acquiring
            .join()
            .unwrap()
            .expect("granted once the row is free");
        assert!(permit.is_held());
        permit.release().unwrap();
    });
}
