//! The PostgreSQL backend: session advisory locks for exclusion, crash release and
//! server-side waiting; a lease table as the authoritative record.
//!
//! An acquire runs on one pooled connection. Its first statement *tries* the
//! advisory lock for the name's key and, if it got it and the lease row is free
//! (released, or expired by the database clock), writes the lease with the next
//! fencing token, committed durably. Only when the key is held by another session
//! does the acquire count as waiting and block inside the server
//! (`pg_advisory_lock` bounded by `lock_timeout`), in slices that end just after
//! the lease of the session holding the key would expire, so that a zombie is
//! noticed; the grant after a wait is decided by a statement of its own, with a
//! snapshot taken after the wait.
//!
//! If the key is free but a live lease of another session remains (its holder
//! died without releasing), the acquirer reads what that lease has left, frees the
//! key, sleeps until the lease ends and contends again (lock-delay): nobody ever
//! sleeps holding the key. If the session holding the key has only expired leases
//! (a paused or hung holder: a *zombie*), the acquirer terminates that session and
//! takes over. Both look at the session holding the *key*, whatever name it holds
//! it for, so two names sharing a key wait and take over correctly.

mod bounds;
mod connection;
mod contention;
mod coord;
pub(crate) mod fence;
mod inspect;
mod key;
mod session;
mod shared;
mod sql;
mod tls;
mod watchdog;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use postgres::error::SqlState;
use postgres::types::ToSql;
use postgres::{Row, Statement};
use r2d2::{Pool, PooledConnection};

use crate::backend::{AcquireRequest, Backend, Grant, LeaseKind, Wait, WaitingGuard};
use crate::config::LockClientBuilder;
use crate::error::{Error, Result};
use crate::health::{DatabaseHealth, PoolHealth};
use crate::lease_info::LeaseInfo;

pub(crate) use connection::describe_url;
use connection::{Connector, OpenError, PgConn, PgManager, describe_target};
use session::{PgSession, millis};
use shared::{ConnGuard, Multiplexer, PgMember, SHARED_ROW_WAIT, SharedConn};
use sql::{SESSION_SETUP, Sql, TableInfo};
use watchdog::Overrun;

pub use key::advisory_key;
pub(crate) use key::name_key;
use key::{DDL_KEY, SESSION_PROBE_KEY};
pub use sql::FENCE_SQLSTATE;

/// PostgreSQL 14 added `pg_terminate_backend(pid, timeout)` and
/// `idle_session_timeout`, both of which lockbox relies on.
const MIN_SERVER_VERSION: i32 = 140_000;
/// How long a takeover waits for a terminated zombie session to exit.
const TERMINATE_WAIT: Duration = Duration::from_secs(5);
/// How long the retry after a dead pooled connection waits for another.
const RETRY_CHECKOUT: Duration = Duration::from_secs(1);
/// A pooled connection idle this long is validated before use.
const VALIDATE_AFTER_IDLE: Duration = Duration::from_secs(1);
/// The longest an acquire statement waits for the lease row's lock (held by
/// another transaction: a fenced one, an operator's) before giving up: a
/// `try_lock` then reports the lock not acquired, a waiting acquire tries again
/// after [`ROW_LOCK_RETRY`]. Never more than a quarter of the TTL (see
/// [`row_lock_wait`]).
const ROW_LOCK_WAIT: Duration = Duration::from_secs(1);

/// The longest an acquire of `ttl` waits for the lease row's lock at a time
/// (`lock_timeout`: one wait, not their sum): the lease's end is read before
/// that wait (from the statement's start on the server, from its sending on
/// the client), so a longer wait would shorten it. A grant whose lease would
/// have ended by the time it has the row (several lockers letting go one
/// after another) grants nothing (`pg_fence.rs`: the next holder waits behind
/// a fenced transaction; `review_pg_row_wait_takeover.rs`).
fn row_lock_wait(ttl: Duration) -> Duration {
    ROW_LOCK_WAIT.min(ttl / 4)
}
/// How long `build()` waits for the catalog to create the wait-and-grant
/// function before it does without it.
const CREATE_FUNCTION_WAIT: Duration = Duration::from_millis(500);
/// How long an acquire waits for one busy shared session's connection at a
/// time, when the pool has no connection to spare, before it looks at every
/// session (and the pool) again.
const SHARED_WAIT_STEP: Duration = Duration::from_millis(20);
/// The pause before a waiting acquire retries after [`ROW_LOCK_WAIT`] ran out.
const ROW_LOCK_RETRY: Duration = Duration::from_millis(50);
/// The longest first wait slice of a blocking acquire, which waits with its
/// first statement (see [`first_wait_slice`]).
const FIRST_WAIT_SLICE: Duration = Duration::from_millis(100);

/// The first wait slice of a blocking acquire with `left` to wait (ms), which
/// waits with its first statement. The lease table is not read before that
/// wait (a waiter holds no lock on it), so nothing tells yet whether the key's
/// holder is a zombie (every lease it holds expired) or how long its lease
/// lasts. So the slice is short: [`FIRST_WAIT_SLICE`], at most one TTL and
/// half of `left` (a timed wait probes the holder before its time is up);
/// when it ends, the holder is probed, the acquire counts as waiting, and the
/// wait goes on in slices the server times from the holder's lease. Long
/// enough that a hand-off behind a short critical section is granted within
/// it.
fn first_wait_slice(ttl: Duration, left: i64) -> i64 {
    millis(FIRST_WAIT_SLICE.min(ttl)).min(left / 2).max(1)
}

/// Whether `e` says a statement's wait for a lock ran out: one wait
/// (`lock_timeout`), or the statement as a whole (cancelled by the watchdog
/// once it `overran` its bound; or by the late cancel of an earlier one,
/// when its session is tainted: pass `overran || conn.taint.any()`).
fn row_wait_ran_out(e: &postgres::Error, overran: bool) -> bool {
    e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE)
        || (overran && e.code() == Some(&SqlState::QUERY_CANCELED))
}

/// A key wait the server measured at this or longer counts as having waited
/// for a holder (for the metrics): an advisory lock on a free key is taken in
/// microseconds.
const QUEUED_AFTER_US: i64 = 1_000;
/// How long after its deadline a blocking acquire holding the key still
/// makes the grant its last statement left to the next (a takeover with a
/// history, a bound passed): a tiny timeout is then granted a free name as
/// a try is, while an acquire held up by the lease row past its deadline
/// (each row wait is bounded, not their sum) times out.
const FOLLOW_UP_GRACE: Duration = Duration::from_millis(250);
/// How far past its own lock waits an acquire's statement may run before
/// the watchdog cancels it: each wait for a lock is bounded
/// (`lock_timeout`), not their sum, and transactions taking turns on the
/// lease row would otherwise hold a try, or a timed acquire, for as long as
/// they keep it up. Room for a wait for the table's lock and the commit.
const STATEMENT_SLACK: Duration =
    Duration::from_millis(sql::TABLE_LOCK_WAIT_MS as u64).saturating_add(FOLLOW_UP_GRACE);
/// Added to a lock-delay so that it ends just after the lease.
const EXPIRY_SLACK: Duration = Duration::from_millis(sql::EXPIRY_SLACK_MS as u64);

pub(crate) struct PgBackend {
    pool: Pool<PgManager>,
    key_fn: fn(&str) -> i64,
    /// Health probes, which use a connection of their own, one at a time.
    prober: inspect::Prober,
    sql: Arc<Sql>,
    target: String,
    pool_size: u32,
    pool_timeout: Duration,
    /// Grants so far: every [`sql::RECLAIM_EVERY`]th one's release reclaims.
    grants: AtomicU64,
    /// Where those releases reclaim.
    sweep: session::Sweep,
    /// The sessions held locks share.
    mux: Multiplexer,
    /// The statements of shared leases (`None`: the shared-lease table is
    /// missing, and only exclusive leases are granted).
    coord: Option<Arc<coord::CoordSql>>,
    /// Opens the sessions of watches (not pooled: each listens as long as
    /// its watch lives).
    watch_connector: Connector,
    /// Keys lately found held: their blocking acquires wait first.
    contention: contention::Contention,
    /// Cancels an acquire's statement held past its bound.
    watchdog: watchdog::Watchdog,
}

impl std::fmt::Debug for PgBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgBackend")
            .field("target", &self.target)
            .field("table", &self.sql.table)
            .field("unlogged", &self.sql.recover.is_some())
            .field("pool_size", &self.pool_size)
            .finish_non_exhaustive()
    }
}

/// Reads column `idx` of a server's answer, as a typed error rather than a panic
/// when it is missing or of an unexpected type.
pub(crate) fn col<'a, T: postgres::types::FromSql<'a>>(row: &'a Row, idx: usize) -> Result<T> {
    row.try_get(idx).map_err(db_error)
}

/// Maps a driver error, naming a missing privilege when that is the cause, and
/// a write refused by a read-only session (a write fence or a standby) as
/// [`Error::Unsupported`], as `build()` and new pooled sessions refuse one.
pub(crate) fn db_error(err: postgres::Error) -> Error {
    if err.code() == Some(&SqlState::READ_ONLY_SQL_TRANSACTION) {
        let msg = err
            .as_db_error()
            .map(|d| d.message().to_owned())
            .unwrap_or_default();
        return Error::Unsupported(format!(
            "the session is read-only ({msg}, SQLSTATE 25006): writes are fenced off on this \
             server (default_transaction_read_only is on, or it is a standby); lockbox takes \
             locks only on a primary that accepts writes"
        ));
    }
    if shared::lock_table_full(&err) {
        return Error::LockTableFull(Arc::new(err));
    }
    if err.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) {
        let msg = err
            .as_db_error()
            .map(|d| d.message().to_owned())
            .unwrap_or_default();
        return Error::InsufficientPrivilege(msg);
    }
    Error::database(err)
}

impl PgBackend {
    /// Connects, checks the server, creates the lease table if allowed, and sets up
    /// the pool.
    pub fn connect(b: &LockClientBuilder) -> Result<PgBackend> {
        let (url, tls_options) = tls::split_options(&b.url)?;
        let mut config: postgres::Config = url.parse().map_err(|e: postgres::Error| {
            Error::InvalidConfig(format!(
                "invalid connection string: {}",
                connection::describe_parse_error(&e)
            ))
        })?;
        config.connect_timeout(b.connect_timeout);
        // A dead peer must fail a renewal long before the lease would run out.
        config.keepalives(true);
        config.keepalives_idle(Duration::from_secs(5));
        config.keepalives_interval(Duration::from_secs(2));
        config.keepalives_retries(3);
        config.tcp_user_timeout((b.ttl / 2).clamp(Duration::from_secs(1), Duration::from_secs(30)));
        if config.get_application_name().is_none() {
            config.application_name("lockbox");
        }
        let pg_target = Arc::new(tls::PgTarget::new(config, &tls_options)?);
        // Where the driver really connects (a socket path with a hostaddr is
        // that address, over TCP).
        let target = describe_target(pg_target.config());
        // Every session lockbox opens is set up within the connect timeout, and
        // attempts a frozen server leaves waiting are bounded: the pool's plus
        // the two `build()` uses.
        let connector = Connector::new(
            pg_target.clone(),
            b.connect_timeout,
            b.pool_size as usize + 2,
        );

        let watch_connector = coord::watch_connector(pg_target.clone(), b.connect_timeout);
        let check_target = pg_target.clone();
        let (mut client, version, keeps, read_only) = connector
            .open(move |mut client| {
                let version: i32 = client
                    .query_one(
                        "SELECT pg_catalog.current_setting('server_version_num')::pg_catalog.int4",
                        &[],
                    )
                    .and_then(|row| row.try_get(0))
                    .map_err(OpenError::Setup)?;
                if version < MIN_SERVER_VERSION {
                    return Ok((client, version, true, None));
                }
                // Read before the session settings are pinned, which would hide
                // a read-only default.
                let read_only = read_only(&mut client)?;
                client
                    .batch_execute(SESSION_SETUP)
                    .map_err(OpenError::Setup)?;
                let keeps = keeps_session(&mut client, &check_target)?;
                Ok((client, version, keeps, read_only))
            })
            .map_err(|e| e.into_error(&target))?;
        if version < MIN_SERVER_VERSION {
            return Err(Error::Unsupported(format!(
                "PostgreSQL {version} is older than 14, which lockbox requires"
            )));
        }
        if let Some(why) = read_only {
            return Err(OpenError::ReadOnly(why).into_error(&target));
        }
        if !keeps {
            return Err(Error::Unsupported(
                "the connection path does not keep session state (a transaction-pooling proxy \
                 such as PgBouncer with pool_mode=transaction?); lockbox needs real sessions \
                 for its advisory locks: connect directly or use session pooling"
                    .to_owned(),
            ));
        }
        let table = ensure_table(
            &mut client,
            &b.table,
            b.create_table,
            b.unlogged_leases,
            b.keep_history.then_some(b.history_retention),
            b.connect_timeout,
        )?;
        drop(client);
        let sql = Arc::new(Sql::new(&table));
        let coord = table.shared.as_ref().map(|ts| {
            Arc::new(coord::CoordSql::new(
                &table.quoted,
                ts,
                table.history.as_ref().map(|h| h.quoted.as_str()),
            ))
        });
        let manager = PgManager::new(connector, sql.clone());
        // Prepares every statement once now, so a table of the wrong shape is
        // reported by `build()` rather than by each acquire.
        drop(
            manager
                .connect_configured()
                .map_err(|e| e.into_error(&target))?,
        );

        let pool = Pool::builder()
            .thread_pool(crate::backend::r2d2_threads())
            .max_size(b.pool_size)
            // Connections are opened on demand; held locks pin theirs.
            .min_idle(Some(0))
            // No validation query per checkout: `checkout` polls the socket instead.
            .test_on_check_out(false)
            .connection_timeout(b.pool_timeout)
            .build_unchecked(manager);
        Ok(PgBackend {
            pool,
            key_fn: b.key_fn,
            prober: inspect::Prober::new(pg_target, &sql),
            sql,
            target,
            pool_size: b.pool_size,
            pool_timeout: b.pool_timeout,
            grants: AtomicU64::new(0),
            sweep: session::Sweep::new(),
            contention: contention::Contention::default(),
            watchdog: watchdog::Watchdog::default(),
            mux: Multiplexer::new(b.locks_per_session as usize),
            coord,
            watch_connector,
        })
    }

