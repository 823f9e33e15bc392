//! A three-member etcd cluster on loopback ports, started by the test, with
//! members killed, frozen and restarted under held and waiting locks. One
//! cluster at a time (the tests take turns): elections are timing-sensitive,
//! and the machine is shared.

use crate::common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use common::etcd_server::EtcdCluster;
use common::{eventually, ms, unique};
use lockbox::{Error, LockClient, LostReason};

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// The tests' turn at the machine.
fn serial() -> MutexGuard<'static, ()> {
    static TURN: Mutex<()> = Mutex::new(());
    TURN.lock().unwrap_or_else(|e| e.into_inner())
}

/// A client on `endpoints` with `ttl`, whose requests (acquires) may take
/// 5 s, failover and a leader election included.
fn client(endpoints: &str, ttl: Duration) -> LockClient {
    LockClient::etcd(endpoints)
        .ttl(ttl)
        .connect_timeout(secs(5))
        .build()
        .unwrap()
}

/// Waits until `client` has renewed `n` more times than now.
fn renewals(client: &LockClient, n: u64, limit: Duration) -> bool {
    let from = client.metrics().renewals_ok;
    eventually(limit, || client.metrics().renewals_ok >= from + n)
}

/// The leader is killed while one client holds a lock and two wait for it:
/// the lock stays held (its lease outlives the election: etcd extends leases
/// by an election timeout on a leader change, and renewals fail over to the
/// members left), the waiters are granted only after its release, in the
/// order they came, with increasing tokens.
#[test]
fn leader_killed_while_held_and_waited() {
    let _turn = serial();
    let mut cluster = EtcdCluster::start(3);
    let leader = cluster.leader().expect("a leader");
    // The leader first: the clients are talking to it when it dies.
    let endpoints = endpoints_from(&cluster, leader);
    let ttl = secs(4);
    let (a, b, c) = (
        client(&endpoints, ttl),
        client(&endpoints, ttl),
        client(&endpoints, ttl),
    );
    let name = unique("etcd-leader-kill");
    let held = a.try_lock(&name).unwrap().expect("free");
    let lost = held.lost();
    let token = held.fencing_token();
    let inside = AtomicBool::new(true);
    let grants = AtomicU64::new(0);
    let waiter = |client: &LockClient| {
        let lock = client.lock_timeout(&name, secs(60)).unwrap();
        assert!(!inside.swap(true, Ordering::SeqCst), "granted twice");
        let order = grants.fetch_add(1, Ordering::SeqCst);
        let token = lock.fencing_token();
        inside.store(false, Ordering::SeqCst);
        lock.release().unwrap();
        (order, token)
    };
    thread::scope(|s| {
        let first = s.spawn(|| waiter(&b));
        assert!(eventually(secs(10), || b.metrics().acquires_waiting == 1));
        let second = s.spawn(|| waiter(&c));
        assert!(eventually(secs(10), || c.metrics().acquires_waiting == 1));

        cluster.members[leader].kill();
        let new_leader = cluster.wait_for_leader(secs(30)).expect("a new leader");
        assert_ne!(new_leader, leader);
        // Renewed through the new leader, several times over a whole TTL.
        assert!(renewals(&a, 4, secs(30)), "no renewal after the election");
        assert!(held.is_held());
        assert!(lost.try_recv().is_err(), "the holder saw a loss");
        assert_eq!(grants.load(Ordering::SeqCst), 0, "a waiter was granted");
        assert_eq!(b.metrics().acquires_waiting, 1);
        assert_eq!(c.metrics().acquires_waiting, 1);

        inside.store(false, Ordering::SeqCst);
        held.release().unwrap();
        let (b_order, b_token) = first.join().unwrap();
        let (c_order, c_token) = second.join().unwrap();
        assert_eq!((b_order, c_order), (0, 1), "not granted in arrival order");
        assert!(
            b_token > token && c_token > b_token,
            "{token} {b_token} {c_token}"
        );
    });
    // The killed member rejoins; tokens still increase.
    cluster.members[leader].restart();
    assert!(cluster.wait_for_leader(secs(30)).is_some());
    let again = a.lock_timeout(&name, secs(10)).unwrap();
    assert!(again.fencing_token() > token);
    again.release().unwrap();
}

