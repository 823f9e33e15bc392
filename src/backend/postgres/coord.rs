//! Shared leases (readers of a reader-writer lock, permits of a semaphore) and
//! watches on the PostgreSQL store.
//!
//! # Model
//!
//! A name's row in the lease table stays the authority for exclusion against
//! exclusive holders. While a *group* of shared leases is live, that row is
//! held by the group: its owner is [`GROUP_OWNER`] (which no client owner id
//! can equal: those are `host:pid:hex`), its `holder_pid` 0 (no backend's),
//! its `expires_at` at least the latest expiry of any live shared lease, its
//! token the name's last issued token. The exclusive grant's condition
//! (`released_at IS NOT NULL OR expires_at <= clock_timestamp()`) thus keeps
//! working unchanged, and the exclusive hot path is untouched. Each shared
//! lease has a row of its own in `<table>_shared` (primary key name, token):
//! owner, kind, permits, holder session, metadata, expiry, release.
//!
//! A shared holder also holds the name's advisory key in *shared* mode
//! (`pg_advisory_lock_shared`) on a session of its own (never a multiplexed
//! one: advisory locks are reentrant within a session, so a session holding
//! the key shared would be granted it exclusive too). Exclusive and shared
//! holders therefore exclude each other in the server as well, with crash
//! release; and PostgreSQL's lock manager queues a new shared request behind
//! a waiting exclusive one, which gives writers preference.
//!
//! # Grant and release, on a fresh snapshot
//!
//! Every change of a group (grant, release, force-release) first locks the
//! name's row (`FOR NO KEY UPDATE`, in a statement of its own) and only then,
//! in the *next* statement of the same transaction (`READ COMMITTED`: a new
//! snapshot), reads the live shared leases and decides. A statement that
//! waited for the row lock and counted in the same statement would count on a
//! snapshot taken before the wait, missing a grant committed meanwhile. A
//! renewal locks the name's row before it extends its own lease and raises the
//! row's expiry, in one statement, so it never extends a lease whose group was
//! ended meanwhile.
//!
//! # Waiting
//!
//! - Behind an exclusive holder: server-side, on the advisory key in shared
//!   mode, in slices that end just after the name's lease, between which a
//!   zombie holder of the key is terminated (as exclusive waiters do).
//! - Behind a crashed exclusive holder (its row live, its session gone): the
//!   key is freed and the waiter sleeps until that lease ends.
//! - For a permit of a full semaphore: `LISTEN` on the name's channel (on the
//!   session that will hold the permit), then a re-check, then waiting for a
//!   notification (each permit release sends one) or the earliest expiry of a
//!   live permit (a crashed holder's permit returns at its lease end), or the
//!   acquire's deadline. `UNLISTEN *` before the connection can go back to the
//!   pool. Before that, a waiter queues at the name's *gate*
//!   ([`gate_key`], server-side, first come first served) and only the
//!   gate's holder listens and looks: waiters are served in arrival order.
//!   The gate's holder runs a statement at least every half TTL, and its
//!   session has an `idle_session_timeout` and an
//!   `idle_in_transaction_session_timeout` ([`gate_idle_timeout`]) until it
//!   leaves the gate, so a frozen one frees it. `LISTEN` needs a real session, as the
//!   advisory locks do: a transaction-pooling proxy (PgBouncer with
//!   `pool_mode = transaction`) is refused at `build()` already.
//!
//! # Watches
//!
//! [`Backend::watch`](crate::backend::Backend::watch) opens a session of its
//! own (outside the pool) that `LISTEN`s on the name's [`channel`]. Only
//! announced grants ([`AcquireRequest::announce`]: a leader's, on a session
//! of its own, never multiplexed) notify, and their releases, and
//! `force_release`; ordinary grants send nothing.
//!
//! # Not covered
//!
//! A zombie shared holder's termination is not recorded in the lease
//! history (its exclusive counterpart is); the group row an exclusive grant
//! takes over after every shared holder crashed is recorded as an `expired`
//! lease of owner [`GROUP_OWNER`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use postgres::Statement;
use postgres::error::SqlState;
use r2d2::PooledConnection;

use super::connection::{Connector, PgConn, PgManager};
use super::session::{millis, session_gone, token_param};
use super::sql::{EXPIRY_SLACK_MS, MAX_LOCK_TIMEOUT_MS};
use super::{PgBackend, col, db_error, quote_ident};
use crate::backend::{
    AcquireRequest, Grant, Interrupter, LeaseKind, LeaseRef, Release, Renewal, Session, Wait, Watch,
};
use crate::error::{Error, LostReason, Result};

/// The owner of a name's row while a group of shared leases holds it. Client
/// owner ids are `host:pid:hex` (two colons at least): never this.
pub(crate) const GROUP_OWNER: &str = "(lockbox shared leases)";

/// `kind` column values.
const KIND_SHARED: &str = "shared";
const KIND_PERMIT: &str = "permit";

/// The notification channel of a name: derived from the lease table and the
/// name's advisory key (two names sharing a key share a channel, which only
/// wakes a watcher spuriously). At most 34 bytes, lowercase: the same when
/// quoted as an identifier for `LISTEN` and as text for `pg_notify`.
pub(crate) fn channel(quoted_table: &str, key: i64) -> String {
    let table = super::key::name_key(quoted_table) as u64;
    format!("lockbox_{:08x}_{:016x}", table >> 32, key as u64)
}

/// The statements of shared leases, for lease table `t` and its shared-lease
/// table `ts` (both quoted).
#[derive(Debug)]
pub(crate) struct CoordSql {
    /// Creates the group row if missing (as a released lease), in the grant's
    /// transaction, after `lock_row` found none: `$1` name. Only then: the
    /// identity default draws from the store-wide sequence even when the row
    /// exists.
    pub ensure_row: String,
    /// Locks the name's row (`$1` name), its wait bounded by `$2` ms for the
    /// rest of the transaction; `$3`: whether the transaction's commit need
    /// not wait for the WAL flush (a release: if a crash loses it, the lease
    /// looks held until it expires, which delays the next holder and never
    /// lets two in); `$4`: how long (ms, 1 s at least) the transaction may
    /// sit idle between its statements before the server ends the session,
    /// so that a process frozen in the middle of it (SIGSTOP) does not keep
    /// the name's row locked, and every grant, renewal and release of the
    /// name waiting, for as long as it stays frozen. A statement of its own:
    /// the next one reads on a snapshot taken after the lock.
    pub lock_row: String,
    /// Decides and grants; see [`grant`].
    pub grant: String,
    pub renew: String,
    pub release: String,
    pub fence: String,
    pub leases: String,
    /// Force-release of the group's leases: `$1` name.
    pub force: String,
}

/// [`CoordSql`]'s statements (and the shared-mode key functions) prepared on
/// one connection.
pub(crate) struct CoordStatements {
    try_shared: Statement,
    wait_shared: Statement,
    unlock_shared: Statement,
    wait_gate: Statement,
    ensure_row: Statement,
    lock_row: Statement,
    grant: Statement,
    renew: Statement,
    release: Statement,
}

