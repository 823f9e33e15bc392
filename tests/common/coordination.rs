//! The behaviour of the coordination primitives (semaphores, reader-writer
//! locks, elections, lock sets) every backend must show, written once;
//! `tests/coordination.rs` instantiates it per backend. Each function takes a
//! factory of client builders that share one store.

#![allow(dead_code)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use lockbox::{AcquireOptions, Error, LeaseKind, LeaseStatus, LockClient, LostReason};

use super::conformance::Factory;
use super::{eventually, ms, unique};

/// As the exclusive suite's: long enough for a stalled WAL flush.
const TTL: Duration = Duration::from_millis(1500);

fn client(factory: Factory) -> LockClient {
    factory().ttl(TTL).build().unwrap()
}

fn wait(d: Duration) -> AcquireOptions {
    AcquireOptions::new().wait(d)
}

/// Readers share the name; the writer excludes them and they it; tokens of
/// every kind come from the name's one sequence.
pub fn readers_share_and_writer_excludes(factory: Factory) {
    let name = unique("coord-rw");
    let (a, b) = (client(factory), client(factory));
    let (ra, rb) = (a.rwlock(&name).unwrap(), b.rwlock(&name).unwrap());
    let r1 = ra.try_read().unwrap().expect("a first reader");
    let r2 = rb.try_read().unwrap().expect("readers share");
    assert_ne!(r1.fencing_token(), r2.fencing_token());
    assert!(rb.try_write().unwrap().is_none(), "a writer beside readers");
    assert!(
        a.try_lock(&name).unwrap().is_none(),
        "a Lock beside readers"
    );
    let listed = b.leases_of(&name).unwrap();
    let readers: Vec<_> = listed
        .iter()
        .filter(|l| l.kind == LeaseKind::Shared && matches!(l.status, LeaseStatus::Held { .. }))
        .collect();
    assert_eq!(readers.len(), 2, "{listed:?}");
    let top = r1.fencing_token().max(r2.fencing_token());
    r1.release().unwrap();
    assert!(
        rb.try_write().unwrap().is_none(),
        "a writer beside a reader"
    );
    r2.release().unwrap();
    let w = rb.try_write().unwrap().expect("free once the readers left");
    assert!(
        w.fencing_token() > top,
        "a writer's token above the readers'"
    );
    assert!(
        ra.try_read().unwrap().is_none(),
        "a reader beside the writer"
    );
    assert!(ra.try_write().unwrap().is_none(), "two writers");
    let wt = w.fencing_token();
    w.release().unwrap();
    let r3 = ra.try_read().unwrap().expect("free once the writer left");
    assert!(r3.fencing_token() > wt);
    r3.release().unwrap();
}

/// A waiting writer is not starved: new readers queue behind it, and it is
/// granted once the readers before it leave.
pub fn waiting_writer_blocks_new_readers(factory: Factory) {
    let name = unique("coord-wpref");
    let (a, b, c) = (client(factory), client(factory), client(factory));
    let first = a.rwlock(&name).unwrap().try_read().unwrap().unwrap();
    let late = c.rwlock(&name).unwrap();
    thread::scope(|s| {
        let writer = s.spawn(|| {
            b.rwlock(&name)
                .unwrap()
                .write_timeout(Duration::from_secs(20))
                .unwrap()
        });
        assert!(eventually(ms(5000), || b.metrics().acquires_waiting == 1));
        assert!(
            late.try_read().unwrap().is_none(),
            "a new reader overtook the waiting writer"
        );
        let queued = s.spawn(|| late.read_timeout(Duration::from_secs(20)).unwrap());
        assert!(eventually(ms(5000), || c.metrics().acquires_waiting == 1));
        let first_token = first.fencing_token();
        first.release().unwrap();
        let w = writer.join().unwrap();
        assert!(w.fencing_token() > first_token);
        let beside = c
            .leases_of(&name)
            .unwrap()
            .into_iter()
            .filter(|l| l.kind == LeaseKind::Shared && matches!(l.status, LeaseStatus::Held { .. }))
            .count();
        assert_eq!(beside, 0, "a reader granted beside the writer");
        let wt = w.fencing_token();
        w.release().unwrap();
        let r = queued.join().unwrap();
        assert!(
            r.fencing_token() > wt,
            "the queued reader came after the writer"
        );
        r.release().unwrap();
    });
}