    /// Takes a live pooled connection, waiting up to the pool timeout whatever the
    /// acquire's own wait: opening a connection is not waiting for a holder, and a
    /// tiny lock wait must not fail for want of an idle connection.
    ///
    /// Only a connection that sat idle for [`VALIDATE_AFTER_IDLE`] or longer is
    /// validated with an empty query (r2d2's `test_on_check_out` would cost that
    /// round trip on every acquire): busy connections are known good, and idle
    /// ones are where a server restart or an operator's `pg_terminate_backend`
    /// leaves dead sessions. A dead one is dropped for another.
    fn checkout(
        &self,
        req: &AcquireRequest<'_>,
        limit: Duration,
        mut first: Option<PooledConnection<PgManager>>,
    ) -> Result<PooledConnection<PgManager>> {
        let _waiting = req.pool_waiting();
        for _ in 0..=self.pool_size {
            let taken = first
                .take()
                .map_or_else(|| self.pool.get_timeout(limit), Ok);
            let mut conn = taken.map_err(|e| {
                if self.pool.state().connections < self.pool_size {
                    // Room in the pool, yet no connection: the database is unreachable.
                    Error::Connect {
                        target: self.target.clone(),
                        source: std::sync::Arc::new(e),
                    }
                } else {
                    Error::PoolTimeout {
                        waited: limit,
                        pool_size: self.pool_size,
                    }
                }
            })?;
            if conn.idle_since.elapsed() < VALIDATE_AFTER_IDLE
                || conn.client.simple_query("").is_ok()
            {
                return Ok(conn);
            }
            conn.broken = true;
            log::debug!("lockbox: dropped a pooled connection whose session had ended");
        }
        Err(Error::Connect {
            target: self.target.clone(),
            source: std::sync::Arc::from(Box::<dyn std::error::Error + Send + Sync>::from(
                "every pooled connection was found closed",
            )),
        })
    }

    /// The acquire loop on one connection. `holds` tracks whether the session holds
    /// the advisory lock. Returns the token, the send time of the granting
    /// statement, and whether the acquire waited on a holder.
    fn acquire_on(
        &self,
        conn: &mut PgConn,
        holds: &mut bool,
        dead_on_arrival: &mut bool,
        req: &AcquireRequest<'_>,
        key: (i32, i32),
    ) -> Result<Option<(i64, Instant, bool)>> {
        let ttl_ms = millis(req.ttl);
        let blocking = req.wait() != Wait::No;
        // A non-blocking acquire terminates at most one zombie, then tries once more.
        let mut took_over = false;
        // Raised once this acquire has found the lock held: it waits on a holder.
        let mut waiting = None;
        let mut waited = false;
        let mut first_statement = true;
        // A blocking acquire of a key lately found held waits with its first
        // statement, through the wait-and-grant function: a waiter handed the
        // lock costs one round trip instead of a try and then a wait. Others
        // try first (a free lock's grant by the function costs more than the
        // try's), as does one with under 1 ms left.
        if blocking
            && conn.stmts.wait_grant.is_some()
            && req
                .remaining()
                .is_some_and(|r| r >= Duration::from_millis(1))
            && self.contention.is_contended(key)
        {
            first_statement = false;
            let left = req.remaining().map_or(0, millis);
            let first = first_wait_slice(req.ttl, left);
            let arrival = FirstWait {
                dead_on_arrival,
                waiting: &mut waiting,
            };
            match self.wait_for_key(conn, key, req, Some(first), Some(arrival))? {
                Waited::Granted {
                    token,
                    sent_at,
                    queued,
                } => return Ok(Some((token, sent_at, queued || waiting.is_some()))),
                Waited::Key { queued } => {
                    // Granted next time round, by `upsert`.
                    *holds = true;
                    waited = queued || waiting.is_some();
                }
                Waited::Refused { queued } => {
                    // Decided next time round (a live lease whose holder
                    // lost the key, an unlogged table's gate), within the
                    // acquire's time.
                    *holds = true;
                    if req.remaining() == Some(Duration::ZERO) {
                        return Ok(None);
                    }
                    waited = queued || waiting.is_some();
                }
                Waited::RanOut => return Ok(None),
            }
        }
        loop {
            // Out of time. Holding the key, the grant a statement left to
            // the next (bounds passed, a takeover with a history, the key
            // got as the slice ran out) is still made, but only just past
            // the deadline: not after a statement held up by the lease row
            // long past it, nor after a grant refused for that (see
            // `Waited::Refused`).
            if blocking
                && !first_statement
                && req.remaining() == Some(Duration::ZERO)
                && (!*holds || req.overdue() > FOLLOW_UP_GRACE)
            {
                return Ok(None);
            }
            // Never waits for the key: tries it (unless held already) and grants
            // if free. The wait for the lease row's lock is bounded too.
            let row_wait = match req.remaining() {
                Some(rem) if blocking => millis(rem.min(row_lock_wait(req.ttl))),
                _ => millis(row_lock_wait(req.ttl)),
            };
            let sent_at = Instant::now();
            let tried = !*holds;
            let stmt = if *holds {
                &conn.stmts.upsert
            } else {
                &conn.stmts.try_acquire
            };
            let args = GrantArgs::new(conn, key, req, row_wait, tried && self.sql.checks_bounds);
            // A grant may wait for the lease row and, raising an unlogged
            // table's bounds, for the epoch row; never past the acquire's time.
            let waits = Duration::from_millis(row_wait as u64) * 2;
            let bound = match req.remaining() {
                Some(rem) if blocking => waits.min(rem),
                _ => waits,
            } + STATEMENT_SLACK;
            let canceller = conn.canceller.clone();
            let (res, overrun) = self
                .watchdog
                .bounded(&mut conn.client, &canceller, bound, |c| {
                    c.query_one(stmt, &args.params())
                });
            conn.taint.add(overrun);
            // A late cancel (on a tainted session) counts as this one's.
            let overran = overrun.overran() || conn.taint.any();
            let was_first = std::mem::replace(&mut first_statement, false);
            let row = match res {
                Ok(row) => row,
                Err(e) if tried && bounds::ceiling_passed(&e) => {
                    // The try's token passed the ceiling this session saw:
                    // its write was undone, the key is held. The raising
                    // statement grants next.
                    *holds = true;
                    continue;
                }
                Err(e) if sql::raised(&e, sql::GRANT_ENDED) => {
                    // The lease it wrote had ended while the grant waited
                    // for the lease row: undone, the key is held. A try is
                    // not acquired; a wait goes on, within its time.
                    *holds = true;
                    if !blocking || req.remaining() == Some(Duration::ZERO) {
                        return Ok(None);
                    }
                    waited = true;
                    waiting.get_or_insert_with(|| req.waiting());
                    continue;
                }
                Err(e) if row_wait_ran_out(&e, overran) => {
                    // Another transaction holds the lease row (an operator's, most
                    // likely), or transactions took turns on it past the
                    // statement's bound. The key may have been taken before the
                    // statement failed (session advisory locks outlive it): ask.
                    *holds = holds_key(conn, key)?;
                    let Some(rem) = req.remaining().filter(|r| blocking && !r.is_zero()) else {
                        return Ok(None);
                    };
                    log::debug!(
                        "lockbox: the lease row of {:?} is locked by another transaction; retrying",
                        req.name
                    );
                    waited = true;
                    waiting.get_or_insert_with(|| req.waiting());
                    thread::sleep(ROW_LOCK_RETRY.min(rem));
                    continue;
                }
                Err(e) => {
                    *dead_on_arrival = was_first && session::session_gone(&e, conn);
                    return Err(db_error(e));
                }
            };
            if col::<bool>(&row, 0)? {
                *holds = true;
            }
            conn.bounds.learn(&row, sent_at);
            if let Some(token) = col::<Option<i64>>(&row, 1)? {
                // The lease runs from when it was written, after `sent_at`.
                return Ok(Some((token, sent_at, waited)));
            }
            if let Some(gate) = col::<Option<i64>>(&row, 3)? {
                // An unlogged lease table held the grant back: emptied by a
                // crash (recover, then try again), or in the lock-delay after
                // one (wait it out, holding no key).
                if *holds {
                    unlock_key(conn, key)?;
                    *holds = false;
                }
                if gate == 0 && self.recover(conn, row_wait)? {
                    continue;
                }
                let Some(rem) = req.remaining().filter(|r| blocking && !r.is_zero()) else {
                    return Ok(None);
                };
                waited = true;
                waiting.get_or_insert_with(|| req.waiting());
                // Recovery held up (the epoch row locked by another
                // transaction): try again shortly.
                let pause = if gate == 0 {
                    ROW_LOCK_RETRY
                } else {
                    Duration::from_millis(gate as u64)
                };
                thread::sleep(pause.min(rem));
                continue;
            }
            if bounds::passed(&row) {
                // The grant would have passed the bounds this session saw:
                // the key is held, and the raising statement grants next.
                continue;
            }
            // What the name's unreleased lease has left (ms), if it has one.
            let name_left = col::<Option<i64>>(&row, 2)?;
            if *holds && tried && name_left.is_some_and(|ms| ms <= 0) {
                // The try (with a history) got the key but leaves an expired
                // lease to the full grant, which records the takeover.
                continue;
            }
            if *holds {
                // Lock-delay: the key is ours but a live lease remains whose holder
                // no longer holds the key (its session died without releasing), or
                // (with a history) one that ended after the grant looked at it: the
                // delay reads it afresh, and grants next if it has ended.
                if !blocking {
                    return Ok(None);
                }
                let (lease_left, unlocked) = self.delay(conn, key, req.name)?;
                if !unlocked {
                    // It ran out meanwhile (or the grant, held up by the
                    // lease row, wrote nothing): grant, still holding the
                    // key, unless the acquire's time is up.
                    if req.remaining() == Some(Duration::ZERO) {
                        return Ok(None);
                    }
                    continue;
                }
                *holds = false;
                let Some(rem) = req.remaining().filter(|r| !r.is_zero()) else {
                    return Ok(None);
                };
                waited = true;
                waiting.get_or_insert_with(|| req.waiting());
                // Sleeps without holding the key (nobody is blocked behind this
                // sleeper, and a frozen one blocks nobody), until the lease as read
                // after any wait ends.
                thread::sleep((lease_left + EXPIRY_SLACK).min(rem));
                continue;
            }
            self.contention.found_held(key);
            // Another session holds the key. A try looks for a zombie holder
            // (every lease it holds has expired) unless the name's lease is live:
            // it is terminated, and the lock tried again. A waiting acquire
            // looks for one when a wait slice ends.
            if !blocking {
                let live = name_left.is_some_and(|ms| ms > 0);
                if !live && !took_over && probe(conn, key, req)? {
                    took_over = true;
                    continue;
                }
                return Ok(None);
            }
            waited = true;
            waiting.get_or_insert_with(|| req.waiting());
            // The first slice: just past the name's live lease, or one TTL when
            // the name is free; when its lease expired unreleased, the server
            // times it (it must look at the key's holder). Never longer than one
            // TTL, as the server-timed slices: the key may pass meanwhile to a
            // holder with a shorter lease that becomes a zombie, and the lease
            // read before the wait says nothing about it.
            let first_slice = match name_left {
                Some(ms) if ms > 0 => Some(ms.saturating_add(sql::EXPIRY_SLACK_MS).min(ttl_ms)),
                Some(_) => None,
                None => Some(ttl_ms),
            };
            match self.wait_for_key(conn, key, req, first_slice, None)? {
                Waited::Granted { token, sent_at, .. } => {
                    *holds = true;
                    return Ok(Some((token, sent_at, true)));
                }
                // Granted next time round, by `upsert`.
                Waited::Key { .. } => *holds = true,
                Waited::Refused { .. } => {
                    *holds = true;
                    if req.remaining() == Some(Duration::ZERO) {
                        return Ok(None);
                    }
                }
                Waited::RanOut => return Ok(None),
            }
        }
    }