/// `$1`, `$2` key: tries the key in shared mode.
const TRY_SHARED: &str = "SELECT pg_try_advisory_lock_shared($1::int4, $2::int4)";
/// `$1`, `$2` key, `$3` slice ms: waits for the key in shared mode for one
/// slice (55P03 when it runs out). Names no table: a waiter holds no table
/// lock.
const WAIT_SHARED: &str = "WITH cfg AS MATERIALIZED (SELECT set_config('lock_timeout', \
     GREATEST(1, LEAST($3::int8, 86400000))::text || 'ms', true) AS v) \
     SELECT pg_advisory_lock_shared($1::int4, $2::int4)::text IS NOT NULL FROM cfg";
/// `$1`, `$2` key: frees it, held in shared mode.
const UNLOCK_SHARED: &str = "SELECT pg_advisory_unlock_shared($1::int4, $2::int4)";
/// `$1` gate key, `$2` slice ms: waits for a semaphore's gate (see
/// [`gate_key`]) for one slice (55P03 when it runs out).
const WAIT_GATE: &str = "WITH cfg AS MATERIALIZED (SELECT set_config('lock_timeout', \
     GREATEST(1, LEAST($2::int8, 86400000))::text || 'ms', true) AS v) \
     SELECT pg_advisory_lock($1::int8)::text IS NOT NULL FROM cfg";

/// The gate of `name`'s semaphore: an advisory key in the single-`bigint`
/// form. Permit waiters of a full semaphore queue for it in the server's
/// lock queue (first come, first served), and only its holder waits for a
/// permit, so waiters are served in arrival order. Never an internal key
/// (those have [`NAMESPACE`](super::key::NAMESPACE) as their high half,
/// which a gate never has); two names sharing a gate only queue together.
pub(crate) fn gate_key(name: &str) -> i64 {
    let key = super::key::name_key(name);
    if (key >> 32) as i32 == super::key::NAMESPACE {
        key ^ (1 << 32)
    } else {
        key
    }
}

/// How long a gate holder may stay idle (between statements) before the
/// server ends its session, freeing the gate: a waiter frozen while at the
/// head of the queue holds the others up for this long at most. A live one
/// runs a statement at least every [`gate_heartbeat`].
fn gate_idle_timeout(ttl: Duration) -> Duration {
    ttl * 2 + Duration::from_secs(1)
}

/// The longest a gate holder sleeps between statements.
fn gate_heartbeat(ttl: Duration) -> Duration {
    (ttl / 2).max(Duration::from_millis(50))
}

/// The connection's prepared statements of shared leases, prepared now if
/// they are not yet (a clone: a `Statement` is a handle).
fn prepared<'a>(conn: &'a mut PgConn, sql: &CoordSql) -> Result<&'a CoordStatements> {
    if conn.coord.is_none() {
        let c = &mut conn.client;
        let mut p = |text: &str| c.prepare(text).map_err(db_error);
        let stmts = CoordStatements {
            try_shared: p(TRY_SHARED)?,
            wait_shared: p(WAIT_SHARED)?,
            unlock_shared: p(UNLOCK_SHARED)?,
            wait_gate: p(WAIT_GATE)?,
            ensure_row: p(&sql.ensure_row)?,
            lock_row: p(&sql.lock_row)?,
            grant: p(&sql.grant)?,
            renew: p(&sql.renew)?,
            release: p(&sql.release)?,
        };
        conn.coord = Some(Box::new(stmts));
    }
    conn.coord
        .as_deref()
        .ok_or_else(|| Error::Unsupported("no statements prepared".to_owned()))
}

/// `(name, owner, kind, permits, …)` shared-lease table, created when missing.
pub(crate) fn create_table(ts: &str) -> String {
    format!(
        "CREATE TABLE {ts} (\n\
        \x20   name           text        NOT NULL,\n\
        \x20   token          bigint      NOT NULL,\n\
        \x20   owner          text        NOT NULL,\n\
        \x20   kind           text        NOT NULL,\n\
        \x20   permits        integer     NOT NULL,\n\
        \x20   holder_pid     integer     NOT NULL,\n\
        \x20   holder_started timestamptz NOT NULL,\n\
        \x20   metadata       text,\n\
        \x20   acquired_at    timestamptz NOT NULL,\n\
        \x20   renewed_at     timestamptz NOT NULL,\n\
        \x20   expires_at     timestamptz NOT NULL,\n\
        \x20   released_at    timestamptz,\n\
        \x20   PRIMARY KEY (name, token)\n\
        );\n\
        CREATE INDEX ON {ts} (name) WHERE released_at IS NOT NULL"
    )
}

/// The columns lockbox uses, as `name:type` the way `format_type` shows them.
pub(crate) const COLUMNS: &str = "{name:text,token:bigint,owner:text,kind:text,permits:integer,\
     holder_pid:integer,\"holder_started:timestamp with time zone\",metadata:text,\
     \"acquired_at:timestamp with time zone\",\"renewed_at:timestamp with time zone\",\
     \"expires_at:timestamp with time zone\",\"released_at:timestamp with time zone\"}";
pub(crate) const COLUMN_COUNT: i64 = 12;

