//! Every SQL statement the PostgreSQL backend sends, built once per client for its
//! lease table.
//!
//! Each statement that runs on the hot path is one round trip (prepared once per
//! pooled connection). Every session first pins the settings in [`SESSION_SETUP`].
//! Settings that a statement needs (`lock_timeout`,
//! `synchronous_commit`) are set with `set_config(.., true)` inside the statement
//! itself, before anything it may wait for: local to its implicit transaction, so
//! they are gone when it ends and the session is left exactly as it was.
//!
//! Advisory keys are passed as two `int4` parameters (see [`super::key`]); in
//! `pg_locks` they are matched as `classid`/`objid` with `objsubid = 2`, in the
//! current database only (advisory locks are per database).

/// Added to a wait slice so that it ends just after the lease it waits out.
pub(crate) const EXPIRY_SLACK_MS: i64 = 5;

/// A released lease, or an expired one whose holder's session is gone, is kept
/// this long (so that it can be inspected) and then reclaimed.
pub(crate) const RECLAIM_AFTER: &str = "1 hour";

/// One release in this many grants (of a client) also reclaims old rows. Off the
/// grant's path, and rarely, because reclaiming costs every statement that
/// carries it (the plan is larger even when there is nothing to delete).
pub(crate) const RECLAIM_EVERY: u64 = 16;

/// How many reclaimable rows a reclaiming release deletes at most: twice the
/// grants it follows, so reclaiming outpaces the creation of rows (a grant
/// creates at most one) once a window holds that many.
pub(crate) const RECLAIM_BATCH: u64 = 2 * RECLAIM_EVERY;

/// How many of the lease table's pages a reclaiming release looks through:
/// the next window of a sweep over the table (per client), instead of an
/// index on the lease's end. Such an index names `released_at` and
/// `expires_at`, which every grant, renewal and release changes, so no update
/// of a lease row could be HOT: each wrote a new entry into every index of
/// the table and left a dead row version that only a vacuum could remove.
pub(crate) const RECLAIM_PAGES: i64 = 8;

/// The session's `lock_timeout` (see [`SESSION_SETUP`], which spells it out):
/// the longest any statement of lockbox's waits for a table's lock. Longer
/// than autovacuum's truncation holds one (it gives it up within 20 ms of a
/// waiter), so that no statement fails for it. (Named for the docs and the
/// test that checks the two agree.)
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) const TABLE_LOCK_WAIT_MS: i64 = 200;

/// The longest `lock_timeout` a statement sets (PostgreSQL's limit is `INT_MAX` ms).
pub(crate) const MAX_LOCK_TIMEOUT_MS: i64 = 86_400_000;

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
/// - `default_transaction_deferrable = off`: a deferrable default would make
///   lockbox's transactions wait for a safe snapshot where one is asked for.
/// - `synchronous_commit = on`, whatever it was: a grant must be durable (and,
///   with synchronous standbys, on a standby) when it is reported, or a token
///   could repeat after a crash or failover. `on` unconditionally, not just "not
///   `off`": `local` loses grants on failover, and a session-level value also
///   survives an `ALTER SYSTEM SET synchronous_commit = off` plus reload. The
///   release statement lowers it for its own transaction only, on purpose.
/// - `statement_timeout`, `idle_in_transaction_session_timeout`,
///   `idle_session_timeout` = 0, and `transaction_timeout` = 0 where it exists
///   (PostgreSQL 17+): lockbox bounds its own waits; these would cancel
///   server-side waits or end the sessions of idle holders (and their locks).
/// - `lock_timeout` = [`TABLE_LOCK_WAIT_MS`]: every wait a statement means to
///   make (for a row, an advisory key) sets its own bound inside the
///   statement, but a statement takes its tables' locks as it starts, before
///   anything in it runs: behind an operator's `LOCK TABLE`, `ALTER TABLE` or
///   `VACUUM FULL` it would otherwise wait for as long as that lasts, past
///   any timeout of its caller (and, on a shared session, with every
///   neighbour's renewal queued behind it). Past this it fails with 55P03 and
///   its caller goes on as its own bound allows: an acquire tries again until
///   its timeout (a `try_lock` reports not acquired), a renewal until its
///   deadline, a release until the lease's end.
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
/// - `jit = off`: lockbox's statements are tiny, but a planner setting that
///   inflates costs (`enable_seqscan = off` adds `disable_cost`) or a low
///   `jit_above_cost` would have each one JIT-compiled at every execution,
///   about a second each: a short lease would be over before its grant returns.
/// - `check_function_bodies = on`: the wait-and-grant function `build()`
///   creates is checked as it is created, never stored half-read.
/// - `transform_null_equals = off`, `standard_conforming_strings = on`,
///   `client_encoding = 'UTF8'`: how SQL text and values are read.
///
/// `pg_catalog` first only wins among candidates of *identical* argument types:
/// PostgreSQL picks an exact-type match from any schema on the path over a
/// `pg_catalog` one that needs an implicit cast. So every operator in these
/// statements is written with operands of exactly the built-in's types
/// (`float8 * interval`, `numeric * numeric`, never `int8 * interval` or
/// `numeric * int4`, which `pg_catalog` does not have), or a `*(bigint,
/// interval)` in the role's schemas would decide how long every lease lasts.
///
/// Left alone, and why: `default_transaction_read_only`, on purpose: it is
/// how an operator or a failover tool fences writes off, and a fence must
/// reach every session, the pooled ones included. A session opened read-only
/// (role, database, server or `options` setting) is refused when it is
/// opened; one that becomes read-only later (`ALTER SYSTEM` or
/// `postgresql.conf` plus a reload, which applies to running sessions whose
/// value was not set for them) fails every write with SQLSTATE 25006, which
/// an acquire reports as [`crate::Error::Unsupported`] naming read-only, and
/// a held lock's renewals fail until it is reported lost. `role` /
/// `session_authorization` (an operator's way to
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
    SET default_transaction_deferrable = off; \
    SET synchronous_commit = on; \
    SET statement_timeout = 0; \
    SET lock_timeout = '200ms'; \
    SET idle_in_transaction_session_timeout = 0; \
    SET idle_session_timeout = 0; \
    SELECT pg_catalog.set_config(name, '0', false) FROM pg_catalog.pg_settings \
        WHERE name = 'transaction_timeout'; \
    SET exit_on_error = off; \
    SET DateStyle = 'ISO, MDY'; \
    SET IntervalStyle = 'postgres'; \
    SET TimeZone = 'UTC'; \
    SET row_security = off; \
    SET jit = off; \
    SET check_function_bodies = on; \
    SET transform_null_equals = off; \
    SET standard_conforming_strings = on; \
    SET client_encoding = 'UTF8';";

/// The connection's backend pid and start time: together they identify the session
/// (a pid alone can be reused), and are stored in each lease it takes. The start
/// time is read (and later bound) as a binary `timestamptz`: as text it would
/// depend on the session's `DateStyle` and `TimeZone` (`IST` reads back as Israel
/// time, not India's), and the stored start would then never match the real one.
///
/// Also read, in the same round trip: whether the server is a standby, and the
/// session's `default_transaction_read_only` as the role, database, server or
/// connection options set it (`reset_val`; lockbox never sets it), so that a
/// session opened on a standby or a write-fenced server (after a failover)
/// is refused.
pub(crate) const SESSION_INFO: &str = "\
    SELECT pid, backend_start, current_setting('server_version_num')::int4, \
        pg_is_in_recovery(), \
        (SELECT reset_val FROM pg_settings WHERE name = 'default_transaction_read_only') \
    FROM pg_stat_activity WHERE pid = pg_backend_pid()";

/// Frees every advisory lock of the session: used when an acquire gives up after
/// taking the advisory lock, so the connection can go back to the pool clean.
pub(crate) const UNLOCK_ALL: &str = "SELECT pg_advisory_unlock_all()::text IS NOT NULL";

/// What [`Sql::new`] needs to know about the lease table, resolved at build.
#[derive(Debug, Clone)]
pub(crate) struct TableInfo {
    /// `schema.name`, as shown to users.
    pub display: String,
    /// `"schema"."name"`, as written in statements.
    pub quoted: String,
    /// The table's OID.
    pub oid: u32,
    /// The OID of the sequence behind the `token` identity column.
    pub token_seq: u32,
    /// Whether acquires reclaim old rows (the role may delete rows and read the
    /// sequence).
    pub reclaim: bool,
    /// The wait-and-grant function, when it exists as lockbox defines it and the
    /// role may call it (`None`: waits grant with a statement of their own).
    pub wait_grant: Option<WaitGrant>,
    /// The lease history, when this client keeps one.
    pub history: Option<HistoryInfo>,
    /// The shared-lease table (quoted), when it exists and may be used.
    pub shared: Option<String>,
    /// The tables that make an unlogged lease table safe, when it is one.
    pub unlogged: Option<Unlogged>,
}

/// An `UNLOGGED` lease table's two companions (see
/// [`LockClientBuilder::unlogged_leases`](crate::LockClientBuilder::unlogged_leases)).
///
/// Invariants, each kept by the statement that could break it:
/// - every token ever granted is at most `epoch.token_ceiling`, and every
///   lease end ever granted (or renewed to) at most `epoch.lease_horizon`:
///   a grant or renewal that would pass either raises it in its own
///   transaction, whose commit is then durable (it wrote WAL), before it is
///   reported; one that does not write nothing durable and commits without
///   waiting for a flush. A raise goes a step beyond what it covers
///   ([`CEILING_STEP`], one TTL or [`HORIZON_STEP_MIN_MS`]), so few do.
/// - `alive` has its row exactly while the lease table holds every lease
///   granted since the last recovery: both are unlogged, so a crash empties
///   both (and a promoted standby has neither), and nothing else deletes it.
///   No grant happens without the row.
/// - Recovery (the first client to find the row missing) sets the token
///   sequence to the ceiling and writes the row with `grants_from` = the
///   horizon, in one transaction: no grant sees the row before the sequence
///   is above every earlier token, and none is made before every earlier
///   lease has ended.
#[derive(Debug, Clone)]
pub(crate) struct Unlogged {
    /// `<table>_epoch` (quoted): logged, one row.
    pub epoch: String,
    /// `<table>_alive` (quoted): unlogged, one row or none.
    pub alive: String,
}