    /// Blocks on the advisory lock in slices, each ending just after the lease of
    /// the session holding the key would expire (or, when it holds none that can
    /// be seen, after one TTL); between slices a zombie holder is terminated.
    /// The first slice is `first_slice` when given, the others are timed by the
    /// server. Each slice also grants, in the same round trip, through the
    /// wait-and-grant function when the session has it. `arrival`: the wait
    /// is the acquire's first statement (see [`FirstWait`]).
    fn wait_for_key<'r>(
        &self,
        conn: &mut PgConn,
        key: (i32, i32),
        req: &AcquireRequest<'r>,
        mut first_slice: Option<i64>,
        mut arrival: Option<FirstWait<'_, 'r>>,
    ) -> Result<Waited> {
        let (hi, lo) = key;
        let ttl_ms = millis(req.ttl);
        let mut sent = false;
        loop {
            let left = match req.remaining() {
                Some(rem) if rem.is_zero() => return Ok(Waited::RanOut),
                Some(rem) => millis(rem),
                None => return Ok(Waited::RanOut),
            };
            let slice = match first_slice.take() {
                Some(first) => first.min(left),
                None => match slice_length(conn, key, req, left)? {
                    Some(slice) => slice,
                    None => return Ok(Waited::RanOut),
                },
            };
            let sent_at = Instant::now();
            let with_function = conn.stmts.wait_grant.is_some();
            // The function waits for the key one slice, then for the lease
            // row (and an unlogged table's epoch row) within what is left of
            // the acquire's time.
            let row_wait = millis(row_lock_wait(req.ttl)).min(left);
            let waits = slice.saturating_add(row_wait.saturating_mul(2));
            let bound = Duration::from_millis(waits.min(left) as u64) + STATEMENT_SLACK;
            let canceller = conn.canceller.clone();
            let (res, overrun) = self
                .watchdog
                .bounded(&mut conn.client, &canceller, bound, |c| {
                    match &conn.stmts.wait_grant {
                        Some(wg) => c.query_opt(
                            &wg.call,
                            &[
                                &hi,
                                &lo,
                                &req.name,
                                &req.owner,
                                &ttl_ms,
                                &req.metadata,
                                &conn.pid,
                                &conn.backend_start,
                                &row_wait,
                                &slice,
                                &left,
                                &wg.schema,
                                &wg.oid,
                                &wg.owner,
                                &wg.table_oid,
                                &wg.name,
                            ],
                        ),
                        None => c
                            .query_one(&conn.stmts.wait_key, &[&hi, &lo, &slice])
                            .map(Some),
                    }
                });
            conn.taint.add(overrun);
            // A late cancel (on a tainted session) counts as this one's.
            let overran = overrun.overran() || conn.taint.any();
            // Only the first statement can find the session gone on arrival.
            let later = std::mem::replace(&mut sent, true);
            match res {
                Ok(Some(row)) if with_function => {
                    let waited_us = col::<i64>(&row, 2)?.max(0);
                    let queued = waited_us >= QUEUED_AFTER_US;
                    if queued {
                        self.contention.found_held(key);
                    }
                    let Some(token) = col::<Option<i64>>(&row, 1)? else {
                        // A live lease whose holder no longer holds the key
                        // (or, with a history, one that ended during the
                        // grant; or the lease the grant would write ended
                        // while it waited for the row): the caller's grant
                        // and lock-delay decide.
                        return Ok(Waited::Refused { queued });
                    };
                    // The lease runs from no earlier than the send time plus the
                    // wait the server measured (never past now: a step of the
                    // server's clock cannot move it later than that).
                    let waited = Duration::from_micros(waited_us as u64);
                    return Ok(Waited::Granted {
                        token,
                        sent_at: (sent_at + waited).min(Instant::now()),
                        queued,
                    });
                }
                Ok(Some(_)) => return Ok(Waited::Key { queued: true }),
                Ok(None) => {
                    // The function's name no longer resolves to the one this
                    // session checked (dropped, perhaps created again by someone
                    // else): it was not called.
                    if holds_key(conn, key)? {
                        return Ok(Waited::Key { queued: true });
                    }
                    log::warn!(
                        "lockbox: the wait-and-grant function was dropped or replaced; this \
                         session's waits grant with a statement of their own"
                    );
                    conn.stmts.wait_grant = None;
                    first_slice = Some(slice);
                }
                Err(e) if row_wait_ran_out(&e, overran) => {
                    // The slice ran out (or, with the function, the grant's wait
                    // for the lease row's lock did, or the statement's bound).
                    // The lock may have been
                    // granted just as the timeout fired; then it is held and must
                    // not be reported (or leaked) as not acquired.
                    if holds_key(conn, key)? {
                        // Granted the key as the slice ran out, or the
                        // grant's wait for the lease row's lock ran out.
                        return Ok(Waited::Key { queued: false });
                    }
                    // Waiting on a holder: counted from now by an acquire
                    // that waits with its first statement.
                    self.contention.found_held(key);
                    if let Some(a) = arrival.as_mut() {
                        a.waiting.get_or_insert_with(|| req.waiting());
                    }
                    // A zombie is looked for only by a wait that goes on
                    // (the look may itself wait out a table lock).
                    if req.remaining().is_some_and(|r| !r.is_zero()) {
                        probe(conn, key, req)?;
                    }
                }
                Err(e) if with_function && sql::raised(&e, sql::GRANT_ENDED) => {
                    // The key was got, and the lease the function's grant
                    // wrote had ended while it waited for the lease row
                    // (undone): the caller's grant decides, within its time.
                    if holds_key(conn, key)? {
                        return Ok(Waited::Refused { queued: true });
                    }
                    return Err(db_error(e));
                }
                Err(e)
                    if with_function
                        && [
                            SqlState::UNDEFINED_FUNCTION,
                            SqlState::AMBIGUOUS_FUNCTION,
                            SqlState::INSUFFICIENT_PRIVILEGE,
                        ]
                        .iter()
                        .any(|c| e.code() == Some(c)) =>
                {
                    // Unusable since the session checked it (dropped, an
                    // overload added, EXECUTE revoked), or the grant inside it
                    // failed after the key was taken (a privilege on the table,
                    // a trigger calling something missing): only the first is
                    // waited out without it. The error of the second is the
                    // acquire's (its connection, which holds the key, is closed).
                    if holds_key(conn, key)? {
                        return Err(db_error(e));
                    }
                    log::warn!(
                        "lockbox: the wait-and-grant function cannot be called ({}); this \
                         session's waits grant with a statement of their own",
                        db_error(e)
                    );
                    conn.stmts.wait_grant = None;
                    first_slice = Some(slice);
                }
                Err(e) => {
                    if let Some(a) = arrival.as_mut().filter(|_| !later) {
                        *a.dead_on_arrival = session::session_gone(&e, conn);
                    }
                    return Err(db_error(e));
                }
            }
        }
    }

    /// Holding the key, after a grant found a live lease: reads, with a fresh
    /// snapshot, what that lease has left and frees the key if it is still live.
    /// Returns `(left, unlocked)`.
    fn delay(&self, conn: &mut PgConn, key: (i32, i32), name: &str) -> Result<(Duration, bool)> {
        let (hi, lo) = key;
        let row = match conn
            .client
            .query_one(self.sql.delay.as_str(), &[&hi, &lo, &name])
        {
            Ok(row) => row,
            // The lease table locked by an operator past the session's bound:
            // nothing ran, the key is still held; the grant tries again (and
            // waits out the table lock as it waits out a row's).
            Err(e) if e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) => {
                return Ok((Duration::ZERO, false));
            }
            // A late cancel, which may have landed after the unlock (it is
            // not undone): whether the key is still held says.
            Err(e) if conn.late_cancel(&e) => {
                let held = holds_key(conn, key)?;
                return Ok((Duration::ZERO, !held));
            }
            Err(e) => return Err(db_error(e)),
        };
        let left: Option<i64> = col(&row, 0)?;
        let unlocked: bool = col(&row, 1)?;
        Ok((
            Duration::from_millis(left.unwrap_or(0).max(0) as u64),
            unlocked,
        ))
    }

    /// After a grant found the unlogged lease table emptied (a crash, a
    /// failover): starts a new epoch, unless another session just did.
    /// `false`: the epoch row (or a table) stayed locked by another
    /// transaction for `limit_ms`, and nothing was done. On an error the
    /// session has no transaction open, or is marked broken.
    fn recover(&self, conn: &mut PgConn, limit_ms: i64) -> Result<bool> {
        let Some(statement) = &self.sql.recover else {
            return Ok(true);
        };
        let res = (|| {
            conn.client.batch_execute(&format!(
                "BEGIN; SET LOCAL lock_timeout = '{}ms'",
                limit_ms.clamp(1, sql::MAX_LOCK_TIMEOUT_MS)
            ))?;
            let row = conn.client.query_one(statement.as_str(), &[])?;
            conn.client.batch_execute("COMMIT")?;
            Ok(row)
        })();
        let row = match res {
            Ok(row) => row,
            Err(e) => {
                // No transaction may stay open on the session (a shared one
                // serves other locks); one that cannot roll back is closed.
                if !shared::roll_back(&mut conn.client) {
                    conn.broken = true;
                    return Err(db_error(e));
                }
                if e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) {
                    return Ok(false);
                }
                return Err(db_error(e));
            }
        };
        if !col::<bool>(&row, 0)? {
            return Err(Error::InvalidConfig(format!(
                "the row of the epoch table of the unlogged lease table {} is missing: it \
                 bounds every token and lease ever granted, and without it no grant is safe \
                 after a crash",
                self.sql.table
            )));
        }
        if let Some(epoch) = col::<Option<i64>>(&row, 1)? {
            let left = col::<Option<i64>>(&row, 2)?.unwrap_or(0).max(0);
            log::warn!(
                "lockbox: the unlogged lease table {} was emptied (a crash or a failover): epoch \
                 {epoch} begins, and no lock is granted for {left} ms, until every lease granted \
                 before has ended",
                self.sql.table
            );
        }
        Ok(true)
    }
}

/// Frees the advisory key, held by this (dedicated) session.
/// Sent again once if a late cancel lands on it (a key unlocked twice stays
/// unlocked).
fn unlock_key(conn: &mut PgConn, (hi, lo): (i32, i32)) -> Result<()> {
    let unlock = |conn: &mut PgConn| {
        conn.client
            .query_one(&conn.stmts.unlock_keys, &[&vec![hi], &vec![lo]])
    };
    match unlock(conn) {
        Err(e) if conn.late_cancel(&e) => unlock(conn),
        res => res,
    }
    .map_err(db_error)?;
    Ok(())
}

impl Backend for PgBackend {
    fn probe(&self, timeout: Duration) -> DatabaseHealth {
        DatabaseHealth {
            lease_table: Some(self.sql.table.clone()),
            ..self.prober.probe(timeout)
        }
    }

    fn pool_health(&self) -> PoolHealth {
        crate::backend::r2d2_pool_health(&self.pool)
    }

    fn leases(&self, name: Option<&str>) -> Result<Vec<LeaseInfo>> {
        let mut conn = self.pool.get().map_err(|_| Error::PoolTimeout {
            waited: self.pool_timeout,
            pool_size: self.pool_size,
        })?;
        inspect::leases(
            &mut conn.client,
            &self.sql,
            self.coord.as_deref(),
            name,
            self.key_fn,
        )
    }

    fn fence_statement(&self, kind: LeaseKind) -> Option<&str> {
        // An exclusive lease lives in the name's row; a shared one in a row
        // of its own, in the shared-lease table.
        if kind.is_exclusive() {
            Some(self.sql.fence.as_str())
        } else {
            self.coord.as_ref().map(|c| c.fence.as_str())
        }
    }

    /// Exclusive leases always; shared ones when the shared-lease table
    /// exists (`build()` creates it with `create_table(true)`).
    fn supports(&self, kind: LeaseKind) -> bool {
        kind.is_exclusive() || self.coord.is_some()
    }

    /// A session of its own (never pooled) `LISTEN`ing on the name's
    /// channel, which announced grants and releases and forced releases
    /// notify.
    fn watch(&self, name: &str) -> Result<Box<dyn crate::backend::Watch>> {
        self.watch_name(name)
    }

    fn history(&self, name: &str, limit: usize) -> Result<Vec<crate::LeaseEvent>> {
        let Some(statement) = &self.sql.history else {
            return Err(Error::Unsupported(
                "this client keeps no lease history: build it with \
                 LockClientBuilder::history(true)"
                    .to_owned(),
            ));
        };
        let mut conn = self.pool.get().map_err(|_| Error::PoolTimeout {
            waited: self.pool_timeout,
            pool_size: self.pool_size,
        })?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = conn
            .client
            .query(statement, &[&name, &limit])
            .map_err(db_error)?;
        rows.iter().map(inspect::lease_event).collect()
    }

