//! Readers, permits and watches on Redis (issue 12), beyond the shared
//! coordination suite: what the store holds, crashes of holders and waiters
//! (killed child processes), permit waiters' order, announcements on the
//! release channel, data loss and lost keys, and failing scripts that write
//! nothing.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::redis_server::{RedisServer, redis_url};
use common::*;
use lockbox::{AcquireOptions, Error, LeaseKind, LeaseStatus, LockClient, LostReason};

fn conn() -> redis::Connection {
    redis::Client::open(redis_url())
        .unwrap()
        .get_connection_with_timeout(Duration::from_secs(5))
        .unwrap()
}

/// The server's clock, in ms.
fn server_ms(c: &mut redis::Connection) -> u64 {
    let (s, us): (u64, u64) = redis::cmd("TIME").query(c).unwrap();
    s * 1000 + us / 1000
}

#[test]
#[ignore = "child-process entry point, run by the other tests"]
fn child_entry() {
    let Some(role) = child_role() else { return };
    let name = std::env::var("LOCK_NAME").unwrap();
    let client = LockClient::redis(&std::env::var("REDIS_URL").unwrap())
        .ttl(ms(1000))
        .build()
        .unwrap();
    match role.as_str() {
        // Holds a permit of 1 until killed.
        "permit" => {
            let p = client.semaphore(&name, 1).unwrap().try_acquire().unwrap();
            let p = p.expect("the permit is free");
            report(&format!("held {}", p.fencing_token()));
            next_command();
            drop(p);
        }
        // Waits to write (behind the parent's reader) until killed.
        "writer" => {
            report("waiting");
            let w = client
                .rwlock(&name)
                .unwrap()
                .write_timeout(Duration::from_secs(60));
            drop(w);
        }
        other => panic!("unknown role {other}"),
    }
}

fn spawn(role: &str, name: &str) -> ChildProc {
    ChildProc::spawn_with_url(
        role,
        redis_url(),
        &[("LOCK_NAME", name), ("REDIS_URL", redis_url())],
    )
}

/// A holder killed without releasing keeps its permit until its lease ends by
/// the server's clock, and not a moment beyond that is needed: the next
/// permit's grant (its `acquired_at`, server time) is at or after the dead
/// holder's recorded end, its token above.
#[test]
fn a_killed_holders_permit_returns_at_its_lease_end() {
    let name = unique("rs-kill");
    let client = LockClient::redis(redis_url())
        .ttl(ms(1000))
        .build()
        .unwrap();
    let sem = client.semaphore(&name, 1).unwrap();
    let mut child = spawn("permit", &name);
    let msg = child.recv();
    let token: u64 = msg.strip_prefix("held ").unwrap().parse().unwrap();
    child.signal("KILL");
    let _ = child.child.wait();
    let mut c = conn();
    let member = format!("{token}|");
    let holders: Vec<(String, u64)> = redis::cmd("ZRANGE")
        .arg(format!("lockbox:holders:{name}"))
        .arg(0)
        .arg(-1)
        .arg("WITHSCORES")
        .query(&mut c)
        .unwrap();
    let ends = holders
        .iter()
        .find(|(m, _)| m.starts_with(&member))
        .map(|(_, end)| *end)
        .expect("the dead holder's lease is recorded");
    assert!(
        sem.try_acquire().unwrap().is_none(),
        "granted while the dead holder's lease ran"
    );
    let next = sem.acquire_timeout(Duration::from_secs(10)).unwrap();
    let info = client
        .leases_of(&name)
        .unwrap()
        .into_iter()
        .find(|l| l.fencing_token == next.fencing_token())
        .expect("listed");
    let granted_ms = info
        .acquired_at
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    assert!(
        granted_ms >= ends,
        "granted at {granted_ms}, the dead holder's lease ran to {ends}"
    );
    assert!(next.fencing_token() > token);
    next.release().unwrap();
}

