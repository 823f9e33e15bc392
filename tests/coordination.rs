//! The coordination primitives' suite, run against every backend that grants
//! shared leases.

mod common;

use lockbox::{LockClient, MemoryBackend};

coordination_suite!(memory, LockClient::with_backend(MemoryBackend::global()));
coordination_suite!(postgres, LockClient::builder(common::database_url()));
coordination_suite!(redis, LockClient::redis(common::redis_server::redis_url()));

use std::time::{Duration, Instant};

use common::{ChildProc, child_role, next_command, report, store_builder, unique};

/// The child processes of the cross-process tests: each takes what it is told
/// (`permit` of a 2-permit semaphore, `read` or `write` of an rwlock) and
/// reports `got <token>` or `none`, then holds it until told `release` (or
/// until killed).
#[test]
#[ignore = "child-process entry point, run by the other tests"]
fn child_entry() {
    let Some(role) = child_role() else { return };
    assert_eq!(role, "holder");
    let name = std::env::var("LOCK_NAME").unwrap();
    let client = store_builder(&std::env::var("STORE").unwrap())
        .ttl(Duration::from_millis(1500))
        .build()
        .unwrap();
    report("ready");
    loop {
        let cmd = next_command();
        let guard: Option<Box<dyn std::any::Any>> = match cmd.as_str() {
            "permit" => client
                .semaphore(&name, 2)
                .unwrap()
                .try_acquire()
                .unwrap()
                .map(|p| {
                    report(&format!("got {}", p.fencing_token()));
                    Box::new(p) as Box<dyn std::any::Any>
                }),
            "permit-wait" => {
                let p = client
                    .semaphore(&name, 2)
                    .unwrap()
                    .acquire_timeout(Duration::from_secs(20))
                    .unwrap();
                report(&format!("got {}", p.fencing_token()));
                Some(Box::new(p) as Box<dyn std::any::Any>)
            }
            "read" => client.rwlock(&name).unwrap().try_read().unwrap().map(|r| {
                report(&format!("got {}", r.fencing_token()));
                Box::new(r) as Box<dyn std::any::Any>
            }),
            "write" => client.rwlock(&name).unwrap().try_write().unwrap().map(|w| {
                report(&format!("got {}", w.fencing_token()));
                Box::new(w) as Box<dyn std::any::Any>
            }),
            "" | "exit" => return,
            other => panic!("unknown command {other}"),
        };
        if guard.is_none() {
            report("none");
            continue;
        }
        assert_eq!(next_command(), "release");
        drop(guard);
        report("released");
    }
}

/// Asks `child` to take `what`; its token if it got it.
fn take(child: &mut ChildProc, what: &str) -> Option<u64> {
    child.send(what);
    let answer = child.recv();
    answer
        .strip_prefix("got ")
        .map(|t| t.parse().unwrap())
        .or_else(|| {
            assert_eq!(answer, "none");
            None
        })
}