/// The text of the error a checked try fails with when the token it wrote
/// is above the ceiling its client last saw (see [`grant`]): the cast of this
/// text, and the token, to `int4` (SQLSTATE 22P02).
pub(crate) const CEILING_PASSED: &str = "lockbox: the token passes the ceiling";

/// The text of the error a grant fails with when the lease it wrote had
/// already ended: its end is read before the grant waits for the lease row,
/// and `lock_timeout` bounds each such wait, not their sum (see [`grant`]).
/// The cast of this text, and the token, to `int4` (SQLSTATE 22P02) undoes
/// the write; the key stays held.
pub(crate) const GRANT_ENDED: &str = "lockbox: the lease ended while its grant waited";

/// Whether `e` is the 22P02 lockbox raises with `marker` in its message
/// ([`CEILING_PASSED`], [`GRANT_ENDED`]).
pub(crate) fn raised(e: &postgres::Error, marker: &str) -> bool {
    e.as_db_error().is_some_and(|db| {
        *db.code() == postgres::error::SqlState::INVALID_TEXT_REPRESENTATION
            && db.message().contains(marker)
    })
}

/// How far above a token that passed the ceiling the ceiling is raised: one
/// durable write per this many tokens; after a crash, tokens jump by at most
/// this much.
pub(crate) const CEILING_STEP: i64 = 1_000_000;

/// The least a raise of the horizon goes beyond the lease end it covers (it
/// goes one TTL beyond when that is longer): at most one durable write per
/// this long while leases are only renewed, and the most a lock-delay after a
/// crash lasts beyond the longest TTL in use.
pub(crate) const HORIZON_STEP_MIN_MS: i64 = 1000;

/// The logged table of an unlogged lease table's bounds, and its one row,
/// whose bounds start above every token and lease end already in lease table
/// `t` (a table converted from a logged one keeps its rows) and its sequence.
pub(crate) fn create_epoch(e: &str, t: &str, token_seq: u32) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {e} (\n\
        \x20   id            integer     PRIMARY KEY CHECK (id = 1),\n\
        \x20   epoch         bigint      NOT NULL,\n\
        \x20   token_ceiling bigint      NOT NULL,\n\
        \x20   lease_horizon timestamptz NOT NULL,\n\
        \x20   max_ttl_ms    bigint      NOT NULL DEFAULT 0,\n\
        \x20   recovered_at  timestamptz\n\
        );\n\
        INSERT INTO {e} (id, epoch, token_ceiling, lease_horizon) \
            SELECT 1, 0, GREATEST((SELECT max(token) FROM {t}), \
                       pg_sequence_last_value({token_seq}::oid::regclass), 0), \
                   GREATEST((SELECT max(expires_at) FROM {t} WHERE released_at IS NULL), \
                       clock_timestamp()) \
            ON CONFLICT (id) DO NOTHING"
    )
}

/// Raises the bounds of epoch table `e` (ceiling, horizon, longest TTL) to
/// the tokens and live leases lease table `t` and its sequence hold now (a
/// durable write only when they are below). Returns how many rows it raised.
pub(crate) fn cover_rows(e: &str, t: &str, token_seq: u32) -> String {
    format!(
        "WITH cur AS MATERIALIZED (SELECT GREATEST((SELECT max(token) FROM {t}), \
                 pg_sequence_last_value({token_seq}::oid::regclass)) AS tok, \
                 (SELECT max(expires_at) FROM {t} WHERE released_at IS NULL) AS ends, \
                 (SELECT LEAST(GREATEST(max((extract(epoch FROM expires_at) \
                      - extract(epoch FROM renewed_at)) * 1000.0), 0), 1e15)::int8 \
                  FROM {t} WHERE released_at IS NULL) AS ttl), \
         raised AS (UPDATE {e} x SET token_ceiling = GREATEST(x.token_ceiling, c.tok), \
                 lease_horizon = GREATEST(x.lease_horizon, c.ends), \
                 max_ttl_ms = GREATEST(x.max_ttl_ms, c.ttl) \
             FROM cur c WHERE x.id = 1 AND (x.token_ceiling < c.tok OR x.lease_horizon < c.ends \
                 OR x.max_ttl_ms < c.ttl) RETURNING 1) \
         SELECT count(*) FROM raised"
    )
}

/// The unlogged table whose row says the lease table is whole.
pub(crate) fn create_alive(a: &str) -> String {
    format!(
        "CREATE UNLOGGED TABLE IF NOT EXISTS {a} (\n\
        \x20   id          integer     PRIMARY KEY CHECK (id = 1),\n\
        \x20   epoch       bigint      NOT NULL,\n\
        \x20   grants_from timestamptz NOT NULL\n\
        )"
    )
}

/// Run when a grant found `alive` empty: starts a new epoch unless another
/// session did since (its row then conflicts: nothing is done). Grants
/// resume at the horizon, but never later than the longest TTL ever granted
/// plus the larger of it and [`HORIZON_STEP_MIN_MS`] from now: no lease can
/// end later than that on a clock that only moves forward, and a horizon
/// pushed far ahead by a grant made while the server's clock ran ahead would
/// otherwise pause every name until then (`pg_unlogged.rs`: `a_horizon_pushed_far_ahead_delays_grants_by_the_longest_ttl_only`).
/// Locks the epoch row first, so two recoveries run one after the other, each reading
/// the ceiling and horizon as the other left them. The sequence is set to the
/// ceiling (every earlier token is at most that) before the row becomes
/// visible, with the commit. Run in a transaction whose `lock_timeout` is set
/// first (an operator's transaction may hold the epoch row, or a table, and
/// a table's lock is taken before anything in the statement could set one).
/// Returns whether the epoch row exists, the new epoch (`NULL`: another
/// session recovered) and the ms until grants resume.
pub(crate) fn recover(u: &Unlogged, token_seq: u32) -> String {
    format!(
        "WITH e AS MATERIALIZED (SELECT r.epoch, r.token_ceiling, r.lease_horizon, r.max_ttl_ms \
             FROM {ep} r WHERE r.id = 1 FOR UPDATE OF r), \
         ins AS (INSERT INTO {al} (id, epoch, grants_from) \
             SELECT 1, e.epoch + 1, GREATEST(clock_timestamp(), LEAST(e.lease_horizon, \
                 clock_timestamp() + (e.max_ttl_ms + GREATEST(e.max_ttl_ms, {HORIZON_STEP_MIN_MS}::int8))::float8 \
                     * interval '1 millisecond')) FROM e \
             ON CONFLICT (id) DO NOTHING RETURNING epoch, grants_from), \
         bumped AS (UPDATE {ep} x SET epoch = i.epoch, recovered_at = clock_timestamp() \
             FROM ins i WHERE x.id = 1), \
         seq AS MATERIALIZED (SELECT setval({token_seq}::oid::regclass, \
             GREATEST(e.token_ceiling, 1)) AS v FROM e, ins) \
         SELECT EXISTS (SELECT 1 FROM e), (SELECT epoch FROM ins), \
             {left}, (SELECT count(*) FROM seq)",
        ep = u.epoch,
        al = u.alive,
        left = ms_until("(SELECT grants_from FROM ins)"),
    )
}

/// The PL/pgSQL function that waits for the advisory key for one slice and then
/// grants, in one round trip, with neither a lock on the lease table nor a
/// snapshot taken before the wait (see [`wait_grant_body`]).
#[derive(Debug, Clone)]
pub(crate) struct WaitGrant {
    /// Its signature, `"schema"."name"(integer, …)`, for `to_regprocedure`.
    pub signature: String,
    /// Its schema and name, unquoted: each call checks that they still name it.
    pub schema: String,
    pub name: String,
    /// Its body, as lockbox defines it for this table: compared with the
    /// catalog's before the function is used.
    pub body: String,
    /// The lease table's OID: the function must belong to the table's owner
    /// (or to the role using it).
    pub table_oid: u32,
}

/// The argument types of the wait-and-grant function, in order: key ($1, $2),
/// name, owner, TTL ms, metadata, holder pid, holder start, the longest wait for
/// the lease row's lock (ms), the slice (ms), the wait left (ms).
pub(crate) const WAIT_GRANT_ARGS: &str = "integer, integer, text, text, bigint, text, integer, \
     timestamp with time zone, bigint, bigint, bigint";

/// What the wait-and-grant function returns, as `pg_get_function_result` shows it.
pub(crate) const WAIT_GRANT_RESULT: &str =
    "TABLE(lockbox_got boolean, lockbox_token bigint, lockbox_waited_us bigint)";

/// Added to the table's name to name its wait-and-grant function; the version
/// changes whenever the body does, so processes of two versions never share one.
/// v2: the grant locks the row `FOR UPDATE` (`SET name = excluded.name`, for
/// [`Lock::fence`](crate::Lock::fence)); a v1 process restoring its body in
/// place (same OID and owner) would otherwise have sessions of this release
/// call the old grant, which passes a fence (`review_fence_wait_grant_version.rs`).
/// v3: a lease that replaces another starts once the grant has its row.
pub(crate) const WAIT_GRANT_SUFFIX: &str = "_wait_grant_v3";

/// The same, for clients that record a lease history (whose grants also write
/// it). v3: `prev` locks the lease row before the grant. v4: an unreleased
/// lease is replaced only as `prev` found it. v5: as v3 above.
pub(crate) const WAIT_GRANT_HISTORY_SUFFIX: &str = "_wait_grant_hist_v5";

/// The same, for clients of an unlogged lease table (whose grants are gated
/// and raise the bounds, see [`Unlogged`]). v2: the grant raises the
/// longest TTL granted (`max_ttl_ms`) too; a v1 body restored in place would
/// leave it behind, and a lock-delay after a crash could end too soon. v3:
/// as v3 above. v4: a grant whose lease ended while its raise waited for the
/// epoch row is undone.
pub(crate) const WAIT_GRANT_UNLOGGED_SUFFIX: &str = "_wait_grant_ul_v4";

