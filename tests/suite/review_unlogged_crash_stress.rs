//! Guarantees 1-3 under load across repeated crashes: several clients take,
//! hold (with extends), and release a few names on dedicated and shared
//! sessions, with waits (the wait-and-grant function) and tries, while the
//! server is crashed (`-m immediate`) several times. Per name, in the order
//! the grants were reported: tokens strictly increase, and no grant is
//! reported before the previous holder last saw its lock held.

use crate::common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::server::Cluster;
use lockbox::{AcquireOptions, LockClient};

struct Rec {
    name: String,
    token: u64,
    granted: Instant,
    last_held: Instant,
    worker: usize,
}

fn rng(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

#[test]
fn crashes_under_load_keep_tokens_and_exclusion() {
    let cluster = Cluster::start().expect("throwaway cluster");
    let url = cluster.url.clone();
    let table = "stress_leases";
    let ttl = Duration::from_millis(700);
    drop(
        LockClient::builder(&url)
            .table(table)
            .ttl(ttl)
            .unlogged_leases(true)
            .build()
            .unwrap(),
    );
    let names = ["n0", "n1", "n2"];
    let recs = Arc::new(Mutex::new(Vec::<Rec>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for w in 0..5usize {
        let (url, recs, stop) = (url.clone(), recs.clone(), stop.clone());
        workers.push(thread::spawn(move || {
            let client = LockClient::builder(&url)
                .table(table)
                .ttl(ttl)
                .build()
                .unwrap();
            let mut seed = 0x9E37_79B9_7F4A_7C15u64 ^ ((w as u64 + 1) * 7919);
            let mut errors = 0;
            while !stop.load(Ordering::Relaxed) {
                let name = names[(rng(&mut seed) % names.len() as u64) as usize];
                let r = rng(&mut seed);
                let mut opts = AcquireOptions::new().dedicated_session(r.is_multiple_of(2));
                if !r.is_multiple_of(3) {
                    opts = opts.wait(Duration::from_secs(4));
                }
                let got = match client.acquire(name, &opts) {
                    Ok(Some(g)) => g,
                    Ok(None) => continue,
                    Err(_) => {
                        errors += 1;
                        thread::sleep(Duration::from_millis(20));
                        continue;
                    }
                };
                let granted = Instant::now();
                let mut last_held = granted;
                let hold = Duration::from_millis(rng(&mut seed) % 900);
                if rng(&mut seed).is_multiple_of(4) {
                    let _ = got.extend(ttl * 2);
                }
                while granted.elapsed() < hold {
                    if got.is_held() {
                        last_held = Instant::now();
                    } else {
                        break;
                    }
                    thread::sleep(Duration::from_millis(5));
                }
                if got.is_held() {
                    last_held = Instant::now();
                }
                let token = got.fencing_token();
                let _ = got.release();
                recs.lock().unwrap().push(Rec {
                    name: name.to_owned(),
                    token,
                    granted,
                    last_held,
                    worker: w,
                });
            }
            errors
        }));
    }
    for _ in 0..4 {
        thread::sleep(Duration::from_millis(2500));
        cluster.stop_server("immediate").unwrap();
        thread::sleep(Duration::from_millis(200));
        cluster.start_server().unwrap();
    }
    thread::sleep(Duration::from_millis(3000));
    stop.store(true, Ordering::Relaxed);
    let errors: usize = workers.into_iter().map(|w| w.join().unwrap()).sum();
    let mut recs = Arc::try_unwrap(recs).ok().unwrap().into_inner().unwrap();
    recs.sort_by_key(|r| r.granted);
    eprintln!("{} grants, {errors} errors", recs.len());
    assert!(recs.len() > 30, "too few grants: {}", recs.len());
    let mut problems = Vec::new();
    for name in names {
        let mine: Vec<&Rec> = recs.iter().filter(|r| r.name == name).collect();
        for pair in mine.windows(2) {
            let (a, b) = (pair[0], pair[1]);
            if b.token <= a.token {
                problems.push(format!(
                    "{name}: token {} (worker {}) after {} (worker {})",
                    b.token, b.worker, a.token, a.worker
                ));
            }
            if b.granted < a.last_held {
                problems.push(format!(
                    "{name}: token {} granted {:?} before token {} was last seen held",
                    b.token,
                    a.last_held - b.granted,
                    a.token
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
}
