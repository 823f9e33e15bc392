//! The release listener notices a subscriber connection that went silent (a NAT
//! or load balancer dropping it without a word), reports it through health,
//! reconnects, and hand-offs are quick again once it is back.

use crate::common;

use std::time::{Duration, Instant};

use common::proxy::Proxy;
use common::redis_server::redis_url;
use common::*;
use lockbox::LockClient;

fn upstream() -> String {
    let info: redis::ConnectionInfo = redis_url().parse().unwrap();
    info.addr().to_string()
}

fn listener_alive(c: &LockClient) -> Option<bool> {
    c.health().database.listener_alive
}

#[test]
fn a_silently_dropped_subscriber_is_reported_and_replaced() {
    let proxy = Proxy::start(&upstream());
    let ttl = Duration::from_secs(10);
    let waiter = LockClient::redis(&format!("redis://127.0.0.1:{}/", proxy.port))
        .ttl(ttl)
        .health_timeout(ms(300))
        .build()
        .unwrap();
    assert!(eventually(ms(3000), || listener_alive(&waiter) == Some(true)));

    // Bytes stop flowing; the connection stays up.
    proxy.pause();
    assert!(
        eventually(ms(6000), || listener_alive(&waiter) == Some(false)),
        "health still says the listener is alive"
    );
    assert!(!waiter.health().is_healthy());
    proxy.resume();
    assert!(
        eventually(ms(6000), || listener_alive(&waiter) == Some(true)),
        "the listener did not reconnect"
    );

    // Hand-offs are woken by the release again, not by the holder's expiry.
    let holder = LockClient::redis(redis_url()).ttl(ttl).build().unwrap();
    let name = unique("redis-listener");
    let lock = holder.try_lock(&name).unwrap().unwrap();
    std::thread::scope(|s| {
        let w = s.spawn(|| waiter.lock_timeout(&name, ttl * 2).unwrap());
        assert!(eventually(ms(3000), || waiter.metrics().acquires_waiting == 1));
        let released = Instant::now();
        lock.release().unwrap();
        let got = w.join().unwrap();
        assert!(
            released.elapsed() < ttl / 2,
            "woken only after {:?}",
            released.elapsed()
        );
        got.release().unwrap();
    });
}
