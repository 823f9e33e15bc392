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
//! - A lock lost or dropped without a release leaves its key to be freed by the
//!   session's next renewal (or by closing the session when it was the last).
//! - A session that dies, or is found in doubt (a key it may hold and cannot
//!   account for), is closed: every lock on it is lost, never leaked.
//! - It goes back to the pool only after its last lock's release freed every
//!   advisory lock of the session, and never once a cancel request was sent to
//!   it; otherwise the connection is closed.

use std::collections::HashSet;
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::{Mutex, MutexGuard};
use postgres::CancelToken;
use postgres::error::SqlState;
use r2d2::PooledConnection;

use super::connection::PgManager;
use super::session::{millis, session_gone, token_param};
use super::tls::PgTarget;
use super::{col, db_error};
use crate::backend::{Interrupter, LeaseRef, Release, Renewal, Session, SharedSession};
use crate::error::{Error, LostReason, Result};

/// The longest a try on a shared session waits for the lease row's lock
/// (another transaction's): the renewals of every lock on the session queue
/// behind it. Past it the acquire goes on with a session of its own.
pub(crate) const SHARED_ROW_WAIT: Duration = Duration::from_millis(20);

/// The client's shared sessions that may take more locks.
#[derive(Debug)]
pub(crate) struct Multiplexer {
    sessions: Mutex<Vec<Weak<SharedConn>>>,
    cap: usize,
}

pub(crate) struct SharedConn {
    /// `None` once closed.
    conn: Mutex<Option<PooledConnection<PgManager>>>,
    state: Mutex<SharedState>,
    cancel: CancelToken,
    target: Arc<PgTarget>,
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
    /// Takes no more locks: it emptied, died, or was sent a cancel request.
    closing: bool,
    /// A cancel request was sent: never pooled again.
    interrupted: bool,
    /// Every advisory lock of the session was freed by its last release.
    clean: bool,
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

    /// The sessions that may take a lock of `key` now, oldest first.
    pub fn candidates(&self, key: (i32, i32)) -> Vec<Arc<SharedConn>> {
        let mut sessions = self.sessions.lock();
        sessions.retain(|s| s.strong_count() > 0);
        sessions
            .iter()
            .filter_map(Weak::upgrade)
            .filter(|s| s.has_room(key, self.cap))
            .collect()
    }