/// The same, for clients of an unlogged lease table that record a history
/// (v2, v3, v4: as above).
pub(crate) const WAIT_GRANT_HISTORY_UNLOGGED_SUFFIX: &str = "_wait_grant_hist_ul_v4";

/// The OID and owner of the function at `$1` (a signature) if it is lockbox's,
/// as `$2` (the body) defines it, and this role may trust and call it (no row
/// otherwise): PL/pgSQL, security invoker, volatile, no settings of its own,
/// the expected result; the only function of its name in its schema (an
/// overload would make the call ambiguous); and owned by the owner of the
/// lease table `$4` or by this role — only they, and superusers, can then
/// replace it, and they may as well rewrite leases. Read at build and on every
/// new session; each call then checks that its name still resolves to that
/// OID, with that owner, still the table's owner or this role (a function
/// dropped and re-created by another role, or given to one, is never called).
pub(crate) const WAIT_GRANT_CHECK: &str = "\
    SELECT p.oid, p.proowner FROM pg_catalog.pg_proc p \
            JOIN pg_catalog.pg_language l ON l.oid OPERATOR(pg_catalog.=) p.prolang \
        WHERE p.oid OPERATOR(pg_catalog.=) pg_catalog.to_regprocedure($1::text) \
          AND p.prosrc OPERATOR(pg_catalog.=) $2::text \
          AND l.lanname OPERATOR(pg_catalog.=) 'plpgsql'::name AND NOT p.prosecdef \
          AND p.proconfig IS NULL AND p.provolatile OPERATOR(pg_catalog.=) 'v'::\"char\" \
          AND p.proretset \
          AND pg_catalog.pg_get_function_result(p.oid) OPERATOR(pg_catalog.=) $3::text \
          AND pg_catalog.has_function_privilege(p.oid, 'EXECUTE') \
          AND (p.proowner OPERATOR(pg_catalog.=) (SELECT c.relowner FROM pg_catalog.pg_class c \
                   WHERE c.oid OPERATOR(pg_catalog.=) $4::oid) \
               OR p.proowner OPERATOR(pg_catalog.=) (SELECT r.oid FROM pg_catalog.pg_roles r \
                   WHERE r.rolname OPERATOR(pg_catalog.=) current_user)) \
          AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_proc o \
              WHERE o.proname OPERATOR(pg_catalog.=) p.proname \
                AND o.pronamespace OPERATOR(pg_catalog.=) p.pronamespace \
                AND o.oid OPERATOR(pg_catalog.<>) p.oid)";

/// Creates (or restores) the wait-and-grant function `signature` with `body`.
pub(crate) fn create_wait_grant(w: &WaitGrant) -> String {
    let tag = dollar_tag(&[&w.body, &w.signature]);
    format!(
        "CREATE OR REPLACE FUNCTION {sig} RETURNS {WAIT_GRANT_RESULT} \
         LANGUAGE plpgsql VOLATILE SECURITY INVOKER AS {tag}{body}{tag}",
        sig = w.signature,
        body = w.body,
    )
}

/// The wait-and-grant function's body for lease table `t`. It waits for the
/// advisory key for one slice (`lock_timeout`; 55P03 when it runs out), then runs
/// the grant — a statement of its own inside the function, so it locks the lease
/// table only from then on (a waiter holds no table lock: DDL never queues
/// behind it) and judges the lease with a snapshot taken after the wait. It
/// returns the wait as the server measured it (µs): the lease runs from no
/// earlier than the call's send time plus that. The grant's wait for the lease
/// row's lock is bounded by `$9` and by what is left of the acquire's wait.
/// Written for any `plpgsql.*` setting: no `INTO`, no nested block, and no
/// name of its own that a column could also be.
pub(crate) fn wait_grant_body(
    t: &str,
    history: Option<&HistoryInfo>,
    unlogged: Option<&Unlogged>,
) -> String {
    let waited = "LEAST(GREATEST((extract(epoch FROM pg_catalog.clock_timestamp()) \
                  - extract(epoch FROM lockbox_asked)) * 1000000.0, 0.0), 1e15)::int8";
    format!(
        "\nDECLARE\n\
         \x20   lockbox_asked timestamptz := pg_catalog.clock_timestamp();\n\
         \x20   lockbox_waited bigint;\n\
         BEGIN\n\
         \x20   PERFORM pg_catalog.set_config('lock_timeout', \
                 GREATEST(1, LEAST($10, {MAX_LOCK_TIMEOUT_MS}))::text || 'ms', true);\n\
         \x20   PERFORM pg_catalog.pg_advisory_lock($1, $2);\n\
         \x20   lockbox_waited := {waited};\n\
         \x20   PERFORM pg_catalog.set_config('lock_timeout', \
                 GREATEST(1::int8, LEAST($9, $11 - lockbox_waited / 1000::int8))::text || 'ms', true);\n\
         \x20   RETURN QUERY {grant};\n\
         END\n",
        // Without the gate's column: a grant the gate holds back returns no
        // token, and the caller's `upsert` then says why.
        grant = grant(
            t,
            "l AS MATERIALIZED (SELECT true AS got)",
            "lockbox_waited",
            history,
            unlogged,
            true,
            false,
            false,
        ),
    )
}

/// The statements that depend on the lease table.
#[derive(Debug)]
pub(crate) struct Sql {
    /// The resolved, schema-qualified table name (`schema.name`), as shown.
    pub table: String,
    /// The same, quoted for statements (`"schema"."name"`).
    pub quoted_table: String,
    /// With an unlogged lease table, checked against the bounds the client
    /// last saw (`$10`–`$12`, see [`grant`]); `upsert` raises them.
    pub try_acquire: String,
    /// Whether `try_acquire` takes the bounds (an unlogged lease table).
    pub checks_bounds: bool,
    pub wait_key: String,
    pub slice: String,
    pub upsert: String,
    pub delay: String,
    pub renew: String,
    pub renew_shared: String,
    pub unlock_keys: String,
    pub release: String,
    /// The release that also reclaims old rows (`None`: this client does not
    /// reclaim).
    pub release_reclaim: Option<String>,
    /// The call of the wait-and-grant function (`None`: there is none to use),
    /// and the function itself, checked on every new session.
    pub wait_grant: Option<(String, WaitGrant)>,
    pub holds_key: String,
    pub probe: String,
    pub leases: String,
    /// The fence of a caller's transaction ([`fence_check`]), run on the
    /// caller's connection: `$1` name, `$2` token, `$3` owner. It also restores the
    /// caller's `lock_timeout`, saved by [`FENCE_PREPARE`].
    pub fence: String,
    /// `$1` name, `$2` limit: the name's history events, newest first (`None`:
    /// this client keeps no history).
    pub history: Option<String>,
    /// The history table (quoted), when this client records one.
    pub history_table: Option<String>,
    /// The recovery of an unlogged lease table emptied by a crash ([`recover`];
    /// `None`: the table is logged).
    pub recover: Option<String>,
    /// `$1`: nothing. The epoch, whether the lease table is whole, and the ms
    /// until grants resume (`None`: the table is logged).
    pub epoch_state: Option<String>,
}

/// Bounds the grant's wait for the lease row's lock (another transaction holding
/// it: an operator's, or a renewal committing) by `$9` ms, so an acquire never
/// blocks there without end: set in the CTE the `INSERT` reads first, local to
/// the statement's transaction.
const ROW_WAIT_CFG: &str =
    "(SELECT set_config('lock_timeout', GREATEST(1, $9::int8)::text || 'ms', true)) AS row_wait";

/// Matches `pg_locks k` rows of the advisory key `($1, $2)` held by another session.
const KEY_HELD_BY_OTHER: &str = "k.locktype = 'advisory' AND k.granted AND k.objsubid = 2 \
     AND k.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
     AND k.classid = $1::int4::oid AND k.objid = $2::int4::oid AND k.pid <> pg_backend_pid()";