    fn force_release(&self, name: &str) -> Result<Option<u64>> {
        let mut conn = self.pool.get().map_err(|_| Error::PoolTimeout {
            waited: self.pool_timeout,
            pool_size: self.pool_size,
        })?;
        let channel = coord::channel(&self.sql.quoted_table, (self.key_fn)(name));
        let forced =
            inspect::force_release(&mut conn, &self.sql, self.coord.as_deref(), &channel, name)?;
        drop(conn);
        match forced {
            inspect::Forced::Done(token) => Ok(token),
            // Its connection ended at the `COMMIT`: read on another session
            // whether the lease is over, rather than report a release that
            // took effect as failed (review helper-75).
            inspect::Forced::Unknown { ended, token, err } => {
                let outcome = self
                    .pool
                    .get()
                    .map_err(|_| Error::PoolTimeout {
                        waited: self.pool_timeout,
                        pool_size: self.pool_size,
                    })
                    .and_then(|mut conn| {
                        inspect::release_stands(&mut conn, &self.sql, name, &ended)
                    });
                match outcome {
                    Ok(Some(true)) => Ok(Some(token)),
                    Ok(Some(false)) => Err(db_error(err)),
                    Ok(None) => {
                        log::warn!(
                            "lockbox: forcing the release of lock {name:?}: the connection ended \
                             at its COMMIT, and the name's row was written again (or removed) \
                             since: whether the release took effect is unknown (check the lease \
                             before trying again)"
                        );
                        Err(db_error(err))
                    }
                    Err(read) => {
                        log::warn!(
                            "lockbox: forcing the release of lock {name:?}: the connection ended \
                             at its COMMIT and its outcome could not be read: {read}"
                        );
                        Err(db_error(err))
                    }
                }
            }
        }
    }

    fn acquire(&self, req: &AcquireRequest<'_>) -> Result<Option<Grant>> {
        let key = key::split((self.key_fn)(req.name));
        if !req.kind().is_exclusive() {
            return self.acquire_coord(req, key);
        }
        // An announced lease's session notifies at its release: one of its own.
        let share = self.mux.shares() && !req.dedicated() && !req.announce();
        // An idle pooled connection is taken before a shared session: joining
        // one makes this lock's statements queue behind its neighbours' (two
        // threads cycling locks on one session serialise their commits), while
        // an idle connection costs no server session more. Once none is idle,
        // locks share the sessions that hold others.
        let mut idle = None;
        if share {
            idle = self.pool.try_get();
            if idle.is_none() {
                match self.acquire_shared(req, key)? {
                    OnShared::Granted(grant) => return Ok(Some(grant)),
                    OnShared::NotAcquired => return Ok(None),
                    OnShared::Elsewhere => {}
                }
            }
        }
        let mut conn = self.checkout(req, self.pool_timeout, idle)?;
        let mut retries = 0;
        loop {
            // Until proven clean, a session may hold the advisory lock: if anything
            // below fails or panics, r2d2 closes the connection instead of reusing it.
            conn.broken = true;
            let mut holds = false;
            let mut dead_on_arrival = false;
            let outcome =
                match self.acquire_on(&mut conn, &mut holds, &mut dead_on_arrival, req, key) {
                    // The first statement found the session already gone (ended while
                    // the connection sat in the pool, e.g. by a server restart). Safe to
                    // retry on another: a dead session holds no advisory lock, and a
                    // lease it may have written is waited out like any other. The
                    // retry's checkout is short, so a database that is really down is
                    // reported promptly with the original error.
                    Err(e) if dead_on_arrival && retries < self.pool_size => {
                        retries += 1;
                        // Back to the pool first (closed there: it is marked
                        // broken), so that a pool of one has room for the retry.
                        drop(conn);
                        log::debug!(
                            "lockbox: a pooled connection's session had ended; retrying on another"
                        );
                        match self.checkout(req, RETRY_CHECKOUT.min(self.pool_timeout), None) {
                            Ok(fresh) => {
                                conn = fresh;
                                continue;
                            }
                            Err(_) => return Err(e),
                        }
                    }
                    outcome => outcome?,
                };
            return match outcome {
                Some((token, sent_at, waited)) => {
                    conn.broken = false;
                    let reclaim = self.next_reclaims();
                    let session: Box<dyn crate::backend::Session> = if share {
                        // The session it waited on (or tried first) now
                        // serves other locks too.
                        Box::new(self.mux.adopt(conn, key, reclaim))
                    } else if req.announce() {
                        let channel =
                            coord::channel(&self.sql.quoted_table, (self.key_fn)(req.name));
                        coord::notify(&mut conn, &channel);
                        Box::new(PgSession::new(conn, reclaim).announcing(channel))
                    } else {
                        Box::new(PgSession::new(conn, reclaim))
                    };
                    Ok(Some(Grant {
                        session,
                        token: token as u64,
                        sent_at,
                        waited,
                    }))
                }
                None => {
                    let c = &mut *conn;
                    let clean = !holds || c.client.query_one(&c.stmts.unlock_all, &[]).is_ok();
                    conn.broken = !clean;
                    Ok(None)
                }
            };
        }
    }
}

/// The parameters of `try_acquire` and `upsert` (see `Sql`): the key, the
/// request, this session, the longest wait for the lease row's lock (ms),
/// and, for a try checked against the bounds its session saw, those.
struct GrantArgs<'r> {
    key: (i32, i32),
    req: &'r AcquireRequest<'r>,
    ttl_ms: i64,
    pid: i32,
    backend_start: std::time::SystemTime,
    row_wait: i64,
    bounds: Option<(i64, std::time::SystemTime, i64)>,
}

impl<'r> GrantArgs<'r> {
    fn new(
        conn: &PgConn,
        key: (i32, i32),
        req: &'r AcquireRequest<'r>,
        row_wait: i64,
        checked: bool,
    ) -> Self {
        GrantArgs {
            key,
            req,
            ttl_ms: millis(req.ttl),
            pid: conn.pid,
            backend_start: conn.backend_start,
            row_wait,
            bounds: checked.then(|| conn.bounds.params()),
        }
    }

    fn params(&self) -> Vec<&(dyn ToSql + Sync)> {
        let mut params: Vec<&(dyn ToSql + Sync)> = vec![
            &self.key.0,
            &self.key.1,
            &self.req.name,
            &self.req.owner,
            &self.ttl_ms,
            &self.req.metadata,
            &self.pid,
            &self.backend_start,
            &self.row_wait,
        ];
        if let Some((ceiling, horizon, max_ttl)) = &self.bounds {
            params.extend([ceiling as &(dyn ToSql + Sync), horizon, max_ttl]);
        }
        params
    }
}

/// What a try on a shared session came to.
enum OnShared {
    Granted(Grant),
    /// Not acquired, and the request does not wait.
    NotAcquired,
    /// Go on with a session of its own: the acquire must wait, may have to
    /// take a zombie's lock over, or found no shared session free.
    Elsewhere,
}

impl PgBackend {
    /// The sweep this grant's release reclaims in, if it does.
    fn next_reclaims(&self) -> Option<session::Sweep> {
        let n = self.grants.fetch_add(1, Ordering::Relaxed);
        (n % sql::RECLAIM_EVERY == sql::RECLAIM_EVERY - 1).then(|| self.sweep.clone())
    }

    /// Tries `key` once on a shared session with room that does not hold it
    /// and whose connection is free, the one holding the fewest locks first
    /// (its renewals take the connection least); or, when the pool has no
    /// connection to spare, the first to become free within the pool timeout. Only what
    /// a single bounded statement decides is decided here: a grant, or "held
    /// by a live lease" for a request that does not wait. Everything else
    /// (waiting, lock-delay, zombie takeover, a row held by another
    /// transaction) goes on with a session of its own.
    fn acquire_shared(&self, req: &AcquireRequest<'_>, key: (i32, i32)) -> Result<OnShared> {
        let cap = self.mux.cap();
        let candidates = self.mux.candidates(key);
        if candidates.is_empty() {
            return Ok(OnShared::Elsewhere);
        }
        for s in &candidates {
            if !s.reserve(key, cap) {
                continue;
            }
            let Some(mut guard) = s.try_lock_conn() else {
                s.leave(key, true);
                continue;
            };
            if let Some(done) = self.try_on_shared(s, &mut guard, req, key)? {
                return Ok(done);
            }
        }
        // Every one was busy. Wait for one only when the pool has no
        // connection to spare (a session of its own is then unavailable): in
        // short steps, each time over the sessions as they are then and the
        // pool, so that one session stuck on the server (a frozen backend, a
        // statement waiting for a lock) holds up nothing but itself.
        let _waiting = req.pool_waiting();
        let deadline = Instant::now() + self.pool_timeout;
        let mut turn = 0usize;
        loop {
            let state = self.pool.state();
            if state.idle_connections > 0 || state.connections < self.pool_size {
                return Ok(OnShared::Elsewhere);
            }
            let candidates = self.mux.candidates(key);
            if candidates.is_empty() {
                return Ok(OnShared::Elsewhere);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::PoolTimeout {
                    waited: self.pool_timeout,
                    pool_size: self.pool_size,
                });
            }
            // Free ones first; else wait a step for one, in turn.
            let waited_for = turn % candidates.len();
            turn += 1;
            let mut waited = false;
            for (i, s) in candidates.iter().enumerate() {
                if !s.reserve(key, cap) {
                    continue;
                }
                let guard = if i == waited_for {
                    waited = true;
                    s.try_lock_conn_for(left.min(SHARED_WAIT_STEP))
                } else {
                    s.try_lock_conn()
                };
                let Some(mut guard) = guard else {
                    s.leave(key, true);
                    continue;
                };
                if let Some(done) = self.try_on_shared(s, &mut guard, req, key)? {
                    return Ok(done);
                }
            }
            if !waited {
                // The one to wait for took no more locks meanwhile: a step
                // before looking again, rather than a spin.
                thread::sleep(left.min(SHARED_WAIT_STEP));
            }
        }
    }

    /// One try of `key` on shared session `s` (a place reserved, its
    /// connection locked). `None`: the session is gone; try another.
    fn try_on_shared(
        &self,
        s: &Arc<SharedConn>,
        guard: &mut ConnGuard<'_>,
        req: &AcquireRequest<'_>,
        key: (i32, i32),
    ) -> Result<Option<OnShared>> {
        let blocking = req.wait() != Wait::No;
        let Some(conn) = guard.as_deref_mut() else {
            s.leave(key, true);
            return Ok(None);
        };
        let mut sent_at = Instant::now();
        // Whether a statement was cancelled past its bound (see `STATEMENT_SLACK`).
        let mut overran = false;
        let mut grant = |conn: &mut PgConn, stmt: &Statement, checked: bool| {
            let args = GrantArgs::new(conn, key, req, millis(SHARED_ROW_WAIT), checked);
            let canceller = conn.canceller.clone();
            // The lease row's wait, and an unlogged table's epoch row's.
            let bound = SHARED_ROW_WAIT * 2 + STATEMENT_SLACK;
            let (res, overrun) = self
                .watchdog
                .bounded(&mut conn.client, &canceller, bound, |c| {
                    c.query_one(stmt, &args.params())
                });
            conn.taint.add(overrun);
            if overrun == Overrun::Tainted {
                s.taint();
            }
            overran |= overrun.overran();
            res
        };
        let try_acquire = conn.stmts.try_acquire.clone();
        let mut res = grant(conn, &try_acquire, self.sql.checks_bounds);
        // With a history, a try that got the key but found an expired lease
        // leaves it to the full grant (which records the takeover); with an
        // unlogged lease table, a grant past the bounds this session saw is
        // the raising statement's. Either runs here, holding the key.
        let upsert_next = match &res {
            Ok(row) => {
                matches!(
                    (row.try_get::<_, bool>(0), row.try_get::<_, Option<i64>>(1), row.try_get::<_, Option<i64>>(2)),
                    (Ok(true), Ok(None), Ok(Some(ms))) if ms <= 0
                ) || bounds::passed(row)
            }
            Err(e) => bounds::ceiling_passed(e),
        };
        if upsert_next {
            sent_at = Instant::now();
            let upsert = conn.stmts.upsert.clone();
            res = grant(conn, &upsert, false);
        }
        if let Ok(row) = &res {
            conn.bounds.learn(row, sent_at);
        }
        let row = match res {
            Ok(row) => row,
            Err(e) if session::session_gone(&e, conn) => {
                // It died (every lock on it is lost with it): try another.
                s.close(guard);
                s.leave(key, true);
                return Ok(None);
            }
            Err(e) => {
                let ran_out = row_wait_ran_out(&e, overran || conn.taint.any());
                // The key may have been taken before the statement failed
                // (session advisory locks outlive it): free it, or close the
                // session when that cannot be known.
                let freed = match s.holds(guard, key) {
                    Some(true) => s.unlock(guard, key),
                    Some(false) => true,
                    None => false,
                };
                s.leave(key, freed);
                if ran_out || sql::raised(&e, sql::GRANT_ENDED) {
                    // The lease row is held by another transaction (or was,
                    // until the lease the grant wrote had ended).
                    return Ok(Some(OnShared::Elsewhere));
                }
                return Err(db_error(e));
            }
        };
        // got, token, what the name's lease has left, the gate.
        type Answer = (bool, Option<i64>, Option<i64>, Option<i64>);
        let answer = (|| -> Result<Answer> {
            Ok((col(&row, 0)?, col(&row, 1)?, col(&row, 2)?, col(&row, 3)?))
        })();
        let (got, token, name_left, gate) = match answer {
            Ok(answer) => answer,
            Err(e) => {
                // An answer that cannot be read: whether the key is held is
                // unknown, so the session is closed (its locks are lost).
                s.close(guard);
                s.leave(key, false);
                return Err(e);
            }
        };
        if let Some(token) = token {
            let reclaim = self.next_reclaims();
            return Ok(Some(OnShared::Granted(Grant {
                session: Box::new(PgMember::new(s.clone(), key, reclaim)),
                token: token as u64,
                sent_at,
                waited: false,
            })));
        }
        let freed = !got || s.unlock(guard, key);
        s.leave(key, freed);
        if let Some(gate) = gate {
            // An unlogged lease table held the grant back (see `acquire_on`).
            // Recovered here, so that tries alone bring the table back too.
            if gate == 0 {
                let Some(conn) = guard.as_deref_mut() else {
                    return Ok(Some(OnShared::Elsewhere));
                };
                if let Err(e) = self.recover(conn, millis(SHARED_ROW_WAIT)) {
                    // Rolled back, its neighbours' locks go on; one that
                    // could not roll back is closed.
                    if conn.broken {
                        s.close(guard);
                    }
                    return Err(e);
                }
            }
            return Ok(Some(if gate > 0 && !blocking {
                OnShared::NotAcquired
            } else {
                OnShared::Elsewhere
            }));
        }
        if !got {
            self.contention.found_held(key);
        }
        let live = name_left.is_some_and(|ms| ms > 0);
        Ok(Some(if !blocking && !got && live {
            OnShared::NotAcquired
        } else if !blocking && got {
            // A live lease whose holder's session is gone (lock-delay).
            OnShared::NotAcquired
        } else {
            OnShared::Elsewhere
        }))
    }
}

