//! [`Semaphore`] and its [`Permit`]s.

use std::fmt;
use std::time::Duration;

use crate::backend::LeaseKind;
use crate::client::LockClient;
use crate::error::{Error, Result};
use crate::guards::{acquire_within, lock_guard};
use crate::lease_info::LeaseStatus;
use crate::options::AcquireOptions;

/// The most permits a [`Semaphore`] may have.
pub const MAX_PERMITS: u32 = 10_000;

/// A counting semaphore: at most [`permits`](Self::permits) holders of one
/// name at a time, across every client of the store.
///
/// Each [`Permit`] is a lease of its own, with its own fencing token, renewal,
/// deadline and [`lost`](crate::Lock::lost) signal, exactly like a
/// [`Lock`](crate::Lock). **Never more than `permits` live permits**, whatever
/// crashes: a crashed holder's permit returns to the semaphore when its lease
/// ends, not before. Waiters are woken by releases (and at the lease end of a
/// crashed holder), never by polling, and served in arrival order on every
/// store: a freed permit goes to the waiter that came first. On PostgreSQL
/// waiters queue in the server (on the name's *gate*, an advisory key in
/// the single-`bigint` form) and only the first waits for a permit; an
/// acquire that arrives just as a permit is freed may still take it before
/// the head of the queue has looked (order is first come, first served
/// among waiters). A waiter frozen at the head of that queue holds the
/// others up for at most twice its TTL plus a second: the server then ends
/// its idle session (`idle_session_timeout`), and its acquire fails when it
/// runs again.
///
/// **Every client must agree on `permits`.** While any permit of the name is
/// live, an acquire with another count is refused with
/// [`Error::InvalidConfig`] (so is a read lock of an
/// [`RwLock`](crate::RwLock) of the name): the count changes once every permit
/// of the name has ended. An exclusive lease of the name (a
/// [`Lock`](crate::Lock), an `RwLock`'s writer) is not refused: it waits for
/// every permit to end, and permits wait for it, both while it is held and
/// (in the in-memory store) while it waits.
///
/// A permit's fencing token is above every token issued for the name before
/// it; the permits live at one time have distinct tokens. To fence a resource
/// shared by the holders, key the check by the token of the permit that did
/// the write (a holder's own writes are ordered by its token).
///
/// ```no_run
/// # fn main() -> Result<(), lockbox::Error> {
/// # let client = lockbox::LockClient::builder("postgres://app@127.0.0.1/app").build()?;
/// use std::time::Duration;
/// let crawlers = client.semaphore("crawler-slots", 3)?;
/// let permit = crawlers.acquire_timeout(Duration::from_secs(30))?;
/// println!("crawling under permit {}", permit.fencing_token());
/// permit.release()?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Semaphore {
    client: LockClient,
    name: String,
    permits: u32,
}

lock_guard!(
    /// One permit of a [`Semaphore`]: a lease of its own, released on `Drop`.
    /// Derefs to the [`Lock`](crate::Lock) underneath for its fencing token,
    /// [`lost`](crate::Lock::lost) signal and the rest.
    Permit,
    "permit"
);

impl Semaphore {
    pub(crate) fn new(client: LockClient, name: &str, permits: u32) -> Result<Semaphore> {
        crate::name::validate(name)?;
        if permits == 0 || permits > MAX_PERMITS {
            return Err(Error::InvalidConfig(format!(
                "a semaphore has 1 to {MAX_PERMITS} permits, not {permits}"
            )));
        }
        Ok(Semaphore {
            client,
            name: name.to_owned(),
            permits,
        })
    }

    /// The semaphore's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// How many permits it has.
    pub fn permits(&self) -> u32 {
        self.permits
    }

    fn kind(&self) -> LeaseKind {
        LeaseKind::Permit {
            permits: self.permits,
        }
    }

    /// Takes a permit, waiting as `opts` allows (by default, not at all).
    /// `Ok(None)`: none came free within the wait.
    ///
    /// # Errors
    /// As [`LockClient::acquire`]; [`Error::InvalidConfig`] when the name's
    /// live permits were granted with another count, or the name is in use
    /// as another kind of lock.
    pub fn acquire(&self, opts: &AcquireOptions) -> Result<Option<Permit>> {
        Ok(self
            .client
            .acquire_kind(&self.name, opts, self.kind(), false)?
            .map(Permit::from_lock))
    }

    /// Takes a permit if one is free now.
    ///
    /// # Errors
    /// As [`acquire`](Self::acquire).
    pub fn try_acquire(&self) -> Result<Option<Permit>> {
        self.acquire(&AcquireOptions::new())
    }

    /// Takes a permit, waiting up to `timeout`.
    ///
    /// # Errors
    /// [`Error::Timeout`] when none came free in time; otherwise as
    /// [`acquire`](Self::acquire).
    pub fn acquire_timeout(&self, timeout: Duration) -> Result<Permit> {
        acquire_within(&self.client, &self.name, self.kind(), timeout).map(Permit::from_lock)
    }

    /// How many permits are live now, by the store's record.
    ///
    /// # Errors
    /// Any failure to reach the store.
    pub fn live_permits(&self) -> Result<usize> {
        Ok(self
            .client
            .leases_of(&self.name)?
            .iter()
            .filter(|l| {
                matches!(l.kind, LeaseKind::Permit { .. })
                    && matches!(l.status, LeaseStatus::Held { .. })
            })
            .count())
    }
}

impl fmt::Debug for Semaphore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Semaphore")
            .field("name", &self.name)
            .field("permits", &self.permits)
            .finish()
    }
}
