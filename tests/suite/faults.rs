//! Fault scenarios: forced key collisions, hostile role-level settings, a renewal
//! statement cancelled mid-flight.

use crate::common;

use std::thread;
use std::time::{Duration, Instant};

use common::*;
use lockbox::{LockClient, LostReason};

/// Two names forced onto one advisory key stay correct, only serialized: the lease
/// row, keyed by the full name, is what decides.
#[test]
fn names_sharing_an_advisory_key_are_only_serialized() {
    fn same_key(_: &str) -> i64 {
        7
    }
    let (a, b) = (unique("shared-a"), unique("shared-b"));
    let app2 = unique("k2");
    let c1 = builder_for(&unique("k1"))
        .__advisory_key_fn(same_key)
        .build()
        .unwrap();
    let c2 = builder_for(&app2)
        .__advisory_key_fn(same_key)
        .build()
        .unwrap();

    let lock_a = c1.try_lock(&a).unwrap().unwrap();
    let first_a = lock_a.fencing_token() as i64;
    let mut first_b = 0;
    assert!(
        c2.try_lock(&b).unwrap().is_none(),
        "b waits behind a: same key"
    );
    thread::scope(|s| {
        let waiter = s.spawn(|| c2.lock_timeout(&b, ms(5000)).unwrap());
        assert!(eventually(ms(5000), || is_waiting(&app2)));
        lock_a.release().unwrap();
        let lock_b = waiter.join().unwrap();
        first_b = lock_b.fencing_token() as i64;
        assert_eq!(
            lease_row(&a).token,
            first_a,
            "b's grant left a's counter alone"
        );
    });

    // Under contention on both names, each name still has one holder at a time.
    let counters = [
        std::sync::atomic::AtomicI64::new(0),
        std::sync::atomic::AtomicI64::new(0),
    ];
    let inside = [
        std::sync::atomic::AtomicBool::new(false),
        std::sync::atomic::AtomicBool::new(false),
    ];
    thread::scope(|s| {
        for t in 0..4 {
            let (c, names, counters, inside) = (
                if t % 2 == 0 { &c1 } else { &c2 },
                [&a, &b],
                &counters,
                &inside,
            );
            s.spawn(move || {
                for i in 0..20 {
                    let which = (t + i) % 2;
                    let lock = c.lock_timeout(names[which], ms(10_000)).unwrap();
                    assert!(
                        !inside[which].swap(true, std::sync::atomic::Ordering::SeqCst),
                        "overlap"
                    );
                    counters[which].fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    inside[which].store(false, std::sync::atomic::Ordering::SeqCst);
                    lock.release().unwrap();
                }
            });
        }
    });
    let total: i64 = counters
        .iter()
        .map(|c| c.load(std::sync::atomic::Ordering::SeqCst))
        .sum();
    assert_eq!(total, 80);
    // One token per grant on each name, each counting from its own first grant.
    assert_eq!(
        lease_row(&a).token + lease_row(&b).token,
        first_a + first_b + 80
    );
}

/// Role-level `statement_timeout`, `lock_timeout` and `idle_session_timeout` far
/// below the lock's timings break neither waits nor idle holders.
#[test]
fn role_level_timeouts_break_nothing() {
    let role = unique("hostile").replace('-', "_");
    drop(client(ms(1000))); // the lease table exists
    acl_change(&format!(
        "CREATE ROLE {role} LOGIN; GRANT SELECT, INSERT, UPDATE ON lockbox_leases TO {role}; \
             ALTER ROLE {role} SET statement_timeout = '100ms'; \
             ALTER ROLE {role} SET lock_timeout = '50ms'; \
             ALTER ROLE {role} SET idle_session_timeout = '300ms'; \
             ALTER ROLE {role} SET idle_in_transaction_session_timeout = '100ms';"
    ))
    .unwrap();
    let result = std::panic::catch_unwind(|| {
        // Renewals every 500 ms: sessions idle longer than the role allows.
        let client = LockClient::builder(&url_as_user(&role))
            .create_table(false)
            .ttl(ms(1500))
            .build()
            .unwrap();
        let (other, _) = common::client(ms(5000));
        let held = unique("hostile-held");
        let busy = unique("hostile-busy");
        let _blocker = other.try_lock(&busy).unwrap().unwrap();

        let lock = client.try_lock(&held).unwrap().unwrap();
        let start = Instant::now();
        let err = client.lock_timeout(&busy, ms(1000)).unwrap_err();
        assert!(
            err.is_timeout(),
            "the wait was broken by a role setting: {err}"
        );
        assert!(start.elapsed() >= ms(1000));
        thread::sleep(ms(1500));
        assert!(lock.is_held(), "an idle holder was cut off");
        assert_eq!(lock.lost_reason(), None);
        lock.release().unwrap();
        // A pooled connection idle past idle_session_timeout still works.
        thread::sleep(ms(400));
        client.try_lock(&held).unwrap().unwrap().release().unwrap();
    });
    let _ = acl_change(&format!("DROP OWNED BY {role}; DROP ROLE {role};"));
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

/// A renewal statement cancelled by an operator (`pg_cancel_backend`) is a
/// transient failure: retried, and the lock is kept. (On a session of its own,
/// where a renewal waits for the row lock and can be caught blocked.)
#[test]
fn a_cancelled_renewal_is_retried_and_the_lock_kept() {
    let client = builder_for(&unique("app"))
        .ttl(ms(1500))
        .locks_per_session(1)
        .build()
        .unwrap();
    let name = unique("cancel");
    let lock = client.try_lock(&name).unwrap().unwrap();
    let pid = holder_pid(&name);
    let before = client.metrics();

    // Hold the lease row so the next renewal blocks where it can be cancelled.
    let row = RowHold::lease(&name);
    let blocked = eventually(Duration::from_secs(2), || blocked_on_lock(pid));
    assert!(blocked, "the renewal never blocked on the row");
    let cancelled: bool = admin()
        .query_one("SELECT pg_cancel_backend($1)", &[&pid])
        .unwrap()
        .get(0);
    assert!(cancelled);
    assert!(eventually(Duration::from_secs(1), || client
        .metrics()
        .renewals_failed
        > before.renewals_failed));
    row.release();

    let renewed = client.metrics().renewals_ok;
    assert!(eventually(Duration::from_secs(2), || client
        .metrics()
        .renewals_ok
        > renewed));
    assert!(lock.is_held());
    assert_eq!(
        lock.lost().try_recv(),
        Err(crossbeam_channel::TryRecvError::Empty)
    );
    assert_eq!(client.metrics().lost(LostReason::SessionLost), 0);
    lock.release().unwrap();
}
