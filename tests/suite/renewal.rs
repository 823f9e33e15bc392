//! Renewal keeps a held lock alive past many TTLs, with a stable token; `extend`
//! changes the lease length.

use crate::common;

use std::thread;

use common::*;

#[test]
fn held_far_past_several_ttls_stays_held() {
    let ttl = ms(300);
    let name = unique("long-hold");
    let (holder, _) = client(ttl);
    let (contender, _) = client(ttl);
    let lock = holder.try_lock(&name).unwrap().unwrap();
    let token = lock.fencing_token();
    let first = lease_row(&name);

    // Six TTLs: without renewal the lease would have ended five times over.
    for _ in 0..12 {
        thread::sleep(ttl / 2);
        assert!(lock.is_held(), "lost while renewals should keep it");
        assert!(contender.try_lock(&name).unwrap().is_none());
    }
    let last = lease_row(&name);
    assert_eq!(last.token as u64, token, "renewal never changes the token");
    assert_eq!(lock.fencing_token(), token);
    assert!(
        last.expires_at > first.expires_at + 1.0,
        "expiry moved forward"
    );
    assert!(lock.lost_reason().is_none());
    lock.release().unwrap();
}

#[test]
fn extend_sets_a_new_lease_length() {
    let ttl = ms(400);
    let name = unique("extend");
    let (client, _) = client(ttl);
    let lock = client.try_lock(&name).unwrap().unwrap();
    let before = lease_row(&name);
    lock.extend(ms(5000)).unwrap();
    let after = lease_row(&name);
    assert!(after.expires_at - before.acquired_at > 4.5, "{after:?}");
    assert_eq!(lock.ttl(), ms(5000));
    // Renewals now keep the longer lease.
    thread::sleep(ms(1800));
    assert!(lease_row(&name).expires_at - after.expires_at > 1.0);
    assert!(lock.extend(ms(1)).unwrap_err().is_invalid_input());
    assert!(lock.is_held());
    lock.release().unwrap();
}
