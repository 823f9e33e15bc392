//! A held PostgreSQL lock: the pooled connection whose session holds the advisory
//! lock, used for renewals and the release.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use postgres::error::SqlState;
use r2d2::PooledConnection;

use super::connection::{PgConn, PgManager, Statements};
use super::{col, db_error};
use crate::backend::{Interrupter, LeaseRef, Release, Renewal, Session};
use crate::error::{LostReason, Result};

/// The pause before a release sent again after the lease table's lock ran
/// past the session's bound.
const TABLE_RETRY: Duration = Duration::from_millis(20);

/// Where a client's sweep of the lease table for old rows is: the first page
/// of the next reclaiming release's window (`sql::RECLAIM_PAGES`; the
/// statement takes it modulo the table's pages).
#[derive(Debug, Clone)]
pub(crate) struct Sweep(Arc<AtomicI64>);

impl Sweep {
    /// A sweep from a random page: clients that each reclaim a few times
    /// only (a process that makes a few dozen grants) would otherwise all
    /// look at the table's first pages and never further.
    pub fn new() -> Sweep {
        use std::hash::BuildHasher;
        let random = std::collections::hash_map::RandomState::new().hash_one(std::process::id());
        Sweep(Arc::new(AtomicI64::new((random >> 33) as i64)))
    }

    /// The window a release reclaims in, and the statement that does.
    pub fn window<'c>(
        sweep: Option<&Sweep>,
        stmts: &'c Statements,
    ) -> (i64, &'c postgres::Statement) {
        match (sweep, &stmts.release_reclaim) {
            (Some(sweep), Some(stmt)) => (sweep.0.load(Ordering::Relaxed), stmt),
            _ => (0, &stmts.release),
        }
    }

    /// Moves the sweep on past window `from`, as a release's answer says,
    /// unless another release already did. Never fails: the release is done
    /// whatever this column holds (an unreadable one leaves the sweep where
    /// it is).
    pub fn advance(sweep: Option<&Sweep>, from: i64, row: &postgres::Row) {
        if let (Some(sweep), Ok(next)) = (sweep, row.try_get::<_, i64>(2)) {
            let _ = sweep
                .0
                .compare_exchange(from, next, Ordering::Relaxed, Ordering::Relaxed);
        }
    }
}

pub(crate) struct PgSession {
    conn: PooledConnection<PgManager>,
    /// Set once the release statement freed every advisory lock of the session.
    clean: bool,
    /// The client's sweep, when the release also reclaims old rows.
    reclaim: Option<Sweep>,
    /// The channel an announced lease's release notifies.
    announce: Option<String>,
}

impl PgSession {
    pub fn new(conn: PooledConnection<PgManager>, reclaim: Option<Sweep>) -> PgSession {
        PgSession {
            conn,
            clean: false,
            reclaim,
            announce: None,
        }
    }

    /// Notifies `channel` when the lease is released (an announced lease,
    /// watched by followers).
    pub fn announcing(mut self, channel: String) -> PgSession {
        self.announce = Some(channel);
        self
    }
}

impl std::fmt::Debug for PgSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgSession")
            .field("conn", &*self.conn)
            .finish()
    }
}

impl Drop for PgSession {
    fn drop(&mut self) {
        // Unless released cleanly, the session may still hold the advisory lock:
        // have r2d2 close the connection instead of handing it out again.
        if !self.clean {
            self.conn.broken = true;
        }
    }
}

/// Whether an error means the session itself is gone (and its advisory lock with it).
pub(crate) fn session_gone(err: &postgres::Error, conn: &PgConn) -> bool {
    if conn.client.is_closed() || err.is_closed() {
        return true;
    }
    match err.code() {
        Some(code) => {
            *code == SqlState::ADMIN_SHUTDOWN
                || *code == SqlState::CRASH_SHUTDOWN
                || *code == SqlState::CANNOT_CONNECT_NOW
                || code.code().starts_with("08")
        }
        // No SQLSTATE: an I/O or protocol failure on the socket.
        None => err.as_db_error().is_none(),
    }
}

