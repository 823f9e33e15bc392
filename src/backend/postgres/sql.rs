//! Every SQL statement the PostgreSQL backend sends, built once per client for its
//! lease table.
//!
//! Each statement that runs on the hot path is one round trip (prepared once per
//! pooled connection). Every session first pins the settings in [`SESSION_SETUP`].
//! Settings that a statement needs (`lock_timeout`,
//! `synchronous_commit`) are set with `set_config(.., true)` inside the statement
//! itself: local to its implicit transaction, so they are gone when it ends and the
//! session is left exactly as it was.

use super::key::NAMESPACE;

/// Added to a wait slice so that it ends just after the lease it waits out.
pub(crate) const EXPIRY_SLACK_MS: i64 = 5;

/// Session settings pinned on every session lockbox opens (pooled connections,
/// the connection `build()` checks the server with, and health probes), so that
/// no role-, database-, system- or connection-level default (`ALTER ROLE … SET`,
/// `ALTER DATABASE … SET`, `postgresql.conf` plus a reload, `options=-c …` in the
/// URL) can change what lockbox's statements mean or how durable they are.
/// Session-level values win over all of those, including a later configuration
/// reload, for the life of the session.
///
/// Pinned, and why:
/// - `search_path` first, with every name in that statement schema-qualified:
///   the role's own existing schemas in their order, minus any explicit
///   `pg_catalog` (left out, it is searched *first*, so no function, operator or
///   type of another schema can shadow a built-in lockbox calls:
///   `clock_timestamp`, `=`, …), then `pg_temp` explicitly *last* (so a temporary
///   table cannot shadow the lease table). An unqualified lease table still
///   resolves, and is created, where it was. With no schema of its own, the path
///   is `pg_catalog, pg_temp`: creating an unqualified table then fails loudly
///   instead of making a temporary one.
/// - `default_transaction_isolation = 'read committed'`: under `repeatable read`
///   or `serializable` a statement that waits for the advisory lock and then
///   writes the lease fails with 40001 (the row changed after its snapshot).
/// - `default_transaction_read_only = off`, `default_transaction_deferrable =
///   off`: writes must be possible (a standby still refuses them, as it should).
/// - `synchronous_commit = on`, whatever it was: a grant must be durable (and,
///   with synchronous standbys, on a standby) when it is reported, or a token
///   could repeat after a crash or failover. `on` unconditionally, not just "not
///   `off`": `local` loses grants on failover, and a session-level value also
///   survives an `ALTER SYSTEM SET synchronous_commit = off` plus reload. The
///   release statement lowers it for its own transaction only, on purpose.
/// - `statement_timeout`, `lock_timeout`, `idle_in_transaction_session_timeout`,
///   `idle_session_timeout` = 0, and `transaction_timeout` = 0 where it exists
///   (PostgreSQL 17+): lockbox bounds its own waits; these would cancel
///   server-side waits or end the sessions of idle holders (and their locks).
/// - `exit_on_error = off`: a wait slice ends with a `lock_timeout` error on
///   purpose, which must not end the session.
/// - `DateStyle = 'ISO, MDY'`, `IntervalStyle = 'postgres'`, `TimeZone = 'UTC'`:
///   timestamps and intervals that cross as text (the holder's `backend_start`)
///   must round-trip exactly; a non-ISO style prints zone abbreviations that may
///   not parse back.
/// - `row_security = off`: a row-level security policy on the lease table would
///   silently hide rows (a live lease, the token counter); with `off` any query
///   such a policy would affect fails loudly instead (table owners and
///   `BYPASSRLS` roles are unaffected, as before).
/// - `transform_null_equals = off`, `standard_conforming_strings = on`,
///   `client_encoding = 'UTF8'`: how SQL text and values are read.
///
/// Left alone, and why: `role` / `session_authorization` (an operator's way to
/// run lockbox as an owning role; privilege errors say what is missing),
/// `session_replication_role` (superuser-only; only affects triggers, which
/// lockbox does not rely on), `lc_messages` (superuser-only; errors are matched by
/// SQLSTATE, never by text), `bytea_output` and `extra_float_digits` (no bytea;
/// results are read in binary), planner and resource settings (speed, not
/// meaning), `default_tablespace` and `default_table_access_method` (where the
/// table lives, not what it means).
pub(crate) const SESSION_SETUP: &str = "\
    SELECT pg_catalog.set_config('search_path', COALESCE( \
        (SELECT pg_catalog.string_agg(pg_catalog.quote_ident(s), ', ' ORDER BY n) \
         FROM pg_catalog.unnest(pg_catalog.current_schemas(false)) WITH ORDINALITY AS u(s, n) \
         WHERE s OPERATOR(pg_catalog.<>) 'pg_catalog' AND NOT pg_catalog.starts_with(s, 'pg_temp')) \
        OPERATOR(pg_catalog.||) ', pg_temp', \
        'pg_catalog, pg_temp'), false); \
    SET default_transaction_isolation = 'read committed'; \
    SET default_transaction_read_only = off; \
    SET default_transaction_deferrable = off; \
    SET synchronous_commit = on; \
    SET statement_timeout = 0; \
    SET lock_timeout = 0; \
    SET idle_in_transaction_session_timeout = 0; \
    SET idle_session_timeout = 0; \
    SELECT pg_catalog.set_config(name, '0', false) FROM pg_catalog.pg_settings \
        WHERE name = 'transaction_timeout'; \
    SET exit_on_error = off; \
    SET DateStyle = 'ISO, MDY'; \
    SET IntervalStyle = 'postgres'; \
    SET TimeZone = 'UTC'; \
    SET row_security = off; \
    SET transform_null_equals = off; \
    SET standard_conforming_strings = on; \
    SET client_encoding = 'UTF8';";

