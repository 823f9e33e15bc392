//! Review (attack on the Redis "Production connections" change): with
//! `redis_tls_ca_file` given, the server's certificate is checked against that
//! file only ("the platform's trust store otherwise"), so the platform's trust
//! store must play no part — yet the driver loads it at every connection
//! (`rustls_native_certs::load_native_certs()` in `create_rustls_config`,
//! before it looks at the CA lockbox passed) and fails the connection on any
//! error found there. A platform store that cannot be read — here
//! `SSL_CERT_FILE` naming a file that does not exist, as a container image
//! built for another tool may set it; likewise one unparsable bundle entry —
//! makes every `rediss://` connection fail, `build()` included, even though
//! the CA file is fine; and every connection (lanes, reconnects, health
//! probes) re-reads and re-parses the whole platform bundle for nothing.
//!
//! Its own process: it sets an environment variable.

mod common;

use common::redis_server::{RedisServer, certs};
use common::*;
use lockbox::LockClient;

#[test]
fn a_given_ca_file_does_not_depend_on_the_platform_trust_store() {
    let server = RedisServer::start_tls("no", &[]).expect("redis-server");
    let ca = certs().ca.clone();
    // Only lockbox's process reads it (the server and its certificates exist).
    unsafe { std::env::set_var("SSL_CERT_FILE", "/nonexistent/lockbox-review/bundle.pem") };
    let client = LockClient::redis(&server.url)
        .redis_tls_ca_file(&ca)
        .ttl(ms(1000))
        .build()
        .unwrap_or_else(|e| {
            panic!("the CA file is valid, but the platform trust store decided: {e}")
        });
    let lock = client.try_lock(&unique("platform")).unwrap().expect("free");
    lock.release().unwrap();
}