impl CoordSql {
    pub fn new(t: &str, ts: &str, history: Option<&str>) -> CoordSql {
        let g = GROUP_OWNER;
        let ms = |e: &str| super::sql::ms_until_pub(e);
        let record_grant = history.map_or_else(String::new, |h| {
            format!(
                ", recorded AS (INSERT INTO {h} (name, token, owner, metadata, event, at, holder_pid) \
                 SELECT $1, i.token, $2, $4, 'granted', clock_timestamp(), $5 FROM ins i)"
            )
        });
        let record_release = history.map_or_else(String::new, |h| {
            format!(
                ", recorded AS (INSERT INTO {h} (name, token, owner, metadata, event, at, holder_pid) \
                 SELECT $1, $2::int8, $3, m.metadata, 'released', clock_timestamp(), m.holder_pid FROM mine m)"
            )
        });
        let record_force = history.map_or_else(String::new, |h| {
            format!(
                ", recorded AS (INSERT INTO {h} (name, token, owner, metadata, event, at, holder_pid) \
                 SELECT e.name, e.token, e.owner, e.metadata, 'force_released', clock_timestamp(), \
                     e.holder_pid FROM ended e)"
            )
        });
        CoordSql {
            ensure_row: format!(
                "INSERT INTO {t} (name, owner, holder_pid, holder_started, metadata, acquired_at, \
                     renewed_at, expires_at, released_at) \
                 VALUES ($1::text, '{g}', 0, clock_timestamp(), NULL, clock_timestamp(), \
                     clock_timestamp(), clock_timestamp(), clock_timestamp()) \
                 ON CONFLICT (name) DO NOTHING"
            ),
            lock_row: format!(
                "WITH cfg AS MATERIALIZED (SELECT set_config('lock_timeout', \
                     LEAST(GREATEST($2::int8, 1), {MAX_LOCK_TIMEOUT_MS})::text || 'ms', true) \
                     || set_config('synchronous_commit', CASE WHEN $3::bool THEN 'off' \
                         ELSE 'on' END, true) \
                     || set_config('idle_in_transaction_session_timeout', \
                         LEAST(GREATEST($4::int8, 1000), {MAX_LOCK_TIMEOUT_MS})::text || 'ms', true) \
                     AS v) \
                 SELECT 1 FROM {t} r, cfg WHERE r.name = $1::text AND cfg.v IS NOT NULL \
                 FOR NO KEY UPDATE OF r"
            ),
            // $1 name, $2 owner, $3 ttl ms, $4 metadata, $5 pid, $6 backend
            // start, $7 kind, $8 permits (0 for readers). Run right after
            // `lock_row`, in its transaction: every read here is on a
            // snapshot taken with the row locked. Returns (token granted,
            // exclusive lease left ms, mismatched kind, its permits, earliest
            // expiry of a live lease of this kind (ms)).
            //
            // `held` and `ended` first wait for the fenced transactions of
            // the leases this grant may take the place of (`Lock::fence`: no
            // other holder is granted the name before such a transaction
            // ends, even once its lease ran out): the name's row `FOR
            // UPDATE` (which conflicts with a fence's `FOR KEY SHARE`) unless
            // a live group holds it (a reader joining live readers takes no
            // one's place), and the name's ended shared leases `FOR UPDATE`
            // (released, force-released or expired), but for a reader those
            // of other readers. Their waits are bounded by `lock_row`'s
            // `lock_timeout` (55P03: the row is busy). Every later read is
            // on the statement's snapshot, taken before those waits: nothing
            // it reads can change meanwhile, since every change of the name's
            // row or shared leases locks the row first, and it is locked by
            // this transaction (a fenced transaction only locks).
            grant: format!(
                "WITH held AS MATERIALIZED (SELECT 1 AS one FROM {t} h WHERE h.name = $1::text \
                     AND NOT (h.owner = '{g}' AND h.released_at IS NULL \
                              AND h.expires_at > clock_timestamp()) FOR UPDATE OF h), \
                 ended AS MATERIALIZED (SELECT 1 AS one FROM {ts} e WHERE e.name = $1::text \
                     AND NOT (e.released_at IS NULL AND e.expires_at > clock_timestamp()) \
                     AND NOT (e.kind = '{KIND_SHARED}' AND $7::text = '{KIND_SHARED}') \
                     FOR UPDATE OF e), \
                 now_ AS MATERIALIZED (SELECT clock_timestamp() AS at \
                     WHERE (SELECT count(*) FROM held) >= 0 AND (SELECT count(*) FROM ended) >= 0), \
                 g AS MATERIALIZED (SELECT r.owner, r.released_at, r.expires_at FROM {t} r \
                     WHERE r.name = $1::text), \
                 ex AS MATERIALIZED (SELECT {ex_left} AS left_ms FROM g, now_ \
                     WHERE g.owner <> '{g}' AND g.released_at IS NULL AND g.expires_at > now_.at), \
                 live AS MATERIALIZED (SELECT s.kind, s.permits, s.expires_at FROM {ts} s, now_ \
                     WHERE s.name = $1::text AND s.released_at IS NULL AND s.expires_at > now_.at), \
                 mismatch AS MATERIALIZED (SELECT l.kind, l.permits FROM live l \
                     WHERE l.kind <> $7::text OR l.permits <> $8::int4 LIMIT 1), \
                 ok AS MATERIALIZED (SELECT (SELECT at FROM now_) \
                         + $3::int8::float8 * interval '1 millisecond' AS until \
                     WHERE NOT EXISTS (SELECT 1 FROM ex) AND NOT EXISTS (SELECT 1 FROM mismatch) \
                       AND ($7::text = '{KIND_SHARED}' OR (SELECT count(*) FROM live) < $8::int4::int8)), \
                 grp AS (UPDATE {t} r SET token = r.token + 1, owner = '{g}', holder_pid = 0, \
                         holder_started = (SELECT at FROM now_), metadata = NULL, \
                         acquired_at = CASE WHEN r.owner = '{g}' AND r.released_at IS NULL \
                             AND r.expires_at > (SELECT at FROM now_) THEN r.acquired_at \
                             ELSE (SELECT at FROM now_) END, \
                         renewed_at = (SELECT at FROM now_), \
                         expires_at = CASE WHEN r.owner = '{g}' AND r.released_at IS NULL \
                             THEN GREATEST(r.expires_at, ok.until) ELSE ok.until END, \
                         released_at = NULL \
                     FROM ok WHERE r.name = $1::text RETURNING r.token, ok.until), \
                 ins AS (INSERT INTO {ts} (name, token, owner, kind, permits, holder_pid, \
                         holder_started, metadata, acquired_at, renewed_at, expires_at, released_at) \
                     SELECT $1::text, grp.token, $2::text, $7::text, $8::int4, $5::int4, \
                         $6::timestamptz, $4::text, (SELECT at FROM now_), (SELECT at FROM now_), \
                         grp.until, NULL FROM grp RETURNING token), \
                 old AS MATERIALIZED (SELECT o.token FROM {ts} o, now_ WHERE o.name = $1::text \
                     AND (o.released_at IS NOT NULL OR o.expires_at < now_.at - interval '1 hour') \
                     LIMIT 32 FOR UPDATE OF o SKIP LOCKED), \
                 cleaned AS (DELETE FROM {ts} d USING old WHERE d.name = $1::text \
                     AND d.token = old.token){record_grant} \
                 SELECT (SELECT token FROM ins), (SELECT left_ms FROM ex), \
                     (SELECT kind FROM mismatch), (SELECT permits FROM mismatch), \
                     (SELECT {live_left} FROM live l)",
                ex_left = ms("g.expires_at"),
                live_left = ms("min(l.expires_at)"),
            ),
            // $1 name, $2 owner, $3 token, $4 ttl ms, $5 limit ms. Locks the
            // name's row first (bounded by the limit): a group ended
            // meanwhile (force-released, or released by its last other
            // holder that found this lease expired) is never extended. Then
            // locks this lease's own row (a one-time filter on the group's
            // lock: not scanned before it) and judges it live only then, by
            // the clock of that moment: a scan before the wait for the name's
            // row would judge it by the time the statement began, and a
            // grant that held the row meanwhile may have found it expired
            // and granted its place (review_pg_coord_renew_race.rs). Then
            // extends this lease, only if ours, of this session and live,
            // and raises the group's expiry to cover it.
            renew: format!(
                "WITH cfg AS MATERIALIZED (SELECT set_config('lock_timeout', \
                     LEAST(GREATEST($5::int8, 1), {MAX_LOCK_TIMEOUT_MS})::text || 'ms', true) AS v), \
                 g AS MATERIALIZED (SELECT r.name FROM {t} r, cfg WHERE r.name = $1::text \
                     AND r.owner = '{g}' AND r.released_at IS NULL FOR NO KEY UPDATE OF r), \
                 own AS MATERIALIZED (SELECT s.token, s.expires_at FROM {ts} s \
                     WHERE s.name = $1::text AND s.owner = $2::text AND s.token = $3::int8 \
                       AND s.released_at IS NULL AND s.holder_pid = pg_backend_pid() \
                       AND EXISTS (SELECT 1 FROM g) FOR NO KEY UPDATE OF s), \
                 live AS MATERIALIZED (SELECT o.token FROM own o \
                     WHERE o.expires_at > clock_timestamp()), \
                 mine AS (UPDATE {ts} s SET renewed_at = clock_timestamp(), \
                         expires_at = clock_timestamp() + $4::int8::float8 * interval '1 millisecond' \
                     FROM live WHERE s.name = $1::text AND s.token = live.token \
                     RETURNING s.expires_at), \
                 grp AS (UPDATE {t} r SET renewed_at = clock_timestamp(), \
                         expires_at = GREATEST(r.expires_at, m.expires_at) \
                     FROM mine m WHERE r.name = $1::text RETURNING 1) \
                 SELECT count(*) FROM grp"
            ),
            // $1 name, $2 token, $3 owner, $4 channel to notify (NULL: none).
            // Run right after `lock_row` in its transaction. Marks this lease
            // released; the group's row then covers the other live leases
            // only, or is released with the last of them. Marked, not
            // deleted: a delete would wait for the holder's own fenced
            // transaction (`FOR KEY SHARE` on the row). Released rows of
            // earlier releases (of any name; at most 32, none another
            // transaction holds) are deleted instead: the table keeps live
            // and recently ended leases only. (Expired rows of crashed
            // holders go an hour after their end, at a grant of their name.)
            release: format!(
                "WITH now_ AS MATERIALIZED (SELECT clock_timestamp() AS at), \
                 mine AS (UPDATE {ts} s SET released_at = (SELECT at FROM now_) \
                     WHERE s.name = $1::text AND s.token = $2::int8 AND s.owner = $3::text \
                       AND s.released_at IS NULL \
                     RETURNING s.expires_at > (SELECT at FROM now_) AS live, s.metadata, s.holder_pid), \
                 rest AS MATERIALIZED (SELECT max(o.expires_at) AS until FROM {ts} o, now_ \
                     WHERE o.name = $1::text AND o.token <> $2::int8 AND o.released_at IS NULL \
                       AND o.expires_at > now_.at), \
                 grp AS (UPDATE {t} r SET \
                         released_at = CASE WHEN (SELECT until FROM rest) IS NULL \
                             THEN (SELECT at FROM now_) END, \
                         expires_at = COALESCE((SELECT until FROM rest), r.expires_at) \
                     WHERE r.name = $1::text AND r.owner = '{g}' AND r.released_at IS NULL \
                       AND EXISTS (SELECT 1 FROM mine) RETURNING 1), \
                 told AS MATERIALIZED (SELECT pg_notify($4::text, '') IS NULL AS v \
                     WHERE $4::text IS NOT NULL AND EXISTS (SELECT 1 FROM mine)), \
                 old AS MATERIALIZED (SELECT o.name, o.token FROM {ts} o \
                     WHERE o.released_at IS NOT NULL LIMIT 32 FOR UPDATE OF o SKIP LOCKED), \
                 cleaned AS (DELETE FROM {ts} d USING old \
                     WHERE d.name = old.name AND d.token = old.token){record_release} \
                 SELECT (SELECT live FROM mine), (SELECT count(*) FROM grp), \
                     (SELECT count(*) FROM told)"
            ),
            // The fence of a shared lease: `$1` name, `$2` token, `$3` owner.
            // Locks the name's row `FOR KEY SHARE` (no exclusive grant, which
            // locks it `FOR UPDATE`, can change it until the transaction
            // ends; shared grants, renewals and releases lock `FOR NO KEY
            // UPDATE` and go on) and this lease's row likewise.
            fence: format!(
                "WITH grp AS MATERIALIZED (SELECT 1 AS one FROM {t} r \
                     WHERE r.name OPERATOR(pg_catalog.=) $1::text FOR KEY SHARE OF r), \
                 mine AS MATERIALIZED (SELECT c.released_at, c.expires_at FROM {ts} c \
                     WHERE c.name OPERATOR(pg_catalog.=) $1::text \
                       AND c.token OPERATOR(pg_catalog.=) $2::int8 \
                       AND c.owner OPERATOR(pg_catalog.=) $3::text \
                       AND (SELECT pg_catalog.count(*) FROM grp) OPERATOR(pg_catalog.>=) 0 \
                     FOR KEY SHARE OF c), \
                 state AS MATERIALIZED (SELECT CASE WHEN m.released_at IS NOT NULL THEN 'released' \
                     WHEN m.expires_at OPERATOR(pg_catalog.<=) pg_catalog.clock_timestamp() \
                     THEN 'expired' ELSE 'live' END AS s FROM mine m), \
                 restored AS MATERIALIZED (SELECT pg_catalog.set_config('lock_timeout', \
                     pg_catalog.current_setting('{saved}'), true) AS v \
                     FROM (SELECT pg_catalog.count(*) FROM state) n) \
                 SELECT COALESCE((SELECT s FROM state), 'gone'), \
                        pg_catalog.current_setting('transaction_isolation'), \
                        (SELECT v FROM restored) IS NOT NULL",
                saved = super::sql::FENCE_SAVED,
            ),
            // $1 name or NULL: unreleased shared leases, in the columns of
            // the lease listing, then kind and permits.
            leases: format!(
                "SELECT name, owner, metadata, token, holder_pid, \
                        extract(epoch FROM acquired_at)::float8, extract(epoch FROM renewed_at)::float8, \
                        extract(epoch FROM expires_at)::float8, extract(epoch FROM released_at)::float8, \
                        ((extract(epoch FROM expires_at) - extract(epoch FROM clock_timestamp())) * 1000.0)::float8, \
                        kind, permits \
                 FROM {ts} WHERE ($1::text IS NULL OR name = $1::text) AND released_at IS NULL \
                 ORDER BY name, token"
            ),
            // $1 name. Run after the name's row was locked (by the forced
            // release of the row, in the same transaction).
            force: format!(
                "WITH ended AS (UPDATE {ts} s SET released_at = clock_timestamp() \
                     WHERE s.name = $1::text AND s.released_at IS NULL \
                     RETURNING s.name, s.token, s.owner, s.metadata, s.holder_pid, s.holder_started, \
                         s.expires_at > clock_timestamp() AS live){record_force} \
                 SELECT token, holder_pid, holder_started, live FROM ended ORDER BY token"
            ),
        }
    }
}

