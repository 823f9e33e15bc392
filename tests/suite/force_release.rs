//! `LockClient::force_release`: an operator ends another holder's lease. The
//! holder is told by the store (never only by its deadline), the name is free
//! at once, the next token is higher; a role that may not end the holder's
//! session changes nothing and gets a typed error.

use crate::common;

use std::time::Duration;

use common::*;
use lockbox::{Error, LeaseStatus, LockClient, LockClientBuilder, LostReason, MemoryBackend};

/// Long enough to survive a stalled WAL flush on the shared disk.
const TTL: Duration = Duration::from_millis(1500);

fn forced_release_is_signalled_and_frees_the_name(factory: fn() -> LockClientBuilder) {
    let name = unique("cli-force");
    let holder = factory().ttl(TTL).build().unwrap();
    let operator = factory().ttl(TTL).build().unwrap();
    assert_eq!(operator.force_release(&name).unwrap(), None, "never taken");

    let lock = holder.try_lock(&name).unwrap().unwrap();
    let token = lock.fencing_token();
    assert_eq!(operator.force_release(&name).unwrap(), Some(token));
    // Free at once: no wait for the old lease.
    let next = operator
        .try_lock(&name)
        .unwrap()
        .expect("free after a forced release");
    assert!(next.fencing_token() > token, "tokens must increase");
    // The holder hears it from the store (its next renewal), not its deadline.
    let reason = lock
        .lost()
        .recv_timeout(TTL * 4)
        .expect("the holder is told");
    assert_ne!(reason, LostReason::Expired, "told by its deadline only");
    assert!(lock.release().unwrap_err().is_lock_lost());
    assert!(next.is_held(), "the new holder is untouched");
    next.release().unwrap();
    // Released: nothing left to end.
    assert_eq!(operator.force_release(&name).unwrap(), None);
}

#[test]
fn postgres_forced_release() {
    forced_release_is_signalled_and_frees_the_name(|| LockClient::builder(database_url()));
}

#[test]
fn postgres_unshared_forced_release() {
    forced_release_is_signalled_and_frees_the_name(|| {
        LockClient::builder(database_url()).locks_per_session(1)
    });
}

#[test]
fn redis_forced_release() {
    forced_release_is_signalled_and_frees_the_name(|| LockClient::redis(redis_server::redis_url()));
}

#[test]
fn memory_forced_release() {
    forced_release_is_signalled_and_frees_the_name(|| {
        LockClient::with_backend(MemoryBackend::global())
    });
}

#[test]
fn invalid_name_is_refused() {
    let client = LockClient::memory().build().unwrap();
    assert!(matches!(
        client.force_release(""),
        Err(Error::InvalidName(_))
    ));
}

/// A lease on a session shared with another of the client's locks: only that
/// lease ends (the session, and the neighbour, live on), and the name is
/// granted once the session's next renewal frees its key.
#[test]
fn postgres_forced_release_on_a_shared_session_spares_the_neighbour() {
    let client = LockClient::builder(database_url())
        .ttl(TTL)
        .build()
        .unwrap();
    let (a_name, a, _b_name, b, pid) = two_on_one_session(&client, "cli-force-shared");
    let operator = LockClient::builder(database_url()).build().unwrap();
    assert_eq!(
        operator.force_release(&a_name).unwrap(),
        Some(a.fencing_token())
    );
    assert_eq!(
        a.lost().recv_timeout(TTL * 4).expect("told"),
        LostReason::NotOwner
    );
    let next = operator
        .lock_timeout(&a_name, Duration::from_secs(10))
        .unwrap();
    assert!(next.fencing_token() > a.fencing_token());
    assert!(b.is_held(), "the neighbour on the shared session is kept");
    let alive: i64 = admin()
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = $1",
            &[&pid],
        )
        .unwrap()
        .get(0);
    assert_eq!(alive, 1, "the shared session was terminated");
    b.release().unwrap();
}

struct Role(String);

impl Role {
    fn create() -> Role {
        let role = Role(unique("cli_force_role").replace('-', "_"));
        drop(LockClient::builder(database_url()).build().unwrap()); // the table exists
        acl_change(&format!(
            "CREATE ROLE {r} LOGIN; GRANT SELECT, INSERT, UPDATE ON lockbox_leases TO {r};",
            r = role.0
        ))
        .unwrap();
        role
    }
}

impl Drop for Role {
    fn drop(&mut self) {
        let _ = acl_change(&format!("DROP OWNED BY {r}; DROP ROLE {r};", r = self.0));
    }
}

