//! The renewal thread's life: it outlives client handles while locks are held, is
//! joined when the last handle goes, and a panic in it marks held locks lost.
//! (One test per process, since it counts the process's threads.)

mod common;

use common::*;
use lockbox::{Error, LostReason};

/// Threads of this process named as the renewal thread. A thread that
/// `join()` has waited for can still be listed for a moment: the kernel
/// wakes the joiner (clearing the thread's id) before it unlists the thread
/// from `/proc/<pid>/task`, so a count right after a join may lag by one
/// (seen once in CI, `.ci/run` of 1445fca); counts after a join are awaited.
fn renewal_threads() -> usize {
    std::fs::read_dir(format!("/proc/{}/task", std::process::id()))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.starts_with("lockbox-renewa"))
        .count()
}

#[test]
fn renewal_thread_lifecycle() {
    let base = renewal_threads();

    // Locks keep the client (pool, renewal thread) alive after its handles go.
    // A TTL of 1 s, slept through three times: renewals every third of it
    // keep the lock through a loaded machine's scheduling delays (300 ms
    // lost it once under a full run beside other builds).
    let (client, app) = client(ms(1000));
    // A new thread takes its name once it runs.
    assert!(eventually(ms(2000), || renewal_threads() == base + 1));
    let name = unique("outlives-client");
    let lock = client.try_lock(&name).unwrap().unwrap();
    drop(client);
    std::thread::sleep(ms(3000));
    assert!(
        lock.is_held(),
        "renewals stopped when the client handle was dropped"
    );
    assert_eq!(renewal_threads(), base + 1);
    lock.release().unwrap();
    // The last handle is gone: the thread was joined, no connection holds a lock.
    // (The pool's connections are closed by then; their backends end by
    // themselves a moment later, and only then leave pg_locks.)
    assert!(eventually(ms(2000), || renewal_threads() == base));
    assert!(eventually(ms(2000), || advisory_locks_of(&app) == 0));

    // A panic in the renewal thread marks every held lock lost and frees it.
    let (client, app) = common::client(ms(600));
    let a = client.try_lock(&unique("panic-a")).unwrap().unwrap();
    let b = client.try_lock(&unique("panic-b")).unwrap().unwrap();
    client.__inject_renewal_panic();
    assert_eq!(
        a.lost().recv_timeout(ms(2000)),
        Ok(LostReason::RenewalStopped)
    );
    assert_eq!(
        b.lost().recv_timeout(ms(2000)),
        Ok(LostReason::RenewalStopped)
    );
    // The locks are marked lost while the thread unwinds; it ends just after.
    assert!(eventually(ms(2000), || !client.renewal_thread_alive()));
    assert_eq!(advisory_locks_of(&app), 0);
    assert!(matches!(
        client.try_lock(&unique("after-panic")),
        Err(Error::RenewalStopped)
    ));
    assert_eq!(advisory_locks_of(&app), 0);
    assert!(a.release().unwrap_err().is_lock_lost());
    drop(b);
    drop(client);
    assert!(eventually(ms(2000), || renewal_threads() == base));
}
