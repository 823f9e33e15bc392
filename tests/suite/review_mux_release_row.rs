//! Review of multiplexed sessions: a release on a shared session waits for
//! its lease row's lock (an operator's transaction) for up to what the lock
//! has left, holding the session's connection all that time. Every neighbour
//! on the session then cannot be renewed, and is lost: one row locked by an
//! operator costs the neighbours their locks.

use crate::common;

use common::*;
use lockbox::AcquireOptions;

#[test]
fn a_release_stuck_on_an_operators_row_lock_does_not_cost_the_neighbours_their_locks() {
    let app = unique("mux-relrow");
    let ttl = ms(1500);
    let client = builder_for(&app).ttl(ttl).build().unwrap();
    let (a_name, b_name) = (unique("relrow-a"), unique("relrow-b"));
    // `a` has a long lease, so its release may wait long for its row.
    let a = client
        .acquire(&a_name, &AcquireOptions::new().ttl(ms(20_000)))
        .unwrap()
        .unwrap();
    let b = client.try_lock(&b_name).unwrap().unwrap();
    let pid = holder_pid(&a_name);
    assert_eq!(holder_pid(&b_name), pid, "both on one shared session");

    // An operator holds `a`'s lease row (inspecting it, say).
    let row = RowHold::lease(&a_name);
    let releasing = std::thread::spawn(move || a.release());
    assert!(
        eventually(ms(5000), || blocked_on_lock(pid)),
        "the release of `a` never reached the row lock"
    );

    // `b` has nothing wrong with it: it must go on being renewed.
    let lost = b.lost().recv_timeout(ttl * 3).ok();
    row.release();
    let released = releasing.join().unwrap();
    assert_eq!(
        lost, None,
        "`b` was lost while `a`'s release waited for its row on their shared session \
         (a's release: {released:?})"
    );
    assert!(b.is_held());
    b.release().unwrap();
}
