//! try / timeout / blocking semantics, and the lock_timeout race.

use crate::common;

use std::thread;
use std::time::{Duration, Instant};

use common::*;
use lockbox::{AcquireOptions, Error};

#[test]
fn try_lock_returns_none_while_held() {
    let name = unique("try");
    let (a, _) = client(ms(1000));
    let (b, _) = client(ms(1000));
    let lock = a.try_lock(&name).unwrap().unwrap();
    assert!(b.try_lock(&name).unwrap().is_none());
    assert!(b.acquire(&name, &AcquireOptions::new()).unwrap().is_none());
    lock.release().unwrap();
    assert!(b.try_lock(&name).unwrap().is_some());
}

#[test]
fn lock_timeout_times_out_at_about_the_requested_time() {
    let name = unique("timeout");
    let (a, _) = client(ms(1000));
    let (b, b_app) = client(ms(1000));
    let _held = a.try_lock(&name).unwrap().unwrap();
    for wait in [ms(50), ms(400), ms(1500)] {
        let start = Instant::now();
        let err = b.lock_timeout(&name, wait).unwrap_err();
        let took = start.elapsed();
        match err {
            Error::Timeout { ref name, waited } => {
                assert!(name.starts_with("timeout-"));
                assert!(waited >= wait, "gave up after {waited:?} of {wait:?}");
            }
            other => panic!("expected Timeout, got {other}"),
        }
        assert!(
            took >= wait && took < wait + Duration::from_secs(1),
            "{took:?} for {wait:?}"
        );
        assert_eq!(
            advisory_locks_of(&b_app),
            0,
            "a timed-out wait left a lock behind"
        );
    }
}

#[test]
fn blocking_lock_is_granted_on_release_and_waits_server_side() {
    let name = unique("blocking");
    let (a, _) = client(ms(1000));
    let (b, b_app) = client(ms(1000));
    let held = a.try_lock(&name).unwrap().unwrap();
    let token = held.fencing_token();
    thread::scope(|s| {
        let waiter = s.spawn(|| b.lock(&name).unwrap());
        // The waiter blocks inside PostgreSQL, on the advisory lock.
        assert!(eventually(Duration::from_secs(5), || is_waiting(&b_app)));
        held.release().unwrap();
        let got = waiter.join().unwrap();
        assert_eq!(got.fencing_token(), token + 1);
    });
}

#[test]
fn with_lock_runs_the_closure_under_the_lock_and_releases() {
    let name = unique("with-lock");
    let (a, app) = client(ms(1000));
    let (b, _) = client(ms(1000));
    let token = a
        .with_lock(&name, ms(500), |lock| {
            assert!(lock.is_held());
            assert!(b.try_lock(&name).unwrap().is_none());
            lock.fencing_token()
        })
        .unwrap();
    assert!(token >= 1);
    assert_eq!(advisory_locks_of(&app), 0);
    let lock = b
        .try_lock(&name)
        .unwrap()
        .expect("released after the closure");
    assert!(
        a.with_lock(&name, ms(100), |_| ())
            .unwrap_err()
            .is_timeout()
    );
    drop(lock);
}

/// Tiny timeouts (1–5 ms) against a lock that changes hands constantly, two
/// thousand times: whenever a wait reports a timeout, the waiter's sessions hold
/// no advisory lock (a grant that raced the timeout was either returned or freed),
/// and no lock is leaked at the end.
#[test]
fn tiny_timeouts_never_leak_a_lock() {
    let name = unique("race");
    let (holder, _) = client(ms(2000));
    let (waiter, waiter_app) = client(ms(2000));
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (mut granted, mut timed_out) = (0, 0);
    thread::scope(|s| {
        // Stops the holder even if an assertion below fails.
        struct StopOnDrop<'a>(&'a std::sync::atomic::AtomicBool);
        impl Drop for StopOnDrop<'_> {
            fn drop(&mut self) {
                self.0.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        }
        let _stop = StopOnDrop(&stop);
        s.spawn(|| {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(lock) = holder.lock_timeout(&name, ms(50)) {
                    thread::sleep(ms(2));
                    lock.release().unwrap();
                }
            }
        });
        let mut db = admin();
        for i in 0..2000u64 {
            match waiter.lock_timeout(&name, ms(1 + i % 5)) {
                Ok(lock) => {
                    granted += 1;
                    lock.release().unwrap();
                }
                Err(e) if e.is_timeout() => {
                    timed_out += 1;
                    let held: i64 = db
                        .query_one(
                            "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
                             WHERE l.locktype = 'advisory' AND a.application_name = $1",
                            &[&waiter_app],
                        )
                        .unwrap()
                        .get(0);
                    assert_eq!(held, 0, "leaked after a timeout (iteration {i})");
                }
                Err(e) => panic!("unexpected error: {e}"),
            }
        }
    });
    assert!(granted + timed_out == 2000);
    assert!(
        timed_out > 0,
        "the holder never held the lock against the waiter"
    );
    assert_eq!(advisory_locks_of(&waiter_app), 0);
}

/// `acquires_waiting` counts only acquires that wait on a holder: a blocking
/// acquire of a free lock, held up on something else (here the lease row, locked
/// by another transaction), is not waiting on anyone.
#[test]
fn an_uncontended_blocking_acquire_is_not_counted_as_waiting() {
    let name = unique("not-waiting");
    let (client, app) = client(ms(1000));
    client.try_lock(&name).unwrap().unwrap().release().unwrap();
    let row = RowHold::lease(&name);
    thread::scope(|s| {
        let acquire = s.spawn(|| client.lock_timeout(&name, Duration::from_secs(10)));
        let blocked = eventually(Duration::from_secs(5), || {
            admin()
                .query_one(
                    "SELECT count(*) > 0 FROM pg_stat_activity \
                     WHERE application_name = $1 AND wait_event_type = 'Lock'",
                    &[&app],
                )
                .unwrap()
                .get(0)
        });
        assert!(blocked, "the acquire never reached the row");
        assert_eq!(
            client.metrics().acquires_waiting,
            0,
            "an acquire of a free lock was counted as waiting on a holder"
        );
        row.release();
        acquire.join().unwrap().unwrap().release().unwrap();
    });
}
