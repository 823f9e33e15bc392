//! Multiplexed sessions: many held locks on one pooled connection.
//!
//! A [`SharedConn`] is one server session holding the advisory locks of up to
//! [`LockClientBuilder::locks_per_session`](crate::LockClientBuilder::locks_per_session)
//! held locks, each a [`PgMember`]. Its connection is used by one statement at
//! a time (a mutex): a renewal of every lease on it, a release, or an acquire
//! that tries a key without waiting (one that must wait does so on a session of
//! its own, which then serves others too).
//!
//! Rules that keep it safe:
//! - A session never holds one key twice (advisory locks are reentrant within
//!   a session, so a second holder of a key on it would not be excluded, and
//!   its release would free the first one's key): `keys` holds every key the
//!   session holds or is trying, and a key stays there until it is known to be
//!   freed.
//! - A statement on a shared session never waits long for anything: renewals
//!   skip a lease row another transaction holds (that lease alone is retried),
//!   tries wait at most [`SHARED_ROW_WAIT`] for a row, and zombie takeovers and
//!   waits run on sessions of their own.
//! - A lock lost or dropped without a release leaves its key to a thread that
//!   frees it as soon as the connection is free (or to the session's next
//!   renewal, should that fail), or to closing the session when it was the
//!   last lock on it.
//! - A session that dies, or is found in doubt (a key it may hold and cannot
//!   account for), is closed: every lock on it is lost, never leaked.
//! - It goes back to the pool only after its last lock's release freed every
//!   advisory lock of the session; otherwise the connection is closed.
//! - It is sent no cancel request for its renewals: one names a connection,
//!   not a statement, and a late one would hit a neighbour's next
//!   statement. An acquire's try on it may be, by the watchdog (see
//!   `watchdog.rs`), which keeps that cancel off later statements; when it
//!   cannot be sure to, the session is *tainted*: it takes no more locks,
//!   and closes once its last one leaves (when the cancel most likely
//!   landed, but another's cannot be told from it, it only closes).

use std::collections::HashSet;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::{Mutex, MutexGuard};
use postgres::error::SqlState;
use r2d2::PooledConnection;

use super::connection::PgManager;
use super::session::{Sweep, millis, session_gone, token_param};
use super::sql::MAX_LOCK_TIMEOUT_MS;
use super::watchdog::Taint;
use super::{col, db_error};
use crate::backend::{Interrupter, LeaseRef, Release, Renewal, Session, SharedSession};
use crate::error::{Error, LostReason, Result};

/// The longest a try on a shared session waits for the lease row's lock
/// (another transaction's): the renewals of every lock on the session queue
/// behind it. Past it the acquire goes on with a session of its own.
pub(crate) const SHARED_ROW_WAIT: Duration = Duration::from_millis(20);

/// The most leases one renewal statement renews: with the default
/// `locks_per_session` (1 000), one statement per session and round. A
/// session allowed more takes more statements, with the connection handed to
/// a waiting release or try between them, so neither waits for one statement
/// of tens of thousands of rows. (Statements of 50 measured no better beside
/// 5 000 held locks than one of 1 000: the difference was within the noise.)
const RENEW_CHUNK: usize = 1000;

/// How long the thread that frees a lost lock's key waits for the connection
/// (and for the statement's lock waits, of which it has none): past it, the
/// session's next renewal frees the key.
const STALE_FLUSH_WAIT: Duration = Duration::from_secs(5);

/// The client's shared sessions that may take more locks.
#[derive(Debug)]
pub(crate) struct Multiplexer {
    sessions: Mutex<Vec<Weak<SharedConn>>>,
    cap: usize,
}

pub(crate) struct SharedConn {
    /// This session, for the threads it starts.
    me: Weak<SharedConn>,
    /// `None` once closed.
    conn: Mutex<Option<PooledConnection<PgManager>>>,
    state: Mutex<SharedState>,
    pid: i32,
}

#[derive(Debug, Default)]
struct SharedState {
    /// Locks held on the session, and acquires trying a key on it.
    members: usize,
    /// Every key the session holds, is trying, or may still hold.
    keys: HashSet<(i32, i32)>,
    /// Keys of locks that ended without a release that freed them: freed by
    /// the next renewal.
    stale: Vec<(i32, i32)>,
    /// Takes no more locks: it emptied or died.
    closing: bool,
    /// A thread is on its way to free the stale keys.
    flushing: bool,
    /// Every advisory lock of the session was freed by its last release.
    clean: bool,
    /// A cancel the watchdog sent may still land on it: it takes no more
    /// locks (its connection is closed, not pooled, once free).
    tainted: bool,
}

