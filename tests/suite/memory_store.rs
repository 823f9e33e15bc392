//! The in-memory store: abandoned sessions are not reported alive, and the state
//! of released and expired names is reclaimed without tokens ever repeating or
//! going back.

use crate::common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::*;
use lockbox::{LeaseStatus, LockClient, LostReason, MemoryBackend};

/// The most leases a store may list once nothing is held: the retained free ones
/// (the last release may add one above them).
const BOUND: usize = MemoryBackend::RETAINED_FREE + 1;

/// A lock whose session is dropped without a release (here: the holder's
/// renewal thread dies, which drops every session it renews) is no longer
/// listed with a live holder; its lease runs out at its TTL like a crashed
/// holder's, and only then is the lock granted again, with a higher token.
#[test]
fn an_abandoned_lock_is_not_reported_alive_and_runs_out_at_its_ttl() {
    let store = MemoryBackend::new();
    let ttl = ms(2000);
    let a = LockClient::with_backend(store.clone())
        .ttl(ttl)
        .build()
        .unwrap();
    let b = LockClient::with_backend(store).ttl(ttl).build().unwrap();
    let name = unique("abandoned");
    let acquired = Instant::now();
    let lock = a.try_lock(&name).unwrap().unwrap();
    assert!(b.lease(&name).unwrap().unwrap().holder_alive);
    let lost = lock.lost();
    a.__inject_renewal_panic();
    assert_eq!(
        lost.recv_timeout(Duration::from_secs(5)),
        Ok(LostReason::RenewalStopped)
    );
    // The thread drops the sessions right after marking the locks lost, then ends.
    assert!(eventually(Duration::from_secs(5), || !a.renewal_thread_alive()));
    let info = b.lease(&name).unwrap().unwrap();
    assert!(
        !info.holder_alive,
        "abandoned, yet reported alive: {info:?}"
    );
    if acquired.elapsed() < ttl - ms(50) {
        assert!(matches!(info.status, LeaseStatus::Held { .. }), "{info:?}");
        assert!(
            b.try_lock(&name).unwrap().is_none(),
            "granted before the TTL"
        );
    }
    let next = b.lock_timeout(&name, Duration::from_secs(5)).unwrap();
    assert!(
        acquired.elapsed() >= ttl,
        "granted before the abandoned lease ran out"
    );
    assert!(next.fencing_token() > lock.fencing_token());
    assert!(b.lease(&name).unwrap().unwrap().holder_alive);
    next.release().unwrap();
}

/// 10 000 distinct names locked and released leave a small store (the retained
/// free leases only), recent releases stay listed, and every name's tokens keep
/// increasing across the reclaim: a second round over every name gets a token
/// above the first round's, and above every token issued before.
#[test]
fn released_names_are_reclaimed_and_tokens_never_go_back() {
    const NAMES: usize = 10_000;
    let client = LockClient::with_backend(MemoryBackend::new())
        .build()
        .unwrap();
    let mut first: HashMap<String, u64> = HashMap::new();
    let mut highest = 0;
    for i in 0..NAMES {
        let name = format!("job-{i}");
        let lock = client.try_lock(&name).unwrap().unwrap();
        assert!(lock.fencing_token() > 0);
        highest = highest.max(lock.fencing_token());
        first.insert(name, lock.fencing_token());
        lock.release().unwrap();
    }
    let listed = client.leases().unwrap();
    assert!(listed.len() <= BOUND, "{} leases kept", listed.len());
    let last = client.lease(&format!("job-{}", NAMES - 1)).unwrap();
    assert!(
        matches!(last.map(|l| l.status), Some(LeaseStatus::Released { .. })),
        "the latest release is no longer listed"
    );
    for i in 0..NAMES {
        let name = format!("job-{i}");
        let lock = client.try_lock(&name).unwrap().unwrap();
        let token = lock.fencing_token();
        assert!(
            token > first[&name],
            "{name}: token {token} after {}",
            first[&name]
        );
        // Reclaimed (the early names): above everything issued before, too.
        if i < NAMES - BOUND {
            assert!(
                token > highest,
                "{name}: token {token}, issued before: {highest}"
            );
        }
        highest = highest.max(token);
        lock.release().unwrap();
    }
    assert!(client.leases().unwrap().len() <= BOUND);
}

