//! Holders in other processes that die (SIGKILL) or freeze (SIGSTOP) while holding.

mod common;

use common::*;
use lockbox::{Error, LockClient, LostReason};

const TTL_MS: u64 = 800;

/// Child roles: `hold` takes the lock, reports its token, then obeys commands.
#[test]
#[ignore = "child-process entry point, run by the other tests"]
fn child_entry() {
    let Some(role) = child_role() else { return };
    assert_eq!(role, "hold");
    let name = std::env::var("LOCK_NAME").unwrap();
    let client = LockClient::builder(database_url())
        .ttl(ms(TTL_MS))
        .build()
        .unwrap();
    let lock = client.try_lock(&name).unwrap().expect("free");
    let lost = lock.lost();
    report(&format!("token {}", lock.fencing_token()));
    // Blocks until the parent speaks (or kills us).
    assert_eq!(next_command(), "check");
    let held = lock.ensure_held();
    report(&format!(
        "ensure_held {}",
        matches!(held, Err(Error::LockLost { .. }))
    ));
    report(&format!("signal {:?}", lost.try_recv()));
    match lock.release() {
        Err(Error::LockLost { reason, .. }) => report(&format!("release LockLost {reason:?}")),
        other => report(&format!("release {other:?}")),
    }
}

fn token_of(msg: &str) -> u64 {
    msg.strip_prefix("token ").expect(msg).parse().unwrap()
}

#[test]
fn killed_holder_frees_the_lock_when_its_lease_ends() {
    let name = unique("sigkill");
    let (contender, app) = client(ms(TTL_MS));
    let mut child = ChildProc::spawn("hold", &[("LOCK_NAME", &name)]);
    let token = token_of(&child.recv());
    let held = lease_row(&name);
    assert!(contender.try_lock(&name).unwrap().is_none());

    child.child.kill().unwrap();
    child.child.wait().unwrap();

    let lock = contender.lock_timeout(&name, ms(TTL_MS * 4)).unwrap();
    assert_granted_after(&name, &held);
    assert_eq!(lock.fencing_token(), token + 1);
    lock.release().unwrap();
    assert_eq!(advisory_locks_of(&app), 0);
}

#[test]
fn stopped_holder_is_taken_over_after_its_lease_and_sees_the_loss() {
    let name = unique("sigstop");
    let (contender, _) = client(ms(TTL_MS));
    let mut child = ChildProc::spawn("hold", &[("LOCK_NAME", &name)]);
    let token = token_of(&child.recv());
    let zombie_pid = holder_pid(&name);

    // Frozen: its renewals stop, its session (and advisory lock) stays.
    child.signal("STOP");
    let frozen = lease_row(&name);
    let lock = contender.lock_timeout(&name, ms(TTL_MS * 5)).unwrap();
    assert_granted_after(&name, &frozen);
    assert_eq!(lock.fencing_token(), token + 1);
    // The zombie's session was terminated to free the advisory lock.
    let alive: bool = admin()
        .query_one(
            "SELECT count(*) > 0 FROM pg_stat_activity WHERE pid = $1",
            &[&zombie_pid],
        )
        .unwrap()
        .get(0);
    assert!(!alive, "zombie session {zombie_pid} still alive");

    child.signal("CONT");
    child.send("check");
    assert_eq!(child.recv(), "ensure_held true");
    let signal = child.recv();
    assert!(
        signal == format!("signal Ok({:?})", LostReason::Expired)
            || signal == format!("signal Ok({:?})", LostReason::SessionLost),
        "{signal}"
    );
    let release = child.recv();
    assert!(release.starts_with("release LockLost"), "{release}");
    child.wait_success();

    // The resumed holder touched nothing of ours.
    assert!(lock.is_held());
    assert_eq!(lease_row(&name).token as u64, lock.fencing_token());
    assert!(!lease_row(&name).released);
    lock.release().unwrap();
}
