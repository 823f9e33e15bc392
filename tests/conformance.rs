//! One behavioural suite, run against every backend.

mod common;

use common::*;
use lockbox::{LockClient, LockClientBuilder, MemoryBackend};

macro_rules! conformance {
    ($backend:ident, $factory:expr) => {
        mod $backend {
            use super::*;
            use common::conformance as suite;

            fn factory() -> LockClientBuilder {
                $factory
            }

            #[test]
            fn exclusion_under_contention() {
                suite::exclusion_under_contention(factory);
            }
            #[test]
            fn try_timeout_and_blocking() {
                suite::try_timeout_and_blocking(factory);
            }
            #[test]
            fn fencing_tokens_increase() {
                suite::fencing_tokens_increase(factory);
            }
            #[test]
            fn expiry_when_renewal_stops() {
                suite::expiry_when_renewal_stops(factory);
            }
            #[test]
            fn renewal_keeps_it_alive() {
                suite::renewal_keeps_it_alive(factory);
            }
            #[test]
            fn release_and_drop() {
                suite::release_and_drop(factory);
            }
            #[test]
            fn invalid_input() {
                suite::invalid_input(factory);
            }
            #[test]
            fn a_long_wait_yields_a_held_lock() {
                suite::a_long_wait_yields_a_held_lock(factory);
            }
            #[test]
            fn inspection() {
                suite::inspection(factory);
            }
        }
    };
}

conformance!(postgres, LockClient::builder(database_url()));
conformance!(memory, LockClient::with_backend(shared_memory()));

/// One in-memory store for the whole test process (names are unique per test).
fn shared_memory() -> MemoryBackend {
    MemoryBackend::global()
}
