//! A broken network between a waiter and its etcd member: a stream that
//! freezes or is cut while the waiter watches.

use crate::common;

use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use common::etcd_server::single;
use common::proxy::Proxy;
use common::{eventually, ms, unique};
use lockbox::LockClient;

fn through(proxy: &Proxy, ttl: Duration) -> LockClient {
    LockClient::etcd(&format!("http://127.0.0.1:{}", proxy.port))
        .ttl(ttl)
        .connect_timeout(ms(2000))
        .build()
        .unwrap()
}

fn direct(ttl: Duration) -> LockClient {
    LockClient::etcd(&single().endpoints())
        .ttl(ttl)
        .build()
        .unwrap()
}

fn upstream() -> String {
    format!("127.0.0.1:{}", single().members[0].client_port)
}

/// A waiter whose member stops answering mid-watch (the stream frozen, the
/// connection open) still gives up: its wait is bounded.
#[test]
fn a_frozen_watch_does_not_outlive_the_wait() {
    let name = unique("review-etcd-frozen-watch");
    let proxy = Proxy::start(&upstream());
    let (a, b) = (direct(ms(30_000)), through(&proxy, ms(30_000)));
    let held = a.try_lock(&name).unwrap().expect("free");
    let (tx, rx) = mpsc::channel();
    let waiter = {
        let name = name.clone();
        let b2 = b.clone();
        thread::spawn(move || {
            let got = b2.lock_timeout(&name, ms(3000));
            let _ = tx.send(got.is_ok());
        })
    };
    assert!(eventually(ms(5000), || b.metrics().acquires_waiting == 1));
    proxy.pause();
    // Its wait ends at 3 s; a minute is only the test's own bound.
    let got = rx.recv_timeout(Duration::from_secs(60));
    proxy.resume();
    assert_eq!(got, Ok(false), "the waiter did not give up in time");
    waiter.join().unwrap();
    drop(held);
}

/// The watch's connection is cut while the waiter waits: it watches again,
/// and is granted when the holder releases.
#[test]
fn a_cut_watch_is_opened_again() {
    let name = unique("review-etcd-cut-watch");
    let proxy = Proxy::start(&upstream());
    let (a, b) = (direct(ms(30_000)), through(&proxy, ms(30_000)));
    let held = a.try_lock(&name).unwrap().expect("free");
    let (tx, rx) = mpsc::channel();
    let waiter = {
        let name = name.clone();
        let b2 = b.clone();
        thread::spawn(move || {
            let got = b2
                .lock_timeout(&name, ms(30_000))
                .map(|l| l.fencing_token());
            let _ = tx.send(got.is_ok());
        })
    };
    assert!(eventually(ms(5000), || b.metrics().acquires_waiting == 1));
    proxy.cut();
    held.release().unwrap();
    assert_eq!(rx.recv_timeout(Duration::from_secs(60)), Ok(true));
    waiter.join().unwrap();
}
