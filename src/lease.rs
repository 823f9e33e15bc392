//! The state of one held lock, shared between its [`Lock`](crate::Lock) guard and the
//! renewal thread: its local deadline, its loss latch and signal, and the store
//! session that holds it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use parking_lot::{Mutex, MutexGuard};

use crate::backend::{LeaseRef, Renewal, Session};
use crate::config::safety_margin;
use crate::error::{Error, LostReason};
use crate::telemetry::Telemetry;

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
    /// When the granting statement was sent.
    pub granted_at: Instant,
    telemetry: Arc<Telemetry>,
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
    /// A loss latched under the mutex, reported (log, metrics, handler) once the
    /// mutex is released.
    unreported_loss: Option<LostReason>,
}

impl Clock {
    /// Latches the loss and signals it.
    fn lose(&mut self, reason: LostReason) {
        if self.lost.is_some() || self.released {
            return;
        }
        self.lost = Some(reason);
        self.unreported_loss = Some(reason);
        if let Some(tx) = self.lost_tx.take() {
            // Capacity 1 and sent once: never blocks, never fails for lack of room.
            let _ = tx.try_send(reason);
        }
    }

    /// The loss status right now, latching expiry when the deadline has passed.
    fn status(&mut self, now: Instant) -> Option<LostReason> {
        if self.lost.is_none() && !self.released && now >= self.deadline {
            self.lose(LostReason::Expired);
        }
        self.lost
    }
}

/// The clock, locked; reports a loss latched meanwhile with the mutex unlocked,
/// so log lines, metrics and the user's event handler never run under it.
struct ClockGuard<'a> {
    state: &'a LeaseState,
    clock: MutexGuard<'a, Clock>,
}

impl std::ops::Deref for ClockGuard<'_> {
    type Target = Clock;
    fn deref(&self) -> &Clock {
        &self.clock
    }
}

impl std::ops::DerefMut for ClockGuard<'_> {
    fn deref_mut(&mut self) -> &mut Clock {
        &mut self.clock
    }
}