/// How long the next wait slice for `key` should be, as the server times it:
/// until just after the lease of the key's holder would expire, or one TTL
/// when no lease is seen; never more than `left` (ms). `None`: the wait ran
/// out.
pub(crate) fn slice_length(
    conn: &mut PgConn,
    key: (i32, i32),
    req: &AcquireRequest<'_>,
    left: i64,
) -> Result<Option<i64>> {
    let (hi, lo) = key;
    let ttl_ms = millis(req.ttl);
    match conn
        .client
        .query_one(&conn.stmts.slice, &[&hi, &lo, &req.name, &left, &ttl_ms])
    {
        Ok(row) => Ok(Some(col::<Option<i64>>(&row, 0)?.unwrap_or(ttl_ms))),
        // The lease table locked by an operator past the session's bound:
        // one TTL, as when no lease is seen. What is left is read again: the
        // failed read took the bound's 200 ms of it. (A late cancel too.)
        Err(e) if e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) || conn.late_cancel(&e) => {
            Ok(match req.remaining() {
                Some(rem) if !rem.is_zero() => Some(ttl_ms.min(millis(rem))),
                _ => None,
            })
        }
        Err(e) => Err(db_error(e)),
    }
}

/// Whether this session holds the advisory key (granted, perhaps, just as the
/// statement waiting for it failed).
/// Asked again once if a late cancel lands on it.
pub(crate) fn holds_key(conn: &mut PgConn, (hi, lo): (i32, i32)) -> Result<bool> {
    let ask = |conn: &mut PgConn| conn.client.query_one(&conn.stmts.holds_key, &[&hi, &lo]);
    let row = match ask(conn) {
        Err(e) if conn.late_cancel(&e) => ask(conn),
        res => res,
    }
    .map_err(db_error)?;
    col(&row, 0)
}

/// How a wait for the advisory key ended.
enum Waited {
    /// The wait-and-grant function granted the lease; it runs from no earlier
    /// than `sent_at`.
    /// `queued`: the server measured a wait for the key (see
    /// [`QUEUED_AFTER_US`]).
    Granted {
        token: i64,
        sent_at: Instant,
        queued: bool,
    },
    /// The key is held; the grant comes next. `queued`: as for `Granted`.
    Key { queued: bool },
    /// The key is held, but the function's grant granted nothing: what
    /// comes next decides, and not once the acquire's time is up (its
    /// statement may have been held up by the lease row past it).
    Refused { queued: bool },
    /// The acquire's wait ran out.
    RanOut,
}

/// What [`PgBackend::wait_for_key`] updates when its wait is the acquire's
/// first statement.
struct FirstWait<'a, 'r> {
    /// Set if that first statement finds the session gone (ended while the
    /// connection sat in the pool): the acquire is retried on another. So is
    /// one whose session an operator ended during that first wait (up to
    /// 100 ms), as one ended during a try's wait for its lease row: nothing
    /// this acquire knows of was granted, and a grant committed just before
    /// the end is the lease of a dead session, waited out like any other.
    dead_on_arrival: &'a mut bool,
    /// The `acquires_waiting` gauge's guard, raised once a slice ends without
    /// the key: only then is the acquire known to wait on a holder.
    waiting: &'a mut Option<WaitingGuard<'r>>,
}

/// Terminates the session holding the key if it is a zombie: every unreleased
/// lease it holds (for `req`'s name or another sharing the key) has expired.
/// Returns whether it did. Never inside an explicit transaction: the probe
/// judges by its own transaction's start (see `Sql::probe`).
fn probe(conn: &mut PgConn, key: (i32, i32), req: &AcquireRequest<'_>) -> Result<bool> {
    let name = req.name();
    let (hi, lo) = key;
    // A timed acquire waits for the zombie to exit no longer than it may wait
    // at all (a frozen backend never exits).
    let exit_wait = req
        .remaining()
        .map_or(TERMINATE_WAIT, |rem| TERMINATE_WAIT.min(rem));
    let rows = match conn.client.query(
        &conn.stmts.probe,
        &[&hi, &lo, &millis(exit_wait), &millis(req.ttl)],
    ) {
        // The lease table locked by an operator past the session's bound
        // (or a late cancel): nothing was looked at; the next slice looks
        // again.
        Err(e) if e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) || conn.late_cancel(&e) => {
            return Ok(false);
        }
        res => res,
    };
    let rows = rows.map_err(|e| match db_error(e) {
        Error::InsufficientPrivilege(msg) => Error::InsufficientPrivilege(format!(
            "lock {name:?} is held by a session whose lease has expired (a zombie holder); \
                 terminating it needs membership in the role pg_signal_backend (or in the \
                 holder's role): {msg}"
        )),
        other => other,
    })?;
    let mut terminated = false;
    for row in &rows {
        let pid: i32 = col(row, 0)?;
        if col::<Option<bool>>(row, 1)? == Some(true) {
            return Err(Error::InsufficientPrivilege(format!(
                "lock {name:?} is held by backend {pid} whose lease has expired (a zombie holder); \
                 verifying that session before terminating it needs the role pg_read_all_stats \
                 (or membership in the holder's role) to read its backend_start"
            )));
        }
        if col::<Option<bool>>(row, 2)? == Some(true) {
            terminated = true;
            req.zombie_terminated();
            log::warn!(
                "lockbox: terminated backend {pid}, the zombie holder of lock {name:?}'s \
                 advisory key: its leases had expired but it still held the key"
            );
        }
    }
    Ok(terminated)
}

/// Resolves the lease table to one schema-qualified table, creating or upgrading
/// it when allowed (serialised by an internal advisory lock, so concurrent first
/// starts do not race), and checks its shape: a table lockbox cannot use is
/// refused here, with the reason, rather than failing acquires later.
///
/// An unqualified name is resolved once, here, through the build's `search_path`
/// (an existing table), or created in its first schema (`current_schema()`); every
/// statement afterwards names `schema.table`, whatever a session's `search_path`.
fn ensure_table(
    client: &mut postgres::Client,
    configured: &str,
    create: bool,
    unlogged: bool,
    history: Option<Duration>,
    wait: Duration,
) -> Result<TableInfo> {
    let mut tx = client.transaction().map_err(db_error)?;
    // Every wait of build() for another transaction's lock (an operator's on
    // a table, a concurrent first build's on the DDL key, held for its whole
    // transaction) is bounded by the connect timeout, not the session's
    // 200 ms.
    tx.batch_execute(&format!(
        "SET LOCAL lock_timeout = '{}ms'",
        millis(wait).clamp(1, sql::MAX_LOCK_TIMEOUT_MS)
    ))
    .map_err(db_error)?;
    if create {
        tx.execute(
            "SELECT pg_catalog.pg_advisory_xact_lock($1::int8)",
            &[&DDL_KEY],
        )
        .map_err(db_error)?;
    }
    let mut oid = lookup(&mut tx, configured)?;
    if oid.is_none() && create {
        let schema = match configured.split_once('.') {
            Some((schema, _)) => schema.to_owned(),
            None => col::<Option<String>>(
                &tx.query_one("SELECT current_schema()::text", &[])
                    .map_err(db_error)?,
                0,
            )?
            .ok_or_else(|| {
                Error::InvalidConfig(format!(
                    "cannot create the lease table {configured}: no schema in the search_path \
                     exists; name the table as schema.table"
                ))
            })?,
        };
        let relname = configured.rsplit('.').next().unwrap_or(configured);
        let quoted = format!("{}.{}", quote_ident(&schema), quote_ident(relname));
        tx.batch_execute(&sql::create_table(&quoted, unlogged))
            .map_err(|e| create_error(e, configured))?;
        oid = lookup(&mut tx, configured)?;
    }
    let Some(oid) = oid else {
        return Err(Error::MissingTable {
            table: configured.to_owned(),
        });
    };
    let row = tx
        .query_one(
            "SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname), \
                    n.nspname::text || '.' || c.relname::text, c.relname::text, c.relkind::text, \
                    n.nspname::text, c.relpersistence::text \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = $1",
            &[&oid],
        )
        .map_err(db_error)?;
    let quoted: String = col(&row, 0)?;
    let display: String = col(&row, 1)?;
    let relname: String = col(&row, 2)?;
    let relkind: String = col(&row, 3)?;
    let schema: String = col(&row, 4)?;
    let persistence: String = col(&row, 5)?;
    if relkind != "r" && relkind != "p" {
        return Err(shape_error(&display, "it is not a table"));
    }
    // A partitioned table is never unlogged itself, but its partitions,
    // where the rows live, may be: a crash then empties those
    // (review_unlogged_partitions.rs).
    let unlogged_rows: bool = persistence == "u"
        || col::<bool>(
            &tx.query_one(
                "SELECT COALESCE(bool_or(c.relpersistence = 'u'), false) \
                 FROM pg_partition_tree($1::oid::regclass) p JOIN pg_class c ON c.oid = p.relid",
                &[&oid],
            )
            .map_err(db_error)?,
            0,
        )?;
    if unlogged && !unlogged_rows {
        return Err(Error::InvalidConfig(format!(
            "unlogged_leases(true), but the lease table {display} exists and is logged; lockbox \
             never converts a table (the clients using it must all stop first): stop them, run \
             `ALTER TABLE {quoted} SET UNLOGGED`, and build again"
        )));
    }
    let identity = check_columns(&mut tx, oid, &display)?;
    check_rewrites(&mut tx, oid, &display)?;
    // Its partitions' too: a row is written where it lives, and a trigger
    // there rewrites it as surely as one on the table.
    let parts = tx
        .query(
            "SELECT p.relid::oid, n.nspname::text || '.' || c.relname::text \
             FROM pg_partition_tree($1::oid::regclass) p \
                 JOIN pg_class c ON c.oid = p.relid JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE p.relid <> $1::oid::regclass",
            &[&oid],
        )
        .map_err(db_error)?;
    for part in &parts {
        let (part_oid, part_name): (u32, String) = (col(part, 0)?, col(part, 1)?);
        check_rewrites(&mut tx, part_oid, &part_name)?;
    }
    // Inheritance children (not partitions): their rows would show in every
    // read of the table, beside the ones lockbox writes and judges.
    if relkind == "r"
        && col::<bool>(
            &tx.query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_inherits WHERE inhparent = $1)",
                &[&oid],
            )
            .map_err(db_error)?,
            0,
        )?
    {
        return Err(shape_error(
            &display,
            "it has child tables (inheritance), whose rows lockbox's statements would see",
        ));
    }
    if identity.is_empty() {
        if !create {
            return Err(shape_error(
                &display,
                &format!(
                    "its token column does not draw from a sequence; upgrade it with \
                     `ALTER TABLE {quoted} ALTER COLUMN token ADD GENERATED BY DEFAULT AS \
                     IDENTITY (START WITH <max(token) + 1> CACHE 1)` (or let lockbox do it: \
                     create_table(true))"
                ),
            ));
        }
        // Upgrading a table of lockbox 0.1: names without a row now take their
        // first token from a store-wide sequence, started above every token issued.
        let next: i64 = col(
            &tx.query_one(
                &format!("SELECT COALESCE(max(token), 0) + 1 FROM {quoted}"),
                &[],
            )
            .map_err(db_error)?,
            0,
        )?;
        tx.batch_execute(&format!(
            "ALTER TABLE {quoted} ALTER COLUMN token ADD GENERATED BY DEFAULT AS IDENTITY \
             (START WITH {next} CACHE 1 NO CYCLE)"
        ))
        .map_err(|e| create_error(e, &display))?;
    } else if identity != "d" {
        return Err(shape_error(
            &display,
            "its token column is GENERATED ALWAYS; it must be GENERATED BY DEFAULT",
        ));
    }
    let seq = tx
        .query_one(
            "SELECT s.seqrelid, s.seqcache, s.seqincrement, s.seqcycle, c.relpersistence::text, \
                    s.seqmax \
             FROM pg_sequence s JOIN pg_class c ON c.oid = s.seqrelid \
             WHERE s.seqrelid = pg_get_serial_sequence($1, 'token')::regclass",
            &[&quoted],
        )
        .map_err(db_error)?;
    let token_seq: u32 = col(&seq, 0)?;
    let (cache, increment, cycle): (i64, i64, bool) = (col(&seq, 1)?, col(&seq, 2)?, col(&seq, 3)?);
    // A crash resets an unlogged sequence to its start: with a logged table
    // (whose clients do not gate on recovery, which sets the sequence above
    // every token) the next names would be handed tokens issued before.
    if !unlogged_rows && col::<String>(&seq, 4)? == "u" {
        return Err(shape_error(
            &display,
            "the sequence of its token column is unlogged, and a crash would reset it below \
             tokens already issued; make it logged (`ALTER SEQUENCE … SET LOGGED`) or the \
             table unlogged (see unlogged_leases)",
        ));
    }
    // Recovery sets the sequence to the ceiling, up to a step above the last
    // token issued: a lower MAXVALUE would fail it after a crash.
    if unlogged_rows && col::<i64>(&seq, 5)? != i64::MAX {
        return Err(shape_error(
            &display,
            "the sequence of its token column has a MAXVALUE of its own; an unlogged table's \
             needs the default (recovery after a crash sets it up to a million above the last \
             token)",
        ));
    }
    if cache != 1 || increment < 1 || cycle {
        return Err(shape_error(
            &display,
            "the sequence of its token column must increase, not cycle, and have CACHE 1 \
             (a cached or cycling sequence could hand out a token below one already issued)",
        ));
    }
    // Reclaiming sweeps the table a window at a time (`sql::RECLAIM_PAGES`):
    // it needs no index, and none is created on the lease's end (it would
    // keep every update of a lease row from being HOT).
    let reclaim: bool = col::<bool>(
        &tx.query_one(
            "SELECT has_table_privilege($1::oid, 'DELETE') \
                    AND has_sequence_privilege($2::oid, 'SELECT, USAGE')",
            &[&oid, &token_seq],
        )
        .map_err(db_error)?,
        0,
    )?;
    if !reclaim {
        log::info!(
            "lockbox: lease table {display}: old rows are not reclaimed by this client (it \
             needs DELETE on the table and SELECT or USAGE on its token sequence)"
        );
    }
    // Not dropped here: DROP INDEX takes the table's strongest lock, and every
    // renewal would queue behind it while it waits for an open transaction.
    let old_index: Option<String> = col(
        &tx.query_one(
            "SELECT (SELECT i.indexrelid::regclass::text FROM pg_index i \
                WHERE i.indrelid = $1 \
                  AND pg_get_indexdef(i.indexrelid) LIKE '%(COALESCE(released_at, expires_at))%' \
                LIMIT 1)",
            &[&oid],
        )
        .map_err(db_error)?,
        0,
    )?;
    if let Some(index) = old_index {
        log::info!(
            "lockbox: lease table {display}: its index {index} (created by earlier versions of \
             lockbox) keeps every update of a lease from being HOT; once no earlier version of \
             lockbox uses the table (they create it again), drop it with DROP INDEX \
             CONCURRENTLY {index}"
        );
    }
    let history = match history {
        Some(retention) => Some(ensure_history(
            &mut tx, &schema, &relname, &display, create, retention,
        )?),
        None => None,
    };
    // What the table is decides, not this client's setting: every client of
    // an unlogged table must gate its grants on it.
    let unlogged = if unlogged_rows {
        Some(ensure_unlogged(
            &mut tx, &quoted, token_seq, &schema, &relname, &display, create,
        )?)
    } else {
        None
    };
    let wait_grant = ensure_wait_grant(
        &mut tx,
        oid,
        &quoted,
        &schema,
        &relname,
        create,
        (history.as_ref(), unlogged.as_ref()),
    )?;
    ensure_fence(&mut tx, oid, &quoted, &schema, &relname, create)?;
    let shared = if unlogged.is_some() {
        log::info!(
            "lockbox: lease table {display} is unlogged; readers and semaphores are not \
             available with it"
        );
        None
    } else {
        ensure_shared(&mut tx, &schema, &relname, &display, create)?
    };
    tx.commit().map_err(db_error)?;
    if let Some(u) = &unlogged {
        cover_rows(client, u, &quoted, token_seq, wait)?;
    }
    Ok(TableInfo {
        display,
        quoted,
        oid,
        token_seq,
        reclaim,
        wait_grant,
        history,
        shared,
        unlogged,
    })
}

