//! Distributed locks for threaded, blocking Rust programs, backed by PostgreSQL.
//!
//! lockbox makes sure only one process at a time works on a shared resource, and
//! tells a holder *immediately* when that stops being true. There is no async in
//! the API: calls block, guards release on `Drop`, and no runtime is needed.
//!
//! # The model
//!
//! A [`LockClient`] owns a pool of connections, a lease table, one renewal
//! scheduler thread (with I/O workers it starts as needed) and, when an event
//! handler is set, one event thread. Acquiring a lock takes, in one statement on a
//! database session, a PostgreSQL *session advisory lock* for the name and writes
//! the name's *lease row*: owner, fencing token, holder session, and an expiry by
//! the database's own clock. Held locks share sessions (an idle pooled connection
//! is taken first; then a session that already holds others, up to
//! [`LockClientBuilder::locks_per_session`]), so thousands of locks need only a
//! handful of connections. A worker extends the leases well before they run out
//! (every third of the TTL by default), one statement per session and round for
//! every lease on it, one request in flight per session. Locks on one session
//! share its fate (if it ends, all of them are lost), never a lease: one lease
//! lost or held up by another transaction costs its neighbours nothing.
//! [`AcquireOptions::dedicated_session`] gives a lock a session of its own.
//!
//! - **The lease row is the authority.** A name is free when its lease is released
//!   or expired by `clock_timestamp()`. The advisory lock adds atomic exclusion,
//!   server-side waiting and release on disconnect. If a holder's session dies, its
//!   lease still runs to its end before anyone else is granted the name
//!   (*lock-delay*). If a holder's lease expires while its session lives on (the
//!   process paused or hung), the next acquirer terminates that session and takes
//!   over.
//! - **Fencing tokens** ([`Lock::fencing_token`]) strictly increase per name, across
//!   release, expiry, crash and database restart (grants commit durably). Pass the
//!   token with each write to the protected resource and reject lower tokens there:
//!   that is what makes a paused, former holder harmless.
//! - **A holder never believes it holds a lock the database could give to someone
//!   else.** Its local deadline is kept on the boot-time clock (which counts
//!   suspended time), measured from *before* the renew was sent (for a grant: the
//!   acquire statement's send time plus the wait the server measured in it, less a
//!   clock-rate allowance), minus a margin, so it ends before the lease does.
//!   [`Lock::ensure_held`] checks it without a round trip, and [`Lock::lost`] is a
//!   channel that fires on loss — at the deadline at the latest, from a scheduler
//!   that does no I/O, however stuck a statement is.
//! - **Renewal and release check ownership** (name, owner, token) and never steal or
//!   re-create a lease. A lost lock is reported, never silently re-acquired.
//! - **No connection goes back to the pool holding an advisory lock**: a session
//!   that might is closed instead.
//!
//! Locks are not reentrant. PgBouncer in transaction-pooling mode is not supported
//! (session advisory locks need a session). PostgreSQL 14 or later is required.
//!
//! # Other stores
//!
//! The client, guard, renewal thread, metrics and health are written against
//! [`backend::Backend`]. Besides PostgreSQL, lockbox ships an in-memory store
//! ([`LockClient::memory`], for single-process programs and unit tests) and, with
//! the `redis` feature, a single-server Redis store (`LockClient::redis`); any
//! other store can be plugged in with [`LockClient::with_backend`]. One
//! conformance suite checks that they all behave alike; the README compares
//! what each guarantees.
//!
//! # Example: take a lock, use its token, release it
//!
//! ```no_run
//! use lockbox::LockClient;
//! use std::time::Duration;
//!
//! # fn write_report(_token: u64) -> Result<(), lockbox::Error> { Ok(()) }
//! # fn main() -> Result<(), lockbox::Error> {
//! let client = LockClient::builder("postgres://app@127.0.0.1/app")
//!     .ttl(Duration::from_secs(30))
//!     .build()?;
//!
//! if let Some(lock) = client.try_lock("reports/nightly")? {
//!     write_report(lock.fencing_token())?;
//!     lock.release()?;
//! }
//! # Ok(()) }
//! ```
//!
//! # Example: wait for a lock and stop work when it is lost
//!
//! ```no_run
//! use crossbeam_channel::{select, tick};
//! use std::time::Duration;
//!
//! # fn main() -> Result<(), lockbox::Error> {
//! # let client = lockbox::LockClient::builder("postgres://app@127.0.0.1/app").build()?;
//! let lock = client.lock_timeout("invoices", Duration::from_secs(5))?;
//! let step = tick(Duration::from_millis(100));
//! for _ in 0..50 {
//!     select! {
//!         recv(lock.lost()) -> reason => {
//!             eprintln!("lost the lock: {reason:?}");
//!             break;
//!         }
//!         recv(step) -> _ => { /* one bounded step of work, fenced by the token */ }
//!     }
//! }
//! # Ok(()) }
//! ```

