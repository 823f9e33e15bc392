//! The behaviour every backend must show, written once; `tests/conformance.rs`
//! instantiates it per backend. Each function takes a factory of client builders
//! that share one store.

#![allow(dead_code)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use lockbox::{AcquireOptions, Error, LockClient, LockClientBuilder, LostReason};

use super::{eventually, ms, unique};

pub type Factory = fn() -> LockClientBuilder;

/// Long enough to survive a stalled WAL flush on a shared disk (commits were
/// seen to wait over a second while another process flushed gigabytes).
const TTL: Duration = Duration::from_millis(1500);

fn client(factory: Factory) -> LockClient {
    factory().ttl(TTL).build().unwrap()
}

/// Several clients and threads on one name: one holder at a time, every
/// critical section counted once.
pub fn exclusion_under_contention(factory: Factory) {
    let name = unique("conf-excl");
    let clients: Vec<LockClient> = (0..2).map(|_| client(factory)).collect();
    let inside = AtomicBool::new(false);
    let count = AtomicU64::new(0);
    thread::scope(|s| {
        for t in 0..6 {
            let (c, name, inside, count) = (&clients[t % 2], &name, &inside, &count);
            s.spawn(move || {
                for _ in 0..15 {
                    let lock = c.lock_timeout(name, Duration::from_secs(20)).unwrap();
                    assert!(!inside.swap(true, Ordering::SeqCst), "two holders at once");
                    count.fetch_add(1, Ordering::SeqCst);
                    inside.store(false, Ordering::SeqCst);
                    lock.release().unwrap();
                }
            });
        }
    });
    assert_eq!(count.load(Ordering::SeqCst), 90);
}

/// `try_lock` never waits; `lock_timeout` gives up at its time; `lock` waits
/// and is granted on release.
pub fn try_timeout_and_blocking(factory: Factory) {
    let name = unique("conf-wait");
    let (a, b) = (client(factory), client(factory));
    let held = a.try_lock(&name).unwrap().unwrap();
    let start = Instant::now();
    assert!(b.try_lock(&name).unwrap().is_none());
    assert!(start.elapsed() < ms(500), "try_lock waited");
    let start = Instant::now();
    let err = b.lock_timeout(&name, ms(300)).unwrap_err();
    assert!(err.is_timeout(), "{err}");
    assert!(start.elapsed() >= ms(300) && start.elapsed() < ms(1300));
    let token = held.fencing_token();
    thread::scope(|s| {
        let waiter = s.spawn(|| b.lock(&name).unwrap());
        assert!(eventually(ms(5000), || b.metrics().acquires_waiting == 1));
        held.release().unwrap();
        // Above the last token, not necessarily next to it: a store may draw
        // tokens from one store-wide counter (or a clock) shared by every name.
        assert!(waiter.join().unwrap().fencing_token() > token);
    });
}

/// Tokens strictly increase across release, re-acquire and expiry.
pub fn fencing_tokens_increase(factory: Factory) {
    let name = unique("conf-fence");
    let (a, b) = (client(factory), client(factory));
    let mut last = 0;
    for _ in 0..3 {
        let lock = a.try_lock(&name).unwrap().unwrap();
        assert!(lock.fencing_token() > last);
        last = lock.fencing_token();
        lock.release().unwrap();
    }
    let lock = b.try_lock(&name).unwrap().unwrap();
    assert!(lock.fencing_token() > last);
    last = lock.fencing_token();
    b.__pause_renewals(true);
    let next = a.lock_timeout(&name, TTL * 5).unwrap();
    assert!(next.fencing_token() > last, "a token repeated after expiry");
    b.__pause_renewals(false);
    drop(lock);
}

/// When renewals stop, the lease ends at its TTL: a contender gets the lock then,
/// not before; the old holder sees the loss, signalled, and its release fails.
pub fn expiry_when_renewal_stops(factory: Factory) {
    let name = unique("conf-expiry");
    let (a, b) = (client(factory), client(factory));
    // Measured from before the call: the lease starts inside it, and may start
    // well before it returns (a slow commit).
    let before = Instant::now();
    let lock = a.try_lock(&name).unwrap().unwrap();
    let lost = lock.lost();
    a.__pause_renewals(true);
    let next = b.lock_timeout(&name, TTL * 5).unwrap();
    let granted = before.elapsed();
    assert!(
        granted >= TTL - ms(50),
        "granted after {granted:?}, before the TTL"
    );
    assert!(!lock.is_held());
    assert!(matches!(lock.ensure_held(), Err(Error::LockLost { .. })));
    assert_eq!(lost.recv_timeout(ms(100)), Ok(LostReason::Expired));
    assert!(lock.release().unwrap_err().is_lock_lost());
    a.__pause_renewals(false);
    assert!(next.is_held());
    next.release().unwrap();
}