impl Sql {
    pub fn new(info: &TableInfo) -> Sql {
        let t = &info.quoted;
        // The leases sessions hold, of every kind: a shared holder's session
        // has its lease in the shared-lease table only. Read by the zombie
        // probe and the wait slices (never on a grant's path).
        let sl = match &info.shared {
            Some(ts) => format!(
                "(SELECT holder_pid, holder_started, released_at, expires_at FROM {t} \
                 UNION ALL SELECT holder_pid, holder_started, released_at, expires_at FROM {ts})"
            ),
            None => t.clone(),
        };
        let sl = &sl;
        let record = info.history.as_ref().map_or_else(String::new, |h| {
            format!(
                ", recorded AS (INSERT INTO {q} (name, token, owner, metadata, event, at, holder_pid) \
                     SELECT r.name, r.token, r.owner, r.metadata, 'released', clock_timestamp(), \
                         r.holder_pid FROM released r)",
                q = h.quoted
            )
        });
        // $8: the first page of the reclaim's window; the third column, the
        // next window's (back to the first page past the table's end).
        let release = |extra: &str, next: &str| {
            format!(
                "WITH cfg AS MATERIALIZED (SELECT set_config('synchronous_commit', 'off', true) \
                     || set_config('lock_timeout', LEAST(GREATEST($4::int8, 1), {MAX_LOCK_TIMEOUT_MS})::text || 'ms', true) AS v), \
                 released AS (UPDATE {t} SET released_at = clock_timestamp() \
                     WHERE name = $1 AND owner = $2 AND token = $3 AND released_at IS NULL \
                       AND (SELECT v FROM cfg) IS NOT NULL \
                     RETURNING expires_at > clock_timestamp() AS live, name, token, owner, \
                         metadata, holder_pid){record}, \
                 unlocked AS MATERIALIZED (SELECT CASE WHEN $7::bool \
                         THEN pg_advisory_unlock_all()::text IS NOT NULL \
                         ELSE pg_advisory_unlock($5::int4, $6::int4) END AS done \
                     FROM cfg, (SELECT count(*) FROM released) r) \
                 {extra} \
                 SELECT (SELECT live FROM released), (SELECT done FROM unlocked), {next}"
            )
        };
        Sql {
            table: info.display.clone(),
            quoted_table: info.quoted.clone(),
            // $1, $2 key; $3 name, $4 owner, $5 ttl ms, $6 metadata, $7 pid,
            // $8 backend start, $9 the longest wait for the lease row's lock (ms).
            // Never waits for the advisory lock: an acquire counts as waiting only
            // once it has found the lock held. When the key is not got, says what
            // the name's unreleased lease has left (ms; NULL: none), which times
            // the first wait slice and tells whether to look for a zombie (not
            // while the lease is live: its holder then holds the key). With a
            // history, an expired lease is not taken over here but said (see
            // [`try_grant_recorded`]): what it has left comes also when the key
            // was got but nothing granted (a number ≤ 0: take it over next).
            checks_bounds: info.unlogged.is_some(),
            try_acquire: {
                let lock = format!(
                    "l AS MATERIALIZED (SELECT pg_try_advisory_lock($1::int4, $2::int4) AS got FROM {ROW_WAIT_CFG})"
                );
                let left = format!(
                    "(SELECT {left} FROM {t} n WHERE n.name = $3 AND n.released_at IS NULL)",
                    left = ms_until("n.expires_at"),
                );
                match info.history.as_ref() {
                    None => acquire(
                        t,
                        &lock,
                        &format!("CASE WHEN l.got THEN NULL::int8 ELSE {left} END"),
                        None,
                        info.unlogged.as_ref(),
                        true,
                    ),
                    Some(h) => try_grant_recorded(
                        t,
                        &lock,
                        &format!(
                            "CASE WHEN (SELECT token FROM granted) IS NOT NULL THEN NULL::int8 ELSE {left} END"
                        ),
                        h,
                        info.unlogged.as_ref(),
                    ),
                }
            },
            // The advisory lock is already held (after a wait, a row-lock
            // timeout, or a lock-delay that found the lease gone). A statement of
            // its own, so that it judges the lease with a snapshot taken after
            // any wait.
            upsert: acquire(
                t,
                &format!(
                    "l AS MATERIALIZED (SELECT $1::int4 IS NOT NULL AND $2::int4 IS NOT NULL AS got \
                     FROM {ROW_WAIT_CFG})"
                ),
                "NULL::int8",
                info.history.as_ref(),
                info.unlogged.as_ref(),
                false,
            ),
            // $1, $2 key; $3 the slice (ms). Waits for the advisory key for one
            // slice. It names no table: a wait holds no lock on the lease table,
            // so DDL on the table (lockbox's own `build()` included) never queues
            // behind a waiter, with every renewal queued behind the DDL. The
            // grant is then `upsert`. Used by sessions without the
            // wait-and-grant function, which does both in one round trip.
            wait_key: format!(
                "WITH cfg AS MATERIALIZED (SELECT set_config('lock_timeout', \
                     GREATEST(1, LEAST($3::int8, {MAX_LOCK_TIMEOUT_MS}))::text || 'ms', true) AS v) \
                 SELECT pg_advisory_lock($1::int4, $2::int4)::text IS NOT NULL FROM cfg"
            ),
            // $1, $2 key; $3 name; $4 the wait left (ms); $5 the default slice,
            // one TTL (ms). Times a wait slice, for `wait_key`. While the name's
            // lease is live, the slice ends just after it would expire; when the
            // name's lease has expired unreleased, it ends with the lease of the
            // session holding the key, whichever name that session holds it for
            // (at once if that has expired too: a zombie is then looked for); when
            // the name is free (released, or never taken: its key is held by a
            // grant in flight, or by another name sharing the key), it lasts one
            // TTL; never longer than one TTL, nor than the wait left.
            // `pg_locks` and `pg_stat_activity` are costly views, so they are read
            // only in the expired case. (The first slice is timed by the client,
            // from what the try said the name's lease had left.)
            slice: format!(
                "WITH holder AS MATERIALIZED ( \
                     SELECT {left} AS left_ms \
                     FROM pg_locks k JOIN pg_stat_activity a ON a.pid = k.pid \
                     JOIN {sl} t ON t.holder_pid = a.pid AND t.holder_started = a.backend_start \
                          AND t.released_at IS NULL \
                     WHERE {KEY_HELD_BY_OTHER}), \
                 name_lease AS MATERIALIZED (SELECT CASE WHEN n.released_at IS NOT NULL THEN 'free' \
                         WHEN n.expires_at > clock_timestamp() THEN 'live' ELSE 'expired' END AS state, \
                         {name_left} AS left_ms \
                     FROM {t} n WHERE n.name = $3) \
                 SELECT GREATEST(1, LEAST($4::int8, \
                     (CASE (SELECT state FROM name_lease) \
                          WHEN 'live' THEN (SELECT left_ms FROM name_lease) \
                          WHEN 'expired' THEN (SELECT left_ms FROM holder) END) + {slack}, \
                     $5::int8, {MAX_LOCK_TIMEOUT_MS}))::int8",
                slack = EXPIRY_SLACK_MS,
                left = ms_until("max(t.expires_at)"),
                name_left = ms_until("n.expires_at"),
            ),
            // $1, $2 key; $3 name. Run while holding the advisory lock when the grant
            // found a live lease (its holder's session is gone: it no longer holds the
            // key). Reads what that lease has left with a fresh snapshot and, if it is
            // live, frees the advisory lock: the acquirer then sleeps until the lease
            // ends without blocking anyone, and contends again.
            delay: format!(
                "WITH lease AS MATERIALIZED (SELECT {left} AS left_ms \
                     FROM {t} WHERE name = $3 AND released_at IS NULL) \
                 SELECT (SELECT left_ms FROM lease), \
                        CASE WHEN COALESCE((SELECT left_ms FROM lease), 0) > 0 \
                             THEN pg_advisory_unlock($1::int4, $2::int4) ELSE false END",
                left = ms_until("expires_at"),
            ),
            // $1 name, $2 owner, $3 token, $4 ttl ms, $5 limit ms. Never re-creates a
            // lease: only a live, unreleased lease with our owner, token and session
            // is extended. The wait for the row lock is bounded by the limit (55P03
            // past it), and whether the lease is still live is judged only once the
            // row is locked: a renewal held up past the lease's end finds it expired
            // and does not revive it.
            renew: format!(
                "WITH cfg AS MATERIALIZED (SELECT set_config('lock_timeout', \
                     LEAST(GREATEST($5::int8, 1), {MAX_LOCK_TIMEOUT_MS})::text || 'ms', true) AS v), \
                 mine AS MATERIALIZED (SELECT c.name, c.expires_at FROM {t} c, cfg \
                     WHERE c.name = $1 AND c.owner = $2 AND c.token = $3 AND c.released_at IS NULL \
                       AND c.holder_pid = pg_backend_pid() FOR NO KEY UPDATE OF c), \
                 live AS MATERIALIZED (SELECT name FROM mine WHERE expires_at > clock_timestamp()), \
                 renewed AS (UPDATE {t} t SET renewed_at = clock_timestamp(), \
                     expires_at = clock_timestamp() + $4::int8::float8 * interval '1 millisecond' \
                 FROM live WHERE t.name = live.name RETURNING t.expires_at, $4::int8 AS ttl){raise} \
                 SELECT 1 FROM renewed",
                raise = raise_horizon(info.unlogged.as_ref()),
            ),
            // $1 names, $2 owners, $3 tokens, $4 TTLs (ms): the leases held on
            // one shared session; $5 limit ms. Renews
            // each lease exactly as `renew` does, and says for each, in order,
            // 1 renewed, 0 no longer ours (or expired), 2 unknown: its row is
            // locked by another transaction (an operator's), which is skipped,
            // never waited for, so that one held-up row does not hold up the
            // renewal of every other lease on the session. `seen` (the
            // statement's snapshot) tells a skipped lease that was ours and live
            // from one that was not. The wait for the table's lock (DDL) is
            // bounded by the limit. The arrays are read with the multi-argument
            // `unnest` in FROM, which PostgreSQL expands to `pg_catalog.unnest`
            // calls whatever the search path: a one-argument `unnest(bigint[])`
            // of the role's would be an exact-type match and beat the
            // catalog's polymorphic one (review_mux_shadow_unnest.rs).
            renew_shared: format!(
                "WITH cfg AS MATERIALIZED (SELECT set_config('lock_timeout', \
                     LEAST(GREATEST($5::int8, 1), {MAX_LOCK_TIMEOUT_MS})::text || 'ms', true) AS v), \
                 req AS MATERIALIZED (SELECT r.name, r.owner, r.token, r.ttl, r.i \
                     FROM unnest($1::text[], $2::text[], $3::int8[], $4::int8[]) \
                         WITH ORDINALITY AS r(name, owner, token, ttl, i)), \
                 seen AS MATERIALIZED (SELECT r.i FROM req r JOIN {t} c ON c.name = r.name \
                         AND c.owner = r.owner AND c.token = r.token \
                     WHERE c.released_at IS NULL AND c.holder_pid = pg_backend_pid() \
                       AND c.expires_at > clock_timestamp()), \
                 mine AS MATERIALIZED (SELECT r.i, c.name, c.expires_at, r.ttl FROM cfg, req r \
                         JOIN {t} c ON c.name = r.name AND c.owner = r.owner AND c.token = r.token \
                     WHERE c.released_at IS NULL AND c.holder_pid = pg_backend_pid() \
                     FOR NO KEY UPDATE OF c SKIP LOCKED), \
                 live AS MATERIALIZED (SELECT i, name, ttl FROM mine WHERE expires_at > clock_timestamp()), \
                 renewed AS (UPDATE {t} t SET renewed_at = clock_timestamp(), \
                     expires_at = clock_timestamp() + live.ttl::float8 * interval '1 millisecond' \
                     FROM live WHERE t.name = live.name RETURNING live.i, t.expires_at, live.ttl){raise} \
                 SELECT r.i, CASE WHEN n.i IS NOT NULL THEN 1 WHEN m.i IS NOT NULL THEN 0 \
                         WHEN s.i IS NOT NULL THEN 2 ELSE 0 END::int4 \
                 FROM req r LEFT JOIN renewed n ON n.i = r.i LEFT JOIN mine m ON m.i = r.i \
                     LEFT JOIN seen s ON s.i = r.i ORDER BY r.i",
                raise = raise_horizon(info.unlogged.as_ref()),
            ),
            // $1, $2 the halves of advisory keys held by this session (a
            // shared session's keys of locks that ended without a release that
            // freed them, or of a try that took the key but cannot grant):
            // frees each, and counts those it held. A plain query, so every
            // row is read (a CTE that no row of the result reads is never run).
            unlock_keys: "SELECT count(*) FROM unnest($1::int4[], $2::int4[]) AS k(hi, lo) \
                 WHERE pg_advisory_unlock(k.hi, k.lo)"
                .to_owned(),
            // $1 name, $2 owner, $3 token, $4 limit ms; $5, $6 the lock's key; $7
            // whether to free every advisory lock of the session (its last lock,
            // or a session of its own) rather than just that key (a session
            // shared with other locks). The lease is marked released
            // before the advisory lock is freed, so a waiter woken by the unlock finds
            // it released. The wait for the row lock is bounded by the limit; past it
            // the statement fails, and the connection is closed, which frees the
            // advisory lock. Its commit need not be durable: if a crash loses it, the
            // lease just looks held until it expires, which delays the next holder
            // and never lets two in.
            release: release("", "$8::int8"),
            // The same, also reclaiming old rows (other names': the released
            // row is not old). Its deletes commit asynchronously like the
            // release: one lost in a crash brings an old row back, which is
            // harmless; and a later durable grant of a reclaimed name commits
            // after the delete in the WAL, so it can never survive without it.
            // With a history, its pruning too (whether or not this client
            // may reclaim), when this client may prune: without DELETE on the
            // history, a pruning release would fail (`review_hist_privileges.rs`).
            release_reclaim: (info.reclaim || info.history.as_ref().is_some_and(|h| h.prune)).then(|| {
                let mut extra = String::new();
                if info.reclaim {
                    extra.push_str(&reclaim(t, info, "$1", "$8::int8"));
                }
                if let Some(h) = info.history.as_ref().filter(|h| h.prune) {
                    extra.push_str(&prune(h));
                }
                let next = if info.reclaim { "(SELECT next FROM win)" } else { "$8::int8" };
                release(&extra, next)
            }),
            // The same parameters as `upsert`, then $10 the slice (ms) and $11
            // the wait left (ms); every argument exactly typed, so the call
            // resolves to this function only. $12, $16: its schema and name;
            // $13, $14: the OID and owner the session checked; $15 the table.
            // The name is resolved again whenever the plan is rebuilt (after a
            // drop, to whatever was created since), and an owner can give the
            // function away, so the call runs only while the name still
            // resolves to that OID with that owner, still the table's owner or
            // this role: a condition without columns is a one-time filter,
            // evaluated before the function runs. Otherwise it returns no row.
            // "Still resolves" is read off that OID's row (two lookups by key,
            // where parsing the signature again cost a third of the call's
            // server time): its argument types never change, a function is
            // unique by schema, name and argument types, and every argument is
            // exactly typed (the session's search_path starts with
            // pg_catalog, so no type of another schema can shadow them), so
            // the call resolves to the function of that schema (by its name
            // now) and name, which is that row.
            wait_grant: info.wait_grant.as_ref().map(|w| {
                let name = format!("{}.{}", super::quote_ident(&w.schema), super::quote_ident(&w.name));
                (
                    format!(
                        "SELECT lockbox_got, lockbox_token, lockbox_waited_us FROM {name}($1::int4, \
                         $2::int4, $3::text, $4::text, $5::int8, $6::text, $7::int4, \
                         $8::timestamptz, $9::int8, $10::int8, $11::int8) \
                         WHERE EXISTS (SELECT 1 FROM pg_catalog.pg_proc p \
                                 JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) p.pronamespace \
                             WHERE p.oid OPERATOR(pg_catalog.=) $13::oid \
                               AND p.proowner OPERATOR(pg_catalog.=) $14::oid \
                               AND n.nspname OPERATOR(pg_catalog.=) $12::text::name \
                               AND p.proname OPERATOR(pg_catalog.=) $16::text::name) \
                           AND ($14::oid OPERATOR(pg_catalog.=) (SELECT c.relowner FROM pg_catalog.pg_class c \
                                    WHERE c.oid OPERATOR(pg_catalog.=) $15::oid) \
                                OR $14::oid OPERATOR(pg_catalog.=) (SELECT r.oid FROM pg_catalog.pg_roles r \
                                    WHERE r.rolname OPERATOR(pg_catalog.=) current_user))"
                    ),
                    w.clone(),
                )
            }),
            // $1, $2 key: does this session hold the advisory lock (granted as a
            // lock_timeout fired)?
            holds_key: "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' \
                 AND pid = pg_backend_pid() AND classid = $1::int4::oid \
                 AND objid = $2::int4::oid AND objsubid = 2 AND granted)"
                .to_owned(),
            // $1, $2 key; $3 terminate wait ms; $4 the prober's TTL (ms).
            // `pg_terminate_backend(pid, ms)` looks for the exit only every
            // 100 ms and not after its last sleep (with 100 ms or less, only
            // at once): when it reports no exit, the key is looked at again,
            // and a holder that no longer holds it counts as terminated.
            // Terminates a zombie: the session holding the key while every
            // unreleased lease it holds (for whichever name: two names may share a
            // key) has expired, or while it holds none and has sat idle for longer
            // than a TTL (stranded: granted the key by a wait whose client never
            // heard, frozen or cut off, between two statements). The session is
            // identified by pid *and* start time, so a reused pid is never
            // terminated; one without a lease that is busy, or idle only briefly
            // (an acquire in flight), is left alone. `hidden`: the holder has
            // expired leases but its start time cannot be read (a privilege is
            // missing). Judged by `transaction_timestamp()`, a time before the
            // statement's snapshot (it runs in a transaction of its own, begun
            // at Bind, where a plain `SELECT` takes its snapshot; the
            // statement's own time is set again at Execute, after it): by the
            // clock as each row is read, a lease renewed after the snapshot (in
            // time) was read as expired once its old end had passed, and a live
            // holder terminated (helper-69, helper-71; `pg_snapshot.rs`). A
            // lease expired by then was expired in the snapshot too: a renewal
            // still committing then answers after its holder's deadline, which
            // has fired `lost()` already.
            probe: format!(
                "WITH z AS MATERIALIZED (SELECT k.pid, a.backend_start AS started, \
                        a.backend_start IS NULL AND EXISTS (SELECT 1 FROM {sl} t WHERE t.holder_pid = k.pid \
                            AND t.released_at IS NULL AND t.expires_at <= transaction_timestamp()) AS hidden, \
                        CASE WHEN a.backend_start IS NOT NULL AND (( \
                              EXISTS (SELECT 1 FROM {sl} t WHERE t.holder_pid = a.pid \
                                  AND t.holder_started = a.backend_start AND t.released_at IS NULL \
                                  AND t.expires_at <= transaction_timestamp()) \
                              AND NOT EXISTS (SELECT 1 FROM {sl} t WHERE t.holder_pid = a.pid \
                                  AND t.holder_started = a.backend_start AND t.released_at IS NULL \
                                  AND t.expires_at > transaction_timestamp())) \
                              OR {stranded}) \
                             THEN CASE WHEN pg_terminate_backend(a.pid, $3) THEN true \
                                 ELSE NOT EXISTS (SELECT 1 FROM pg_locks g WHERE g.pid = a.pid \
                                     AND g.locktype = 'advisory' AND g.granted AND g.objsubid = 2 \
                                     AND g.classid = $1::int4::oid AND g.objid = $2::int4::oid) END \
                             END AS terminated \
                 FROM pg_locks k LEFT JOIN pg_stat_activity a ON a.pid = k.pid \
                 WHERE {KEY_HELD_BY_OTHER}){record} \
                 SELECT pid, hidden, terminated FROM z",
                stranded = stranded(sl, "$4"),
                // With a history: every unreleased lease of a terminated session,
                // identified by pid and start time, as the termination is (a
                // pid is reused: review_hist_zombie_pid.rs).
                record = info.history.as_ref().map_or_else(String::new, |h| format!(
                    ", recorded AS (INSERT INTO {q} (name, token, owner, metadata, event, at, holder_pid) \
                         SELECT t.name, t.token, t.owner, t.metadata, 'zombie_terminated', \
                             clock_timestamp(), t.holder_pid \
                         FROM z JOIN {t} t ON t.holder_pid = z.pid AND t.holder_started = z.started \
                             AND t.released_at IS NULL \
                         WHERE z.terminated)",
                    q = h.quoted
                )),
            ),
            // $1 name, or NULL for all. Timestamps as epoch seconds, and the time
            // left in ms, all float8: an operator's '±infinity' is ±Infinity there
            // (subtracting infinite timestamps would be an error, and an int8
            // cannot hold it).
            // Events of one instant (a takeover writes two, each at its own
            // clock_timestamp(), which can be the same microsecond): a higher
            // token is newer, and a grant is older than its lease's end
            // (review_hist_order.rs).
            history_table: info.history.as_ref().map(|h| h.quoted.clone()),
            recover: info.unlogged.as_ref().map(|u| recover(u, info.token_seq)),
            epoch_state: info.unlogged.as_ref().map(|u| {
                format!(
                    "SELECT e.epoch, a.id IS NOT NULL, {left} \
                     FROM {ep} e LEFT JOIN {al} a ON a.id = 1 WHERE e.id = 1",
                    ep = u.epoch,
                    al = u.alive,
                    left = ms_until("a.grants_from"),
                )
            }),
            history: info.history.as_ref().map(|h| {
                format!(
                    "SELECT name, token, owner, metadata, event, extract(epoch FROM at)::float8, \
                         holder_pid FROM {q} WHERE name = $1 \
                     ORDER BY at DESC, token DESC, event = 'granted' LIMIT $2",
                    q = h.quoted
                )
            }),
            fence: format!(
                "WITH {check}, \
                 restored AS MATERIALIZED (SELECT pg_catalog.set_config('lock_timeout', \
                     pg_catalog.current_setting('{FENCE_SAVED}'), true) AS v \
                     FROM (SELECT pg_catalog.count(*) FROM state) n) \
                 SELECT COALESCE((SELECT s FROM state), 'gone'), \
                        pg_catalog.current_setting('transaction_isolation'), \
                        (SELECT v FROM restored) IS NOT NULL",
                check = fence_check(t, Some("$3")),
            ),
            leases: format!(
                "SELECT name, owner, metadata, token, holder_pid, \
                        extract(epoch FROM acquired_at)::float8, extract(epoch FROM renewed_at)::float8, \
                        extract(epoch FROM expires_at)::float8, extract(epoch FROM released_at)::float8, \
                        ((extract(epoch FROM expires_at) - extract(epoch FROM clock_timestamp())) * 1000.0)::float8 \
                 FROM {t} WHERE $1::text IS NULL OR name = $1 ORDER BY name"
            ),
        }
    }
}

