//! Hostile review of the wait-and-grant function: EXECUTE revoked under a
//! pooled session.
//!
//! A session checks EXECUTE when it opens; a function dropped later is handled
//! (42883: wait without it). EXECUTE revoked later is not: the pooled
//! session's call fails with 42501 before it waits, and the waiting acquire
//! fails with `InsufficientPrivilege` instead of waiting and granting with a
//! statement of its own, as the README promises for a function "the role may
//! not call". (Each pooled session fails one acquire this way, then is
//! closed.) `ALTER DEFAULT PRIVILEGES … REVOKE EXECUTE … FROM PUBLIC` or a
//! hardening script run while clients are up does exactly this.

use crate::common;

use std::thread;
use std::time::Duration;

use common::wg::*;
use common::*;

#[test]
fn execute_revoked_under_a_pooled_session_does_not_fail_waiting_acquires() {
    let f = WgFixture::new();
    let holder = f.app_client(&unique("wgr-rev-h"), ttl());
    let w_app = unique("wgr-rev-w");
    let waiter = f.app_client(&w_app, ttl());
    // A pooled session of the waiter, which checked the function and may call it.
    warm_pool(&waiter);
    admin()
        .batch_execute(&format!(
            "REVOKE EXECUTE ON FUNCTION {} FROM PUBLIC",
            f.signature()
        ))
        .unwrap();

    let name = unique("wgr-rev");
    let held = holder.try_lock(&name).unwrap().expect("a free lock");
    let outcome = thread::scope(|s| {
        let w = s.spawn(|| waiter.lock_timeout(&name, Duration::from_secs(20)));
        // Until it waits on the key (or has given up).
        assert!(eventually(Duration::from_secs(10), || is_waiting(&w_app)
            || w.is_finished()));
        held.release().unwrap();
        w.join().unwrap()
    });
    match outcome {
        Ok(lock) => lock.release().unwrap(),
        Err(e) => panic!("a waiting acquire failed because EXECUTE was revoked: {e}"),
    }
}
