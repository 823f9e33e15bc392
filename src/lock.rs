//! The [`Lock`] guard.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::Receiver;

use crate::backend::Release;
use crate::client::ClientInner;
use crate::error::{Error, LostReason, Result};
use crate::lease::{LeaseState, RenewOutcome};
use crate::lease_info::LeaseStatus;

/// The least time a release statement is given, even past the deadline.
const RELEASE_MIN_LIMIT: Duration = Duration::from_secs(1);

/// A held distributed lock. Releases the lock when dropped.
///
/// A `Lock` is held from the moment it is returned until it is released, dropped or
/// *lost*. Loss happens when the lease cannot be kept alive: the database session
/// ended, the lease stopped being ours, or renewals kept failing until the lock's
/// local deadline (which always ends before the database lease does). Loss is
/// never repaired behind your back: once lost, a `Lock` stays lost, and
/// [`lost`](Self::lost) fires.
///
/// Protect shared resources with the [fencing token](Self::fencing_token), not with
/// `is_held` alone: a check followed by a write can always be overtaken by a pause
/// (GC, swap, `SIGSTOP`) between the two.
///
/// A `Lock` keeps its client's connection pool and renewal thread alive, even after
/// every [`LockClient`](crate::LockClient) handle is dropped.
///
/// **`fork()`**: a child process's copy of a `Lock` is inert. It reports the lock
/// as not held (`NotOwner`), and dropping or releasing it sends nothing: the
/// session belongs to the parent, which keeps holding and renewing the lock.
///
/// Releasing twice cannot happen: [`release`](Self::release) consumes the guard.
///
/// ```compile_fail
/// # fn main() -> Result<(), lockbox::Error> {
/// # let client = lockbox::LockClient::builder("postgres://app@127.0.0.1/app").build()?;
/// let lock = client.lock("jobs")?;
/// lock.release()?;
/// lock.release()?; // error: use of moved value
/// # Ok(()) }
/// ```
#[must_use = "if unused the lock is released immediately"]
#[clippy::has_significant_drop]
pub struct Lock {
    state: Arc<LeaseState>,
    client: Arc<ClientInner>,
    /// Set once released, so `Drop` does nothing more.
    done: bool,
}

impl Lock {
    pub(crate) fn new(state: Arc<LeaseState>, client: Arc<ClientInner>) -> Lock {
        Lock {
            state,
            client,
            done: false,
        }
    }

    /// The lock's name.
    pub fn name(&self) -> &str {
        &self.state.name
    }

    /// The fencing token of this grant: strictly greater than every token issued
    /// before for this name, across releases, expiries, crashes and database
    /// restarts. Pass it with every write to the protected resource, and have the
    /// resource reject writes carrying a token lower than the highest it has seen.
    pub fn fencing_token(&self) -> u64 {
        self.state.token
    }

    /// The lease length currently in force (the acquire's TTL, or the last
    /// [`extend`](Self::extend)'s).
    pub fn ttl(&self) -> Duration {
        self.state.ttl()
    }

    /// What is left before this lock's local deadline, by the boot-time clock:
    /// zero once it has passed. The deadline ends before the store's lease (see
    /// the crate docs), and moves on with each successful renewal; a value that
    /// keeps shrinking below the TTL means renewals are failing. No round trip.
    /// It says nothing of a loss the store reported: check
    /// [`is_held`](Self::is_held) or [`lost`](Self::lost) for that.
    ///
    /// A program that must stop its work *before* the lease could go to someone
    /// else (as `lockbox exec` does) starts stopping when this drops below the
    /// time the work needs to stop.
    pub fn time_left(&self) -> Duration {
        self.state.time_left()
    }

    /// Whether the lock is still held: not lost and its local deadline not passed.
    /// No round trip. Once it returns `false` it never returns `true` again.
    pub fn is_held(&self) -> bool {
        self.state.check().is_ok()
    }

    /// Like [`is_held`](Self::is_held), as a `Result` for use with `?`. No round trip.
    ///
    /// # Errors
    /// [`Error::LockLost`] with the reason once the lock is lost.
    pub fn ensure_held(&self) -> Result<()> {
        self.state.check().map_err(|reason| self.lost_error(reason))
    }

