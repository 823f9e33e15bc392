//! Losing a lock: the session killed under the holder, the signal, and what the old
//! guard and the next holder see.

use crate::common;

use std::time::{Duration, Instant};

use common::*;
use crossbeam_channel::{RecvTimeoutError, TryRecvError};
use lockbox::{Error, LostReason};

#[test]
fn terminated_session_fires_lost_within_one_renewal_interval() {
    let ttl = ms(900);
    let every = ttl / 3;
    let name = unique("terminated");
    let (holder, holder_app) = client(ttl);
    let (contender, _) = client(ttl);

    let lock = holder.try_lock(&name).unwrap().expect("free");
    let lost = lock.lost();
    assert_eq!(lost.try_recv(), Err(TryRecvError::Empty), "not lost yet");
    let before = lease_row(&name);

    terminate(holder_pid(&name));
    let killed_at = Instant::now();
    // Renewal happens every `every`; the next one finds the session gone.
    let reason = lost.recv_timeout(every + ms(300)).expect("lost() fired");
    assert_eq!(reason, LostReason::SessionLost);
    assert!(killed_at.elapsed() <= every + ms(300));
    assert!(!lock.is_held());
    assert!(matches!(
        lock.ensure_held(),
        Err(Error::LockLost {
            reason: LostReason::SessionLost,
            ..
        })
    ));
    // Every other receiver becomes ready too (disconnected).
    assert!(lock.lost().recv_timeout(ms(10)).is_err());

    // The session died, but its lease stands until it expires: the contender waits
    // it out and is granted no earlier than the lease's end, by the database clock.
    let next = contender.lock_timeout(&name, ttl * 3).unwrap();
    assert_granted_after(&name, &before);
    assert_eq!(next.fencing_token(), lock.fencing_token() + 1);

    // The old guard's release touches nothing of the new holder.
    let err = lock.release().unwrap_err();
    assert!(err.is_lock_lost(), "{err}");
    assert_eq!(lease_row(&name).token as u64, next.fencing_token());
    assert!(!lease_row(&name).released);
    assert!(next.is_held());
    next.release().unwrap();
    assert_eq!(advisory_locks_of(&holder_app), 0);
}

#[test]
fn normal_release_never_fires_lost() {
    let (client, _) = client(ms(600));
    let lock = client.try_lock(&unique("quiet")).unwrap().unwrap();
    let lost = lock.lost();
    lock.release().unwrap();
    // Disconnected without a message: released, not lost.
    assert_eq!(
        lost.recv_timeout(ms(100)),
        Err(RecvTimeoutError::Disconnected)
    );
}

#[test]
fn lost_can_be_selected_on() {
    let (client, _) = client(ms(600));
    let name = unique("select");
    let lock = client.try_lock(&name).unwrap().unwrap();
    let work = crossbeam_channel::after(Duration::from_secs(10));
    terminate(holder_pid(&name));
    crossbeam_channel::select! {
        recv(lock.lost()) -> msg => assert_eq!(msg, Ok(LostReason::SessionLost)),
        recv(work) -> _ => panic!("the loss was not signalled"),
    }
}
