//! The state of one held lock, shared between its [`Lock`](crate::Lock) guard, the
//! renewal scheduler and its I/O workers: the local deadline, the loss latch and
//! signal, and the store session that holds the lock.
//!
//! Two mutexes, never held together across I/O: `clock` is only ever held for a
//! few instructions (so the scheduler can latch a loss at the deadline whatever
//! the session is doing), `session` is held for the one statement that renews or
//! releases. Lock order: `session` before `clock`, never the reverse. No user
//! code runs under either: losses latched under `clock` are reported once it is
//! unlocked, and events go to the client's event thread.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use parking_lot::{Mutex, MutexGuard};

use crate::backend::{Interrupter, LeaseKind, LeaseRef, Renewal, Session, SharedSession};
use crate::clock::BootInstant;
use crate::config::safety_margin;
use crate::error::{Error, LostReason};
use crate::telemetry::{Slow, Telemetry};

/// How soon the renewal scheduler retries when the guard is using the session.
const BUSY_RETRY: Duration = Duration::from_millis(5);
/// Bounds on the pause before retrying a failed renewal.
const MIN_RETRY: Duration = Duration::from_millis(10);
const MAX_RETRY: Duration = Duration::from_secs(1);
/// The largest clock-rate difference assumed between this host's clock and the
/// store's over a wait the store measured (1000 ppm: 20 times what NTP-less
/// crystals drift). The part of a grant's deadline that rests on a wait measured
/// by the store is shortened by this fraction.
const RATE_DIVISOR: u32 = 1000;

/// The least time a release of an abandoned session (see
/// `LeaseState::end_abandoned`) may take, as `Lock::release` allows.
const ABANDONED_RELEASE_LIMIT: Duration = Duration::from_secs(1);

/// A loss signal shared by several leases (a lock set's members), with the
/// semantics of one lock's `lost()`: the first loss sends its reason and
/// disconnects the channel, so *every* receiver becomes ready (one gets the
/// reason, the others, and later receives, a disconnection); closing it
/// without a loss only disconnects.
pub(crate) struct LossLatch {
    /// Capacity 1 and sent at most once; `None` once fired or closed.
    tx: Mutex<Option<Sender<LostReason>>>,
}

impl LossLatch {
    /// A latch and the receiver its firing makes ready.
    pub fn new() -> (Arc<LossLatch>, Receiver<LostReason>) {
        let (tx, rx) = crossbeam_channel::bounded(1);
        (
            Arc::new(LossLatch {
                tx: Mutex::new(Some(tx)),
            }),
            rx,
        )
    }

    /// Sends `reason` if nothing was sent yet, then disconnects. Never
    /// blocks (a leaf mutex, a send into an empty channel of capacity 1).
    pub fn fire(&self, reason: LostReason) {
        if let Some(tx) = self.tx.lock().take() {
            let _ = tx.try_send(reason);
        }
    }

    /// Disconnects without a message (the set was released).
    pub fn close(&self) {
        drop(self.tx.lock().take());
    }
}

pub(crate) struct LeaseState {
    pub id: u64,
    pub name: String,
    pub owner: Arc<str>,
    pub token: u64,
    /// The kind of lease held.
    pub kind: LeaseKind,
    /// When the granting statement was sent.
    pub granted_at: Instant,
    /// The process that took the lock: a forked child's copy never acts on it.
    pid: u32,
    telemetry: Arc<Telemetry>,
    /// Guarded separately from the session so that checks never wait for I/O.
    clock: Mutex<Clock>,
    /// The store session holding the lock. Its mutex *is* the ownership of the
    /// connection: whoever renews or releases holds it for that one statement.
    session: Mutex<Option<Box<dyn Session>>>,
    lost_rx: Receiver<LostReason>,
    /// Set while a renewal worker has this lock's renewal in hand.
    in_flight: AtomicBool,
    /// Interrupts a statement in flight on the session (from the store).
    interrupter: Option<Interrupter>,
    /// Set before an interrupt is sent: the session must then never be handed
    /// back for reuse, or the interrupt could land on someone else's statement.
    interrupted: AtomicBool,
    /// The store session this lock shares with others, through which they are
    /// renewed together. Weak: a lost lock's guard, which a caller may keep,
    /// must not keep the session (and its connection) open.
    shared: Option<Weak<dyn SharedSession>>,
}

