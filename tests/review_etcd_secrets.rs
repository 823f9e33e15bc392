//! Credentials typed into etcd endpoints never show, whatever characters the
//! password holds.

use lockbox::LockClient;

/// A password with a comma in it: the endpoint list is split on commas, so
/// the password's first part looked like a host:port of its own and was
/// echoed in the error (and in the builder's `Debug`).
#[test]
fn a_password_with_a_comma_never_shows() {
    let url = "http://bob:hun,ter2@127.0.0.1:1";
    let builder = LockClient::etcd(url);
    let shown = format!("{builder:?}");
    assert!(!shown.contains("hun") && !shown.contains("ter2"), "{shown}");
    let e = builder.build().unwrap_err();
    let (text, debug) = (e.to_string(), format!("{e:?}"));
    for s in [&text, &debug] {
        assert!(!s.contains("hun") && !s.contains("ter2"), "{s}");
    }
}

/// Same, with the credentials in the second endpoint of the list.
#[test]
fn credentials_in_a_later_endpoint_never_show() {
    let url = "http://127.0.0.1:1,http://bob:s3cr,et@127.0.0.1:2";
    let builder = LockClient::etcd(url);
    let shown = format!("{builder:?}");
    assert!(!shown.contains("s3cr"), "{shown}");
    let e = builder.build().unwrap_err();
    assert!(!e.to_string().contains("s3cr"), "{e}");
    assert!(!format!("{e:?}").contains("s3cr"), "{e:?}");
}
