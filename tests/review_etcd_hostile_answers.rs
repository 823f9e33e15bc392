//! A hostile member: a server on an etcd endpoint whose answers are well-formed
//! JSON with numbers no etcd would send. Nothing may panic on them.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::thread;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use common::{ms, unique};
use lockbox::LockClient;

fn b64(s: &str) -> String {
    STANDARD.encode(s)
}

/// Serves each POST with `answer(path)`, one request per connection, until
/// the test process ends.
fn hostile(answer: impl Fn(&str) -> String + Send + Sync + 'static) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let answer = std::sync::Arc::new(answer);
    thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let answer = answer.clone();
            thread::spawn(move || serve(stream, &*answer));
        }
    });
    port
}

fn serve(stream: TcpStream, answer: &dyn Fn(&str) -> String) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let path = line.split(' ').nth(1).unwrap_or("").to_owned();
    let mut length = 0;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).is_err() || h.trim().is_empty() {
            break;
        }
        if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
            length = v.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0; length];
    let _ = reader.read_exact(&mut body);
    let out = answer(&path);
    let mut stream = stream;
    if let Some(trickle) = out.strip_prefix("TRICKLE:") {
        // Headers, then one byte every 100 ms, for ever (a member that answers
        // slowly byte by byte): only the client's bound ends it.
        let _ = write!(
            stream,
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n"
        );
        for b in trickle.bytes().cycle() {
            if stream.write_all(&[b]).is_err() {
                return;
            }
            thread::sleep(Duration::from_millis(100));
        }
        return;
    }
    let _ = write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{out}",
        out.len()
    );
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
    let port = hostile(move |path| match path {
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
    let port = hostile(move |path| match path {
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
    let port = hostile(|_| "TRICKLE: ".to_owned());
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
    let port = hostile(move |path| match path {
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
