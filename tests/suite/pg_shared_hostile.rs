//! Shared leases under hostile but legal role defaults and connection
//! options (serializable by default, short statement, lock and idle
//! timeouts, a shadowed `clock_timestamp()`, odd date styles, …): readers,
//! writers and semaphore waits behave as under sane settings.

use crate::common;

use std::thread;
use std::time::Duration;

use common::*;

use common::hostile::HostileRole;

#[test]
fn readers_writers_and_permits_work_under_hostile_role_defaults() {
    let role = HostileRole::create();
    let (a, _) = role.client(ms(2000));
    let (b, b_app) = role.client(ms(2000));

    // Readers share, a writer waits in the server and gets the lock at the
    // last reader's release, past the role's statement and idle timeouts.
    let name = unique("hostile-rw");
    let r1 = a
        .rwlock(&name)
        .unwrap()
        .try_read()
        .unwrap()
        .expect("reader");
    let r2 = b
        .rwlock(&name)
        .unwrap()
        .try_read()
        .unwrap()
        .expect("reader");
    let writer = {
        let b = b.clone();
        let name = name.clone();
        thread::spawn(move || {
            b.rwlock(&name)
                .unwrap()
                .write_timeout(Duration::from_secs(20))
        })
    };
    assert!(eventually(Duration::from_secs(5), || is_waiting(&b_app)));
    thread::sleep(ms(400));
    assert!(a.rwlock(&name).unwrap().try_read().unwrap().is_none());
    let top = r2.fencing_token();
    r1.release().unwrap();
    r2.release().unwrap();
    let w = writer.join().unwrap().expect("the writer");
    assert!(w.fencing_token() > top);
    w.release().unwrap();

    // A full semaphore's waiter listens past the role's idle_session_timeout
    // and wakes on the release.
    let name = unique("hostile-sem");
    let p = a
        .semaphore(&name, 1)
        .unwrap()
        .try_acquire()
        .unwrap()
        .unwrap();
    let waiter = {
        let b = b.clone();
        let name = name.clone();
        thread::spawn(move || {
            b.semaphore(&name, 1)
                .unwrap()
                .acquire_timeout(Duration::from_secs(20))
        })
    };
    assert!(eventually(Duration::from_secs(5), || b
        .metrics()
        .acquires_waiting
        >= 1));
    thread::sleep(ms(500));
    let held = p.fencing_token();
    p.release().unwrap();
    let q = waiter.join().unwrap().expect("the waiter");
    assert!(q.fencing_token() > held);
    let listed = b.leases_of(&name).unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert!(matches!(
        listed[0].status,
        lockbox::LeaseStatus::Held { .. }
    ));
    q.release().unwrap();
}
