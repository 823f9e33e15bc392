//! placeholder
#![warn(missing_docs, missing_debug_implementations)]

mod backend;
mod client;
mod config;
mod error;
mod lease;
mod lock;
mod name;
mod options;
mod renewal;

pub use backend::postgres::advisory_key;
pub use client::LockClient;
pub use config::{LockClientBuilder, MAX_POOL_SIZE, MAX_TTL, MIN_RENEW_INTERVAL, MIN_TTL};
pub use error::{BoxError, Error, LostReason, Result};
pub use lock::Lock;
pub use name::MAX_NAME_LEN;
pub use options::{AcquireOptions, MAX_METADATA_LEN};