/// The SQLSTATE the fence function raises when the lease it is asked about is
/// not current (released, expired, or granted to another holder since), as
/// the caller's snapshot shows it: under `REPEATABLE READ` / `SERIALIZABLE`
/// a release since the snapshot goes unseen, and an expiry it shows may have
/// been renewed away (see [`Lock::fence`](crate::Lock::fence)).
pub const FENCE_SQLSTATE: &str = "LB001";

/// The placeholder setting in which [`FENCE_PREPARE`] keeps the caller's
/// `lock_timeout` until the fence restores it.
pub(crate) const FENCE_SAVED: &str = "lockbox.fence_saved_lock_timeout";

/// Run on the caller's connection before the fence, in one round trip: fails
/// outside a transaction block (25P01: a fence there would end with its own
/// statement), saves the caller's `lock_timeout`, and sets it to `{ms}` (the
/// lock's local time left), local to the transaction, so that the fence's waits
/// for the lease table's lock (taken as the statement is parsed) and for the
/// row's are bounded by it.
pub(crate) fn fence_prepare(ms: i64) -> String {
    format!(
        "SAVEPOINT lockbox_fence; RELEASE SAVEPOINT lockbox_fence; \
         SELECT pg_catalog.set_config('{FENCE_SAVED}', pg_catalog.current_setting('lock_timeout'), true), \
                pg_catalog.set_config('lock_timeout', '{ms}ms', true)"
    )
}

