//! Health probes and lease listings for the PostgreSQL backend.
//!
//! Nothing here panics on what a server sends: every value is read with
//! `try_get`, and timestamps outside what `SystemTime` can show (an operator's
//! `'infinity'`) are clamped to the edges of PostgreSQL's own range.

use std::collections::HashSet;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::{Condvar, Mutex};
use postgres::Row;

use super::connection::{OpenError, PgConn, describe_target};
use super::coord::{CoordSql, GROUP_OWNER};
use super::key::split;
use super::sql::{SESSION_SETUP, Sql};
use super::tls::PgTarget;
use super::{col, db_error, keeps_session};
use crate::error::Error;
use crate::error::Result;
use crate::health::DatabaseHealth;
use crate::lease_info::{LeaseEvent, LeaseEventKind, LeaseInfo, LeaseStatus};

/// Runs health probes for one client, one at a time.
///
/// A probe runs on a thread of its own (`lockbox-health`) on a connection of its
/// own, so a hung server cannot hold the caller past its timeout. The driver
/// cannot cancel a blocked connect, so a probe the caller gave up on keeps
/// waiting for the server; while it does, later calls wait for *that* probe's
/// answer (up to their own timeout) instead of starting another. However often
/// `health()` is called against a frozen server, at most one probe thread (with
/// at most two connections) exists per client.
pub(crate) struct Prober {
    /// Reached as the pool reaches it (the same TLS settings).
    target: Arc<PgTarget>,
    /// The lease table, quoted, for the write check.
    table: String,
    /// The unlogged lease table's state query (`None`: the table is logged).
    epoch_state: Option<String>,
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    finished: Condvar,
}

#[derive(Default)]
struct State {
    /// When the probe now running started, if one is.
    running: Option<Instant>,
    /// Probes finished so far.
    done: u64,
    /// The last finished probe's report.
    last: Option<DatabaseHealth>,
}

impl std::fmt::Debug for Prober {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prober")
            .field("target", &describe_target(self.target.config()))
            .field("table", &self.table)
            .finish_non_exhaustive()
    }
}

/// Publishes a probe's report when the probe thread ends, even by a panic, so
/// that a failed probe never blocks the ones after it.
struct Publish {
    shared: Arc<Shared>,
    report: Option<DatabaseHealth>,
}

impl Drop for Publish {
    fn drop(&mut self) {
        let report = self
            .report
            .take()
            .unwrap_or_else(|| DatabaseHealth::unreachable("the health probe failed".to_owned()));
        let mut state = self.shared.state.lock();
        state.running = None;
        state.done += 1;
        state.last = Some(report);
        self.shared.finished.notify_all();
    }
}

impl Prober {
    pub fn new(target: Arc<PgTarget>, sql: &Sql) -> Prober {
        Prober {
            target,
            table: sql.quoted_table.clone(),
            epoch_state: sql.epoch_state.clone(),
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                finished: Condvar::new(),
            }),
        }
    }

    /// The database's health, within `timeout`.
    pub fn probe(&self, timeout: Duration) -> DatabaseHealth {
        let deadline = Instant::now() + timeout;
        let mut state = self.shared.state.lock();
        // The report wanted: that of the probe running now, or of a new one.
        let wanted = state.done + 1;
        if state.running.is_none() {
            let shared = self.shared.clone();
            let target = self.target.clone();
            let table = self.table.clone();
            let epoch_state = self.epoch_state.clone();
            let spawned = thread::Builder::new()
                .name("lockbox-health".to_owned())
                .spawn(move || {
                    let mut publish = Publish {
                        shared,
                        report: None,
                    };
                    publish.report =
                        Some(probe_now(&target, &table, epoch_state.as_deref(), timeout));
                });
            if let Err(e) = spawned {
                return DatabaseHealth::unreachable(format!(
                    "could not start the probe thread: {e}"
                ));
            }
            // Set before the lock is released, so the thread's report (which
            // needs the lock) always finds it.
            state.running = Some(Instant::now());
        }
        while state.done < wanted {
            if self
                .shared
                .finished
                .wait_until(&mut state, deadline)
                .timed_out()
                && state.done < wanted
            {
                let mut why = format!("no answer within {timeout:?}");
                if let Some(started) = state.running {
                    let age = started.elapsed();
                    if age > timeout + Duration::from_millis(100) {
                        why.push_str(&format!(
                            " (an earlier probe, started {age:?} ago, is still waiting for the server)"
                        ));
                    }
                }
                return DatabaseHealth::unreachable(why);
            }
        }
        state
            .last
            .clone()
            .unwrap_or_else(|| DatabaseHealth::unreachable("no probe result".to_owned()))
    }
}