impl std::fmt::Debug for SharedConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedConn")
            .field("pid", &self.pid)
            .field("state", &*self.state.lock())
            .finish_non_exhaustive()
    }
}

impl Multiplexer {
    pub fn new(cap: usize) -> Multiplexer {
        Multiplexer {
            sessions: Mutex::new(Vec::new()),
            cap: cap.max(1),
        }
    }

    /// Whether held locks share sessions at all.
    pub fn shares(&self) -> bool {
        self.cap > 1
    }

    /// The most locks on one session.
    pub fn cap(&self) -> usize {
        self.cap
    }

    /// The sessions that may take a lock of `key` now, the one holding the
    /// fewest locks first.
    pub fn candidates(&self, key: (i32, i32)) -> Vec<Arc<SharedConn>> {
        let mut found: Vec<(usize, Arc<SharedConn>)> = {
            let mut sessions = self.sessions.lock();
            sessions.retain(|s| s.strong_count() > 0);
            sessions
                .iter()
                .filter_map(Weak::upgrade)
                .filter_map(|s| s.room(key, self.cap).map(|held| (held, s)))
                .collect()
        };
        found.sort_by_key(|(held, _)| *held);
        found.into_iter().map(|(_, s)| s).collect()
    }

    /// Makes `conn`, whose session was just granted `key`, a shared session
    /// that other locks may join; returns the lock's handle on it.
    pub fn adopt(
        &self,
        conn: PooledConnection<PgManager>,
        key: (i32, i32),
        reclaim: Option<Sweep>,
    ) -> PgMember {
        let tainted = conn.taint == Taint::Tainted;
        let shared = Arc::new_cyclic(|me| SharedConn {
            me: me.clone(),
            pid: conn.pid,
            conn: Mutex::new(Some(conn)),
            state: Mutex::new(SharedState {
                members: 1,
                keys: HashSet::from([key]),
                tainted,
                ..SharedState::default()
            }),
        });
        if self.cap > 1 {
            let mut sessions = self.sessions.lock();
            // Ended sessions go here too, not only when an acquire looks for
            // one to join: a program whose acquires all find an idle
            // connection would otherwise grow this list by one per grant.
            sessions.retain(|s| s.strong_count() > 0);
            sessions.push(Arc::downgrade(&shared));
        }
        PgMember {
            shared,
            key,
            reclaim,
            done: false,
        }
    }
}

/// A connection guard of a shared session.
pub(crate) type ConnGuard<'a> = MutexGuard<'a, Option<PooledConnection<PgManager>>>;

impl SharedConn {
    /// How many locks it holds, if it may take one of `key`.
    fn room(&self, key: (i32, i32), cap: usize) -> Option<usize> {
        let st = self.state.lock();
        (!st.closing && !st.tainted && st.members < cap && !st.keys.contains(&key))
            .then_some(st.members)
    }

    /// Takes no more locks: a cancel the watchdog sent may still land on it.
    pub fn taint(&self) {
        self.state.lock().tainted = true;
    }

    /// Reserves a place for an acquire of `key`: `false` when the session can
    /// no longer take it.
    pub fn reserve(&self, key: (i32, i32), cap: usize) -> bool {
        let mut st = self.state.lock();
        if st.closing || st.tainted || st.members >= cap || st.keys.contains(&key) {
            return false;
        }
        st.members += 1;
        st.keys.insert(key);
        true
    }

    /// Gives up a place: `freed` says whether the key is known not to be held
    /// by the session (else it is freed by the next renewal).
    pub fn leave(&self, key: (i32, i32), freed: bool) {
        let mut st = self.state.lock();
        st.members = st.members.saturating_sub(1);
        if freed {
            st.keys.remove(&key);
        } else if !st.stale.contains(&key) {
            st.stale.push(key);
        }
        if st.members == 0 {
            // Closed when the last reference goes (it may hold a stale key).
            st.closing = true;
        }
    }

