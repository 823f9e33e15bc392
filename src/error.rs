//! The error type shared by every operation, and the reasons a lock can be lost.

use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// A shared underlying error (a driver or pool error), kept as a `source()`.
/// Shared rather than boxed so that [`Error`] is `Clone`.
pub type BoxError = Arc<dyn StdError + Send + Sync + 'static>;

/// A `Result` whose error defaults to [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a held lock stopped being held before it was released.
///
/// Reported by [`Lock::lost`](crate::Lock::lost), [`Lock::lost_reason`](crate::Lock::lost_reason)
/// and inside [`Error::LockLost`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum LostReason {
    /// The lock's local deadline passed before a renewal succeeded (renewals failed,
    /// were too slow, or the process was paused). Another holder may now be granted
    /// the lock once the database lease ends.
    Expired,
    /// The database session that held the lock ended: the backend was terminated,
    /// the server restarted, or the connection broke. The session-level advisory lock
    /// went with it.
    SessionLost,
    /// The lease row no longer names this holder: it expired and was taken over, or was
    /// changed by someone else. Nothing of the new holder was touched.
    NotOwner,
    /// The client's renewal thread stopped (it panicked, or the client shut down while
    /// the lock was still registered), so the lease could not be kept alive.
    RenewalStopped,
}

impl fmt::Display for LostReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LostReason::Expired => "the lease's local deadline passed before it could be renewed",
            LostReason::SessionLost => "the database session holding the lock ended",
            LostReason::NotOwner => "the lease is no longer owned by this holder",
            LostReason::RenewalStopped => "the renewal thread stopped",
        })
    }
}

/// Everything that can go wrong in lockbox.
///
/// Variants a caller is expected to branch on have predicates
/// ([`is_timeout`](Error::is_timeout), [`is_lock_lost`](Error::is_lock_lost), …).
/// New variants may be added in minor releases.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The lock was not acquired within the allowed wait.
    #[error("timed out after {waited:?} waiting for lock {name:?}")]
    Timeout {
        /// The lock's name.
        name: String,
        /// How long the call waited.
        waited: Duration,
    },

    /// The lock is no longer held by this guard (or was never confirmed held).
    #[error("lock {name:?} was lost: {reason}")]
    LockLost {
        /// The lock's name.
        name: String,
        /// Why it was lost.
        reason: LostReason,
    },

    /// The lock name is not acceptable (empty, too long, or containing NUL).
    #[error("invalid lock name: {0}")]
    InvalidName(String),

    /// A configuration value or per-call option is out of range or malformed.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),

    /// The database could not be reached. `target` names host, port, database and user,
    /// never the password.
    #[error("could not connect to {target}: {}", describe(source.as_ref()))]
    Connect {
        /// The connection target, without credentials.
        target: String,
        /// The underlying error.
        #[source]
        source: BoxError,
    },

    /// No pooled connection became free in time: every connection is in use (most
    /// likely by held locks).
    #[error(
        "no database connection became available within {waited:?} (pool of {pool_size} exhausted)"
    )]
    PoolTimeout {
        /// How long the call waited for a connection.
        waited: Duration,
        /// The pool's maximum size.
        pool_size: u32,
    },

    /// The database role lacks a privilege lockbox needs for this operation; the message
    /// names it.
    #[error("insufficient privilege: {0}")]
    InsufficientPrivilege(String),

    /// The lease table does not exist and automatic creation is turned off.
    #[error("lease table {table} does not exist and automatic creation is disabled")]
    MissingTable {
        /// The table name as configured.
        table: String,
    },

    /// The database server is not one lockbox supports; the message says why.
    #[error("unsupported database server: {0}")]
    Unsupported(String),

    /// The client's renewal thread is not running, so no new lock can be kept alive.
    #[error("the renewal thread is not running")]
    RenewalStopped,

    /// The database server's lock table is full: it holds about
    /// `max_locks_per_transaction × (max_connections + max_prepared_transactions)`
    /// locks for all sessions together (6 400 with PostgreSQL's defaults), and
    /// every held lock takes one. Nothing was acquired. Raise
    /// `max_locks_per_transaction` (a server restart) or hold fewer locks.
    #[error(
        "the database server's lock table is full (raise max_locks_per_transaction, or hold \
         fewer locks): {}",
        describe(.0.as_ref())
    )]
    LockTableFull(#[source] BoxError),

    /// Any other database or driver error. Its `Display` carries the server's
    /// message, SQLSTATE, detail and hint where the server sent them.
    #[error("database error: {}", describe(.0.as_ref()))]
    Database(#[source] BoxError),
}

/// The server's own words for a database error: message, SQLSTATE, detail and
/// hint. Drivers print only "db error" for these, leaving the substance behind
/// `source()`.
fn describe(err: &(dyn StdError + Send + Sync + 'static)) -> String {
    let Some(db) = err
        .downcast_ref::<postgres::Error>()
        .and_then(|e| e.as_db_error())
    else {
        return err.to_string();
    };
    let mut out = format!(
        "{}: {} (SQLSTATE {})",
        db.severity(),
        db.message(),
        db.code().code()
    );
    if let Some(detail) = db.detail() {
        out.push_str(&format!("; detail: {detail}"));
    }
    if let Some(hint) = db.hint() {
        out.push_str(&format!("; hint: {hint}"));
    }
    out
}

impl Error {
    /// Wraps a driver or pool error as [`Error::Database`].
    pub(crate) fn database(err: impl StdError + Send + Sync + 'static) -> Error {
        Error::Database(Arc::new(err))
    }

    /// Returns `true` for [`Error::Timeout`].
    pub fn is_timeout(&self) -> bool {
        matches!(self, Error::Timeout { .. })
    }

    /// Returns `true` for [`Error::LockLost`].
    pub fn is_lock_lost(&self) -> bool {
        matches!(self, Error::LockLost { .. })
    }

    /// Returns `true` for [`Error::PoolTimeout`].
    pub fn is_pool_timeout(&self) -> bool {
        matches!(self, Error::PoolTimeout { .. })
    }

    /// Returns `true` for [`Error::InvalidName`] and [`Error::InvalidConfig`]: the call
    /// was refused before anything was sent to the database.
    pub fn is_invalid_input(&self) -> bool {
        matches!(self, Error::InvalidName(_) | Error::InvalidConfig(_))
    }

    /// The five-character SQLSTATE of the underlying database error, if there is one.
    pub fn sqlstate(&self) -> Option<&str> {
        let source: &(dyn StdError + 'static) = match self {
            Error::Connect { source, .. }
            | Error::Database(source)
            | Error::LockTableFull(source) => source.as_ref(),
            _ => return None,
        };
        source
            .downcast_ref::<postgres::Error>()
            .and_then(|e| e.code())
            .map(|c| c.code())
    }
}
