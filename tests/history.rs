//! The randomized history checker. Child processes with several threads each loop
//! over random try_lock / lock_timeout / hold / release / drop on a few names, doing
//! a fenced read-modify-write under each grant. Afterwards the database's own record
//! is checked: grants never overlap and their tokens increase, no update is lost and
//! no accepted write lowers the fence, nothing is left held, and every loss was
//! signalled while no normal release was. Run once fault-free and once with faults
//! (terminated and cancelled backends, frozen processes). A negative control shows
//! the checker catches a real violation. The seed is printed: set LOCKBOX_SEED to
//! replay a run. The same workload runs against a three-member etcd cluster
//! whose members are killed (the leader too) and restarted under it, checked
//! against etcd's own history.

mod common;

use std::thread;
use std::time::{Duration, Instant};

use common::history::{Rng, Run, TxFence, mono_ns, seed};
use common::*;
use lockbox::{Error, LockClient};

const PROCESSES: usize = 3;
const THREADS: usize = 3;
const TTL_MS: u64 = 600;

#[test]
#[ignore = "child-process entry point, run by the other tests"]
fn child_entry() {
    let Some(role) = child_role() else { return };
    let run = Run {
        id: std::env::var("RUN_ID").unwrap(),
        names: std::env::var("NAMES")
            .unwrap()
            .split(',')
            .map(str::to_owned)
            .collect(),
    };
    let seed: u64 = std::env::var("SEED").unwrap().parse().unwrap();
    match role.as_str() {
        "worker" => worker(&run, seed),
        "stale-writer" => stale_writer(&run),
        "etcd-worker" => etcd_worker(&run, seed),
        other => panic!("unknown role {other}"),
    }
}