    pub fn try_lock_conn(&self) -> Option<ConnGuard<'_>> {
        self.conn.try_lock()
    }

    pub fn try_lock_conn_for(&self, timeout: Duration) -> Option<ConnGuard<'_>> {
        self.conn.try_lock_for(timeout)
    }

    /// The connection within `timeout`, or `None`.
    fn lock_conn_for(&self, timeout: Duration) -> Option<ConnGuard<'_>> {
        self.conn.try_lock_for(timeout)
    }

    /// Closes the session: it died, or may hold a key nobody accounts for.
    /// Every lock on it is lost (their renewals say so).
    pub fn close(&self, guard: &mut ConnGuard<'_>) {
        if let Some(mut conn) = guard.take() {
            conn.broken = true;
        }
        self.state.lock().closing = true;
    }

    /// Frees `key` after a try on this session took it but did not grant;
    /// closes the session when that fails.
    pub fn unlock(&self, guard: &mut ConnGuard<'_>, key: (i32, i32)) -> bool {
        let Some(conn) = guard.as_deref_mut() else {
            return false;
        };
        // Sent again once if a late cancel lands on it (helper-72: on a
        // half-tainted session, that closed it, and a neighbour's lock was
        // lost); the session holds each key once, so a second unlock frees
        // nothing else.
        let freed = super::unlock_key(conn, key);
        // On failure the session is closed (its locks are lost, which their
        // renewals report), without a log line here: the logger is user code,
        // and the connection's mutex is held.
        if freed.is_err() {
            self.close(guard);
        }
        freed.is_ok()
    }

    /// Whether the session holds `key`; closes it when it cannot tell.
    pub fn holds(&self, guard: &mut ConnGuard<'_>, key: (i32, i32)) -> Option<bool> {
        let conn = guard.as_deref_mut()?;
        match super::holds_key(conn, key) {
            Ok(held) => Some(held),
            Err(_) => {
                self.close(guard);
                None
            }
        }
    }
}

impl Drop for SharedConn {
    fn drop(&mut self) {
        let st = self.state.get_mut();
        if let Some(conn) = self.conn.get_mut() {
            // Pooled again only when its last release freed every advisory
            // lock.
            conn.broken = !(st.clean && st.members == 0);
        }
    }
}

impl SharedSession for SharedConn {
    /// In statements of at most [`RENEW_CHUNK`] leases, with the connection
    /// handed to any waiting statement (a release, a try) between them.
    fn renew_all(
        &self,
        leases: &[(LeaseRef<'_>, Duration)],
        limit: Duration,
    ) -> Result<Vec<Result<Renewal>>> {
        let deadline = Instant::now() + limit;
        let mut out = Vec::with_capacity(leases.len());
        for chunk in leases.chunks(RENEW_CHUNK) {
            let left = deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1));
            match self.renew_chunk(chunk, left) {
                Ok(each) => out.extend(each),
                Err(e) => out.extend(std::iter::repeat_n(Err(e), chunk.len())),
            }
        }
        // Keys that went stale while the statements ran.
        self.flush_soon();
        Ok(out)
    }
}

/// How much sooner than its limit a shared renewal's wait for a lock ends on
/// the server. The server's clock for a `lock_timeout` starts only when the
/// statement waits, a round trip or two after the client measured what was
/// left (and a loaded server's timer fires late): given exactly the limit, a
/// renewal got its row as the holder's `lost()` fired, and renewed the lease
/// of a lock its holder had been told was lost, keeping the name blocked for
/// another TTL (`review_mux2_late_renewal.rs`, review helper-74).
const SERVER_BOUND_MARGIN: Duration = Duration::from_millis(20);

/// What is left until `deadline`, less [`SERVER_BOUND_MARGIN`] (at most a
/// quarter of it, so that a short limit still leaves the renewal a chance).
fn server_bound(deadline: Instant) -> Duration {
    let left = deadline.saturating_duration_since(Instant::now());
    left.saturating_sub(SERVER_BOUND_MARGIN.min(left / 4))
}

/// How long a `ROLLBACK` cancelled by an operator is sent again.
const ROLLBACK_RETRY_FOR: Duration = Duration::from_secs(1);

/// Rolls back whatever transaction the session has open. A cancel (57014)
/// cancels only the statement it lands on, so a cancelled `ROLLBACK` is sent
/// again, after a pause growing from 1 to 20 ms, for up to
/// [`ROLLBACK_RETRY_FOR`]: closing the session for it would lose every lock
/// on it (`review_mux2_aborted_tx.rs`: an operator's cancels, sent back to
/// back, landed on the `ROLLBACK`, and the session was reported lost).
/// `false`: it could not roll back.
pub(crate) fn roll_back(client: &mut postgres::Client) -> bool {
    let start = Instant::now();
    let mut pause = Duration::from_millis(1);
    loop {
        match client.batch_execute("ROLLBACK") {
            Ok(()) => return true,
            Err(e) if e.code() == Some(&SqlState::QUERY_CANCELED) => {
                if start.elapsed() >= ROLLBACK_RETRY_FOR {
                    return false;
                }
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(20));
            }
            Err(_) => return false,
        }
    }
}

