//! etcd over TLS (`https://` endpoints) against a real etcd member that serves
//! its clients over TLS only and requires a client certificate
//! (`--cert-file`, `--key-file`, `--trusted-ca-file`, `--client-cert-auth`),
//! with certificates made by the `openssl` CLI: the conformance suite over
//! mutual TLS, and each way the handshake must fail — a CA that did not issue
//! the member's certificate, a host the certificate is not valid for, no
//! client certificate, one the member does not trust, a port without TLS —
//! with a message that names the problem and the setting that fixes it.

use crate::common;

use common::etcd_server::{etcd_certs, single_tls};
use common::unique;
use lockbox::{Error, LockClient, LockClientBuilder};

/// A client of the TLS member, by the name its certificate is valid for, the
/// CA given, with a client certificate: mutual TLS.
fn mtls() -> LockClientBuilder {
    let c = &etcd_certs().certs;
    LockClient::etcd(&single_tls().endpoints())
        .etcd_tls_ca_file(&c.ca)
        .etcd_tls_client_cert(&c.client_cert, &c.client_key)
}

conformance_suite!(etcd_mtls, mtls());

/// The message of a `build()` that must fail to connect.
fn connect_error(builder: LockClientBuilder) -> String {
    let err = builder.build().expect_err("the connection must be refused");
    assert!(matches!(err, Error::Connect { .. }), "{err:?}");
    eprintln!("refused as expected: {err}");
    err.to_string()
}

/// Mutual TLS: a lock is taken, its token is a revision, and health reaches
/// the member at the (https://) client URL the member advertises.
#[test]
fn mutual_tls_grants_locks_and_reports_health() {
    let client = mtls().build().expect("mutual TLS");
    let name = unique("etcd-tls");
    let lock = client.lock(&name).expect("lock over TLS");
    assert!(lock.fencing_token() > 0);
    let lease = client.lease(&name).expect("listing over TLS");
    assert_eq!(lease.map(|l| l.fencing_token), Some(lock.fencing_token()));
    lock.release().expect("release over TLS");
    let health = client.health();
    assert!(health.is_healthy(), "{health}");
    let cluster = health.database.cluster.expect("cluster health");
    assert!(
        cluster.members.iter().all(|m| m.reachable
            && m.client_url
                .as_deref()
                .is_some_and(|u| u.starts_with("https://"))),
        "{cluster:?}"
    );
}

/// A CA that did not issue the member's certificate: refused, saying the
/// certificate is not trusted and which setting gives the CA.
#[test]
fn a_certificate_from_another_ca_is_refused() {
    let c = &etcd_certs().certs;
    let message = connect_error(
        LockClient::etcd(&single_tls().endpoints())
            .etcd_tls_ca_file(&c.other_ca)
            .etcd_tls_client_cert(&c.client_cert, &c.client_key),
    );
    assert!(
        message.contains("certificate is not trusted") && message.contains("etcd_tls_ca_file"),
        "{message}"
    );
}

/// The certificate is for `localhost`; `127.0.0.1` is not a name it lists.
#[test]
fn a_host_name_mismatch_is_refused() {
    let c = &etcd_certs().certs;
    let port = single_tls().members[0].client_port;
    let message = connect_error(
        LockClient::etcd(&format!("https://127.0.0.1:{port}"))
            .etcd_tls_ca_file(&c.ca)
            .etcd_tls_client_cert(&c.client_cert, &c.client_key),
    );
    assert!(message.contains("host name mismatch"), "{message}");
}

/// `--client-cert-auth` without a client certificate: the member refuses, and
/// the message says a client certificate is required and how to give one.
#[test]
fn a_missing_client_certificate_is_named() {
    let c = &etcd_certs().certs;
    let message =
        connect_error(LockClient::etcd(&single_tls().endpoints()).etcd_tls_ca_file(&c.ca));
    // Over TLS 1.3 the member's alert or its closing of the connection may
    // be seen first: either way the message names the missing certificate
    // and the setting.
    assert!(
        (message.contains("requires a client certificate")
            || message.contains("no client certificate is given"))
            && message.contains("set etcd_tls_client_cert"),
        "{message}"
    );
}