/// Semaphores and reader-writer locks across processes: two permits of two
/// in two processes refuse a third; a holder killed with SIGKILL keeps its
/// permit until its lease ends; readers in two processes exclude a writer in
/// a third.
fn across_processes(store: &str) {
    let env = |name: &str| {
        vec![
            ("LOCK_NAME".to_owned(), name.to_owned()),
            ("STORE".to_owned(), store.to_owned()),
        ]
    };
    let spawn = |name: &str| {
        let env = env(name);
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let mut c = ChildProc::spawn("holder", &env);
        assert_eq!(c.recv(), "ready");
        c
    };
    let sem = unique(&format!("coord-procs-sem-{store}"));
    let mut kids: Vec<ChildProc> = (0..3).map(|_| spawn(&sem)).collect();
    let first = take(&mut kids[0], "permit").expect("a first permit");
    let second = take(&mut kids[1], "permit").expect("a second permit");
    assert_ne!(first, second);
    assert_eq!(take(&mut kids[2], "permit"), None, "a third permit of 2");
    // A crash: the holder's permit stays taken until its lease ends.
    let killed_at = Instant::now();
    kids[0].signal("KILL");
    assert_eq!(
        take(&mut kids[2], "permit"),
        None,
        "a crashed holder's permit came back at once"
    );
    // Renewed at least every third of the TTL, the killed holder's lease had
    // two thirds of it left at the kill: no permit may come back before half.
    let third = take(&mut kids[2], "permit-wait").expect("the permit came back");
    assert!(
        killed_at.elapsed() >= Duration::from_millis(750),
        "a crashed holder's permit came back {:?} after the kill, before its lease ended",
        killed_at.elapsed()
    );
    assert!(third > second);
    kids[1].send("release");
    assert_eq!(kids[1].recv(), "released");
    kids[2].send("release");
    assert_eq!(kids[2].recv(), "released");
    let _ = kids.remove(0).child.wait();
    for mut k in kids {
        k.send("exit");
        k.wait_success();
    }

    let rw = unique(&format!("coord-procs-rw-{store}"));
    let mut kids: Vec<ChildProc> = (0..3).map(|_| spawn(&rw)).collect();
    let r1 = take(&mut kids[0], "read").expect("a reader");
    let r2 = take(&mut kids[1], "read").expect("readers share across processes");
    assert_eq!(take(&mut kids[2], "write"), None, "a writer beside readers");
    for k in &mut kids[..2] {
        k.send("release");
        assert_eq!(k.recv(), "released");
    }
    let w = take(&mut kids[2], "write").expect("the writer once the readers left");
    assert!(w > r1.max(r2));
    assert_eq!(
        take(&mut kids[0], "read"),
        None,
        "a reader beside the writer"
    );
    kids[2].send("release");
    assert_eq!(kids[2].recv(), "released");
    for mut k in kids {
        k.send("exit");
        k.wait_success();
    }
}

#[test]
fn postgres_across_processes() {
    across_processes("postgres");
}

#[test]
fn redis_across_processes() {
    across_processes("redis");
}

#[test]
fn etcd_across_processes() {
    // Started here, so that every child uses this one member.
    let _ = common::etcd_server::etcd_url();
    across_processes("etcd");
}

