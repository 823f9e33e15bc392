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
    /// The kind of lease: an exclusive lock, a reader, or a semaphore permit.
    /// A name with shared leases lists one `LeaseInfo` per live holder.
    pub kind: crate::backend::LeaseKind,
}

/// What a [`LeaseEvent`] records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum LeaseEventKind {
    /// The name was granted (with this token, to this owner).
    Granted,
    /// The holder released the lease (possibly after it had expired).
    Released,
    /// The lease had expired unreleased and was taken over by the next grant
    /// (recorded with that grant, with the expired lease's token and owner).
    Expired,
    /// The holder's session was terminated as a zombie (every lease it held
    /// had expired); one event per lease it still held.
    ZombieTerminated,
    /// An operator ended the lease ([`LockClient::force_release`](crate::LockClient::force_release)).
    ForceReleased,
    /// An event this version of lockbox does not know (written by a newer
    /// one, or by hand): its text as stored.
    Other,
}

/// One event of a name's lease history, from
/// [`LockClient::history`](crate::LockClient::history).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct LeaseEvent {
    /// The lock's name.
    pub name: String,
    /// The grant's fencing token.
    pub fencing_token: u64,
    /// The grant's owner id.
    pub owner: String,
    /// The grant's metadata.
    pub metadata: Option<String>,
    /// What happened.
    pub kind: LeaseEventKind,
    /// The event as stored (`granted`, `released`, `expired`,
    /// `zombie_terminated`, `force_released`, …).
    pub event: String,
    /// When, by the database clock.
    pub at: SystemTime,
    /// The database backend pid of the grant's session.
    pub holder_pid: Option<i32>,
}