/// Each reader holds a lease of its own: one that stops renewing is lost
/// alone, and the other stays held.
pub fn a_reader_is_lost_on_its_own(factory: Factory) {
    let name = unique("coord-rlost");
    let (a, b) = (client(factory), client(factory));
    let ra = a.rwlock(&name).unwrap().try_read().unwrap().unwrap();
    let rb = b.rwlock(&name).unwrap().try_read().unwrap().unwrap();
    let lost = ra.lost();
    a.__pause_renewals(true);
    assert_eq!(lost.recv_timeout(TTL * 4), Ok(LostReason::Expired));
    assert!(!ra.is_held());
    thread::sleep(TTL / 2);
    assert!(rb.is_held(), "the other reader was lost with it");
    assert!(rb.lost().try_recv().is_err());
    a.__pause_renewals(false);
    assert!(ra.release().unwrap_err().is_lock_lost());
    rb.release().unwrap();
}

/// Never more than N permits at once, across clients and threads; every
/// acquire is served.
pub fn semaphore_never_above_n(factory: Factory) {
    let name = unique("coord-sem");
    let clients: Vec<LockClient> = (0..3).map(|_| client(factory)).collect();
    let inside = AtomicUsize::new(0);
    let most = AtomicUsize::new(0);
    let served = AtomicUsize::new(0);
    thread::scope(|s| {
        for t in 0..9 {
            let (c, name, inside, most, served) = (&clients[t % 3], &name, &inside, &most, &served);
            s.spawn(move || {
                let sem = c.semaphore(name, 3).unwrap();
                for _ in 0..6 {
                    let permit = sem.acquire_timeout(Duration::from_secs(30)).unwrap();
                    let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    assert!(now <= 3, "{now} permits of 3 held at once");
                    let live = sem.live_permits().unwrap();
                    assert!(live <= 3, "the store lists {live} live permits of 3");
                    thread::sleep(ms(5));
                    inside.fetch_sub(1, Ordering::SeqCst);
                    permit.release().unwrap();
                    served.fetch_add(1, Ordering::SeqCst);
                }
            });
        }
    });
    assert_eq!(served.load(Ordering::SeqCst), 54);
    assert!(
        most.load(Ordering::SeqCst) >= 2,
        "the permits were never shared"
    );
}

/// Permits have distinct, increasing tokens; a full semaphore refuses a try
/// and a waiter is served on a release.
pub fn semaphore_waits_for_a_release(factory: Factory) {
    let name = unique("coord-semwait");
    let (a, b) = (client(factory), client(factory));
    let (sa, sb) = (
        a.semaphore(&name, 2).unwrap(),
        b.semaphore(&name, 2).unwrap(),
    );
    let p1 = sa.try_acquire().unwrap().unwrap();
    let p2 = sa.try_acquire().unwrap().unwrap();
    assert!(p2.fencing_token() > p1.fencing_token());
    assert!(sb.try_acquire().unwrap().is_none(), "a third permit of 2");
    let start = Instant::now();
    assert!(sb.acquire_timeout(ms(300)).unwrap_err().is_timeout());
    assert!(start.elapsed() >= ms(300));
    thread::scope(|s| {
        let waiter = s.spawn(|| sb.acquire_timeout(Duration::from_secs(20)).unwrap());
        assert!(eventually(ms(5000), || b.metrics().acquires_waiting == 1));
        let top = p2.fencing_token();
        p1.release().unwrap();
        let p3 = waiter.join().unwrap();
        assert!(p3.fencing_token() > top);
        assert_eq!(sb.live_permits().unwrap(), 2);
        p3.release().unwrap();
    });
    p2.release().unwrap();
}

