//! The fenced work queue of `examples/work_queue.rs`, run by several worker
//! processes that are killed and frozen at random: every job's effect is
//! applied exactly once, none is lost, a killed worker's jobs come back after
//! their lease, and a frozen worker's late completion is refused.

// The example finds its server through tests/common/server.rs, as `common` does.
#![allow(clippy::duplicate_mod)]

mod common;
#[path = "../examples/work_queue.rs"]
mod work_queue;

use std::time::{Duration, Instant};

use common::history::Rng;
use common::*;
use lockbox::LockClient;
use work_queue::{Outcome, setup, work_one};

const TTL_MS: u64 = 500;

fn worker_client() -> LockClient {
    LockClient::builder(database_url())
        .ttl(ms(TTL_MS))
        .build()
        .unwrap()
}

#[test]
#[ignore = "child-process entry point, run by the other tests"]
fn child_entry() {
    let Some(role) = child_role() else { return };
    let queue = std::env::var("QUEUE").unwrap();
    let client = worker_client();
    let mut db = postgres::Client::connect(database_url(), postgres::NoTls).unwrap();
    let me = format!("{role}-{}", std::process::id());
    match role.as_str() {
        "worker" => {
            let mut rng = Rng::new(std::process::id() as u64);
            let mut refused = 0;
            loop {
                let pause = ms(20 + rng.below(80));
                match work_one(&client, &mut db, &queue, &me, |_| std::thread::sleep(pause)) {
                    Ok(Outcome::Done(_)) => {}
                    Ok(Outcome::Refused(_)) => refused += 1,
                    Ok(Outcome::Busy) => std::thread::sleep(ms(20)),
                    Ok(Outcome::Empty) => break,
                    // A store error (the parent's faults reach the database
                    // sessions too): the job stays undone, and is claimed again.
                    Err(e) => eprintln!("{me}: {e}"),
                }
            }
            report(&format!("refused {refused}"));
        }
        "frozen" => {
            let outcome = work_one(&client, &mut db, &queue, &me, |job| {
                report(&format!("working {job}"));
                assert_eq!(next_command(), "go");
            })
            .unwrap();
            report(&format!("{outcome:?}"));
        }
        other => panic!("unknown role {other}"),
    }
}

/// Per job: how many effects, and whether the job is marked done by the
/// token of its one effect.
fn audit(queue: &str) -> Vec<(i64, i64, bool)> {
    admin()
        .query(
            &format!(
                "SELECT j.id, count(e.job), bool_and(j.done AND j.done_token = e.token) \
                 FROM {queue}_jobs j LEFT JOIN {queue}_effects e ON e.job = j.id \
                 GROUP BY j.id ORDER BY j.id"
            ),
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| {
            (
                r.get(0),
                r.get(1),
                r.get::<_, Option<bool>>(2).unwrap_or(false),
            )
        })
        .collect()
}

#[test]
fn every_job_is_done_exactly_once_while_workers_are_killed_and_frozen() {
    let queue = unique("wq").replace('-', "_");
    setup(&mut admin(), &queue, 90).unwrap();
    let spawn = || ChildProc::spawn("worker", &[("QUEUE", &queue)]);
    let mut workers: Vec<ChildProc> = (0..3).map(|_| spawn()).collect();
    let seed = std::process::id() as u64;
    eprintln!("work queue seed = {seed}");
    let mut rng = Rng::new(seed);
    let (mut killed, mut frozen) = (0, 0);
    let end = Instant::now() + Duration::from_secs(60);
    let undone = || -> i64 {
        admin()
            .query_one(
                &format!("SELECT count(*) FROM {queue}_jobs WHERE NOT done"),
                &[],
            )
            .unwrap()
            .get(0)
    };
    // Faults while jobs remain (a kill and a freeze first, whatever is left:
    // the jobs take seconds); each worker exits once the queue is empty.
    let mut n = 0;
    while (n < 2 || undone() > 0) && Instant::now() < end {
        std::thread::sleep(ms(50 + rng.below(150)));
        let i = rng.below(workers.len() as u64) as usize;
        n += 1;
        let kill = match n {
            1 => true,
            2 => false,
            _ => rng.below(2) == 0,
        };
        if kill {
            // Crashed mid-job: its locks' leases run out and the jobs come back.
            workers[i].signal("KILL");
            let _ = workers[i].child.wait();
            workers[i] = spawn();
            killed += 1;
        } else {
            // Frozen past its lease: its late completions must be refused.
            workers[i].signal("STOP");
            std::thread::sleep(ms(TTL_MS + 300));
            workers[i].signal("CONT");
            frozen += 1;
        }
    }
    let mut refused = 0;
    for mut w in workers {
        refused += w
            .recv()
            .strip_prefix("refused ")
            .unwrap()
            .parse::<u64>()
            .unwrap();
        w.wait_success();
    }
    eprintln!("killed {killed}, frozen {frozen}, late completions refused {refused}");
    assert!(killed > 0 && frozen > 0, "no fault was injected");
    let audit = audit(&queue);
    assert_eq!(audit.len(), 90);
    for (job, effects, marked) in audit {
        assert_eq!(
            effects, 1,
            "job {job} had its effect applied {effects} times"
        );
        assert!(marked, "job {job} is not marked done by its effect's token");
    }
    admin()
        .batch_execute(&format!("DROP TABLE {queue}_jobs, {queue}_effects"))
        .unwrap();
}

#[test]
fn a_frozen_workers_late_completion_is_refused() {
    let queue = unique("wqf").replace('-', "_");
    setup(&mut admin(), &queue, 1).unwrap();
    let mut frozen = ChildProc::spawn("frozen", &[("QUEUE", &queue)]);
    assert_eq!(frozen.recv(), "working 1");
    frozen.signal("STOP");
    // Another worker takes the job over once the frozen one's lease has run
    // out (its session, a zombie, is ended by the takeover) and completes it.
    let client = worker_client();
    let mut db = admin();
    let end = Instant::now() + Duration::from_secs(30);
    let mine = loop {
        match work_one(&client, &mut db, &queue, "successor", |_| {}).unwrap() {
            Outcome::Done(job) => break job,
            // Still the frozen worker's: its lease has not run out yet.
            Outcome::Busy => std::thread::sleep(ms(20)),
            Outcome::Empty => panic!("the job was completed by the frozen worker"),
            Outcome::Refused(job) => panic!("the successor lost job {job}"),
        }
    };
    assert!(Instant::now() < end);
    assert_eq!(mine, 1);
    frozen.signal("CONT");
    frozen.send("go");
    assert_eq!(frozen.recv(), "Refused(1)");
    frozen.wait_success();
    assert_eq!(audit(&queue), vec![(1, 1, true)]);
    admin()
        .batch_execute(&format!("DROP TABLE {queue}_jobs, {queue}_effects"))
        .unwrap();
}