/// The random workload of one process; reports its signal bookkeeping.
fn worker(run: &Run, seed: u64) {
    let millis: u64 = std::env::var("MILLIS").unwrap().parse().unwrap();
    let per_session: u32 = std::env::var("LOCKS_PER_SESSION").unwrap().parse().unwrap();
    let in_tx = std::env::var("FENCE_MODE").unwrap() == "tx";
    let client = LockClient::builder(&url_with_app(database_url(), &format!("{}-w", run.id)))
        .table(&run.lease_table())
        .ttl(ms(TTL_MS))
        .locks_per_session(per_session)
        .build()
        .unwrap();
    report("ready");
    assert_eq!(next_command(), "go");
    let results: Vec<(u64, u64, u64)> = thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS as u64)
            .map(|t| {
                let client = &client;
                s.spawn(move || {
                    let mut rng = Rng::new(seed.wrapping_add(t * 7919));
                    let in_tx = in_tx;
                    let mut db =
                        postgres::Client::connect(database_url(), postgres::NoTls).unwrap();
                    let (mut lost_unsignalled, mut release_signalled, mut grants) = (0, 0, 0);
                    let end = Instant::now() + ms(millis);
                    while Instant::now() < end {
                        let name = &run.names[rng.below(run.names.len() as u64) as usize];
                        let got = if rng.below(2) == 0 {
                            client.try_lock(name).unwrap_or(None)
                        } else {
                            client.lock_timeout(name, ms(1 + rng.below(300))).ok()
                        };
                        let Some(lock) = got else { continue };
                        grants += 1;
                        let lost = lock.lost();
                        if in_tx {
                            // Read, pause, check, write, commit: the check in
                            // the transaction must stop a stale holder.
                            let fence = if rng.below(2) == 0 {
                                TxFence::Guard
                            } else {
                                TxFence::Function
                            };
                            run.write_in_tx(&mut db, &lock, ms(rng.below(40)), fence);
                        } else {
                            thread::sleep(ms(rng.below(40)));
                            // Written whatever the holder believes: the fence must
                            // stop a stale one.
                            run.write(&mut db, name, lock.fencing_token(), true);
                        }
                        thread::sleep(ms(rng.below(20)));
                        if rng.below(5) == 0 {
                            drop(lock);
                            continue;
                        }
                        match lock.release() {
                            Ok(()) => {
                                if lost.try_recv().is_ok() {
                                    release_signalled += 1;
                                }
                            }
                            Err(Error::LockLost { .. }) => {
                                if lost.try_recv().is_err() {
                                    lost_unsignalled += 1;
                                }
                            }
                            // The database itself failed (a fault): not a lock fact.
                            Err(_) => {}
                        }
                    }
                    (lost_unsignalled, release_signalled, grants)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let sum = |f: fn(&(u64, u64, u64)) -> u64| results.iter().map(f).sum::<u64>();
    report(&format!(
        "stats {} {} {}",
        sum(|r| r.0),
        sum(|r| r.1),
        sum(|r| r.2)
    ));
}

/// The TTL of the etcd run: etcd's leases last whole seconds, 2 s at least.
const ETCD_TTL_MS: u64 = 2000;
/// How long after the faults every name must have been granted again: far
/// beyond the TTL that bounds a lease orphaned by a fault.
const RECOVERY_LIMIT: Duration = Duration::from_secs(30);

/// The random workload of one process against etcd. Besides the fenced
/// writes, each grant reports its claim: from when the grant came back to
/// the last moment its holder checked it still held the lock (`is_held`
/// true), on the machine-wide monotonic clock. No two claims on a name may
/// overlap.
fn etcd_worker(run: &Run, seed: u64) {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
    let endpoints = std::env::var("ETCD_ENDPOINTS").unwrap();
    let client = LockClient::etcd(&endpoints)
        .ttl(ms(ETCD_TTL_MS))
        .connect_timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    report("ready");
    assert_eq!(next_command(), "go");
    // The parent says "calm" once the faults are over and the cluster has a
    // leader; from then on each name must be granted again (the workload
    // recovers), and the run ends when every name has been, or after
    // RECOVERY_LIMIT. Stdin closing (the parent gone) ends it too.
    let calm_at = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let recovered: Vec<AtomicBool> = run.names.iter().map(|_| AtomicBool::new(false)).collect();
    type Claims = Vec<(String, u64, u64, u64)>;
    let results: Vec<((u64, u64, u64), Claims)> = thread::scope(|s| {
        let (calm_at, stop, recovered) = (&calm_at, &stop, &recovered);
        s.spawn(move || {
            if next_command() == "calm" {
                calm_at.store(mono_ns(), SeqCst);
                let limit = Instant::now() + RECOVERY_LIMIT;
                while Instant::now() < limit && !recovered.iter().all(|r| r.load(SeqCst)) {
                    thread::sleep(ms(20));
                }
            }
            stop.store(true, SeqCst);
        });
        let handles: Vec<_> = (0..THREADS as u64)
            .map(|t| {
                let client = &client;
                s.spawn(move || {
                    let mut rng = Rng::new(seed.wrapping_add(t * 7919));
                    let mut db =
                        postgres::Client::connect(database_url(), postgres::NoTls).unwrap();
                    let (mut lost_unsignalled, mut release_signalled, mut grants) = (0, 0, 0);
                    let mut claims = Vec::new();
                    while !stop.load(SeqCst) {
                        let which = rng.below(run.names.len() as u64) as usize;
                        let name = &run.names[which];
                        let got = if rng.below(2) == 0 {
                            client.try_lock(name).unwrap_or(None)
                        } else {
                            client.lock_timeout(name, ms(1 + rng.below(1000))).ok()
                        };
                        let Some(lock) = got else { continue };
                        let start = mono_ns();
                        grants += 1;
                        let calm = calm_at.load(SeqCst);
                        if calm != 0 && start > calm {
                            recovered[which].store(true, SeqCst);
                        }
                        let lost = lock.lost();
                        thread::sleep(ms(rng.below(150)));
                        run.write(&mut db, name, lock.fencing_token(), true);
                        thread::sleep(ms(rng.below(50)));
                        let checked = mono_ns();
                        if lock.is_held() {
                            claims.push((name.clone(), lock.fencing_token(), start, checked));
                        }
                        if rng.below(5) == 0 {
                            drop(lock);
                            continue;
                        }
                        match lock.release() {
                            Ok(()) => {
                                if lost.try_recv().is_ok() {
                                    release_signalled += 1;
                                }
                            }
                            Err(Error::LockLost { .. }) => {
                                if lost.try_recv().is_err() {
                                    lost_unsignalled += 1;
                                }
                            }
                            Err(_) => {}
                        }
                    }
                    ((lost_unsignalled, release_signalled, grants), claims)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (_, claims) in &results {
        for (name, token, start, end) in claims {
            report(&format!("claim {name} {token} {start} {end}"));
        }
    }
    let sum = |f: fn(&(u64, u64, u64)) -> u64| results.iter().map(|r| f(&r.0)).sum::<u64>();
    let unrecovered: Vec<&str> = run
        .names
        .iter()
        .zip(&recovered)
        .filter(|(_, r)| !r.load(SeqCst))
        .map(|(n, _)| n.as_str())
        .collect();
    report(&format!(
        "stats {} {} {} {}",
        sum(|r| r.0),
        sum(|r| r.1),
        sum(|r| r.2),
        unrecovered.len()
    ));
}

/// Negative control: takes a lock, is frozen past its TTL by the parent, then
/// writes with its stale token when told to.
fn stale_writer(run: &Run) {
    let fenced = std::env::var("FENCED").unwrap() == "1";
    if std::env::var("FENCE_MODE").is_ok_and(|m| m == "tx") {
        return stale_tx_writer(run, fenced);
    }
    let client = LockClient::builder(database_url())
        .table(&run.lease_table())
        .ttl(ms(TTL_MS))
        .build()
        .unwrap();
    let mut db = postgres::Client::connect(database_url(), postgres::NoTls).unwrap();
    let lock = client.try_lock(&run.names[0]).unwrap().unwrap();
    report(&format!("token {}", lock.fencing_token()));
    assert_eq!(next_command(), "write");
    // A holder that does not check `ensure_held` first, as a paused one cannot.
    let accepted = run.write(&mut db, &run.names[0], lock.fencing_token(), fenced);
    report(&format!("accepted {accepted}"));
}

/// Negative control of the transaction-fenced writes: reads the resource in
/// its transaction, is frozen past its TTL by the parent (its successor
/// writes meanwhile), then completes: checked by the SQL function on the
/// database's clock when `fenced` (the guard would refuse without asking: its
/// deadline has passed), not at all otherwise.
fn stale_tx_writer(run: &Run, fenced: bool) {
    let client = LockClient::builder(database_url())
        .table(&run.lease_table())
        .ttl(ms(TTL_MS))
        .build()
        .unwrap();
    let mut db = postgres::Client::connect(database_url(), postgres::NoTls).unwrap();
    let lock = client.try_lock(&run.names[0]).unwrap().unwrap();
    report(&format!("token {}", lock.fencing_token()));
    let fence = if fenced {
        TxFence::Function
    } else {
        TxFence::None
    };
    // Told to go on once frozen and thawed: the pause inside is the window.
    let accepted = {
        let (tx, rx) = std::sync::mpsc::channel();
        thread::scope(|s| {
            s.spawn(|| {
                tx.send(run.write_in_tx(&mut db, &lock, ms(TTL_MS * 4), fence))
                    .unwrap()
            });
            assert_eq!(next_command(), "done?");
            rx.recv().unwrap()
        })
    };
    report(&format!("accepted {accepted}"));
}

/// The workload of [`PROCESSES`] workers, with faults or not, and
/// `per_session` locks at most on one database session (1: none shared).
fn workload(faults: bool, per_session: u32, mode: &str) {
    let seed = seed();
    eprintln!(
        "history seed = {seed} (LOCKBOX_SEED={seed} replays it), faults: {faults}, \
         locks per session: {per_session}, fenced by: {mode}"
    );
    let per_session = per_session.to_string();
    let run = Run::create(&unique("hist").replace('-', "_"), 3);
    let names = run.names.join(",");
    let millis = "3000";
    let mut children: Vec<ChildProc> = (0..PROCESSES)
        .map(|i| {
            let seed = (seed + i as u64).to_string();
            ChildProc::spawn(
                "worker",
                &[
                    ("RUN_ID", &run.id),
                    ("NAMES", &names),
                    ("SEED", &seed),
                    ("MILLIS", millis),
                    ("LOCKS_PER_SESSION", &per_session),
                    ("FENCE_MODE", mode),
                ],
            )
        })
        .collect();
    for c in &mut children {
        assert_eq!(c.recv(), "ready");
    }
    for c in &mut children {
        c.send("go");
    }
    let mut injected = Vec::new();
    if faults {
        let mut rng = Rng::new(seed ^ 0xFA17);
        let end = Instant::now() + ms(2500);
        while Instant::now() < end {
            thread::sleep(ms(100 + rng.below(200)));
            let pids: Vec<i32> = admin()
                .query(
                    "SELECT pid FROM pg_stat_activity WHERE application_name = $1",
                    &[&format!("{}-w", run.id)],
                )
                .unwrap()
                .iter()
                .map(|r| r.get(0))
                .collect();
            match rng.below(3) {
                0 if !pids.is_empty() => {
                    let pid = pids[rng.below(pids.len() as u64) as usize];
                    let _ = admin().execute("SELECT pg_terminate_backend($1)", &[&pid]);
                    injected.push("terminate");
                }
                1 if !pids.is_empty() => {
                    let pid = pids[rng.below(pids.len() as u64) as usize];
                    let _ = admin().execute("SELECT pg_cancel_backend($1)", &[&pid]);
                    injected.push("cancel");
                }
                _ => {
                    // Freeze a whole process past its TTL (GC pause, SIGSTOP).
                    let child = &children[rng.below(PROCESSES as u64) as usize];
                    child.signal("STOP");
                    thread::sleep(ms(TTL_MS + 300));
                    child.signal("CONT");
                    injected.push("freeze");
                }
            }
        }
        eprintln!("faults injected: {injected:?}");
    }
    let mut grants = 0;
    for mut c in children {
        let stats = c.recv();
        let parts: Vec<u64> = stats
            .split(' ')
            .skip(1)
            .map(|x| x.parse().unwrap())
            .collect();
        assert_eq!(parts[0], 0, "a lost lock was not signalled (seed {seed})");
        assert_eq!(parts[1], 0, "a normal release fired lost() (seed {seed})");
        grants += parts[2];
        c.wait_success();
    }
    assert!(grants > 20, "the workload barely ran: {grants} grants");
    let violations = if mode == "tx" {
        assert!(run.tx_writes() > 0);
        let mut v = run.check_grants();
        v.extend(run.check_tx());
        v
    } else {
        assert!(run.writes() > 0);
        run.check()
    };
    assert!(violations.is_empty(), "seed {seed}: {violations:#?}");
    // Quiesced: leases end within a TTL, nothing holds an advisory lock, no
    // worker session is left.
    assert!(
        eventually(ms(TTL_MS * 3), || run.live_leases() == 0),
        "a lease outlived its holders"
    );
    assert_eq!(advisory_locks_of(&format!("{}-w", run.id)), 0);
    assert_eq!(sessions_of(&format!("{}-w", run.id)), 0);
    run.drop_tables();
}

#[test]
fn history_without_faults_is_linearizable() {
    workload(false, 1000, "token");
}

#[test]
fn history_without_faults_is_linearizable_with_a_session_per_lock() {
    workload(false, 1, "token");
}

#[test]
fn history_with_faults_is_linearizable() {
    workload(true, 1000, "token");
}

#[test]
fn history_with_faults_is_linearizable_with_a_session_per_lock() {
    workload(true, 1, "token");
}

/// Writes fenced by the lease itself, in their own transaction (`Lock::fence`
/// and the SQL function), with kills and pauses: no lost update, no write of a
/// stale holder.
#[test]
fn history_with_faults_fenced_in_the_transaction() {
    workload(true, 1000, "tx");
}

#[test]
fn history_with_faults_fenced_in_the_transaction_with_a_session_per_lock() {
    workload(true, 1, "tx");
}

/// Negative control of the transaction fence: a holder that read the
/// resource, froze past its TTL while its successor wrote, and then completes
/// its write: the checker reports the lost update without the check, and the
/// check refuses the write.
#[test]
fn the_checker_catches_an_unchecked_stale_transaction() {
    for fenced in [false, true] {
        let run = Run::create(&unique("negtx").replace('-', "_"), 1);
        let name = run.names[0].clone();
        let mut child = ChildProc::spawn(
            "stale-writer",
            &[
                ("RUN_ID", &run.id),
                ("NAMES", &name),
                ("SEED", "1"),
                ("FENCED", if fenced { "1" } else { "0" }),
                ("FENCE_MODE", "tx"),
            ],
        );
        let token: u64 = child
            .recv()
            .strip_prefix("token ")
            .unwrap()
            .parse()
            .unwrap();
        // Frozen inside its transaction, after its read.
        assert!(eventually(Duration::from_secs(10), || {
            admin()
                .query_one(
                    "SELECT count(*) > 0 FROM pg_stat_activity WHERE state = 'idle in transaction' \
                     AND query LIKE $1",
                    &[&format!("%{}_resource%", run.id)],
                )
                .unwrap()
                .get(0)
        }));
        child.signal("STOP");
        let successor = LockClient::builder(database_url())
            .table(&run.lease_table())
            .ttl(ms(TTL_MS))
            .build()
            .unwrap();
        let lock = successor
            .lock_timeout(&name, Duration::from_secs(5))
            .unwrap();
        assert_eq!(lock.fencing_token(), token + 1);
        let mut db = admin();
        assert!(run.write_in_tx(&mut db, &lock, Duration::ZERO, TxFence::Guard));
        lock.release().unwrap();
        child.signal("CONT");
        child.send("done?");
        let accepted = child.recv() == "accepted true";
        child.wait_success();
        let violations = run.check_tx();
        if fenced {
            assert!(!accepted, "the check let a stale write through");
            assert!(violations.is_empty(), "{violations:?}");
        } else {
            assert!(accepted);
            assert!(
                violations.iter().any(|v| v.contains("lost update")),
                "the checker missed the stale write: {violations:?}"
            );
        }
        run.drop_tables();
    }
}

/// Negative control: without the fence, a holder frozen past its TTL writes after
/// its successor, and the checker reports it. With the fence, the same run passes.
#[test]
fn the_checker_catches_an_unfenced_stale_write() {
    for fenced in [false, true] {
        let run = Run::create(&unique("neg").replace('-', "_"), 1);
        let name = run.names[0].clone();
        let mut child = ChildProc::spawn(
            "stale-writer",
            &[
                ("RUN_ID", &run.id),
                ("NAMES", &name),
                ("SEED", "1"),
                ("FENCED", if fenced { "1" } else { "0" }),
            ],
        );
        let token: u64 = child
            .recv()
            .strip_prefix("token ")
            .unwrap()
            .parse()
            .unwrap();
        child.signal("STOP");
        let successor = LockClient::builder(database_url())
            .table(&run.lease_table())
            .ttl(ms(TTL_MS))
            .build()
            .unwrap();
        let lock = successor
            .lock_timeout(&name, Duration::from_secs(5))
            .unwrap();
        assert_eq!(lock.fencing_token(), token + 1);
        let mut db = admin();
        assert!(run.write(&mut db, &name, lock.fencing_token(), fenced));
        lock.release().unwrap();
        child.signal("CONT");
        child.send("write");
        let accepted = child.recv() == "accepted true";
        child.wait_success();
        let violations = run.check();
        if fenced {
            assert!(!accepted, "the fence let a stale write through");
            assert!(violations.is_empty(), "{violations:?}");
        } else {
            assert!(accepted);
            assert!(
                violations
                    .iter()
                    .any(|v| v.contains("accepted write with token")),
                "the checker missed the stale write: {violations:?}"
            );
        }
        run.drop_tables();
    }
}

/// The workload on a three-member etcd cluster, with members killed (the
/// leader among them, one at a time, so quorum holds) and restarted, and
/// worker processes frozen past their TTL. Checked: the fenced resource (no
/// lost update, no write accepted after a higher token's), no two holders'
/// claims on a name overlapping in time and their tokens increasing, every
/// claimed token one etcd made the holder (its oldest key, in etcd's own
/// history), losses signalled and releases not, nothing left held, and
/// once the faults are over every worker is granted every name again. How
/// many grants the faults allow depends on their draw (three leader losses
/// and leases orphaned until their TTL can leave a few seconds' run with a
/// dozen grants), so recovery is what is required, not a count.
#[test]
fn history_on_an_etcd_cluster_with_member_kills() {
    use common::etcd_server::{EtcdCluster, history, holders};
    let seed = seed();
    eprintln!("etcd history seed = {seed} (LOCKBOX_SEED={seed} replays it)");
    let mut cluster = EtcdCluster::start(3);
    let endpoints = cluster.endpoints();
    let run = Run::create(&unique("ehist").replace('-', "_"), 3);
    let names = run.names.join(",");
    let mut children: Vec<ChildProc> = (0..PROCESSES)
        .map(|i| {
            let seed = (seed + i as u64).to_string();
            ChildProc::spawn(
                "etcd-worker",
                &[
                    ("RUN_ID", &run.id),
                    ("NAMES", &names),
                    ("SEED", &seed),
                    ("ETCD_ENDPOINTS", &endpoints),
                ],
            )
        })
        .collect();
    for c in &mut children {
        assert_eq!(c.recv(), "ready");
    }
    for c in &mut children {
        c.send("go");
    }
    let mut rng = Rng::new(seed ^ 0xE7CD);
    let mut injected = Vec::new();
    let end = Instant::now() + ms(5000);
    while Instant::now() < end {
        thread::sleep(ms(300 + rng.below(400)));
        match rng.below(3) {
            0 | 1 => {
                // One member down at a time (quorum kept): the leader half
                // of the time.
                let victim = match (rng.below(2), cluster.leader()) {
                    (0, Some(leader)) => leader,
                    _ => rng.below(3) as usize,
                };
                cluster.members[victim].kill();
                thread::sleep(ms(500 + rng.below(1000)));
                cluster.members[victim].restart();
                injected.push(format!("kill m{victim}"));
                assert!(
                    cluster.wait_for_leader(Duration::from_secs(30)).is_some(),
                    "no leader after m{victim} restarted"
                );
            }
            _ => {
                let child = &children[rng.below(PROCESSES as u64) as usize];
                child.signal("STOP");
                thread::sleep(ms(ETCD_TTL_MS + 1000));
                child.signal("CONT");
                injected.push("freeze".to_owned());
            }
        }
    }
    eprintln!("faults injected: {injected:?}");
    // Every member runs, one leads and no worker is frozen: the workload
    // must recover (each worker granted every name again).
    for c in &mut children {
        c.send("calm");
    }
    let mut claims: Vec<(String, u64, u64, u64)> = Vec::new();
    let mut grants = 0;
    for mut c in children {
        loop {
            let msg = c.recv();
            let parts: Vec<&str> = msg.split(' ').collect();
            match parts[0] {
                "claim" => claims.push((
                    parts[1].to_owned(),
                    parts[2].parse().unwrap(),
                    parts[3].parse().unwrap(),
                    parts[4].parse().unwrap(),
                )),
                "stats" => {
                    let n: Vec<u64> = parts[1..].iter().map(|x| x.parse().unwrap()).collect();
                    assert_eq!(n[0], 0, "a lost lock was not signalled (seed {seed})");
                    assert_eq!(n[1], 0, "a normal release fired lost() (seed {seed})");
                    assert_eq!(
                        n[3], 0,
                        "a worker was not granted every name again within {RECOVERY_LIMIT:?} \
                         after the faults (seed {seed})"
                    );
                    grants += n[2];
                    break;
                }
                other => panic!("unexpected report {other}"),
            }
        }
        c.wait_success();
    }
    assert!(grants > 0 && run.writes() > 0);
    let mut violations = run.check();
    let port = cluster.members[cluster.leader().expect("a leader")].client_port;
    for name in &run.names {
        let made = holders(&history(port, &format!("lockbox/lock/{name}/")));
        let mut mine: Vec<&(String, u64, u64, u64)> =
            claims.iter().filter(|c| &c.0 == name).collect();
        mine.sort_by_key(|c| c.2);
        for (i, a) in mine.iter().enumerate() {
            if !made.contains(&a.1) {
                violations.push(format!(
                    "{name}: token {} claimed, never etcd's holder",
                    a.1
                ));
            }
            for b in &mine[i + 1..] {
                if b.2 < a.3 {
                    violations.push(format!(
                        "{name}: claims of tokens {} and {} overlap",
                        a.1, b.1
                    ));
                }
                if b.1 <= a.1 {
                    violations.push(format!("{name}: token {} claimed after {}", b.1, a.1));
                }
            }
        }
    }
    assert!(violations.is_empty(), "seed {seed}: {violations:#?}");
    assert!(
        eventually(ms(ETCD_TTL_MS * 4), || cluster.count_keys("lockbox/lock/")
            == Some(0)),
        "a lease outlived its holders"
    );
    run.drop_tables();
}