/// Clients that disagree about N are refused while permits are live, and so is
/// another kind of lease on the name; once every permit ended, the count may
/// change.
pub fn semaphore_count_mismatch_is_refused(factory: Factory) {
    let name = unique("coord-semcount");
    let (a, b) = (client(factory), client(factory));
    let p = a
        .semaphore(&name, 3)
        .unwrap()
        .try_acquire()
        .unwrap()
        .unwrap();
    let other = b.semaphore(&name, 5).unwrap();
    let err = other.try_acquire().unwrap_err();
    assert!(matches!(err, Error::InvalidConfig(_)), "{err}");
    let err = b.rwlock(&name).unwrap().try_read().unwrap_err();
    assert!(matches!(err, Error::InvalidConfig(_)), "{err}");
    // An exclusive lock just waits for the permits to end.
    assert!(b.try_lock(&name).unwrap().is_none());
    p.release().unwrap();
    let q = other
        .try_acquire()
        .unwrap()
        .expect("the count changes once all ended");
    q.release().unwrap();
    assert!(matches!(
        a.semaphore(&name, 0).unwrap_err(),
        Error::InvalidConfig(_)
    ));
}

/// A holder that stops renewing (crashed, frozen) keeps its permit until its
/// lease ends, and not a moment beyond: the next holder is granted only after
/// the old one's own deadline passed.
pub fn a_crashed_holders_permit_returns_at_lease_end(factory: Factory) {
    let name = unique("coord-semcrash");
    let (a, b) = (client(factory), client(factory));
    let held = a
        .semaphore(&name, 1)
        .unwrap()
        .try_acquire()
        .unwrap()
        .unwrap();
    a.__pause_renewals(true);
    let sem = b.semaphore(&name, 1).unwrap();
    assert!(sem.try_acquire().unwrap().is_none());
    let next = sem.acquire_timeout(TTL * 5).unwrap();
    assert!(
        !held.is_held(),
        "a permit granted while the old holder still believed it held its own"
    );
    assert!(next.fencing_token() > held.fencing_token());
    a.__pause_renewals(false);
    assert!(held.release().unwrap_err().is_lock_lost());
    next.release().unwrap();
}

/// An operator's force_release ends every holder of the name; each learns it.
pub fn force_release_ends_every_holder(factory: Factory) {
    let name = unique("coord-force");
    let (a, b) = (client(factory), client(factory));
    let p1 = a
        .semaphore(&name, 2)
        .unwrap()
        .try_acquire()
        .unwrap()
        .unwrap();
    let p2 = b
        .semaphore(&name, 2)
        .unwrap()
        .try_acquire()
        .unwrap()
        .unwrap();
    let top = p1.fencing_token().max(p2.fencing_token());
    let ended = match b.force_release(&name) {
        Err(Error::Unsupported(_)) => {
            p1.release().unwrap();
            p2.release().unwrap();
            return;
        }
        other => other.unwrap(),
    };
    assert_eq!(ended, Some(top));
    assert!(p1.lost().recv_timeout(TTL * 3).is_ok(), "a holder not told");
    assert!(p2.lost().recv_timeout(TTL * 3).is_ok(), "a holder not told");
    let next = a
        .semaphore(&name, 2)
        .unwrap()
        .try_acquire()
        .unwrap()
        .unwrap();
    assert!(next.fencing_token() > top);
    next.release().unwrap();
}

/// All or nothing within one budget: a set with a held member is not granted
/// and leaves nothing held; once free it is, and one release frees it all.
pub fn lock_set_all_or_nothing(factory: Factory) {
    let base = unique("coord-set");
    let names: Vec<String> = (1..=3).map(|i| format!("{base}/{i}")).collect();
    let (a, b) = (client(factory), client(factory));
    let blocker = b.try_lock(&names[2]).unwrap().unwrap();
    let start = Instant::now();
    assert!(a.lock_set(&names, &wait(ms(400))).unwrap().is_none());
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "one budget, not one per name"
    );
    for n in &names[..2] {
        let l = b.try_lock(n).unwrap().expect("a member left held");
        l.release().unwrap();
    }
    blocker.release().unwrap();
    let set = a
        .lock_set(&names, &wait(Duration::from_secs(5)))
        .unwrap()
        .unwrap();
    assert!(set.is_held());
    assert_eq!(set.locks().len(), 3);
    for n in &names {
        assert!(b.try_lock(n).unwrap().is_none(), "{n} not held by the set");
        assert!(set.get(n).is_some());
    }
    set.release().unwrap();
    for n in &names {
        let l = b.try_lock(n).unwrap().expect("the set's release freed all");
        l.release().unwrap();
    }
    assert!(matches!(
        a.lock_set::<&str>(&[], &wait(ms(1))).unwrap_err(),
        Error::InvalidConfig(_)
    ));
}

