//! The locks one Redis client holds are renewed together: one round trip per
//! round (a pipeline of renewals on one lease-lane connection), not one per
//! lock; and each renewal in it still checks its own lease, so a lease taken
//! over, or whose keys are damaged, ends that lock alone. On throwaway servers,
//! whose counters no other test moves.

use crate::common;

use std::time::Instant;

use common::proxy::Proxy;
use common::redis_server::{RedisServer, certs};
use common::*;
use lockbox::{Lock, LockClient, LostReason};

/// `field:value` of an `INFO` section, as a number.
fn info_number(c: &mut redis::Connection, section: &str, field: &str) -> u64 {
    let info: String = redis::cmd("INFO").arg(section).query(c).unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("INFO {section} has no {field}"))
        .trim()
        .parse()
        .unwrap()
}

/// How many EVALSHA commands the server has run (each renewal is one).
fn evalsha_calls(c: &mut redis::Connection) -> u64 {
    let info: String = redis::cmd("INFO").arg("commandstats").query(c).unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("cmdstat_evalsha:calls="))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |n| n.parse().unwrap())
}

/// Takes `n` locks, all free.
fn hold(client: &LockClient, prefix: &str, n: usize) -> Vec<Lock> {
    (0..n)
        .map(|i| {
            client
                .try_lock(&unique(&format!("{prefix}-{i}")))
                .unwrap()
                .expect("free")
        })
        .collect()
}

/// The locks of `locks` that are no longer held, with why.
fn lost(locks: &[Lock]) -> Vec<(String, Option<LostReason>)> {
    locks
        .iter()
        .filter(|l| !l.is_held())
        .map(|l| (l.name().to_owned(), l.lost_reason()))
        .collect()
}

/// 200 locks with a 300 ms TTL, held through several TTLs: none is lost, and
/// the server reads their renewals in far fewer reads than there are
/// renewals. One request per lock per round (before: each renewal its own
/// EVALSHA on a connection of its own, one read each) makes the reads at
/// least as many as the renewals; a pipeline per round makes them a handful
/// per round.
#[test]
fn many_locks_are_renewed_in_one_round_trip_per_round() {
    let s = RedisServer::start().unwrap();
    let n = 200;
    let ttl = ms(300);
    let client = LockClient::redis(&s.url).ttl(ttl).build().unwrap();
    let locks = hold(&client, "batch", n);
    // Past the acquires (one request each) and into steady renewing.
    std::thread::sleep(ttl);
    let mut admin = s.connection();
    let reads_before = info_number(&mut admin, "stats", "total_reads_processed");
    let renewals_before = evalsha_calls(&mut admin);
    std::thread::sleep(ttl * 5);
    let renewals = evalsha_calls(&mut admin) - renewals_before;
    let reads = info_number(&mut admin, "stats", "total_reads_processed") - reads_before;
    eprintln!("{reads} reads for {renewals} renewals of {n} locks in 5 TTLs");
    assert_eq!(lost(&locks), vec![], "locks were lost");
    // Every lock renews every TTL / 3 or sooner (a neighbour's round may take it early).
    assert!(
        renewals >= (n * 5 * 2) as u64,
        "{renewals} renewals of {n} locks in 5 TTLs: too few"
    );
    assert!(
        reads * 10 < renewals,
        "{reads} reads for {renewals} renewals: not batched"
    );
    for lock in locks {
        lock.release().unwrap();
    }
}