/// The connection's backend pid and start time: together they identify the session
/// (a pid alone can be reused), and are stored in each lease it takes.
pub(crate) const SESSION_INFO: &str = "\
    SELECT pid, backend_start::text, current_setting('server_version_num')::int4 \
    FROM pg_stat_activity WHERE pid = pg_backend_pid()";

/// Frees every advisory lock of the session: used when an acquire gives up after
/// taking the advisory lock, so the connection can go back to the pool clean.
pub(crate) const UNLOCK_ALL: &str = "SELECT pg_advisory_unlock_all()::text IS NOT NULL";

/// The statements that depend on the lease table's name.
#[derive(Debug)]
pub(crate) struct Sql {
    pub table: String,
    pub create_table: String,
    pub table_exists: &'static str,
    pub try_acquire: String,
    pub wait_acquire: String,
    pub upsert: String,
    pub renew: String,
    pub release: String,
    pub holds_key: String,
    pub probe: String,
    pub leases: String,
}

impl Sql {
    /// `table` has been validated as `name` or `schema.name` of plain identifiers.
    pub fn new(table: &str) -> Sql {
        let t = table
            .split('.')
            .map(|part| format!("\"{part}\""))
            .collect::<Vec<_>>()
            .join(".");
        Sql {
            table: table.to_owned(),
            create_table: create_table(&t),
            table_exists: "SELECT to_regclass($1) IS NOT NULL",
            // $1 key, $2 name, $3 owner, $4 ttl ms, $5 metadata, $6 pid, $7 backend start
            try_acquire: acquire(
                &t,
                &format!(
                    "l AS MATERIALIZED (SELECT pg_try_advisory_lock({NAMESPACE}, $1) AS got, false AS waited, 0::int8 AS waited_ms)"
                ),
            ),
            // ... $8 the wait left (ms), $9 the slice when no lease is live (ms). The
            // server times the slice itself: it ends just after the current lease
            // would expire (at once if it already has), so a zombie holder is looked
            // for then, without a round trip to ask how long the lease has left.
            wait_acquire: acquire(
                &t,
                &format!(
                    "lease AS MATERIALIZED (SELECT (extract(epoch FROM c.expires_at - clock_timestamp()) * 1000)::int8 AS left_ms \
                         FROM {t} c WHERE c.name = $2 AND c.released_at IS NULL), \
                     cfg AS MATERIALIZED (SELECT set_config('lock_timeout', \
                         GREATEST(1, LEAST($8::int8, COALESCE((SELECT left_ms FROM lease) + {slack}, $9::int8), 86400000))::text || 'ms', \
                         true) AS v), \
                     first AS MATERIALIZED (SELECT clock_timestamp() AS t0, \
                         NOT pg_try_advisory_lock({NAMESPACE}, $1) AS waited FROM cfg), \
                     locked AS MATERIALIZED (SELECT CASE WHEN waited \
                         THEN pg_advisory_lock({NAMESPACE}, $1)::text IS NOT NULL ELSE true END AS got, \
                         waited, t0 FROM first), \
                     l AS MATERIALIZED (SELECT got, waited, \
                         floor(extract(epoch FROM clock_timestamp() - t0) * 1000)::int8 AS waited_ms FROM locked)",
                    slack = EXPIRY_SLACK_MS
                ),
            ),
            // The advisory lock is already held (after a lock-delay or a lock_timeout race).
            upsert: acquire(
                &t,
                "l AS MATERIALIZED (SELECT $1::int4 IS NOT NULL AS got, false AS waited, 0::int8 AS waited_ms)",
            ),
            // $1 name, $2 owner, $3 token, $4 ttl ms. Never re-creates a lease: only a
            // live, unreleased lease with our owner, token and session is extended.
            renew: format!(
                "UPDATE {t} SET renewed_at = clock_timestamp(), \
                     expires_at = clock_timestamp() + $4::int8 * interval '1 millisecond' \
                 WHERE name = $1 AND owner = $2 AND token = $3 AND released_at IS NULL \
                   AND expires_at > clock_timestamp() AND holder_pid = pg_backend_pid()"
            ),
            // $1 name, $2 owner, $3 token. The lease is marked released before the
            // advisory lock is freed, so a waiter woken by the unlock finds it released.
            // Its commit need not be durable: if a crash loses it, the lease just looks
            // held until it expires, which delays the next holder and never lets two in.
            release: format!(
                "WITH cfg AS MATERIALIZED (SELECT set_config('synchronous_commit', 'off', true) AS v), \
                 released AS (UPDATE {t} SET released_at = clock_timestamp() \
                     WHERE name = $1 AND owner = $2 AND token = $3 AND released_at IS NULL \
                     RETURNING expires_at > clock_timestamp() AS live), \
                 unlocked AS MATERIALIZED (SELECT pg_advisory_unlock_all()::text IS NOT NULL AS done \
                     FROM cfg, (SELECT count(*) FROM released) r) \
                 SELECT (SELECT live FROM released), (SELECT done FROM unlocked)"
            ),
            // $1 key: does this session hold the advisory lock (granted as a
            // lock_timeout fired)?
            holds_key: format!(
                "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' \
                 AND pid = pg_backend_pid() AND classid = {NAMESPACE}::oid \
                 AND objid = $1::int4::oid AND objsubid = 2 AND granted)"
            ),
            // $1 key, $2 name, $3 terminate wait ms. Terminates a zombie holder: a session that still holds the
            // advisory lock although its lease has expired. The pid must still belong to
            // the session recorded in the lease (same backend start) and must hold this
            // very key, so no other session is ever terminated.
            probe: format!(
                "SELECT t.holder_pid, z.hidden, z.terminated \
                 FROM {t} t LEFT JOIN LATERAL ( \
                     SELECT a.backend_start IS NULL AS hidden, \
                            CASE WHEN a.backend_start = t.holder_started \
                                 THEN pg_terminate_backend(a.pid, $3) END AS terminated \
                     FROM pg_stat_activity a \
                     WHERE a.pid = t.holder_pid AND a.pid <> pg_backend_pid() \
                       AND t.expires_at <= clock_timestamp() \
                       AND EXISTS (SELECT 1 FROM pg_locks k WHERE k.locktype = 'advisory' \
                           AND k.pid = a.pid AND k.classid = {NAMESPACE}::oid \
                           AND k.objid = $1::int4::oid AND k.objsubid = 2 AND k.granted) \
                 ) z ON true \
                 WHERE t.name = $2 AND t.released_at IS NULL"
            ),
            // $1 name, or NULL for all. Timestamps as epoch seconds, and the time
            // left in ms, all float8: an operator's '±infinity' is ±Infinity there
            // (subtracting infinite timestamps would be an error, and an int8
            // cannot hold it).
            leases: format!(
                "SELECT name, owner, metadata, token, holder_pid, \
                        extract(epoch FROM acquired_at)::float8, extract(epoch FROM renewed_at)::float8, \
                        extract(epoch FROM expires_at)::float8, extract(epoch FROM released_at)::float8, \
                        ((extract(epoch FROM expires_at) - extract(epoch FROM clock_timestamp())) * 1000)::float8 \
                 FROM {t} WHERE $1::text IS NULL OR name = $1 ORDER BY name"
            ),
        }
    }
}

