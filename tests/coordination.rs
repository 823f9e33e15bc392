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