/// A writer that waits behind a reader keeps new readers out; killed, its
/// mark lapses by itself (within its TTL) and readers are granted again.
#[test]
fn a_killed_waiting_writer_stops_holding_readers_back() {
    let name = unique("rs-wkill");
    let client = LockClient::redis(redis_url())
        .ttl(ms(1000))
        .build()
        .unwrap();
    let rw = client.rwlock(&name).unwrap();
    let first = rw.try_read().unwrap().unwrap();
    let mut child = spawn("writer", &name);
    assert_eq!(child.recv(), "waiting");
    let mut c = conn();
    let writers_key = format!("lockbox:writers:{name}");
    assert!(
        eventually(ms(5000), || redis::cmd("EXISTS")
            .arg(&writers_key)
            .query::<bool>(&mut c)
            .unwrap()),
        "the waiting writer left no mark"
    );
    assert!(
        rw.try_read().unwrap().is_none(),
        "a new reader overtook the waiting writer"
    );
    child.signal("KILL");
    let _ = child.child.wait();
    let killed = Instant::now();
    let second = rw
        .read_timeout(Duration::from_secs(10))
        .expect("readers are granted once the dead writer's mark lapsed");
    // The mark lives one TTL (1 s) at most; generous bound for a loaded machine.
    assert!(killed.elapsed() < Duration::from_secs(5));
    assert!(first.is_held());
    second.release().unwrap();
    first.release().unwrap();
}

/// Readers and writers racing on one name from several clients and threads:
/// never a writer beside anyone.
#[test]
fn readers_and_writers_race_without_overlap() {
    let name = unique("rs-race");
    let clients: Vec<LockClient> = (0..3)
        .map(|_| {
            LockClient::redis(redis_url())
                .ttl(ms(2000))
                .build()
                .unwrap()
        })
        .collect();
    let readers = AtomicUsize::new(0);
    let writers = AtomicUsize::new(0);
    let (most_readers, writes) = (AtomicUsize::new(0), AtomicUsize::new(0));
    thread::scope(|s| {
        for t in 0..9 {
            let c = &clients[t % 3];
            let (name, readers, writers, most_readers, writes) =
                (&name, &readers, &writers, &most_readers, &writes);
            s.spawn(move || {
                let rw = c.rwlock(name).unwrap();
                for i in 0..12 {
                    if (t + i) % 4 == 0 {
                        let w = rw.write_timeout(Duration::from_secs(60)).unwrap();
                        assert_eq!(writers.fetch_add(1, Ordering::SeqCst), 0, "two writers");
                        assert_eq!(readers.load(Ordering::SeqCst), 0, "a writer beside readers");
                        thread::sleep(ms(3));
                        writers.fetch_sub(1, Ordering::SeqCst);
                        writes.fetch_add(1, Ordering::SeqCst);
                        w.release().unwrap();
                    } else {
                        let r = rw.read_timeout(Duration::from_secs(60)).unwrap();
                        let now = readers.fetch_add(1, Ordering::SeqCst) + 1;
                        most_readers.fetch_max(now, Ordering::SeqCst);
                        assert_eq!(
                            writers.load(Ordering::SeqCst),
                            0,
                            "a reader beside a writer"
                        );
                        thread::sleep(ms(3));
                        readers.fetch_sub(1, Ordering::SeqCst);
                        r.release().unwrap();
                    }
                }
            });
        }
    });
    assert_eq!(writes.load(Ordering::SeqCst), 27);
    assert!(most_readers.load(Ordering::SeqCst) >= 1);
}