/// One probe: connects, pins the session settings pooled sessions use, reads
/// the version (the round trip timed), checks that the path keeps sessions, and
/// that the lease table takes a write.
fn probe_now(
    target: &PgTarget,
    table: &str,
    epoch_state: Option<&str>,
    timeout: Duration,
) -> DatabaseHealth {
    let mut client = match target.connect() {
        Ok(client) => client,
        Err(e) => return DatabaseHealth::unreachable(OpenError::Connect(e).to_string()),
    };
    if let Err(e) = client.batch_execute(SESSION_SETUP) {
        return DatabaseHealth::unreachable(OpenError::Setup(e).to_string());
    }
    let start = Instant::now();
    let version = client
        .query_one("SELECT pg_catalog.current_setting('server_version')", &[])
        .and_then(|row| row.try_get::<_, String>(0));
    let latency = start.elapsed();
    let version = match version {
        Ok(version) => version,
        Err(e) => return DatabaseHealth::unreachable(OpenError::Setup(e).to_string()),
    };
    let session_state_kept = keeps_session(&mut client, target).ok();
    let write = check_writable(&mut client, table, timeout);
    let warnings = epoch_state
        .and_then(|q| unlogged_warning(&mut client, table, q))
        .into_iter()
        .collect();
    DatabaseHealth {
        reachable: true,
        latency: Some(latency),
        server_version: Some(format!("PostgreSQL {version}")),
        session_state_kept,
        writable: Some(write.is_ok()),
        error: write
            .err()
            .map(|e| format!("the lease table {table} is not writable: {e}")),
        listener_alive: None,
        warnings,
        lease_table: None,
        cluster: None,
    }
}

/// An unlogged lease table that a crash emptied, or that is in the
/// lock-delay after one, grants nothing for now: said as a warning (the
/// client is Degraded). `None` when it grants, or when it cannot be read
/// (the write check reports why).
fn unlogged_warning(client: &mut postgres::Client, table: &str, query: &str) -> Option<String> {
    let row = client.query_one(query, &[]).ok()?;
    let epoch: i64 = row.try_get(0).ok()?;
    let whole: bool = row.try_get(1).ok()?;
    let left: Option<i64> = row.try_get(2).ok()?;
    if !whole {
        return Some(format!(
            "the unlogged lease table {table} was emptied (a crash or a failover); the next \
             acquire starts a new epoch after epoch {epoch}, and no lock is granted until every \
             lease granted before would have ended"
        ));
    }
    left.filter(|ms| *ms > 0).map(|ms| {
        format!(
            "no lock is granted for {ms} ms more: the lock-delay of epoch {epoch} of the unlogged \
             lease table {table}, after a crash or a failover"
        )
    })
}

