//! The PostgreSQL backend: session advisory locks for exclusion, crash release and
//! server-side waiting; a lease table as the authoritative record.
//!
//! An acquire runs on one pooled connection. In one statement it takes the advisory
//! lock for the name's key and, if the lease row is free (released, or expired by
//! the database clock), writes the lease with the next fencing token, committed
//! durably. If the advisory lock is free but a live lease of another session
//! remains (its holder died without releasing), the acquirer keeps the advisory
//! lock and waits the lease out (lock-delay). If the lease has expired but its
//! session still holds the advisory lock (a paused or hung holder: a *zombie*), the
//! acquirer terminates that session and takes over. Waits block inside the server
//! (`pg_advisory_lock` bounded by `lock_timeout`), in slices that end when the
//! current lease would expire, so a zombie is noticed.

mod connection;
mod inspect;
mod key;
mod session;
mod sql;

use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use postgres::error::SqlState;
use r2d2::{Pool, PooledConnection};

use crate::backend::{AcquireRequest, Backend, Grant, Wait};
use crate::config::LockClientBuilder;
use crate::error::{Error, Result};
use crate::health::{DatabaseHealth, PoolHealth};
use crate::lease_info::LeaseInfo;

use connection::{Connector, OpenError, PgConn, PgManager, describe_target};
use session::{PgSession, millis};
use sql::{SESSION_SETUP, Sql};

use key::NAMESPACE;
pub use key::advisory_key;
pub(crate) use key::name_key;

/// PostgreSQL 14 added `pg_terminate_backend(pid, timeout)` and
/// `idle_session_timeout`, both of which lockbox relies on.
const MIN_SERVER_VERSION: i32 = 140_000;
/// How long a takeover waits for a terminated zombie session to exit.
const TERMINATE_WAIT: Duration = Duration::from_secs(5);
/// How long the retry after a dead pooled connection waits for another.
const RETRY_CHECKOUT: Duration = Duration::from_secs(1);
/// A pooled connection idle this long is validated before use.
const VALIDATE_AFTER_IDLE: Duration = Duration::from_secs(1);
/// Added to a lock-delay so that it ends just after the lease.
const EXPIRY_SLACK: Duration = Duration::from_millis(sql::EXPIRY_SLACK_MS as u64);

pub(crate) struct PgBackend {
    pool: Pool<PgManager>,
    key_fn: fn(&str) -> i32,
    /// Health probes, which use a connection of their own, one at a time.
    prober: inspect::Prober,
    sql: Arc<Sql>,
    target: String,
    table: String,
    pool_size: u32,
    pool_timeout: Duration,
}

impl std::fmt::Debug for PgBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgBackend")
            .field("target", &self.target)
            .field("table", &self.table)
            .field("pool_size", &self.pool_size)
            .finish_non_exhaustive()
    }
}