impl Drop for ClockGuard<'_> {
    fn drop(&mut self) {
        if let Some(reason) = self.clock.unreported_loss.take() {
            let s = self.state;
            MutexGuard::unlocked(&mut self.clock, || {
                let held_for = s.granted_at.elapsed();
                s.telemetry.no_longer_held(held_for);
                s.telemetry.lost(&s.name, s.token, reason, held_for);
            });
        }
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

/// What `LeaseState::new` needs besides the grant.
pub(crate) struct NewLease {
    pub id: u64,
    pub name: String,
    pub owner: Arc<str>,
    pub token: u64,
    pub ttl: Duration,
    pub renew_every: Duration,
    pub sent_at: Instant,
    pub session: Box<dyn Session>,
    pub telemetry: Arc<Telemetry>,
}

impl LeaseState {
    pub fn new(lease: NewLease) -> LeaseState {
        let (lost_tx, lost_rx) = crossbeam_channel::bounded(1);
        LeaseState {
            id: lease.id,
            name: lease.name,
            owner: lease.owner,
            token: lease.token,
            granted_at: lease.sent_at,
            telemetry: lease.telemetry,
            clock: Mutex::new(Clock {
                ttl: lease.ttl,
                renew_every: lease.renew_every,
                deadline: lease.sent_at + lease.ttl - safety_margin(lease.ttl),
                next_renewal: lease.sent_at + lease.renew_every,
                lost: None,
                lost_tx: Some(lost_tx),
                released: false,
                unreported_loss: None,
            }),
            session: Mutex::new(Some(lease.session)),
            lost_rx,
        }
    }

    fn clock(&self) -> ClockGuard<'_> {
        ClockGuard {
            state: self,
            clock: self.clock.lock(),
        }
    }

    /// The lease's identity, with `limit` bounding the statement about to be sent.
    pub fn lease_ref(&self, limit: Duration) -> LeaseRef<'_> {
        LeaseRef {
            name: &self.name,
            owner: &self.owner,
            token: self.token,
            limit: limit.max(Duration::from_millis(1)),
        }
    }

    /// `Ok` while the lock is held: not lost, not released, local deadline ahead.
    pub fn check(&self) -> Result<(), LostReason> {
        let mut clock = self.clock();
        match clock.status(Instant::now()) {
            Some(reason) => Err(reason),
            None if clock.released => Err(LostReason::NotOwner),
            None => Ok(()),
        }
    }

    pub fn lost_reason(&self) -> Option<LostReason> {
        self.clock().status(Instant::now())
    }

    pub fn lost_receiver(&self) -> Receiver<LostReason> {
        self.lost_rx.clone()
    }

    /// What is left before the local deadline (zero once it has passed).
    pub fn time_left(&self) -> Duration {
        self.clock
            .lock()
            .deadline
            .saturating_duration_since(Instant::now())
    }

    pub fn ttl(&self) -> Duration {
        self.clock().ttl
    }

    pub fn mark_lost(&self, reason: LostReason) {
        self.clock().lose(reason);
    }

    /// When the renewal thread should next look at this lock: the next renewal, or
    /// the deadline if that comes first. `None` once lost or released.
    pub fn due(&self) -> Option<Instant> {
        let clock = self.clock();
        if clock.lost.is_some() || clock.released {
            return None;
        }
        Some(clock.next_renewal.min(clock.deadline))
    }

    /// The local deadline; `None` once lost or released.
    pub fn deadline(&self) -> Option<Instant> {
        let clock = self.clock();
        if clock.lost.is_some() || clock.released {
            return None;
        }
        Some(clock.deadline)
    }

    /// How late the next renewal is (zero when not yet due); `None` once lost or
    /// released.
    pub fn renewal_lag(&self, now: Instant) -> Option<Duration> {
        let clock = self.clock();
        if clock.lost.is_some() || clock.released {
            return None;
        }
        Some(now.saturating_duration_since(clock.next_renewal))
    }

    /// Stops renewals; returns the loss status at this moment.
    pub fn begin_release(&self) -> Option<LostReason> {
        let mut clock = self.clock();
        let status = clock.status(Instant::now());
        if status.is_none() && !clock.released {
            self.telemetry.no_longer_held(self.granted_at.elapsed());
        }
        clock.released = true;
        status
    }

    /// Ends a release. A loss that the release itself discovered (the lease was no
    /// longer ours) is signalled like any other; then `lost()` receivers are
    /// disconnected, without a message when the lock was simply released.
    pub fn end_release(&self, discovered: Option<LostReason>) {
        let mut clock = self.clock();
        if let (Some(reason), None) = (discovered, clock.lost) {
            clock.lost = Some(reason);
            if let Some(tx) = clock.lost_tx.take() {
                let _ = tx.try_send(reason);
            }
            drop(clock);
            // Its hold was already counted as ended by `begin_release`.
            self.telemetry
                .lost(&self.name, self.token, reason, self.granted_at.elapsed());
            return;
        }
        clock.lost_tx = None;
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
                    self.clock().next_renewal = Instant::now() + BUSY_RETRY;
                    return RenewOutcome::Busy;
                }
            }
        };
        let Some(session) = slot.as_mut() else {
            return RenewOutcome::Finished;
        };
        let ((ttl, renew_every), limit) = {
            let mut clock = self.clock();
            if clock.released {
                // The guard is releasing it and will take the session.
                return RenewOutcome::Finished;
            }
            if clock.status(Instant::now()).is_some() {
                drop(clock);
                // Lost: drop the session so a still-held advisory lock is freed now
                // rather than when the guard goes away.
                *slot = None;
                return RenewOutcome::Finished;
            }
            let new = new.unwrap_or((clock.ttl, clock.renew_every));
            (
                new,
                clock.deadline.saturating_duration_since(Instant::now()),
            )
        };
        let sent_at = Instant::now();
        let result = session.renew(&self.lease_ref(limit), ttl);
        let latency = sent_at.elapsed();
        match result {
            Ok(Renewal::Renewed) => {
                {
                    let mut clock = self.clock();
                    if clock.released {
                        return RenewOutcome::Finished;
                    }
                    // A deadline that passed while the statement was in flight
                    // stays passed: once `is_held` said false it never says true.
                    if clock.status(Instant::now()).is_some() {
                        drop(clock);
                        *slot = None;
                        self.telemetry
                            .renewal(&self.name, self.token, latency, false);
                        return RenewOutcome::Finished;
                    }
                    clock.ttl = ttl;
                    clock.renew_every = renew_every;
                    clock.deadline = sent_at + ttl - safety_margin(ttl);
                    clock.next_renewal = sent_at + renew_every;
                }
                self.telemetry
                    .renewal(&self.name, self.token, latency, true);
                RenewOutcome::Renewed
            }
            Ok(Renewal::Lost(reason)) => {
                *slot = None;
                self.telemetry
                    .renewal(&self.name, self.token, latency, false);
                self.mark_lost(reason);
                RenewOutcome::Finished
            }
            Err(err) => {
                self.telemetry
                    .renewal(&self.name, self.token, latency, false);
                let mut clock = self.clock();
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

    /// Reports how a release ended.
    pub fn report_release(&self, ok: bool) {
        self.telemetry
            .released(&self.name, self.token, self.granted_at.elapsed(), ok);
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