/// Writes a probe row into the lease table in a transaction that is rolled
/// back, so that a server which only reads (a standby after a failover,
/// a write fence (`default_transaction_read_only`), a trigger, a
/// revoked privilege, a lock held on the table) is reported. The row's name
/// cannot clash in practice (it carries this backend's pid and the time), its
/// insert gives way to any existing row, and it never commits. A full disk is
/// not detected this way: an aborted write needs no disk space.
fn check_writable(
    client: &mut postgres::Client,
    table: &str,
    timeout: Duration,
) -> std::result::Result<(), String> {
    let describe = |e: postgres::Error| OpenError::Setup(e).to_string();
    let mut tx = client.transaction().map_err(describe)?;
    // A lock held on the table (an operator's ALTER TABLE) makes the write wait
    // no longer than the caller does.
    tx.batch_execute(&format!(
        "SET LOCAL lock_timeout = '{}ms'",
        timeout.as_millis().clamp(1, i32::MAX as u128)
    ))
    .map_err(describe)?;
    tx.execute(
        &format!(
            "INSERT INTO {table} (name, owner, token, holder_pid, holder_started, metadata, \
                 acquired_at, renewed_at, expires_at, released_at) \
             SELECT 'lockbox health probe ' || pg_backend_pid()::text || ' ' || clock_timestamp()::text, \
                    'lockbox health probe', 1, pg_backend_pid(), clock_timestamp(), NULL, \
                    clock_timestamp(), clock_timestamp(), clock_timestamp(), clock_timestamp() \
             ON CONFLICT DO NOTHING"
        ),
        &[],
    )
    .map_err(describe)?;
    tx.rollback().map_err(describe)
}