    /// Why the lock was lost, or `None` while it is held.
    pub fn lost_reason(&self) -> Option<LostReason> {
        self.state.lost_reason()
    }

    /// A channel that becomes ready when the lock is lost, for use in
    /// [`crossbeam_channel::select!`].
    ///
    /// On loss, one message carrying the [`LostReason`] is sent and the channel is
    /// then disconnected, so every receiver returned by this method becomes ready:
    /// one of them receives `Ok(reason)`, the others (and later receives)
    /// `Err(RecvError)`. A normal release sends no message; it only disconnects.
    ///
    /// It fires at the local deadline at the latest, from the client's renewal
    /// scheduler, which does no I/O: however stuck a renewal statement, a release
    /// or an [`extend`](Self::extend) is, and whatever other locks are doing. A
    /// loss the store reports (session ended, lease no longer ours) fires when the
    /// next renewal learns it, at most one renewal interval after its cause.
    pub fn lost(&self) -> Receiver<LostReason> {
        self.state.lost_receiver()
    }

    /// Renews the lease now for `ttl` (measured from now, by the database clock)
    /// and uses `ttl` for later renewals. One round trip on the lock's session
    /// (on a session shared with other locks, after any statement of theirs in
    /// flight).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for a TTL out of range (nothing is sent);
    /// [`Error::LockLost`] if the lock is lost; a database error if the renewal's
    /// outcome is unknown (the lock stays held until its current deadline and the
    /// renewal thread keeps trying). On a shared session, a lease row held
    /// locked by another transaction is not waited for: the outcome is then
    /// unknown at once (a session of its own waits for the row, up to the
    /// lock's deadline).
    pub fn extend(&self, ttl: Duration) -> Result<()> {
        let timing = &self.client.timing;
        timing.check_ttl(ttl)?;
        let outcome = self
            .state
            .renew(Some((ttl, timing.renew_interval_for(ttl))), true);
        match outcome {
            RenewOutcome::Renewed => {
                self.client.renewer.wake();
                Ok(())
            }
            RenewOutcome::Failed(err) => Err(err),
            RenewOutcome::Busy if self.state.lost_reason().is_none() => {
                Err(session_busy(self.state.time_left()))
            }
            RenewOutcome::Finished | RenewOutcome::Busy => {
                Err(self.lost_error(self.state.lost_reason().unwrap_or(LostReason::SessionLost)))
            }
        }
    }