/// The earliest lease end a waiter should look again at, from a grant's
/// answer; `None`: nothing to time.
fn wake_after(ms: Option<i64>) -> Option<Duration> {
    ms.map(|ms| Duration::from_millis((ms.max(0) + EXPIRY_SLACK_MS) as u64))
}

/// What one grant transaction decided.
enum Decided {
    Granted(i64),
    /// A live exclusive lease (its holder's session gone: it no longer holds
    /// the key), with what it has left.
    Exclusive(Duration),
    /// Permits all taken; the earliest of them ends after this long.
    Full(Option<Duration>),
    Mismatch(LeaseKind),
    /// The name's row is held by another transaction past the row wait.
    RowBusy,
}

impl PgBackend {
    /// Acquires a shared lease (a reader's, or a permit) on a session of its
    /// own. See the module documentation.
    pub(crate) fn acquire_coord(
        &self,
        req: &AcquireRequest<'_>,
        key: (i32, i32),
    ) -> Result<Option<Grant>> {
        let Some(coord) = &self.coord else {
            return Err(Error::Unsupported(
                "shared leases need the table <lease table>_shared, which is missing (a build \
                 with create_table(true) by a role allowed to create it creates it)"
                    .to_owned(),
            ));
        };
        let mut conn = self.checkout(req, self.pool_timeout, None)?;
        // Until proven clean (no advisory lock, no LISTEN, no transaction),
        // the connection is closed rather than pooled.
        conn.broken = true;
        let mut listening = false;
        let mut gated = false;
        let result = self.coord_on(&mut conn, coord, req, key, &mut listening, &mut gated);
        let c = &mut *conn;
        match result {
            Ok(Some((token, sent_at, waited))) => {
                // Still listening (UNLISTEN failed) or still at the gate: the
                // lease stays held, and the connection is closed when it ends
                // rather than pooled.
                let ungated = !gated || leave_gate(c, Some(gate_key(req.name)));
                let poolable = (!listening || unlisten(c)) && ungated;
                Ok(Some(self.coord_grant(
                    conn,
                    req,
                    key,
                    token,
                    sent_at,
                    waited,
                    poolable,
                    coord.clone(),
                )))
            }
            other => {
                let clean = c.client.query_one(&c.stmts.unlock_all, &[]).is_ok()
                    && (!listening || unlisten(c))
                    && (!gated || leave_gate(c, None))
                    && !c.client.is_closed();
                conn.broken = !clean;
                other.map(|_| None)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn coord_grant(
        &self,
        mut conn: PooledConnection<PgManager>,
        req: &AcquireRequest<'_>,
        key: (i32, i32),
        token: i64,
        sent_at: Instant,
        waited: bool,
        poolable: bool,
        sql: Arc<CoordSql>,
    ) -> Grant {
        let channel = channel(&self.sql.quoted_table, join(key));
        if req.announce() {
            notify(&mut conn, &channel);
        }
        // The session's `Drop` closes the connection unless a release freed
        // the key (and the connection listens on nothing).
        conn.broken = false;
        Grant {
            session: Box::new(PgCoordSession {
                conn,
                clean: false,
                poolable,
                permit: matches!(req.kind(), LeaseKind::Permit { .. }),
                announce: req.announce(),
                channel,
                sql,
            }),
            token: token as u64,
            sent_at,
            waited,
        }
    }

    /// The acquire loop on one connection. Returns the token, the send time of
    /// the granting transaction's first statement, and whether it waited.
    fn coord_on(
        &self,
        conn: &mut PgConn,
        coord: &CoordSql,
        req: &AcquireRequest<'_>,
        key: (i32, i32),
        listening: &mut bool,
        gated: &mut bool,
    ) -> Result<Option<(i64, Instant, bool)>> {
        let (hi, lo) = key;
        let blocking = req.wait() != Wait::No;
        let (kind, permits) = match req.kind() {
            LeaseKind::Permit { permits } => (KIND_PERMIT, permits),
            _ => (KIND_SHARED, 0),
        };
        let permits = i32::try_from(permits).map_err(|_| {
            Error::InvalidConfig(format!("a semaphore of {permits} permits is too large"))
        })?;
        let channel = channel(&self.sql.quoted_table, join(key));
        let mut waited = false;
        let mut waiting = None;
        let mut took_over = false;
        let mut holds = false;
        // The longest sleep between statements: bounded at the gate (the
        // server ends a gate holder's session idle for longer).
        let mut idle = Duration::MAX;
        loop {
            if !holds {
                let stmt = prepared(conn, coord)?.try_shared.clone();
                let got: bool = col(
                    &conn
                        .client
                        .query_one(&stmt, &[&hi, &lo])
                        .map_err(db_error)?,
                    0,
                )?;
                if got {
                    holds = true;
                } else if !blocking {
                    // Held exclusive: by a zombie, perhaps (its lease expired).
                    if !took_over && super::probe(conn, key, req)? {
                        took_over = true;
                        continue;
                    }
                    return Ok(None);
                } else {
                    waited = true;
                    waiting.get_or_insert_with(|| req.waiting());
                    match self.coord_wait_key(conn, coord, key, req)? {
                        true => holds = true,
                        false => return Ok(None),
                    }
                }
            }
            let sent_at = Instant::now();
            match self.decide(conn, coord, req, kind, permits)? {
                Decided::Granted(token) => return Ok(Some((token, sent_at, waited))),
                Decided::Mismatch(live) => return Err(req.kind().mismatch(live, req.name())),
                Decided::RowBusy => {
                    let Some(rem) = req.remaining().filter(|r| blocking && !r.is_zero()) else {
                        return Ok(None);
                    };
                    waited = true;
                    std::thread::sleep(super::ROW_LOCK_RETRY.min(rem));
                }
                Decided::Exclusive(left) => {
                    // Nobody sleeps holding the key.
                    unlock_shared(conn, coord, key)?;
                    holds = false;
                    let Some(rem) = req.remaining().filter(|r| blocking && !r.is_zero()) else {
                        return Ok(None);
                    };
                    waited = true;
                    waiting.get_or_insert_with(|| req.waiting());
                    std::thread::sleep(left.min(rem).min(idle));
                }
                Decided::Full(next) => {
                    unlock_shared(conn, coord, key)?;
                    holds = false;
                    let Some(rem) = req.remaining().filter(|r| blocking && !r.is_zero()) else {
                        return Ok(None);
                    };
                    waited = true;
                    waiting.get_or_insert_with(|| req.waiting());
                    if !*gated {
                        // Queue at the gate; only its holder waits for a
                        // permit (and looks again first: one may be free).
                        // Marked first: from the gate's `SET` on, every way
                        // out (a wait that ran out, a cancel) must take the
                        // session's timeout off before it can be pooled.
                        *gated = true;
                        if !self.take_gate(conn, coord, req)? {
                            return Ok(None);
                        }
                        idle = gate_heartbeat(req.ttl);
                        continue;
                    }
                    if !*listening {
                        // Listen first, then look again: a release after the
                        // look is then heard.
                        conn.client
                            .batch_execute(&format!("LISTEN {}", quote_ident(&channel)))
                            .map_err(db_error)?;
                        *listening = true;
                        continue;
                    }
                    let timeout = next.map_or(rem, |n| n.min(rem));
                    heard(&mut conn.client, timeout.min(idle))?;
                }
            }
        }
    }

    /// Waits at the gate of the name's semaphore (server-side, in arrival
    /// order) and takes it; `false`: the wait ran out. The session is first
    /// given an `idle_session_timeout` and an
    /// `idle_in_transaction_session_timeout`, so that a holder of the gate
    /// frozen at its head, wherever it froze, frees it (its session ended)
    /// within [`gate_idle_timeout`].
    fn take_gate(
        &self,
        conn: &mut PgConn,
        coord: &CoordSql,
        req: &AcquireRequest<'_>,
    ) -> Result<bool> {
        let gate = gate_key(req.name);
        // Idle outside a transaction and inside one (between a transaction's
        // `BEGIN` and its first statement, which sets its own bound, the
        // session is idle in a transaction that `idle_session_timeout` does
        // not cover).
        let idle = millis(gate_idle_timeout(req.ttl));
        conn.client
            .batch_execute(&format!(
                "SET idle_session_timeout = {idle}; \
                 SET idle_in_transaction_session_timeout = {idle}"
            ))
            .map_err(db_error)?;
        let stmt = prepared(conn, coord)?.wait_gate.clone();
        loop {
            let left = match req.remaining() {
                Some(rem) if !rem.is_zero() => millis(rem),
                _ => return Ok(false),
            };
            match conn.client.query_one(&stmt, &[&gate, &left]) {
                Ok(_) => return Ok(true),
                Err(e) if e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) => {}
                Err(e) => return Err(db_error(e)),
            }
        }
    }

    /// Waits for the key in shared mode, in slices like an exclusive waiter,
    /// terminating a zombie holder between them. `false`: the wait ran out.
    fn coord_wait_key(
        &self,
        conn: &mut PgConn,
        coord: &CoordSql,
        key: (i32, i32),
        req: &AcquireRequest<'_>,
    ) -> Result<bool> {
        let (hi, lo) = key;
        loop {
            let left = match req.remaining() {
                Some(rem) if !rem.is_zero() => millis(rem),
                _ => return Ok(false),
            };
            let Some(slice) = super::slice_length(conn, key, req, left)? else {
                return Ok(false);
            };
            let stmt = prepared(conn, coord)?.wait_shared.clone();
            let res = conn.client.query_one(&stmt, &[&hi, &lo, &slice]);
            match res {
                Ok(_) => return Ok(true),
                Err(e) if e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) => {
                    if super::holds_key(conn, key)? {
                        return Ok(true);
                    }
                    if req.remaining().is_some_and(|r| !r.is_zero()) {
                        super::probe(conn, key, req)?;
                    }
                }
                Err(e) => return Err(db_error(e)),
            }
        }
    }

    /// One grant transaction: ensure the row, lock it, decide on a fresh
    /// snapshot. Each statement is bounded as a whole by the watchdog (see
    /// `super::STATEMENT_SLACK`): transactions taking turns on the row
    /// cannot hold it past its own lock waits.
    fn decide(
        &self,
        conn: &mut PgConn,
        coord: &CoordSql,
        req: &AcquireRequest<'_>,
        kind: &str,
        permits: i32,
    ) -> Result<Decided> {
        let row_wait = match req.remaining() {
            Some(rem) if req.wait() != Wait::No => millis(rem.min(super::row_lock_wait(req.ttl))),
            _ => millis(super::row_lock_wait(req.ttl)),
        };
        let ttl_ms = millis(req.ttl);
        let idle_in_tx = millis(gate_idle_timeout(req.ttl));
        let (pid, started) = (conn.pid, conn.backend_start);
        let stmts = prepared(conn, coord)?;
        let (lock_row, ensure_row, grant) = (
            stmts.lock_row.clone(),
            stmts.ensure_row.clone(),
            stmts.grant.clone(),
        );
        let canceller = conn.canceller.clone();
        let bound = Duration::from_millis(row_wait as u64) + super::STATEMENT_SLACK;
        let dog = &self.watchdog;
        let taint = &mut conn.taint;
        // READ COMMITTED whatever the session's default (pinned anyway): the
        // decision must be read on a snapshot taken after the row lock.
        let mut tx = read_committed(&mut conn.client).map_err(db_error)?;
        // A late cancel (on a tainted session) is the watchdog's as well.
        let busy = |e: &postgres::Error, tainted: bool| {
            e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE)
                || (tainted && e.code() == Some(&SqlState::QUERY_CANCELED))
        };
        // Locked, or created (a name never granted, or reclaimed) and then
        // locked; each its own statement, so the decision below reads on a
        // snapshot taken with the row locked. A statement past its bound
        // ends the transaction, whatever it returned (its cancel may have
        // aborted it since), as a busy row (`None`).
        let row = (|| -> Result<Option<postgres::Row>> {
            let mut locked = false;
            for _ in 0..2 {
                let (res, overrun) = dog.bounded(&mut tx, &canceller, bound, |tx| {
                    tx.execute(&lock_row, &[&req.name, &row_wait, &false, &idle_in_tx])
                });
                taint.add(overrun);
                match res {
                    _ if overrun.overran() => return Ok(None),
                    Ok(n) if n > 0 => {
                        locked = true;
                        break;
                    }
                    Ok(_) => {}
                    Err(e) if busy(&e, taint.any()) => return Ok(None),
                    Err(e) => return Err(db_error(e)),
                }
                let (res, overrun) = dog.bounded(&mut tx, &canceller, bound, |tx| {
                    tx.execute(&ensure_row, &[&req.name])
                });
                taint.add(overrun);
                match res {
                    _ if overrun.overran() => return Ok(None),
                    Ok(_) => {}
                    Err(e) if busy(&e, taint.any()) => return Ok(None),
                    Err(e) => return Err(db_error(e)),
                }
            }
            if !locked {
                // Created and deleted again in between (reclaimed): try again.
                return Ok(None);
            }
            let (res, overrun) = dog.bounded(&mut tx, &canceller, bound, |tx| {
                tx.query_one(
                    &grant,
                    &[
                        &req.name,
                        &req.owner,
                        &ttl_ms,
                        &req.metadata,
                        &pid,
                        &started,
                        &kind,
                        &permits,
                    ],
                )
            });
            taint.add(overrun);
            match res {
                _ if overrun.overran() => Ok(None),
                Ok(row) => Ok(Some(row)),
                // A fenced transaction holds what this grant would take over.
                Err(e) if busy(&e, taint.any()) => Ok(None),
                Err(e) => Err(db_error(e)),
            }
        })();
        let row = match row {
            Ok(Some(row)) => row,
            other => {
                // Rolled back here, not by the transaction's drop, which
                // ignores a failure: a `ROLLBACK` a cancel (an operator's, a
                // late one) hit leaves the session in the transaction
                // (helper-72), and the next grant would run in it. Sent
                // again while cancelled; a session that cannot roll back is
                // closed.
                if tx.rollback().is_err() && !super::shared::roll_back(&mut conn.client) {
                    conn.broken = true;
                }
                return other.map(|_| Decided::RowBusy);
            }
        };
        let token: Option<i64> = col(&row, 0)?;
        let ex_left: Option<i64> = col(&row, 1)?;
        let live_kind: Option<String> = col(&row, 2)?;
        let live_permits: Option<i32> = col(&row, 3)?;
        let next: Option<i64> = col(&row, 4)?;
        tx.commit().map_err(db_error)?;
        if let Some(token) = token {
            return Ok(Decided::Granted(token));
        }
        if let Some(live) = live_kind {
            return Ok(Decided::Mismatch(match live.as_str() {
                KIND_PERMIT => LeaseKind::Permit {
                    permits: u32::try_from(live_permits.unwrap_or(0)).unwrap_or(0),
                },
                _ => LeaseKind::Shared,
            }));
        }
        if let Some(left) = ex_left {
            return Ok(Decided::Exclusive(
                wake_after(Some(left)).unwrap_or_default(),
            ));
        }
        Ok(Decided::Full(wake_after(next)))
    }

