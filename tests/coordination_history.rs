//! The randomized history checker for the coordination primitives. Child
//! processes with several threads each loop over random acquires, holds,
//! releases and drops of one primitive (a semaphore of 2 permits, a
//! reader-writer lock, an election), while the parent freezes processes past
//! their TTL (`SIGSTOP`) and kills one (`SIGKILL`). Each holder reports its
//! *claims* as it goes: from the moment its grant came back to each moment it
//! checked that it still held it (`is_held` true), on the machine-wide
//! monotonic clock, so processes' claims compare. The checker then requires:
//! never more than 2 permits claimed at once; never a writer's claim beside
//! any other; never two leaders' claims at once, and terms increasing with
//! time. Each workload has a negative control: a rogue thread that claims
//! without holding, which the checker must catch. The seed is printed; set
//! LOCKBOX_SEED to replay a run.

mod common;

use std::io::BufRead;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::history::{Rng, mono_ns, seed};
use common::*;
use lockbox::AcquireOptions;

const PROCESSES: usize = 3;
const THREADS: usize = 3;
const PERMITS: usize = 2;

/// The TTL of a store's run: etcd's leases last whole seconds.
fn ttl_ms(store: &str) -> u64 {
    if store == "etcd" { 2000 } else { 800 }
}

#[test]
#[ignore = "child-process entry point, run by the other tests"]
fn child_entry() {
    let Some(role) = child_role() else { return };
    assert_eq!(role, "worker");
    let var = |k: &str| std::env::var(k).unwrap();
    worker(
        &var("STORE"),
        &var("PRIMITIVE"),
        &var("NAME"),
        var("SEED").parse().unwrap(),
        var("MILLIS").parse().unwrap(),
        var("ROGUE") == "1",
    );
}

/// One holder's hold: what it reports, and how.
struct Hold<'a> {
    kind: char,
    token: u64,
    start: u64,
    lock: &'a lockbox::Lock,
}

impl Hold<'_> {
    /// Claims the hold up to now if it is still held; whether it was.
    fn confirm(&self) -> bool {
        // Taken before the check: held at the check means held at `at`.
        let at = mono_ns();
        if !self.lock.is_held() {
            return false;
        }
        report(&format!(
            "claim {} {} {} {at}",
            self.kind, self.token, self.start
        ));
        true
    }
}

