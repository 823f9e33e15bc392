//! A hostile member: a server on an etcd endpoint whose answers are well-formed
//! JSON with numbers no etcd would send. Nothing may panic on them.

use crate::common;

use std::thread;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use common::etcd_server::fake_member;
use common::{ms, unique};
use lockbox::LockClient;

fn b64(s: &str) -> String {
    STANDARD.encode(s)
}

const STATUS: &str = r#"{"header":{"revision":"1"},"version":"3.4.23"}"#;
const HUGE: &str = "9223372036854775807";

/// The queue read at revision i64::MAX: the waiter watches from the next
/// revision, which does not exist.
#[test]
fn a_revision_at_the_top_of_i64_does_not_panic() {
    let name = unique("review-etcd-huge-rev");
    let mine = format!("lockbox/lock/{name}/0000000000000001");
    let ahead = format!("lockbox/lock/{name}/0000000000000002");
    let port = fake_member(move |path| match path {
        "/v3/maintenance/status" => STATUS.to_owned(),
        "/v3/lease/grant" => r#"{"ID":"1","TTL":"30"}"#.to_owned(),
        "/v3/lease/keepalive" => r#"{"result":{"ID":"1","TTL":"30"}}"#.to_owned(),
        "/v3/lease/revoke" => "{}".to_owned(),
        "/v3/kv/txn" => format!(
            r#"{{"header":{{"revision":"5"}},"succeeded":true,"responses":[{{"response_put":{{}}}},{{"response_range":{{"kvs":[{{"key":"{}","create_revision":"3"}}]}}}}]}}"#,
            b64(&ahead)
        ),
        "/v3/kv/range" => format!(
            r#"{{"header":{{"revision":"{HUGE}"}},"kvs":[{{"key":"{}","create_revision":"5","lease":"1"}},{{"key":"{}","create_revision":"3"}}]}}"#,
            b64(&mine),
            b64(&ahead)
        ),
        _ => r#"{"error":"no","code":12,"message":"no"}"#.to_owned(),
    });
    let c = LockClient::etcd(&format!("http://127.0.0.1:{port}"))
        .ttl(Duration::from_secs(30))
        .connect_timeout(ms(2000))
        .build()
        .unwrap();
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _ = c.lock_timeout(&name, ms(1000));
    }));
    assert!(caught.is_ok(), "acquire panicked on a huge revision");
}

/// A lease whose time to live is i64::MAX seconds: `leases()` lists it
/// without panicking.
#[test]
fn a_huge_time_to_live_does_not_panic_leases() {
    let key = "lockbox/lock/x/0000000000000001".to_owned();
    let port = fake_member(move |path| match path {
        "/v3/maintenance/status" => STATUS.to_owned(),
        "/v3/kv/range" => format!(
            r#"{{"header":{{"revision":"5"}},"kvs":[{{"key":"{}","create_revision":"3","lease":"1"}}]}}"#,
            b64(&key)
        ),
        "/v3/lease/timetolive" => format!(r#"{{"ID":"1","TTL":"{HUGE}","grantedTTL":"-{HUGE}"}}"#),
        _ => r#"{"error":"no","code":12,"message":"no"}"#.to_owned(),
    });
    let c = LockClient::etcd(&format!("http://127.0.0.1:{port}"))
        .connect_timeout(ms(2000))
        .build()
        .unwrap();
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _ = c.leases();
    }));
    assert!(caught.is_ok(), "leases() panicked on a huge TTL");
}

/// Every answer trickles in a byte at a time, never ending: `build()` still
/// returns within its connect timeout (the test's own bound is a minute).
#[test]
fn a_member_answering_byte_by_byte_does_not_hang_build() {
    let port = fake_member(|_| "TRICKLE: ".to_owned());
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        let got = LockClient::etcd(&format!("http://127.0.0.1:{port}"))
            .connect_timeout(ms(1000))
            .build();
        let _ = tx.send(got.is_err());
    });
    assert_eq!(rx.recv_timeout(Duration::from_secs(60)), Ok(true));
}

/// A watch that answers blank lines a byte at a time, never an event: the
/// waiter still gives up at the end of its wait.
#[test]
fn a_watch_answering_byte_by_byte_does_not_outlive_the_wait() {
    let name = unique("review-etcd-trickle");
    let mine = format!("lockbox/lock/{name}/0000000000000001");
    let ahead = format!("lockbox/lock/{name}/0000000000000002");
    let port = fake_member(move |path| match path {
        "/v3/maintenance/status" => STATUS.to_owned(),
        "/v3/lease/grant" => r#"{"ID":"1","TTL":"30"}"#.to_owned(),
        "/v3/lease/keepalive" => r#"{"result":{"ID":"1","TTL":"30"}}"#.to_owned(),
        "/v3/lease/revoke" => "{}".to_owned(),
        "/v3/kv/txn" => format!(
            r#"{{"header":{{"revision":"5"}},"succeeded":true,"responses":[{{"response_put":{{}}}},{{"response_range":{{"kvs":[{{"key":"{}","create_revision":"3"}}]}}}}]}}"#,
            b64(&ahead)
        ),
        "/v3/kv/range" => format!(
            r#"{{"header":{{"revision":"5"}},"kvs":[{{"key":"{}","create_revision":"5","lease":"1"}},{{"key":"{}","create_revision":"3"}}]}}"#,
            b64(&mine),
            b64(&ahead)
        ),
        "/v3/watch" => "TRICKLE: \n".to_owned(),
        _ => r#"{"error":"no","code":12,"message":"no"}"#.to_owned(),
    });
    let c = LockClient::etcd(&format!("http://127.0.0.1:{port}"))
        .ttl(Duration::from_secs(30))
        .connect_timeout(ms(2000))
        .build()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        let got = c.lock_timeout(&name, ms(1500));
        let _ = tx.send(got.is_err());
    });
    assert_eq!(rx.recv_timeout(Duration::from_secs(60)), Ok(true));
}
