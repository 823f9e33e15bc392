//! A forked child's copies of a client and its locks are inert: dropping them
//! sends nothing on the parent's sessions and joins no thread the child lacks.

mod common;

use common::*;
use lockbox::Error;

#[test]
fn a_forked_child_dropping_its_copies_changes_nothing_for_the_parent() {
    let ttl = ms(900);
    let (client, _) = client(ttl);
    let (contender, _) = common::client(ttl);
    let name = unique("fork");
    let lock = client.try_lock(&name).unwrap().unwrap();
    let token = lock.fencing_token();

    // The child only drops lockbox values: its own copies (bitwise, in its
    // own memory, never dropped in the parent).
    let code = in_child(|| {
        // SAFETY: runs only in the forked child, which `_exit`s after; the
        // parent's values are untouched.
        let (lock, client) = unsafe { (std::ptr::read(&lock), std::ptr::read(&client)) };
        let mut code = 0;
        if lock.is_held() {
            code |= 1; // the child must not believe it holds the parent's lock
        }
        match client.try_lock(&unique("in-child")) {
            Err(Error::Unsupported(_)) => {}
            _ => code |= 2, // a forked client refuses to act
        }
        if lock.release().is_ok() {
            code |= 4;
        }
        drop(client);
        code
    });
    assert_eq!(code, 0, "child saw a usable lock or client");

    // The parent still holds the lock, in the database too, and keeps renewing.
    assert!(lock.is_held());
    let row = lease_row(&name);
    assert!(!row.released && row.token as u64 == token);
    assert!(contender.try_lock(&name).unwrap().is_none());
    let renewed = client.metrics().renewals_ok;
    assert!(eventually(ttl, || client.metrics().renewals_ok > renewed));
    assert!(lock.lost().try_recv().is_err());
    lock.release().unwrap();
    assert!(lease_row(&name).released);
}

/// A child forked while the Redis release listener's first attempt is still
/// under way has no listener thread: its `health()` neither waits for that
/// attempt (it would wait out its whole timeout) nor reports the parent's
/// listener as its own (review of c9c36ad).
#[test]
fn a_forked_childs_redis_health_does_not_wait_for_the_parents_listener() {
    use common::proxy::Proxy;
    use common::redis_server::redis_url;
    use std::time::{Duration, Instant};

    let info: redis::ConnectionInfo = redis_url().parse().unwrap();
    let proxy = Proxy::start(&info.addr().to_string());
    // The listener's subscription is held back for good: its first attempt
    // ends only when the PSUBSCRIBE goes unanswered for 1 s.
    proxy.hold_until(
        |piece| piece.windows(10).any(|w| w == b"PSUBSCRIBE"),
        |_| false,
    );
    let timeout = Duration::from_secs(20);
    let client = lockbox::LockClient::redis(&format!("redis://127.0.0.1:{}/", proxy.port))
        .health_timeout(timeout)
        .build()
        .unwrap();
    assert!(eventually(ms(5000), || proxy.held() == 1));

    let code = in_child(|| {
        let asked = Instant::now();
        let health = client.health();
        let mut code = 0;
        if asked.elapsed() >= timeout / 2 {
            code |= 1; // it waited for an attempt nobody in this process makes
        }
        if health.database.listener_alive != Some(false) {
            code |= 2; // the parent's listener is not this process's
        }
        code
    });
    assert_eq!(code, 0, "child's health: bits {code}");
}

/// Nor, once the parent's listener is subscribed, does the child's health
/// report it (or the parent's renewal thread) alive: nothing in the child
/// hears releases or renews.
#[test]
fn a_forked_childs_redis_health_does_not_report_the_parents_threads() {
    let client = lockbox::LockClient::redis(common::redis_server::redis_url())
        .build()
        .unwrap();
    assert_eq!(client.health().database.listener_alive, Some(true));
    assert!(client.health().renewal.thread_alive);
    let code = in_child(|| {
        let health = client.health();
        i32::from(health.database.listener_alive != Some(false))
            | i32::from(health.renewal.thread_alive) << 1
    });
    assert_eq!(
        code, 0,
        "the child reports the parent's threads alive: bits {code}"
    );
}

/// Runs `child` in a forked child, which then `_exit`s with what it returns
/// (without running destructors or the test harness); returns that code.
fn in_child(child: impl FnOnce() -> i32) -> i32 {
    // SAFETY: the child runs only `child`, then `_exit`s.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        let code = child();
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    let waited = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(waited, pid);
    assert!(libc::WIFEXITED(status), "child died: status {status}");
    libc::WEXITSTATUS(status)
}