/// The fence's CTEs, `mine` and `state`, for lease table `t`; `$1` name, `$2`
/// token. Run in the caller's transaction, with the caller's settings, so
/// every operator and function is schema-qualified. `mine` takes `FOR KEY
/// SHARE` on the lease row of that grant: renewals and releases (which lock
/// `FOR NO KEY UPDATE`) go on, but no grant (which locks `FOR UPDATE`, see
/// [`acquire`]) can change the row until the transaction ends, so whatever it
/// commits is ordered before the next holder's grant. A grant already made
/// since the transaction's snapshot (`REPEATABLE READ`, `SERIALIZABLE`) fails
/// the lock with 40001; under `READ COMMITTED` the row is judged in its latest
/// version. `state` then says `live`, `released` or `expired`, judged by the
/// database clock once the row is locked (no row: `gone`).
///
/// `owner`, a parameter, when given: the row must also be that owner's. The
/// caller's transaction may be on another database (or server) than the
/// lease table's, one with a lease table of the same name; tokens are small
/// per-store counters, so name and token alone can match another
/// deployment's lease there (`review_fence_wrong_database.rs`). The owner is
/// unique per client.
pub(crate) fn fence_check(t: &str, owner: Option<&str>) -> String {
    let owner = owner
        .map(|p| format!(" AND c.owner OPERATOR(pg_catalog.=) {p}::text"))
        .unwrap_or_default();
    format!(
        "mine AS MATERIALIZED (SELECT c.released_at, c.expires_at FROM {t} c \
             WHERE c.name OPERATOR(pg_catalog.=) $1::text \
               AND c.token OPERATOR(pg_catalog.=) $2::int8{owner} FOR KEY SHARE OF c), \
         state AS MATERIALIZED (SELECT CASE WHEN m.released_at IS NOT NULL THEN 'released' \
                 WHEN m.expires_at OPERATOR(pg_catalog.<=) pg_catalog.clock_timestamp() \
                 THEN 'expired' ELSE 'live' END AS s FROM mine m)"
    )
}

/// Added to the table's name to name its fence function.
pub(crate) const FENCE_SUFFIX: &str = "_fence";

/// The argument types of the fence function: name, token.
pub(crate) const FENCE_ARGS: &str = "text, bigint";

/// The fence function's body for lease table `t`: [`fence_check`], raising
/// [`FENCE_SQLSTATE`] unless the lease is live. For triggers, other languages
/// and `psql`; lockbox itself runs the same check inline. Written for any
/// `plpgsql.*` setting: no variable, no `INTO`.
pub(crate) fn fence_body(t: &str) -> String {
    format!(
        "\nBEGIN\n\
         \x20   PERFORM 1 FROM (WITH {check} SELECT s FROM state) f \
                 WHERE f.s OPERATOR(pg_catalog.=) 'live';\n\
         \x20   IF NOT FOUND THEN\n\
         \x20       RAISE EXCEPTION USING ERRCODE = '{FENCE_SQLSTATE}', \
                     MESSAGE = pg_catalog.format('lockbox: the lease of %L with token %s is not \
                     current (released, expired or granted since)', $1, $2);\n\
         \x20   END IF;\n\
         END\n",
        check = fence_check(t, None),
    )
}

/// Creates (or restores) the fence function `signature` with `body`.
pub(crate) fn create_fence(signature: &str, body: &str) -> String {
    format!(
        "CREATE OR REPLACE FUNCTION {signature} RETURNS void \
         LANGUAGE plpgsql VOLATILE SECURITY INVOKER AS {tag}{body}{tag}",
        tag = dollar_tag(&[signature, body]),
    )
}

/// A dollar-quote tag that occurs in none of `texts` (a schema's name is
/// anyone's choice, and a tag inside a body would end it early).
fn dollar_tag(texts: &[&str]) -> String {
    let mut tag = "$lockbox$".to_owned();
    let mut n = 0u32;
    while texts.iter().any(|t| t.contains(&tag)) {
        n += 1;
        tag = format!("$lockbox{n}$");
    }
    tag
}

/// Whether the key-holding session `a` (of `pg_stat_activity`, start time
/// known) holds no unreleased lease and has been idle for longer than `ttl_ms`
/// (a parameter, in ms): it was granted the key but never wrote a lease, its
/// client frozen or cut off. No acquire in flight is idle that long (the
/// lock-delay sleeper frees the key first).
fn stranded(t: &str, ttl_ms: &str) -> String {
    format!(
        "(a.backend_start IS NOT NULL AND a.state = 'idle' \
          AND a.state_change < transaction_timestamp() - {ttl_ms}::int8::float8 * interval '1 millisecond' \
          AND NOT EXISTS (SELECT 1 FROM {t} s WHERE s.holder_pid = a.pid \
              AND s.holder_started = a.backend_start AND s.released_at IS NULL))"
    )
}

