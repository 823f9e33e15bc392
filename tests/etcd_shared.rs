//! The etcd store's shared leases (issue 12): readers and writers, semaphore
//! permits, a crashed permit holder, count mismatches, elections watched,
//! force_release and listings — against the throwaway etcd member.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use common::etcd_server::{EtcdCluster, etcd_url, single};
use common::{ChildProc, child_role, eventually, ms, next_command, report, unique};
use lockbox::{AcquireOptions, Error, LeaseKind, LockClient, LostReason};

fn client(ttl: Duration) -> LockClient {
    LockClient::etcd(&etcd_url()).ttl(ttl).build().unwrap()
}

/// The keys (holders and waiters) of `name` in etcd.
fn queued(name: &str) -> u64 {
    single()
        .count_keys(&format!("lockbox/lock/{name}/"))
        .expect("etcd answers")
}

/// Readers share; a writer waits for them; a reader arriving while the writer
/// waits queues behind it (writer preference); the writer's token is above
/// the readers', and the next reader's above the writer's.
#[test]
fn readers_share_and_a_waiting_writer_holds_new_readers_back() {
    let name = unique("etcd-rw");
    let c = client(ms(5000));
    let rw = c.rwlock(&name).unwrap();
    let r1 = rw.try_read().unwrap().expect("a free name is read");
    let r2 = rw.try_read().unwrap().expect("readers share");
    assert!(r2.fencing_token() > r1.fencing_token());
    assert!(rw.try_write().unwrap().is_none(), "no writer while reading");

    let writer = {
        let rw = rw.clone();
        thread::spawn(move || rw.write_timeout(ms(20_000)))
    };
    // The writer is queued: two readers and it.
    assert!(eventually(ms(10_000), || queued(&name) == 3));
    assert!(
        rw.try_read().unwrap().is_none(),
        "a reader must not pass a waiting writer"
    );
    let late_reader = {
        let rw = rw.clone();
        thread::spawn(move || rw.read_timeout(ms(20_000)))
    };
    assert!(eventually(ms(10_000), || queued(&name) == 4));
    assert!(!writer.is_finished());

    let read_token = r2.fencing_token();
    r1.release().unwrap();
    r2.release().unwrap();
    let w = writer.join().unwrap().expect("the writer is granted");
    assert!(w.fencing_token() > read_token);
    assert!(rw.try_read().unwrap().is_none(), "no reader while writing");
    assert!(
        !late_reader.is_finished(),
        "the late reader waits for the writer"
    );
    let listed = c.leases_of(&name).unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].kind, LeaseKind::Exclusive);
    assert_eq!(listed[0].fencing_token, w.fencing_token());
    let write_token = w.fencing_token();
    w.release().unwrap();
    let r3 = late_reader
        .join()
        .unwrap()
        .expect("the late reader is granted");
    assert!(r3.fencing_token() > write_token);
    let also = rw.try_read().unwrap().expect("readers share again");
    let listed = c.leases_of(&name).unwrap();
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert!(listed.iter().all(|l| l.kind == LeaseKind::Shared));
    let mut tokens: Vec<u64> = listed.iter().map(|l| l.fencing_token).collect();
    tokens.sort_unstable();
    assert_eq!(tokens, vec![r3.fencing_token(), also.fencing_token()]);
    r3.release().unwrap();
    also.release().unwrap();
    assert_eq!(queued(&name), 0);
}