    /// Makes `conn`, whose session was just granted `key`, a shared session
    /// that other locks may join; returns the lock's handle on it.
    pub fn adopt(
        &self,
        conn: PooledConnection<PgManager>,
        key: (i32, i32),
        reclaim: bool,
    ) -> PgMember {
        let shared = Arc::new(SharedConn {
            cancel: conn.client.cancel_token(),
            target: conn.target.clone(),
            pid: conn.pid,
            conn: Mutex::new(Some(conn)),
            state: Mutex::new(SharedState {
                members: 1,
                keys: HashSet::from([key]),
                ..SharedState::default()
            }),
        });
        if self.cap > 1 {
            self.sessions.lock().push(Arc::downgrade(&shared));
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
    fn has_room(&self, key: (i32, i32), cap: usize) -> bool {
        let st = self.state.lock();
        !st.closing && st.members < cap && !st.keys.contains(&key)
    }

    /// Reserves a place for an acquire of `key`: `false` when the session can
    /// no longer take it.
    pub fn reserve(&self, key: (i32, i32), cap: usize) -> bool {
        let mut st = self.state.lock();
        if st.closing || st.members >= cap || st.keys.contains(&key) {
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
        let freed = conn
            .client
            .query_one(&conn.stmts.unlock_key, &[&key.0, &key.1])
            .and_then(|row| row.try_get::<_, bool>(0));
        match freed {
            Ok(_) => true,
            Err(e) => {
                log::warn!(
                    "lockbox: could not free an advisory key on a shared session ({}); closing it",
                    db_error(e)
                );
                self.close(guard);
                false
            }
        }
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
            // lock and no cancel request can be on its way to it.
            conn.broken = !(st.clean && !st.interrupted && st.members == 0);
        }
    }
}

impl SharedSession for SharedConn {
    fn renew_all(
        &self,
        leases: &[(LeaseRef<'_>, Duration)],
        limit: Duration,
    ) -> Result<Vec<Result<Renewal>>> {
        let Some(mut guard) = self.try_lock_conn_for(limit) else {
            return Err(Error::database(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("the shared session was busy for {limit:?} (another statement on it)"),
            )));
        };
        let Some(conn) = guard.as_deref_mut() else {
            return Ok(vec![
                Ok(Renewal::Lost(LostReason::SessionLost));
                leases.len()
            ]);
        };
        let stale: Vec<(i32, i32)> = self.state.lock().stale.clone();
        let names: Vec<&str> = leases.iter().map(|(l, _)| l.name).collect();
        let owners: Vec<&str> = leases.iter().map(|(l, _)| l.owner).collect();
        let tokens: Vec<i64> = leases.iter().map(|(l, _)| token_param(l.token)).collect();
        let ttls: Vec<i64> = leases.iter().map(|(_, ttl)| millis(*ttl)).collect();
        let his: Vec<i32> = stale.iter().map(|k| k.0).collect();
        let los: Vec<i32> = stale.iter().map(|k| k.1).collect();
        let res = conn.client.query(
            &conn.stmts.renew_shared,
            &[&names, &owners, &tokens, &ttls, &millis(limit), &his, &los],
        );
        let rows = match res {
            Ok(rows) => rows,
            Err(e) if session_gone(&e, conn) => {
                self.close(&mut guard);
                return Ok(vec![
                    Ok(Renewal::Lost(LostReason::SessionLost));
                    leases.len()
                ]);
            }
            Err(e) => return Err(db_error(e)),
        };
        if !stale.is_empty() {
            let mut st = self.state.lock();
            st.stale.retain(|k| !stale.contains(k));
            for k in &stale {
                st.keys.remove(k);
            }
        }
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

/// One held lock on a shared session.
pub(crate) struct PgMember {
    shared: Arc<SharedConn>,
    key: (i32, i32),
    /// Whether the release also reclaims old rows.
    reclaim: bool,
    /// Set once the lock left the session (released, or accounted as stale).
    done: bool,
}

impl PgMember {
    pub fn new(shared: Arc<SharedConn>, key: (i32, i32), reclaim: bool) -> PgMember {
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
        let Some(mut guard) = shared.try_lock_conn_for(lease.limit) else {
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
        let stmt = match &conn.stmts.release_reclaim {
            Some(stmt) if self.reclaim => stmt,
            _ => &conn.stmts.release,
        };
        let res = conn.client.query_one(
            stmt,
            &[
                &lease.name,
                &lease.owner,
                &token_param(lease.token),
                &millis(lease.limit),
                &self.key.0,
                &self.key.1,
                &last,
            ],
        );
        match res {
            Ok(row) => {
                let live: Option<bool> = col(&row, 0)?;
                let done: Option<bool> = col(&row, 1)?;
                self.done = true;
                if last && done == Some(true) {
                    let mut st = shared.state.lock();
                    st.keys.clear();
                    st.stale.clear();
                    st.clean = true;
                }
                if done != Some(true) && !last {
                    log::warn!(
                        "lockbox: the release of lock {:?} found its advisory key not held by \
                         its session",
                        lease.name
                    );
                }
                shared.leave(self.key, done == Some(true));
                Ok(match live {
                    Some(true) => Release::Released,
                    Some(false) => Release::WasExpired,
                    None => Release::NotOwner,
                })
            }
            Err(e) if session_gone(&e, conn) => {
                shared.close(&mut guard);
                Ok(Release::SessionLost)
            }
            // The key is freed by the next renewal (dropping `self`), or with
            // the session.
            Err(e) => Err(db_error(e)),
        }
    }

    /// A cancel request to the shared session, which is then never pooled
    /// again; it also stops taking new locks. Holds the session only weakly:
    /// a lost lock's guard does not keep its connection.
    fn interrupter(&self) -> Option<Interrupter> {
        let weak = Arc::downgrade(&self.shared);
        Some(Box::new(move || {
            let Some(shared) = weak.upgrade() else {
                return;
            };
            {
                let mut st = shared.state.lock();
                st.interrupted = true;
                st.closing = true;
            }
            if let Err(e) = shared.target.cancel(&shared.cancel) {
                log::warn!("lockbox: could not send a cancel request: {e}");
            }
        }))
    }

    fn shared(&self) -> Option<Arc<dyn SharedSession>> {
        Some(self.shared.clone())
    }
}

/// Whether `err` is PostgreSQL's lock table running out.
pub(crate) fn lock_table_full(err: &postgres::Error) -> bool {
    err.code() == Some(&SqlState::OUT_OF_MEMORY)
}
