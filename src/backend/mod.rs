//! The internal interface between the backend-agnostic client (guard, renewal thread)
//! and a lock store. Everything store-specific lives in a submodule.

use std::fmt;
use std::time::{Duration, Instant};

use crate::error::{LostReason, Result};
use crate::health::{DatabaseHealth, PoolHealth};
use crate::lease_info::LeaseInfo;
use crate::telemetry::Telemetry;

pub(crate) mod postgres;

/// One acquire request, already validated.
#[derive(Debug)]
pub(crate) struct AcquireRequest<'a> {
    pub name: &'a str,
    pub owner: &'a str,
    pub ttl: Duration,
    pub metadata: Option<&'a str>,
    /// `None`: do not wait. `Some(None)`: wait forever. `Some(Some(t))`: wait until `t`.
    pub wait_until: Option<Option<Instant>>,
    pub telemetry: &'a Telemetry,
}

/// Identifies one lease for ownership checks.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LeaseRef<'a> {
    pub name: &'a str,
    pub owner: &'a str,
    pub token: u64,
}

/// A granted lock: the session that holds it and its lease.
pub(crate) struct Grant {
    pub session: Box<dyn Session>,
    pub token: u64,
    /// When the granting statement was sent: the lease runs from no earlier than this.
    pub sent_at: Instant,
    /// Whether the acquire had to wait for a holder (or a dead holder's lease).
    pub waited: bool,
}

/// The result of a renewal that reached the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Renewal {
    Renewed,
    Lost(LostReason),
}

/// The result of a release that reached the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Release {
    /// The lease was ours and live; it is now marked released.
    Released,
    /// The lease was ours but had already run out; it is marked released.
    WasExpired,
    /// The lease was no longer ours; nothing was changed.
    NotOwner,
    /// The session holding the lock had already ended; the lock was freed with it.
    SessionLost,
}

/// A lock store.
pub(crate) trait Backend: Send + Sync + fmt::Debug {
    /// Acquires the lock if it is free, waiting as `req.wait_until` allows.
    /// `Ok(None)`: not acquired within the wait.
    fn acquire(&self, req: &AcquireRequest<'_>) -> Result<Option<Grant>>;

    /// Checks the store on a fresh connection, answering within `timeout`.
    fn probe(&self, timeout: Duration) -> DatabaseHealth;

    /// The connection pool's state.
    fn pool_health(&self, telemetry: &Telemetry) -> PoolHealth;

    /// The leases in the store: all of them, or the one of `name`.
    fn leases(&self, name: Option<&str>) -> Result<Vec<LeaseInfo>>;
}

/// The store-side handle of one held lock. Dropping it without [`Session::release`]
/// abandons the lock: the store must free it (for PostgreSQL: the connection is closed,
/// never returned to the pool, so its advisory lock goes with it).
pub(crate) trait Session: Send + fmt::Debug {
    /// Extends the lease by `ttl` from now, only if it is still ours and live.
    /// `Err` means the outcome is unknown (a transient failure worth retrying).
    fn renew(&mut self, lease: &LeaseRef<'_>, ttl: Duration) -> Result<Renewal>;

    /// Marks the lease released if it is still ours and frees the lock.
    fn release(self: Box<Self>, lease: &LeaseRef<'_>) -> Result<Release>;
}