/// One lease among many is taken over (its key deleted, then another client
/// acquires the name): that lock alone is lost, with `NotOwner`; the newcomer
/// keeps it (no renewal re-creates or overwrites its key); every other lock
/// stays held.
#[test]
fn a_lease_taken_over_ends_that_lock_alone() {
    let s = RedisServer::start().unwrap();
    let n = 100;
    let ttl = ms(300);
    let client = LockClient::redis(&s.url).ttl(ttl).build().unwrap();
    let mut locks = hold(&client, "takeover", n);
    let victim = locks.remove(n / 2);
    let key = format!("lockbox:lock:{}", victim.name());
    let deleted: i64 = redis::cmd("DEL")
        .arg(&key)
        .query(&mut s.connection())
        .unwrap();
    assert_eq!(deleted, 1);
    let intruder = LockClient::redis(&s.url).ttl(ms(5_000)).build().unwrap();
    let taken = intruder
        .try_lock(victim.name())
        .unwrap()
        .expect("the deleted lease's name is free");
    assert_eq!(
        victim.lost().recv_timeout(ttl * 2),
        Ok(LostReason::NotOwner)
    );
    std::thread::sleep(ttl * 3);
    assert_eq!(lost(&locks), vec![], "other locks were lost with it");
    let value: String = redis::cmd("GET")
        .arg(&key)
        .query(&mut s.connection())
        .unwrap();
    assert_eq!(
        value,
        format!("{}|{}", taken.fencing_token(), intruder.owner_id()),
        "a renewal touched the newcomer's key"
    );
    assert!(taken.is_held());
    for lock in locks {
        lock.release().unwrap();
    }
}

/// One lease among many has a key of the wrong type (its metadata hash
/// replaced by a string): its renewal is refused by the server, that lock
/// alone runs out (`Expired`, as its renewal's outcome stays unknown), and the
/// refused renewal wrote nothing; the others, renewed in the same round
/// trips, stay held.
#[test]
fn an_error_for_one_renewal_leaves_the_others_renewed() {
    let s = RedisServer::start().unwrap();
    let n = 100;
    let ttl = ms(300);
    let client = LockClient::redis(&s.url).ttl(ttl).build().unwrap();
    let mut locks = hold(&client, "one-error", n);
    let victim = locks.remove(n / 3);
    let meta = format!("lockbox:meta:{}", victim.name());
    let () = redis::cmd("SET")
        .arg(&meta)
        .arg("not a hash")
        .query(&mut s.connection())
        .unwrap();
    assert_eq!(victim.lost().recv_timeout(ttl * 2), Ok(LostReason::Expired));
    std::thread::sleep(ttl * 3);
    assert_eq!(lost(&locks), vec![], "other locks were lost with it");
    let value: String = redis::cmd("GET")
        .arg(&meta)
        .query(&mut s.connection())
        .unwrap();
    assert_eq!(value, "not a hash");
    for lock in locks {
        lock.release().unwrap();
    }
}

/// The server forgets its scripts over and over (`SCRIPT FLUSH`, as after a
/// restart or by an operator) while many locks are held: renewals that meet
/// `NOSCRIPT` — all of a round trip's, or those after a flush that came in
/// the middle of one — load the script and are sent again, and no lock is
/// lost.
#[test]
fn renewals_survive_the_script_cache_being_flushed() {
    let s = RedisServer::start().unwrap();
    let n = 100;
    let ttl = ms(300);
    let client = LockClient::redis(&s.url).ttl(ttl).build().unwrap();
    let locks = hold(&client, "noscript", n);
    let mut admin = s.connection();
    let end = Instant::now() + ttl * 6;
    while Instant::now() < end {
        let () = redis::cmd("SCRIPT").arg("FLUSH").query(&mut admin).unwrap();
        std::thread::sleep(ms(7));
    }
    assert_eq!(lost(&locks), vec![], "locks were lost");
    for lock in locks {
        lock.release().unwrap();
    }
}

