//! Attack on "the grant's local start is `sent_at + waited_ms`" (guarantee
//! (c)): for every way a waiting acquire can be granted by the wait statement
//! itself, the holder's local deadline must pass while its lease is still live
//! on the server. The grantee's renewals are paused (so no renewal re-bases
//! the deadline); when `is_held()` turns false, the lease must still have time
//! left by the database clock (client and server share this machine's clock).
//!
//! One test, its own lease table, every client built before anything waits:
//! building a client while an acquire waits freezes the table (see
//! attack_wait_table_lock.rs), which would make this test fail for that reason.

use crate::common;

use std::thread;
use std::time::{Duration, Instant};

use common::proxy::Proxy;
use common::*;
use lockbox::{Lock, LockClient};

struct Table {
    schema: String,
}

impl Table {
    fn new() -> Table {
        let schema = unique("atk_dl").replace('-', "_");
        admin()
            .batch_execute(&format!("CREATE SCHEMA {schema}"))
            .unwrap();
        Table { schema }
    }

    fn client_at(&self, url: &str, ttl: Duration) -> LockClient {
        LockClient::builder(url)
            .table(&format!("{}.leases", self.schema))
            .ttl(ttl)
            .build()
            .unwrap()
    }

    fn client(&self, ttl: Duration) -> (LockClient, String) {
        let app = unique("atk-dl");
        (
            self.client_at(&url_with_app(database_url(), &app), ttl),
            app,
        )
    }

    /// Polls `lock` until it reports not held, then reads what its lease has
    /// left on the server (ms). Bounded by `limit`.
    fn server_left_when_locally_lost(&self, lock: &Lock, limit: Duration) -> f64 {
        let mut db = admin();
        let stmt = db
            .prepare(&format!(
                "SELECT (extract(epoch FROM expires_at) - extract(epoch FROM clock_timestamp()))::float8 * 1000 \
                 FROM {}.leases WHERE name = $1",
                self.schema
            ))
            .unwrap();
        let name = lock.name().to_owned();
        let end = Instant::now() + limit;
        while lock.is_held() {
            assert!(Instant::now() < end, "the lock stayed held past {limit:?}");
            thread::sleep(Duration::from_micros(200));
        }
        db.query_one(&stmt, &[&name]).unwrap().get(0)
    }

    fn check(&self, lock: &Lock, what: &str) {
        let left = self.server_left_when_locally_lost(lock, Duration::from_secs(10));
        assert!(
            left > 0.0,
            "{what}: the local deadline passed {:.1} ms after the lease ended on the server",
            -left
        );
        eprintln!("{what}: lease had {left:.1} ms left on the server at the local deadline");
    }

    fn hold_row(&self, name: &str) -> postgres::Client {
        let mut db = admin();
        db.batch_execute("BEGIN").unwrap();
        db.execute(
            &format!(
                "SELECT 1 FROM {}.leases WHERE name = $1 FOR UPDATE",
                self.schema
            ),
            &[&name],
        )
        .unwrap();
        db
    }
}

impl Drop for Table {
    fn drop(&mut self) {
        let _ = admin().batch_execute(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.schema));
    }
}

#[test]
fn every_wait_statement_grant_ends_its_local_deadline_before_the_lease() {
    let table = Table::new();
    let ttl = Duration::from_secs(1);
    let proxy = Proxy::to_test_server();
    let (a, _) = table.client(ttl);
    let (b, b_app) = table.client(ttl);
    let z = table.client_at(&proxy.app_url(&unique("atk-dl-z")), ttl);
    b.__pause_renewals(true);

    // 1. Hand-off: the client-timed first slice is cut short by the release.
    let name = unique("dl-handoff");
    let held = a.try_lock(&name).unwrap().unwrap();
    thread::scope(|s| {
        let w = s.spawn(|| b.lock_timeout(&name, Duration::from_secs(10)));
        assert!(eventually(Duration::from_secs(5), || is_waiting(&b_app)));
        thread::sleep(ms(250));
        held.release().unwrap();
        let got = w.join().unwrap().unwrap();
        table.check(&got, "hand-off");
    });

    // 2. Many slices (the holder renews for 3 s), the last server-timed.
    let name = unique("dl-slices");
    let held = a.try_lock(&name).unwrap().unwrap();
    thread::scope(|s| {
        let w = s.spawn(|| b.lock_timeout(&name, Duration::from_secs(10)));
        assert!(eventually(Duration::from_secs(5), || is_waiting(&b_app)));
        thread::sleep(ms(3000));
        held.release().unwrap();
        let got = w.join().unwrap().unwrap();
        table.check(&got, "many slices");
    });

    // 3. The key comes while an operator holds the lease row FOR UPDATE: the
    //    holder's release blocks on the row (and frees the key only after it),
    //    so hold the row across the waiter's key grant instead: the waiter
    //    gets the key from a holder whose session is terminated.
    let name = unique("dl-row");
    let held = a.try_lock(&name).unwrap().unwrap();
    let holder_pid: i32 = admin()
        .query_one(
            &format!(
                "SELECT holder_pid FROM {}.leases WHERE name = $1",
                table.schema
            ),
            &[&name],
        )
        .unwrap()
        .get(0);
    thread::scope(|s| {
        let w = s.spawn(|| b.lock_timeout(&name, Duration::from_secs(10)));
        assert!(eventually(Duration::from_secs(5), || is_waiting(&b_app)));
        // Mark the lease released by hand (as a release would), hold the row,
        // then end the holder's session: the waiter gets the key and its
        // INSERT waits for the row.
        admin()
            .execute(
                &format!(
                    "UPDATE {}.leases SET released_at = clock_timestamp() WHERE name = $1",
                    table.schema
                ),
                &[&name],
            )
            .unwrap();
        let mut row = table.hold_row(&name);
        terminate(holder_pid);
        assert!(
            eventually(Duration::from_secs(2), || {
                admin()
                    .query_one(
                        "SELECT count(*) > 0 FROM pg_stat_activity WHERE application_name = $1 \
                         AND wait_event_type = 'Lock' AND wait_event IN ('transactionid', 'tuple')",
                        &[&b_app],
                    )
                    .unwrap()
                    .get(0)
            }),
            "the waiter's grant never waited for the held row"
        );
        thread::sleep(ms(500));
        row.batch_execute("ROLLBACK").unwrap();
        let got = w.join().unwrap().unwrap();
        table.check(&got, "row held");
    });
    drop(held);

    // 4. Zombie takeover: the holder is cut off behind a paused proxy.
    let name = unique("dl-zombie");
    let zl = z.try_lock(&name).unwrap().unwrap();
    proxy.pause();
    let got = b.lock_timeout(&name, Duration::from_secs(10)).unwrap();
    table.check(&got, "zombie takeover");
    proxy.resume();
    proxy.cut();
    drop(zl);
}
