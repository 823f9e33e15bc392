//! The wait-and-grant function: a waiting acquire waits for the advisory key and
//! is granted in one round trip, through a PL/pgSQL function created with the
//! lease table. What must hold: the waiter holds no lock on the lease table
//! while it waits; the lease's deadline accounts for the wait the server
//! measured without ever ending after the lease; a function that is missing,
//! dropped, or not lockbox's is never used, and waits still work without it.

use crate::common;

use std::thread;
use std::time::Duration;

use common::*;
use lockbox::LockClient;

/// A schema of its own for each test's lease table (and so its function).
struct Table {
    schema: String,
}

impl Table {
    fn new() -> Table {
        let schema = unique("wg").replace('-', "_");
        admin()
            .batch_execute(&format!("CREATE SCHEMA {schema}"))
            .unwrap();
        Table { schema }
    }

    fn name(&self) -> String {
        format!("{}.leases", self.schema)
    }

    fn function(&self) -> String {
        format!("{}.leases_wait_grant_v3", self.schema)
    }

    fn client(&self, ttl: Duration) -> (LockClient, String) {
        let app = unique("wg-app");
        let c = builder_for(&app)
            .table(&self.name())
            .ttl(ttl)
            .build()
            .unwrap();
        (c, app)
    }

    /// Whether the function exists with the body lockbox gives it (it contains
    /// the advisory wait; an impostor's does not).
    fn function_is_lockbox(&self) -> bool {
        admin()
            .query_one(
                "SELECT COALESCE((SELECT prosrc LIKE '%pg_advisory_lock($1, $2)%' \
                 FROM pg_proc WHERE oid = to_regproc($1)), false)",
                &[&self.function()],
            )
            .unwrap()
            .get(0)
    }
}

impl Drop for Table {
    fn drop(&mut self) {
        let _ = admin().batch_execute(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.schema));
    }
}

/// What the waiting session of `app` runs, and whether it holds any lock on
/// the lease table, once it is blocked on the advisory key.
fn waiter_state(app: &str, table: &str) -> (String, bool) {
    assert!(
        eventually(Duration::from_secs(10), || is_waiting(app)),
        "the acquire never waited"
    );
    let row = admin()
        .query_one(
            "SELECT a.query, EXISTS (SELECT 1 FROM pg_locks l WHERE l.pid = a.pid \
                 AND l.locktype = 'relation' AND l.relation = to_regclass($2)) \
             FROM pg_stat_activity a JOIN pg_locks k ON k.pid = a.pid \
             WHERE a.application_name = $1 AND k.locktype = 'advisory' AND NOT k.granted",
            &[&app, &table],
        )
        .unwrap();
    (row.get(0), row.get(1))
}

#[test]
fn a_waiter_is_granted_through_the_function_holding_no_table_lock_while_it_waits() {
    let table = Table::new();
    let (holder, _) = table.client(ms(30_000));
    let (waiter, w_app) = table.client(ms(30_000));
    assert!(table.function_is_lockbox(), "build() created the function");
    let name = unique("wg-handoff");
    let held = holder.try_lock(&name).unwrap().expect("free lock");
    let first = held.fencing_token();
    let got = thread::scope(|s| {
        let w = s.spawn(|| waiter.lock(&name).unwrap());
        let (query, table_locked) = waiter_state(&w_app, &table.name());
        assert!(
            query.contains("_wait_grant_v3"),
            "the waiter waits inside the function: {query}"
        );
        assert!(
            !table_locked,
            "a waiter must hold no lock on the lease table while it waits"
        );
        held.release().unwrap();
        w.join().unwrap()
    });
    assert!(got.fencing_token() > first, "tokens increase");
    let token: i64 = admin()
        .query_one(
            &format!(
                "SELECT token FROM {} WHERE name = $1 AND released_at IS NULL \
                 AND expires_at > clock_timestamp()",
                table.name()
            ),
            &[&name],
        )
        .unwrap()
        .get(0);
    assert_eq!(
        token as u64,
        got.fencing_token(),
        "the live lease is the waiter's"
    );
    got.release().unwrap();
}

/// The grant's deadline rests on the wait the server measured inside the call:
/// it must still end before the lease. With renewals paused, `lost()` fires at
/// the local deadline; at that moment the database must still see the lease live.
#[test]
fn after_a_wait_inside_the_function_the_deadline_ends_before_the_lease() {
    let table = Table::new();
    let (holder, _) = table.client(ms(30_000));
    // The margin between the local deadline and the lease is 1 % of the TTL
    // (+2 ms): 62 ms here, so the check below is not at the mercy of a thread
    // woken a few milliseconds late.
    let ttl = ms(6000);
    let (waiter, w_app) = table.client(ttl);
    let name = unique("wg-deadline");
    let held = holder.try_lock(&name).unwrap().expect("free lock");
    let got = thread::scope(|s| {
        let w = s.spawn(|| waiter.lock(&name).unwrap());
        assert!(
            waiter_state(&w_app, &table.name())
                .0
                .contains("_wait_grant_v3")
        );
        // A wait of a quarter of the waiter's TTL: a deadline that counted it
        // twice would end 1.5 s after the lease.
        thread::sleep(ttl / 4);
        held.release().unwrap();
        w.join().unwrap()
    });
    waiter.__pause_renewals(true);
    let mut db = admin();
    let left = db
        .prepare(&format!(
            "SELECT extract(epoch FROM expires_at - clock_timestamp())::float8 * 1000 \
             FROM {} WHERE name = $1 AND token = $2",
            table.name()
        ))
        .unwrap();
    let token = got.fencing_token() as i64;
    got.lost()
        .recv_timeout(Duration::from_secs(60))
        .expect("lost() fires at the deadline");
    let left_ms: f64 = db.query_one(&left, &[&name, &token]).unwrap().get(0);
    assert!(
        left_ms > 0.0,
        "lost() fired {:.1} ms after the lease ended",
        -left_ms
    );
    waiter.__pause_renewals(false);
}