    /// Fences your own PostgreSQL transaction with this lock, so that what it
    /// commits is ordered before any next holder's grant.
    ///
    /// Checks, inside `tx` — a [`postgres::Transaction`], or any
    /// [`postgres::GenericClient`] after `BEGIN`, connected to the database that
    /// holds the lease table — that this grant's lease is still current: not
    /// released, not expired by the database clock, not granted to anyone
    /// since. On success the lease row stays locked (`FOR KEY SHARE`) by `tx`
    /// until it commits or rolls back. This lock's renewals and its release go
    /// on meanwhile, but **no other holder can be granted the name before `tx`
    /// ends**: writes `tx` commits after a successful check come before the
    /// next holder's grant, even if this process freezes between the check and
    /// the commit and the lease runs out meanwhile. Call it after your writes'
    /// reads, just before `COMMIT`, or first; either way once per transaction.
    ///
    /// How long `tx` may stay open: renewals are not held up by it, but keep
    /// it short. It holds a `ROW SHARE` lock on the lease table until it ends
    /// (a row lock needs one): DDL that needs an exclusive lock on the table
    /// (`ALTER TABLE`, `VACUUM FULL`, `TRUNCATE`) waits for `tx`, and every
    /// statement on the table then queues behind that DDL — the renewals of
    /// every lock on the table too, which are lost at their deadlines. Run
    /// DDL on the lease table with a short `lock_timeout`
    /// (`review_fence_ddl_queue.rs`). If the lock is lost while `tx` is open — the
    /// process froze, renewals failed — the next holder waits until `tx` ends,
    /// so its writes stay ordered before that grant; but the name is blocked
    /// until then. Bound that with `idle_in_transaction_session_timeout` (or
    /// `transaction_timeout`, PostgreSQL 17+) on the connection you fence
    /// with, and `statement_timeout` (the idle timeout does not end a
    /// statement that runs or waits): lockbox sets nothing on it beyond this
    /// call. A transaction you `PREPARE TRANSACTION` after the check keeps the
    /// row lock, across sessions and restarts, until it is committed or rolled
    /// back by name (`COMMIT PREPARED`): no timeout ends it, and the name is
    /// blocked until then.
    ///
    /// The row lock belongs to the (sub)transaction the check ran in.
    /// `ROLLBACK TO SAVEPOINT` to a savepoint taken before the check (or
    /// dropping a nested [`postgres::Transaction`] given to this call) ends
    /// the fence while the enclosing transaction goes on: fence again after
    /// it. A savepoint released (committed) keeps it.
    ///
    /// Privileges: the role of `tx` needs `SELECT` on the lease table and
    /// `UPDATE` on at least one of its columns (PostgreSQL's rule for row
    /// locks; `UPDATE (renewed_at)` is enough). Any role that can run the
    /// check can hold a name's next grant back for as long as it keeps a
    /// transaction open, as any role that can lock the row could before.
    ///
    /// Every grant by this release waits for a fenced transaction. A process
    /// of a release without this method (during a rolling upgrade) grants
    /// without waiting for one: fence only once none is left.
    ///
    /// Isolation: under `READ COMMITTED` (PostgreSQL's default) the check reads
    /// the lease's latest version, in one round trip (plus the statement's
    /// preparation: the fence does not cache statements on your connection).
    /// Under `REPEATABLE READ` and `SERIALIZABLE` a grant made since the
    /// transaction's snapshot fails the check, and the lease's liveness is
    /// then confirmed on one of lockbox's own connections (a release since the
    /// snapshot would otherwise go unseen, and an expiry the snapshot shows may
    /// have been renewed away since); a snapshot taken before this grant
    /// cannot see its lease (nor, perhaps, the previous holder's last
    /// writes), and the check fails with [`Error::InvalidConfig`]: start the
    /// transaction after acquiring.
    ///
    /// The row checked must be this client's (name, token and owner): a
    /// transaction on another database or server, even one with a lease table
    /// of the same name and a lease of the same name and token, fails the
    /// check (with [`Error::InvalidConfig`] while the lock is held).
    ///
    /// The check's waits (for the lease table's lock and the row's) are
    /// bounded by what is left before the lock's local deadline; `tx`'s own
    /// `lock_timeout` is restored afterwards. The same check is installed
    /// with the lease table as the SQL function `<table>_fence(name text,
    /// token bigint)` for triggers, other languages and `psql`, raising
    /// SQLSTATE [`FENCE_SQLSTATE`](crate::FENCE_SQLSTATE) (`LB001`). The
    /// function has no connection of its own to confirm on: under `REPEATABLE
    /// READ` and `SERIALIZABLE` it judges the lease on the transaction's
    /// snapshot, so a release since that snapshot goes unseen (it passes; the
    /// row lock still orders the next grant after the transaction) and an
    /// expiry the snapshot shows may have been renewed away (it raises
    /// `LB001` for a held lease). Call it as the transaction's first
    /// statement there, or under `READ COMMITTED`. Unlike this method it does
    /// not refuse to run outside a transaction block: there (autocommit) its
    /// row lock ends with its own statement and fences nothing after it. It
    /// is created by the lease table's owner but, unlike the wait-and-grant
    /// function lockbox calls, never checked: a role that may create
    /// functions in the table's schema
    /// can create one of that name first (the owner's build cannot replace
    /// it, and only logs), so check its owner before you rely on it.
    ///
    /// ```no_run
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let url = "postgres://app@127.0.0.1/app";
    /// let client = lockbox::LockClient::builder(url).build()?;
    /// let mut db = postgres::Client::connect(url, postgres::NoTls)?;
    /// let lock = client.lock("invoice:42")?;
    /// let mut tx = db.transaction()?;
    /// tx.execute("UPDATE invoices SET sent = true WHERE id = 42", &[])?;
    /// lock.fence(&mut tx)?; // Err(LockLost): drop `tx`, which rolls back
    /// tx.commit()?;
    /// lock.release()?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`Error::LockLost`] when the lease is not current, or the lock is
    /// already known lost locally (nothing is sent then): roll `tx` back (it
    /// may already have failed, with 40001, under `REPEATABLE READ`).
    /// [`Error::Unsupported`] for a lock of a store other than PostgreSQL;
    /// [`Error::InvalidConfig`] when `tx` is not in a transaction block, or
    /// cannot see the lease while it is held (a snapshot taken before the
    /// grant, another database): the check cannot be had in `tx`; a
    /// database error otherwise (the check's outcome is then unknown: roll
    /// back).
    pub fn fence<C: postgres::GenericClient>(&self, tx: &mut C) -> Result<()> {
        use crate::backend::postgres::fence::{self, Fenced};
        let Some(statement) = self.client.backend().fence_statement(self.state.kind) else {
            return Err(Error::Unsupported(
                "Lock::fence needs a lock of the PostgreSQL store (its lease must live in the \
                 database your transaction runs on)"
                    .to_owned(),
            ));
        };
        self.ensure_held()?;
        let limit = self.state.time_left();
        if limit.is_zero() {
            return Err(self.lost_error(LostReason::Expired));
        }
        let state = &self.state;
        let reason = match fence::run(tx, statement, &state.name, &state.owner, state.token, limit)?
        {
            Fenced::Live { fresh: true } => return Ok(()),
            Fenced::Live { fresh: false } | Fenced::Expired { fresh: false } => {
                // Under a snapshot older than now, confirm the lease on a
                // connection of lockbox's, with a snapshot taken now: the row
                // is already locked, so no grant can come in between. An
                // expiry seen on that snapshot is confirmed too: renewals
                // since pushed `expires_at` forward in versions it cannot see
                // (review_fence_stale_snapshot.rs).
                // This grant's listing: a name with shared leases lists one
                // per holder.
                let lease = self.client.backend().leases(Some(&self.state.name))?;
                match lease
                    .iter()
                    .find(|l| l.fencing_token == self.state.token)
                    .map(|l| (l, &l.status))
                {
                    Some((l, LeaseStatus::Held { .. }))
                        if l.fencing_token == self.state.token && *l.owner == *self.state.owner =>
                    {
                        return Ok(());
                    }
                    Some((l, LeaseStatus::Expired { .. }))
                        if l.fencing_token == self.state.token =>
                    {
                        LostReason::Expired
                    }
                    _ => LostReason::NotOwner,
                }
            }
            Fenced::Gone => {
                // The transaction sees no row of this grant. Lost if the
                // name was granted since; but if the lease is this lock's and
                // current, the transaction cannot see it: its snapshot
                // predates the grant, or it is on another database. That is
                // the caller's mistake, not a loss (review_fence_stale_snapshot.rs).
                let lease = self.client.backend().leases(Some(&self.state.name))?;
                match lease
                    .iter()
                    .find(|l| l.fencing_token == self.state.token)
                    .map(|l| (l, &l.status))
                {
                    Some((l, LeaseStatus::Held { .. }))
                        if l.fencing_token == self.state.token && *l.owner == *self.state.owner =>
                    {
                        return Err(Error::InvalidConfig(format!(
                            "Lock::fence: the transaction does not see the lease of {:?} \
                             (token {}), which is held: its snapshot was taken before the lock \
                             was granted (REPEATABLE READ or SERIALIZABLE: start the transaction \
                             after acquiring), it is not on the lease table's database, or a \
                             row-level security policy hides the row from its role",
                            self.state.name, self.state.token
                        )));
                    }
                    Some((l, LeaseStatus::Expired { .. }))
                        if l.fencing_token == self.state.token =>
                    {
                        LostReason::Expired
                    }
                    _ => LostReason::NotOwner,
                }
            }
            Fenced::Expired { fresh: true } => LostReason::Expired,
            Fenced::TimedOut => self.state.lost_reason().unwrap_or(LostReason::Expired),
            Fenced::Released | Fenced::GrantedSince => LostReason::NotOwner,
        };
        Err(self.lost_error(reason))
    }

