//! A private key file mangled as keys often are (its newlines turned into
//! spaces by `echo $KEY > file`, or into the two characters `\n` by a JSON or
//! vault export) must not reach any error: the PEM parser's own errors carry
//! the file's bytes (printed as a list of numbers), and they were shown as is
//! for etcd's, Redis's and PostgreSQL's client keys.

use crate::common;

use common::tls::make_certs;
use common::*;
use lockbox::LockClient;

/// Base64 of a key's body, recognisable in every form it could leak in.
const SECRET: &str = "U2VjcmV0S2V5TWF0ZXJpYWxOZXZlclNob3duSW5BbnlFcnJvcg==";

/// The forms the secret could take in a message: as text, and as the
/// decimal bytes the parser's errors print.
fn leaks(message: &str) -> bool {
    let bytes: Vec<String> = SECRET.as_bytes()[..12].iter().map(u8::to_string).collect();
    message.contains(&SECRET[..12]) || message.contains(&bytes.join(", "))
}

#[test]
fn a_mangled_key_never_appears_in_an_error() {
    let dir = std::env::temp_dir().join(unique("lockbox-keyleak"));
    std::fs::create_dir_all(&dir).unwrap();
    let certs = make_certs(&dir).unwrap();
    let key = format!("-----BEGIN PRIVATE KEY-----\n{SECRET}\n-----END PRIVATE KEY-----\n");
    for (form, text) in [
        ("spaces", key.replace('\n', " ")),
        ("escaped", key.replace('\n', "\\n")),
    ] {
        let bad = dir.join(format!("{form}.key")).display().to_string();
        std::fs::write(&bad, text).unwrap();
        let mut messages = Vec::new();
        // As the key, with a good certificate; and passed as the certificate
        // by mistake.
        for (cert, key) in [(&certs.client_cert, &bad), (&bad, &bad)] {
            let etcd = LockClient::etcd("https://localhost:1")
                .etcd_tls_client_cert(cert, key)
                .build()
                .unwrap_err();
            let redis = LockClient::redis("rediss://localhost:1")
                .redis_tls_client_cert(cert, key)
                .build()
                .unwrap_err();
            let pg = LockClient::builder(&format!(
                "host=localhost port=1 user=u dbname=d sslmode=require sslcert={cert} sslkey={key}"
            ))
            .build()
            .unwrap_err();
            for e in [etcd, redis, pg] {
                messages.push((form, e.to_string(), format!("{e:?}")));
            }
        }
        for (form, display, debug) in &messages {
            assert!(
                !leaks(display) && !leaks(debug),
                "the key ({form}) leaked: {display} / {debug}"
            );
            assert!(
                display.contains(&bad),
                "the error does not name the file: {display}"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
