//! `rediss://` without a CA file trusts the platform's trust store, read once
//! by `build()`: an entry rustls cannot use is skipped (the rest still
//! count), and later connections — health checks, reconnects — never read
//! the store again, so a store that breaks after `build()` changes nothing.
//! An empty or unreadable store fails `build()` with `InvalidConfig`.
//!
//! Its own process: it sets `SSL_CERT_FILE`, which rustls-native-certs
//! reads.

mod common;

use common::redis_server::{RedisServer, certs, connect};
use common::*;
use lockbox::{Error, LockClient};

fn set_store(path: &str) {
    // Only this test runs in this process; the servers have their files.
    unsafe {
        std::env::remove_var("SSL_CERT_DIR");
        std::env::set_var("SSL_CERT_FILE", path);
    }
}

#[test]
fn the_platform_store_is_read_once_and_a_bad_entry_skipped() {
    let server = RedisServer::start_tls("no", &[]).expect("redis-server");
    let dir = std::env::temp_dir().join(unique("lockbox-platform-store"));
    std::fs::create_dir_all(&dir).unwrap();
    // A bundle as a platform has it: one entry that is not a certificate
    // rustls can use, then the CA of the test server.
    let bundle = dir.join("bundle.pem");
    let ca = std::fs::read_to_string(&certs().ca).unwrap();
    std::fs::write(
        &bundle,
        format!("-----BEGIN CERTIFICATE-----\nAAECAwQFBgcI\n-----END CERTIFICATE-----\n{ca}"),
    )
    .unwrap();
    set_store(bundle.to_str().unwrap());
    let client = LockClient::redis(&server.url)
        .connect_timeout(ms(2000))
        .ttl(ms(1000))
        .build()
        .unwrap_or_else(|e| panic!("the platform store holds the server's CA: {e}"));

    // The store breaks after build(): new connections do not read it.
    set_store("/nonexistent/lockbox-platform-store/bundle.pem");
    let mut admin = connect(&server.socket_url());
    let _: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("normal")
        .arg("SKIPME")
        .arg("yes")
        .query(&mut admin)
        .unwrap();
    for _ in 0..3 {
        // A health check opens a connection of its own.
        let health = client.health();
        assert!(health.database.reachable, "{health}");
    }
    let name = unique("platform-store");
    let lock = client.try_lock(&name).unwrap().expect("free");
    assert!(eventually(ms(5000), || client.metrics().renewals_ok >= 2));
    lock.release().unwrap();

    // A store with nothing usable fails the build, saying so.
    match LockClient::redis(&server.url).build() {
        Err(Error::InvalidConfig(why)) => {
            assert!(why.contains("platform's trust store"), "{why}");
            assert!(why.contains("redis_tls_ca_file"), "{why}");
        }
        Err(other) => panic!("expected InvalidConfig, got {other:?}"),
        Ok(_) => panic!("built with an empty platform store"),
    }
    // A CA file does not need the platform store at all.
    LockClient::redis(&server.url)
        .redis_tls_ca_file(&certs().ca)
        .build()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
