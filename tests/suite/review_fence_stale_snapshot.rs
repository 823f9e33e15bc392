//! Review (fence): under `REPEATABLE READ` / `SERIALIZABLE` the fence judged
//! expiry on the transaction's snapshot. A snapshot older than the lease's
//! latest renewal shows an `expires_at` that has since been pushed forward,
//! so a fence on a lock that is held and renewed reported `LockLost
//! { Expired }`. `FOR KEY SHARE` on a row updated without a key change since
//! the snapshot does not fail (it locks the old version and follows the
//! update chain), so nothing else caught it.

use crate::common;

use std::time::Duration;

use common::*;
use lockbox::AcquireOptions;

/// Whether the transaction's snapshot shows `name`'s lease as expired by now
/// (the lease the database holds is live: renewals go on).
fn snapshot_shows_expired(tx: &mut postgres::Transaction<'_>, name: &str) -> bool {
    tx.query_one(
        "SELECT expires_at <= clock_timestamp() FROM lockbox_leases WHERE name = $1",
        &[&name],
    )
    .unwrap()
    .get(0)
}

#[test]
fn a_renewed_lease_passes_the_fence_on_an_old_snapshot() {
    for level in [
        postgres::IsolationLevel::RepeatableRead,
        postgres::IsolationLevel::Serializable,
    ] {
        for dedicated in [false, true] {
            let (client, _) = client(ms(1000));
            let name = unique("fence-stale-snapshot");
            let lock = client
                .acquire(&name, &AcquireOptions::new().dedicated_session(dedicated))
                .unwrap()
                .unwrap();
            let mut db = admin();
            let mut tx = db
                .build_transaction()
                .isolation_level(level)
                .start()
                .unwrap();
            // The snapshot is taken here, with the lease as it is now.
            assert!(!snapshot_shows_expired(&mut tx, &name));
            // Renewals go on; the snapshot's version of the lease runs out.
            assert!(eventually(Duration::from_secs(10), || {
                snapshot_shows_expired(&mut tx, &name)
            }));
            assert!(lock.is_held(), "{level:?}: the lock itself was lost");
            assert!(
                matches!(
                    lease_status(&client, &name),
                    lockbox::LeaseStatus::Held { .. }
                ),
                "{level:?}: the lease is not held by the database's latest version"
            );
            match lock.fence(&mut tx) {
                Ok(()) => {}
                Err(e) => panic!(
                    "{level:?} (dedicated: {dedicated}): a held, renewed lock failed the \
                     fence on an old snapshot: {e}"
                ),
            }
            tx.commit().unwrap();
            lock.release().unwrap();
        }
    }
}

fn lease_status(client: &lockbox::LockClient, name: &str) -> lockbox::LeaseStatus {
    client.lease(name).unwrap().unwrap().status
}

/// A snapshot taken before the lock was granted cannot see its lease: the
/// fence cannot be had in that transaction. The lock is not lost, though,
/// and the doc's Errors say `LockLost` means "the lease is not current": a
/// caller told `LockLost` gives up a lock it holds.
#[test]
fn a_snapshot_older_than_the_grant_is_not_reported_as_a_lost_lock() {
    let client = lockbox::LockClient::builder(database_url())
        .ttl(Duration::from_secs(60))
        .build()
        .unwrap();
    for level in [
        postgres::IsolationLevel::RepeatableRead,
        postgres::IsolationLevel::Serializable,
    ] {
        let name = unique("fence-snapshot-before-grant");
        let mut db = admin();
        let mut tx = db
            .build_transaction()
            .isolation_level(level)
            .start()
            .unwrap();
        tx.query("SELECT count(*) FROM lockbox_leases", &[])
            .unwrap();
        let lock = client.try_lock(&name).unwrap().unwrap();
        match lock.fence(&mut tx) {
            Err(lockbox::Error::InvalidConfig(m)) => {
                assert!(m.contains("snapshot"), "{level:?}: {m}");
            }
            other => panic!(
                "{level:?}: a held lock fenced on a snapshot older than its grant: expected \
                 InvalidConfig naming the snapshot, got {other:?}"
            ),
        }
        assert!(lock.is_held());
        drop(tx);
        lock.release().unwrap();
    }
}