/// Dropped after `build()`: sessions already pooled find it gone and wait
/// without it, new sessions do not use it; exclusion holds throughout.
#[test]
fn a_dropped_function_is_not_used_and_waits_still_work() {
    let table = Table::new();
    let (holder, _) = table.client(ms(30_000));
    let (waiter, w_app) = table.client(ms(30_000));
    let name = unique("wg-dropped");
    // Warm the waiter's pooled session with a wait through the function.
    let handoff = |expect_function: bool| {
        let held = holder.try_lock(&name).unwrap().expect("free lock");
        let got = thread::scope(|s| {
            let w = s.spawn(|| waiter.lock(&name).unwrap());
            let (query, _) = waiter_state(&w_app, &table.name());
            assert_eq!(
                query.contains("_wait_grant_v3"),
                expect_function,
                "waiting statement: {query}"
            );
            assert!(held.is_held(), "the holder still holds it");
            held.release().unwrap();
            w.join().unwrap()
        });
        got.release().unwrap();
    };
    handoff(true);
    admin()
        .batch_execute(&format!(
            "DROP FUNCTION {}({})",
            table.function(),
            "integer, integer, text, text, bigint, text, integer, timestamptz, bigint, bigint, bigint"
        ))
        .unwrap();
    // The pooled session's call fails as undefined; it waits without it.
    handoff(false);
    handoff(false);
}

/// A function of that name that is not lockbox's (an operator's, or one
/// planted to grant without waiting) is never used; with the right to replace
/// it, `build()` restores lockbox's.
#[test]
fn an_impostor_function_is_never_called() {
    let table = Table::new();
    let (_first, _) = table.client(ms(30_000));
    let role = unique("wg_role").replace('-', "_");
    let mut db = admin();
    // An impostor that grants at once, owned by the admin: the lockbox role
    // below may use the table but not replace the function.
    db.batch_execute(&format!(
        "CREATE OR REPLACE FUNCTION {f}(integer, integer, text, text, bigint, text, integer, \
             timestamptz, bigint, bigint, bigint) \
         RETURNS TABLE(lockbox_got boolean, lockbox_token bigint, lockbox_waited_us bigint) \
         LANGUAGE plpgsql VOLATILE AS $x$ BEGIN RETURN QUERY SELECT true, 999999::bigint, 0::bigint; END $x$; \
         CREATE ROLE {role} LOGIN; \
         GRANT pg_signal_backend, pg_read_all_stats TO {role}; \
         GRANT USAGE ON SCHEMA {s} TO {role}; \
         GRANT SELECT, INSERT, UPDATE, DELETE ON {t} TO {role}; \
         GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA {s} TO {role};",
        f = table.function(),
        s = table.schema,
        t = table.name(),
    ))
    .unwrap();
    assert!(!table.function_is_lockbox());
    let as_role = |app: &str| {
        LockClient::builder(&url_with_app(&url_as_user(&role), app))
            .table(&table.name())
            .ttl(ms(30_000))
            .build()
            .unwrap()
    };
    let holder = as_role(&unique("wg-imp-h"));
    let w_app = unique("wg-imp-w");
    let waiter = as_role(&w_app);
    let name = unique("wg-impostor");
    let held = holder.try_lock(&name).unwrap().expect("free lock");
    thread::scope(|s| {
        let w = s.spawn(|| waiter.lock(&name).unwrap());
        let (query, _) = waiter_state(&w_app, &table.name());
        assert!(
            !query.contains("_wait_grant_v3"),
            "the impostor must not be called: {query}"
        );
        held.release().unwrap();
        let got = w.join().unwrap();
        assert_ne!(got.fencing_token(), 999_999, "granted by the impostor");
        got.release().unwrap();
    });
    drop((holder, waiter));
    // A build by a role allowed to replace it restores lockbox's function.
    let (_restorer, _) = table.client(ms(30_000));
    assert!(table.function_is_lockbox(), "build() restored the function");
    let _ = db.execute(
        "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity WHERE usename = $1",
        &[&role],
    );
    drop(table);
    let _ = db.batch_execute(&format!("DROP OWNED BY {role}; DROP ROLE IF EXISTS {role}"));
}
