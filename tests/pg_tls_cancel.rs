//! The deadline's cancel request to a frozen TLS server: over TLS it waits
//! for the server's answer to its SSLRequest and then for the handshake, which
//! a frozen server never gives. It is bounded by the connect timeout, like
//! opening a session, and the attempts left waiting are capped. Its own test
//! binary: it counts the process's threads by name.

mod common;

use std::time::Duration;

use common::proxy::Proxy;
use common::tls::tls_server;
use common::*;
use lockbox::{LockClient, LostReason};

#[test]
fn a_cancel_request_to_a_frozen_tls_server_gives_up_after_the_connect_timeout() {
    let server = tls_server();
    // A server that accepts connections and then answers nothing: the proxy
    // stops forwarding, its TCP connections stay up.
    let proxy = Proxy::start(&format!("127.0.0.1:{}", server.port()));
    let connect_timeout = Duration::from_secs(1);
    let ttl = ms(900);
    const LOCKS: usize = 10;
    let client = LockClient::builder(&format!(
        "host=127.0.0.1 port={} user=postgres dbname=postgres sslmode=require \
         application_name={}",
        proxy.port,
        unique("frozen-cancel")
    ))
    .ttl(ttl)
    .pool_size(LOCKS as u32 + 2)
    .connect_timeout(connect_timeout)
    .build()
    .unwrap();
    let locks: Vec<_> = (0..LOCKS)
        .map(|_| client.try_lock(&unique("frozen")).unwrap().unwrap())
        .collect();
    proxy.pause();
    // Each renewal is stuck on the frozen server at its deadline: the lock is
    // lost, and a cancel request is sent for the stuck statement.
    for lock in &locks {
        assert_eq!(lock.lost().recv_timeout(ttl * 4), Ok(LostReason::Expired));
    }
    // Every interrupt thread ends while the server is still frozen ...
    let ended = eventually(connect_timeout * 10, || {
        threads_named("lockbox-interrupt") == 0
    });
    let interrupts = threads_named("lockbox-interrupt");
    let cancels = threads_named("lockbox-cancel");
    proxy.resume();
    assert!(
        ended,
        "{interrupts} interrupt threads still wait for the frozen server"
    );
    // ... and the cancel attempts left waiting for it are capped.
    assert!(cancels <= 8, "{cancels} cancel threads wait for the server");
    drop(locks);
}