/// Threads (on two clients) race for 3 permits, many times over: never more
/// than 3 held at once by the holders' own count, every one of them granted
/// in the end, every token different.
#[test]
fn permits_never_exceed_their_count_under_a_race() {
    const PERMITS: usize = 3;
    const THREADS: usize = 10;
    const ROUNDS: usize = 4;
    let name = unique("etcd-sem");
    let clients = [client(ms(5000)), client(ms(5000))];
    let held = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let start = Arc::new(Barrier::new(THREADS));
    let workers: Vec<_> = (0..THREADS)
        .map(|i| {
            let sem = clients[i % 2].semaphore(&name, PERMITS as u32).unwrap();
            let (held, most, start) = (held.clone(), most.clone(), start.clone());
            thread::spawn(move || {
                start.wait();
                let mut tokens = Vec::new();
                for _ in 0..ROUNDS {
                    let permit = sem.acquire_timeout(ms(60_000)).expect("a permit in time");
                    let now = held.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    tokens.push(permit.fencing_token());
                    thread::sleep(ms(20));
                    held.fetch_sub(1, Ordering::SeqCst);
                    permit.release().unwrap();
                }
                tokens
            })
        })
        .collect();
    let mut tokens: Vec<u64> = workers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect();
    let most = most.load(Ordering::SeqCst);
    assert!(most <= PERMITS, "{most} permits held at once");
    assert!(most >= 2, "the permits were never shared ({most} at most)");
    let all = tokens.len();
    assert_eq!(all, THREADS * ROUNDS);
    tokens.sort_unstable();
    tokens.dedup();
    assert_eq!(tokens.len(), all, "a token was granted twice");
    assert_eq!(queued(&name), 0, "nothing left behind");
}

/// A second acquire of a fully taken semaphore waits, and the listing shows
/// one entry per permit holder, with its kind and token.
#[test]
fn permits_are_listed_one_per_holder() {
    let name = unique("etcd-sem-list");
    let c = client(ms(5000));
    let sem = c.semaphore(&name, 2).unwrap();
    let a = sem.try_acquire().unwrap().expect("first permit");
    let b = sem.try_acquire().unwrap().expect("second permit");
    assert!(sem.try_acquire().unwrap().is_none(), "only two permits");
    assert_eq!(sem.live_permits().unwrap(), 2);
    let listed = c.leases_of(&name).unwrap();
    assert_eq!(listed.len(), 2);
    for (l, p) in listed.iter().zip([&a, &b]) {
        assert_eq!(l.kind, LeaseKind::Permit { permits: 2 });
        assert_eq!(l.fencing_token, p.fencing_token());
        assert_eq!(l.owner, c.owner_id());
    }
    // Waiting for one: granted when one is released, in arrival order.
    let waiter = {
        let sem = sem.clone();
        thread::spawn(move || sem.acquire_timeout(ms(20_000)))
    };
    assert!(eventually(ms(10_000), || queued(&name) == 3));
    let b_token = b.fencing_token();
    b.release().unwrap();
    let w = waiter.join().unwrap().expect("granted on a release");
    assert!(w.fencing_token() > b_token);
    assert_eq!(sem.live_permits().unwrap(), 2);
    a.release().unwrap();
    w.release().unwrap();
    assert_eq!(sem.live_permits().unwrap(), 0);
}

/// A semaphore of another count, or readers, on a name whose permits are
/// live: refused (InvalidConfig), leaving nothing queued; once every permit
/// is released, the name can be used otherwise.
#[test]
fn a_count_or_kind_mismatch_is_refused() {
    let name = unique("etcd-mismatch");
    let c = client(ms(5000));
    let three = c.semaphore(&name, 3).unwrap();
    let p = three.try_acquire().unwrap().expect("a permit");
    let five = c.semaphore(&name, 5).unwrap();
    match five.try_acquire() {
        Err(Error::InvalidConfig(msg)) => assert!(msg.contains("3 permits"), "{msg}"),
        other => panic!("expected a mismatch, got {other:?}"),
    }
    // Waiting changes nothing: refused at once.
    let started = Instant::now();
    assert!(matches!(
        five.acquire_timeout(ms(10_000)),
        Err(Error::InvalidConfig(_))
    ));
    assert!(started.elapsed() < ms(5_000));
    assert!(matches!(
        c.rwlock(&name).unwrap().try_read(),
        Err(Error::InvalidConfig(_))
    ));
    // The refused acquires left nothing queued (their leases were revoked).
    assert!(eventually(ms(5_000), || queued(&name) == 1));
    // An exclusive acquire is no mismatch: it waits for the permits.
    assert!(c.try_lock(&name).unwrap().is_none());
    p.release().unwrap();
    let p5 = five
        .try_acquire()
        .unwrap()
        .expect("free again, for any count");
    p5.release().unwrap();

    // Readers live: a semaphore is refused.
    let r = c.rwlock(&name).unwrap().try_read().unwrap().expect("read");
    assert!(matches!(three.try_acquire(), Err(Error::InvalidConfig(_))));
    r.release().unwrap();
}

