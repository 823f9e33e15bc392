//! `rediss://` against real TLS-only redis-servers (`--port 0 --tls-port …`)
//! with certificates made here: the server's certificate is checked against
//! the CA given (or the platform's trust store) and the host name; a client
//! certificate is presented when the server requires one; every failure says
//! which check failed; and a `rediss://` URL never falls back to plain text.

use crate::common;

use std::time::Duration;

use common::redis_server::{RedisServer, certs, encode, release_wakes_the_waiter, tls_redis};
use common::*;
use lockbox::{Error, LockClient};

/// The build's error, which must be a connect error, as text.
fn connect_error(builder: lockbox::LockClientBuilder) -> String {
    match builder.connect_timeout(Duration::from_secs(2)).build() {
        Err(e @ Error::Connect { .. }) => e.to_string(),
        Err(other) => panic!("expected a connect error, got {other:?}"),
        Ok(_) => panic!("connected"),
    }
}

/// The build's error, which must be an invalid-configuration error, as text.
fn config_error(builder: lockbox::LockClientBuilder) -> String {
    match builder.build() {
        Err(e @ Error::InvalidConfig(_)) => e.to_string(),
        Err(other) => panic!("expected InvalidConfig, got {other:?}"),
        Ok(_) => panic!("built"),
    }
}

#[test]
fn locks_over_tls_with_the_servers_ca() {
    let server = tls_redis();
    let client = server.builder().ttl(ms(1000)).build().unwrap();
    let name = unique("tls");
    let lock = client.try_lock(&name).unwrap().expect("free");
    assert!(client.try_lock(&name).unwrap().is_none());
    let listed = client.lease(&name).unwrap().expect("listed");
    assert_eq!(listed.fencing_token, lock.fencing_token());
    assert!(eventually(ms(5000), || client.metrics().renewals_ok >= 2));
    assert!(lock.is_held());
    lock.release().unwrap();
    assert!(client.try_lock(&name).unwrap().is_some());
    assert!(
        eventually(ms(5000), || client.health().is_healthy()),
        "{}",
        client.health()
    );
    // The Debug output names the target and the CA file, nothing else.
    let shown = format!("{:?}", server.builder());
    assert!(
        shown.contains(&format!("rediss://localhost:{}/0", server.port)),
        "{shown}"
    );
}

#[test]
fn an_untrusted_server_certificate_is_refused() {
    let server = tls_redis();
    let err = connect_error(LockClient::redis(&server.url()).redis_tls_ca_file(&certs().other_ca));
    assert!(err.contains("not trusted"), "{err}");
    assert!(err.contains(&format!("localhost:{}", server.port)), "{err}");
    // Without a CA file, the platform's trust store, which does not hold the
    // test CA: refused too, never connected unverified.
    let err = connect_error(LockClient::redis(&server.url()));
    assert!(err.contains("not trusted"), "{err}");
}

#[test]
fn a_host_name_the_certificate_is_not_for_is_refused() {
    let server = tls_redis();
    let url = format!("rediss://127.0.0.1:{}/", server.port);
    let err = connect_error(LockClient::redis(&url).redis_tls_ca_file(&certs().ca));
    assert!(err.contains("host name mismatch"), "{err}");
}

/// A `rediss://` URL pointed at a plain-text server fails, saying so, and
/// nothing but the TLS hello (and, to tell why it went unanswered, a
/// plain-text PING) reaches the server: no AUTH with the password, no command.
#[test]
fn rediss_to_a_plain_text_server_fails_and_sends_nothing_in_the_clear() {
    let server = RedisServer::start().expect("redis-server");
    let mut admin = server.connection();
    let () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query(&mut admin)
        .unwrap();
    let url = format!(
        "rediss://app:{}@127.0.0.1:{}/",
        encode("Secret-Pw"),
        server.port
    );
    // The TLS hello is answered at once (an error reply to what looks like a
    // command) or never (no line end in it yet): both ways are an error.
    for _ in 0..3 {
        let err = connect_error(
            LockClient::redis(&url)
                .redis_tls_ca_file(&certs().ca)
                .connect_timeout(ms(1000)),
        );
        assert!(err.contains("does not speak TLS"), "{err}");
        assert!(!err.contains("Secret"), "{err}");
    }
    let stats: String = redis::cmd("INFO")
        .arg("commandstats")
        .query(&mut admin)
        .unwrap();
    for command in ["auth", "hello", "evalsha", "eval", "info", "select"] {
        assert!(
            !stats.contains(&format!("cmdstat_{command}:")),
            "{command} reached the server in plain text:\n{stats}"
        );
    }
}

#[test]
fn a_server_that_requires_client_certificates() {
    let server = RedisServer::start_tls("yes", &[]).expect("redis-server");
    let c = certs();
    let err = connect_error(LockClient::redis(&server.url).redis_tls_ca_file(&c.ca));
    assert!(err.contains("requires a client certificate"), "{err}");
    let err = connect_error(
        LockClient::redis(&server.url)
            .redis_tls_ca_file(&c.ca)
            .redis_tls_client_cert(&c.other_client_cert, &c.other_client_key),
    );
    assert!(err.contains("refused the client certificate"), "{err}");
    let builder = || {
        LockClient::redis(&server.url)
            .redis_tls_ca_file(&c.ca)
            .redis_tls_client_cert(&c.client_cert, &c.client_key)
    };
    let client = builder().build().unwrap();
    let name = unique("mtls");
    let lock = client.try_lock(&name).unwrap().expect("free");
    lock.release().unwrap();
    assert!(client.health().is_healthy(), "{}", client.health());
    // The release listener presents the certificate too.
    let holder = builder().build().unwrap();
    let subs = release_wakes_the_waiter(&holder, &client, &mut server.connection());
    assert_eq!(subs.len(), 2, "{subs:?}");
}

