//! `https://` etcd endpoints without `etcd_tls_ca_file` trust the platform's
//! trust store, read once by `build()`: a member whose CA is in it is
//! trusted (an entry rustls cannot use is skipped), one whose CA is not is
//! refused, and a store with nothing usable fails `build()` with
//! `InvalidConfig` naming the setting that gives a CA instead.
//!
//! Its own process: it sets `SSL_CERT_FILE`, which rustls-native-certs reads.

mod common;

use common::etcd_server::{etcd_certs, single_tls};
use common::unique;
use lockbox::{Error, LockClient, LockClientBuilder};

fn set_store(path: &str) {
    // Only this test runs in this process; the member has its files.
    unsafe {
        std::env::remove_var("SSL_CERT_DIR");
        std::env::set_var("SSL_CERT_FILE", path);
    }
}

fn client() -> LockClientBuilder {
    let c = &etcd_certs().certs;
    LockClient::etcd(&single_tls().endpoints()).etcd_tls_client_cert(&c.client_cert, &c.client_key)
}

#[test]
fn the_platform_store_decides_without_a_ca_file() {
    let c = &etcd_certs().certs;
    // The member, started (and its certificates made) before the store is set.
    single_tls();
    let dir = std::env::temp_dir().join(unique("lockbox-etcd-platform-store"));
    std::fs::create_dir_all(&dir).unwrap();
    // A bundle as a platform has it: an entry rustls cannot use, then the CA.
    let bundle = dir.join("bundle.pem");
    let ca = std::fs::read_to_string(&c.ca).unwrap();
    std::fs::write(
        &bundle,
        format!("-----BEGIN CERTIFICATE-----\nAAECAwQFBgcI\n-----END CERTIFICATE-----\n{ca}"),
    )
    .unwrap();
    set_store(bundle.to_str().unwrap());
    let trusted = client()
        .build()
        .unwrap_or_else(|e| panic!("the platform store holds the member's CA: {e}"));

    // The store breaks after build(): the client read it once, and goes on.
    set_store("/nonexistent/lockbox-etcd-platform-store/bundle.pem");
    let name = unique("etcd-platform-store");
    let lock = trusted.try_lock(&name).unwrap().expect("free");
    lock.release().unwrap();

    // A store with nothing usable fails the build, saying so.
    match client().build() {
        Err(Error::InvalidConfig(why)) => {
            assert!(why.contains("platform's trust store"), "{why}");
            assert!(why.contains("etcd_tls_ca_file"), "{why}");
        }
        Err(other) => panic!("expected InvalidConfig, got {other:?}"),
        Ok(_) => panic!("built with an empty platform store"),
    }

    // A store without the member's CA: the member is not trusted.
    set_store(&c.other_ca);
    match client().build() {
        Err(e @ Error::Connect { .. }) => {
            assert!(e.to_string().contains("not trusted"), "{e}");
        }
        Err(other) => panic!("expected Connect, got {other:?}"),
        Ok(_) => panic!("trusted a member whose CA is not in the store"),
    }
    // A CA file does not need the platform store at all.
    client().etcd_tls_ca_file(&c.ca).build().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
