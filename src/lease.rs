//! The state of one held lock, shared between its [`Lock`](crate::Lock) guard and the
//! renewal thread: its local deadline, its loss latch and signal, and the store
//! session that holds it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use parking_lot::Mutex;

use crate::backend::{LeaseRef, Renewal, Session};
use crate::config::safety_margin;
use crate::error::{Error, LostReason};

/// How soon the renewal thread retries when the guard is using the session.
const BUSY_RETRY: Duration = Duration::from_millis(5);
/// Bounds on the pause before retrying a failed renewal.
const MIN_RETRY: Duration = Duration::from_millis(10);
const MAX_RETRY: Duration = Duration::from_secs(1);

pub(crate) struct LeaseState {
    pub id: u64,
    pub name: String,
    pub owner: Arc<str>,
    pub token: u64,
    /// Guarded separately from the session so that checks never wait for I/O.
    clock: Mutex<Clock>,
    /// The store session holding the lock. Its mutex *is* the ownership of the
    /// connection: whoever renews or releases holds it for that one statement.
    /// Lock order: `session` before `clock`, never the reverse.
    session: Mutex<Option<Box<dyn Session>>>,
    lost_rx: Receiver<LostReason>,
}

struct Clock {
    ttl: Duration,
    renew_every: Duration,
    /// The holder's own end of the lease: before the database's, always.
    deadline: Instant,
    next_renewal: Instant,
    lost: Option<LostReason>,
    /// Sending the reason, then dropping the sender, makes every `lost()` receiver
    /// ready. `None` once lost or released.
    lost_tx: Option<Sender<LostReason>>,
    released: bool,
}

impl Clock {
    /// Latches the loss and signals it. Called with the clock locked.
    fn lose(&mut self, name: &str, reason: LostReason) {
        if self.lost.is_some() || self.released {
            return;
        }
        self.lost = Some(reason);
        if let Some(tx) = self.lost_tx.take() {
            // Capacity 1 and sent once: never blocks, never fails for lack of room.
            let _ = tx.try_send(reason);
        }
        log::warn!("lockbox: lock {name:?} lost: {reason}");
    }

    /// The loss status right now, latching expiry when the deadline has passed.
    fn status(&mut self, name: &str, now: Instant) -> Option<LostReason> {
        if self.lost.is_none() && !self.released && now >= self.deadline {
            self.lose(name, LostReason::Expired);
        }
        self.lost
    }
}

/// What one renewal attempt came to.
#[derive(Debug)]
pub(crate) enum RenewOutcome {
    Renewed,
    /// The session was in use (by the guard); try again shortly.
    Busy,
    /// The lock is lost or released: stop renewing it.
    Finished,
    /// A transient failure; retried until the deadline.
    Failed(Error),
}

