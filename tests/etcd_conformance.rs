//! The shared conformance suite against a single throwaway etcd member
//! (started by the harness on free loopback ports). A test binary of its own,
//! so its clients do not share the machine with the other stores' suites.

mod common;

use lockbox::LockClient;

conformance_suite!(etcd, LockClient::etcd(&common::etcd_server::etcd_url()));