/// Maps a driver error, naming a missing privilege when that is the cause.
pub(crate) fn db_error(err: postgres::Error) -> Error {
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
        let mut config: postgres::Config = b.url.parse().map_err(|e: postgres::Error| {
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
        let target = describe_target(&config);
        let sql = Arc::new(Sql::new(&b.table));
        // Every session lockbox opens is set up within the connect timeout, and
        // attempts a frozen server leaves waiting are bounded: the pool's plus
        // the two `build()` uses.
        let connector = Connector::new(config.clone(), b.connect_timeout, b.pool_size as usize + 2);
        let manager = PgManager::new(connector.clone(), sql.clone());

        let check_config = config.clone();
        let (mut client, version, keeps) = connector
            .open(move |mut client| {
                let version: i32 = client
                    .query_one(
                        "SELECT pg_catalog.current_setting('server_version_num')::pg_catalog.int4",
                        &[],
                    )
                    .and_then(|row| row.try_get(0))
                    .map_err(OpenError::Setup)?;
                if version < MIN_SERVER_VERSION {
                    return Ok((client, version, true));
                }
                client
                    .batch_execute(SESSION_SETUP)
                    .map_err(OpenError::Setup)?;
                let keeps = keeps_session(&mut client, &check_config)?;
                Ok((client, version, keeps))
            })
            .map_err(|e| e.into_error(&target))?;
        if version < MIN_SERVER_VERSION {
            return Err(Error::Unsupported(format!(
                "PostgreSQL {version} is older than 14, which lockbox requires"
            )));
        }
        if !keeps {
            return Err(Error::Unsupported(
                "the connection path does not keep session state (a transaction-pooling proxy \
                 such as PgBouncer with pool_mode=transaction?); lockbox needs real sessions \
                 for its advisory locks: connect directly or use session pooling"
                    .to_owned(),
            ));
        }
        ensure_table(&mut client, &sql, b.create_table)?;
        drop(client);
        // Prepares every statement once now, so a table of the wrong shape is
        // reported by `build()` rather than by each acquire.
        drop(
            manager
                .connect_configured()
                .map_err(|e| e.into_error(&target))?,
        );

        let pool = Pool::builder()
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
            prober: inspect::Prober::new(config, &sql),
            sql,
            target,
            table: b.table.clone(),
            pool_size: b.pool_size,
            pool_timeout: b.pool_timeout,
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
    ) -> Result<PooledConnection<PgManager>> {
        let _waiting = req.pool_waiting();
        for _ in 0..=self.pool_size {
            let mut conn = self.pool.get_timeout(limit).map_err(|e| {
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
    /// the advisory lock. Returns the token and send time when granted.
    fn acquire_on(
        &self,
        conn: &mut PgConn,
        holds: &mut bool,
        dead_on_arrival: &mut bool,
        req: &AcquireRequest<'_>,
        key: i32,
    ) -> Result<Option<(i64, Instant, bool)>> {
        let ttl_ms = millis(req.ttl);
        // A waiting acquire blocks from its first statement: one round trip when
        // free, and the wait begins at once when not.
        let blocking = req.wait() != Wait::No;
        let mut took_over = false;
        // Raised while this acquire is blocked in the database.
        let mut waiting = None;
        // Whether this acquire has waited on a holder (for the metrics).
        let mut waited = false;
        let mut first_statement = true;
        loop {
            let sent_at = Instant::now();
            // Every acquire statement takes the same seven parameters; the blocking
            // one adds the wait left and the default slice.
            let left = match req.remaining() {
                Some(rem) if blocking && rem.is_zero() && !*holds => return Ok(None),
                Some(rem) => millis(rem),
                None => 0,
            };
            let params: [&(dyn postgres::types::ToSql + Sync); 9] = [
                &key,
                &req.name,
                &req.owner,
                &ttl_ms,
                &req.metadata,
                &conn.pid,
                &conn.backend_start,
                &left,
                &ttl_ms,
            ];
            let (stmt, params) = if *holds {
                (&conn.stmts.upsert, &params[..7])
            } else if blocking {
                waiting.get_or_insert_with(|| req.waiting());
                (&conn.stmts.wait_acquire, &params[..])
            } else {
                (&conn.stmts.try_acquire, &params[..7])
            };
            let res = conn.client.query_one(stmt, params);
            let was_first = std::mem::replace(&mut first_statement, false);
            match res {
                Ok(row) => {
                    if row.get::<_, bool>(0) {
                        *holds = true;
                    }
                    waited |= row.get::<_, bool>(3);
                    if let Some(token) = row.get::<_, Option<i64>>(1) {
                        // The lease runs from when it was written, after any wait
                        // inside the statement. The server measured that wait from
                        // the statement's start, which is after `sent_at`, and rounded
                        // it down: the local deadline still ends before the lease.
                        let waited_in_statement =
                            Duration::from_millis(row.get::<_, i64>(4).max(0) as u64);
                        return Ok(Some((token, sent_at + waited_in_statement, waited)));
                    }
                    // What the current lease has left (ms; <= 0: expired).
                    let lease_left: Option<i64> = row.get(2);
                    if *holds {
                        // Lock-delay: the advisory lock is ours but the previous
                        // holder's lease is still live (its session died without
                        // releasing). Wait it out; nobody else can take it meanwhile.
                        let left = Duration::from_millis(lease_left.unwrap_or(0).max(0) as u64)
                            + EXPIRY_SLACK;
                        match req.remaining() {
                            Some(rem) if !rem.is_zero() => {
                                waited = true;
                                let _waiting = req.waiting();
                                thread::sleep(left.min(rem));
                            }
                            _ => return Ok(None),
                        }
                        continue;
                    }
                    // Another session holds the advisory lock (only a non-blocking
                    // statement returns without it). A zombie is terminated and the
                    // lock tried once more.
                    if lease_left.is_some_and(|ms| ms <= 0) && !took_over && probe(conn, key, req)?
                    {
                        took_over = true;
                        continue;
                    }
                    return Ok(None);
                }
                Err(e) if blocking && e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) => {
                    waited = true;
                    // The slice ran out. The lock may have been granted just as the
                    // timeout fired; then it is held and must not be reported (or
                    // leaked) as not acquired.
                    let held: bool = conn
                        .client
                        .query_one(&conn.stmts.holds_key, &[&key])
                        .map_err(db_error)?
                        .get(0);
                    if held {
                        *holds = true;
                        continue;
                    }
                    // The next slice is timed from the lease again; a zombie holder
                    // is terminated now.
                    probe(conn, key, req)?;
                }
                Err(e) => {
                    *dead_on_arrival = was_first && session::session_gone(&e, conn);
                    return Err(db_error(e));
                }
            }
        }
    }
}

impl Backend for PgBackend {
    fn probe(&self, timeout: Duration) -> DatabaseHealth {
        self.prober.probe(timeout)
    }

    fn pool_health(&self) -> PoolHealth {
        crate::backend::r2d2_pool_health(&self.pool)
    }

    fn leases(&self, name: Option<&str>) -> Result<Vec<LeaseInfo>> {
        let mut conn = self.pool.get().map_err(|_| Error::PoolTimeout {
            waited: self.pool_timeout,
            pool_size: self.pool_size,
        })?;
        inspect::leases(&mut conn.client, &self.sql, name, self.key_fn)
    }

    fn acquire(&self, req: &AcquireRequest<'_>) -> Result<Option<Grant>> {
        let key = (self.key_fn)(req.name);
        let mut conn = self.checkout(req, self.pool_timeout)?;
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
                        log::debug!(
                            "lockbox: a pooled connection's session had ended; retrying on another"
                        );
                        match self.checkout(req, RETRY_CHECKOUT.min(self.pool_timeout)) {
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
                    Ok(Some(Grant {
                        session: Box::new(PgSession::new(conn)),
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

/// Terminates the session holding `name`'s lease if it is a zombie (its lease
/// expired but it still holds the advisory lock). Returns whether it did.
fn probe(conn: &mut PgConn, key: i32, req: &AcquireRequest<'_>) -> Result<bool> {
    let name = req.name();
    let rows = conn
        .client
        .query(&conn.stmts.probe, &[&key, &name, &millis(TERMINATE_WAIT)])
        .map_err(|e| match db_error(e) {
            Error::InsufficientPrivilege(msg) => Error::InsufficientPrivilege(format!(
                "lock {name:?} is held by a session whose lease has expired (a zombie holder); \
                 terminating it needs membership in the role pg_signal_backend (or in the \
                 holder's role): {msg}"
            )),
            other => other,
        })?;
    let Some(row) = rows.first() else {
        return Ok(false);
    };
    let pid: i32 = row.get(0);
    if row.get::<_, Option<bool>>(1) == Some(true) {
        return Err(Error::InsufficientPrivilege(format!(
            "lock {name:?} is held by backend {pid} whose lease has expired (a zombie holder); \
             verifying that session before terminating it needs the role pg_read_all_stats \
             (or membership in the holder's role) to read its backend_start"
        )));
    }
    let terminated = row.get::<_, Option<bool>>(2) == Some(true);
    if terminated {
        req.zombie_terminated();
        log::warn!(
            "lockbox: terminated backend {pid}, the zombie holder of lock {name:?}: \
             its lease had expired but it still held the advisory lock"
        );
    }
    Ok(terminated)
}

/// Creates the lease table if it is missing (serialised by a transaction-level
/// advisory lock, so concurrent first starts do not race), or checks it exists.
fn ensure_table(client: &mut postgres::Client, sql: &Sql, create: bool) -> Result<()> {
    if create {
        let mut tx = client.transaction().map_err(db_error)?;
        tx.execute(
            &format!("SELECT pg_advisory_xact_lock({NAMESPACE}, 0)"),
            &[],
        )
        .map_err(db_error)?;
        tx.batch_execute(&sql.create_table)
            .map_err(|e| match db_error(e) {
                Error::InsufficientPrivilege(msg) => Error::InsufficientPrivilege(format!(
                    "creating the lease table {} needs the CREATE privilege on its schema \
                 (or create it yourself from the README's DDL): {msg}",
                    sql.table
                )),
                other => other,
            })?;
        tx.commit().map_err(db_error)
    } else {
        let exists: bool = client
            .query_one(sql.table_exists, &[&sql.table])
            .map_err(db_error)?
            .get(0);
        if exists {
            Ok(())
        } else {
            Err(Error::MissingTable {
                table: sql.table.clone(),
            })
        }
    }
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
    config: &postgres::Config,
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
    // A key of its own (second half 0x7fff_ffff is never used for a probe by
    // anything else) so that no lock of an application is touched.
    const PROBE: &str = "SELECT pg_catalog.pg_try_advisory_lock($1, 2147483647)";
    let mut second = config
        .connect(postgres::NoTls)
        .map_err(OpenError::Connect)?;
    second
        .batch_execute(SESSION_SETUP)
        .map_err(OpenError::Setup)?;
    let mut got = [false; 2];
    for (client, got) in [&mut *first, &mut second].into_iter().zip(&mut got) {
        *got = client
            .query_one(PROBE, &[&NAMESPACE])
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