    /// A watch on `name`: a session of its own (not pooled), listening on the
    /// name's channel.
    pub(crate) fn watch_name(&self, name: &str) -> Result<Box<dyn Watch>> {
        let channel = channel(&self.sql.quoted_table, (self.key_fn)(name));
        let listen = format!("LISTEN {}", quote_ident(&channel));
        let client = self
            .watch_connector
            .open(move |mut client| {
                client
                    .batch_execute(super::sql::SESSION_SETUP)
                    .map_err(super::connection::OpenError::Setup)?;
                client
                    .batch_execute(&listen)
                    .map_err(super::connection::OpenError::Setup)?;
                Ok(client)
            })
            .map_err(|e| e.into_error(&self.target))?;
        Ok(Box::new(PgWatch { client, channel }))
    }
}

/// The 64-bit key of its two halves (as `key::split` made them).
fn join((hi, lo): (i32, i32)) -> i64 {
    (i64::from(hi) << 32) | i64::from(lo as u32)
}

/// The longest one wait for a notification lasts (a wait longer than that
/// loops): a timer far in the future is no use, and must not overflow.
const LONGEST_WAIT: Duration = Duration::from_secs(3600);

/// Waits up to `timeout` for a notification on `client`; then drops every
/// other one already received (one look serves them all). Whether one came.
fn heard(client: &mut postgres::Client, timeout: Duration) -> Result<bool> {
    use postgres::fallible_iterator::FallibleIterator;
    let mut notes = client.notifications();
    let got = notes
        .timeout_iter(timeout.min(LONGEST_WAIT))
        .next()
        .map_err(db_error)?
        .is_some();
    while notes.iter().next().map_err(db_error)?.is_some() {}
    Ok(got)
}

