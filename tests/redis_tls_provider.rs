//! A `rediss://` build that fails on one of its files (a CA file that is
//! missing or holds no certificate, a client key that does not match) leaves
//! the process's rustls crypto provider as it was: lockbox installs ring as
//! the default only once every file checked out, just before it needs it.
//!
//! Its own process: the provider is process-wide, and any TLS client built in
//! the same process would install it.

mod common;

use common::redis_server::{RedisServer, certs};
use lockbox::{Error, LockClient};

#[test]
fn a_build_that_fails_on_a_file_installs_no_crypto_provider() {
    let server = RedisServer::start_tls("no", &[]).expect("redis-server");
    let c = certs();
    let no_cert = std::env::temp_dir().join(common::unique("lockbox-no-cert"));
    std::fs::write(&no_cert, "not a certificate\n").unwrap();
    let failing = [
        LockClient::redis(&server.url).redis_tls_ca_file("/nonexistent/lockbox/ca.pem"),
        LockClient::redis(&server.url).redis_tls_ca_file(&no_cert),
        LockClient::redis(&server.url)
            .redis_tls_ca_file(&c.ca)
            .redis_tls_client_cert(&c.client_cert, &c.other_client_key),
    ];
    for builder in failing {
        match builder.build() {
            Err(Error::InvalidConfig(_)) => {}
            Err(other) => panic!("expected InvalidConfig, got {other:?}"),
            Ok(_) => panic!("built"),
        }
        assert!(
            rustls::crypto::CryptoProvider::get_default().is_none(),
            "a failed build installed a process-wide crypto provider"
        );
    }
    let _ = std::fs::remove_file(&no_cert);
    LockClient::redis(&server.url)
        .redis_tls_ca_file(&c.ca)
        .build()
        .unwrap();
    assert!(rustls::crypto::CryptoProvider::get_default().is_some());
}