/// Raises the bounds of unlogged lease table `quoted` to cover what it and
/// its sequence hold, however they came to hold it: a table set LOGGED for a
/// while (its clients then raise nothing) and UNLOGGED again keeps an epoch
/// row from before, below the tokens and leases granted since
/// (review_unlogged_reconvert.rs). A transaction of its own, whose wait for
/// the epoch row (an operator's transaction may hold it) is bounded by
/// `wait`: a raise holds the row, and every grant that needs a raise waits
/// for it, so it is held no longer than this statement.
fn cover_rows(
    client: &mut postgres::Client,
    u: &sql::Unlogged,
    quoted: &str,
    token_seq: u32,
    wait: Duration,
) -> Result<()> {
    let mut tx = client.transaction().map_err(db_error)?;
    tx.batch_execute(&format!(
        "SET LOCAL lock_timeout = '{}ms'",
        millis(wait).clamp(1, sql::MAX_LOCK_TIMEOUT_MS)
    ))
    .map_err(db_error)?;
    let raised: i64 = col(
        &tx.query_one(&sql::cover_rows(&u.epoch, quoted, token_seq), &[])
            .map_err(db_error)?,
        0,
    )?;
    if raised > 0 {
        log::info!(
            "lockbox: the bounds of the unlogged lease table {quoted} were raised to cover \
             the tokens and leases it holds"
        );
    }
    tx.commit().map_err(db_error)
}

/// The companions of unlogged lease table `relname` (see [`sql::Unlogged`]):
/// `<table>_epoch` (logged, with its row) and `<table>_alive` (unlogged),
/// created when missing and `create` allows DDL; refused when missing
/// otherwise, or not of lockbox's shape and persistence.
#[allow(clippy::too_many_arguments)]
fn ensure_unlogged(
    tx: &mut postgres::Transaction<'_>,
    quoted: &str,
    token_seq: u32,
    schema: &str,
    relname: &str,
    display: &str,
    create: bool,
) -> Result<sql::Unlogged> {
    let names = [format!("{relname}_epoch"), format!("{relname}_alive")];
    if let Some(long) = names.iter().find(|n| n.len() > 63) {
        return Err(Error::InvalidConfig(format!(
            "the unlogged lease table {display} needs a table named {long:?}, longer than \
             PostgreSQL's 63-byte identifiers: name the lease table shorter"
        )));
    }
    let [epoch, alive] = names.map(|n| format!("{}.{}", quote_ident(schema), quote_ident(&n)));
    // Only when missing: creating needs privileges a role using the tables
    // may lack.
    for (table, ddl) in [
        (&epoch, sql::create_epoch(&epoch, quoted, token_seq)),
        (&alive, sql::create_alive(&alive)),
    ] {
        let missing = col::<Option<u32>>(
            &tx.query_one("SELECT to_regclass($1)::oid", &[table])
                .map_err(db_error)?,
            0,
        )?
        .is_none();
        if create && missing {
            tx.batch_execute(&ddl).map_err(|e| create_error(e, table))?;
        }
    }
    // Each table, its persistence, its columns and their types.
    type Shape<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)]);
    let shapes: [Shape<'_>; 2] = [
        (
            &epoch,
            "p",
            &[
                ("id", "integer"),
                ("epoch", "bigint"),
                ("token_ceiling", "bigint"),
                ("lease_horizon", "timestamp with time zone"),
                ("max_ttl_ms", "bigint"),
                ("recovered_at", "timestamp with time zone"),
            ],
        ),
        (
            &alive,
            "u",
            &[
                ("id", "integer"),
                ("epoch", "bigint"),
                ("grants_from", "timestamp with time zone"),
            ],
        ),
    ];
    for (table, persistence, columns) in shapes {
        let rows = tx
            .query(
                "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod) \
                 FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid \
                 WHERE c.oid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped",
                &[&table],
            )
            .map_err(db_error)?;
        if rows.is_empty() {
            return Err(Error::InvalidConfig(format!(
                "the lease table {display} is unlogged, and its companion table {table} is \
                 missing (a build with create_table(true) by a role allowed to create it \
                 creates it; the README has the DDL)"
            )));
        }
        check_companion(tx, table, persistence, columns)?;
        for (want, ty) in columns {
            let found = rows
                .iter()
                .find(|r| r.try_get::<_, String>(0).is_ok_and(|n| n == *want));
            match found.map(|r| col::<String>(r, 1)).transpose()? {
                Some(actual) if actual == *ty => {}
                Some(actual) => {
                    return Err(shape_error(
                        table,
                        &format!("its column {want} is {actual}; lockbox needs {ty}"),
                    ));
                }
                None => {
                    return Err(shape_error(
                        table,
                        &format!("it has no column {want} ({ty})"),
                    ));
                }
            }
        }
    }
    // What grants, renewals and the recovery after a crash need, checked now:
    // a role missing one would work until the first crash, and then never
    // grant again (review_unlogged_privileges.rs).
    let row = tx
        .query_one(
            "SELECT has_table_privilege($1::text, 'SELECT'), has_table_privilege($1::text, 'UPDATE'), \
                    has_table_privilege($2::text, 'SELECT'), has_table_privilege($2::text, 'INSERT'), \
                    has_sequence_privilege($3::oid, 'SELECT'), has_sequence_privilege($3::oid, 'UPDATE')",
            &[&epoch, &alive, &token_seq],
        )
        .map_err(db_error)?;
    let needed = [
        ("SELECT", epoch.as_str()),
        ("UPDATE", epoch.as_str()),
        ("SELECT", alive.as_str()),
        ("INSERT", alive.as_str()),
        ("SELECT", "its token sequence"),
        ("UPDATE", "its token sequence"),
    ];
    let mut missing = Vec::new();
    for (i, (privilege, on)) in needed.into_iter().enumerate() {
        if !col::<bool>(&row, i)? {
            missing.push(format!("{privilege} on {on}"));
        }
    }
    if !missing.is_empty() {
        return Err(Error::InsufficientPrivilege(format!(
            "the unlogged lease table {display} needs {} for this role: grants raise the bounds, \
             and the first client after a crash writes the new epoch and sets the token sequence",
            missing.join(", ")
        )));
    }
    let has_row: bool = col(
        &tx.query_one(
            &format!("SELECT EXISTS (SELECT 1 FROM {epoch} WHERE id = 1)"),
            &[],
        )
        .map_err(db_error)?,
        0,
    )?;
    if !has_row {
        return Err(shape_error(
            &epoch,
            "its row (id 1) is missing: it bounds every token and lease ever granted, and \
             without it no grant is safe after a crash",
        ));
    }
    Ok(sql::Unlogged { epoch, alive })
}