/// A client certificate from a CA the member does not trust is refused.
#[test]
fn a_client_certificate_from_another_ca_is_refused() {
    let c = &etcd_certs().certs;
    let message = connect_error(
        LockClient::etcd(&single_tls().endpoints())
            .etcd_tls_ca_file(&c.ca)
            .etcd_tls_client_cert(&c.other_client_cert, &c.other_client_key),
    );
    assert!(
        (message.contains("refused the client certificate")
            || message.contains("does not trust the client certificate"))
            && message.contains("--trusted-ca-file"),
        "{message}"
    );
}

/// An https:// endpoint on a port that speaks plain HTTP: refused, never
/// answered in plain text.
#[test]
fn https_to_a_plain_text_port_is_refused() {
    let c = &etcd_certs().certs;
    let port = single_tls().members[0].admin_port;
    let message = connect_error(
        LockClient::etcd(&format!("https://localhost:{port}"))
            .etcd_tls_ca_file(&c.ca)
            .etcd_tls_client_cert(&c.client_cert, &c.client_key),
    );
    assert!(message.contains("does not serve TLS"), "{message}");
}

/// Bad files fail `build()` with the setting and the path named, never the
/// key's contents; the builder's `Debug` shows paths only.
#[test]
fn bad_files_are_named_without_the_key() {
    let c = &etcd_certs().certs;
    let key = std::fs::read_to_string(&c.client_key).unwrap();
    let secret: String = key
        .lines()
        .find(|l| !l.starts_with("-----"))
        .unwrap()
        .chars()
        .take(40)
        .collect();
    let endpoints = single_tls().endpoints();
    // A key that is not the certificate's.
    let builder = LockClient::etcd(&endpoints)
        .etcd_tls_ca_file(&c.ca)
        .etcd_tls_client_cert(&c.client_cert, &c.other_client_key);
    assert!(!format!("{builder:?}").contains(&secret));
    let err = builder.build().unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, Error::InvalidConfig(_)), "{err:?}");
    assert!(
        message.contains("etcd_tls_client_cert") && message.contains(&c.other_client_key),
        "{message}"
    );
    assert!(!message.contains(&secret), "{message}");
    // The key given as the CA file: no certificate in it.
    let err = LockClient::etcd(&endpoints)
        .etcd_tls_ca_file(&c.client_key)
        .build()
        .unwrap_err();
    assert!(matches!(err, Error::InvalidConfig(_)), "{err:?}");
    assert!(!err.to_string().contains(&secret), "{err}");
    // A file that does not exist.
    let err = LockClient::etcd(&endpoints)
        .etcd_tls_ca_file("/nonexistent/lockbox-ca.pem")
        .build()
        .unwrap_err();
    assert!(
        matches!(&err, Error::InvalidConfig(m) if m.contains("etcd_tls_ca_file")),
        "{err:?}"
    );
    // The etcd settings on another store's client are never ignored.
    let err = LockClient::builder("postgres://localhost/postgres")
        .etcd_tls_ca_file(&c.ca)
        .build()
        .unwrap_err();
    assert!(
        matches!(&err, Error::InvalidConfig(m) if m.contains("etcd clients only")),
        "{err:?}"
    );
}

/// An https:// endpoint that accepts connections and never answers the TLS
/// hello: `build()` gives up by itself within `connect_timeout`, the
/// handshake included, saying there was no answer (the 60 s only keeps a
/// broken bound from hanging the test run).
#[test]
fn a_silent_https_port_is_given_up_on() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let ca = etcd_certs().certs.ca.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let result = LockClient::etcd(&format!("https://127.0.0.1:{port}"))
            .etcd_tls_ca_file(&ca)
            .connect_timeout(common::ms(500))
            .build()
            .map(|_| ());
        let _ = tx.send(result);
    });
    let result = rx
        .recv_timeout(std::time::Duration::from_secs(60))
        .expect("build() must end by itself, bounded by connect_timeout");
    let err = result.expect_err("nothing answered");
    assert!(matches!(err, Error::Connect { .. }), "{err:?}");
    assert!(err.to_string().contains("no answer within"), "{err}");
    drop(listener);
}
