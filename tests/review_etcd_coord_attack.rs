//! Attacks on the etcd store's shared leases (issue 12): what a queue with a
//! key lockbox did not write lists, how long a dropped watch's thread lives,
//! and a shared acquire against answers no etcd gives.

mod common;

use std::thread;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use common::etcd_server::{fake_member, post, single};
use common::{eventually, ms, unique};
use lockbox::{LeaseKind, LockClient};

fn client() -> LockClient {
    LockClient::etcd(&single().endpoints())
        .ttl(Duration::from_secs(10))
        .build()
        .unwrap()
}

fn put(key: &[u8], value: &str) {
    let body = format!(
        r#"{{"key":"{}","value":"{}"}}"#,
        STANDARD.encode(key),
        STANDARD.encode(value)
    );
    post(
        single().members[0].client_port,
        "/v3/kv/put",
        &body,
        ms(5000),
    )
    .expect("put");
}

fn delete(key: &[u8]) {
    let body = format!(r#"{{"key":"{}"}}"#, STANDARD.encode(key));
    post(
        single().members[0].client_port,
        "/v3/kv/deleterange",
        &body,
        ms(5000),
    )
    .expect("delete");
}

/// A key under the name's prefix that lockbox did not write — with a `/`
/// after the name, or bytes that are not UTF-8 — stands in the queue (the
/// acquire counts it), so the reader behind it waits. The listing must say
/// the same: no reader listed as holding while it waits.
#[test]
fn a_foreign_key_ahead_keeps_a_waiting_reader_out_of_the_listing() {
    for tail in [b"by/hand".to_vec(), vec![0xff, 0xfe]] {
        let name = unique("review-coord-foreign");
        let c = client();
        let mut key = format!("lockbox/lock/{name}/").into_bytes();
        key.extend_from_slice(&tail);
        put(&key, "not lockbox's");
        let rw = c.rwlock(&name).unwrap();
        let reader = {
            let rw = rw.clone();
            thread::spawn(move || rw.read_timeout(ms(20_000)))
        };
        let prefix = format!("lockbox/lock/{name}/");
        assert!(eventually(ms(10_000), || single().count_keys(&prefix) == Some(2)));
        let listed = c.leases_of(&name).unwrap();
        let all = c.leases().unwrap();
        delete(&key);
        let got = reader
            .join()
            .unwrap()
            .expect("granted once the key is gone");
        assert!(
            listed.iter().all(|l| l.kind != LeaseKind::Shared),
            "a waiting reader listed as a holder: {listed:?}"
        );
        assert!(
            all.iter()
                .all(|l| l.name != name || l.kind != LeaseKind::Shared),
            "a waiting reader listed as a holder: {all:?}"
        );
        drop(got);
    }
}

fn watch_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .flatten()
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm"))
                .is_ok_and(|c| c.trim() == "lockbox-etcd-wa")
        })
        .count()
}

/// A dropped election watch does not leave its etcd watch thread behind for
/// long: many watches opened and dropped leave no thread after a bound well
/// below the stream's old 30 s.
#[test]
fn dropped_watches_do_not_linger() {
    let c = client();
    let name = unique("review-coord-watch");
    let election = c.election(&name).unwrap();
    let watches: Vec<_> = (0..5).map(|_| election.watch().unwrap()).collect();
    // A thread names itself once it runs.
    assert!(eventually(ms(5000), || watch_threads() >= 5));
    drop(watches);
    let start = Instant::now();
    assert!(
        eventually(ms(15_000), || watch_threads() == 0),
        "{} etcd watch threads still there {:?} after the watches were dropped",
        watch_threads(),
        start.elapsed()
    );
}

/// A transaction answer that says the key was created but whose read of the
/// queue lacks it (no etcd answers so): a try of a permit ends with an error,
/// not a loop that queues again for ever.
#[test]
fn a_queue_read_without_the_own_key_is_an_error_not_a_loop() {
    let port = fake_member(|path| {
        match path {
        "/v3/maintenance/status" => r#"{"header":{"revision":"1"},"version":"3.5.0"}"#.to_owned(),
        "/v3/lease/grant" => r#"{"ID":"1","TTL":"30"}"#.to_owned(),
        "/v3/lease/revoke" => "{}".to_owned(),
        "/v3/kv/txn" => r#"{"header":{"revision":"5"},"succeeded":true,"responses":[{"response_put":{}},{"response_range":{}}]}"#.to_owned(),
        _ => r#"{"error":"no","code":12,"message":"no"}"#.to_owned(),
    }
    });
    let c = LockClient::etcd(&format!("http://127.0.0.1:{port}"))
        .ttl(Duration::from_secs(30))
        .connect_timeout(ms(2000))
        .build()
        .unwrap();
    let sem = c.semaphore(&unique("review-coord-hostile"), 2).unwrap();
    let (tx, rx) = crossbeam_channel::bounded(1);
    thread::spawn(move || {
        let _ = tx.send(sem.try_acquire().map(|p| p.is_some()));
    });
    let got = rx
        .recv_timeout(ms(10_000))
        .expect("the try ends (it looped queuing again)");
    assert!(got.is_err(), "{got:?}");
}
