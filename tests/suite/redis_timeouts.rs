//! Redis connections have timeouts and TCP keepalive; renewals and releases are
//! bounded by the time left before the holder's deadline (`LeaseRef::limit`).
//! The server stops answering through a paused proxy (connections stay up).

use crate::common;

use std::process::Command;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::proxy::Proxy;
use common::redis_server::redis_url;
use common::*;
use lockbox::{LockClient, LostReason};

/// `host:port` of the suite's Redis server.
fn upstream() -> String {
    let info: redis::ConnectionInfo = redis_url().parse().unwrap();
    info.addr().to_string()
}

fn client_via(proxy: &Proxy, ttl: Duration) -> LockClient {
    LockClient::redis(&format!("redis://127.0.0.1:{}/", proxy.port))
        .ttl(ttl)
        .connect_timeout(ms(500))
        .build()
        .unwrap()
}

/// A renewal that gets no answer gives up by the holder's deadline, so the
/// renewal thread runs on and signals the loss by itself (before: it waited
/// for the answer forever, and `lost()` stayed silent).
#[test]
fn an_unanswered_renewal_gives_up_at_the_deadline_and_the_loss_is_signalled() {
    let proxy = Proxy::start(&upstream());
    let ttl = ms(600);
    let client = client_via(&proxy, ttl);
    let lock = client
        .try_lock(&unique("redis-renew-hang"))
        .unwrap()
        .unwrap();
    proxy.pause();
    let reason = lock.lost().recv_timeout(ttl * 4);
    proxy.resume();
    assert_eq!(reason, Ok(LostReason::Expired));
    assert!(client.renewal_thread_alive());
}

/// A release that gets no answer returns an error by the holder's deadline
/// rather than hang.
#[test]
fn an_unanswered_release_returns_by_the_deadline() {
    let proxy = Proxy::start(&upstream());
    let ttl = ms(600);
    let client = client_via(&proxy, ttl);
    let lock = client
        .try_lock(&unique("redis-release-hang"))
        .unwrap()
        .unwrap();
    proxy.pause();
    let (tx, rx) = mpsc::channel();
    let start = Instant::now();
    let releaser = thread::spawn(move || tx.send(lock.release()).unwrap());
    let result = rx.recv_timeout(ttl * 4);
    let took = start.elapsed();
    proxy.resume();
    releaser.join().unwrap();
    let result = result.expect("the release hung past the holder's deadline");
    assert!(result.is_err(), "an unanswered release reported success");
    assert!(took < ttl * 2, "returned after {took:?}");
}

/// An acquire that gets no answer fails after the I/O timeout (the builder's
/// connect timeout) instead of waiting forever.
#[test]
fn an_unanswered_acquire_fails_after_the_io_timeout() {
    let proxy = Proxy::start(&upstream());
    let client = LockClient::redis(&format!("redis://127.0.0.1:{}/", proxy.port))
        .connect_timeout(ms(500))
        .pool_timeout(ms(1000))
        .build()
        .unwrap();
    // A pooled connection exists, idle: the next acquire reuses it.
    drop(client.try_lock(&unique("redis-warm")).unwrap().unwrap());
    proxy.pause();
    let (tx, rx) = mpsc::channel();
    let c = client.clone();
    let name = unique("redis-acquire-hang");
    let acquirer = thread::spawn(move || tx.send(c.try_lock(&name).map(|l| l.is_some())).unwrap());
    let result = rx.recv_timeout(Duration::from_secs(5));
    proxy.resume();
    acquirer.join().unwrap();
    let result = result.expect("the acquire hung");
    assert!(result.is_err(), "{result:?}");
}

/// Every connection the client opens has TCP keepalive on (the kernel's
/// keepalive timer shows in `ss -o`).
#[test]
fn connections_have_tcp_keepalive() {
    let proxy = Proxy::start(&upstream());
    let client = client_via(&proxy, ms(900));
    let lock = client
        .try_lock(&unique("redis-keepalive"))
        .unwrap()
        .unwrap();
    thread::sleep(ms(400)); // a renewal ran: the lease lane has a connection too
    let out = Command::new("ss")
        .args(["-tnoH", "state", "established"])
        .arg(format!("( dport = :{} )", proxy.port))
        .output()
        .expect("run ss");
    let listing = String::from_utf8_lossy(&out.stdout);
    let sockets: Vec<&str> = listing.lines().collect();
    // The pool's, the lease lane's and the listener's connections.
    assert!(sockets.len() >= 3, "{listing}");
    for s in &sockets {
        assert!(s.contains("keepalive"), "no keepalive on: {s}");
    }
    lock.release().unwrap();
}