/// The leases of crashed holders (sessions dropped, leases expired) are
/// reclaimed too, by later grants of other names, and held leases never are.
#[test]
fn expired_leases_of_abandoned_locks_are_reclaimed() {
    const CRASHED: usize = 3 * MemoryBackend::RETAINED_FREE;
    let store = MemoryBackend::new();
    let ttl = ms(300);
    let crashed = LockClient::with_backend(store.clone())
        .ttl(ttl)
        .build()
        .unwrap();
    let other = LockClient::with_backend(store).ttl(ttl).build().unwrap();
    let held = other.try_lock("kept-held").unwrap().unwrap();
    let locks: Vec<_> = (0..CRASHED)
        .map(|i| crashed.try_lock(&format!("crashed-{i}")).unwrap().unwrap())
        .collect();
    let lost = locks.last().unwrap().lost();
    crashed.__inject_renewal_panic();
    assert!(lost.recv_timeout(Duration::from_secs(5)).is_ok());
    assert!(eventually(Duration::from_secs(5), || !crashed.renewal_thread_alive()));
    assert!(other.leases().unwrap().len() > CRASHED);
    // The last lease granted ends last: once it is free, all of them are.
    let name = format!("crashed-{}", CRASHED - 1);
    other
        .lock_timeout(&name, Duration::from_secs(5))
        .unwrap()
        .release()
        .unwrap();
    for i in 0..CRASHED {
        other
            .try_lock(&format!("fresh-{i}"))
            .unwrap()
            .unwrap()
            .release()
            .unwrap();
    }
    let listed = other.leases().unwrap();
    // One held lease besides the retained free ones.
    assert!(listed.len() <= BOUND + 1, "{} leases kept", listed.len());
    assert!(
        listed
            .iter()
            .any(|l| l.name == "kept-held" && l.holder_alive),
        "a held lease was reclaimed"
    );
    assert!(held.is_held());
    held.release().unwrap();
    drop(locks);
}

/// One client holding thousands of locks keeps every one of them through
/// several TTLs, even after all their renewals fell due at once (renewals held
/// back for half a TTL, as a stalled process would), and still ends at once
/// when its renewal thread does. (The scheduler once made a full pass over
/// every lock per finished renewal and per queued wake: with thousands of locks a
/// burst of renewals took seconds to plan, so short leases ran out while held,
/// and a shutdown waited behind thousands of queued wakes.)
#[test]
fn thousands_of_locks_of_one_client_stay_held() {
    const LOCKS: usize = 3_000;
    // Half a TTL for the burst: 1 s left 167 locks lost once, in a CI run
    // beside two builds and another test run (load average above 5 on two
    // cores); the scheduler's old bug took seconds.
    let ttl = ms(2000);
    let client = LockClient::with_backend(MemoryBackend::new())
        .ttl(ttl)
        .build()
        .unwrap();
    // Taken from four threads at once, while the first ones are renewed.
    let locks: Vec<_> = std::thread::scope(|s| {
        let takers: Vec<_> = (0..4)
            .map(|t| {
                let client = &client;
                s.spawn(move || {
                    (0..LOCKS / 4)
                        .map(|i| client.try_lock(&format!("many-{t}-{i}")).unwrap().unwrap())
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        takers.into_iter().flat_map(|t| t.join().unwrap()).collect()
    });
    let lost: Vec<_> = locks.iter().map(|l| l.lost()).collect();
    client.__pause_renewals(true);
    std::thread::sleep(ttl / 2);
    client.__pause_renewals(false);
    // Three TTLs: any lock whose renewals fell a TTL behind has been lost.
    std::thread::sleep(ttl * 3);
    let dropped = locks.iter().filter(|l| !l.is_held()).count();
    assert_eq!(dropped, 0, "{dropped} of {LOCKS} locks lost while held");
    client.__inject_renewal_panic();
    for rx in &lost {
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(5)),
            Ok(LostReason::RenewalStopped)
        );
    }
}
