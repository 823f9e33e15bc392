//! Review of shared leases on PostgreSQL: a fenced transaction holds back
//! every grant that would take the fenced lease's place, shared grants
//! included.
//!
//! `Lock::fence` promises that no other holder is granted the name before
//! the fenced transaction ends, even if the holder freezes and its lease runs
//! out meanwhile. An exclusive grant waits for it (it locks the row `FOR
//! UPDATE`, which conflicts with the fence's `FOR KEY SHARE`); a shared grant
//! locked the row `FOR NO KEY UPDATE` only, which does not conflict, and so
//! granted a reader (or a permit) beside a frozen writer's open transaction —
//! and a permit in the place of a frozen permit holder's, one more than the
//! semaphore allows.

use crate::common;

use std::time::Duration;

use common::*;
use lockbox::{AcquireOptions, LeaseStatus, LostReason};

/// A frozen writer's fenced transaction: no reader is granted until it ends.
#[test]
fn a_reader_waits_for_a_frozen_writers_fenced_transaction() {
    let name = unique("coord-fence-w");
    let (writer_client, _) = client(ms(500));
    let writer = writer_client
        .acquire(&name, &AcquireOptions::new().dedicated_session(true))
        .unwrap()
        .unwrap();
    let mut db = admin();
    let mut tx = db.transaction().unwrap();
    writer.fence(&mut tx).unwrap();
    writer_client.__pause_renewals(true);
    assert_eq!(
        writer.lost().recv_timeout(Duration::from_secs(10)),
        Ok(LostReason::Expired)
    );
    let (reader_client, _) = client(ms(5000));
    let rw = reader_client.rwlock(&name).unwrap();
    assert!(eventually(Duration::from_secs(10), || matches!(
        reader_client.lease(&name).unwrap().map(|l| l.status),
        Some(LeaseStatus::Expired { .. })
    )));
    // The writer's session is gone (lost: closed), so the key is free; only
    // the fence's row lock stands in the way.
    let early = rw.try_read().unwrap();
    assert!(
        early.is_none(),
        "a reader was granted while the frozen writer's fenced transaction was open"
    );
    tx.commit().unwrap();
    let reader = rw
        .read_timeout(Duration::from_secs(10))
        .expect("granted once the fenced transaction ended");
    assert!(reader.fencing_token() > writer.fencing_token());
    reader.release().unwrap();
}

/// A frozen permit holder's fenced transaction: no permit takes its place
/// until it ends (one permit: never two writers).
#[test]
fn a_permit_waits_for_a_frozen_permit_holders_fenced_transaction() {
    let name = unique("coord-fence-p");
    let (holder_client, _) = client(ms(500));
    let sem = holder_client.semaphore(&name, 1).unwrap();
    let permit = sem.try_acquire().unwrap().expect("free");
    let mut db = admin();
    let mut tx = db.transaction().unwrap();
    permit.fence(&mut tx).unwrap();
    holder_client.__pause_renewals(true);
    assert_eq!(
        permit.lost().recv_timeout(Duration::from_secs(10)),
        Ok(LostReason::Expired)
    );
    let (next_client, _) = client(ms(5000));
    let next_sem = next_client.semaphore(&name, 1).unwrap();
    assert!(eventually(Duration::from_secs(10), || next_sem
        .live_permits()
        .unwrap()
        == 0));
    let early = next_sem.try_acquire().unwrap();
    assert!(
        early.is_none(),
        "a second permit of one was granted while the first's fenced transaction was open"
    );
    tx.commit().unwrap();
    let next = next_sem
        .acquire_timeout(Duration::from_secs(10))
        .expect("granted once the fenced transaction ended");
    assert!(next.fencing_token() > permit.fencing_token());
    next.release().unwrap();
}

/// A permit released (or force-released) while its fenced transaction is
/// still open: the next permit waits for that transaction too, as the next
/// exclusive holder does after a release.
#[test]
fn a_permit_waits_for_a_force_released_holders_fenced_transaction() {
    let name = unique("coord-fence-f");
    let (holder_client, _) = client(ms(5000));
    let sem = holder_client.semaphore(&name, 1).unwrap();
    let permit = sem.try_acquire().unwrap().expect("free");
    let mut db = admin();
    let mut tx = db.transaction().unwrap();
    permit.fence(&mut tx).unwrap();
    let (next_client, _) = client(ms(5000));
    assert_eq!(
        next_client.force_release(&name).unwrap(),
        Some(permit.fencing_token())
    );
    let next_sem = next_client.semaphore(&name, 1).unwrap();
    let early = next_sem.try_acquire().unwrap();
    assert!(
        early.is_none(),
        "a permit was granted while the force-released holder's fenced transaction was open"
    );
    tx.commit().unwrap();
    let next = next_sem
        .acquire_timeout(Duration::from_secs(10))
        .expect("granted once the fenced transaction ended");
    next.release().unwrap();
    drop(permit);
}