/// A `READ COMMITTED` transaction: each statement reads on a snapshot of
/// its own, taken when it starts.
fn read_committed(
    client: &mut postgres::Client,
) -> std::result::Result<postgres::Transaction<'_>, postgres::Error> {
    client
        .build_transaction()
        .isolation_level(postgres::IsolationLevel::ReadCommitted)
        .start()
}

/// Frees the key held in shared mode.
fn unlock_shared(conn: &mut PgConn, coord: &CoordSql, (hi, lo): (i32, i32)) -> Result<()> {
    let stmt = prepared(conn, coord)?.unlock_shared.clone();
    conn.client
        .query_one(&stmt, &[&hi, &lo])
        .map_err(db_error)?;
    Ok(())
}

/// Leaves the gate: frees it (`gate`: `None` when every advisory lock was
/// freed already) and takes the idle timeouts off the session (0, as the
/// session was pinned at connect). Whether it worked.
fn leave_gate(conn: &mut PgConn, gate: Option<i64>) -> bool {
    let unlock = gate.map_or_else(String::new, |g| {
        format!("SELECT pg_advisory_unlock({g}::int8); ")
    });
    conn.client
        .batch_execute(&format!(
            "{unlock}SET idle_session_timeout = 0; SET idle_in_transaction_session_timeout = 0"
        ))
        .is_ok()
}