    /// Releases the lock: marks the lease released if it is still ours and frees
    /// the lock (with PostgreSQL: unlocks the advisory lock and returns the
    /// connection to the pool, or closes it if it could still hold a lock).
    /// Dropping the guard does the same and logs errors.
    ///
    /// # Errors
    /// [`Error::LockLost`] if the lock had been lost (or its deadline had passed)
    /// before the release: whatever was done under it may have overlapped with
    /// another holder. Nothing of a new holder is touched. A database error if the
    /// release could not be confirmed; the lease then ends at its expiry.
    /// A renewal stuck on the lock's session is waited for at most the lock's
    /// time left (at least 1 s): then [`Error::LockLost`] (`Expired`, signalled
    /// on [`lost`](Self::lost) too), and that renewal ends the lease when it
    /// returns (or closes the session: the lease then runs out).
    pub fn release(mut self) -> Result<()> {
        self.release_inner()
    }

    fn release_inner(&mut self) -> Result<()> {
        self.done = true;
        if self.state.forked() {
            // The parent's lock: touch nothing (see the type's docs on fork()).
            return Err(self.lost_error(LostReason::NotOwner));
        }
        let result = self.release_session();
        let discovered = match &result {
            Err(Error::LockLost { reason, .. }) => Some(*reason),
            _ => None,
        };
        self.state.end_release(discovered);
        self.state.report_release(result.is_ok());
        result
    }