/// Refuses a companion of an unlogged lease table that recovery after a
/// crash could not use, or that could lose a raise of the bounds; checked at
/// build because recovery, which needs all of it, runs only after a crash:
/// - an ordinary table (not a view, a foreign or partitioned table) of the
///   `persistence` given, with no child tables (a logged child of `_alive`
///   would keep its row through a crash and hide the emptied lease table);
/// - no row-level security in force for this role, no enabled trigger of any
///   kind, no rewrite rule (any of them can hide a row or void a raise:
///   review_unlogged_companion_trigger.rs);
/// - a non-deferrable, non-partial unique index on `id` alone (recovery's
///   `ON CONFLICT (id)` needs it, and without it `_epoch` could hold two
///   rows of id 1 and recovery set the sequence below a token issued);
/// - no column but lockbox's, none of them identity or generated, and no
///   constraint but the primary key and `CHECK (id = 1)` (a default, a
///   domain, an expression or a constraint could fail recovery's writes); no
///   parent either (a partition's bounds refuse rows outside them).
fn check_companion(
    tx: &mut postgres::Transaction<'_>,
    table: &str,
    persistence: &str,
    columns: &[(&str, &str)],
) -> Result<()> {
    let known: Vec<&str> = columns.iter().map(|(name, _)| *name).collect();
    let row = tx
        .query_one(
            "SELECT c.relkind::text, c.relpersistence::text, \
                    c.relispartition OR EXISTS (SELECT 1 FROM pg_inherits i \
                        WHERE i.inhparent = c.oid OR i.inhrelid = c.oid), \
                    row_security_active(c.oid), \
                    (SELECT string_agg(t.tgname::text, ', ' ORDER BY t.tgname) FROM pg_trigger t \
                     WHERE t.tgrelid = c.oid AND NOT t.tgisinternal AND t.tgenabled <> 'D'), \
                    (SELECT string_agg(r.rulename::text, ', ' ORDER BY r.rulename) FROM pg_rewrite r \
                     WHERE r.ev_class = c.oid AND r.rulename <> '_RETURN'), \
                    EXISTS (SELECT 1 FROM pg_index i JOIN pg_attribute a \
                                ON a.attrelid = c.oid AND a.attname = 'id' \
                            WHERE i.indrelid = c.oid AND i.indisunique AND i.indimmediate \
                              AND i.indisvalid AND i.indpred IS NULL AND i.indexprs IS NULL \
                              AND i.indnkeyatts = 1 AND i.indkey[0] = a.attnum), \
                    (SELECT string_agg(a.attname::text, ', ' ORDER BY a.attnum) FROM pg_attribute a \
                     WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped \
                       AND (a.attidentity <> '' OR a.attgenerated <> '' \
                            OR NOT (a.attname::text = ANY($2::text[])))), \
                    (SELECT string_agg(k.conname::text || ' ' || pg_get_constraintdef(k.oid), '; ' \
                         ORDER BY k.conname) FROM pg_constraint k \
                     WHERE k.conrelid = c.oid AND k.contype NOT IN ('p', 'u') \
                       AND NOT (k.contype = 'c' AND pg_get_constraintdef(k.oid) = 'CHECK ((id = 1))')) \
             FROM pg_class c WHERE c.oid = to_regclass($1)",
            &[&table, &known],
        )
        .map_err(db_error)?;
    let relkind: String = col(&row, 0)?;
    if relkind != "r" {
        return Err(shape_error(
            table,
            "it must be an ordinary table (not a view, a foreign or a partitioned table)",
        ));
    }
    if col::<String>(&row, 1)? != persistence {
        let want = if persistence == "u" {
            "unlogged"
        } else {
            "logged"
        };
        return Err(shape_error(table, &format!("it must be {want}")));
    }
    if col::<bool>(&row, 2)? {
        return Err(shape_error(
            table,
            "it has a parent or child tables (inheritance, partitioning): their rows would \
             show in lockbox's reads, or a partition's bounds refuse recovery's writes",
        ));
    }
    if col::<bool>(&row, 3)? {
        return Err(shape_error(
            table,
            "row-level security is in force on it for this role, and could hide its row",
        ));
    }
    if let Some(triggers) = col::<Option<String>>(&row, 4)? {
        return Err(shape_error(
            table,
            &format!(
                "it has triggers ({triggers}); lockbox's bounds must be written as lockbox \
                 writes them: drop or disable them"
            ),
        ));
    }
    if let Some(rules) = col::<Option<String>>(&row, 5)? {
        return Err(shape_error(
            table,
            &format!("it has rewrite rules that may change lockbox's writes ({rules})"),
        ));
    }
    if !col::<bool>(&row, 6)? {
        return Err(shape_error(
            table,
            "it has no unique, non-deferrable index on id alone (its primary key), which \
             recovery after a crash needs",
        ));
    }
    if let Some(extra) = col::<Option<String>>(&row, 7)? {
        return Err(shape_error(
            table,
            &format!(
                "its columns {extra} are not lockbox's plain columns (an added column, or an \
                 identity or generated one): their defaults, types or expressions could fail \
                 recovery's writes after a crash"
            ),
        ));
    }
    if let Some(constraints) = col::<Option<String>>(&row, 8)? {
        return Err(shape_error(
            table,
            &format!(
                "it has constraints lockbox does not define ({constraints}), which could fail \
                 recovery after a crash"
            ),
        ));
    }
    Ok(())
}

/// The shared-lease table of lease table `relname` (in `schema`):
/// `<table>_shared` beside it, created when missing and `create` allows DDL.
/// `None` (shared leases are then refused as unsupported, and this is
/// logged) when it is missing, would need a name longer than 63 bytes, is
/// not of lockbox's shape, or this role may not write it.
fn ensure_shared(
    tx: &mut postgres::Transaction<'_>,
    schema: &str,
    relname: &str,
    display: &str,
    create: bool,
) -> Result<Option<String>> {
    let name = format!("{relname}_shared");
    if name.len() > 63 {
        log::info!(
            "lockbox: lease table {display}: its shared-lease table would be named {name:?}, \
             longer than PostgreSQL's 63-byte identifiers; readers and semaphores are not \
             available with it"
        );
        return Ok(None);
    }
    let quoted = format!("{}.{}", quote_ident(schema), quote_ident(&name));
    let exists = |tx: &mut postgres::Transaction<'_>| -> Result<bool> {
        Ok(col::<Option<u32>>(
            &tx.query_one("SELECT to_regclass($1)::oid", &[&quoted])
                .map_err(db_error)?,
            0,
        )?
        .is_some())
    };
    if create && !exists(tx)? {
        // In a savepoint: a role that may use the lease table but not create
        // tables beside it builds as before, without shared leases.
        let mut sp = tx.transaction().map_err(db_error)?;
        match sp.batch_execute(&coord::create_table(&quoted)) {
            Ok(()) => sp.commit().map_err(db_error)?,
            Err(e) => log::info!(
                "lockbox: could not create the shared-lease table {schema}.{name}: {}",
                create_error(e, &format!("{schema}.{name}"))
            ),
        }
    }
    if !exists(tx)? {
        log::info!(
            "lockbox: lease table {display}: the shared-lease table {schema}.{name} is missing \
             (a build with create_table(true) by a role allowed to create it creates it); \
             readers and semaphores are not available"
        );
        return Ok(None);
    }
    let row = tx
        .query_one(
            &format!(
                "SELECT c.relkind OPERATOR(pg_catalog.=) ANY ('{{r,p}}'::\"char\"[]), \
                     (SELECT pg_catalog.count(*) FROM pg_catalog.pg_attribute a \
                      WHERE a.attrelid OPERATOR(pg_catalog.=) c.oid AND a.attnum OPERATOR(pg_catalog.>) 0 \
                        AND NOT a.attisdropped AND a.attgenerated OPERATOR(pg_catalog.=) '' \
                        AND pg_catalog.concat(a.attname, ':', pg_catalog.format_type(a.atttypid, NULL)) \
                            OPERATOR(pg_catalog.=) ANY ('{cols}'::text[])) \
                        OPERATOR(pg_catalog.=) {n}, \
                     pg_catalog.has_table_privilege(c.oid, 'SELECT') \
                         AND pg_catalog.has_table_privilege(c.oid, 'INSERT') \
                         AND pg_catalog.has_table_privilege(c.oid, 'UPDATE') \
                         AND pg_catalog.has_table_privilege(c.oid, 'DELETE') \
                 FROM pg_catalog.pg_class c \
                 WHERE c.oid OPERATOR(pg_catalog.=) pg_catalog.to_regclass($1::text)::oid",
                cols = coord::COLUMNS,
                n = coord::COLUMN_COUNT,
            ),
            &[&quoted],
        )
        .map_err(db_error)?;
    let (table_kind, columns, privileges): (bool, bool, bool) =
        (col(&row, 0)?, col(&row, 1)?, col(&row, 2)?);
    if !(table_kind && columns && privileges) {
        log::info!(
            "lockbox: lease table {display}: {schema}.{name} is not lockbox's shared-lease table \
             (or this role may not read and write it); readers and semaphores are not available"
        );
        return Ok(None);
    }
    Ok(Some(quoted))
}

/// The history table of lease table `relname` (in `schema`): `<table>_history`
/// beside it, created with its index when missing and `create` allows DDL.
fn ensure_history(
    tx: &mut postgres::Transaction<'_>,
    schema: &str,
    relname: &str,
    display: &str,
    create: bool,
    retention: Duration,
) -> Result<sql::HistoryInfo> {
    let name = format!("{relname}_history");
    if name.len() > 63 {
        return Err(Error::InvalidConfig(format!(
            "the history table of {display} would be named {name:?}, longer than PostgreSQL's \
             63-byte identifiers: name the lease table shorter"
        )));
    }
    let quoted = format!("{}.{}", quote_ident(schema), quote_ident(&name));
    let exists = |tx: &mut postgres::Transaction<'_>| -> Result<bool> {
        Ok(col::<Option<u32>>(
            &tx.query_one("SELECT to_regclass($1)::oid", &[&quoted])
                .map_err(db_error)?,
            0,
        )?
        .is_some())
    };
    // Only when missing: CREATE INDEX takes a SHARE lock on the table even
    // when the index exists.
    if create && !exists(tx)? {
        tx.batch_execute(&sql::create_history(&quoted))
            .map_err(|e| create_error(e, &format!("{schema}.{name}")))?;
    }
    if !exists(tx)? {
        return Err(Error::MissingTable {
            table: format!("{schema}.{name}"),
        });
    }
    let shown = format!("{schema}.{name}");
    // Its shape: a table (or partitioned one) with lockbox's columns, of
    // lockbox's types, and no other column a row must be given. A table of
    // that name may be the application's own (`jobs` and `jobs_history`);
    // written into, it would fail every grant (review_hist_table_shape.rs).
    let row = tx
        .query_one(
            "SELECT c.relkind OPERATOR(pg_catalog.=) ANY ('{r,p}'::\"char\"[]), \
                 (SELECT pg_catalog.count(*) FROM pg_catalog.pg_attribute a \
                  WHERE a.attrelid OPERATOR(pg_catalog.=) c.oid AND a.attnum OPERATOR(pg_catalog.>) 0 \
                    AND NOT a.attisdropped AND a.attgenerated OPERATOR(pg_catalog.=) '' \
                    AND pg_catalog.concat(a.attname, ':', pg_catalog.format_type(a.atttypid, NULL)) \
                        OPERATOR(pg_catalog.=) ANY ('{name:text,token:bigint,owner:text,metadata:text,\
                            event:text,\"at:timestamp with time zone\",holder_pid:integer}'::text[])) \
                    OPERATOR(pg_catalog.=) 7, \
                 NOT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a \
                  WHERE a.attrelid OPERATOR(pg_catalog.=) c.oid AND a.attnum OPERATOR(pg_catalog.>) 0 \
                    AND NOT a.attisdropped AND a.attnotnull AND NOT a.atthasdef \
                    AND a.attidentity OPERATOR(pg_catalog.=) '' \
                    AND a.attname::text OPERATOR(pg_catalog.<>) ALL ('{name,token,owner,metadata,event,at,holder_pid}'::text[])), \
                 pg_catalog.has_table_privilege(c.oid, 'INSERT'), \
                 pg_catalog.has_table_privilege(c.oid, 'DELETE') \
                     AND pg_catalog.has_table_privilege(c.oid, 'SELECT') \
                     AND pg_catalog.has_table_privilege(c.oid, 'UPDATE') \
             FROM pg_catalog.pg_class c WHERE c.oid OPERATOR(pg_catalog.=) pg_catalog.to_regclass($1::text)::oid",
            &[&quoted],
        )
        .map_err(db_error)?;
    let (table_kind, columns, no_other_required, insert, prune): (bool, bool, bool, bool, bool) = (
        col(&row, 0)?,
        col(&row, 1)?,
        col(&row, 2)?,
        col(&row, 3)?,
        col(&row, 4)?,
    );
    if !(table_kind && columns && no_other_required) {
        return Err(Error::InvalidConfig(format!(
            "the lease history table {shown} cannot be used: it must be a table with the columns \
             name text, token bigint, owner text, metadata text, event text, at timestamptz, \
             holder_pid integer, and no other column that must be given a value (is it another \
             application's table? name the lease table otherwise, or drop it and let build() \
             create it)"
        )));
    }
    // Every grant writes it: without INSERT each would fail.
    if !insert {
        return Err(Error::InsufficientPrivilege(format!(
            "recording the lease history needs the INSERT privilege on {shown} (every grant \
             writes its event there; build without history(true), or grant it)"
        )));
    }
    if !prune {
        log::info!(
            "lockbox: lease history {shown}: old events are not pruned by this client (it \
             needs DELETE, SELECT and UPDATE on the table)"
        );
    }
    Ok(sql::HistoryInfo {
        quoted,
        retention_ms: i64::try_from(retention.as_millis()).unwrap_or(i64::MAX),
        prune,
    })
}

/// The wait-and-grant function of the lease table (`quoted`, in `schema`): used
/// when it exists exactly as lockbox defines it and the role may call it;
/// created (or restored) when `create` allows DDL. It only saves a round trip
/// per waiting acquire, so when it cannot be used (no `CREATE` on the schema,
/// no PL/pgSQL, a function that is not lockbox's) waits grant with a statement
/// of their own, and this is logged.
fn ensure_wait_grant(
    tx: &mut postgres::Transaction<'_>,
    oid: u32,
    quoted: &str,
    schema: &str,
    relname: &str,
    create: bool,
    (history, unlogged): (Option<&sql::HistoryInfo>, Option<&sql::Unlogged>),
) -> Result<Option<sql::WaitGrant>> {
    // Identifiers are at most 63 bytes; a longer one would be cut, and two
    // tables could then share a function. Clients that record a history
    // grant with another body, so they use a function of their own; so do
    // clients of an unlogged table (whose grant is gated: a version that
    // knows no gate restoring its body must not serve them).
    let suffix = match (history, unlogged) {
        (Some(_), None) => sql::WAIT_GRANT_HISTORY_SUFFIX,
        (None, None) => sql::WAIT_GRANT_SUFFIX,
        (Some(_), Some(_)) => sql::WAIT_GRANT_HISTORY_UNLOGGED_SUFFIX,
        (None, Some(_)) => sql::WAIT_GRANT_UNLOGGED_SUFFIX,
    };
    let name = function_name(relname, oid, suffix);
    let w = sql::WaitGrant {
        signature: format!(
            "{}.{}({})",
            quote_ident(schema),
            quote_ident(&name),
            sql::WAIT_GRANT_ARGS
        ),
        body: sql::wait_grant_body(quoted, history, unlogged),
        table_oid: oid,
        schema: schema.to_owned(),
        name,
    };
    let usable = |tx: &mut postgres::Transaction<'_>| -> Result<bool> {
        let row = tx
            .query_opt(
                sql::WAIT_GRANT_CHECK,
                &[&w.signature, &w.body, &sql::WAIT_GRANT_RESULT, &w.table_oid],
            )
            .map_err(db_error)?;
        Ok(row.is_some())
    };
    if usable(tx)? {
        return Ok(Some(w));
    }
    // Only the table's owner creates it: the function is trusted only when it
    // belongs to that owner (or to the role using it), and one created by
    // another role would serve that role alone.
    if create && owns_table(tx, oid)? {
        create_function(tx, &sql::create_wait_grant(&w), &w.signature)?;
        if usable(tx)? {
            return Ok(Some(w));
        }
    }
    log::info!(
        "lockbox: lease table {schema}.{relname}: the function {} is missing or not \
         lockbox's (or not the table owner's), so a waiting acquire grants with a statement \
         of its own (one round trip more per wait; a build by the table's owner with \
         create_table(true) and CREATE on the schema creates it)",
        w.signature
    );
    Ok(None)
}