/// Stops listening and drops notifications already received. Whether it
/// worked.
fn unlisten(conn: &mut PgConn) -> bool {
    conn.client.batch_execute("UNLISTEN *").is_ok()
        && heard(&mut conn.client, Duration::ZERO).is_ok()
}

/// Best effort: a failed notification is logged (watchers re-read the lease
/// at its expiry anyway).
pub(crate) fn notify(conn: &mut PgConn, channel: &str) {
    // A notifying commit queues on one lock for the whole cluster, held by
    // any other notifying transaction through its commit (a synchronous
    // standby's wait included): the session's 200 ms would drop the
    // announcement, and a watcher that saw no leader would never hear of one.
    if let Err(e) = conn.client.execute(
        "SELECT pg_catalog.set_config('lock_timeout', '0', true), pg_notify($1::text, '')",
        &[&channel],
    ) {
        log::warn!("lockbox: could not notify {channel}: {}", db_error(e));
    }
}

/// A held shared lease: its own pooled connection, holding the key shared.
pub(crate) struct PgCoordSession {
    conn: PooledConnection<PgManager>,
    /// Set once a release freed every advisory lock of the session.
    clean: bool,
    /// Cleared when the session may still listen on a channel.
    poolable: bool,
    permit: bool,
    announce: bool,
    channel: String,
    sql: Arc<CoordSql>,
}

impl std::fmt::Debug for PgCoordSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgCoordSession")
            .field("conn", &*self.conn)
            .field("permit", &self.permit)
            .finish_non_exhaustive()
    }
}

impl Drop for PgCoordSession {
    fn drop(&mut self) {
        if !self.clean || !self.poolable {
            self.conn.broken = true;
        }
    }
}

impl Session for PgCoordSession {
    fn renew(&mut self, lease: &LeaseRef<'_>, ttl: Duration) -> Result<Renewal> {
        let conn = &mut *self.conn;
        let renew = prepared(conn, &self.sql)?.renew.clone();
        let res = conn.client.query_one(
            &renew,
            &[
                &lease.name,
                &lease.owner,
                &token_param(lease.token),
                &millis(ttl),
                &millis(lease.limit),
            ],
        );
        match res {
            Ok(row) => match col::<i64>(&row, 0)? {
                1 => Ok(Renewal::Renewed),
                _ => Ok(Renewal::Lost(LostReason::NotOwner)),
            },
            Err(e) if session_gone(&e, conn) => {
                conn.broken = true;
                Ok(Renewal::Lost(LostReason::SessionLost))
            }
            Err(e) => Err(db_error(e)),
        }
    }

    fn interrupter(&self) -> Option<Interrupter> {
        let token = self.conn.client.cancel_token();
        let target = self.conn.target.clone();
        Some(Box::new(move || {
            if let Err(e) = target.cancel(&token) {
                log::warn!("lockbox: could not send a cancel request: {e}");
            }
        }))
    }