/// Lists leases, with whether each holder's session still holds its advisory lock.
pub(crate) fn leases(
    client: &mut postgres::Client,
    sql: &Sql,
    coord: Option<&CoordSql>,
    name: Option<&str>,
    key_fn: fn(&str) -> i64,
) -> Result<Vec<LeaseInfo>> {
    let rows = client.query(&sql.leases, &[&name]).map_err(db_error)?;
    // The unreleased shared leases, one per holder; a name's row held by a
    // group of them is not a lease of its own and is not listed.
    let shared = match coord {
        Some(c) => client.query(&c.leases, &[&name]).map_err(db_error)?,
        None => Vec::new(),
    };
    // (pid, key1, key2) of every two-int4 advisory lock held in this database.
    let locks = client
        .query(
            "SELECT pid, classid::text::int8::bit(32)::int4, objid::text::int8::bit(32)::int4 \
             FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 2 \
               AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            &[],
        )
        .map_err(db_error)?;
    let mut held: HashSet<(i32, i32, i32)> = HashSet::with_capacity(locks.len());
    for row in &locks {
        held.insert((
            row.try_get(0).map_err(db_error)?,
            row.try_get(1).map_err(db_error)?,
            row.try_get(2).map_err(db_error)?,
        ));
    }
    let mut out = Vec::with_capacity(rows.len() + shared.len());
    for r in &rows {
        if col::<String>(r, 1)? == GROUP_OWNER {
            continue;
        }
        out.push(lease_info(r, &held, key_fn).map_err(db_error)?);
    }
    for r in &shared {
        let mut info = lease_info(r, &held, key_fn).map_err(db_error)?;
        let kind: String = col(r, 10)?;
        let permits: i32 = col(r, 11)?;
        info.kind = if kind == "permit" {
            crate::backend::LeaseKind::Permit {
                permits: u32::try_from(permits).unwrap_or(0),
            }
        } else {
            crate::backend::LeaseKind::Shared
        };
        out.push(info);
    }
    // Listed by name (each name's shared holders by token).
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// One row of the `leases` statement: name, owner, metadata, token, holder pid,
/// then acquired, renewed, expires and released as epoch seconds (float8,
/// `±Infinity` for `±infinity`), then the time left in ms (float8).
fn lease_info(
    r: &Row,
    held: &HashSet<(i32, i32, i32)>,
    key_fn: fn(&str) -> i64,
) -> std::result::Result<LeaseInfo, postgres::Error> {
    let name: String = r.try_get(0)?;
    let holder_pid: i32 = r.try_get(4)?;
    let token: i64 = r.try_get(3)?;
    let released_at: Option<f64> = r.try_get(8)?;
    let expires_in_ms: Option<f64> = r.try_get(9)?;
    let expires_in_ms = expires_in_ms.unwrap_or(0.0);
    let status = match released_at {
        Some(at) => LeaseStatus::Released { at: epoch(at) },
        None if expires_in_ms > 0.0 => LeaseStatus::Held {
            expires_in: millis(expires_in_ms),
        },
        None => LeaseStatus::Expired {
            ago: millis(-expires_in_ms),
        },
    };
    Ok(LeaseInfo {
        holder_alive: {
            let (k1, k2) = split(key_fn(&name));
            held.contains(&(holder_pid, k1, k2))
        },
        owner: r.try_get(1)?,
        metadata: r.try_get(2)?,
        // The table's CHECK keeps tokens positive; a row edited past it shows as 0.
        fencing_token: u64::try_from(token).unwrap_or(0),
        holder_pid,
        acquired_at: epoch(r.try_get(5)?),
        renewed_at: epoch(r.try_get(6)?),
        expires_at: epoch(r.try_get(7)?),
        status,
        name,
        kind: crate::backend::LeaseKind::Exclusive,
    })
}

/// One row of the `history` statement: name, token, owner, metadata, event,
/// at (epoch seconds, float8), holder pid.
pub(crate) fn lease_event(r: &Row) -> Result<LeaseEvent> {
    let event: String = col(r, 4)?;
    Ok(LeaseEvent {
        name: col(r, 0)?,
        fencing_token: u64::try_from(col::<i64>(r, 1)?).unwrap_or(0),
        owner: col(r, 2)?,
        metadata: col(r, 3)?,
        kind: match event.as_str() {
            "granted" => LeaseEventKind::Granted,
            "released" => LeaseEventKind::Released,
            "expired" => LeaseEventKind::Expired,
            "zombie_terminated" => LeaseEventKind::ZombieTerminated,
            "force_released" => LeaseEventKind::ForceReleased,
            _ => LeaseEventKind::Other,
        },
        event,
        at: epoch(col(r, 5)?),
        holder_pid: col(r, 6)?,
    })
}

/// How long a forced release waits for the lease row's lock (a renewal
/// committing, an operator's transaction) and for the terminated session to end.
const FORCE_WAIT_MS: i64 = 5_000;

/// What a forced release came to.
pub(crate) enum Forced {
    /// Committed, or refused: the ended lease's token (`None`: there was
    /// none to end).
    Done(Option<u64>),
    /// A lease was ended and `token` would be returned, but the connection
    /// ended at the `COMMIT` (`err`): whether the lease is over is to be read
    /// on another session ([`release_stands`]).
    Unknown {
        ended: Ended,
        token: u64,
        err: postgres::Error,
    },
}

/// What a forced release ended, to read back whether it stands.
pub(crate) struct Ended {
    /// The name's row's version the release wrote (its `xmin`).
    version: String,
    /// The row's token then.
    row_token: i64,
    /// A group of shared leases (whose row's token moves on as readers join).
    group: bool,
}

/// Ends `name`'s unreleased lease, whoever holds it, and terminates the
/// holder's session unless it holds other unreleased leases; all in one
/// transaction, so a refused termination changes nothing. Returns the ended
/// lease's token.
///
/// The row keeps its token, so the next grant (`token + 1`) is above it. The
/// holder's next renewal finds the lease released (or its session gone) and
/// reports the loss. The session is identified by pid *and* start time, so a
/// reused pid is never terminated.
///
/// Its transaction is committed or rolled back here, never left to the
/// transaction's drop, which ignores a failure: a `ROLLBACK` (or `COMMIT`)
/// an operator's cancel hits leaves the session inside the transaction, and
/// every later statement on it fails with 25P02. It is then rolled back again,
/// and a session that cannot is marked broken (closed, not pooled). A
/// `COMMIT` whose connection ends before it answers may have taken effect:
/// that is [`Forced::Unknown`].
pub(crate) fn force_release(
    conn: &mut PgConn,
    sql: &Sql,
    coord: Option<&CoordSql>,
    channel: &str,
    name: &str,
) -> Result<Forced> {
    let mut tx = conn.client.transaction().map_err(db_error)?;
    let ended = end_lease(&mut tx, sql, coord, channel, name);
    let done = match ended {
        Ok(_) => tx.commit(),
        Err(_) => tx.rollback(),
    };
    if done.is_err() && !super::shared::roll_back(&mut conn.client) {
        conn.broken = true;
    }
    let ended = ended?;
    match (done, ended) {
        (Ok(()), ended) => Ok(Forced::Done(ended.map(|(_, token)| token))),
        (Err(err), Some((ended, token))) if outcome_unknown(&err) => {
            Ok(Forced::Unknown { ended, token, err })
        }
        (Err(err), _) => Err(db_error(err)),
    }
}

/// Whether a failed `COMMIT` may have committed all the same: its
/// connection ended (closed, or a `FATAL` such as a terminated session's)
/// before it answered. A server's `ERROR` answer to it rolled back.
fn outcome_unknown(err: &postgres::Error) -> bool {
    match err.as_db_error() {
        Some(db) => matches!(db.severity(), "FATAL" | "PANIC"),
        None => true,
    }
}

/// How long [`release_stands`] waits for the lease row's lock: the
/// forced release's transaction, still in progress (its session, whose
/// connection ended, still finishing it).
const OUTCOME_WAIT_MS: i64 = 5_000;

/// Whether the lease a forced release of `name` ended (whose `COMMIT` went
/// unanswered) is over, read on another session. The row's lock is taken
/// first (`FOR SHARE`), so a transaction still in progress is waited for
/// (each wait up to [`OUTCOME_WAIT_MS`]). An exclusive lease is over when
/// the row is released with its token, holds a later one (a later grant
/// replaced it: its token moves on only with grants), or is gone (only an
/// old released row is reclaimed, and an unlogged table's crash empties it
/// all) — whether or not this release did it (a rolled-back release
/// followed by the holder's own, or by an expiry and a new grant). A
/// group's row gains
/// a token for every reader that joins (helper-78), so a group's release
/// stands only while the row is still the released version that release
/// wrote. Never the transaction's status in the commit log: a crash before
/// its commit record was flushed (or a failover before it was replicated)
/// gives its id to a later transaction, whose commit would pass for it
/// (helper-79). `None`: the row was written again since, and the outcome
/// is unknown (a group's release that committed and was followed by a new
/// grant, or one rolled back and followed by a write).
pub(crate) fn release_stands(
    conn: &mut PgConn,
    sql: &Sql,
    name: &str,
    ended: &Ended,
) -> Result<Option<bool>> {
    let row = conn
        .client
        .query_opt(
            &format!(
                "WITH cfg AS MATERIALIZED (SELECT pg_catalog.set_config('lock_timeout', \
                     '{OUTCOME_WAIT_MS}ms', true) AS v) \
                 SELECT t.xmin::text = $2::text, t.released_at IS NOT NULL, t.token \
                 FROM {t} t, cfg WHERE t.name = $1 AND cfg.v IS NOT NULL FOR SHARE OF t",
                t = sql.quoted_table
            ),
            &[&name, &ended.version],
        )
        .map_err(db_error)?;
    let Some(row) = row else {
        // Only an old released row is ever deleted (reclaimed).
        return Ok(if ended.group { None } else { Some(true) });
    };
    let same: bool = col(&row, 0)?;
    let released: bool = col(&row, 1)?;
    let token: i64 = col(&row, 2)?;
    if !ended.group {
        // By the token alone: a crash that lost the commit may give its
        // transaction id to a later grant of this row (helper-81).
        return Ok(Some(
            token > ended.row_token || (token == ended.row_token && released),
        ));
    }
    if same {
        return Ok(Some(released));
    }
    // A group's row as the release found it: the release was rolled back.
    Ok(if token == ended.row_token && !released {
        Some(false)
    } else {
        None
    })
}

/// [`force_release`]'s statements, in its transaction `tx`: committed when
/// this returns `Ok`, rolled back otherwise. Returns what it ended, and the
/// token to report (a group's: its highest live shared lease's).
fn end_lease(
    tx: &mut postgres::Transaction<'_>,
    sql: &Sql,
    coord: Option<&CoordSql>,
    channel: &str,
    name: &str,
) -> Result<Option<(Ended, u64)>> {
    let t = &sql.quoted_table;
    let ended = tx
        .query_opt(
            &format!(
                "WITH cfg AS MATERIALIZED (SELECT set_config('lock_timeout', '{FORCE_WAIT_MS}ms', \
                     true) AS v), \
                 ended AS (UPDATE {t} SET released_at = clock_timestamp() FROM cfg \
                     WHERE name = $1 AND released_at IS NULL AND cfg.v IS NOT NULL \
                     RETURNING name, token, owner, metadata, holder_pid, holder_started, \
                         xmin::text AS tx){record} \
                 SELECT token, holder_pid, holder_started, owner, tx FROM ended",
                // With a history: the forced release, in the same statement.
                record = sql.history_table.as_ref().map_or_else(String::new, |h| format!(
                    ", recorded AS (INSERT INTO {h} (name, token, owner, metadata, event, at, \
                         holder_pid) SELECT e.name, e.token, e.owner, e.metadata, 'force_released', \
                         clock_timestamp(), e.holder_pid FROM ended e)"
                )),
            ),
            &[&name],
        )
        .map_err(db_error)?;
    let Some(row) = ended else {
        return Ok(None);
    };
    let row_token: i64 = row.try_get(0).map_err(db_error)?;
    let mut token = row_token;
    let pid: i32 = row.try_get(1).map_err(db_error)?;
    let started: SystemTime = row.try_get(2).map_err(db_error)?;
    let owner: String = row.try_get(3).map_err(db_error)?;
    let version: String = row.try_get(4).map_err(db_error)?;
    let what = Ended {
        version,
        row_token,
        group: owner == GROUP_OWNER,
    };
    // Watchers and permit waiters hear of it at the commit.
    tx.execute("SELECT pg_notify($1::text, '')", &[&channel])
        .map_err(db_error)?;
    if owner == GROUP_OWNER {
        // A group of shared leases: each of them ends (read on a snapshot
        // taken after the row was locked above), and each holder's session
        // (one of its own per shared lease) is terminated, so that its
        // shared hold of the key goes with it.
        // Without the shared-lease table (this role may not write it), the
        // group's leases cannot be ended: releasing its row alone would say
        // "free" while they are live. Nothing is changed (the transaction
        // is rolled back).
        let Some(coord) = coord else {
            return Err(Error::Unsupported(format!(
                "lock {name:?} is held by shared leases (readers or semaphore permits), which \
                 this client cannot end: the shared-lease table is missing or this role may \
                 not write it; nothing was changed"
            )));
        };
        let ended = tx.query(&coord.force, &[&name]).map_err(db_error)?;
        let mut highest_live = None;
        // Every holder's session is checked before any is ended: a refusal
        // found only after some were ended would leave those holders without
        // their locks while the error said nothing was changed (review
        // helper-75).
        let mut to_end = Vec::with_capacity(ended.len());
        for r in &ended {
            let t: i64 = col(r, 0)?;
            let pid: i32 = col(r, 1)?;
            let started: SystemTime = col(r, 2)?;
            if col::<bool>(r, 3)? {
                highest_live = Some(t);
            }
            if holder_to_end(tx, pid, started, name)? {
                to_end.push(pid);
            }
        }
        for (done, &pid) in to_end.iter().enumerate() {
            end_holder(tx, pid, name, done, to_end.len())?;
        }
        if let Some(t) = highest_live {
            token = t;
        }
        return Ok(Some((what, u64::try_from(token).unwrap_or(0))));
    }
    // Whether the holder's session still runs, whether this role may see its
    // start time, and whether it holds other unreleased leases.
    let session = tx
        .query_opt(
            &format!(
                "SELECT a.backend_start IS NULL, a.backend_start = $2::timestamptz, \
                        EXISTS (SELECT 1 FROM {t} o WHERE o.holder_pid = $1 \
                            AND o.holder_started = $2::timestamptz AND o.released_at IS NULL \
                            AND o.name <> $3) \
                 FROM pg_stat_activity a WHERE a.pid = $1 AND a.pid <> pg_backend_pid()"
            ),
            &[&pid, &started, &name],
        )
        .map_err(db_error)?;
    if let Some(session) = session {
        let hidden: bool = session.try_get(0).map_err(db_error)?;
        let same: Option<bool> = session.try_get(1).map_err(db_error)?;
        let shared: bool = session.try_get(2).map_err(db_error)?;
        if hidden {
            return Err(Error::InsufficientPrivilege(format!(
                "forcing the release of lock {name:?} ends its holder's session (backend \
                 {pid}); verifying that session needs the role pg_read_all_stats (or \
                 membership in the holder's role) to read its backend_start; nothing was \
                 changed"
            )));
        }
        if same == Some(true) && !shared {
            end_holder(tx, pid, name, 0, 1)?;
        }
    }
    // The table's CHECK keeps tokens positive; a row edited past it shows as 0.
    Ok(Some((what, u64::try_from(token).unwrap_or(0))))
}

/// Whether the session `pid` started at `started` (a shared holder's, which
/// holds nothing else) is to be ended: it still runs. Refuses, changing
/// nothing, when this role may not read its start time, or may not end it:
/// PostgreSQL's rule for `pg_terminate_backend` (a superuser's session only
/// by a superuser; any other by a role with the privileges of its role or of
/// `pg_signal_backend`).
fn holder_to_end(
    tx: &mut postgres::Transaction<'_>,
    pid: i32,
    started: SystemTime,
    name: &str,
) -> Result<bool> {
    let session = tx
        .query_opt(
            "SELECT a.backend_start IS NULL, a.backend_start = $2::timestamptz, \
                    COALESCE(r.rolsuper, false) AND NOT (SELECT s.rolsuper \
                        FROM pg_catalog.pg_roles s WHERE s.rolname = current_user), \
                    a.usesysid IS NOT NULL AND pg_catalog.pg_has_role(a.usesysid, 'USAGE') \
                        OR pg_catalog.pg_has_role('pg_signal_backend', 'USAGE') \
             FROM pg_catalog.pg_stat_activity a \
                 LEFT JOIN pg_catalog.pg_roles r ON r.oid = a.usesysid \
             WHERE a.pid = $1 AND a.pid <> pg_catalog.pg_backend_pid()",
            &[&pid, &started],
        )
        .map_err(db_error)?;
    let Some(session) = session else {
        return Ok(false);
    };
    let hidden: bool = col(&session, 0)?;
    let same: Option<bool> = col(&session, 1)?;
    let superuser_s: Option<bool> = col(&session, 2)?;
    let may_signal: Option<bool> = col(&session, 3)?;
    if hidden {
        return Err(Error::InsufficientPrivilege(format!(
            "forcing the release of lock {name:?} ends its holders' sessions (backend {pid}); \
             verifying that session needs the role pg_read_all_stats (or membership in the \
             holder's role) to read its backend_start; nothing was changed"
        )));
    }
    if same != Some(true) {
        return Ok(false);
    }
    if superuser_s != Some(false) {
        return Err(Error::InsufficientPrivilege(format!(
            "forcing the release of lock {name:?} ends its holders' sessions (backend \
             {pid}, a superuser's session), which only a superuser may end; nothing was \
             changed"
        )));
    }
    if may_signal != Some(true) {
        return Err(Error::InsufficientPrivilege(format!(
            "forcing the release of lock {name:?} ends its holders' sessions (backend \
             {pid}), which needs membership in the role pg_signal_backend (or in the \
             holder's role); nothing was changed"
        )));
    }
    Ok(true)
}

/// Terminates `pid` (a group's holder checked by [`holder_to_end`], or an
/// exclusive lease's): the `done + 1`th of the `of` holders' sessions to
/// end. A termination refused all the same (the
/// holder's pid reused by another session since it was checked) says how
/// many were ended before it: those holders lost their locks. Any other
/// failure (a cancel, the connection lost) may come after the signal was
/// sent, so this holder may be ended too; the error is the server's, and a
/// warning says what was ended. A session that does not end within
/// [`FORCE_WAIT_MS`] (a frozen process) has been told to, and ends once it
/// runs again; a warning says so (PostgreSQL answers the same for a
/// session that had ended already).
fn end_holder(
    tx: &mut postgres::Transaction<'_>,
    pid: i32,
    name: &str,
    done: usize,
    of: usize,
) -> Result<()> {
    let ended = tx.query_one(
        &format!("SELECT pg_catalog.pg_terminate_backend($1, {FORCE_WAIT_MS})"),
        &[&pid],
    );
    let row = ended.map_err(|e| match db_error(e) {
        Error::InsufficientPrivilege(msg) => {
            let changed = if done == 0 {
                "nothing was changed".to_owned()
            } else {
                format!(
                    "the sessions of {done} of the {of} holders to end had been ended already \
                     (those holders lose their locks, and their leases run out); nothing else \
                     was changed"
                )
            };
            Error::InsufficientPrivilege(format!(
                "forcing the release of lock {name:?} ends its holder's session (backend \
                 {pid}), which needs membership in the role pg_signal_backend (or in the \
                 holder's role; only a superuser may end a superuser's session): {msg}; \
                 {changed}"
            ))
        }
        other => {
            log::warn!(
                "lockbox: forcing the release of lock {name:?} failed while ending its \
                 holders' sessions: {other}; {done} of the {of} holders to end had been ended, \
                 and backend {pid} may have been too (those holders lose their locks, and \
                 their leases run out); nothing else was changed"
            );
            other
        }
    })?;
    if !col::<bool>(&row, 0)? {
        log::warn!(
            "lockbox: forcing the release of lock {name:?}: backend {pid} had ended already, \
             or did not end within {FORCE_WAIT_MS} ms; it was told to, and ends once it runs \
             again (until then it still holds the name's key)"
        );
    }
    Ok(())
}

/// The first instant after PostgreSQL's timestamp range (294277-01-01 UTC), in
/// seconds since the epoch: how `'infinity'` is shown.
const AFTER_LAST_TIMESTAMP: f64 = 9_224_318_016_000.0;
/// PostgreSQL's first timestamp (4714-11-24 BC UTC), in seconds since the epoch:
/// how `'-infinity'` is shown.
const FIRST_TIMESTAMP: f64 = -210_866_803_200.0;

/// Epoch seconds as a `SystemTime`; `±infinity` (and anything beyond
/// PostgreSQL's range) is clamped to the edges of that range.
fn epoch(secs: f64) -> SystemTime {
    let secs = if secs.is_nan() {
        0.0
    } else {
        secs.clamp(FIRST_TIMESTAMP, AFTER_LAST_TIMESTAMP)
    };
    let offset = Duration::from_secs_f64(secs.abs());
    let time = if secs >= 0.0 {
        UNIX_EPOCH.checked_add(offset)
    } else {
        UNIX_EPOCH.checked_sub(offset)
    };
    time.unwrap_or(UNIX_EPOCH)
}

/// Milliseconds (non-negative, possibly infinite) as a `Duration`, saturating.
fn millis(ms: f64) -> Duration {
    Duration::try_from_secs_f64(ms.max(0.0) / 1000.0).unwrap_or(Duration::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn infinite_and_out_of_range_times_are_clamped() {
        let last = epoch(f64::INFINITY);
        assert_eq!(last, epoch(AFTER_LAST_TIMESTAMP));
        assert!(last > epoch(4_000_000_000.0));
        let first = epoch(f64::NEG_INFINITY);
        assert_eq!(first, epoch(FIRST_TIMESTAMP));
        assert!(first < UNIX_EPOCH);
        assert_eq!(epoch(f64::NAN), UNIX_EPOCH);
        assert_eq!(epoch(1.5), UNIX_EPOCH + Duration::from_millis(1500));
        assert_eq!(millis(f64::INFINITY), Duration::MAX);
        assert_eq!(millis(-5.0), Duration::ZERO);
        assert_eq!(millis(1500.0), Duration::from_millis(1500));
    }
}
