//! Attack on "a try (non-blocking) now runs the zombie probe only when the
//! name's lease is not live": zombies must still be terminated by a try, and a
//! key held with no lease at all (stranded) must not block a try forever.
//! (f): a stale or partial view must not block a name.

use crate::common;

use std::time::Duration;

use common::proxy::Proxy;
use common::*;
use lockbox::LockClient;

/// The holder is cut off behind a paused proxy: its session keeps the key and
/// its lease runs out. A try_lock after that must take the name over.
#[test]
fn try_lock_takes_over_from_a_zombie_holder() {
    let ttl = Duration::from_secs(1);
    let proxy = Proxy::to_test_server();
    let z = LockClient::builder(&proxy.app_url(&unique("atk-tz")))
        .ttl(ttl)
        .build()
        .unwrap();
    let (c, _) = client(ttl);
    let name = unique("try-zombie");
    let zl = z.try_lock(&name).unwrap().unwrap();
    let token = zl.fencing_token();
    proxy.pause();
    assert!(c.try_lock(&name).unwrap().is_none(), "the lease is live");
    std::thread::sleep(ttl + ms(200));
    let got = c.try_lock(&name).unwrap();
    proxy.resume();
    proxy.cut();
    let got = got.expect("try_lock must terminate the zombie and take the name");
    assert!(got.fencing_token() > token);
    drop(zl);
}

/// A plain session holds the name's key with no lease and sits idle (a
/// stranded acquirer). The name has a released lease row. try_lock must take
/// the key over once that session has been idle for longer than a TTL.
#[test]
fn try_lock_takes_over_a_stranded_key_with_no_lease() {
    let ttl = Duration::from_secs(1);
    let (c, _) = client(ttl);
    let name = unique("try-stranded");
    c.try_lock(&name).unwrap().unwrap().release().unwrap();
    let (hi, lo) = lockbox::advisory_key(&name);
    let mut stranded = admin();
    stranded
        .execute("SELECT pg_advisory_lock($1, $2)", &[&hi, &lo])
        .unwrap();
    assert!(c.try_lock(&name).unwrap().is_none(), "the key is held");
    std::thread::sleep(ttl + ms(300));
    let got = c.try_lock(&name).unwrap();
    assert!(
        got.is_some(),
        "a key held with no lease by a session idle for longer than a TTL blocks try_lock"
    );
    assert!(
        stranded.simple_query("SELECT 1").is_err(),
        "the stranded session was terminated"
    );
}