    fn release_session(&mut self) -> Result<()> {
        let status = self.state.begin_release();
        self.client.renewer.unregister(self.state.id);
        // Bounded by what the lease has left, but never so tightly that a release
        // past the deadline cannot free the lock: ownership is checked anyway.
        let limit = self.state.time_left().max(RELEASE_MIN_LIMIT);
        let Some(slot) = self.state.take_session_within(limit) else {
            // A renewal in flight holds the session (stuck): it ends the
            // lease, or closes the session, when it ends. The wait covered all
            // the time left (on a clock that counts no more than the deadline's,
            // and a renewal ending after `begin_release` moves no deadline), so
            // the lock was lost meanwhile: `lost()` says so, as it did when a
            // release waited for the renewal and found the lease expired.
            return Err(self.lost_error(status.unwrap_or(LostReason::Expired)));
        };
        let Some(session) = slot else {
            return Err(self.lost_error(status.unwrap_or(LostReason::SessionLost)));
        };
        if self.state.interrupted() {
            // An interrupt may still be on its way to this session: close it
            // (which frees its advisory lock) rather than release it for reuse.
            drop(session);
            return Err(self.lost_error(status.unwrap_or(LostReason::Expired)));
        }
        let limit = self.state.time_left().max(RELEASE_MIN_LIMIT);
        let outcome = session.release(&self.state.lease_ref(limit))?;
        let reason = match outcome {
            Release::Released => status,
            Release::WasExpired => Some(status.unwrap_or(LostReason::Expired)),
            Release::NotOwner => Some(status.unwrap_or(LostReason::NotOwner)),
            // The session ended after the last renewal but the local deadline has
            // not passed, so the lease still stands and nobody else can have been
            // granted the lock: it was held throughout. The lease could not be
            // marked released and simply runs out.
            Release::SessionLost => {
                if status.is_none() {
                    log::warn!(
                        "lockbox: lock {:?} released, but its session had ended; the lease runs out at its expiry",
                        self.state.name
                    );
                }
                status
            }
        };
        match reason {
            None => Ok(()),
            Some(reason) => Err(self.lost_error(reason)),
        }
    }

    /// Tells `tx` of this lock's loss too (a lock set's channel).
    pub(crate) fn forward_loss(&self, latch: std::sync::Arc<crate::lease::LossLatch>) {
        self.state.forward_loss(latch);
    }

    fn lost_error(&self, reason: LostReason) -> Error {
        Error::LockLost {
            name: self.state.name.clone(),
            reason,
        }
    }
}

/// The error of an `extend` that found the lock's session held by a
/// renewal in flight for all of `waited`.
fn session_busy(waited: std::time::Duration) -> Error {
    Error::database(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!(
            "the lock's session was held for {waited:?} by a renewal that has not answered \
             (a stalled network path or server?); the lock is freed when it does, or its \
             lease runs out"
        ),
    ))
}

impl Drop for Lock {
    fn drop(&mut self) {
        if self.done || self.state.forked() {
            return;
        }
        if let Err(err) = self.release_inner() {
            log::warn!(
                "lockbox: releasing lock {:?} on drop: {err}",
                self.state.name
            );
        }
    }
}

impl fmt::Debug for Lock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lock")
            .field("name", &self.state.name)
            .field("fencing_token", &self.state.token)
            .field("held", &self.is_held())
            .finish()
    }
}
