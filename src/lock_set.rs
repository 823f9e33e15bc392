//! [`LockSet`]: several names held all or nothing.

use std::fmt;
use std::time::Instant;

use std::sync::Arc;

use crossbeam_channel::Receiver;

use crate::backend::LeaseKind;
use crate::client::LockClient;
use crate::error::{Error, LostReason, Result};
use crate::lease::LossLatch;
use crate::lock::Lock;
use crate::options::{AcquireOptions, Wait};

/// The most names one [`LockSet`] may hold.
pub const MAX_LOCK_SET: usize = 1_000;

/// Several names locked exclusively, all or nothing, from
/// [`LockClient::lock_set`]: one guard that releases them all.
///
/// **No deadlock between clients**, whatever order they list overlapping
/// names in: every set takes its names in one global order (byte order of the
/// names), so no two sets can each hold a name the other waits for. (A
/// client that also holds plain [`Lock`]s while it asks for a set must take
/// those in the same order to keep that property.) The wait is one budget for
/// the whole set; when it runs out, or any acquire fails, the names already
/// taken are released and nothing is held.
///
/// Each member is a [`Lock`] with its own lease and fencing token; the set is
/// held while every member is. [`lost`](Self::lost) reports the loss of any
/// member. A member lost while the set waited for a later one is not handed
/// out: the acquire fails with [`Error::LockLost`] and nothing is held.
///
/// ```no_run
/// # fn main() -> Result<(), lockbox::Error> {
/// # let client = lockbox::LockClient::builder("postgres://app@127.0.0.1/app").build()?;
/// use lockbox::AcquireOptions;
/// use std::time::Duration;
/// let opts = AcquireOptions::new().wait(Duration::from_secs(10));
/// if let Some(both) = client.lock_set(&["account/17", "account/4"], &opts)? {
///     let from = both.get("account/17").expect("a member");
///     println!("transferring under token {}", from.fencing_token());
///     both.release()?;
/// }
/// # Ok(()) }
/// ```
#[must_use = "if unused the locks are released immediately"]
#[clippy::has_significant_drop]
pub struct LockSet {
    /// In acquisition order (sorted by name).
    locks: Vec<Lock>,
    /// Fired by the first member's loss; closed by the release.
    latch: Arc<LossLatch>,
    lost_rx: Receiver<LostReason>,
}

impl LockSet {
    pub(crate) fn acquire<S: AsRef<str>>(
        client: &LockClient,
        names: &[S],
        opts: &AcquireOptions,
    ) -> Result<Option<LockSet>> {
        let mut sorted: Vec<&str> = names.iter().map(AsRef::as_ref).collect();
        if sorted.is_empty() || sorted.len() > MAX_LOCK_SET {
            return Err(Error::InvalidConfig(format!(
                "a lock set holds 1 to {MAX_LOCK_SET} names, not {}",
                sorted.len()
            )));
        }
        for name in &sorted {
            crate::name::validate(name)?;
        }
        sorted.sort_unstable();
        sorted.dedup();
        let deadline = match opts.wait {
            Wait::For(d) => Instant::now().checked_add(d),
            _ => None,
        };
        let mut locks = Vec::with_capacity(sorted.len());
        for name in sorted {
            let mut member = opts.clone();
            if let (Wait::For(_), Some(deadline)) = (opts.wait, deadline) {
                // What is left of the one budget; an exhausted one still gets a
                // try (a free name is taken even at the last moment).
                member.wait = Wait::For(deadline.saturating_duration_since(Instant::now()));
            }
            // On `None` or an error, `locks` is dropped: each taken member is
            // released.
            match client.acquire_kind(name, &member, LeaseKind::Exclusive, false)? {
                Some(lock) => locks.push(lock),
                None => return Ok(None),
            }
        }
        // A member may have been lost while the set waited for a later one
        // (its lease ended behind its back, or a renewal failed): hand out no
        // set that is not held, as a lone lock granted already lost is
        // refused. `locks` is dropped: every member is released.
        for lock in &locks {
            lock.ensure_held()?;
        }
        let (latch, lost_rx) = LossLatch::new();
        for lock in &locks {
            lock.forward_loss(latch.clone());
        }
        Ok(Some(LockSet {
            locks,
            latch,
            lost_rx,
        }))
    }

    /// The members, in the order they were taken (by name).
    pub fn locks(&self) -> &[Lock] {
        &self.locks
    }

    /// The member named `name`.
    pub fn get(&self, name: &str) -> Option<&Lock> {
        self.locks.iter().find(|l| l.name() == name)
    }

    /// Whether every member is still held.
    pub fn is_held(&self) -> bool {
        self.locks.iter().all(Lock::is_held)
    }

    /// `Ok(())` while every member is held.
    ///
    /// # Errors
    /// [`Error::LockLost`] for the first member found lost.
    pub fn ensure_held(&self) -> Result<()> {
        self.locks.iter().try_for_each(Lock::ensure_held)
    }

    /// A channel that becomes ready when any member is lost, as
    /// [`Lock::lost`]: on the first loss one message carrying its
    /// [`LostReason`] is sent and the channel is then disconnected, so every
    /// receiver returned by this method becomes ready (one of them receives
    /// `Ok(reason)`, the others, and later receives, `Err(RecvError)`).
    /// Releasing the set sends nothing; it only disconnects.
    pub fn lost(&self) -> Receiver<LostReason> {
        self.lost_rx.clone()
    }

    /// Releases every member (in reverse order of acquisition), all of them
    /// even when one fails.
    ///
    /// # Errors
    /// The first member's error, as [`Lock::release`]: [`Error::LockLost`] if
    /// that member had been lost.
    pub fn release(mut self) -> Result<()> {
        let mut first = Ok(());
        while let Some(lock) = self.locks.pop() {
            if let Err(e) = lock.release()
                && first.is_ok()
            {
                first = Err(e);
            }
        }
        self.latch.close();
        first
    }
}

impl Drop for LockSet {
    fn drop(&mut self) {
        // Members release on drop; newest first.
        while self.locks.pop().is_some() {}
        self.latch.close();
    }
}

impl fmt::Debug for LockSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockSet")
            .field("locks", &self.locks)
            .field("held", &self.is_held())
            .finish()
    }
}