/// Many threads of several clients on a semaphore of 2: the store never has
/// more than 2 live permits, whatever the client side believes.
#[test]
fn the_store_never_lists_more_than_n_live_permits() {
    let name = unique("rs-sem");
    let clients: Vec<LockClient> = (0..3)
        .map(|_| {
            LockClient::redis(redis_url())
                .ttl(ms(2000))
                .build()
                .unwrap()
        })
        .collect();
    let inside = AtomicUsize::new(0);
    let stop = std::sync::atomic::AtomicBool::new(false);
    thread::scope(|s| {
        // Watches the store itself, as fast as it can.
        let watcher = s.spawn(|| {
            let mut c = conn();
            let key = format!("lockbox:holders:{name}");
            let mut most = 0;
            while !stop.load(Ordering::SeqCst) {
                let now = server_ms(&mut c);
                let live: usize = redis::cmd("ZCOUNT")
                    .arg(&key)
                    .arg(format!("({now}"))
                    .arg("+inf")
                    .query(&mut c)
                    .unwrap();
                most = most.max(live);
            }
            most
        });
        let workers: Vec<_> = (0..10)
            .map(|t| {
                let (c, name, inside) = (&clients[t % 3], &name, &inside);
                s.spawn(move || {
                    let sem = c.semaphore(name, 2).unwrap();
                    for _ in 0..8 {
                        let p = sem.acquire_timeout(Duration::from_secs(60)).unwrap();
                        let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                        assert!(now <= 2, "{now} permits of 2 held");
                        thread::sleep(ms(2));
                        inside.fetch_sub(1, Ordering::SeqCst);
                        p.release().unwrap();
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().unwrap();
        }
        stop.store(true, Ordering::SeqCst);
        let most = watcher.join().unwrap();
        assert!(most <= 2, "the store held {most} live permits of 2");
        assert!(most >= 1, "the watcher saw nothing");
    });
}

/// Permit waiters are served in the order they came: with one permit, the
/// waiter that queued first gets the freed permit, whoever asks first after
/// the release; and a newcomer does not overtake queued waiters.
#[test]
fn permit_waiters_are_served_in_arrival_order() {
    let name = unique("rs-order");
    let client = || {
        LockClient::redis(redis_url())
            .ttl(ms(2000))
            .build()
            .unwrap()
    };
    let (a, b, c) = (client(), client(), client());
    let mut conn = conn();
    let queue = format!("lockbox:queue:{name}");
    let mut queued = |n: usize| {
        let len: usize = redis::cmd("ZCARD").arg(&queue).query(&mut conn).unwrap();
        len == n
    };
    common::coordination::permit_waiters_in_arrival_order((&a, &b, &c), &name, &mut queued, true);
    let left: usize = redis::cmd("ZCARD").arg(&queue).query(&mut conn).unwrap();
    assert_eq!(left, 0, "places left behind");
}

/// A waiter that gives up takes its place back at once: a newcomer is
/// granted the freed permit without waiting for the place to lapse.
#[test]
fn a_permit_waiter_that_gives_up_leaves_no_place() {
    let name = unique("rs-giveup");
    let client = LockClient::redis(redis_url())
        .ttl(ms(30_000))
        .build()
        .unwrap();
    let sem = client.semaphore(&name, 1).unwrap();
    let p = sem.try_acquire().unwrap().unwrap();
    assert!(sem.acquire_timeout(ms(300)).unwrap_err().is_timeout());
    p.release().unwrap();
    assert!(
        sem.try_acquire().unwrap().is_some(),
        "a given-up waiter's place held the permit"
    );
}

/// The listing: one entry per permit holder with its kind, owner, metadata
/// and live status; released ones are gone; readers likewise.
#[test]
fn leases_lists_each_shared_holder() {
    let name = unique("rs-list");
    let a = LockClient::redis(redis_url())
        .ttl(ms(5000))
        .build()
        .unwrap();
    let b = LockClient::redis(redis_url())
        .ttl(ms(5000))
        .build()
        .unwrap();
    let opts = AcquireOptions::new().metadata("job-7");
    let p1 = a
        .semaphore(&name, 3)
        .unwrap()
        .acquire(&opts)
        .unwrap()
        .unwrap();
    let p2 = b
        .semaphore(&name, 3)
        .unwrap()
        .try_acquire()
        .unwrap()
        .unwrap();
    let listed = a.leases_of(&name).unwrap();
    assert_eq!(listed.len(), 2, "{listed:?}");
    for (p, c, meta) in [(&p1, &a, Some("job-7")), (&p2, &b, None)] {
        let l = listed
            .iter()
            .find(|l| l.fencing_token == p.fencing_token())
            .expect("listed");
        assert_eq!(l.kind, LeaseKind::Permit { permits: 3 });
        assert_eq!(l.owner, c.owner_id());
        assert_eq!(l.metadata.as_deref(), meta);
        assert!(
            matches!(l.status, LeaseStatus::Held { expires_in } if expires_in <= ms(5000)),
            "{l:?}"
        );
    }
    assert!(
        a.leases()
            .unwrap()
            .iter()
            .filter(|l| l.name == name)
            .count()
            == 2
    );
    p1.release().unwrap();
    let listed = a.leases_of(&name).unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].fencing_token, p2.fencing_token());
    p2.release().unwrap();
    let r = a.rwlock(&name).unwrap().try_read().unwrap().unwrap();
    let listed = a.leases_of(&name).unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].kind, LeaseKind::Shared);
    r.release().unwrap();
}