struct Clock {
    ttl: Duration,
    renew_every: Duration,
    /// The holder's own end of the lease: before the store's, always. On the
    /// boot-time clock, which counts time the machine spent suspended.
    deadline: BootInstant,
    next_renewal: Instant,
    /// When the renewal that has not succeeded yet first became due (retries of a
    /// failed renewal do not move it), for the renewal lag.
    overdue_since: Option<Instant>,
    /// Whether the last renewal attempt failed.
    failing: bool,
    /// Set while a renewal statement is running on the session (the session
    /// mutex held by its sender). Only then may the scheduler interrupt it: the
    /// sender clears this and checks for a loss under one lock of this mutex,
    /// and closes the session if the lock was lost, so a cancel request sent
    /// for it can never reach the session's connection once it is pooled again.
    statement: bool,
    lost: Option<LostReason>,
    /// Sending the reason, then dropping the sender, makes every `lost()` receiver
    /// ready. `None` once lost or released.
    lost_tx: Option<Sender<LostReason>>,
    /// Further latches told of a loss (a lock set's): each fires, without
    /// blocking, when the loss is latched.
    forward: Vec<Arc<LossLatch>>,
    released: bool,
    /// The guard's release stopped waiting for the session (a renewal in
    /// flight held it past the release's limit): whoever holds the session
    /// drops it when done, which frees the lock (the lease runs out).
    abandoned: bool,
    /// A loss latched under the mutex, reported (log, metrics, event) once the
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
        for latch in self.forward.drain(..) {
            latch.fire(reason);
        }
    }

    /// The loss status right now, latching expiry when the deadline has passed.
    fn status(&mut self, now: BootInstant) -> Option<LostReason> {
        if self.lost.is_none() && !self.released && now >= self.deadline {
            self.lose(LostReason::Expired);
        }
        self.lost
    }

    fn active(&self) -> bool {
        self.lost.is_none() && !self.released
    }
}

/// The clock, locked; reports a loss latched meanwhile with the mutex unlocked,
/// so log lines and metrics never run under it (the event handler never runs on
/// this thread at all).
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

/// How a lock stands after the scheduler latched its deadline.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Latch {
    Active,
    /// Lost or released; `statement`: a renewal statement is running on it.
    Ended {
        lost: bool,
        statement: bool,
    },
}

/// A renewal ready to be sent: the session taken, and what it must say.
struct Prepared<'a> {
    slot: MutexGuard<'a, Option<Box<dyn Session>>>,
    ttl: Duration,
    renew_every: Duration,
    /// What is left before the deadline: the statement's bound.
    limit: Duration,
    sent_at: Instant,
    sent_boot: BootInstant,
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

/// How one held lock's renewals stand, for the health report.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RenewalView {
    pub ttl: Duration,
    pub renew_every: Duration,
    /// How late the renewal that has not succeeded yet is (zero when none is due).
    pub lag: Duration,
    /// Whether the last renewal attempt failed.
    pub failing: bool,
    /// What is left before the local deadline.
    pub time_left: Duration,
}

/// What `LeaseState::new` needs besides the grant.
pub(crate) struct NewLease {
    pub id: u64,
    pub name: String,
    pub owner: Arc<str>,
    pub token: u64,
    pub kind: LeaseKind,
    pub ttl: Duration,
    pub renew_every: Duration,
    /// When the lease began by the grant's account: the request's send time plus
    /// any wait the store measured and reported.
    pub sent_at: Instant,
    /// When the acquire call began: `sent_at` minus this is time the store
    /// measured, with its own clock's rate.
    pub called_at: Instant,
    /// `called_at` on the boot-time clock.
    pub called_boot: BootInstant,
    pub session: Box<dyn Session>,
    pub telemetry: Arc<Telemetry>,
}

