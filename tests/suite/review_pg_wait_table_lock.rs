//! Attack on "the waiting acquire is one statement that waits for the advisory
//! key AND grants": that statement is an `INSERT ... ON CONFLICT`, so from its
//! start, for its whole wait (a slice: up to a TTL, or with the client-timed
//! first slice whatever the name's lease has left), it holds `ROW EXCLUSIVE` on
//! the lease table. The wait statement it replaced only read the table
//! (`ACCESS SHARE`). `ROW EXCLUSIVE` conflicts with `SHARE`, which `CREATE
//! INDEX IF NOT EXISTS` takes even when the index exists, and lockbox's own
//! `build()` runs exactly that for the reclaim index. The builder's request
//! queues behind the waiter, and every later renewal, grant and release on the
//! table (all `ROW EXCLUSIVE`) queues behind the builder: starting one client
//! while any acquire waits freezes every lock of every client on the table,
//! and held locks are lost. (Any operator DDL taking SHARE or stronger does the
//! same.)

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
        let schema = unique("atk_tl").replace('-', "_");
        admin()
            .batch_execute(&format!("CREATE SCHEMA {schema}"))
            .unwrap();
        Table { schema }
    }

    fn client(&self, ttl: Duration) -> (LockClient, String) {
        let app = unique("atk-tl");
        let c = builder_for(&app)
            .table(&format!("{}.leases", self.schema))
            .ttl(ttl)
            .build()
            .unwrap();
        (c, app)
    }
}

impl Drop for Table {
    fn drop(&mut self) {
        let _ = admin().batch_execute(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.schema));
    }
}

/// H holds `busy` (TTL `h_ttl`, renewing); W waits for it (6 s). A holds an
/// unrelated name `other` with a 1 s TTL. A fourth client is then built on the
/// same table. H and A must keep their locks, and the build must not hang.
fn build_while_waiting(h_ttl: Duration) {
    let table = Table::new();
    let ttl = Duration::from_secs(1);
    let (h, _) = table.client(h_ttl);
    let (w, w_app) = table.client(ttl);
    let (a, _) = table.client(ttl);
    let busy = unique("busy");
    let other = unique("other");
    let held = h.try_lock(&busy).unwrap().unwrap();
    let kept = a.try_lock(&other).unwrap().unwrap();
    thread::scope(|s| {
        let waiter = s.spawn(|| w.lock_timeout(&busy, Duration::from_secs(6)));
        assert!(eventually(Duration::from_secs(5), || is_waiting(&w_app)));
        thread::sleep(ms(200));
        let build_started = Instant::now();
        let table = &table;
        let builder = s.spawn(move || {
            let c = table.client(ttl);
            (c, build_started.elapsed())
        });
        // Three TTLs of A: renewals of `other` every third of a TTL.
        let lost = kept.lost();
        let lost_at = lost
            .recv_timeout(ttl * 3)
            .ok()
            .map(|reason| (reason, build_started.elapsed()));
        let kept_held = kept.is_held();
        let busy_held = held.is_held();
        let ((_c, _), build_took) = builder.join().unwrap();
        let waited = waiter.join().unwrap();
        assert!(
            kept_held && lost_at.is_none() && busy_held,
            "building a client while an acquire waited: A's unrelated lock `other` \
             lost = {lost_at:?} (held now: {kept_held}); H's lock held: {busy_held}; the \
             build took {build_took:?}; the waiter got: {:?}",
            waited.as_ref().map(|l| l.fencing_token())
        );
        assert!(
            build_took < Duration::from_secs(2),
            "build() blocked {build_took:?} behind a waiting acquire"
        );
        drop(waited);
    });
    drop(held);
}

/// Everyone on a 1 s TTL: the waiter's slice ends with H's lease.
#[test]
fn building_a_client_while_an_acquire_waits_does_not_freeze_renewals() {
    build_while_waiting(Duration::from_secs(1));
}

/// H on a 20 s TTL: the waiter's first slice (timed from H's lease) is the
/// waiter's whole 6 s timeout, and the build and every renewal wait that long.
#[test]
fn building_a_client_while_an_acquire_waits_on_a_long_lease_does_not_freeze_renewals() {
    build_while_waiting(Duration::from_secs(20));
}
