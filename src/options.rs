//! Per-call acquire options.

use std::time::Duration;

/// The longest metadata string accepted, in bytes.
pub const MAX_METADATA_LEN: usize = 8 * 1024;

/// How long an acquire may wait for a held lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wait {
    /// Do not wait: report "not acquired" at once.
    No,
    /// Wait at most this long.
    For(Duration),
    /// Wait as long as it takes.
    Forever,
}

/// Options for one [`LockClient::acquire`](crate::LockClient::acquire) call.
///
/// ```
/// use lockbox::AcquireOptions;
/// use std::time::Duration;
///
/// let opts = AcquireOptions::new()
///     .ttl(Duration::from_secs(10))
///     .wait(Duration::from_secs(2))
///     .metadata("host=worker-3 job=4711");
/// # let _ = opts;
/// ```
#[derive(Debug, Clone)]
pub struct AcquireOptions {
    pub(crate) ttl: Option<Duration>,
    pub(crate) wait: Wait,
    pub(crate) metadata: Option<String>,
    pub(crate) dedicated: bool,
}

impl Default for AcquireOptions {
    fn default() -> Self {
        Self::new()
    }
}

impl AcquireOptions {
    /// Options with every value at its default: the client's TTL, no waiting, no
    /// metadata.
    pub fn new() -> Self {
        AcquireOptions {
            ttl: None,
            wait: Wait::No,
            metadata: None,
            dedicated: false,
        }
    }

    /// Sets the lease length for this lock. It is validated like the client's TTL.
    ///
    /// Defaults to the client's TTL ([`LockClientBuilder::ttl`](crate::LockClientBuilder::ttl)).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// Waits up to `timeout` for the lock; `Duration::ZERO` means do not wait.
    ///
    /// Defaults to not waiting.
    pub fn wait(mut self, timeout: Duration) -> Self {
        self.wait = if timeout.is_zero() {
            Wait::No
        } else {
            Wait::For(timeout)
        };
        self
    }

    /// Waits as long as it takes for the lock.
    ///
    /// Defaults to not waiting.
    pub fn wait_forever(mut self) -> Self {
        self.wait = Wait::Forever;
        self
    }

    /// Stores a free-form string with the lease (who holds it and why), visible to
    /// operators in the lease table. At most [`MAX_METADATA_LEN`] bytes, no NUL.
    ///
    /// Defaults to none.
    pub fn metadata(mut self, metadata: impl Into<String>) -> Self {
        self.metadata = Some(metadata.into());
        self
    }

    /// Gives the lock a database session of its own instead of sharing one
    /// with other held locks of the client (PostgreSQL; see
    /// [`LockClientBuilder::locks_per_session`](crate::LockClientBuilder::locks_per_session)).
    /// Locks on a shared session share its fate: when the session ends (the
    /// server terminates it, the connection breaks, a statement on it is stuck
    /// past a lock's deadline and is cancelled), every lock on it is lost. A
    /// dedicated session costs a pooled connection for as long as the lock is
    /// held. Other stores ignore it.
    ///
    /// Defaults to `false`.
    pub fn dedicated_session(mut self, dedicated: bool) -> Self {
        self.dedicated = dedicated;
        self
    }
}