/// The clients' endpoint order: member `first`'s, then the others'.
fn endpoints_from(cluster: &EtcdCluster, first: usize) -> String {
    let mut order: Vec<usize> = vec![first];
    order.extend((0..cluster.members.len()).filter(|&i| i != first));
    order
        .iter()
        .map(|&i| cluster.members[i].client_url())
        .collect::<Vec<_>>()
        .join(",")
}

/// A follower — the member the clients talk to first — is frozen (SIGSTOP)
/// for longer than the TTL while a lock is held and another client waits:
/// requests to it time out and fail over to the others, the lock stays held,
/// the waiter keeps waiting and other names are granted; thawed, it rejoins
/// and the waiter is granted on release.
#[test]
fn frozen_follower() {
    let _turn = serial();
    let cluster = EtcdCluster::start(3);
    let leader = cluster.leader().expect("a leader");
    let follower = (leader + 1) % 3;
    let endpoints = endpoints_from(&cluster, follower);
    let ttl = secs(4);
    let (a, b) = (client(&endpoints, ttl), client(&endpoints, ttl));
    let name = unique("etcd-freeze-follower");
    let held = a.try_lock(&name).unwrap().expect("free");
    let lost = held.lost();
    let token = held.fencing_token();
    thread::scope(|s| {
        let waiter = s.spawn(|| b.lock_timeout(&name, secs(60)).unwrap());
        assert!(eventually(secs(10), || b.metrics().acquires_waiting == 1));
        cluster.members[follower].freeze(true);
        // Over a whole TTL of renewals, every one failing over.
        assert!(renewals(&a, 4, secs(30)), "no renewal with a member frozen");
        assert!(held.is_held());
        assert!(lost.try_recv().is_err(), "the holder saw a loss");
        assert_eq!(b.metrics().acquires_waiting, 1, "the waiter was granted");
        let other = b.try_lock(&unique("etcd-freeze-other")).unwrap();
        assert!(other.is_some(), "nothing granted with one member frozen");
        drop(other);
        cluster.members[follower].freeze(false);
        assert!(cluster.wait_for_leader(secs(30)).is_some());
        held.release().unwrap();
        let next = waiter.join().unwrap();
        assert!(next.fencing_token() > token);
        next.release().unwrap();
    });
}

/// The leader is frozen while a lock is held and another client waits, and
/// thawed once a new leader has renewed the lock, before the lease would
/// have run out in the frozen leader's view: the lock stays held throughout,
/// the waiter waits, and is granted on release. (Frozen for longer than the
/// TTL, an etcd 3.4.23 leader revokes on waking the leases it saw run out,
/// although the new leader kept them alive: etcd issues #12528 and #15247,
/// fixed upstream by etcd PR #16822, after 3.4.23; see the README.)
#[test]
fn frozen_leader_thawed_within_the_ttl() {
    let _turn = serial();
    let cluster = EtcdCluster::start(3);
    let leader = cluster.leader().expect("a leader");
    // The leader first: the clients are talking to it when it stops.
    let endpoints = endpoints_from(&cluster, leader);
    let ttl = secs(10);
    let (a, b) = (client(&endpoints, ttl), client(&endpoints, ttl));
    let name = unique("etcd-freeze-leader");
    let held = a.try_lock(&name).unwrap().expect("free");
    let lost = held.lost();
    let token = held.fencing_token();
    thread::scope(|s| {
        let waiter = s.spawn(|| b.lock_timeout(&name, secs(60)).unwrap());
        assert!(eventually(secs(10), || b.metrics().acquires_waiting == 1));
        cluster.members[leader].freeze(true);
        let new_leader = cluster.wait_for_leader(secs(30)).expect("a new leader");
        assert_ne!(new_leader, leader);
        assert!(
            renewals(&a, 1, secs(30)),
            "no renewal with the leader frozen"
        );
        cluster.members[leader].freeze(false);
        assert!(cluster.wait_for_leader(secs(30)).is_some());
        assert!(renewals(&a, 2, secs(30)), "no renewal after the thaw");
        assert!(held.is_held());
        assert!(lost.try_recv().is_err(), "the holder saw a loss");
        assert_eq!(b.metrics().acquires_waiting, 1, "the waiter was granted");
        held.release().unwrap();
        let next = waiter.join().unwrap();
        assert!(next.fencing_token() > token);
        next.release().unwrap();
    });
}