impl LeaseState {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: u64,
        name: String,
        owner: Arc<str>,
        token: u64,
        ttl: Duration,
        renew_every: Duration,
        sent_at: Instant,
        session: Box<dyn Session>,
    ) -> LeaseState {
        let (lost_tx, lost_rx) = crossbeam_channel::bounded(1);
        LeaseState {
            id,
            name,
            owner,
            token,
            clock: Mutex::new(Clock {
                ttl,
                renew_every,
                deadline: sent_at + ttl - safety_margin(ttl),
                next_renewal: sent_at + renew_every,
                lost: None,
                lost_tx: Some(lost_tx),
                released: false,
            }),
            session: Mutex::new(Some(session)),
            lost_rx,
        }
    }

    pub fn lease_ref(&self) -> LeaseRef<'_> {
        LeaseRef {
            name: &self.name,
            owner: &self.owner,
            token: self.token,
        }
    }

    /// `Ok` while the lock is held: not lost, not released, local deadline ahead.
    pub fn check(&self) -> Result<(), LostReason> {
        let mut clock = self.clock.lock();
        match clock.status(&self.name, Instant::now()) {
            Some(reason) => Err(reason),
            None if clock.released => Err(LostReason::NotOwner),
            None => Ok(()),
        }
    }

    pub fn lost_reason(&self) -> Option<LostReason> {
        self.clock.lock().status(&self.name, Instant::now())
    }

    pub fn lost_receiver(&self) -> Receiver<LostReason> {
        self.lost_rx.clone()
    }

    pub fn ttl(&self) -> Duration {
        self.clock.lock().ttl
    }

    pub fn mark_lost(&self, reason: LostReason) {
        self.clock.lock().lose(&self.name, reason);
    }

    /// When the renewal thread should next look at this lock: the next renewal, or
    /// the deadline if that comes first. `None` once lost or released.
    pub fn due(&self) -> Option<Instant> {
        let clock = self.clock.lock();
        if clock.lost.is_some() || clock.released {
            return None;
        }
        Some(clock.next_renewal.min(clock.deadline))
    }

    /// Stops renewals and signals; returns the loss status at this moment.
    pub fn begin_release(&self) -> Option<LostReason> {
        let mut clock = self.clock.lock();
        let status = clock.status(&self.name, Instant::now());
        clock.released = true;
        // Disconnects `lost()` receivers without a message: released, not lost.
        clock.lost_tx = None;
        status
    }

    pub fn take_session(&self) -> Option<Box<dyn Session>> {
        self.session.lock().take()
    }

    /// Renews the lease on the lock's own session, with a new `(ttl, renew_every)`
    /// or (`None`) the ones in force — read only once the session is ours, so a
    /// concurrent `extend` is never undone by a renewal with the old TTL. With
    /// `wait_for_session` false (the renewal thread) a busy session is skipped.
    pub fn renew(&self, new: Option<(Duration, Duration)>, wait_for_session: bool) -> RenewOutcome {
        let mut slot = if wait_for_session {
            self.session.lock()
        } else {
            match self.session.try_lock() {
                Some(slot) => slot,
                None => {
                    self.clock.lock().next_renewal = Instant::now() + BUSY_RETRY;
                    return RenewOutcome::Busy;
                }
            }
        };
        let Some(session) = slot.as_mut() else {
            return RenewOutcome::Finished;
        };
        {
            let mut clock = self.clock.lock();
            if clock.released {
                // The guard is releasing it and will take the session.
                return RenewOutcome::Finished;
            }
            if clock.status(&self.name, Instant::now()).is_some() {
                drop(clock);
                // Lost: drop the session so a still-held advisory lock is freed now
                // rather than when the guard goes away.
                *slot = None;
                return RenewOutcome::Finished;
            }
        }
        let (ttl, renew_every) = new.unwrap_or_else(|| {
            let clock = self.clock.lock();
            (clock.ttl, clock.renew_every)
        });
        let sent_at = Instant::now();
        match session.renew(&self.lease_ref(), ttl) {
            Ok(Renewal::Renewed) => {
                let mut clock = self.clock.lock();
                // A deadline that passed while the statement was in flight stays
                // passed: once `is_held` said false it never says true again.
                if clock.released {
                    return RenewOutcome::Finished;
                }
                if clock.status(&self.name, Instant::now()).is_some() {
                    drop(clock);
                    *slot = None;
                    return RenewOutcome::Finished;
                }
                clock.ttl = ttl;
                clock.renew_every = renew_every;
                clock.deadline = sent_at + ttl - safety_margin(ttl);
                clock.next_renewal = sent_at + renew_every;
                log::trace!(
                    "lockbox: renewed lock {:?} (token {})",
                    self.name,
                    self.token
                );
                RenewOutcome::Renewed
            }
            Ok(Renewal::Lost(reason)) => {
                *slot = None;
                self.mark_lost(reason);
                RenewOutcome::Finished
            }
            Err(err) => {
                let mut clock = self.clock.lock();
                let pause = (clock.renew_every / 4).clamp(MIN_RETRY, MAX_RETRY);
                clock.next_renewal = Instant::now() + pause;
                log::warn!(
                    "lockbox: renewing lock {:?} failed, retrying in {pause:?} (deadline in {:?}): {err}",
                    self.name,
                    clock.deadline.saturating_duration_since(Instant::now())
                );
                RenewOutcome::Failed(err)
            }
        }
    }
}

impl std::fmt::Debug for LeaseState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseState")
            .field("name", &self.name)
            .field("token", &self.token)
            .field("lost", &self.clock.lock().lost)
            .finish_non_exhaustive()
    }
}