/// Runs `statement` on `conn` (given what is left until `deadline`) again
/// while it fails because a table's lock ran past the session's bound (see
/// `sql::TABLE_LOCK_WAIT_MS`: an operator's `LOCK TABLE`), or because a late
/// cancel landed on it (see [`PgConn::late_cancel`]): nothing ran, and there
/// is time left. (A row's lock held that long used up the time.)
fn within_table_locks<T>(
    conn: &mut PgConn,
    deadline: Instant,
    mut statement: impl FnMut(&mut PgConn, Duration) -> Result<T, postgres::Error>,
) -> Result<T, postgres::Error> {
    loop {
        match statement(conn, deadline.saturating_duration_since(Instant::now())) {
            Err(e)
                if (e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) || conn.late_cancel(&e))
                    && Instant::now() + TABLE_RETRY < deadline =>
            {
                std::thread::sleep(TABLE_RETRY);
                // A sleep that overran must not start an attempt past the
                // deadline (its cancel request may already have been sent).
                if Instant::now() >= deadline {
                    return Err(e);
                }
            }
            res => return res,
        }
    }
}

pub(crate) fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Tokens are positive `bigint`s (a CHECK constraint says so).
pub(crate) fn token_param(token: u64) -> i64 {
    i64::try_from(token).unwrap_or(i64::MAX)
}

impl Session for PgSession {
    /// Bounded by `lease.limit`: a renewal held up on the lease row (by another
    /// transaction's row lock) gives up with `Err` (SQLSTATE 55P03) at the limit,
    /// and one that gets the row judges the lease live or expired only then.
    fn renew(&mut self, lease: &LeaseRef<'_>, ttl: Duration) -> Result<Renewal> {
        let conn = &mut *self.conn;
        // An `extend` waits a table lock out as it waits out a row's.
        let res = within_table_locks(conn, Instant::now() + lease.limit, |conn, left| {
            conn.client.execute(
                &conn.stmts.renew,
                &[
                    &lease.name,
                    &lease.owner,
                    &token_param(lease.token),
                    &millis(ttl),
                    &millis(left),
                ],
            )
        });
        match res {
            Ok(1) => Ok(Renewal::Renewed),
            Ok(_) => Ok(Renewal::Lost(LostReason::NotOwner)),
            Err(e) if session_gone(&e, conn) => {
                conn.broken = true;
                Ok(Renewal::Lost(LostReason::SessionLost))
            }
            Err(e) => Err(db_error(e)),
        }
    }

    /// PostgreSQL's cancel request (a connection of its own, with the client's
    /// TLS settings, so a `hostssl`-only server takes it), which ends a
    /// statement waiting on any lock or stuck in the executor. The whole
    /// exchange, TLS handshake included, is bounded by the connect timeout.
    fn interrupter(&self) -> Option<Interrupter> {
        let token = self.conn.client.cancel_token();
        let target = self.conn.target.clone();
        Some(Box::new(move || {
            if let Err(e) = target.cancel(&token) {
                log::warn!("lockbox: could not send a cancel request: {e}");
            }
        }))
    }

    /// Bounded by `lease.limit` like [`renew`](Self::renew). On any `Err` the
    /// connection is closed rather than pooled, which frees the advisory lock; the
    /// lease then runs out by itself.
    fn release(mut self: Box<Self>, lease: &LeaseRef<'_>) -> Result<Release> {
        let conn = &mut *self.conn;
        let (from, stmt) = Sweep::window(self.reclaim.as_ref(), &conn.stmts);
        let stmt = stmt.clone();
        let res = within_table_locks(conn, Instant::now() + lease.limit, |conn, left| {
            conn.client.query_one(
                &stmt,
                &[
                    &lease.name,
                    &lease.owner,
                    &token_param(lease.token),
                    &millis(left),
                    // A session of its own: every advisory lock of it is freed.
                    &0i32,
                    &0i32,
                    &true,
                    &from,
                ],
            )
        });
        match res {
            Ok(row) => {
                // Unless this answer is as expected, the advisory lock may still be
                // held: the connection is then closed (by `Drop`), which frees it.
                let live: Option<bool> = col(&row, 0)?;
                self.clean = true;
                Sweep::advance(self.reclaim.as_ref(), from, &row);
                if let Some(channel) = &self.announce {
                    super::coord::notify(conn, channel);
                }
                Ok(match live {
                    Some(true) => Release::Released,
                    Some(false) => Release::WasExpired,
                    None => Release::NotOwner,
                })
            }
            Err(e) if session_gone(&e, conn) => Ok(Release::SessionLost),
            Err(e) => Err(db_error(e)),
        }
    }
}
