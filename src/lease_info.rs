//! [`LeaseInfo`]: one row of the lease table, as an operator needs to see it.

use std::time::{Duration, SystemTime};

/// Where a lease stands, by the database clock at the time it was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseStatus {
    /// Held, and runs out in `expires_in` unless renewed.
    Held {
        /// Time left on the lease.
        expires_in: Duration,
    },
    /// Not released, but past its expiry: free to be taken (its holder died, hung
    /// or lost its connection).
    Expired {
        /// How long ago it expired.
        ago: Duration,
    },
    /// Released by its holder.
    Released {
        /// When.
        at: SystemTime,
    },
}

/// One lease, from [`LockClient::leases`](crate::LockClient::leases) or
/// [`LockClient::lease`](crate::LockClient::lease).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct LeaseInfo {
    /// The lock's name.
    pub name: String,
    /// The owner id of the last holder ([`LockClient::owner_id`](crate::LockClient::owner_id)).
    pub owner: String,
    /// The metadata stored with the last grant.
    pub metadata: Option<String>,
    /// The last grant's fencing token.
    pub fencing_token: u64,
    /// The database backend pid of the last holder's session.
    pub holder_pid: i32,
    /// When the last grant was made.
    pub acquired_at: SystemTime,
    /// When it was last renewed.
    pub renewed_at: SystemTime,
    /// When it expires (or expired).
    pub expires_at: SystemTime,
    /// Held, expired or released.
    pub status: LeaseStatus,
    /// Whether the holder's session still holds the lock's advisory lock.
    pub holder_alive: bool,
}
