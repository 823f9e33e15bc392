//! The shared conformance suite over Redis connections that are not plain
//! TCP as the default user: TLS (`rediss://` against a TLS-only server, the
//! CA given), a Unix-domain socket, and an ACL user with only the README's
//! rule over TLS. Apart from the plain-TCP suite (`tests/conformance.rs`, a
//! binary of its own), so that these clients do not load the machine while
//! that suite (short TTLs) runs.

use crate::common;

use common::redis_server::{certs, tls_redis};
use lockbox::LockClient;

conformance_suite!(redis_tls, tls_redis().builder());
conformance_suite!(redis_socket, LockClient::redis(&tls_redis().socket_url()));
conformance_suite!(
    redis_acl_tls,
    LockClient::redis(&tls_redis().acl_url()).redis_tls_ca_file(&certs().ca)
);
