//! Review of fork safety: a forked child's copy of a lock is documented as inert
//! and "reports the lock as not held (NotOwner)". Every query of it must say so,
//! and none may touch the lock's internal mutexes, which another thread of the
//! parent may have held at the moment of the fork (the child never gets that
//! thread back, so such a mutex stays locked forever there).

mod common;

use std::time::{Duration, Instant};

use common::*;
use lockbox::LostReason;

/// Forks; the child runs `f` and `_exit`s with its code. Returns the child's exit
/// code, or `None` if it had not exited within `limit` (it is then killed).
fn in_child(limit: Duration, f: impl FnOnce() -> i32) -> Option<i32> {
    // SAFETY: the child only calls `f` (lockbox queries) and `_exit`s without
    // running destructors or the test harness.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        let code = f();
        unsafe { libc::_exit(code) };
    }
    let end = Instant::now() + limit;
    let mut status = 0;
    loop {
        let waited = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if waited == pid {
            assert!(libc::WIFEXITED(status), "child died: status {status}");
            return Some(libc::WEXITSTATUS(status));
        }
        if Instant::now() >= end {
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, &mut status, 0);
            }
            return None;
        }
        std::thread::sleep(ms(5));
    }
}

/// `lost_reason()` is "`None` while it is held"; in a child, where `is_held()` is
/// false (`NotOwner`), it still says `None`: the child is told it holds the lock.
#[test]
fn a_forked_childs_lost_reason_says_not_owner() {
    let client = lockbox::LockClient::memory()
        .ttl(ms(30_000))
        .build()
        .unwrap();
    let lock = client.try_lock(&unique("fork-reason")).unwrap().unwrap();
    let code = in_child(ms(5000), || match lock.lost_reason() {
        Some(LostReason::NotOwner) => 0,
        Some(_) => 1,
        None => 2,
    });
    lock.release().unwrap();
    assert_eq!(
        code,
        Some(0),
        "in the forked child lost_reason() was {} while is_held() is false",
        if code == Some(2) {
            "None (held)"
        } else {
            "not NotOwner"
        }
    );
}

/// A thread of the parent keeps checking the lock (`is_held`, which takes the
/// lock's clock mutex) while the main thread forks; each child asks
/// `lost_reason()`. When the fork caught the mutex held, the child blocks forever
/// on it.
#[test]
fn a_forked_child_never_blocks_on_a_mutex_held_at_the_fork() {
    let client = lockbox::LockClient::memory()
        .ttl(ms(30_000))
        .build()
        .unwrap();
    let lock = client.try_lock(&unique("fork-mutex")).unwrap().unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let hung = std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                assert!(lock.is_held());
            }
        });
        // Up to 40 forks; stops at the first child that hangs.
        let hung = (0..40)
            .find(|_| in_child(ms(1000), || i32::from(lock.lost_reason().is_some())).is_none())
            .is_some();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        hung
    });
    lock.release().unwrap();
    assert!(
        !hung,
        "a forked child blocked forever in lost_reason() on a mutex held at the fork"
    );
}