/// A waiter frozen (SIGSTOP) at the head of a PostgreSQL semaphore's queue
/// holds nobody up for long: its session, idle past the gate's timeout, is
/// ended by the server, and the waiter behind it is granted the freed
/// permit within its wait.
#[test]
fn postgres_frozen_head_of_the_queue_is_passed() {
    use common::eventually;
    let name = unique("coord-frozen-gate");
    let url = common::database_url();
    let mut db = lockbox::postgres::Client::connect(url, lockbox::postgres::NoTls).unwrap();
    let owner = LockClient::builder(url)
        .ttl(Duration::from_secs(60))
        .build()
        .unwrap();
    let sem = owner.semaphore(&name, 2).unwrap();
    let held = [
        sem.try_acquire().unwrap().unwrap(),
        sem.try_acquire().unwrap().unwrap(),
    ];
    let env = [("LOCK_NAME", name.as_str()), ("STORE", "postgres")];
    let mut child = ChildProc::spawn("holder", &env);
    assert_eq!(child.recv(), "ready");
    child.send("permit-wait");
    // Frozen while idle at the head of the queue (waiting for a release),
    // not in the middle of a statement: thawed and frozen again otherwise.
    let state = |db: &mut lockbox::postgres::Client, pid: i32| -> Option<String> {
        db.query_opt("SELECT state FROM pg_stat_activity WHERE pid = $1", &[&pid])
            .unwrap()
            .and_then(|r| r.get(0))
    };
    let mut frozen = None;
    for _ in 0..200 {
        let (holders, _) = common::pg_gate(&mut db, &name);
        if let [pid] = holders[..]
            && state(&mut db, pid).as_deref() == Some("idle")
        {
            child.signal("STOP");
            if state(&mut db, pid).as_deref() == Some("idle") {
                frozen = Some(pid);
                break;
            }
            child.signal("CONT");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let frozen = frozen.expect("the child never waited idle at the gate");
    let waiter = LockClient::builder(url)
        .ttl(Duration::from_secs(60))
        .build()
        .unwrap();
    std::thread::scope(|s| {
        let behind = s.spawn(|| {
            waiter
                .semaphore(&name, 2)
                .unwrap()
                .acquire_timeout(Duration::from_secs(40))
        });
        assert!(
            eventually(Duration::from_secs(10), || common::pg_gate(&mut db, &name)
                .1
                .len()
                == 1),
            "the second waiter never queued at the gate"
        );
        let [first, second] = held;
        let freed = first.fencing_token();
        first.release().unwrap();
        let permit = behind
            .join()
            .unwrap()
            .expect("the waiter behind the frozen one was held up past its wait");
        assert!(permit.fencing_token() > freed);
        assert!(
            state(&mut db, frozen).is_none(),
            "the frozen waiter's session still runs"
        );
        permit.release().unwrap();
        second.release().unwrap();
    });
    child.signal("KILL");
    let _ = child.child.wait();
}

/// In memory, permit waiters are served in arrival order, and a newcomer
/// does not overtake them.
#[test]
fn memory_permit_waiters_are_served_in_arrival_order() {
    let store = MemoryBackend::new();
    let client = || {
        LockClient::with_backend(store.clone())
            .ttl(Duration::from_secs(30))
            .build()
            .unwrap()
    };
    let (a, b, c) = (client(), client(), client());
    let waiting =
        |n: usize| b.metrics().acquires_waiting + c.metrics().acquires_waiting == n as u64;
    common::coordination::permit_waiters_in_arrival_order(
        (&a, &b, &c),
        &unique("coord-mem-order"),
        &mut { waiting },
        true,
    );
}

/// A process frozen (SIGSTOP) in the middle of a PostgreSQL shared grant's
/// transaction, the name's row locked, holds nobody up for long: the
/// server ends its session once the transaction has sat idle past its
/// bound, and the next acquire of the name is granted within its wait.
/// The child is frozen while its grant waits for a fenced transaction of an
/// ended permit; once that commits, the grant's statement finishes and the
/// frozen child's transaction sits idle with the row locked.
#[test]
fn postgres_frozen_in_a_grant_transaction_is_passed() {
    use common::eventually;
    let name = unique("coord-frozen-tx");
    let url = common::database_url();
    let connect = || lockbox::postgres::Client::connect(url, lockbox::postgres::NoTls).unwrap();
    let (mut db, mut fence_db) = (connect(), connect());
    let owner = LockClient::builder(url)
        .ttl(Duration::from_secs(60))
        .build()
        .unwrap();
    let first = owner
        .semaphore(&name, 2)
        .unwrap()
        .try_acquire()
        .unwrap()
        .unwrap();
    let fence_pid: i32 = fence_db
        .query_one("SELECT pg_backend_pid()", &[])
        .unwrap()
        .get(0);
    let mut fence = fence_db.transaction().unwrap();
    first.fence(&mut fence).unwrap();
    first.release().unwrap();
    let env = [("LOCK_NAME", name.as_str()), ("STORE", "postgres")];
    let mut child = ChildProc::spawn("holder", &env);
    assert_eq!(child.recv(), "ready");
    child.send("permit-wait");
    let blocked_by_fence = |db: &mut lockbox::postgres::Client| -> Vec<i32> {
        db.query(
            "SELECT pid FROM pg_stat_activity WHERE $1::int4 = ANY(pg_blocking_pids(pid))",
            &[&fence_pid],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
    };
    let mut frozen = None;
    for _ in 0..500 {
        if let [pid] = blocked_by_fence(&mut db)[..] {
            child.signal("STOP");
            if blocked_by_fence(&mut db) == [pid] {
                frozen = Some(pid);
                break;
            }
            child.signal("CONT");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let frozen = frozen.expect("the child's grant never waited for the fence");
    fence.commit().unwrap();
    let state = |db: &mut lockbox::postgres::Client| -> Option<String> {
        db.query_opt(
            "SELECT state FROM pg_stat_activity WHERE pid = $1",
            &[&frozen],
        )
        .unwrap()
        .and_then(|r| r.get(0))
    };
    assert!(
        eventually(Duration::from_secs(10), || state(&mut db).as_deref()
            == Some("idle in transaction")),
        "the frozen child's grant never finished its statement: {:?}",
        state(&mut db)
    );
    let next = owner
        .semaphore(&name, 2)
        .unwrap()
        .acquire_timeout(Duration::from_secs(40))
        .expect("held up past its wait by the frozen transaction");
    assert_eq!(
        state(&mut db),
        None,
        "the frozen child's session still runs"
    );
    next.release().unwrap();
    child.signal("KILL");
    let _ = child.child.wait();
}