#![warn(missing_docs, missing_debug_implementations)]

pub mod backend;
mod client;
mod clock;
mod config;
mod election;
mod error;
mod event;
mod guards;
mod health;
mod lease;
mod lease_info;
mod lock;
mod lock_set;
mod metrics;
mod name;
mod options;
mod renewal;
mod rwlock;
mod semaphore;
mod telemetry;

/// The PostgreSQL driver whose transactions [`Lock::fence`] takes, re-exported
/// so that callers use the same version.
pub use postgres;

pub use backend::LeaseKind;
pub use backend::MemoryBackend;
pub use backend::postgres::FENCE_SQLSTATE;
pub use backend::postgres::advisory_key;
pub use client::LockClient;
pub use config::{
    LockClientBuilder, MAX_LOCKS_PER_SESSION, MAX_POOL_SIZE, MAX_TTL, MIN_RENEW_INTERVAL, MIN_TTL,
};
pub use election::{Election, Leader, LeaderWatch, Leadership};
pub use error::{BoxError, Error, LostReason, Result};
pub use event::{
    AcquiredEvent, HandleEvent, LostEvent, ReleasedEvent, RenewalFailedEvent, RenewedEvent,
};
pub use health::{
    ClusterHealth, DatabaseHealth, Health, HealthStatus, MemberHealth, PoolHealth, RECENT_LOSS,
    RenewalHealth, SLOW_DATABASE,
};
pub use lease_info::{LeaseEvent, LeaseEventKind, LeaseInfo, LeaseStatus};
pub use lock::Lock;
pub use lock_set::{LockSet, MAX_LOCK_SET};
pub use metrics::{HISTOGRAM_BUCKETS, HistogramSnapshot, MetricsSnapshot};
pub use name::MAX_NAME_LEN;
pub use options::{AcquireOptions, MAX_METADATA_LEN};
pub use rwlock::{ReadGuard, RwLock, WriteGuard};
pub use semaphore::{MAX_PERMITS, Permit, Semaphore};

/// The README's examples, compiled as doctests so they cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

#[cfg(test)]
mod test {
    use super::*;

    fn is_send<T: Send>() {}
    fn is_sync<T: Sync>() {}

    #[test]
    fn public_types_are_send_and_sync_as_promised() {
        is_send::<LockClient>();
        is_sync::<LockClient>();
        is_send::<Lock>();
        is_send::<Error>();
        is_sync::<Error>();
        is_send::<AcquireOptions>();
    }

    /// The coordination primitives are handles to share between threads
    /// (`Send + Sync`, like the client); their guards and watches can move to
    /// another thread (a worker that holds a permit, a thread that waits on a
    /// leader watch) and be shared by reference.
    #[test]
    fn coordination_types_are_send_and_sync() {
        is_send::<Semaphore>();
        is_sync::<Semaphore>();
        is_send::<RwLock>();
        is_sync::<RwLock>();
        is_send::<Election>();
        is_sync::<Election>();
        is_send::<Permit>();
        is_sync::<Permit>();
        is_send::<ReadGuard>();
        is_sync::<ReadGuard>();
        is_send::<WriteGuard>();
        is_sync::<WriteGuard>();
        is_send::<Leadership>();
        is_sync::<Leadership>();
        is_send::<LockSet>();
        is_sync::<LockSet>();
        is_send::<LeaderWatch>();
        is_sync::<LeaderWatch>();
        is_send::<Leader>();
        is_sync::<Leader>();
        is_send::<LeaseKind>();
        is_sync::<LeaseKind>();
    }
}