/// Whether this role owns the table `oid`.
fn owns_table(tx: &mut postgres::Transaction<'_>, oid: u32) -> Result<bool> {
    col(
        &tx.query_one(
            "SELECT c.relowner OPERATOR(pg_catalog.=) (SELECT r.oid FROM pg_catalog.pg_roles r \
                 WHERE r.rolname OPERATOR(pg_catalog.=) current_user) \
             FROM pg_catalog.pg_class c WHERE c.oid OPERATOR(pg_catalog.=) $1::oid",
            &[&oid],
        )
        .map_err(db_error)?,
        0,
    )
}

/// Runs `create` (a `CREATE OR REPLACE FUNCTION`) in a savepoint: failing to
/// create the function `signature` (no privilege, no PL/pgSQL, a function of
/// that name owned by another role) is logged, not a build error. Bounded: a
/// function of that name created by a transaction still open (another role's)
/// would hold the creation without end, and with it every creating build,
/// which queue on the build lock.
fn create_function(
    tx: &mut postgres::Transaction<'_>,
    create: &str,
    signature: &str,
) -> Result<()> {
    let mut sp = tx.transaction().map_err(db_error)?;
    let created = sp
        .batch_execute(&format!(
            "SET LOCAL lock_timeout = '{}ms'",
            CREATE_FUNCTION_WAIT.as_millis()
        ))
        .and_then(|()| sp.batch_execute(create));
    match created {
        Ok(()) => sp.commit().map_err(db_error),
        Err(e) => {
            log::info!(
                "lockbox: could not create the function {signature}: {}",
                Error::database(e)
            );
            Ok(())
        }
    }
}

/// The name of a function of the lease table `relname` (in the same schema):
/// the table's name and `suffix`, or, when that would be longer than an
/// identifier may be (and be cut, so that two tables could share it), one made
/// from the table's OID.
fn function_name(relname: &str, oid: u32, suffix: &str) -> String {
    if relname.len() + suffix.len() <= 63 {
        format!("{relname}{suffix}")
    } else {
        format!("lockbox{suffix}_{oid}")
    }
}

/// The fence function of the lease table (`quoted`, in `schema`), for
/// checks from SQL ([`sql::fence_body`]): created, or restored when its body is
/// not lockbox's, when `create` allows DDL and this role owns the table.
/// lockbox never calls it (its own check runs inline), so it is created with
/// the caller's privileges (`SECURITY INVOKER`) and needs no trust checks.
fn ensure_fence(
    tx: &mut postgres::Transaction<'_>,
    oid: u32,
    quoted: &str,
    schema: &str,
    relname: &str,
    create: bool,
) -> Result<()> {
    let signature = format!(
        "{}.{}({})",
        quote_ident(schema),
        quote_ident(&function_name(relname, oid, sql::FENCE_SUFFIX)),
        sql::FENCE_ARGS
    );
    let body = sql::fence_body(quoted);
    let current: bool = col(
        &tx.query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_proc p \
                 WHERE p.oid OPERATOR(pg_catalog.=) pg_catalog.to_regprocedure($1::text) \
                   AND p.prosrc OPERATOR(pg_catalog.=) $2::text)",
            &[&signature, &body],
        )
        .map_err(db_error)?,
        0,
    )?;
    if !current {
        if create && owns_table(tx, oid)? {
            create_function(tx, &sql::create_fence(&signature, &body), &signature)?;
        } else {
            log::info!(
                "lockbox: lease table {schema}.{relname}: the fence function {signature} is \
                 missing or not lockbox's (a build by the table's owner with create_table(true) \
                 creates it); Lock::fence does not need it"
            );
        }
    }
    Ok(())
}

/// The table's OID if `name` resolves (through the `search_path` when unqualified).
fn lookup(tx: &mut postgres::Transaction<'_>, name: &str) -> Result<Option<u32>> {
    col(
        &tx.query_one("SELECT to_regclass($1)::oid", &[&name])
            .map_err(db_error)?,
        0,
    )
}

/// The columns lockbox reads and writes, with the types it reads and binds them as.
const COLUMNS: [(&str, &str); 10] = [
    ("name", "text"),
    ("owner", "text"),
    ("token", "bigint"),
    ("holder_pid", "integer"),
    ("holder_started", "timestamp with time zone"),
    ("metadata", "text"),
    ("acquired_at", "timestamp with time zone"),
    ("renewed_at", "timestamp with time zone"),
    ("expires_at", "timestamp with time zone"),
    ("released_at", "timestamp with time zone"),
];

/// Checks every column lockbox uses (name and exact type), that no other column
/// would make its inserts fail, and that `name` is unique (what `ON CONFLICT
/// (name)` needs). Returns the token column's `attidentity` (`""`: none).
fn check_columns(tx: &mut postgres::Transaction<'_>, oid: u32, display: &str) -> Result<String> {
    let rows = tx
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), a.attnotnull, \
                    a.atthasdef OR a.attidentity <> '' OR a.attgenerated <> '', a.attidentity::text \
             FROM pg_attribute a WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped",
            &[&oid],
        )
        .map_err(db_error)?;
    let mut identity = String::new();
    for (want, ty) in COLUMNS {
        let found = rows
            .iter()
            .find(|r| r.try_get::<_, String>(0).is_ok_and(|n| n == want));
        let Some(row) = found else {
            return Err(shape_error(
                display,
                &format!("it has no column {want} ({ty})"),
            ));
        };
        let actual: String = col(row, 1)?;
        if actual != ty {
            return Err(shape_error(
                display,
                &format!("its column {want} is {actual}; lockbox needs {ty}"),
            ));
        }
        if want == "token" {
            identity = col(row, 4)?;
        }
    }
    for row in &rows {
        let name: String = col(row, 0)?;
        let (not_null, has_default): (bool, bool) = (col(row, 2)?, col(row, 3)?);
        if not_null && !has_default && !COLUMNS.iter().any(|(c, _)| *c == name) {
            return Err(shape_error(
                display,
                &format!(
                    "its column {name} is NOT NULL without a default, so lockbox cannot insert leases"
                ),
            ));
        }
    }
    let unique: bool = col(
        &tx.query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_index i JOIN pg_attribute a \
                 ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0] \
             WHERE i.indrelid = $1 AND i.indisunique AND i.indimmediate AND i.indnkeyatts = 1 \
               AND a.attname = 'name' AND i.indpred IS NULL AND i.indexprs IS NULL)",
            &[&oid],
        )
        .map_err(db_error)?,
        0,
    )?;
    if !unique {
        return Err(shape_error(
            display,
            "its column name is not unique (lockbox needs it as the primary key)",
        ));
    }
    Ok(identity)
}

/// Refuses a lease table whose rows can be changed behind lockbox's statements:
/// an enabled row-level `BEFORE` or `INSTEAD OF` trigger (it may rewrite a token,
/// an expiry, an owner) or a rewrite rule. `AFTER` triggers cannot change the row
/// (one that raises only fails the statement, loudly) and are allowed.
fn check_rewrites(tx: &mut postgres::Transaction<'_>, oid: u32, display: &str) -> Result<()> {
    let row = tx
        .query_one(
            "SELECT (SELECT string_agg(tgname::text, ', ' ORDER BY tgname) FROM pg_trigger \
                     WHERE tgrelid = $1 AND NOT tgisinternal AND tgenabled <> 'D' \
                       AND (tgtype::int4 & 1) = 1 AND (tgtype::int4 & 66) <> 0), \
                    (SELECT string_agg(rulename::text, ', ' ORDER BY rulename) FROM pg_rewrite \
                     WHERE ev_class = $1 AND rulename <> '_RETURN')",
            &[&oid],
        )
        .map_err(db_error)?;
    if let Some(triggers) = col::<Option<String>>(&row, 0)? {
        return Err(shape_error(
            display,
            &format!(
                "it has row triggers that run before lockbox's writes and may change them \
                 ({triggers}); drop or disable them, or use another table"
            ),
        ));
    }
    if let Some(rules) = col::<Option<String>>(&row, 1)? {
        return Err(shape_error(
            display,
            &format!("it has rewrite rules that may change lockbox's writes ({rules})"),
        ));
    }
    Ok(())
}

fn shape_error(table: &str, why: &str) -> Error {
    Error::InvalidConfig(format!(
        "the lease table {table} cannot be used: {why} (the DDL lockbox expects is in the README)"
    ))
}

fn create_error(e: postgres::Error, table: &str) -> Error {
    match db_error(e) {
        Error::InsufficientPrivilege(msg) => Error::InsufficientPrivilege(format!(
            "creating or upgrading the lease table {table} needs the CREATE privilege on its \
             schema or ownership of the table (or create it yourself from the README's DDL): {msg}"
        )),
        other => other,
    }
}

/// Quotes an identifier for SQL, as `quote_ident` does.
fn quote_ident(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// Whether connections to `config` get server sessions of their own, as session
/// advisory locks need; a transaction-pooling proxy (PgBouncer with
/// `pool_mode = transaction`) fails it. Two signs, neither of which blocks:
/// two transactions on one connection running in different server sessions
/// (what a round-robin pooler shows), or a session-level advisory lock taken on
/// one connection being granted again to a second one (what a LIFO pooler shows:
/// both ran in the same server session). A pooler that happens to show neither
/// goes unseen here; renewals, which check the holder's session, then report the
/// lock lost as soon as a transaction lands elsewhere.
pub(crate) fn keeps_session(
    first: &mut postgres::Client,
    target: &tls::PgTarget,
) -> std::result::Result<bool, OpenError> {
    let pid = |client: &mut postgres::Client| -> std::result::Result<i32, OpenError> {
        client
            .query_one("SELECT pg_catalog.pg_backend_pid()", &[])
            .and_then(|row| row.try_get(0))
            .map_err(OpenError::Setup)
    };
    if pid(first)? != pid(first)? {
        return Ok(false);
    }
    // An internal key in the single-bigint form, which no lock name can reach.
    const PROBE: &str = "SELECT pg_catalog.pg_try_advisory_lock($1)";
    let mut second = target.connect().map_err(OpenError::Connect)?;
    second
        .batch_execute(SESSION_SETUP)
        .map_err(OpenError::Setup)?;
    let mut got = [false; 2];
    for (client, got) in [&mut *first, &mut second].into_iter().zip(&mut got) {
        *got = client
            .query_one(PROBE, &[&SESSION_PROBE_KEY])
            .and_then(|row| row.try_get(0))
            .map_err(OpenError::Setup)?;
    }
    for client in [&mut *first, &mut second] {
        client
            .execute("SELECT pg_catalog.pg_advisory_unlock_all()", &[])
            .map_err(OpenError::Setup)?;
    }
    Ok(!(got[0] && got[1]))
}

/// Why a fresh session (its settings not yet pinned) cannot take locks: the
/// server is a standby (in recovery), or its sessions are read-only by default
/// (`default_transaction_read_only` set for the role, the database or the
/// server, which an operator may do to fence writes off during a failover).
/// `None` for a writable primary.
fn read_only(client: &mut postgres::Client) -> std::result::Result<Option<String>, OpenError> {
    let row = client
        .query_one(
            "SELECT pg_catalog.pg_is_in_recovery(), \
                    pg_catalog.current_setting('transaction_read_only'), \
                    pg_catalog.current_setting('default_transaction_read_only')",
            &[],
        )
        .map_err(OpenError::Setup)?;
    let get = |i: usize| -> std::result::Result<String, OpenError> {
        row.try_get::<_, String>(i).map_err(OpenError::Setup)
    };
    let in_recovery: bool = row.try_get(0).map_err(OpenError::Setup)?;
    Ok(read_only_reason(
        in_recovery,
        get(1)? == "on" || get(2)? == "on",
    ))
}

/// Why a session on a server in recovery, or read-only by default, cannot
/// take locks; `None` when it can.
pub(crate) fn read_only_reason(in_recovery: bool, read_only: bool) -> Option<String> {
    if in_recovery {
        Some("the server is a standby (in recovery): its sessions are read-only".to_owned())
    } else if read_only {
        Some(
            "the session is read-only (default_transaction_read_only or transaction_read_only \
             is on for this role, database or server)"
                .to_owned(),
        )
    } else {
        None
    }
}