/// The local deadline of a lease of `ttl` that began at `start`, of which
/// `measured_by_store` was measured by the store's clock.
fn deadline(start: BootInstant, ttl: Duration, measured_by_store: Duration) -> BootInstant {
    let rate_error = measured_by_store / RATE_DIVISOR;
    // `start` is at most "now" when a grant or renewal arrives, so a deadline
    // that saturates at the clock's zero is simply one that has passed.
    (start + ttl).saturating_sub(safety_margin(ttl) + rate_error)
}

/// Both clocks read at one moment: converts boot-time instants to the
/// monotonic clock, which timers sleep on. Read once per pass over many
/// locks (two clock reads per lock were a fifth of the scheduler's time with
/// thousands held).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Now {
    boot: BootInstant,
    mono: Instant,
}

impl Now {
    pub fn read() -> Now {
        Now {
            boot: BootInstant::now(),
            mono: Instant::now(),
        }
    }

    /// `at` on the monotonic clock.
    fn to_instant(self, at: BootInstant) -> Instant {
        self.mono + at.saturating_duration_since(self.boot)
    }
}

/// Whether a grant's deadline lost so much to the rate allowance of a long wait
/// that the lock should be renewed at once (a renewal's deadline rests on no wait).
pub(crate) fn rebase_after_wait(ttl: Duration, measured_by_store: Duration) -> bool {
    measured_by_store / RATE_DIVISOR > ttl / 20
}

impl LeaseState {
    pub fn new(lease: NewLease) -> LeaseState {
        let (lost_tx, lost_rx) = crossbeam_channel::bounded(1);
        let measured = lease.sent_at.saturating_duration_since(lease.called_at);
        // The send time on the boot-time clock, through the call's start: a
        // suspend between the two would only make it earlier, never later.
        let start = lease.called_boot + measured;
        let interrupter = lease.session.interrupter();
        let shared = lease.session.shared().map(|s| Arc::downgrade(&s));
        LeaseState {
            id: lease.id,
            name: lease.name,
            owner: lease.owner,
            token: lease.token,
            kind: lease.kind,
            granted_at: lease.sent_at,
            pid: std::process::id(),
            telemetry: lease.telemetry,
            clock: Mutex::new(Clock {
                ttl: lease.ttl,
                renew_every: lease.renew_every,
                deadline: deadline(start, lease.ttl, measured),
                next_renewal: lease.sent_at + lease.renew_every,
                overdue_since: None,
                failing: false,
                statement: false,
                lost: None,
                lost_tx: Some(lost_tx),
                forward: Vec::new(),
                released: false,
                abandoned: false,
                unreported_loss: None,
            }),
            session: Mutex::new(Some(lease.session)),
            lost_rx,
            in_flight: AtomicBool::new(false),
            interrupter,
            interrupted: AtomicBool::new(false),
            shared,
        }
    }

    /// The store session this lock shares with others, if it shares one.
    pub fn shared(&self) -> Option<&Weak<dyn SharedSession>> {
        self.shared.as_ref()
    }

    /// Interrupts the statement in flight on the session, if the store can. May
    /// block: call it on a thread of its own.
    pub fn interrupt(&self) {
        if let Some(interrupt) = &self.interrupter {
            self.mark_interrupted();
            log::warn!(
                "lockbox: lock {:?} reached its deadline with its renewal still running; \
                 interrupting that statement",
                self.name
            );
            interrupt();
        }
    }

    pub fn mark_interrupted(&self) {
        self.interrupted.store(true, Ordering::SeqCst);
    }

    /// Whether an interrupt was (or is being) sent on the session: it must be
    /// closed, never released for reuse.
    pub fn interrupted(&self) -> bool {
        self.interrupted.load(Ordering::SeqCst)
    }

    /// Whether the store offers a way to interrupt a statement in flight.
    pub fn can_interrupt(&self) -> bool {
        self.interrupter.is_some()
    }