impl SharedConn {
    /// Renews `leases` in one statement, bounded by `limit`.
    fn renew_chunk(
        &self,
        leases: &[(LeaseRef<'_>, Duration)],
        limit: Duration,
    ) -> Result<Vec<Result<Renewal>>> {
        let asked = Instant::now();
        let busy = || {
            Error::database(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("the shared session was busy for {limit:?} (another statement on it)"),
            ))
        };
        let Some(mut guard) = self.try_lock_conn_for(limit) else {
            return Err(busy());
        };
        // The statement gets what is left of the limit after the wait for the
        // connection, or is not sent: past the limit the holder has been told
        // the lock is lost, and a renewal then would keep its name blocked.
        let left = limit.saturating_sub(asked.elapsed());
        if left.is_zero() {
            return Err(busy());
        }
        let rows = self.run_renewal(&mut guard, leases, left);
        MutexGuard::unlock_fair(guard);
        let Some(rows) = rows? else {
            return Ok(vec![
                Ok(Renewal::Lost(LostReason::SessionLost));
                leases.len()
            ]);
        };
        if rows.len() != leases.len() {
            return Err(Error::Unsupported(format!(
                "the server answered a renewal of {} leases with {} rows",
                leases.len(),
                rows.len()
            )));
        }
        let mut out = Vec::with_capacity(rows.len());
        for (i, row) in rows.iter().enumerate() {
            let at: i64 = col(row, 0)?;
            if at != i as i64 + 1 {
                return Err(Error::Unsupported(
                    "the server answered a renewal out of order".to_owned(),
                ));
            }
            out.push(match col::<i32>(row, 1)? {
                1 => Ok(Renewal::Renewed),
                2 => Err(Error::database(std::io::Error::new(
                    std::io::ErrorKind::WouldBlock,
                    "the lease row is locked by another transaction",
                ))),
                _ => Ok(Renewal::Lost(LostReason::NotOwner)),
            });
        }
        Ok(out)
    }
}

impl SharedConn {
    /// Renews `leases` (none: only frees the stale keys) in one statement,
    /// freeing the session's stale keys first. `None`: the session is gone
    /// (it is closed).
    fn run_renewal(
        &self,
        guard: &mut ConnGuard<'_>,
        leases: &[(LeaseRef<'_>, Duration)],
        limit: Duration,
    ) -> Result<Option<Vec<postgres::Row>>> {
        let deadline = Instant::now() + limit;
        let Some(conn) = guard.as_deref_mut() else {
            return Ok(None);
        };
        let stale: Vec<(i32, i32)> = self.state.lock().stale.clone();
        // `None`: the time was used up before the renewal could be sent
        // (nothing renewed, no transaction opened).
        let res = (|| {
            if !stale.is_empty() {
                let his: Vec<i32> = stale.iter().map(|k| k.0).collect();
                let los: Vec<i32> = stale.iter().map(|k| k.1).collect();
                conn.client
                    .query_one(&conn.stmts.unlock_keys, &[&his, &los])?;
                let mut st = self.state.lock();
                st.stale.retain(|k| !stale.contains(k));
                for k in &stale {
                    st.keys.remove(k);
                }
            }
            if leases.is_empty() {
                return Ok(Some(Vec::new()));
            }
            let names: Vec<&str> = leases.iter().map(|(l, _)| l.name).collect();
            let owners: Vec<&str> = leases.iter().map(|(l, _)| l.owner).collect();
            let tokens: Vec<i64> = leases.iter().map(|(l, _)| token_param(l.token)).collect();
            let ttls: Vec<i64> = leases.iter().map(|(_, ttl)| millis(*ttl)).collect();
            // Measured after the stale keys' unlock, which may have used the
            // time up: then nothing is sent.
            let bound = server_bound(deadline);
            if bound < Duration::from_millis(1) {
                return Ok(None);
            }
            // In a transaction whose lock timeout is set before the statement
            // starts: the lease table's own lock is taken as the statement
            // starts, before anything in it could set one, and behind an
            // operator's DDL it would wait without end, holding up the whole
            // session (a session of its own is sent a cancel instead, which a
            // shared one never is).
            let limit_ms = millis(bound).clamp(1, MAX_LOCK_TIMEOUT_MS);
            conn.client
                .batch_execute(&format!("BEGIN; SET LOCAL lock_timeout = '{limit_ms}ms'"))?;
            let rows = conn.client.query(
                &conn.stmts.renew_shared,
                &[&names, &owners, &tokens, &ttls, &limit_ms],
            )?;
            // Not undone when it comes back late: `limit` is the earliest
            // deadline of the batch, and rolling the whole batch back for it
            // failed the renewals of neighbours with time to spare, again and
            // again while a short-TTL lock shared the session, and threw away
            // the verdicts of leases found not ours (review helper-76). So
            // `lock_timeout` (per wait, started late) and the commit's own
            // latency can still land a renewal just after the earliest
            // lease's `lost()` fired: that name then stays blocked for up to
            // another TTL, and nobody is let in early.
            conn.client.batch_execute("COMMIT")?;
            Ok(Some(rows))
        })();
        let res = match res {
            Ok(None) => {
                return Err(Error::database(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "the shared renewal of {} leases was not sent: the earliest one's \
                         time ({limit:?}) was used up first; nothing was renewed",
                        leases.len()
                    ),
                )));
            }
            Ok(Some(rows)) => Ok(rows),
            Err(e) => Err(e),
        };
        let err = match res {
            Ok(rows) => return Ok(Some(rows)),
            Err(e) => e,
        };
        if session_gone(&err, conn) {
            self.close(guard);
            return Ok(None);
        }
        // Whatever failed (an operator's cancel may land between any two
        // round trips), no transaction may stay open on the session: an
        // aborted one would fail every statement of every lock on it. A
        // session that cannot even roll back is closed.
        if !roll_back(&mut conn.client) {
            self.close(guard);
        }
        Err(db_error(err))
    }