/// A role that may neither see nor end the holder's session (a superuser's)
/// gets `InsufficientPrivilege` naming what is missing, and nothing changes:
/// the lease stands, the holder keeps its lock.
#[test]
fn postgres_forced_release_without_privilege_changes_nothing() {
    let role = Role::create();
    let name = unique("cli-force-priv");
    let holder = LockClient::builder(database_url())
        .ttl(TTL)
        .build()
        .unwrap();
    let lock = holder.try_lock(&name).unwrap().unwrap();
    let operator = LockClient::builder(&url_as_user(&role.0))
        .create_table(false)
        .build()
        .unwrap();
    match operator.force_release(&name) {
        Err(Error::InsufficientPrivilege(msg)) => {
            assert!(msg.contains("pg_read_all_stats"), "{msg}")
        }
        other => panic!("expected InsufficientPrivilege, got {other:?}"),
    }
    acl_change(&format!("GRANT pg_read_all_stats TO {}", role.0)).unwrap();
    match operator.force_release(&name) {
        Err(Error::InsufficientPrivilege(msg)) => {
            assert!(msg.contains("pg_signal_backend"), "{msg}");
            assert!(msg.contains("nothing was changed"), "{msg}");
        }
        other => panic!("expected InsufficientPrivilege, got {other:?}"),
    }
    let lease = holder.lease(&name).unwrap().unwrap();
    assert!(
        matches!(lease.status, LeaseStatus::Held { .. }),
        "the lease must stand: {lease:?}"
    );
    assert_eq!(lease.fencing_token, lock.fencing_token());
    // The holder's renewals still succeed.
    let renewed = eventually(TTL * 2, || {
        holder.lease(&name).unwrap().unwrap().renewed_at > lease.renewed_at
    });
    assert!(renewed, "the holder's lease is no longer renewed");
    assert_eq!(lock.lost_reason(), None);
    lock.release().unwrap();
}

/// A refused forced release ran its `UPDATE` before it found it may not
/// see the holder's session, and its transaction was left to its drop's
/// `ROLLBACK`, whose failure is ignored. Here an operator's cancel lands on
/// that `ROLLBACK` (gdb holds the backend in the statement's parse and
/// queues the cancel's signal, which is taken at the statement's first
/// interrupt check): the session stayed in the aborted transaction and went
/// back to the pool so, and every later statement on it failed with 25P02
/// (an inspection never closes a session it finds so). Seen failing before
/// the fix (the operator's next `lease()`: 25P02); the transaction is now
/// rolled back again. The holder is not touched either way: the aborted
/// transaction already let go of the row.
#[test]
fn a_cancel_on_a_refused_forced_releases_rollback_leaves_the_holder_its_lock() {
    let role = Role::create();
    let name = unique("cli-force-rollback");
    let holder = LockClient::builder(database_url())
        .ttl(TTL)
        .build()
        .unwrap();
    let lock = holder.try_lock(&name).unwrap().unwrap();
    let app = unique("force-rb");
    let operator = LockClient::builder(&url_with_app(&url_as_user(&role.0), &app))
        .create_table(false)
        .pool_size(1)
        .build()
        .unwrap();
    // The pool's one session, open.
    operator.lease(&name).unwrap();
    let gdb = common::gdb::cancel_first_rollback(only_session_pid(&app));
    match operator.force_release(&name) {
        Err(Error::InsufficientPrivilege(msg)) => {
            assert!(msg.contains("pg_read_all_stats"), "{msg}")
        }
        other => panic!("expected InsufficientPrivilege, got {other:?}"),
    }
    common::gdb::said_hit(gdb);
    // The holder renews and keeps its lock.
    let lease = holder.lease(&name).unwrap().unwrap();
    let renewed = eventually(TTL * 2, || {
        holder.lease(&name).unwrap().unwrap().renewed_at > lease.renewed_at
    });
    assert!(renewed, "the holder's lease is no longer renewed");
    assert_eq!(lock.lost_reason(), None);
    // The operator's session is usable again, more than once.
    for _ in 0..2 {
        assert!(operator.lease(&name).unwrap().is_some());
    }
    lock.release().unwrap();
}