    fn clock(&self) -> ClockGuard<'_> {
        ClockGuard {
            state: self,
            clock: self.clock.lock(),
        }
    }

    /// Whether this is a copy inherited through `fork()`: it must never act on
    /// the session, which belongs to the parent.
    pub fn forked(&self) -> bool {
        std::process::id() != self.pid
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
        if self.forked() {
            // Only the parent holds it.
            return Err(LostReason::NotOwner);
        }
        let mut clock = self.clock();
        match clock.status(BootInstant::now()) {
            Some(reason) => Err(reason),
            None if clock.released => Err(LostReason::NotOwner),
            None => Ok(()),
        }
    }

    pub fn lost_reason(&self) -> Option<LostReason> {
        if self.forked() {
            // Only the parent holds it; and the clock mutex may have been held by
            // a parent thread at the fork, so a child must never lock it.
            return Some(LostReason::NotOwner);
        }
        self.clock().status(BootInstant::now())
    }

    pub fn lost_receiver(&self) -> Receiver<LostReason> {
        self.lost_rx.clone()
    }

    /// Tells `tx` of this lock's loss too: now, if it is already lost; never,
    /// once it is released.
    pub fn forward_loss(&self, latch: Arc<LossLatch>) {
        let mut clock = self.clock();
        match clock.status(BootInstant::now()) {
            Some(reason) => latch.fire(reason),
            None if clock.released => {}
            None => clock.forward.push(latch),
        }
    }

    /// What is left before the local deadline (zero once it has passed).
    pub fn time_left(&self) -> Duration {
        self.clock
            .lock()
            .deadline
            .saturating_duration_since(BootInstant::now())
    }

    pub fn ttl(&self) -> Duration {
        self.clock().ttl
    }

    pub fn mark_lost(&self, reason: LostReason) {
        self.clock().lose(reason);
    }

    /// Latches the loss (`lost()` fires) without reporting it: for the
    /// scheduler, which must not run the logger or the metrics recorder;
    /// [`report_pending`](Self::report_pending) reports it on a worker.
    pub fn latch_lost(&self, reason: LostReason) {
        self.clock.lock().lose(reason);
    }

    /// Latches expiry if the deadline has passed. Returns whether the lock is
    /// still active (neither lost nor released).
    ///
    /// For the scheduler: the loss is latched and `lost()` fires, but it is not
    /// *reported* here (no log line, no metrics facade: user code that may block);
    /// [`report_pending`](Self::report_pending) does that on a worker.
    pub fn latch_deadline(&self, now: BootInstant) -> Latch {
        let mut clock = self.clock.lock();
        if clock.status(now).is_none() && !clock.released {
            return Latch::Active;
        }
        Latch::Ended {
            lost: clock.lost.is_some(),
            statement: clock.statement,
        }
    }

    /// Reports (log, metrics, event) a loss latched but not yet reported.
    pub fn report_pending(&self) {
        drop(self.clock());
    }

    /// When the scheduler should next look at this lock: the deadline, and the
    /// next renewal unless one is in flight. `None` once lost or released.
    pub fn due(&self, renewals: bool, now: Now) -> Option<Instant> {
        let clock = self.clock();
        if !clock.active() {
            return None;
        }
        let deadline = now.to_instant(clock.deadline);
        if renewals && !self.in_flight.load(Ordering::Acquire) {
            Some(clock.next_renewal.min(deadline))
        } else {
            Some(deadline)
        }
    }

    /// Claims the lock's renewal for a worker if one is due at `now` and none is
    /// in flight.
    pub fn claim_renewal(&self, now: Instant) -> bool {
        {
            let clock = self.clock();
            if !clock.active() || clock.next_renewal > now {
                return false;
            }
        }
        self.in_flight
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Claims the lock's renewal, like [`claim_renewal`](Self::claim_renewal),
    /// when it is due within half its renewal interval: it then goes in the same
    /// request as a neighbour's on a shared session that is due now.
    pub fn claim_renewal_early(&self, now: Instant) -> bool {
        let early = self.clock().renew_every / 2;
        self.claim_renewal(now + early)
    }

    /// Hands the renewal back after a worker ran it.
    pub fn end_renewal(&self) {
        self.in_flight.store(false, Ordering::Release);
    }

    /// How this lock's renewals stand; `None` once lost or released.
    pub fn renewal_view(&self, now: Instant) -> Option<RenewalView> {
        let clock = self.clock();
        if !clock.active() {
            return None;
        }
        let due = clock.overdue_since.unwrap_or(clock.next_renewal);
        Some(RenewalView {
            ttl: clock.ttl,
            renew_every: clock.renew_every,
            lag: now.saturating_duration_since(due),
            failing: clock.failing,
            time_left: clock.deadline.saturating_duration_since(BootInstant::now()),
        })
    }

    /// Stops renewals; returns the loss status at this moment.
    pub fn begin_release(&self) -> Option<LostReason> {
        let mut clock = self.clock();
        let status = clock.status(BootInstant::now());
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
            for latch in clock.forward.drain(..) {
                latch.fire(reason);
            }
            drop(clock);
            // Its hold was already counted as ended by `begin_release`.
            self.telemetry
                .lost(&self.name, self.token, reason, self.granted_at.elapsed());
            return;
        }
        clock.lost_tx = None;
        clock.forward.clear();
    }

    pub fn take_session(&self) -> Option<Box<dyn Session>> {
        self.session.lock().take()
    }

    /// The session, for a release, if it becomes free within `limit`: `None`
    /// when a renewal in flight holds it that long (a statement stuck on a
    /// frozen network path). The session is then marked abandoned, so the
    /// renewal drops it when it ends, and a release never waits without end.
    pub fn take_session_within(&self, limit: Duration) -> Option<Option<Box<dyn Session>>> {
        if let Some(mut slot) = self.session.try_lock_for(limit) {
            return Some(slot.take());
        }
        self.clock().abandoned = true;
        // Freed meanwhile, before the renewal could see the mark: the release
        // goes on with it (that renewal may have renewed the lease).
        if let Some(mut slot) = self.session.try_lock() {
            return Some(slot.take());
        }
        None
    }

    /// Ends the lease on a session whose release gave up waiting for it (see
    /// [`take_session_within`](Self::take_session_within)), once the renewal
    /// that held it lets it go. A renewal the store confirmed extended the
    /// lease by a full TTL, which would block the name with no holder: it is
    /// released here (ownership is checked), as the guard's release would
    /// have. Otherwise, or after an interrupt, the session is closed (which
    /// frees its advisory lock) and the lease runs out.
    fn end_abandoned(&self, session: Option<Box<dyn Session>>, renewed: bool, limit: Duration) {
        let Some(session) = session else { return };
        if !renewed || self.interrupted() {
            drop(session);
            return;
        }
        let limit = limit.max(ABANDONED_RELEASE_LIMIT);
        match session.release(&self.lease_ref(limit)) {
            Ok(_) => {}
            Err(err) => log::warn!(
                "lockbox: releasing lock {:?} after a renewal its release gave up on: {err}; \
                 the lease runs out at its expiry",
                self.name
            ),
        }
    }

    /// After a renewal let go of the session: a release that gave up on it
    /// while it was being let go (too late for the renewal to see its mark,
    /// too early to take the session itself) has it ended here.
    fn after_renewal(&self) {
        if !self.clock().abandoned {
            return;
        }
        let session = match self.session.try_lock() {
            Some(mut slot) => slot.take(),
            None => return,
        };
        // The lease may have been renewed: release it rather than leave it
        // (the clock read first: never held across the release's I/O).
        let ttl = self.clock().ttl;
        self.end_abandoned(session, true, ttl);
    }

    /// Renews the lease on the lock's own session, with a new `(ttl, renew_every)`
    /// or (`None`) the ones in force — read only once the session is ours, so a
    /// concurrent `extend` is never undone by a renewal with the old TTL. With
    /// `wait_for_session` false (the renewal workers) a busy session is skipped.
    /// The statement is bounded by what is left before the deadline.
    pub fn renew(&self, new: Option<(Duration, Duration)>, wait_for_session: bool) -> RenewOutcome {
        let mut p = match self.prepare_renewal(new, wait_for_session) {
            Ok(p) => p,
            Err(outcome) => return outcome,
        };
        let lease = self.lease_ref(p.limit);
        let result = match p.slot.as_mut() {
            Some(session) => session.renew(&lease, p.ttl),
            None => return RenewOutcome::Finished,
        };
        let outcome = self.finish_renewal(p, result);
        self.after_renewal();
        outcome
    }

    /// Renews `locks`, which share `shared`, in one request: each one that is
    /// due and whose session is free (`claimed` by the caller), bounded by the
    /// least time any of them has left.
    /// Returns whether the store said the session is gone (every lock on it is
    /// then lost).
    pub fn renew_shared(locks: &[Arc<LeaseState>], shared: &dyn SharedSession) -> bool {
        let mut prepared = Vec::with_capacity(locks.len());
        for lock in locks {
            if let Ok(p) = lock.prepare_renewal(None, false) {
                prepared.push((lock, p));
            }
        }
        let Some(limit) = prepared.iter().map(|(_, p)| p.limit).min() else {
            return false;
        };
        let leases: Vec<(LeaseRef<'_>, Duration)> = prepared
            .iter()
            .map(|(lock, p)| (lock.lease_ref(p.limit), p.ttl))
            .collect();
        let results = shared.renew_all(&leases, limit.max(Duration::from_millis(1)));
        drop(leases);
        let mut results = match results {
            Ok(each) if each.len() == prepared.len() => each,
            Ok(each) => {
                let err = Error::Unsupported(format!(
                    "the store answered a renewal of {} leases with {} results",
                    prepared.len(),
                    each.len()
                ));
                vec![Err(err); prepared.len()]
            }
            Err(err) => vec![Err(err); prepared.len()],
        };
        let gone = results
            .iter()
            .any(|r| matches!(r, Ok(Renewal::Lost(LostReason::SessionLost))));
        for ((lock, p), result) in prepared.into_iter().zip(results.drain(..)) {
            let _: RenewOutcome = lock.finish_renewal(p, result);
            lock.after_renewal();
        }
        gone
    }

    /// Takes the session and reads what a renewal needs; `Err` with the outcome
    /// when there is nothing to send.
    fn prepare_renewal(
        &self,
        new: Option<(Duration, Duration)>,
        wait_for_session: bool,
    ) -> Result<Prepared<'_>, RenewOutcome> {
        if self.forked() {
            return Err(RenewOutcome::Finished);
        }
        let mut slot = if wait_for_session {
            // Bounded by the lock's time left: a renewal in flight that holds
            // the session longer (stuck on a frozen network path) is past the
            // deadline anyway.
            match self.session.try_lock_for(self.time_left()) {
                Some(slot) => slot,
                None => return Err(RenewOutcome::Busy),
            }
        } else {
            match self.session.try_lock() {
                Some(slot) => slot,
                None => {
                    self.clock().next_renewal = Instant::now() + BUSY_RETRY;
                    return Err(RenewOutcome::Busy);
                }
            }
        };
        if slot.is_none() {
            return Err(RenewOutcome::Finished);
        }
        let ((ttl, renew_every), limit) = {
            let mut clock = self.clock();
            if clock.released {
                // The guard is releasing it and will take the session.
                return Err(RenewOutcome::Finished);
            }
            let now = Instant::now();
            if clock.status(BootInstant::now()).is_some() {
                drop(clock);
                // Lost: drop the session so a still-held advisory lock is freed now
                // rather than when the guard goes away.
                *slot = None;
                return Err(RenewOutcome::Finished);
            }
            let due = clock.next_renewal;
            clock.overdue_since.get_or_insert(due.min(now));
            clock.statement = true;
            let new = new.unwrap_or((clock.ttl, clock.renew_every));
            (
                new,
                clock.deadline.saturating_duration_since(BootInstant::now()),
            )
        };
        Ok(Prepared {
            slot,
            ttl,
            renew_every,
            limit,
            sent_at: Instant::now(),
            sent_boot: BootInstant::now(),
        })
    }

    /// Records what a renewal prepared by [`prepare_renewal`](Self::prepare_renewal)
    /// came to.
    fn finish_renewal(
        &self,
        p: Prepared<'_>,
        result: crate::error::Result<Renewal>,
    ) -> RenewOutcome {
        let Prepared {
            mut slot,
            ttl,
            renew_every,
            sent_at,
            sent_boot,
            ..
        } = p;
        let latency = sent_at.elapsed();
        // A loss latched while the statement ran (the scheduler may have sent an
        // interrupt for it): whatever the answer, the session is closed now, so
        // it never outlives the lock nor goes back to a pool with a cancel
        // request on its way.
        let (lost_meanwhile, abandoned) = {
            let mut clock = self.clock();
            clock.statement = false;
            (
                !clock.released && clock.status(BootInstant::now()).is_some(),
                clock.abandoned,
            )
        };
        if abandoned {
            // The guard's release gave up waiting for this statement: it is
            // ended here, the session mutex let go first (the release may
            // wait for a shared connection).
            let session = slot.take();
            drop(slot);
            // Bounded by what that renewal gave the lease.
            let lease_left = deadline(sent_boot, ttl, Duration::ZERO)
                .saturating_duration_since(BootInstant::now());
            self.end_abandoned(session, matches!(result, Ok(Renewal::Renewed)), lease_left);
            return RenewOutcome::Finished;
        }
        self.telemetry.slow(Slow::Renewal, &self.name, latency, ttl);
        if lost_meanwhile {
            *slot = None;
            self.telemetry
                .renewal(&self.name, self.token, latency, false);
            return RenewOutcome::Finished;
        }
        match result {
            Ok(Renewal::Renewed) => {
                {
                    let mut clock = self.clock();
                    if clock.released {
                        return RenewOutcome::Finished;
                    }
                    // A deadline that passed while the statement was in flight
                    // stays passed: once `is_held` said false it never says true.
                    if clock.status(BootInstant::now()).is_some() {
                        drop(clock);
                        *slot = None;
                        self.telemetry
                            .renewal(&self.name, self.token, latency, false);
                        return RenewOutcome::Finished;
                    }
                    clock.ttl = ttl;
                    clock.renew_every = renew_every;
                    clock.deadline = deadline(sent_boot, ttl, Duration::ZERO);
                    clock.next_renewal = sent_at + renew_every;
                    clock.overdue_since = None;
                    clock.failing = false;
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
                let deadline_in = {
                    let mut clock = self.clock();
                    let pause = (clock.renew_every / 4).clamp(MIN_RETRY, MAX_RETRY);
                    clock.next_renewal = Instant::now() + pause;
                    clock.failing = true;
                    clock.deadline.saturating_duration_since(BootInstant::now())
                };
                self.telemetry
                    .renewal_failed(&self.name, self.token, &err, deadline_in);
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

impl Drop for LeaseState {
    fn drop(&mut self) {
        if self.forked() {
            // The session's connection is the parent's: closing it here would end
            // the parent's session (and free its lock). Leak this copy instead.
            if let Some(session) = self.session.get_mut().take() {
                std::mem::forget(session);
            }
        }
    }
}

impl std::fmt::Debug for LeaseState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseState")
            .field("name", &self.name)
            .field("token", &self.token)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadline_ends_before_the_lease_for_any_wait() {
        let ttl = Duration::from_secs(1);
        let start = BootInstant::now() + Duration::from_secs(100_000);
        for wait_secs in [0, 1, 60, 600, 86_400] {
            let measured = Duration::from_secs(wait_secs);
            let d = deadline(start, ttl, measured);
            // The store's lease ends `ttl` after the wait it measured; with a rate
            // error of 1000 ppm that wait is at least `measured * (1 - 1e-3)` of
            // ours, and `start` is already `called_at + measured`.
            let worst_lease_end = start.saturating_sub(measured / 1000) + ttl;
            assert!(d < worst_lease_end, "wait {wait_secs}s");
            assert!(d <= (start + ttl).saturating_sub(safety_margin(ttl)));
        }
    }
}