    /// Frees the session's stale keys as soon as its connection is free, on a
    /// thread of its own (at most one per session at a time): a waiter for a
    /// lost lock's name must not wait for the next renewal of its neighbours,
    /// which may be minutes away, and whoever calls this (a `Drop`, perhaps
    /// on a thread that must not block on I/O) never waits for the statement.
    fn flush_soon(&self) {
        {
            let mut st = self.state.lock();
            if st.stale.is_empty() || st.flushing || st.members == 0 {
                // Nothing to free; or it is under way; or the session, empty,
                // is closed when its last reference goes, which frees them.
                return;
            }
            st.flushing = true;
        }
        let Some(shared) = self.me.upgrade() else {
            return;
        };
        let spawned = std::thread::Builder::new()
            .name("lockbox-unlock".to_owned())
            .spawn(move || {
                loop {
                    let mut guard = shared.lock_conn_for(STALE_FLUSH_WAIT);
                    let flushed = match guard.as_mut() {
                        Some(guard) => shared.run_renewal(guard, &[], STALE_FLUSH_WAIT),
                        None => Ok(None),
                    };
                    drop(guard);
                    let mut st = shared.state.lock();
                    // Keys that went stale meanwhile are this thread's too.
                    if flushed.is_ok() && !st.stale.is_empty() && st.members > 0 && !st.closing {
                        continue;
                    }
                    st.flushing = false;
                    drop(st);
                    if let Err(e) = flushed {
                        log::warn!(
                            "lockbox: could not free the advisory keys of lost locks on a \
                             shared session ({e}); its next renewal frees them"
                        );
                    }
                    return;
                }
            });
        if let Err(e) = spawned {
            self.state.lock().flushing = false;
            log::warn!("lockbox: could not start a thread to free lost locks' keys: {e}");
        }
    }
}

/// One held lock on a shared session.
pub(crate) struct PgMember {
    shared: Arc<SharedConn>,
    key: (i32, i32),
    /// The client's sweep, when the release also reclaims old rows.
    reclaim: Option<Sweep>,
    /// Set once the lock left the session (released, or accounted as stale).
    done: bool,
}

impl PgMember {
    pub fn new(shared: Arc<SharedConn>, key: (i32, i32), reclaim: Option<Sweep>) -> PgMember {
        PgMember {
            shared,
            key,
            reclaim,
            done: false,
        }
    }
}

impl std::fmt::Debug for PgMember {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgMember")
            .field("session", &self.shared.pid)
            .finish_non_exhaustive()
    }
}

impl Drop for PgMember {
    fn drop(&mut self) {
        // Lost, or abandoned: its key is freed by the session's next renewal,
        // or with the session when it was the last lock on it.
        if !self.done {
            self.shared.leave(self.key, false);
            self.shared.flush_soon();
        }
    }
}