/// Child role `permit`: takes one permit of `LOCK_NAME` (a semaphore of 1),
/// reports its token, and holds it until killed.
#[test]
#[ignore = "child-process entry point, run by the other tests"]
fn child_entry() {
    let Some(role) = child_role() else { return };
    assert_eq!(role, "permit");
    let name = std::env::var("LOCK_NAME").unwrap();
    let url = std::env::var("DATABASE_URL").unwrap();
    let c = LockClient::etcd(&url).ttl(ms(2000)).build().unwrap();
    let permit = c.semaphore(&name, 1).unwrap().try_acquire().unwrap();
    let permit = permit.expect("the permit is free");
    report(&format!("token {}", permit.fencing_token()));
    // Blocks until the parent kills this process.
    let _ = next_command();
    drop(permit);
}

/// A permit holder that crashes (SIGKILL) keeps its permit until its etcd
/// lease ends: not given to anyone before, given to a waiter after — and
/// the waiter's token is above the crashed holder's.
#[test]
fn a_crashed_permit_holder_returns_its_permit_at_its_lease_end() {
    let name = unique("etcd-sem-crash");
    let mut child = ChildProc::spawn_with_url("permit", &etcd_url(), &[("LOCK_NAME", &name)]);
    let msg = child.recv();
    let crashed: u64 = msg.strip_prefix("token ").expect(&msg).parse().unwrap();
    let c = client(ms(2000));
    let sem = c.semaphore(&name, 1).unwrap();
    child.child.kill().unwrap();
    child.child.wait().unwrap();
    let killed = Instant::now();
    // The crashed holder's lease still runs: its permit is not free.
    assert!(
        sem.try_acquire().unwrap().is_none(),
        "the permit came back before its lease ended"
    );
    let listed = c.leases_of(&name).unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].fencing_token, crashed);
    let permit = sem
        .acquire_timeout(ms(15_000))
        .expect("granted at the lease's end");
    assert!(permit.fencing_token() > crashed);
    // Generous: the lease was 2 s (etcd's whole seconds, from its last
    // keep-alive); a grant far earlier would mean it was not waited for.
    assert!(
        killed.elapsed() >= ms(500),
        "granted after {:?}",
        killed.elapsed()
    );
    permit.release().unwrap();
}

/// force_release ends every reader and returns the highest token; each
/// reader learns of the loss; a writer then gets a token above it.
#[test]
fn force_release_ends_every_shared_holder() {
    let name = unique("etcd-force");
    let c = client(ms(3000));
    let rw = c.rwlock(&name).unwrap();
    let r1 = rw.try_read().unwrap().unwrap();
    let r2 = rw.try_read().unwrap().unwrap();
    let (l1, l2) = (r1.lost(), r2.lost());
    let ended = c.force_release(&name).unwrap();
    assert_eq!(ended, Some(r2.fencing_token()));
    let w = rw
        .write_timeout(ms(5_000))
        .expect("free after force_release");
    assert!(w.fencing_token() > r2.fencing_token());
    for lost in [l1, l2] {
        assert_eq!(lost.recv_timeout(ms(10_000)), Ok(LostReason::NotOwner));
    }
    assert!(matches!(r1.release(), Err(Error::LockLost { .. })));
    drop(r2);
    w.release().unwrap();
    assert_eq!(c.force_release(&name).unwrap(), None);
}

/// Election::watch on etcd: the watch reports a leader when one is elected
/// and none when it resigns, within bounds, with the leader's own term.
#[test]
fn an_election_watch_wakes_on_grant_and_release() {
    let name = unique("etcd-elect");
    let c = client(ms(5000));
    let election = c.election(&name).unwrap();
    let watch = election.watch().unwrap();
    let changes = watch.changes();
    assert_eq!(changes.recv_timeout(ms(10_000)).unwrap(), None);
    let other = client(ms(5000));
    let leadership = other
        .election(&name)
        .unwrap()
        .campaign("node-b", &AcquireOptions::new())
        .unwrap()
        .expect("elected");
    let leader = changes
        .recv_timeout(ms(10_000))
        .unwrap()
        .expect("a leader reported");
    assert_eq!(leader.identity, "node-b");
    assert_eq!(leader.term, leadership.term());
    let started = Instant::now();
    leadership.release().unwrap();
    assert_eq!(changes.recv_timeout(ms(10_000)).unwrap(), None);
    // Woken by the release, not by the (5 s) lease's end.
    assert!(started.elapsed() < ms(4_000), "{:?}", started.elapsed());
}

