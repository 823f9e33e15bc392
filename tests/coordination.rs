//! The coordination primitives' suite, run against every backend that grants
//! shared leases.

mod common;

use lockbox::{LockClient, MemoryBackend};

coordination_suite!(memory, LockClient::with_backend(MemoryBackend::global()));
coordination_suite!(redis, LockClient::redis(common::redis_server::redis_url()));