impl Session for PgMember {
    fn renew(&mut self, lease: &LeaseRef<'_>, ttl: Duration) -> Result<Renewal> {
        let mut each = self.shared.renew_all(&[(*lease, ttl)], lease.limit)?;
        each.pop()
            .unwrap_or(Ok(Renewal::Lost(LostReason::NotOwner)))
    }

    /// Frees only this lock's key, unless it is the session's last lock: then
    /// every advisory lock of the session, so the connection goes back to the
    /// pool clean. Bounded by `lease.limit`, the wait for the connection
    /// included.
    fn release(mut self: Box<Self>, lease: &LeaseRef<'_>) -> Result<Release> {
        let shared = self.shared.clone();
        let deadline = Instant::now() + lease.limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some(mut guard) = shared.try_lock_conn_for(left) else {
                return Err(Error::database(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the shared session stayed busy until the lock's deadline",
                )));
            };
            let Some(conn) = guard.as_deref_mut() else {
                return Ok(Release::SessionLost);
            };
            let last = {
                let mut st = shared.state.lock();
                let last = st.members == 1;
                if last {
                    st.closing = true;
                }
                last
            };
            let (from, stmt) = Sweep::window(self.reclaim.as_ref(), &conn.stmts);
            // The wait for the lease row (another transaction's lock) in short
            // slices, with the connection free between them: the session's
            // renewals must not queue behind it.
            let slice = left.min(SHARED_ROW_WAIT);
            let res = conn.client.query_one(
                stmt,
                &[
                    &lease.name,
                    &lease.owner,
                    &token_param(lease.token),
                    &millis(slice),
                    &self.key.0,
                    &self.key.1,
                    &last,
                    &from,
                ],
            );
            let row = match res {
                Ok(row) => row,
                Err(e) if session_gone(&e, conn) => {
                    shared.close(&mut guard);
                    return Ok(Release::SessionLost);
                }
                Err(e)
                    if (e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE)
                        || conn.late_cancel(&e))
                        && Instant::now() < deadline =>
                {
                    // Between slices the connection goes to a waiting
                    // renewal or acquire (a session whose last lock this is
                    // takes no new one meanwhile: its release frees every key).
                    // A late cancel's statement is sent again too.
                    MutexGuard::unlock_fair(guard);
                    continue;
                }
                // The key is freed by dropping `self` (on its own thread as
                // soon as the connection is free), or with the session.
                Err(e) => return Err(db_error(e)),
            };
            let live: Option<bool> = col(&row, 0)?;
            let done: Option<bool> = col(&row, 1)?;
            self.done = true;
            Sweep::advance(self.reclaim.as_ref(), from, &row);
            if last && done == Some(true) {
                let mut st = shared.state.lock();
                st.keys.clear();
                st.stale.clear();
                st.clean = true;
            }
            shared.leave(self.key, done == Some(true));
            drop(guard);
            if done != Some(true) && !last {
                // Logged with the connection free: the logger is user code.
                log::warn!(
                    "lockbox: the release of lock {:?} found its advisory key not held by \
                     its session",
                    lease.name
                );
            }
            shared.flush_soon();
            return Ok(match live {
                Some(true) => Release::Released,
                Some(false) => Release::WasExpired,
                None => Release::NotOwner,
            });
        }
    }

    /// None: a cancel request names a connection, not a statement, and one
    /// that arrives late would hit whatever a neighbour runs next on the
    /// session. A statement on a shared session waits for nothing without a
    /// bound of its own (lock waits end at the least limit of the locks it
    /// serves, row locks are skipped or waited for in short slices); one stuck
    /// anyway (a hung backend, a frozen network path) holds up only its
    /// worker, and every lock on the session still fires `lost()` at its own
    /// deadline.
    fn interrupter(&self) -> Option<Interrupter> {
        None
    }

    fn shared(&self) -> Option<Arc<dyn SharedSession>> {
        Some(self.shared.clone())
    }
}

/// Whether `err` is PostgreSQL's lock table running out: SQLSTATE 53200 with
/// the hint naming `max_locks_per_transaction` (the setting's name is not
/// translated, whatever `lc_messages`), not any other out-of-memory error.
pub(crate) fn lock_table_full(err: &postgres::Error) -> bool {
    err.code() == Some(&SqlState::OUT_OF_MEMORY)
        && err
            .as_db_error()
            .and_then(|d| d.hint())
            .is_some_and(|h| h.contains("max_locks_per_transaction"))
}