/// The lease table, created when missing. `token` draws from a store-wide
/// sequence for a name that has no row: reclaiming a row can then never make the
/// name's tokens start over (see [`reclaim`]).
pub(crate) fn create_table(t: &str, unlogged: bool) -> String {
    let kind = if unlogged { "UNLOGGED TABLE" } else { "TABLE" };
    format!(
        "CREATE {kind} IF NOT EXISTS {t} (\n\
        \x20   name           text        PRIMARY KEY,\n\
        \x20   owner          text        NOT NULL,\n\
        \x20   token          bigint      GENERATED BY DEFAULT AS IDENTITY (CACHE 1 NO CYCLE) CHECK (token > 0),\n\
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

/// Milliseconds from now until the timestamp `expr`, as `int8`, negative once
/// passed. Computed from epoch seconds and clamped (to about ±31 000 years), so
/// an operator's `'infinity'` / `'-infinity'` reads as "forever" / "long ago"
/// instead of failing the statement (subtracting infinite timestamps is 22008).
pub(crate) fn ms_until_pub(expr: &str) -> String {
    ms_until(expr)
}

fn ms_until(expr: &str) -> String {
    // NULL stays NULL (no lease): GREATEST and LEAST skip NULLs, so without the
    // CASE a missing lease would read as one that ended long ago.
    format!(
        "CASE WHEN {expr} IS NULL THEN NULL::int8 ELSE \
         LEAST(GREATEST((extract(epoch FROM {expr}) - extract(epoch FROM clock_timestamp())) * 1000.0, \
         -1e15), 1e15)::int8 END"
    )
}

/// A data-modifying CTE (`, reclaimed AS (...)`) that deletes at most
/// [`RECLAIM_BATCH`] rows of the [`RECLAIM_PAGES`] pages from page `from`
/// (a parameter, `int8`, taken modulo the table's pages), other than
/// `name`'s (a parameter), whose lease ended more than [`RECLAIM_AFTER`]
/// ago, and CTE `win` whose `next` is the next window's first page (0 past
/// the end). The pages are the table's or its largest partition's: a
/// partitioned table has none of its own, and each partition is swept in the
/// same window of page numbers. Rows deleted:
/// released, or expired with the holder's session gone (a live session's expired
/// lease is kept: the zombie probe needs it). Tokens never repeat or go back for
/// a reclaimed name because a row is deleted only if its token is at most the
/// store-wide sequence's last value (`token <= last_value`): every later grant of
/// the name starts from `nextval`, which is above it. The sequence has `CACHE 1`
/// (checked at build), so no session hands out an older cached value; and its
/// value is crash-safe for this use: `nextval` writes WAL before it returns, and a
/// row can only be deleted by a commit whose WAL comes after that record.
/// Rows locked by another transaction are skipped, never waited for.
///
/// During a rolling upgrade, a lockbox 0.1 process still writes token 1 for a
/// name that has no row; if that name's row was reclaimed by a new process, its
/// tokens would start over. Reclaiming only touches rows idle for
/// [`RECLAIM_AFTER`], so finish the rollout within that time (or keep the
/// DELETE privilege from the new processes' role until it is finished: without
/// it they reclaim nothing).
fn reclaim(t: &str, info: &TableInfo, name: &str, from: &str) -> String {
    let (token_seq, history, oid) = (info.token_seq, info.history.as_ref(), info.oid);
    // With a history, an unreleased (expired) lease deleted here is recorded
    // as expired, as a grant taking it over would have: else its grant would
    // have no end in the history.
    let record = history.map_or_else(String::new, |h| {
        format!(
            ", reclaim_recorded AS (INSERT INTO {q} (name, token, owner, metadata, event, at, holder_pid) \
                 SELECT r.name, r.token, r.owner, r.metadata, 'expired', clock_timestamp(), r.holder_pid \
                 FROM reclaimed r WHERE r.released_at IS NULL)",
            q = h.quoted
        )
    });
    format!(
        ", win AS MATERIALIZED (SELECT x.lo, CASE WHEN x.lo + {RECLAIM_PAGES} < x.pages \
                 THEN x.lo + {RECLAIM_PAGES} ELSE 0 END AS next \
             FROM (SELECT {from} % GREATEST(s.pages, 1) AS lo, s.pages \
                   FROM (SELECT GREATEST(pg_relation_size({oid}::oid::regclass), \
                             (SELECT max(pg_relation_size(p.relid)) \
                              FROM pg_partition_tree({oid}::oid::regclass) p)) \
                         / current_setting('block_size')::int8 AS pages) s) x), \
         seq AS MATERIALIZED (SELECT pg_sequence_last_value({token_seq}::oid::regclass) AS last), \
         reclaimable AS MATERIALIZED ( \
             SELECT c.name FROM {t} c \
             WHERE c.ctid >= ('(' || (SELECT lo FROM win)::text || ',0)')::tid \
               AND c.ctid < ('(' || LEAST((SELECT lo FROM win) + {RECLAIM_PAGES}, {max})::text || ',0)')::tid \
               AND COALESCE(c.released_at, c.expires_at) < statement_timestamp() - interval '{RECLAIM_AFTER}' \
               AND c.name <> {name} \
               AND c.token <= (SELECT last FROM seq) \
               AND (c.released_at IS NOT NULL OR NOT EXISTS (SELECT 1 FROM pg_stat_activity a \
                    WHERE a.pid = c.holder_pid \
                      AND (a.backend_start IS NULL OR a.backend_start = c.holder_started))) \
             LIMIT {RECLAIM_BATCH} FOR UPDATE OF c SKIP LOCKED), \
         reclaimed AS (DELETE FROM {t} d USING reclaimable r WHERE d.name = r.name \
             RETURNING d.name, d.token, d.owner, d.metadata, d.holder_pid, d.released_at){record}",
        // Past the last page a table can have: a tid's block number is 32 bits.
        max = u32::MAX,
    )
}

/// An acquire statement: `lock` defines CTE `l(got)` (whether this session now
/// holds the advisory lock); if it does, the lease is written when the name is
/// free (released, or expired by the database clock). A name with a row takes the
/// row's token + 1; a name without one takes the store-wide sequence's next value
/// (the identity default). The conflict check locks the row and judges its latest
/// version, whatever the statement's snapshot.
///
/// `SET name = excluded.name` changes nothing in the row but names its key
/// column: `ON CONFLICT` then locks the row `FOR UPDATE` (not `FOR NO KEY
/// UPDATE`) and marks the version it replaces key-updated. A [`fence`] holding
/// `FOR KEY SHARE` on the row therefore holds every grant back until its
/// transaction ends, and one whose snapshot predates a grant fails (40001)
/// instead of locking the new holder's row (`pg_fence.rs`).
///
/// Returns `(got, token, name_left)`: `token` is set when granted;
/// `name_left` is that expression (for a key not got: what the name's lease has
/// left).
fn acquire(
    t: &str,
    lock: &str,
    name_left: &str,
    history: Option<&HistoryInfo>,
    unlogged: Option<&Unlogged>,
    checked: bool,
) -> String {
    grant(t, lock, name_left, history, unlogged, true, true, checked)
}

/// The try's grant with a history: records the grant, and leaves an
/// unreleased lease alone even when it has expired, saying what it has left
/// (the third column, also when the key was got). Taking over an expired
/// lease must record it with the lease it replaces, locked and judged in its
/// latest version (`prev` in [`acquire`]); that part costs about 5 % of an
/// uncontended cycle (measured with pgbench, interleaved), for a case that
/// only follows a crash. A try that gets the key and finds an expired lease
/// therefore runs [`acquire`]'s full grant next (`upsert`), still holding the
/// key: one more round trip, then.
fn try_grant_recorded(
    t: &str,
    lock: &str,
    name_left: &str,
    history: &HistoryInfo,
    unlogged: Option<&Unlogged>,
) -> String {
    grant(
        t,
        lock,
        name_left,
        Some(history),
        unlogged,
        false,
        true,
        true,
    )
}

/// The grant of [`acquire`] and [`try_grant_recorded`]. With an unlogged
/// lease table it is also held back by the *gate* (no row in `alive`: the
/// table was emptied by a crash, recover first; or its `grants_from` is still
/// ahead: a lock-delay), and raises the bounds it would pass (see
/// [`Unlogged`]). `gate_col`: a fourth column says why the gate held the
/// grant back (`NULL`: it did not; 0: recover; else the ms until grants
/// resume).
///
/// With an unlogged lease table and `gate_col`, `checked` picks how the
/// bounds are kept (see [`Bounds`](super::bounds::Bounds)):
/// - `false`: the grant raises them in its own statement (an `UPDATE` of the
///   epoch row in every grant's plan: about 22 µs of a try's server time,
///   measured with pgbench, even when it finds nothing to raise), and the
///   answer says what they are then: columns 5–8 are `false` and the
///   ceiling, horizon and longest TTL.
/// - `true`: the grant raises nothing and has no epoch table in its plan. It
///   grants only within the bounds the client last saw (`$10` ceiling,
///   `$11` horizon, `$12` longest TTL): a lease that would end past `$11`, or
///   a TTL above `$12`, is not granted, and column 5 (`past`) says so (the
///   key is then held: grant with the raising statement next). A token above
///   `$10`, known only once the row is written, fails the statement instead
///   ([`CEILING_PASSED`]), undoing the write; the key stays held (session
///   advisory locks outlive a rollback). The lease's times come from one
///   reading of the clock, so the end judged is the end written.
#[allow(clippy::too_many_arguments)]
fn grant(
    t: &str,
    lock: &str,
    name_left: &str,
    history: Option<&HistoryInfo>,
    unlogged: Option<&Unlogged>,
    take_over: bool,
    gate_col: bool,
    checked: bool,
) -> String {
    // With a history: the grant, and the expired lease it replaced (`prev`),
    // recorded with the grant. `prev` locks the row (`FOR UPDATE`, as the
    // grant does) before the grant runs (the grant reads it), so it is judged
    // in its latest version once locked, as the grant judges it: read with
    // the statement's snapshot, a release committed while the grant waited
    // for the row would be recorded as a takeover
    // (`review_hist_release_race.rs`). Only when the key is got: a try that
    // did not get it locks nothing.
    let (prev, after_prev) = match history {
        Some(_) if take_over => (
            format!(
                "prev AS MATERIALIZED (SELECT p.owner, p.token, p.metadata, p.holder_pid \
                     FROM {t} p, l WHERE l.got AND p.name = $3 AND p.released_at IS NULL \
                       AND p.expires_at <= clock_timestamp() FOR UPDATE OF p), "
            ),
            " AND (SELECT count(*) FROM prev) >= 0",
        ),
        _ => (String::new(), ""),
    };
    let record = history.map_or_else(String::new, |h| {
        let expired = if take_over {
            "SELECT $3, p.token, p.owner, p.metadata, 'expired', clock_timestamp(), p.holder_pid \
             FROM prev p, granted g UNION ALL "
        } else {
            ""
        };
        format!(
            ", recorded AS (INSERT INTO {h} (name, token, owner, metadata, event, at, holder_pid) \
                 {expired}SELECT $3, g.token, $4, $6, 'granted', clock_timestamp(), $7 FROM granted g)",
            h = h.quoted,
        )
    });
    // Without the takeover, only a released lease is granted again. With a
    // history, an unreleased lease is replaced only as `prev` found it
    // (expired, and locked since): judged again here, a lease that ended
    // after `prev` looked would be taken over unrecorded. The grant then
    // grants nothing, and the next one (still holding the key) records it.
    let replaceable = match history {
        _ if !take_over => "t.released_at IS NOT NULL",
        Some(_) => "t.released_at IS NOT NULL OR EXISTS (SELECT 1 FROM prev)",
        None => "t.released_at IS NOT NULL OR t.expires_at <= clock_timestamp()",
    };
    // The gate is judged once, with one reading of the clock; the bounds are
    // raised only by a grant that passes them, so other grants write nothing
    // durable.
    let checked = checked && gate_col && unlogged.is_some();
    // A raising grant (`upsert`, and the wait-and-grant function's) also
    // refuses, as if the table had been emptied, when the epoch row is
    // missing: recovery then says so (the function's caller gets there
    // through `upsert`). Grants with no row would be covered by nothing.
    let no_row = match unlogged {
        Some(u) if !checked => {
            format!(
                " OR NOT EXISTS (SELECT 1 FROM {ep} x WHERE x.id = 1)",
                ep = u.epoch
            )
        }
        _ => String::new(),
    };
    let (gate, gated, raise) = match unlogged {
        Some(u) => (
            format!(
                "gate AS MATERIALIZED (SELECT CASE WHEN a.grants_from IS NULL{no_row} THEN 0::int8 \
                     WHEN a.grants_from > clock_timestamp() THEN GREATEST(1::int8, {left}) END AS ms \
                     FROM (SELECT 1) o LEFT JOIN {al} a ON a.id = 1), ",
                al = u.alive,
                left = ms_until("a.grants_from"),
            ),
            " AND (SELECT ms FROM gate) IS NULL",
            format!(
                ", raised AS (UPDATE {ep} e SET \
                     token_ceiling = GREATEST(e.token_ceiling, \
                         LEAST(g.token, {ceiling_max}::int8) + {CEILING_STEP}::int8), \
                     lease_horizon = GREATEST(e.lease_horizon, g.expires_at \
                         + GREATEST($5::int8, {HORIZON_STEP_MIN_MS}::int8)::float8 * interval '1 millisecond'), \
                     max_ttl_ms = GREATEST(e.max_ttl_ms, $5::int8) \
                     FROM granted g WHERE e.id = 1 \
                       AND (e.token_ceiling < g.token OR e.lease_horizon < g.expires_at \
                            OR e.max_ttl_ms < $5::int8)",
                ep = u.epoch,
                // Never past the largest int8: a token that high stops the
                // sequence (it never cycles), not the raise.
                ceiling_max = i64::MAX - CEILING_STEP,
            ),
        ),
        None => (String::new(), "", String::new()),
    };
    let gate_out = match (gate_col, unlogged) {
        (false, _) => "",
        (true, Some(_)) => ", (SELECT ms FROM gate)",
        (true, None) => ", NULL::int8",
    };
    // Checked: the lease's end is one reading of the clock (the statement's
    // start, after the request was sent), so the end judged is the end
    // written. Written inline, not as CTEs: each CTE costs a try several µs
    // (pgbench). A lease that replaces another starts when its grant has the
    // row (`clock_timestamp()` in the `SET`): the end is read before the
    // `ON CONFLICT` waits for the row, the takeover judged after, and a start
    // read before would lie before the end of the lease it replaced. The end
    // read early shortens the lease by the row waits; `lock_timeout` bounds
    // each, not their sum (lockers of the row letting go one after another),
    // so a grant whose lease would have ended by the time it has the row
    // grants nothing: the update's `WHERE` says so, and an insert (the row
    // deleted while the grant waited for it) fails with [`GRANT_ENDED`]
    // (`review_pg_row_wait_takeover.rs`).
    let fit = "statement_timestamp() + $5::int8::float8 * interval '1 millisecond' \
               <= $11::timestamptz AND $5::int8 <= $12::int8";
    let now = if checked {
        "statement_timestamp()"
    } else {
        "clock_timestamp()"
    };
    let (raise, fits, check_token, bounds_out) = match unlogged {
        Some(_) if checked => (
            String::new(),
            format!(" AND {fit}"),
            format!(
                ", CASE WHEN t.token <= $10::int8 THEN 0 \
                     ELSE ('{CEILING_PASSED} ' || t.token::text)::int4 END"
            ),
            format!(", l.got AND NOT ({fit})"),
        ),
        Some(u) if gate_col => (
            format!("{raise} RETURNING e.token_ceiling, e.lease_horizon, e.max_ttl_ms)"),
            String::new(),
            String::new(),
            format!(
                ", false, \
                 COALESCE((SELECT token_ceiling FROM raised), (SELECT token_ceiling FROM {ep} WHERE id = 1)), \
                 COALESCE((SELECT lease_horizon FROM raised), (SELECT lease_horizon FROM {ep} WHERE id = 1)), \
                 COALESCE((SELECT max_ttl_ms FROM raised), (SELECT max_ttl_ms FROM {ep} WHERE id = 1))",
                ep = u.epoch,
            ),
        ),
        Some(_) => (
            format!("{raise} RETURNING 1)"),
            String::new(),
            String::new(),
            String::new(),
        ),
        None => (raise, String::new(), String::new(), String::new()),
    };
    // A raising grant waits for the epoch row after writing the lease, and
    // `lock_timeout` bounds each such wait, not their sum (transactions
    // taking turns on the row): once the raise has run, a lease that ended
    // meanwhile fails the grant with [`GRANT_ENDED`] as `granted` does,
    // undoing the lease, the raise and the history's record of the grant.
    // `raised` is read first so that it has run before the clock is read
    // (a data-modifying CTE nobody reads runs only after the result).
    let token_out = match unlogged {
        Some(_) if !checked => format!(
            "CASE WHEN (SELECT count(*) FROM raised) >= 0 \
                   AND (SELECT g.expires_at FROM granted g) <= clock_timestamp() \
                 THEN ('{GRANT_ENDED} ' || (SELECT token FROM granted)::text)::int8 \
                 ELSE (SELECT token FROM granted) END"
        ),
        _ => "(SELECT token FROM granted)".to_owned(),
    };
    format!(
        "WITH {lock}, {gate}{prev}\
         granted AS ( \
             INSERT INTO {t} AS t (name, owner, holder_pid, holder_started, metadata, \
                                   acquired_at, renewed_at, expires_at, released_at) \
             SELECT $3, $4, $7, $8::timestamptz, $6, {now}, {now}, \
                    {now} + $5::int8::float8 * interval '1 millisecond', NULL \
             FROM l WHERE l.got{gated}{after_prev}{fits} \
             ON CONFLICT (name) DO UPDATE SET name = excluded.name, owner = excluded.owner, \
                 token = t.token + 1, holder_pid = excluded.holder_pid, holder_started = excluded.holder_started, \
                 metadata = excluded.metadata, acquired_at = clock_timestamp(), \
                 renewed_at = clock_timestamp(), expires_at = excluded.expires_at, released_at = NULL \
             WHERE ({replaceable}) AND excluded.expires_at > clock_timestamp() \
             RETURNING t.token, t.expires_at{check_token}, CASE WHEN t.expires_at > clock_timestamp() \
                 THEN 0 ELSE ('{GRANT_ENDED} ' || t.token::text)::int4 END){record}{raise} \
         SELECT l.got, {token_out}, {name_left}{gate_out}{bounds_out} FROM l"
    )
}

/// With an unlogged lease table, a data-modifying CTE (`, raised AS (...)`)
/// that raises the horizon when a lease renewed by CTE `renewed` (columns
/// `expires_at`, `ttl`) would end after it (see [`Unlogged`]); nothing
/// otherwise.
fn raise_horizon(unlogged: Option<&Unlogged>) -> String {
    unlogged.map_or_else(String::new, |u| {
        format!(
            ", raised AS (UPDATE {ep} e SET lease_horizon = GREATEST(e.lease_horizon, x.ends \
                 + GREATEST(x.ttl, {HORIZON_STEP_MIN_MS}::int8)::float8 * interval '1 millisecond'), \
                 max_ttl_ms = GREATEST(e.max_ttl_ms, x.ttl) \
                 FROM (SELECT max(r.expires_at) AS ends, max(r.ttl) AS ttl FROM renewed r) x \
                 WHERE e.id = 1 AND (e.lease_horizon < x.ends OR e.max_ttl_ms < x.ttl))",
            ep = u.epoch,
        )
    })
}

/// The lease history of a lease table (`LockClientBuilder::history`).
#[derive(Debug, Clone)]
pub(crate) struct HistoryInfo {
    /// `"schema"."table_history"`.
    pub quoted: String,
    /// How long events are kept (ms): older ones are pruned.
    pub retention_ms: i64,
    /// Whether this client prunes (it may delete, select and lock the history's
    /// rows).
    pub prune: bool,
}

/// The history table `h` with its indexes (named by the server, so a long
/// table name cannot make two of them one): by name and time for reading a
/// name's events, by time for pruning (without it, each pruning would scan
/// the whole table). Run only when the table is missing.
pub(crate) fn create_history(h: &str) -> String {
    format!(
        "CREATE TABLE {h} (\n\
        \x20   name       text        NOT NULL,\n\
        \x20   token      bigint      NOT NULL,\n\
        \x20   owner      text        NOT NULL,\n\
        \x20   metadata   text,\n\
        \x20   event      text        NOT NULL,\n\
        \x20   at         timestamptz NOT NULL,\n\
        \x20   holder_pid integer\n\
        );\n\
        CREATE INDEX ON {h} (name, at);\n\
        CREATE INDEX ON {h} (at)"
    )
}

/// A data-modifying CTE (`, pruned AS (...)`) that deletes at most
/// [`RECLAIM_BATCH`] history events older than the retention, oldest first,
/// skipping any another transaction has locked (never waited for). The cutoff
/// is computed from `statement_timestamp()`, which is stable: with the
/// volatile `clock_timestamp()` it would be no index condition, and each
/// pruning would read the whole index (measured: the cycle at 2–3× its time
/// after some 10 000 events). `float8 * interval`, never `int8 * interval`:
/// `pg_catalog` has no such operator, so one of the role's would be an exact
/// match and decide what is deleted (`review_hist_operator_shadow.rs`).
/// Rows are matched by table and ctid: a ctid is unique only within one
/// partition, and a history partitioned by time would otherwise lose fresh
/// events with old ones (`review_hist_partitioned.rs`). On a plain table the
/// plan is the index on `at`, then one TID scan per row.
fn prune(h: &HistoryInfo) -> String {
    format!(
        ", pruned AS (DELETE FROM {q} d USING ( \
             SELECT x.tableoid AS rel, x.ctid AS tid FROM {q} x \
             WHERE x.at < statement_timestamp() - {ms}::float8 * interval '1 millisecond' \
             ORDER BY x.at LIMIT {RECLAIM_BATCH} FOR UPDATE OF x SKIP LOCKED) o \
             WHERE d.tableoid = o.rel AND d.ctid = o.tid)",
        q = h.quoted,
        ms = h.retention_ms,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_session_pins_the_table_lock_wait() {
        assert!(SESSION_SETUP.contains(&format!("SET lock_timeout = '{TABLE_LOCK_WAIT_MS}ms';")));
    }
}