/// Readers and permits, and semaphores of different counts, do not mix; the
/// refusal names both uses.
#[test]
fn mixed_kinds_are_refused_with_a_typed_error() {
    let name = unique("rs-mix");
    let client = LockClient::redis(redis_url())
        .ttl(ms(5000))
        .build()
        .unwrap();
    let r = client.rwlock(&name).unwrap().try_read().unwrap().unwrap();
    match client.semaphore(&name, 2).unwrap().try_acquire() {
        Err(Error::InvalidConfig(msg)) => {
            assert!(
                msg.contains("reader-writer") && msg.contains("2 permits"),
                "{msg}"
            )
        }
        other => panic!("{other:?}"),
    }
    // A waiting acquire is refused too, at once.
    let start = Instant::now();
    assert!(matches!(
        client
            .semaphore(&name, 2)
            .unwrap()
            .acquire_timeout(ms(2000)),
        Err(Error::InvalidConfig(_))
    ));
    assert!(start.elapsed() < ms(1500));
    r.release().unwrap();
    let p = client
        .semaphore(&name, 2)
        .unwrap()
        .try_acquire()
        .unwrap()
        .unwrap();
    match client.semaphore(&name, 4).unwrap().try_acquire() {
        Err(Error::InvalidConfig(msg)) => assert!(msg.contains("2 permits"), "{msg}"),
        other => panic!("{other:?}"),
    }
    p.release().unwrap();
}

/// Announced grants (leaders) and every release are published on the name's
/// channel; ordinary grants are not (no cost on the hot path); a forced
/// release wakes a leader's watchers long before the lease would end.
#[test]
fn announcements_and_forced_releases_reach_watchers() {
    let name = unique("rs-watch");
    let client = LockClient::redis(redis_url())
        .ttl(ms(30_000))
        .build()
        .unwrap();
    let mut sub = conn();
    let mut sub = sub.as_pubsub();
    sub.subscribe(format!("lockbox:released:{name}")).unwrap();
    sub.set_read_timeout(Some(ms(300))).unwrap();
    let lock = client.try_lock(&name).unwrap().unwrap();
    assert!(
        sub.get_message().is_err(),
        "an ordinary grant was published"
    );
    lock.release().unwrap();
    sub.set_read_timeout(Some(ms(5000))).unwrap();
    sub.get_message().expect("a release is published");
    let election = client.election(&name).unwrap();
    let watch = election.watch().unwrap();
    assert_eq!(watch.changes().recv_timeout(ms(5000)).unwrap(), None);
    let leader = election
        .campaign("alpha", &AcquireOptions::new())
        .unwrap()
        .unwrap();
    let msg = sub.get_message().expect("an announced grant is published");
    assert_eq!(msg.get_payload::<String>().unwrap(), "granted");
    let seen = watch.changes().recv_timeout(ms(5000)).unwrap().unwrap();
    assert_eq!(seen.term, leader.term());
    // The lease runs 30 s: only the forced release's publication tells the
    // watcher within 5.
    assert_eq!(client.force_release(&name).unwrap(), Some(leader.term()));
    assert_eq!(watch.changes().recv_timeout(ms(5000)).unwrap(), None);
    assert_eq!(
        leader.lost().recv_timeout(ms(15_000)),
        Ok(LostReason::NotOwner)
    );
}