fn worker(store: &str, primitive: &str, name: &str, seed: u64, millis: u64, rogue: bool) {
    let client = store_builder(store)
        .ttl(ms(ttl_ms(store)))
        .connect_timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    report("ready");
    assert_eq!(next_command(), "go");
    let end = Instant::now() + ms(millis);
    let stats: Vec<(u64, u64, u64)> = thread::scope(|s| {
        if rogue {
            // The negative control: claims as a writer / leader / permit
            // holder now and then without holding anything.
            s.spawn(move || {
                let kind = match primitive {
                    "rwlock" => 'w',
                    "election" => 'l',
                    _ => 'p',
                };
                let mut token = u64::MAX / 2;
                while Instant::now() < end {
                    let start = mono_ns();
                    thread::sleep(ms(30));
                    report(&format!("claim {kind} {token} {start} {}", mono_ns()));
                    token += 1;
                    thread::sleep(ms(50));
                }
            });
        }
        let handles: Vec<_> = (0..THREADS as u64)
            .map(|t| {
                let client = &client;
                s.spawn(move || {
                    let mut rng = Rng::new(seed.wrapping_add(t * 7919));
                    let (mut lost_unsignalled, mut grants) = (0, 0);
                    let sem = client.semaphore(name, PERMITS as u32).unwrap();
                    let rw = client.rwlock(name).unwrap();
                    let election = client.election(name).unwrap();
                    let identity = format!("{}-{t}", std::process::id());
                    while Instant::now() < end {
                        let opts = if rng.below(2) == 0 {
                            AcquireOptions::new()
                        } else {
                            AcquireOptions::new().wait(ms(1 + rng.below(400)))
                        };
                        // Every guard derefs to the `Lock` underneath: kept
                        // whole (so its drop releases) beside its kind.
                        let (kind, guard): (
                            char,
                            Box<dyn std::ops::Deref<Target = lockbox::Lock>>,
                        ) = match primitive {
                            "semaphore" => match sem.acquire(&opts) {
                                Ok(Some(p)) => ('p', Box::new(p)),
                                _ => continue,
                            },
                            "rwlock" if rng.below(3) == 0 => match rw.write(&opts) {
                                Ok(Some(w)) => ('w', Box::new(w)),
                                _ => continue,
                            },
                            "rwlock" => match rw.read(&opts) {
                                Ok(Some(r)) => ('r', Box::new(r)),
                                _ => continue,
                            },
                            _ => match election.campaign(&identity, &opts) {
                                Ok(Some(l)) => ('l', Box::new(l)),
                                _ => continue,
                            },
                        };
                        let lock: &lockbox::Lock = &guard;
                        let hold = Hold {
                            kind,
                            token: lock.fencing_token(),
                            start: mono_ns(),
                            lock,
                        };
                        grants += 1;
                        let lost = lock.lost();
                        for _ in 0..1 + rng.below(3) {
                            if !hold.confirm() {
                                break;
                            }
                            thread::sleep(ms(rng.below(60)));
                        }
                        hold.confirm();
                        if rng.below(5) == 0 {
                            drop(guard);
                            continue;
                        }
                        // Released by the guard's drop; a hold found lost by
                        // then must have been signalled on lost().
                        let was_held = lock.is_held();
                        drop(guard);
                        if !was_held && lost.try_recv().is_err() {
                            lost_unsignalled += 1;
                        }
                    }
                    (lost_unsignalled, 0, grants)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let sum = |f: fn(&(u64, u64, u64)) -> u64| stats.iter().map(f).sum::<u64>();
    report(&format!(
        "stats {} {} {}",
        sum(|r| r.0),
        sum(|r| r.1),
        sum(|r| r.2)
    ));
}

/// One grant's claimed interval.
#[derive(Debug, Clone, Copy)]
struct Claim {
    kind: char,
    token: u64,
    start: u64,
    end: u64,
}

/// The violations of `primitive`'s rule in `claims`.
fn check(primitive: &str, claims: &[Claim]) -> Vec<String> {
    let mut v = Vec::new();
    let overlap = |a: &Claim, b: &Claim| a.start < b.end && b.start < a.end;
    match primitive {
        "semaphore" => {
            // The most claims live at one time: at each claim's start, count
            // the claims that cover it.
            for c in claims {
                let live: Vec<u64> = claims
                    .iter()
                    .filter(|o| o.start <= c.start && c.start < o.end)
                    .map(|o| o.token)
                    .collect();
                if live.len() > PERMITS {
                    v.push(format!("{} permits claimed at once: {live:?}", live.len()));
                }
            }
        }
        "rwlock" => {
            for w in claims.iter().filter(|c| c.kind == 'w') {
                for o in claims.iter().filter(|o| o.token != w.token) {
                    if overlap(w, o) {
                        v.push(format!("writer {} beside {} {}", w.token, o.kind, o.token));
                    }
                }
            }
        }
        _ => {
            let mut sorted = claims.to_vec();
            sorted.sort_by_key(|c| c.start);
            for pair in sorted.windows(2) {
                if overlap(&pair[0], &pair[1]) {
                    v.push(format!(
                        "leaders {} and {} at once",
                        pair[0].token, pair[1].token
                    ));
                }
                if pair[1].token <= pair[0].token {
                    v.push(format!(
                        "term {} began after term {}",
                        pair[1].token, pair[0].token
                    ));
                }
            }
        }
    }
    v
}

/// Runs the workload; returns the violations found. Faults: freezes past
/// the TTL and, once, a kill.
fn workload(store: &str, primitive: &str, rogue: bool) -> Vec<String> {
    let seed = seed();
    eprintln!(
        "coordination history seed = {seed} (LOCKBOX_SEED={seed} replays it), {store}, \
         {primitive}, rogue: {rogue}"
    );
    let name = unique(&format!("coord-hist-{primitive}"));
    let ttl = ttl_ms(store);
    let millis = (ttl * 5).to_string();
    if store == "etcd" {
        // Started here, so that every child uses this one member.
        let _ = common::etcd_server::etcd_url();
    }
    let exe = std::env::current_exe().unwrap();
    let mut children: Vec<std::process::Child> = (0..PROCESSES)
        .map(|i| {
            Command::new(&exe)
                .args(["child_entry", "--exact", "--ignored", "--nocapture"])
                .env("LOCKBOX_CHILD_ROLE", "worker")
                .env("DATABASE_URL", database_url())
                .env("STORE", store)
                .env("PRIMITIVE", primitive)
                .env("NAME", &name)
                .env("SEED", (seed + i as u64).to_string())
                .env("MILLIS", &millis)
                .env("ROGUE", if rogue && i == 0 { "1" } else { "0" })
                .envs(common::etcd_server::child_env())
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    // Each child's lines, read as they come (a killed child's end at EOF).
    let (tx, rx) = crossbeam_channel::unbounded::<(usize, String)>();
    for (i, c) in children.iter_mut().enumerate() {
        let out = std::io::BufReader::new(c.stdout.take().unwrap());
        let tx = tx.clone();
        thread::spawn(move || {
            for line in out.lines().map_while(Result::ok) {
                if let Some((_, msg)) = line.split_once("@@ ") {
                    let _ = tx.send((i, msg.to_owned()));
                }
            }
        });
    }
    drop(tx);
    let mut lines: Vec<(usize, String)> = Vec::new();
    let mut ready = 0;
    while ready < PROCESSES {
        let (i, msg) = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("a child never got ready");
        if msg == "ready" {
            ready += 1;
        } else {
            lines.push((i, msg));
        }
    }
    for c in &mut children {
        use std::io::Write;
        writeln!(c.stdin.as_mut().unwrap(), "go").unwrap();
    }
    let mut rng = Rng::new(seed ^ 0xC00D);
    let signal = |c: &std::process::Child, sig: &str| {
        let _ = Command::new("kill")
            .args([&format!("-{sig}"), &c.id().to_string()])
            .status();
    };
    let run_end = Instant::now() + ms(ttl * 4);
    let mut killed = None;
    while Instant::now() < run_end {
        thread::sleep(ms(100 + rng.below(300)));
        let victim = rng.below(PROCESSES as u64) as usize;
        if Some(victim) == killed {
            continue;
        }
        if killed.is_none() && rng.below(4) == 0 && !(rogue && victim == 0) {
            signal(&children[victim], "KILL");
            killed = Some(victim);
        } else {
            signal(&children[victim], "STOP");
            thread::sleep(ms(ttl + 300));
            signal(&children[victim], "CONT");
        }
    }
    for (i, mut c) in children.into_iter().enumerate() {
        drop(c.stdin.take());
        let status = c.wait().unwrap();
        assert!(
            Some(i) == killed || status.success(),
            "child {i} failed: {status} (seed {seed})"
        );
    }
    lines.extend(rx.iter());
    let mut claims: std::collections::HashMap<u64, Claim> = std::collections::HashMap::new();
    let mut grants = 0;
    for (i, msg) in &lines {
        let parts: Vec<&str> = msg.split(' ').collect();
        match parts[0] {
            "claim" => {
                let kind = parts[1].chars().next().unwrap();
                let (token, start, end): (u64, u64, u64) = (
                    parts[2].parse().unwrap(),
                    parts[3].parse().unwrap(),
                    parts[4].parse().unwrap(),
                );
                let c = claims.entry(token).or_insert(Claim {
                    kind,
                    token,
                    start,
                    end,
                });
                c.end = c.end.max(end);
            }
            "stats" => {
                let n: Vec<u64> = parts[1..].iter().map(|x| x.parse().unwrap()).collect();
                assert_eq!(
                    n[0], 0,
                    "child {i}: a lost hold was not signalled (seed {seed})"
                );
                grants += n[2];
            }
            other => panic!("unexpected report {other}"),
        }
    }
    assert!(
        grants > 10,
        "the workload barely ran: {grants} grants (seed {seed})"
    );
    let claims: Vec<Claim> = claims.into_values().collect();
    check(primitive, &claims)
        .into_iter()
        .map(|v| format!("seed {seed}: {v}"))
        .collect()
}

fn holds(store: &str, primitive: &str) {
    let violations = workload(store, primitive, false);
    assert!(violations.is_empty(), "{violations:#?}");
}

fn catches_the_rogue(store: &str, primitive: &str) {
    let violations = workload(store, primitive, true);
    assert!(
        !violations.is_empty(),
        "the checker missed claims made without holding"
    );
}

macro_rules! histories {
    ($store:ident) => {
        mod $store {
            use super::*;

            #[test]
            fn semaphore_history_with_faults() {
                holds(stringify!($store), "semaphore");
            }
            #[test]
            fn rwlock_history_with_faults() {
                holds(stringify!($store), "rwlock");
            }
            #[test]
            fn election_history_with_faults() {
                holds(stringify!($store), "election");
            }
            #[test]
            fn the_checker_catches_a_rogue_permit_holder() {
                catches_the_rogue(stringify!($store), "semaphore");
            }
            #[test]
            fn the_checker_catches_a_rogue_writer() {
                catches_the_rogue(stringify!($store), "rwlock");
            }
            #[test]
            fn the_checker_catches_a_rogue_leader() {
                catches_the_rogue(stringify!($store), "election");
            }
        }
    };
}

histories!(postgres);
histories!(redis);
histories!(etcd);