/// A group of shared leases (two readers) whose second holder this role may
/// not end (a superuser's session), while it may end the first (its own
/// role's). The forced release terminated the holders one at a time, each
/// before the next was checked: the first reader's session was ended, then
/// the second refused, and the error said "nothing was changed" (review
/// helper-75). Every holder is now checked before any is ended: the refusal
/// comes first, and both readers keep their locks and their sessions.
#[test]
fn a_group_whose_later_holder_may_not_be_ended_loses_no_earlier_holder() {
    let role = Role::create();
    acl_change(&format!(
        "GRANT pg_read_all_stats TO {r}; \
         GRANT SELECT, INSERT, UPDATE, DELETE ON lockbox_leases, lockbox_leases_shared TO {r}; \
         GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO {r};",
        r = role.0
    ))
    .unwrap();
    let name = unique("force-group-order");
    let as_role = || {
        LockClient::builder(&url_as_user(&role.0))
            .create_table(false)
            .ttl(TTL)
            .build()
            .unwrap()
    };
    let own = as_role();
    let superuser = LockClient::builder(database_url())
        .ttl(TTL)
        .build()
        .unwrap();
    // The first reader (the lower token, ended first) is this role's own.
    let first = own.rwlock(&name).unwrap().try_read().unwrap().unwrap();
    let second = superuser
        .rwlock(&name)
        .unwrap()
        .try_read()
        .unwrap()
        .unwrap();
    assert!(first.fencing_token() < second.fencing_token());
    let first_pid: i32 = admin()
        .query_one(
            "SELECT holder_pid FROM lockbox_leases_shared WHERE name = $1 AND token = $2",
            &[&name, &(first.fencing_token() as i64)],
        )
        .unwrap()
        .get(0);
    let operator = as_role();
    match operator.force_release(&name) {
        Err(Error::InsufficientPrivilege(msg)) => {
            assert!(msg.contains("superuser"), "{msg}");
            assert!(msg.contains("nothing was changed"), "{msg}");
        }
        other => panic!("expected InsufficientPrivilege, got {other:?}"),
    }
    // pg_terminate_backend returns once the session has ended: had the first
    // reader's been terminated, it would be gone by now.
    let alive: i64 = admin()
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = $1",
            &[&first_pid],
        )
        .unwrap()
        .get(0);
    assert_eq!(alive, 1, "the first reader's session was ended");
    let live: i64 = admin()
        .query_one(
            "SELECT count(*) FROM lockbox_leases_shared WHERE name = $1 AND released_at IS NULL",
            &[&name],
        )
        .unwrap()
        .get(0);
    assert_eq!(live, 2, "both shared leases stand");
    assert_eq!(first.lost_reason(), None);
    assert_eq!(second.lost_reason(), None);
    first.release().unwrap();
    second.release().unwrap();
}

/// A holder's client, and an operator's on a pool of one session, open (for
/// gdb to attach to): `(holder, operator, the operator's session's pid, its
/// application name)`.
fn holder_and_operator(name: &str) -> (LockClient, LockClient, i32, String) {
    let holder = LockClient::builder(database_url())
        .ttl(TTL)
        .build()
        .unwrap();
    let app = unique("force-op");
    let operator = LockClient::builder(&url_with_app(database_url(), &app))
        .pool_size(1)
        .build()
        .unwrap();
    operator.lease(name).unwrap();
    let pid = only_session_pid(&app);
    (holder, operator, pid, app)
}

/// The operator's connection ends at the `COMMIT` of a forced release after
/// the server committed it, before the answer reaches the client (gdb shuts
/// the backend's socket down there). The release took effect, yet it was
/// reported failed (a closed connection; review helper-75). Whether it took
/// effect is now read on another session: `Ok` with the ended token, and the
/// holder is told.
#[test]
fn a_forced_release_whose_commit_goes_unanswered_is_read_back() {
    let name = unique("force-commit-lost");
    let (holder, operator, pid, _) = holder_and_operator(&name);
    let lock = holder.try_lock(&name).unwrap().unwrap();
    let gdb = common::gdb::end_connection_at_first_commit(pid);
    let ended = operator.force_release(&name);
    common::gdb::said_hit(gdb);
    assert_eq!(ended.unwrap(), Some(lock.fencing_token()));
    let lease = holder.lease(&name).unwrap().unwrap();
    assert!(
        matches!(lease.status, LeaseStatus::Released { .. }),
        "the lease was released: {lease:?}"
    );
    assert!(
        lock.lost().recv_timeout(TTL * 2).is_ok(),
        "the holder was never told"
    );
}