/// A semaphore's holders key lost (an eviction, a flush of that key): the
/// holders' renewals report the loss (never a silent re-grant), and the next
/// permit's token is still above theirs.
#[test]
fn lost_holders_key_is_reported_and_tokens_still_increase() {
    let name = unique("rs-evict");
    let client = LockClient::redis(redis_url()).ttl(ms(600)).build().unwrap();
    let sem = client.semaphore(&name, 2).unwrap();
    let (p1, p2) = (
        sem.try_acquire().unwrap().unwrap(),
        sem.try_acquire().unwrap().unwrap(),
    );
    let mut c = conn();
    redis::cmd("DEL")
        .arg(format!("lockbox:holders:{name}"))
        .arg(format!("lockbox:group:{name}"))
        .query::<i64>(&mut c)
        .unwrap();
    assert_eq!(p1.lost().recv_timeout(ms(3000)), Ok(LostReason::NotOwner));
    assert_eq!(p2.lost().recv_timeout(ms(3000)), Ok(LostReason::NotOwner));
    let next = sem.try_acquire().unwrap().unwrap();
    assert!(next.fencing_token() > p1.fencing_token().max(p2.fencing_token()));
    next.release().unwrap();
}

/// A restart without persistence loses the permits while their holders keep
/// working: nothing is granted before the old leases could have ended (the
/// lock-delay), tokens go on above the old ones, and the old holder's renewal
/// reports the loss. Likewise for a reader against a writer.
#[test]
fn a_restart_gives_permits_a_lock_delay_and_higher_tokens() {
    let mut s = RedisServer::start().unwrap();
    let ttl_a = ms(2000);
    let a = LockClient::redis(&s.url).ttl(ttl_a).build().unwrap();
    let b = LockClient::redis(&s.url).ttl(ms(500)).build().unwrap();
    drop(b.try_lock("warm-up").unwrap().unwrap());
    let held = a
        .semaphore("sem", 1)
        .unwrap()
        .try_acquire()
        .unwrap()
        .unwrap();
    let reader = a.rwlock("rw").unwrap().try_read().unwrap().unwrap();
    let killed_at = Instant::now();
    s.kill();
    s.run().unwrap();
    let next = b
        .semaphore("sem", 1)
        .unwrap()
        .acquire_timeout(Duration::from_secs(8))
        .expect("granted after the lock-delay");
    let after = killed_at.elapsed();
    assert!(
        after >= ttl_a,
        "a permit granted {after:?} after the restart"
    );
    assert!(next.fencing_token() > held.fencing_token());
    let writer = b
        .rwlock("rw")
        .unwrap()
        .write_timeout(Duration::from_secs(8))
        .unwrap();
    assert!(writer.fencing_token() > reader.fencing_token());
    assert_eq!(held.lost().recv_timeout(ms(2000)), Ok(LostReason::NotOwner));
    assert_eq!(
        reader.lost().recv_timeout(ms(2000)),
        Ok(LostReason::NotOwner)
    );
    next.release().unwrap();
    writer.release().unwrap();
}

/// Every key a shared acquire touches, of the wrong type: the acquire fails
/// naming the key, and the store is left as it was.
#[test]
fn a_failing_shared_acquire_writes_nothing() {
    let s = RedisServer::start().unwrap();
    let client = LockClient::redis(&s.url).ttl(ms(1000)).build().unwrap();
    let sem = client.semaphore("n", 2).unwrap();
    drop(sem.try_acquire().unwrap().unwrap());
    let mut c = s.connection();
    let snapshot = |c: &mut redis::Connection| -> Vec<(String, Vec<u8>)> {
        let mut keys: Vec<String> = redis::cmd("KEYS").arg("*").query(c).unwrap();
        keys.sort();
        keys.into_iter()
            .map(|k| {
                let dump: Vec<u8> = redis::cmd("DUMP").arg(&k).query(c).unwrap();
                (k, dump)
            })
            .collect()
    };
    for key in [
        "lockbox:holders:n",
        "lockbox:group:n",
        "lockbox:writers:n",
        "lockbox:queue:n",
    ] {
        redis::cmd("DEL").arg(key).query::<i64>(&mut c).unwrap();
        redis::cmd("RPUSH")
            .arg(key)
            .arg("x")
            .query::<i64>(&mut c)
            .unwrap();
        let before = snapshot(&mut c);
        let err = sem.try_acquire().expect_err(key);
        assert!(err.to_string().contains(key), "{key}: {err}");
        assert_eq!(snapshot(&mut c), before, "{key} left partial writes");
        redis::cmd("DEL").arg(key).query::<i64>(&mut c).unwrap();
    }
    drop(
        sem.try_acquire()
            .unwrap()
            .expect("works again once repaired"),
    );
}