/// The release listener connects as the pool does: over TLS (the server has
/// no plain-text TCP port), and a release wakes a waiter through it.
#[test]
fn the_release_listener_uses_tls_too() {
    let server = RedisServer::start_tls("no", &[]).expect("redis-server");
    let builder = || LockClient::redis(&server.url).redis_tls_ca_file(&certs().ca);
    let (holder, waiter) = (builder().build().unwrap(), builder().build().unwrap());
    let subs = release_wakes_the_waiter(&holder, &waiter, &mut server.connection());
    assert_eq!(subs.len(), 2, "{subs:?}");
    for line in &subs {
        assert!(
            line.contains(&format!("laddr=127.0.0.1:{} ", server.port)),
            "a subscriber did not come through the TLS port: {line}"
        );
    }
}

#[test]
fn tls_settings_are_checked_at_build() {
    let c = certs();
    let server = tls_redis();
    // TLS files with a URL that would not use them.
    for url in [
        "redis://127.0.0.1:6379/".to_owned(),
        server.socket_url(),
        format!("unix://{}", server.socket.display()),
    ] {
        let err = config_error(LockClient::redis(&url).redis_tls_ca_file(&c.ca));
        assert!(err.contains("not rediss://"), "{err}");
        let err = config_error(
            LockClient::redis(&url).redis_tls_client_cert(&c.client_cert, &c.client_key),
        );
        assert!(err.contains("not rediss://"), "{err}");
    }
    // ... or on a client of another store.
    let err = config_error(LockClient::builder(database_url()).redis_tls_ca_file(&c.ca));
    assert!(err.contains("Redis clients only"), "{err}");
    let err = config_error(LockClient::memory().redis_tls_ca_file(&c.ca));
    assert!(err.contains("Redis clients only"), "{err}");
    // Files that cannot serve.
    let err = config_error(server.builder().redis_tls_ca_file("/nonexistent/ca.pem"));
    assert!(err.contains("/nonexistent/ca.pem"), "{err}");
    let err = config_error(server.builder().redis_tls_ca_file(&c.client_key));
    assert!(err.contains("no PEM certificate"), "{err}");
    let err = config_error(
        server
            .builder()
            .redis_tls_client_cert(&c.client_cert, &c.ca),
    );
    assert!(err.contains("no PEM private key"), "{err}");
    let err = config_error(
        server
            .builder()
            .redis_tls_client_cert(&c.client_cert, &c.other_client_key),
    );
    assert!(err.contains(&c.other_client_key), "{err}");
    // Certificate checks off: refused, not honoured.
    let err = config_error(
        LockClient::redis(&format!("{}#insecure", server.url())).redis_tls_ca_file(&c.ca),
    );
    assert!(err.contains("#insecure"), "{err}");
}

/// `build()` over TLS ends within its connect timeout, telling why included:
/// against a port that accepts and never answers (a black hole, a frozen
/// server), the plain-text PING that looks for a plain-text Redis there gets
/// no time beyond the timeout; against a plain-text Redis that waits silently
/// for the rest of what it takes for a command, the build says so, within the
/// timeout too.
#[test]
fn a_tls_build_ends_within_its_connect_timeout() {
    let timeout = ms(1500);
    // A scheduling allowance, far below another timeout's worth.
    let slack = ms(600);
    let silent = SilentServer::start();
    let url = format!("rediss://localhost:{}/", silent.port);
    let start = std::time::Instant::now();
    let err = connect_error_within(
        LockClient::redis(&url).redis_tls_ca_file(&certs().ca),
        timeout,
    );
    let took = start.elapsed();
    assert!(took < timeout + slack, "build() took {took:?}: {err}");
    assert!(err.contains("no answer within"), "{err}");
    assert!(silent.accepted() >= 1, "the port was never contacted");

    let plain = RedisServer::start().expect("redis-server");
    let url = format!("rediss://localhost:{}/", plain.port);
    for _ in 0..3 {
        let start = std::time::Instant::now();
        let err = connect_error_within(
            LockClient::redis(&url).redis_tls_ca_file(&certs().ca),
            timeout,
        );
        let took = start.elapsed();
        assert!(took < timeout + slack, "build() took {took:?}: {err}");
        assert!(err.contains("does not speak TLS"), "{err}");
    }
}

/// The build's error within `timeout`, which must be a connect error, as text.
fn connect_error_within(builder: lockbox::LockClientBuilder, timeout: Duration) -> String {
    match builder.connect_timeout(timeout).build() {
        Err(e @ Error::Connect { .. }) => e.to_string(),
        Err(other) => panic!("expected a connect error, got {other:?}"),
        Ok(_) => panic!("connected"),
    }
}
