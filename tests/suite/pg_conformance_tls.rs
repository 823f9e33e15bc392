//! The shared conformance suite over PostgreSQL connections that are not plain
//! TCP: TLS (`verify-full` against a `hostssl`-only server) and a Unix-domain
//! socket. Apart from the plain-TCP suite (`tests/conformance.rs`, a binary of
//! its own), so that the throwaway cluster's start and these clients do not
//! load the machine while that suite (short TTLs) runs.

use crate::common;

use lockbox::LockClient;

conformance_suite!(
    postgres_tls,
    LockClient::builder(&common::tls::tls_server().verified_url())
);
conformance_suite!(
    postgres_socket,
    LockClient::builder(&common::tls::tls_server().socket_url())
);
