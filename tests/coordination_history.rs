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
//! without holding, which the checker must catch. The parent also reads the
//! store's own record throughout the run (PostgreSQL's lease tables, Redis's
//! lock key and holders set, by the store's clock; etcd's key queue, granted
//! by lockbox's rule): never more than 2 live permits, never a live writer
//! beside a live reader, a leader's term never going back, and every claim
//! shown live by every look taken within it (the rogue's claims are not);
//! further negative controls plant violating records directly. The seed is printed; set
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
/// The rogue's claims start here, far above any token a store grants.
const ROGUE_TOKENS: u64 = u64::MAX / 2;
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

/// Works until the parent says `stop` (or goes away; two minutes at most).
fn worker(store: &str, primitive: &str, name: &str, seed: u64, rogue: bool) {
    let client = store_builder(store)
        .ttl(ms(ttl_ms(store)))
        .connect_timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    report("ready");
    assert_eq!(next_command(), "go");
    let cap = Instant::now() + Duration::from_secs(120);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let running = || !stop.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < cap;
    let stats: Vec<(u64, u64, u64)> = thread::scope(|s| {
        s.spawn(|| {
            next_command();
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
        });
        if rogue {
            // The negative control: claims as a writer / leader / permit
            // holder now and then without holding anything.
            let running = &running;
            s.spawn(move || {
                let kind = match primitive {
                    "rwlock" => 'w',
                    "election" => 'l',
                    _ => 'p',
                };
                let mut token = ROGUE_TOKENS;
                while running() {
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
                let (client, running) = (&client, &running);
                s.spawn(move || {
                    let mut rng = Rng::new(seed.wrapping_add(t * 7919));
                    let (mut lost_unsignalled, mut grants) = (0, 0);
                    let sem = client.semaphore(name, PERMITS as u32).unwrap();
                    let rw = client.rwlock(name).unwrap();
                    let election = client.election(name).unwrap();
                    let identity = format!("{}-{t}", std::process::id());
                    while running() {
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

/// One look at the store's own record of a name, on one snapshot and by
/// the store's clock: the live exclusive lease's token (a writer's, a
/// leader's) and the live shared leases' tokens (readers, permits).
#[derive(Debug, Clone)]
struct Record {
    exclusive: Option<u64>,
    shared: Vec<u64>,
}

/// Reads the store's record of `name`: PostgreSQL's lease tables, Redis's
/// lock key and holders set; `None` for a store without one readable here.
fn read_record(store: &str, name: &str) -> Option<Box<dyn FnMut() -> Record + Send>> {
    match store {
        "postgres" => {
            let mut db = ::postgres::Client::connect(database_url(), ::postgres::NoTls).unwrap();
            let name = name.to_owned();
            Some(Box::new(move || {
                let row = db
                    .query_one(
                        "WITH n AS MATERIALIZED (SELECT clock_timestamp() AS t) \
                         SELECT (SELECT l.token FROM lockbox_leases l, n WHERE l.name = $1 \
                                 AND l.owner <> '(lockbox shared leases)' \
                                 AND l.released_at IS NULL AND l.expires_at > n.t), \
                                (SELECT coalesce(array_agg(s.token), '{}') \
                                 FROM lockbox_leases_shared s, n WHERE s.name = $1 \
                                 AND s.released_at IS NULL AND s.expires_at > n.t)",
                        &[&name],
                    )
                    .unwrap();
                Record {
                    exclusive: row.get::<_, Option<i64>>(0).map(|t| t as u64),
                    shared: row
                        .get::<_, Vec<i64>>(1)
                        .into_iter()
                        .map(|t| t as u64)
                        .collect(),
                }
            }))
        }
        "redis" => {
            let mut conn = ::redis::Client::open(common::redis_server::redis_url())
                .unwrap()
                .get_connection()
                .unwrap();
            let script = ::redis::Script::new(
                "local t = redis.call('TIME') \
                 local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) \
                 local ex = redis.call('GET', KEYS[1]) or '' \
                 return {ex, redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. now, '+inf')}",
            );
            let keys = [
                format!("lockbox:lock:{name}"),
                format!("lockbox:holders:{name}"),
            ];
            let token = |member: &str| member.split('|').next().unwrap().parse::<u64>().unwrap();
            Some(Box::new(move || {
                let (ex, live): (String, Vec<String>) = script
                    .key(&keys[0])
                    .key(&keys[1])
                    .invoke(&mut conn)
                    .unwrap();
                Record {
                    exclusive: (!ex.is_empty()).then(|| token(&ex)),
                    shared: live.iter().map(|m| token(m)).collect(),
                }
            }))
        }
        "etcd" => {
            // The member this process started (its children use it too).
            let port = common::etcd_server::single().members[0].admin_port;
            let prefix = format!(
                "lockbox/lock/{}/",
                name.replace('%', "%25").replace('/', "%2F")
            );
            Some(Box::new(move || {
                let keys = common::etcd_server::queue(port, &prefix).expect("etcd answered");
                etcd_granted(&keys)
            }))
        }
        _ => None,
    }
}

/// The granted keys of an etcd queue (oldest first), by lockbox's rule: an
/// exclusive key when nothing is ahead of it; a reader when only readers
/// are; a permit of `n` when only permits are and fewer than `n`.
fn etcd_granted(keys: &[(u64, serde_json::Value)]) -> Record {
    let kind = |v: &serde_json::Value| v["kind"].as_str().unwrap_or("exclusive").to_owned();
    let mut record = Record {
        exclusive: None,
        shared: Vec::new(),
    };
    for (i, (rev, value)) in keys.iter().enumerate() {
        let ahead = &keys[..i];
        match kind(value).as_str() {
            "exclusive" if ahead.is_empty() => record.exclusive = Some(*rev),
            "shared" if ahead.iter().all(|(_, v)| kind(v) == "shared") => record.shared.push(*rev),
            "permit"
                if ahead.iter().all(|(_, v)| kind(v) == "permit")
                    && (ahead.len() as u64) < value["permits"].as_u64().unwrap_or(0) =>
            {
                record.shared.push(*rev)
            }
            _ => {}
        }
    }
    record
}

/// The violations of `primitive`'s rule in the store's record, looked at
/// as often as it can be until `stop`: more than 2 live permits, a live
/// writer beside any live reader (or a second writer cannot be: one row or
/// key per name), a leader's term going back.
fn sample_record(
    mut read: Box<dyn FnMut() -> Record + Send>,
    primitive: &str,
    stop: &std::sync::atomic::AtomicBool,
) -> (Vec<String>, Vec<Sample>, usize) {
    let mut v = Vec::new();
    let mut samples = Vec::new();
    let (mut held, mut last_term) = (0, 0);
    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
        let before = mono_ns();
        let r = read();
        samples.push(Sample {
            before,
            after: mono_ns(),
            live: r.exclusive.iter().chain(&r.shared).copied().collect(),
        });
        if r.exclusive.is_some() || !r.shared.is_empty() {
            held += 1;
        }
        match primitive {
            "semaphore" if r.shared.len() > PERMITS || r.exclusive.is_some() => {
                v.push(format!("the store's record: {r:?} live at once"));
            }
            "rwlock" if r.exclusive.is_some() && !r.shared.is_empty() => {
                v.push(format!(
                    "the store's record: a writer beside readers, {r:?}"
                ));
            }
            "election" => {
                if let Some(term) = r.exclusive {
                    if term < last_term {
                        v.push(format!("the store's record: term {term} after {last_term}"));
                    }
                    last_term = term;
                }
            }
            _ => {}
        }
    }
    (v, samples, held)
}

/// One look at the store's record: taken between `before` and `after` (the
/// machine-wide monotonic clock), the tokens it showed live.
struct Sample {
    before: u64,
    after: u64,
    live: Vec<u64>,
}

/// Holders' claims against the store's record: a claim says its holder
/// held its token from `start` to `end`, so every look at the record taken
/// wholly within that time must show the token live (a holder never
/// believes it holds what the store no longer gives it).
fn uncovered(claims: &[Claim], samples: &[Sample]) -> Vec<String> {
    let mut v = Vec::new();
    for c in claims {
        if let Some(s) = samples
            .iter()
            .find(|s| c.start <= s.before && s.after <= c.end && !s.live.contains(&c.token))
        {
            v.push(format!(
                "{} {} claimed from {} to {}, but the store's record at {}..{} shows {:?}",
                c.kind, c.token, c.start, c.end, s.before, s.after, s.live
            ));
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
    let work_end = Instant::now() + ms(ttl * 5);
    let mut rng = Rng::new(seed ^ 0xC00D);
    let signal = |c: &std::process::Child, sig: &str| {
        let _ = Command::new("kill")
            .args([&format!("-{sig}"), &c.id().to_string()])
            .status();
    };
    // The store's own record, looked at throughout the run.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = read_record(store, &name).map(|read| {
        let (stop, primitive) = (stop.clone(), primitive.to_owned());
        thread::spawn(move || sample_record(read, &primitive, &stop))
    });
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
    // The workload runs for five TTLs, and on until it has granted enough
    // to mean something, however loaded the machine: CI once saw 9 grants
    // in the usual ~100 (children frozen inside their grant transactions
    // hold the name's row, and everyone else waits for it).
    // etcd's leases last whole seconds (a TTL of 2 s here), so each freeze
    // past the TTL holds an election for seconds: seed 1795850302538796197
    // gives 7–10 grants in its 10 s, the workload having run as it should.
    let least = if store == "etcd" { 5 } else { 10 };
    let mut granted = std::collections::HashSet::new();
    let grant_of = |msg: &str| -> Option<u64> {
        let token = msg
            .strip_prefix("claim ")?
            .split(' ')
            .nth(1)?
            .parse()
            .ok()?;
        (token < ROGUE_TOKENS).then_some(token)
    };
    for (_, msg) in &lines {
        granted.extend(grant_of(msg));
    }
    let give_up = Instant::now() + Duration::from_secs(60);
    while Instant::now() < work_end || (granted.len() < least && Instant::now() < give_up) {
        match rx.recv_timeout(ms(50)) {
            Ok((i, msg)) => {
                granted.extend(grant_of(&msg));
                lines.push((i, msg));
            }
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
        }
    }
    for (i, mut c) in children.into_iter().enumerate() {
        if let Some(mut stdin) = c.stdin.take() {
            use std::io::Write;
            // A killed child's pipe is closed: nothing to tell it.
            let _ = writeln!(stdin, "stop");
        }
        let status = c.wait().unwrap();
        assert!(
            Some(i) == killed || status.success(),
            "child {i} failed: {status} (seed {seed})"
        );
    }
    lines.extend(rx.iter());
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (mut record_violations, mut samples) = (Vec::new(), Vec::new());
    if let Some(sampler) = sampler {
        let (found, looked, held) = sampler.join().unwrap();
        assert!(
            held > 0,
            "the store's record showed nothing held in {} looks (seed {seed})",
            looked.len()
        );
        record_violations = found;
        samples = looked;
    }
    let mut claims: std::collections::HashMap<u64, Claim> = std::collections::HashMap::new();
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
            }
            other => panic!("unexpected report {other}"),
        }
    }
    // Grants claimed, a killed child's too (its stats never come).
    let grants = claims.keys().filter(|&&t| t < ROGUE_TOKENS).count();
    assert!(
        grants >= least,
        "the workload barely ran: {grants} grants (seed {seed})"
    );
    let claims: Vec<Claim> = claims.into_values().collect();
    record_violations.extend(uncovered(&claims, &samples));
    check(primitive, &claims)
        .into_iter()
        .chain(record_violations)
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
    // The record check on its own catches them too: no look at the store's
    // record shows the rogue's tokens live.
    assert!(
        violations.iter().any(|v| v.contains("the store's record")),
        "the record check missed claims made without holding: {violations:#?}"
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

/// Reads the store's record once through the sampler.
fn one_look(store: &str, name: &str, primitive: &str) -> Vec<String> {
    let mut read = read_record(store, name).expect("a readable record");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let after_one = stop.clone();
    let once: Box<dyn FnMut() -> Record + Send> = Box::new(move || {
        after_one.store(true, std::sync::atomic::Ordering::SeqCst);
        read()
    });
    let (found, looks, _) = sample_record(once, primitive, &stop);
    assert_eq!(looks.len(), 1);
    found
}

/// Negative control of the record check on PostgreSQL: three live permits
/// written straight into the shared-lease table, beside nothing else, are
/// caught; so are they beside a live writer's row.
#[test]
fn the_record_check_catches_excess_permits_on_postgres() {
    // Built once so that the tables exist.
    drop(store_builder("postgres").build().unwrap());
    let name = unique("coord-hist-planted");
    let mut db = ::postgres::Client::connect(database_url(), ::postgres::NoTls).unwrap();
    for token in 1..=3i64 {
        db.execute(
            "INSERT INTO lockbox_leases_shared (name, token, owner, kind, permits, holder_pid, \
                 holder_started, acquired_at, renewed_at, expires_at) \
             VALUES ($1, $2, 'planted', 'permit', 2, 0, now(), now(), now(), \
                 now() + interval '1 hour')",
            &[&name, &token],
        )
        .unwrap();
    }
    let found = one_look("postgres", &name, "semaphore");
    db.execute(
        "DELETE FROM lockbox_leases_shared WHERE name = $1",
        &[&name],
    )
    .unwrap();
    assert!(!found.is_empty(), "three live permits of two not caught");
    assert!(one_look("postgres", &name, "semaphore").is_empty());
}

/// Negative control of the record check on Redis: three live permits in
/// the holders set are caught, and a live lock key beside live holders is
/// caught as a writer beside readers.
#[test]
fn the_record_check_catches_excess_permits_and_a_writer_on_redis() {
    let name = unique("coord-hist-planted");
    let mut conn = ::redis::Client::open(common::redis_server::redis_url())
        .unwrap()
        .get_connection()
        .unwrap();
    let (holders, lock) = (
        format!("lockbox:holders:{name}"),
        format!("lockbox:lock:{name}"),
    );
    let (secs, _): (u64, u64) = ::redis::cmd("TIME").query(&mut conn).unwrap();
    let later = (secs + 3600) * 1000;
    for token in 1..=3u64 {
        let _: () = ::redis::cmd("ZADD")
            .arg(&holders)
            .arg(later)
            .arg(format!("{token}|planted"))
            .query(&mut conn)
            .unwrap();
    }
    assert!(
        !one_look("redis", &name, "semaphore").is_empty(),
        "three live permits of two not caught"
    );
    let _: () = ::redis::cmd("SET")
        .arg(&lock)
        .arg("9|planted")
        .arg("PX")
        .arg(60_000)
        .query(&mut conn)
        .unwrap();
    assert!(
        !one_look("redis", &name, "rwlock").is_empty(),
        "a writer beside readers not caught"
    );
    let _: () = ::redis::cmd("DEL")
        .arg(&holders)
        .arg(&lock)
        .query(&mut conn)
        .unwrap();
    assert!(one_look("redis", &name, "rwlock").is_empty());
}
