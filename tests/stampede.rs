//! 520 contenders on one name, across 4 processes of 130 threads each, on a
//! throwaway cluster: one holder at a time, every contender acquires within its
//! wait, and connections stay within the pools' bounds (far under the server's
//! limit).

mod common;

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::thread;

use common::server::Cluster;
use common::*;
use lockbox::LockClient;

const PROCESSES: usize = 4;
const THREADS: usize = 130;
const POOL: u32 = 16;

#[test]
#[ignore = "child-process entry point, run by the other tests"]
fn child_entry() {
    let Some(role) = child_role() else { return };
    assert_eq!(role, "stampede");
    let name = std::env::var("LOCK_NAME").unwrap();
    let url = std::env::var("DATABASE_URL").unwrap();
    let client = LockClient::builder(&url)
        .pool_size(POOL)
        .pool_timeout(ms(120_000))
        .build()
        .unwrap();
    // One connection for the counter, shared under a mutex, outside the pool.
    let counter = Mutex::new(postgres::Client::connect(&url, postgres::NoTls).unwrap());
    report("ready");
    assert_eq!(next_command(), "go");
    thread::scope(|s| {
        for _ in 0..THREADS {
            s.spawn(|| {
                let lock = client
                    .lock_timeout(&name, ms(120_000))
                    .expect("acquired within the wait");
                // Read-modify-write in two statements: any overlap loses an update.
                let mut db = counter.lock().unwrap();
                let v: i64 = db.query_one("SELECT v FROM stampede", &[]).unwrap().get(0);
                db.execute("UPDATE stampede SET v = $1", &[&(v + 1)])
                    .unwrap();
                drop(db);
                lock.release().unwrap();
            });
        }
    });
    report("done");
}

#[test]
fn five_hundred_contenders_on_one_name() {
    let cluster = Cluster::start().expect("throwaway cluster");
    let mut db = postgres::Client::connect(&cluster.url, postgres::NoTls).unwrap();
    db.batch_execute("CREATE TABLE stampede (v bigint NOT NULL); INSERT INTO stampede VALUES (0);")
        .unwrap();
    drop(LockClient::builder(&cluster.url).build().unwrap()); // the lease table exists
    let name = "stampede";

    let mut children: Vec<ChildProc> = (0..PROCESSES)
        .map(|_| ChildProc::spawn_with_url("stampede", &cluster.url, &[("LOCK_NAME", name)]))
        .collect();
    for child in &mut children {
        assert_eq!(child.recv(), "ready");
    }
    let peak = AtomicI64::new(0);
    let stop = AtomicBool::new(false);
    thread::scope(|s| {
        s.spawn(|| {
            let mut watch = postgres::Client::connect(&cluster.url, postgres::NoTls).unwrap();
            while !stop.load(Ordering::Relaxed) {
                let n: i64 = watch
                    .query_one("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'", &[])
                    .unwrap()
                    .get(0);
                peak.fetch_max(n, Ordering::Relaxed);
                thread::sleep(ms(20));
            }
        });
        for child in &mut children {
            child.send("go");
        }
        for child in &mut children {
            assert_eq!(child.recv(), "done");
        }
        stop.store(true, Ordering::Relaxed);
    });
    for child in children {
        child.wait_success();
    }
    let total = (PROCESSES * THREADS) as i64;
    let v: i64 = db.query_one("SELECT v FROM stampede", &[]).unwrap().get(0);
    assert_eq!(v, total, "an update was lost: two holders overlapped");
    let token: i64 = db
        .query_one("SELECT token FROM lockbox_leases WHERE name = $1", &[&name])
        .unwrap()
        .get(0);
    assert_eq!(token, total);
    // Pools of 16 plus one counter connection per process, plus this test's own.
    let bound = (PROCESSES as i64) * (i64::from(POOL) + 1) + 3;
    let peak = peak.load(Ordering::Relaxed);
    assert!(peak <= bound, "{peak} sessions, bound {bound}");
    drop(db);
    drop(cluster);
}