/// Two of three members killed: quorum is lost. Acquires fail with an error
/// naming the failure within their wait; a waiter fails too, granted
/// nothing; the holder sees `lost()` by its deadline; health says there is
/// no quorum. With the members back, the lock is granted once, with a
/// greater token, only after the old lease has run out, and the old
/// holder's release reports the loss.
#[test]
fn quorum_lost_and_regained() {
    let _turn = serial();
    let mut cluster = EtcdCluster::start(3);
    let endpoints = cluster.endpoints();
    let ttl = secs(3);
    let (a, b, c) = (
        client(&endpoints, ttl),
        client(&endpoints, ttl),
        client(&endpoints, ttl),
    );
    let name = unique("etcd-quorum");
    let held = a.try_lock(&name).unwrap().expect("free");
    let lost = held.lost();
    let token = held.fencing_token();
    thread::scope(|s| {
        let waiter = s.spawn(|| c.lock_timeout(&name, secs(60)));
        assert!(eventually(secs(10), || c.metrics().acquires_waiting == 1));
        let health = b.health();
        let members = health.database.cluster.as_ref().expect("cluster health");
        assert!(members.quorum && members.leader.is_some(), "{health:?}");
        assert_eq!(members.members.len(), 3);
        assert!(health.is_healthy(), "{health}");

        // Member 0 stays: the one every client tries first.
        let killed_at = Instant::now();
        cluster.members[1].kill();
        cluster.members[2].kill();

        let wait = secs(3);
        let start = Instant::now();
        let err = b
            .lock_timeout(&unique("etcd-quorum-other"), wait)
            .unwrap_err();
        let took = start.elapsed();
        assert!(matches!(err, Error::Database(_)), "{err:?}");
        assert!(err.to_string().contains("etcd"), "{err}");
        // Within the wait, give or take the scheduling of a loaded machine.
        assert!(took < wait + secs(1), "failed after {took:?}");

        // By its deadline: the last renewal was sent before the kill.
        let reason = lost.recv_deadline(killed_at + ttl + secs(1));
        assert_eq!(reason, Ok(LostReason::Expired));
        assert!(!held.is_held());

        let waited = waiter.join().unwrap();
        assert!(waited.is_err(), "a waiter was granted without quorum");

        let health = b.health();
        let members = health.database.cluster.as_ref().expect("cluster health");
        assert!(!members.quorum, "{health:?}");
        assert!(!health.is_healthy(), "{health}");
        assert!(health.to_string().contains("quorum"), "{health}");
    });

    cluster.members[1].restart();
    cluster.members[2].restart();
    assert!(cluster.wait_for_leader(secs(30)).is_some());
    let next = b.lock_timeout(&name, secs(30)).unwrap();
    assert!(next.fencing_token() > token);
    assert!(a.try_lock(&name).unwrap().is_none(), "granted twice");
    assert!(c.try_lock(&name).unwrap().is_none(), "granted twice");
    assert!(held.release().unwrap_err().is_lock_lost());
    next.release().unwrap();
    assert!(eventually(ms(5000), || {
        cluster.count_keys("lockbox/lock/") == Some(0)
    }));
}