/// A forced release of a group of readers whose `COMMIT` the server never
/// runs (its session is terminated there: FATAL, the transaction rolled
/// back) while a second reader waits for the name's row. The outcome was
/// read back from the row — "the ended token is no longer unreleased" —
/// but a reader joining the group after the rollback moves the row's token
/// on, and the release that never happened was reported done (review
/// helper-78). The outcome is now read from the row's version: whether it
/// is the one that transaction wrote. The call fails, and the group still
/// holds the name.
#[test]
fn a_forced_release_rolled_back_at_its_commit_is_not_reported_done() {
    let name = unique("force-commit-rolled-back");
    let (holder, operator, pid, _) = holder_and_operator(&name);
    let first = holder.rwlock(&name).unwrap().try_read().unwrap().unwrap();
    let gdb = common::gdb::terminate_at_first_commit(pid);
    let forcing = {
        let (operator, name) = (operator.clone(), name.clone());
        std::thread::spawn(move || operator.force_release(&name))
    };
    assert!(
        gdb.hit_within(Duration::from_secs(10)),
        "the operator's COMMIT never reached gdb"
    );
    // A second reader waits for the name's row, which the forced release
    // holds until its transaction ends.
    let reader_app = unique("force-rb-reader");
    let reader = LockClient::builder(&url_with_app(database_url(), &reader_app))
        .ttl(TTL)
        .build()
        .unwrap();
    let joining = {
        let (reader, name) = (reader.clone(), name.clone());
        std::thread::spawn(move || {
            reader
                .rwlock(&name)
                .unwrap()
                .read_timeout(Duration::from_secs(20))
        })
    };
    let waits = || {
        admin()
            .query_one(
                "SELECT count(*) > 0 FROM pg_stat_activity WHERE application_name = $1 \
                 AND wait_event_type = 'Lock'",
                &[&reader_app],
            )
            .unwrap()
            .get::<_, bool>(0)
    };
    assert!(
        eventually(Duration::from_secs(10), waits),
        "the second reader never waited for the row"
    );
    gdb.open_gate();
    let forced = forcing.join().unwrap();
    common::gdb::said_hit(gdb);
    let second = joining.join().unwrap().expect("the second reader joins");
    assert!(
        forced.is_err(),
        "a release that was rolled back was reported done: {forced:?}"
    );
    // The group holds the name: both shared leases stand.
    let live: i64 = admin()
        .query_one(
            "SELECT count(*) FROM lockbox_leases_shared WHERE name = $1 AND released_at IS NULL \
             AND token = ANY($2)",
            &[
                &name,
                &vec![first.fencing_token() as i64, second.fencing_token() as i64],
            ],
        )
        .unwrap()
        .get(0);
    assert_eq!(live, 2, "both readers' leases stand");
    second.release().unwrap();
    drop(first);
}

/// The operator's connection ends as its `COMMIT` arrives, and the server
/// runs the `COMMIT` only after the client has begun to read the outcome
/// back (gdb holds the backend in the statement's parse meanwhile). Read
/// from the lease's row, the release looked not taken while its
/// transaction was still open, and was reported failed though it then
/// committed (review helper-78). The read-back now takes the row's lock
/// first, so it waits for the transaction to end: `Ok`.
#[test]
fn a_forced_release_committed_after_its_read_back_began_is_reported_done() {
    let name = unique("force-commit-late");
    let (holder, operator, pid, app) = holder_and_operator(&name);
    let lock = holder.try_lock(&name).unwrap().unwrap();
    let gdb = common::gdb::cut_off_at_first_commit(pid);
    let forcing = {
        let (operator, name) = (operator.clone(), name.clone());
        std::thread::spawn(move || operator.force_release(&name))
    };
    // The read-back waits, on the operator's new session, for the row's
    // lock, which the transaction still holds.
    let asked = || {
        admin()
            .query_one(
                "SELECT count(*) > 0 FROM pg_stat_activity WHERE application_name = $1 \
                 AND pid <> $2 AND wait_event_type = 'Lock'",
                &[&app, &pid],
            )
            .unwrap()
            .get::<_, bool>(0)
    };
    assert!(
        eventually(Duration::from_secs(10), asked),
        "the outcome was never read back"
    );
    gdb.open_gate();
    let forced = forcing.join().unwrap();
    common::gdb::said_hit(gdb);
    assert_eq!(forced.unwrap(), Some(lock.fencing_token()));
    let lease = holder.lease(&name).unwrap().unwrap();
    assert!(
        matches!(lease.status, LeaseStatus::Released { .. }),
        "the lease was released: {lease:?}"
    );
}
