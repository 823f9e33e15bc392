//! The shared conformance suites (exclusive locks, coordination) against a single throwaway etcd member
//! (started by the harness on free loopback ports). Apart from the other
//! stores' suites (`tests/conformance.rs` is a binary of its own), so its
//! clients do not share the machine with them.

use crate::common;

use lockbox::LockClient;

conformance_suite!(etcd, LockClient::etcd(&common::etcd_server::etcd_url()));

// The coordination primitives' suite (readers and writers, semaphores, lock
// sets, elections watched) on the same member.
coordination_suite!(
    etcd_coordination,
    LockClient::etcd(&common::etcd_server::etcd_url())
);
