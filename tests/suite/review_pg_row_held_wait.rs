//! Attack on the wait-and-grant statement's row wait: the waiter gets the key
//! while an operator's transaction holds the lease row (its INSERT ... ON
//! CONFLICT waits for the row, bounded by `$9`, set before the slice began),
//! then 55P03, the `holds_key` path, `KeyWait::Held`, the upsert loop, and the
//! timeout. (e): no connection goes back to the pool holding the advisory
//! lock, the name is free for others once the operator commits, and the
//! timeout is kept within the row wait's bound.

use crate::common;

use std::thread;
use std::time::{Duration, Instant};

use common::*;
use lockbox::LockClient;

struct Table {
    schema: String,
}

impl Table {
    fn new() -> Table {
        let schema = unique("atk_rw").replace('-', "_");
        admin()
            .batch_execute(&format!("CREATE SCHEMA {schema}"))
            .unwrap();
        Table { schema }
    }

    fn client(&self, ttl: Duration) -> (LockClient, String) {
        let app = unique("atk-rw");
        let c = builder_for(&app)
            .table(&format!("{}.leases", self.schema))
            .ttl(ttl)
            .pool_size(1)
            .build()
            .unwrap();
        (c, app)
    }

    fn holder_pid(&self, name: &str) -> i32 {
        admin()
            .query_one(
                &format!(
                    "SELECT holder_pid FROM {}.leases WHERE name = $1",
                    self.schema
                ),
                &[&name],
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

fn key_behind_a_held_row(max_over: Duration) {
    let table = Table::new();
    let ttl = Duration::from_secs(1);
    let (h, _) = table.client(ttl);
    let (w, w_app) = table.client(ttl);
    let (other, _) = table.client(ttl);
    let name = unique("rw");
    let held = h.try_lock(&name).unwrap().unwrap();
    let timeout = Duration::from_secs(2);
    thread::scope(|s| {
        let waiter = s.spawn(|| {
            let t = Instant::now();
            let r = w.lock_timeout(&name, timeout);
            (r.map(|l| l.fencing_token()), t.elapsed())
        });
        assert!(eventually(Duration::from_secs(5), || is_waiting(&w_app)));
        thread::sleep(ms(1400));
        // The operator releases the lease by hand in a transaction left open
        // (row locked), and the holder's session ends: the waiter gets the key
        // 1.4 s into its 2 s wait and its grant waits for the row.
        let mut op = admin();
        op.batch_execute("BEGIN").unwrap();
        op.execute(
            &format!(
                "UPDATE {}.leases SET released_at = clock_timestamp() WHERE name = $1",
                table.schema
            ),
            &[&name],
        )
        .unwrap();
        terminate(table.holder_pid(&name));
        let (got, took) = waiter.join().unwrap();
        let locks_after = advisory_locks_of(&w_app);
        let over = took.saturating_sub(timeout);
        eprintln!("waiter: {got:?} after {took:?} ({over:?} over its timeout)");
        // The name is still the operator's to decide: nobody may have it.
        assert!(got.is_err(), "granted while the row was held: {got:?}");
        assert_eq!(
            locks_after, 0,
            "the timed-out waiter's pooled session still holds the advisory lock"
        );
        assert!(
            over < max_over,
            "lock_timeout({timeout:?}) returned {over:?} past its timeout: the grant's row \
             wait was bounded by what was left when the slice was *sent*, not when the key \
             came"
        );
        op.batch_execute("COMMIT").unwrap();
        // Released and free: the waiter's pooled connection (pool of one) is
        // reused, and another client gets the name at once.
        let again = other.try_lock(&name).unwrap();
        assert!(
            again.is_some(),
            "the name stayed blocked after the operator committed"
        );
        let t2 = w.lock_timeout(&unique("rw-next"), Duration::from_secs(1));
        assert!(
            t2.is_ok(),
            "the waiter's pooled connection is unusable: {t2:?}"
        );
    });
    drop(held);
}

/// (e) and boundedness: nothing leaks, the name is free after the commit, the
/// timeout is kept within the row wait's own bound (1 s).
#[test]
fn a_waiter_that_gets_the_key_behind_a_held_row_leaks_nothing() {
    key_behind_a_held_row(Duration::from_millis(1100));
}

/// The timeout itself: the key comes 1.4 s into a 2 s wait, the row is held;
/// the wait must end at about 2 s (478781a: 1 ms over), not up to a second
/// later.
#[test]
fn lock_timeout_is_kept_when_the_key_comes_behind_a_held_row() {
    key_behind_a_held_row(Duration::from_millis(100));
}
