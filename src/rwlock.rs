//! [`RwLock`]: many readers or one writer per name.

use std::fmt;
use std::time::Duration;

use crate::backend::LeaseKind;
use crate::client::LockClient;
use crate::error::Result;
use crate::guards::{acquire_within, lock_guard};
use crate::options::AcquireOptions;

/// A distributed reader-writer lock: any number of readers, or one writer, per
/// name, across every client of the store.
///
/// Each reader holds a lease of its own ([`ReadGuard`]), renewed, lost and
/// released on its own like a [`Lock`](crate::Lock); the writer's
/// [`WriteGuard`] is an exclusive lease, the same as a `Lock` of the name. **A
/// waiting writer is not starved**: once a writer waits for the name, new
/// readers queue behind it (in every store). So do not nest read locks of one
/// name: a second read lock taken while holding the first waits behind a
/// writer that waits for the first, as with any fair reader-writer lock.
///
/// **Fencing.** Every grant of the name, reader or writer, draws its token from
/// the name's one sequence: a writer's token is above the token of every reader
/// and writer granted before it. A reader's token is a snapshot marker: a
/// resource that records the token of the last write it accepted can refuse a
/// *write* fenced with a lower token, and a reader that must not see a later
/// writer's changes can check that the last accepted write token is below its
/// own (readers themselves do not write, so they need no exclusion among
/// themselves). With PostgreSQL, fence a writer's transaction with
/// [`Lock::fence`](crate::Lock::fence).
///
/// ```no_run
/// # fn main() -> Result<(), lockbox::Error> {
/// # let client = lockbox::LockClient::builder("postgres://app@127.0.0.1/app").build()?;
/// use std::time::Duration;
/// let config = client.rwlock("config")?;
/// let reading = config.read_timeout(Duration::from_secs(5))?;
/// // … read the configuration, as other readers do at the same time …
/// reading.release()?;
/// let writing = config.write_timeout(Duration::from_secs(5))?;
/// // … change it, alone …
/// writing.release()?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RwLock {
    client: LockClient,
    name: String,
}

lock_guard!(
    /// A reader's hold on an [`RwLock`]: a shared lease of its own, released on
    /// `Drop`. Derefs to the [`Lock`](crate::Lock) underneath.
    ReadGuard,
    "read lock"
);

lock_guard!(
    /// The writer's hold on an [`RwLock`]: an exclusive lease, released on
    /// `Drop`. Derefs to the [`Lock`](crate::Lock) underneath.
    WriteGuard,
    "write lock"
);

impl RwLock {
    pub(crate) fn new(client: LockClient, name: &str) -> Result<RwLock> {
        crate::name::validate(name)?;
        Ok(RwLock {
            client,
            name: name.to_owned(),
        })
    }

    /// The lock's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Takes a read lock, waiting as `opts` allows (by default, not at all).
    /// `Ok(None)`: a writer held or waited for the name throughout the wait.
    ///
    /// # Errors
    /// As [`LockClient::acquire`]; [`Error::InvalidConfig`](crate::Error::InvalidConfig)
    /// when the name is held as a semaphore.
    pub fn read(&self, opts: &AcquireOptions) -> Result<Option<ReadGuard>> {
        Ok(self
            .client
            .acquire_kind(&self.name, opts, LeaseKind::Shared, false)?
            .map(ReadGuard::from_lock))
    }

    /// Takes a read lock if no writer holds or waits for the name now.
    ///
    /// # Errors
    /// As [`read`](Self::read).
    pub fn try_read(&self) -> Result<Option<ReadGuard>> {
        self.read(&AcquireOptions::new())
    }

    /// Takes a read lock, waiting up to `timeout`.
    ///
    /// # Errors
    /// [`Error::Timeout`](crate::Error::Timeout) when none came in time;
    /// otherwise as [`read`](Self::read).
    pub fn read_timeout(&self, timeout: Duration) -> Result<ReadGuard> {
        acquire_within(&self.client, &self.name, LeaseKind::Shared, timeout)
            .map(ReadGuard::from_lock)
    }

    /// Takes the write lock, waiting as `opts` allows (by default, not at
    /// all). `Ok(None)`: readers or a writer held the name throughout the
    /// wait.
    ///
    /// # Errors
    /// As [`LockClient::acquire`].
    pub fn write(&self, opts: &AcquireOptions) -> Result<Option<WriteGuard>> {
        Ok(self
            .client
            .acquire_kind(&self.name, opts, LeaseKind::Exclusive, false)?
            .map(WriteGuard::from_lock))
    }

    /// Takes the write lock if nobody holds the name now.
    ///
    /// # Errors
    /// As [`write`](Self::write).
    pub fn try_write(&self) -> Result<Option<WriteGuard>> {
        self.write(&AcquireOptions::new())
    }

    /// Takes the write lock, waiting up to `timeout`.
    ///
    /// # Errors
    /// [`Error::Timeout`](crate::Error::Timeout) when it did not come in time;
    /// otherwise as [`write`](Self::write).
    pub fn write_timeout(&self, timeout: Duration) -> Result<WriteGuard> {
        acquire_within(&self.client, &self.name, LeaseKind::Exclusive, timeout)
            .map(WriteGuard::from_lock)
    }
}

impl fmt::Debug for RwLock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RwLock").field("name", &self.name).finish()
    }
}