/// The lease table. Rows are kept after release (marked `released_at`) because the
/// row carries the name's fencing-token counter.
fn create_table(t: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {t} (\n\
        \x20   name           text        PRIMARY KEY,\n\
        \x20   owner          text        NOT NULL,\n\
        \x20   token          bigint      NOT NULL CHECK (token > 0),\n\
        \x20   holder_pid     integer     NOT NULL,\n\
        \x20   holder_started timestamptz NOT NULL,\n\
        \x20   metadata       text,\n\
        \x20   acquired_at    timestamptz NOT NULL,\n\
        \x20   renewed_at     timestamptz NOT NULL,\n\
        \x20   expires_at     timestamptz NOT NULL,\n\
        \x20   released_at    timestamptz\n\
        )"
    )
}

/// An acquire statement: `lock` defines CTE `l(got, waited, waited_ms)` (whether
/// this session now holds the advisory lock, whether it had to wait for it, and
/// for how long — measured by the server from the statement's start to just
/// before the lease is written, rounded down); if it does, the lease is written
/// when the name is free (released or expired by the database clock), taking the
/// next fencing token.
///
/// Returns `(got, token, expires_in_ms, waited, waited_ms)`: `token` is set when
/// granted; `expires_in_ms` is what the current unreleased lease has left
/// (negative when expired), as of the statement's start.
fn acquire(t: &str, lock: &str) -> String {
    format!(
        "WITH {lock}, \
         granted AS ( \
             INSERT INTO {t} AS t (name, owner, token, holder_pid, holder_started, metadata, \
                                   acquired_at, renewed_at, expires_at, released_at) \
             SELECT $2, $3, 1, $6, $7::text::timestamptz, $5, clock_timestamp(), clock_timestamp(), \
                    clock_timestamp() + $4::int8 * interval '1 millisecond', NULL \
             FROM l WHERE l.got \
             ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, token = t.token + 1, \
                 holder_pid = excluded.holder_pid, holder_started = excluded.holder_started, \
                 metadata = excluded.metadata, acquired_at = excluded.acquired_at, \
                 renewed_at = excluded.renewed_at, expires_at = excluded.expires_at, released_at = NULL \
             WHERE t.released_at IS NOT NULL OR t.expires_at <= clock_timestamp() \
             RETURNING t.token) \
         SELECT l.got, (SELECT token FROM granted), \
                (SELECT (extract(epoch FROM c.expires_at - clock_timestamp()) * 1000)::int8 \
                 FROM {t} c WHERE c.name = $2 AND c.released_at IS NULL), \
                l.waited, l.waited_ms \
         FROM l"
    )
}