/// Sets that overlap in opposite orders never deadlock, and each member is
/// exclusive; the loss of one member is the set's.
pub fn lock_sets_in_any_order(factory: Factory) {
    let base = unique("coord-setorder");
    let (x, y) = (format!("{base}/x"), format!("{base}/y"));
    let (a, b) = (client(factory), client(factory));
    let inside = AtomicUsize::new(0);
    thread::scope(|s| {
        for (c, names) in [(&a, [&x, &y]), (&b, [&y, &x])] {
            let inside = &inside;
            s.spawn(move || {
                for _ in 0..10 {
                    let set = c
                        .lock_set(&names, &wait(Duration::from_secs(30)))
                        .unwrap()
                        .expect("deadlocked or starved");
                    assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0, "two sets at once");
                    inside.fetch_sub(1, Ordering::SeqCst);
                    set.release().unwrap();
                }
            });
        }
    });
    let set = a
        .lock_set(&[&x, &y], &wait(Duration::from_secs(5)))
        .unwrap()
        .unwrap();
    let lost = set.lost();
    a.__pause_renewals(true);
    assert_eq!(lost.recv_timeout(TTL * 4), Ok(LostReason::Expired));
    assert!(!set.is_held());
    assert!(set.ensure_held().unwrap_err().is_lock_lost());
    a.__pause_renewals(false);
    assert!(set.release().unwrap_err().is_lock_lost());
}

/// One leader at a time, terms increasing; followers see who leads and are
/// told of every change without polling, including a leader that vanished
/// without resigning.
pub fn election_and_watch(factory: Factory) {
    let name = unique("coord-elect");
    let (a, b, c) = (client(factory), client(factory), client(factory));
    let (ea, eb, ec) = (
        a.election(&name).unwrap(),
        b.election(&name).unwrap(),
        c.election(&name).unwrap(),
    );
    let watch = ec.watch().unwrap();
    let next = || {
        watch
            .changes()
            .recv_timeout(TTL * 5)
            .expect("no change reported")
    };
    assert_eq!(next(), None, "nobody leads yet");
    let la = ea
        .campaign("alpha", &AcquireOptions::new())
        .unwrap()
        .unwrap();
    let seen = next().expect("alpha leads");
    assert_eq!((seen.identity.as_str(), seen.term), ("alpha", la.term()));
    assert_eq!(seen.owner, a.owner_id());
    assert!(
        eb.campaign("beta", &AcquireOptions::new())
            .unwrap()
            .is_none()
    );
    assert_eq!(ec.leader().unwrap().map(|l| l.term), Some(la.term()));
    // Resigning: beta, waiting, takes over with a higher term.
    thread::scope(|s| {
        let beta = s.spawn(|| {
            eb.campaign("beta", &wait(Duration::from_secs(20)))
                .unwrap()
                .unwrap()
        });
        assert!(eventually(ms(5000), || b.metrics().acquires_waiting == 1));
        let alpha_term = la.term();
        la.release().unwrap();
        let lb = beta.join().unwrap();
        assert!(lb.term() > alpha_term);
        let mut seen = next();
        if seen.is_none() {
            seen = next();
        }
        let seen = seen.expect("beta leads");
        assert_eq!((seen.identity.as_str(), seen.term), ("beta", lb.term()));
        // Vanishing: beta stops renewing; its lease ends unannounced, and the
        // watch says nobody leads once it has.
        let lost = lb.lost();
        b.__pause_renewals(true);
        assert_eq!(next(), None, "a vanished leader still reported");
        assert!(
            lost.try_recv().is_ok(),
            "reported gone before its holder knew"
        );
        b.__pause_renewals(false);
        drop(lb);
    });
    assert_eq!(ec.leader().unwrap(), None);
}

