//! A hostile operator: leases revoked by hand, under a holder and under a
//! waiter.

use crate::common;

use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use common::etcd_server::{post, single};
use common::{eventually, ms, unique};
use lockbox::{LockClient, LostReason};
use serde_json::Value;

fn client(ttl: Duration) -> LockClient {
    LockClient::etcd(&single().endpoints())
        .ttl(ttl)
        .build()
        .unwrap()
}

fn port() -> u16 {
    single().members[0].client_port
}

/// The keys under `name`'s prefix, oldest first: (key, lease).
fn queue(name: &str) -> Vec<(String, i64)> {
    let prefix = format!("lockbox/lock/{name}/");
    let mut end = prefix.as_bytes().to_vec();
    *end.last_mut().unwrap() += 1;
    let body = format!(
        r#"{{"key":"{}","range_end":"{}","sort_order":"ASCEND","sort_target":"CREATE"}}"#,
        STANDARD.encode(&prefix),
        STANDARD.encode(&end)
    );
    let answer: Value =
        serde_json::from_str(&post(port(), "/v3/kv/range", &body, ms(5000)).unwrap()).unwrap();
    answer["kvs"]
        .as_array()
        .map(|kvs| {
            kvs.iter()
                .map(|kv| {
                    let key = STANDARD.decode(kv["key"].as_str().unwrap()).unwrap();
                    let lease = kv["lease"].as_str().unwrap_or("0").parse().unwrap();
                    (String::from_utf8(key).unwrap(), lease)
                })
                .collect()
        })
        .unwrap_or_default()
}

fn revoke(lease: i64) {
    let body = format!(r#"{{"ID":"{lease}"}}"#);
    post(port(), "/v3/lease/revoke", &body, ms(5000)).expect("revoked");
}

/// The holder's lease revoked by hand: the lock is reported lost, and
/// another client takes it with a larger token.
#[test]
fn a_holders_lease_revoked_by_hand_is_a_loss() {
    let name = unique("review-etcd-revoked");
    let (a, b) = (client(ms(1500)), client(ms(1500)));
    let lock = a.try_lock(&name).unwrap().unwrap();
    let lost = lock.lost();
    let q = queue(&name);
    assert_eq!(q.len(), 1);
    revoke(q[0].1);
    assert_eq!(lost.recv_timeout(ms(5000)), Ok(LostReason::NotOwner));
    let next = b.try_lock(&name).unwrap().expect("free after the revoke");
    assert!(next.fencing_token() > lock.fencing_token());
}

/// A waiter's lease revoked by hand (its key goes): it queues again and is
/// granted when the holder releases, leaving only its own key.
#[test]
fn a_waiters_lease_revoked_by_hand_queues_again() {
    let name = unique("review-etcd-revoked-waiter");
    let (a, b) = (client(ms(3000)), client(ms(3000)));
    let held = a.try_lock(&name).unwrap().unwrap();
    let (tx, rx) = mpsc::channel();
    let waiter = {
        let (name, b) = (name.clone(), b.clone());
        thread::spawn(move || {
            let got = b.lock_timeout(&name, ms(30_000));
            let _ = tx.send(got.as_ref().map(|l| l.fencing_token()).ok());
            got
        })
    };
    assert!(eventually(ms(5000), || queue(&name).len() == 2));
    revoke(queue(&name)[1].1);
    // It queues again behind the holder.
    assert!(eventually(ms(10_000), || queue(&name).len() == 2));
    assert!(rx.try_recv().is_err(), "granted while the holder holds");
    let token = held.fencing_token();
    held.release().unwrap();
    let got = rx.recv_timeout(Duration::from_secs(30)).unwrap();
    assert!(got.is_some_and(|t| t > token), "{got:?}");
    assert_eq!(queue(&name).len(), 1);
    drop(waiter.join().unwrap());
}