/// Every connection is cut between rounds (as a restart of the server, of a
/// proxy, or a NAT's reset would), while the lease lane holds several idle
/// connections: the next round's pipeline fails on its dead connection
/// before any reply, is sent again once on a new one — not on another of the
/// idle ones, dead too — and no renewal fails.
#[test]
fn a_cut_connection_between_rounds_fails_no_renewal() {
    let s = RedisServer::start().unwrap();
    let proxy = Proxy::start(&format!("127.0.0.1:{}", s.port));
    let n = 100;
    let ttl = ms(900);
    let client = LockClient::redis(&format!("redis://127.0.0.1:{}/", proxy.port))
        .ttl(ttl)
        .build()
        .unwrap();
    let locks = hold(&client, "cut", n);
    // Several lane connections, left idle: extends from several threads at once.
    let start = std::sync::Barrier::new(8);
    std::thread::scope(|scope| {
        for lock in &locks[..8] {
            let start = &start;
            scope.spawn(move || {
                start.wait();
                lock.extend(ttl).unwrap();
            });
        }
    });
    // No round in flight while the connections are cut.
    client.__pause_renewals(true);
    std::thread::sleep(ttl / 6);
    proxy.cut();
    std::thread::sleep(ms(20));
    let failed_before = client.metrics().renewals_failed;
    client.__pause_renewals(false);
    std::thread::sleep(ttl);
    assert_eq!(lost(&locks), vec![], "locks were lost");
    assert_eq!(
        client.metrics().renewals_failed - failed_before,
        0,
        "renewals failed after the cut"
    );
}

/// The server stops answering (a proxy holds every byte; connections stay
/// up) while 100 locks are held: each round's pipeline gives up at the least
/// deadline of its leases, so its renewals are reported failed by then, and
/// each lock is lost (`Expired`) at its deadline. Before a pipeline
/// was read reply by reply against its deadline, the driver read on after a
/// timed-out reply, giving each of the 100 the whole time left again: the
/// round (and every later one of the client, one at a time) was stuck for
/// about 100 times the TTL.
#[test]
fn a_stalled_pipeline_gives_up_by_its_deadline() {
    let s = RedisServer::start().unwrap();
    let proxy = Proxy::start(&format!("127.0.0.1:{}", s.port));
    let n = 100;
    let ttl = ms(600);
    let client = LockClient::redis(&format!("redis://127.0.0.1:{}/", proxy.port))
        .ttl(ttl)
        .connect_timeout(ms(500))
        .build()
        .unwrap();
    let locks = hold(&client, "stall", n);
    std::thread::sleep(ttl / 2);
    let failed_before = client.metrics().renewals_failed;
    proxy.pause();
    let paused = Instant::now();
    for lock in &locks {
        let left = (ttl * 2).saturating_sub(paused.elapsed());
        assert_eq!(lock.lost().recv_timeout(left), Ok(LostReason::Expired));
    }
    // The round in flight gives up at that same deadline (the locks were
    // renewed together, so they share it): give it a moment to report.
    let came_back = eventually(ttl / 2, || client.metrics().renewals_failed > failed_before);
    proxy.resume();
    assert!(
        came_back,
        "no renewal came back within {:?} of the pause: a round is stuck",
        ttl * 5 / 2
    );
    // The client renews again once the server answers.
    let lock = client
        .try_lock(&unique("stall-after"))
        .unwrap()
        .expect("free");
    std::thread::sleep(ttl * 3);
    assert!(lock.is_held(), "{:?}", lock.lost_reason());
}

/// Over TLS and over a Unix socket, a round's pipeline of 200 renewals (more
/// than one piece of the pipeline's write) goes through like over TCP: no
/// renewal fails, no lock is lost.
#[test]
fn large_rounds_over_tls_and_a_unix_socket() {
    let s = RedisServer::start_tls("no", &[]).unwrap();
    let ttl = ms(600);
    for client in [
        LockClient::redis(&s.url).redis_tls_ca_file(&certs().ca),
        LockClient::redis(&s.socket_url()),
    ] {
        let client = client.ttl(ttl).build().unwrap();
        let locks = hold(&client, "large-round-over-tls-and-socket", 200);
        let failed_before = client.metrics().renewals_failed;
        let ok_before = client.metrics().renewals_ok;
        std::thread::sleep(ttl * 3);
        assert_eq!(lost(&locks), vec![], "locks were lost");
        assert_eq!(client.metrics().renewals_failed, failed_before);
        assert!(client.metrics().renewals_ok >= ok_before + 200 * 4);
        for lock in locks {
            lock.release().unwrap();
        }
    }
}