/// Renewals keep a lock held far past its TTL, with a stable token.
pub fn renewal_keeps_it_alive(factory: Factory) {
    let name = unique("conf-renew");
    let (a, b) = (client(factory), client(factory));
    let lock = a.try_lock(&name).unwrap().unwrap();
    let token = lock.fencing_token();
    for _ in 0..4 {
        thread::sleep(TTL / 2);
        // Which way it was lost (not owner, or no renewal in time) is what a
        // failure needs to tell.
        assert!(
            lock.is_held(),
            "lost: {:?}; renewals ok {}, failed {}",
            lock.lost_reason(),
            a.metrics().renewals_ok,
            a.metrics().renewals_failed
        );
        assert!(b.try_lock(&name).unwrap().is_none());
    }
    assert_eq!(lock.fencing_token(), token);
    assert!(a.metrics().renewals_ok >= 4);
    lock.release().unwrap();
}

/// Release and drop both free the lock; a normal release does not signal loss.
pub fn release_and_drop(factory: Factory) {
    let name = unique("conf-release");
    let (a, b) = (client(factory), client(factory));
    let lock = a.try_lock(&name).unwrap().unwrap();
    let lost = lock.lost();
    lock.release().unwrap();
    assert_eq!(
        lost.recv_timeout(ms(50)),
        Err(crossbeam_channel::RecvTimeoutError::Disconnected)
    );
    let lock = b.try_lock(&name).unwrap().expect("free after release");
    drop(lock);
    assert!(a.try_lock(&name).unwrap().is_some(), "free after drop");
}

/// Invalid names and options are refused before anything reaches the store.
pub fn invalid_input(factory: Factory) {
    let a = client(factory);
    for bad in ["", "nul\0"] {
        assert!(matches!(a.try_lock(bad), Err(Error::InvalidName(_))));
    }
    let long = "x".repeat(lockbox::MAX_NAME_LEN + 1);
    assert!(matches!(
        a.lock_timeout(&long, ms(1)),
        Err(Error::InvalidName(_))
    ));
    let opts = AcquireOptions::new().ttl(ms(1));
    assert!(matches!(
        a.acquire("ok", &opts),
        Err(Error::InvalidConfig(_))
    ));
    assert!(matches!(
        factory().ttl(Duration::ZERO).build(),
        Err(Error::InvalidConfig(_))
    ));
}

/// Leases are listed with their holder.
pub fn inspection(factory: Factory) {
    let name = unique("conf-inspect");
    let a = client(factory);
    let lock = a
        .acquire(&name, &AcquireOptions::new().metadata("who"))
        .unwrap()
        .unwrap();
    let info = a.lease(&name).unwrap().expect("listed");
    assert_eq!(info.fencing_token, lock.fencing_token());
    assert_eq!(info.owner, a.owner_id());
    assert_eq!(info.metadata.as_deref(), Some("who"));
    assert!(matches!(info.status, lockbox::LeaseStatus::Held { .. }));
    assert!(info.holder_alive);
    lock.release().unwrap();
    assert!(matches!(
        a.lease(&name).unwrap().unwrap().status,
        lockbox::LeaseStatus::Released { .. }
    ));
    // The report judged is the one shown (a second call may differ).
    let health = a.health();
    assert!(health.is_healthy(), "{health}\n{health:?}");
}

/// A wait longer than the TTL (the holder renewing meanwhile) ends with a lock
/// that is held, with a full lease ahead of it.
pub fn a_long_wait_yields_a_held_lock(factory: Factory) {
    let name = unique("conf-long-wait");
    let (a, b) = (client(factory), client(factory));
    let held = a.try_lock(&name).unwrap().unwrap();
    thread::scope(|s| {
        let waiter = s.spawn(|| b.lock(&name).unwrap());
        thread::sleep(TTL * 2);
        assert!(held.is_held(), "the holder's renewals failed");
        held.release().unwrap();
        let lock = waiter.join().unwrap();
        assert!(
            lock.is_held(),
            "the grant after a long wait came back expired"
        );
        thread::sleep(TTL / 2);
        assert!(lock.is_held());
        lock.release().unwrap();
    });
}

/// Instantiates the suite as module `$backend`, for a factory of builders that
/// share one store.
#[macro_export]
macro_rules! conformance_suite {
    ($backend:ident, $factory:expr) => {
        mod $backend {
            #[allow(unused_imports)]
            use super::*;
            use lockbox::LockClientBuilder;
            use $crate::common::conformance as suite;

            fn factory() -> LockClientBuilder {
                $factory
            }

            #[test]
            fn exclusion_under_contention() {
                suite::exclusion_under_contention(factory);
            }
            #[test]
            fn try_timeout_and_blocking() {
                suite::try_timeout_and_blocking(factory);
            }
            #[test]
            fn fencing_tokens_increase() {
                suite::fencing_tokens_increase(factory);
            }
            #[test]
            fn expiry_when_renewal_stops() {
                suite::expiry_when_renewal_stops(factory);
            }
            #[test]
            fn renewal_keeps_it_alive() {
                suite::renewal_keeps_it_alive(factory);
            }
            #[test]
            fn release_and_drop() {
                suite::release_and_drop(factory);
            }
            #[test]
            fn invalid_input() {
                suite::invalid_input(factory);
            }
            #[test]
            fn a_long_wait_yields_a_held_lock() {
                suite::a_long_wait_yields_a_held_lock(factory);
            }
            #[test]
            fn inspection() {
                suite::inspection(factory);
            }
        }
    };
}
