//! Keys under a name's prefix that lockbox did not write: the holder is the
//! key with the lowest create revision, whatever its bytes.

use crate::common;

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use common::etcd_server::{post, single};
use common::{ms, unique};
use lockbox::LockClient;

/// A key under the name's prefix whose bytes are not UTF-8 (written by hand,
/// or by another tool), created after the holder's and before a waiter's,
/// stands in the queue like any other: the waiter may not take the lock
/// while the holder still holds it.
#[test]
fn a_key_that_is_not_utf8_does_not_let_a_waiter_in() {
    let name = unique("review-etcd-binary");
    let a = LockClient::etcd(&single().endpoints())
        .ttl(Duration::from_secs(10))
        .build()
        .unwrap();
    let b = LockClient::etcd(&single().endpoints())
        .ttl(Duration::from_secs(10))
        .build()
        .unwrap();
    let held = a.try_lock(&name).unwrap().expect("free");
    let mut key = format!("lockbox/lock/{name}/").into_bytes();
    key.extend_from_slice(&[0xff, 0xfe]);
    let body = format!(
        r#"{{"key":"{}","value":"{}"}}"#,
        STANDARD.encode(&key),
        STANDARD.encode("not lockbox's")
    );
    let port = single().members[0].client_port;
    post(port, "/v3/kv/put", &body, ms(5000)).expect("put");
    let got = b.lock_timeout(&name, ms(1500));
    assert!(
        got.is_err(),
        "a second holder while {:?} (token {}) still holds: {got:?}",
        held.name(),
        held.fencing_token()
    );
    assert_eq!(held.lost_reason(), None);
    let del = format!(r#"{{"key":"{}"}}"#, STANDARD.encode(&key));
    post(port, "/v3/kv/deleterange", &del, ms(5000)).expect("delete");
    drop(held);
    assert!(b.lock_timeout(&name, ms(5000)).is_ok());
}

/// A key under a name's prefix that is on no lease (an `etcdctl put` by
/// hand): the listing of every lock still works.
#[test]
fn a_key_without_a_lease_does_not_break_the_listing() {
    let name = unique("review-etcd-leaseless");
    let c = LockClient::etcd(&single().endpoints())
        .ttl(Duration::from_secs(10))
        .build()
        .unwrap();
    let other = unique("review-etcd-listed");
    let held = c.try_lock(&other).unwrap().expect("free");
    let key = format!("lockbox/lock/{name}/by-hand");
    let body = format!(
        r#"{{"key":"{}","value":"{}"}}"#,
        STANDARD.encode(&key),
        STANDARD.encode("x")
    );
    let port = single().members[0].client_port;
    post(port, "/v3/kv/put", &body, ms(5000)).expect("put");
    let listed = c.leases();
    let del = format!(r#"{{"key":"{}"}}"#, STANDARD.encode(&key));
    post(port, "/v3/kv/deleterange", &del, ms(5000)).expect("delete");
    let listed = listed.expect("the listing works");
    assert!(listed.iter().any(|l| l.name == other), "{listed:?}");
    drop(held);
}