/// How many KV, lease keep-alive and watch requests a member has started,
/// from its metrics.
fn requests(cluster: &EtcdCluster) -> u64 {
    use std::io::{Read, Write};
    let port = cluster.members[0].client_port;
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = std::net::TcpStream::connect_timeout(&addr, ms(2000)).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text.lines()
        .filter(|l| l.starts_with("grpc_server_started_total{"))
        .filter(|l| {
            ["\"Range\"", "\"Txn\"", "\"Watch\"", "\"LeaseKeepAlive\""]
                .iter()
                .any(|m| l.contains(&format!("grpc_method={m}")))
                && l.contains("etcdserverpb")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Permit waiters wait on a watch, not by polling: while the permits are
/// held they send nothing; when one permit is released, only the first
/// waiter reads the queue again (the others strike the released key from
/// what they know is ahead of them, still too many, and keep watching). On
/// a member of its own, so no other test's requests are counted.
#[test]
fn permit_waiters_watch_and_only_the_next_one_looks_again() {
    let cluster = EtcdCluster::start(1);
    let holder = cluster.builder().ttl(ms(30_000)).build().unwrap();
    let waiters = cluster.builder().ttl(ms(30_000)).build().unwrap();
    let name = unique("etcd-sem-no-poll");
    let sem = holder.semaphore(&name, 2).unwrap();
    let p1 = sem.try_acquire().unwrap().unwrap();
    let p2 = sem.try_acquire().unwrap().unwrap();
    let (tx, rx) = crossbeam_channel::unbounded();
    let (done_tx, done) = crossbeam_channel::bounded::<()>(0);
    thread::scope(|s| {
        for i in 0..3 {
            let (sem, tx) = (waiters.semaphore(&name, 2).unwrap(), tx.clone());
            let done = done.clone();
            s.spawn(move || {
                let permit = sem.acquire_timeout(ms(30_000)).unwrap();
                tx.send((i, permit.fencing_token())).unwrap();
                // Held until the test is done (the sender dropped).
                let _ = done.recv();
                permit.release().unwrap();
            });
            // Queued in this order.
            assert!(eventually(ms(5000), || waiters.metrics().acquires_waiting == i + 1));
        }
        // Each waiter opens its watch right after it counts as waiting.
        thread::sleep(ms(300));
        let before = requests(&cluster);
        thread::sleep(ms(3000));
        let during = requests(&cluster) - before;
        assert!(during <= 1, "{during} requests while waiting 3 s: polling");

        let before = requests(&cluster);
        p1.release().unwrap();
        let (first, _) = rx.recv_timeout(ms(10_000)).unwrap();
        assert_eq!(first, 0, "the first to arrive is the first granted");
        // Time for the others to (wrongly) look again.
        thread::sleep(ms(1000));
        let after = requests(&cluster) - before;
        // The release's transaction and the first waiter's read.
        assert!(
            after <= 3,
            "{after} requests for one release: the waiters all looked"
        );
        assert!(rx.try_recv().is_err(), "a third permit of 2");
        p2.release().unwrap();
        let (second, _) = rx.recv_timeout(ms(10_000)).unwrap();
        assert_eq!(second, 1);
        // The third is granted once the first two leave.
        drop(done_tx);
        let (third, _) = rx.recv_timeout(ms(10_000)).unwrap();
        assert_eq!(third, 2);
    });
}

/// Permit waiters are served in arrival order (their keys' create
/// revisions), and a newcomer does not overtake them.
#[test]
fn permit_waiters_are_served_in_arrival_order() {
    let name = unique("etcd-order");
    let (a, b, c) = (client(ms(5000)), client(ms(5000)), client(ms(5000)));
    // The holder's key and one per waiter.
    let mut waiting = |n: usize| queued(&name) == 1 + n as u64;
    common::coordination::permit_waiters_in_arrival_order((&a, &b, &c), &name, &mut waiting, true);
}
