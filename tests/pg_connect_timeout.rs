//! A server that accepts TCP connections but never answers (a frozen postmaster,
//! a hung load balancer): `build()` returns a connection error within the
//! connect timeout (the driver's own timeout covers only the TCP connect), health
//! probes never pile up, and pool connections opened later are bounded too.

mod common;

use std::time::Duration;

use common::proxy::Proxy;
use common::*;
use lockbox::{Error, HealthStatus, LockClient};

/// Builds on another thread. A generous bound so a test ends by itself; the
/// point is that `build()` returns, not how fast.
fn build_within(builder: lockbox::LockClientBuilder) -> Result<(), Error> {
    let (tx, rx) = crossbeam_channel::bounded(1);
    std::thread::spawn(move || {
        let _ = tx.send(builder.build().map(drop));
    });
    rx.recv_timeout(Duration::from_secs(20))
        .expect("build() did not return against a server that never answers")
}

#[test]
fn build_against_a_silent_server_returns_a_connect_error() {
    let server = SilentServer::start();
    let built =
        build_within(LockClient::builder(&server.url()).connect_timeout(Duration::from_secs(1)));
    let err = built.expect_err("nothing to connect to");
    let msg = err.to_string();
    match &err {
        Error::Connect { target, .. } => {
            assert_eq!(
                target,
                &format!("postgresql://postgres@127.0.0.1:{}/postgres", server.port)
            );
        }
        other => panic!("expected Error::Connect, got {other:?}"),
    }
    assert!(msg.contains("did not complete the startup"), "{msg}");
    assert!(!msg.contains("pw with spaces") && !format!("{err:?}").contains("pw with spaces"));
    assert!(server.accepted() >= 1, "the server was never contacted");
}

#[test]
fn health_probes_and_pool_connections_do_not_pile_up_against_a_frozen_server() {
    let parts = server_parts();
    let proxy = Proxy::start(&format!("{}:{}", parts.host, parts.port));
    let app = unique("frozen");
    let client = LockClient::builder(&proxy.url(&parts.user, &parts.db, &app))
        .pool_size(2)
        .pool_timeout(Duration::from_secs(2))
        .connect_timeout(Duration::from_millis(500))
        .health_timeout(Duration::from_millis(100))
        .build()
        .unwrap();
    // A probe slower than the health timeout is picked up by the next call.
    assert!(
        eventually(Duration::from_secs(10), || client.health().status
            == HealthStatus::Healthy),
        "{}",
        client.health()
    );

    // Frozen: connections are accepted, nothing is answered.
    proxy.pause();
    let mut most = 0;
    for _ in 0..50 {
        let h = client.health();
        assert!(!h.database.reachable, "{h}");
        most = most.max(threads_named("lockbox-health"));
    }
    assert!(most <= 1, "{most} health probes were in flight at once");

    // Pool connections opened now are bounded by the connect timeout, and so is
    // the number of attempts left waiting.
    for _ in 0..3 {
        let err = client
            .try_lock(&unique("frozen-lock"))
            .expect_err("no connection can be opened");
        assert!(matches!(err, Error::Connect { .. }), "{err:?}");
        let connecting = threads_named("lockbox-connect");
        assert!(
            connecting <= 2 + 2,
            "{connecting} connection attempts in flight"
        );
    }

    proxy.resume();
    assert!(
        eventually(Duration::from_secs(10), || client.health().is_healthy()),
        "the client did not recover when the server answered again"
    );
}

/// Every connection error names the target from the parsed configuration and
/// never any part of the password, however it is written: with spaces, quotes,
/// tabs, or `/` and `?` in a URL; against a silent server (timeout), a closed
/// port (refused), and for a connection string that does not parse.
#[test]
fn no_connection_error_shows_the_password() {
    let silent = SilentServer::start();
    // A port nothing listens on: bound, then released.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cases: Vec<(String, &[&str])> = Vec::new();
    for port in [silent.port, closed] {
        cases.push((
            format!("host=127.0.0.1 port={port} user=postgres password='pw with spaces'"),
            &["pw with", "with spaces"],
        ));
        cases.push((
            format!(
                "host=127.0.0.1 port={port} user=postgres password='it\\'s \"quoted\"\tand tabbed'"
            ),
            &["quoted", "tabbed", "it's"],
        ));
        cases.push((
            format!("postgres://postgres:pa/ss?w0rd@127.0.0.1:{port}/postgres"),
            &["pa/ss", "ss?w0rd", "w0rd"],
        ));
        cases.push((
            format!("postgres://postgres:pa%2Fss%3Fw0rd%20x@127.0.0.1:{port}/postgres"),
            &["pa%2F", "w0rd", "pa/ss"],
        ));
    }
    // Unquoted spaces: the parser meets the password's second word as a keyword.
    cases.push((
        "host=127.0.0.1 user=postgres password=first secondword=x".to_owned(),
        &["secondword"],
    ));
    cases.push((
        "host=127.0.0.1 user=postgres password=first sec'ondword".to_owned(),
        &["sec", "ondword"],
    ));
    for (url, secrets) in &cases {
        let err =
            build_within(LockClient::builder(url).connect_timeout(Duration::from_millis(500)))
                .expect_err("nothing to connect to");
        let shown = format!("{err} {err:?}");
        for secret in *secrets {
            assert!(
                !shown.contains(secret),
                "{url:?} leaked {secret:?}: {shown}"
            );
        }
    }
}
