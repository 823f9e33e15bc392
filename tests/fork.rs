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

    // SAFETY: the child only drops lockbox values, then `_exit`s without running
    // destructors or the test harness.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
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
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    let waited = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(waited, pid);
    assert!(libc::WIFEXITED(status), "child died: status {status}");
    assert_eq!(
        libc::WEXITSTATUS(status),
        0,
        "child saw a usable lock or client"
    );

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
