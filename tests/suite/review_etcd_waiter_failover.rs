//! A waiter's keep-alive meets a frozen member: it must fail over before its
//! own lease runs out, or it loses its place in the queue.

use crate::common;

use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use common::etcd_server::single;
use common::proxy::Proxy;
use common::{eventually, ms, unique};
use lockbox::LockClient;

/// Keys under `name`'s prefix on the single member.
fn queued(name: &str) -> u64 {
    single()
        .count_keys(&format!("lockbox/lock/{name}/"))
        .expect("etcd answers")
}

/// B waits first (its first endpoint a proxy to the member, its second the
/// member itself), C second. The proxy freezes, then the holder releases:
/// B's keep-alive, sent first to the frozen proxy with half of the request
/// timeout (5 s) while its lease has 3 s, must still reach the member in
/// time, so that B — first in line — is granted first.
#[test]
fn a_frozen_member_does_not_cost_a_waiter_its_place() {
    let name = unique("review-etcd-waiter-failover");
    let member = format!("127.0.0.1:{}", single().members[0].client_port);
    let proxy = Proxy::start(&member);
    let direct = |ttl| {
        LockClient::etcd(&single().endpoints())
            .ttl(ttl)
            .build()
            .unwrap()
    };
    let a = direct(ms(3000));
    let b = LockClient::etcd(&format!(
        "http://127.0.0.1:{},{}",
        proxy.port,
        single().endpoints()
    ))
    .ttl(ms(3000))
    .build()
    .unwrap();
    let c = direct(ms(3000));
    let held = a.try_lock(&name).unwrap().unwrap();
    let (tx, rx) = mpsc::channel();
    let spawn = |who: &'static str, client: LockClient| {
        let (name, tx) = (name.clone(), tx.clone());
        thread::spawn(move || {
            let got = client.lock_timeout(&name, ms(60_000));
            let _ = tx.send((who, got.is_ok()));
            // Held a moment only, so the other is granted next.
            drop(got);
        })
    };
    let tb = spawn("B", b);
    assert!(eventually(ms(5000), || queued(&name) == 2));
    let tc = spawn("C", c);
    assert!(eventually(ms(5000), || queued(&name) == 3));
    proxy.pause();
    held.release().unwrap();
    let first = rx.recv_timeout(Duration::from_secs(60));
    proxy.resume();
    let second = rx.recv_timeout(Duration::from_secs(60));
    tb.join().unwrap();
    tc.join().unwrap();
    assert_eq!(first, Ok(("B", true)), "then {second:?}");
    assert_eq!(second, Ok(("C", true)));
}