/// Instantiates the coordination suite for one backend: `$factory` makes
/// builders of clients that share one store.
#[macro_export]
macro_rules! coordination_suite {
    ($backend:ident, $factory:expr) => {
        mod $backend {
            #[allow(unused_imports)]
            use super::*;
            use lockbox::LockClientBuilder;
            use $crate::common::coordination as suite;

            fn factory() -> LockClientBuilder {
                $factory
            }

            #[test]
            fn readers_share_and_writer_excludes() {
                suite::readers_share_and_writer_excludes(factory);
            }
            #[test]
            fn waiting_writer_blocks_new_readers() {
                suite::waiting_writer_blocks_new_readers(factory);
            }
            #[test]
            fn a_reader_is_lost_on_its_own() {
                suite::a_reader_is_lost_on_its_own(factory);
            }
            #[test]
            fn semaphore_never_above_n() {
                suite::semaphore_never_above_n(factory);
            }
            #[test]
            fn semaphore_waits_for_a_release() {
                suite::semaphore_waits_for_a_release(factory);
            }
            #[test]
            fn semaphore_count_mismatch_is_refused() {
                suite::semaphore_count_mismatch_is_refused(factory);
            }
            #[test]
            fn a_crashed_holders_permit_returns_at_lease_end() {
                suite::a_crashed_holders_permit_returns_at_lease_end(factory);
            }
            #[test]
            fn force_release_ends_every_holder() {
                suite::force_release_ends_every_holder(factory);
            }
            #[test]
            fn lock_set_all_or_nothing() {
                suite::lock_set_all_or_nothing(factory);
            }
            #[test]
            fn lock_sets_in_any_order() {
                suite::lock_sets_in_any_order(factory);
            }
            #[test]
            fn election_and_watch() {
                suite::election_and_watch(factory);
            }
        }
    };
}

/// Permit waiters are served in arrival order, over three rounds on a
/// semaphore of one permit: `a` holds it, `b` and then `c` queue (`queued(n)`:
/// whether the store shows `n` waiters queued), and the freed permit goes to
/// `b`, then `c`, with increasing tokens. With `newcomer_refused`, a try by
/// `a` just after the release is refused: it does not overtake the queue.
pub fn permit_waiters_in_arrival_order(
    (a, b, c): (&LockClient, &LockClient, &LockClient),
    name: &str,
    queued: &mut dyn FnMut(usize) -> bool,
    newcomer_refused: bool,
) {
    let try_a = || a.semaphore(name, 1).unwrap().try_acquire().unwrap();
    let waits = |client: &LockClient| {
        client
            .semaphore(name, 1)
            .unwrap()
            .acquire_timeout(Duration::from_secs(20))
            .unwrap()
    };
    for round in 0..3 {
        let held = try_a().expect("the permit is free");
        thread::scope(|s| {
            let first = s.spawn(|| waits(b));
            assert!(
                eventually(ms(5000), || queued(1)),
                "round {round}: the first waiter never queued"
            );
            let second = s.spawn(|| waits(c));
            assert!(
                eventually(ms(5000), || queued(2)),
                "round {round}: the second waiter never queued behind the first"
            );
            let t0 = held.fencing_token();
            held.release().unwrap();
            if newcomer_refused {
                assert!(
                    try_a().is_none(),
                    "round {round}: a newcomer overtook the queue"
                );
            }
            let p1 = first.join().unwrap();
            assert!(p1.fencing_token() > t0);
            let t1 = p1.fencing_token();
            p1.release().unwrap();
            let p2 = second.join().unwrap();
            assert!(
                p2.fencing_token() > t1,
                "round {round}: served out of order"
            );
            p2.release().unwrap();
        });
    }
}