    /// One transaction (the name's row locked, then the decision on a fresh
    /// snapshot), then the key is freed. On any `Err` the connection is
    /// closed, which frees the key; the lease then runs out by itself.
    fn release(mut self: Box<Self>, lease: &LeaseRef<'_>) -> Result<Release> {
        let channel = (self.permit || self.announce).then(|| self.channel.clone());
        let conn = &mut *self.conn;
        let stmts = prepared(conn, &self.sql)?;
        let (lock_row, release) = (stmts.lock_row.clone(), stmts.release.clone());
        let deadline = Instant::now() + lease.limit;
        let attempt = |conn: &mut PgConn| -> std::result::Result<Option<bool>, postgres::Error> {
            let left = deadline.saturating_duration_since(Instant::now());
            let limit = millis(left).clamp(1, MAX_LOCK_TIMEOUT_MS);
            let idle_in_tx = millis(gate_idle_timeout(left));
            let mut tx = read_committed(&mut conn.client)?;
            // Set before the first statement takes its tables' locks (an
            // operator's table lock would otherwise end it at the session's
            // 200 ms, and the name stay taken until the lease's end).
            tx.batch_execute(&format!("SET LOCAL lock_timeout = '{limit}ms'"))?;
            tx.execute(&lock_row, &[&lease.name, &limit, &true, &idle_in_tx])?;
            let row = tx.query_one(
                &release,
                &[
                    &lease.name,
                    &token_param(lease.token),
                    &lease.owner,
                    &channel,
                ],
            )?;
            let live: Option<bool> = row.try_get(0)?;
            tx.commit()?;
            Ok(live)
        };
        let mut outcome = attempt(conn);
        // A late cancel (see `PgConn::late_cancel`) undid the transaction:
        // sent once more, within the lease's time.
        if matches!(&outcome, Err(e) if conn.late_cancel(e)) && Instant::now() < deadline {
            outcome = attempt(conn);
        }
        match outcome {
            Ok(live) => {
                let freed = conn.client.query_one(&conn.stmts.unlock_all, &[]).is_ok();
                self.clean = freed;
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

/// A watch: a session of its own listening on the name's channel.
pub(crate) struct PgWatch {
    client: postgres::Client,
    channel: String,
}

impl std::fmt::Debug for PgWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgWatch")
            .field("channel", &self.channel)
            .finish_non_exhaustive()
    }
}

impl Watch for PgWatch {
    fn wait(&mut self, until: Instant) -> Result<bool> {
        loop {
            if self.client.is_closed() {
                return Err(Error::Unsupported(
                    "the watch's connection is closed".to_owned(),
                ));
            }
            // A zero timeout still looks at what has arrived.
            let timeout = until.saturating_duration_since(Instant::now());
            if heard(&mut self.client, timeout)? {
                return Ok(true);
            }
            if Instant::now() >= until {
                return Ok(false);
            }
        }
    }
}

/// Creates `Connector`s for watches (kept by the backend).
pub(crate) fn watch_connector(
    target: std::sync::Arc<super::tls::PgTarget>,
    timeout: Duration,
) -> Connector {
    Connector::new(target, timeout, 4)
}

#[cfg(test)]
mod tests {
    //! Against the test server (`DATABASE_URL`, else the local one): what
    //! only the pool's own connections can show.
    use super::*;
    use crate::backend::Backend;
    use crate::telemetry::Telemetry;

    fn url() -> String {
        std::env::var("DATABASE_URL")
            .unwrap_or_else(|_| "postgresql://postgres@127.0.0.1:5432/postgres".to_owned())
    }

    fn request<'a>(
        name: &'a str,
        wait: Wait,
        kind: LeaseKind,
        telemetry: &'a Telemetry,
    ) -> AcquireRequest<'a> {
        AcquireRequest {
            name,
            owner: "host:1:test",
            ttl: Duration::from_secs(30),
            metadata: None,
            wait,
            dedicated: false,
            kind,
            announce: false,
            telemetry,
        }
    }

    fn listening_channels(backend: &PgBackend) -> i64 {
        let mut conn = backend.pool.get().unwrap();
        conn.client
            .query_one("SELECT count(*) FROM pg_listening_channels()", &[])
            .unwrap()
            .get(0)
    }

    /// A permit waiter that gave up, and one that was granted after
    /// listening, leave their pooled session listening on nothing.
    #[test]
    fn waiters_return_their_connection_unlistened() {
        let b = crate::LockClient::builder(&url()).pool_size(1);
        let backend = PgBackend::connect(&b).unwrap();
        let holder = PgBackend::connect(&b).unwrap();
        let telemetry = Telemetry::new(None, String::new()).unwrap();
        let name = format!("coord-unit-{}", std::process::id());
        let kind = LeaseKind::Permit { permits: 1 };
        let held = holder
            .acquire(&request(&name, Wait::No, kind, &telemetry))
            .unwrap()
            .expect("free");
        let until = Wait::Until(Instant::now() + Duration::from_millis(300));
        assert!(
            backend
                .acquire(&request(&name, until, kind, &telemetry))
                .unwrap()
                .is_none()
        );
        assert_eq!(
            backend.pool.state().connections,
            1,
            "the session was closed"
        );
        assert_eq!(listening_channels(&backend), 0);
        // Now granted after a wait: released by another thread meanwhile.
        let lease = |token| LeaseRef {
            name: &name,
            owner: "host:1:test",
            token,
            limit: Duration::from_secs(5),
        };
        let token = held.token;
        let releaser = std::thread::spawn({
            let session = held.session;
            let name = name.clone();
            move || {
                std::thread::sleep(Duration::from_millis(300));
                let lease = LeaseRef {
                    name: &name,
                    owner: "host:1:test",
                    token,
                    limit: Duration::from_secs(5),
                };
                session.release(&lease).unwrap()
            }
        });
        let until = Wait::Until(Instant::now() + Duration::from_secs(10));
        let grant = backend
            .acquire(&request(&name, until, kind, &telemetry))
            .unwrap()
            .expect("granted after the release");
        assert_eq!(releaser.join().unwrap(), Release::Released);
        assert!(grant.waited);
        assert_eq!(
            grant.session.release(&lease(grant.token)).unwrap(),
            Release::Released
        );
        assert_eq!(backend.pool.state().connections, 1);
        assert_eq!(listening_channels(&backend), 0);
        let mut conn = backend.pool.get().unwrap();
        let locks: i64 = conn
            .client
            .query_one(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' \
                 AND pid = pg_backend_pid()",
                &[],
            )
            .unwrap()
            .get(0);
        assert_eq!(locks, 0);
    }

    /// A watch wakes on an announced grant and its release and on a forced
    /// release, never on an ordinary grant, and returns at `until`.
    #[test]
    fn watches_wake_on_announcements_only() {
        let b = crate::LockClient::builder(&url());
        let backend = PgBackend::connect(&b).unwrap();
        let telemetry = Telemetry::new(None, String::new()).unwrap();
        let name = format!("coord-watch-{}", std::process::id());
        let mut watch = backend.watch(&name).unwrap();
        let soon = || Instant::now() + Duration::from_millis(300);
        let lease = |token| LeaseRef {
            name: &name,
            owner: "host:1:test",
            token,
            limit: Duration::from_secs(5),
        };
        // An ordinary grant and release: no announcement.
        let plain = backend
            .acquire(&request(&name, Wait::No, LeaseKind::Exclusive, &telemetry))
            .unwrap()
            .unwrap();
        let started = Instant::now();
        assert!(!watch.wait(soon()).unwrap());
        assert!(started.elapsed() >= Duration::from_millis(250));
        plain.session.release(&lease(plain.token)).unwrap();
        assert!(!watch.wait(soon()).unwrap());
        // An announced one.
        let mut req = request(&name, Wait::No, LeaseKind::Exclusive, &telemetry);
        req.announce = true;
        let leader = backend.acquire(&req).unwrap().unwrap();
        assert!(
            watch.wait(soon()).unwrap(),
            "no wake on the announced grant"
        );
        assert!(!watch.wait(soon()).unwrap(), "one grant, one wake");
        leader.session.release(&lease(leader.token)).unwrap();
        assert!(
            watch.wait(soon()).unwrap(),
            "no wake on the announced release"
        );
        // A forced release.
        let held = backend
            .acquire(&request(&name, Wait::No, LeaseKind::Shared, &telemetry))
            .unwrap()
            .unwrap();
        assert!(!watch.wait(soon()).unwrap());
        assert_eq!(backend.force_release(&name).unwrap(), Some(held.token));
        assert!(watch.wait(soon()).unwrap(), "no wake on force_release");
    }
}
