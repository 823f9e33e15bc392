//! Review of shared leases on PostgreSQL: a permit's renewal that waited
//! for the name's row must judge its lease alive only once it holds the row.
//!
//! The renewal read its own permit (and judged it unexpired by
//! `clock_timestamp()`) in the scan, *before* it waited for the name's row
//! lock. A grant holding that row meanwhile could find the permit expired,
//! grant its place to another, and commit; the renewal then went on and
//! extended the expired permit: one more live permit than the semaphore has.
//! Each of the renewal's lock waits is bounded by the lock's time left, but a
//! renewal queued behind a queued grant waits twice (for the row's tuple lock,
//! then for the grant's transaction), and the second wait starts afresh; the
//! client cancels it at its deadline, but a holder cut off from the server
//! (here: a proxy that stops forwarding) or frozen sends no cancel that
//! arrives. The store's record must hold by itself.

use crate::common;

use std::thread;
use std::time::Duration;

use common::*;

fn live_permits(db: &mut postgres::Client, name: &str) -> i64 {
    db.query_one(
        "SELECT count(*) FROM lockbox_leases_shared WHERE name = $1 \
         AND released_at IS NULL AND expires_at > clock_timestamp()",
        &[&name],
    )
    .unwrap()
    .get(0)
}

fn ms_left(db: &mut postgres::Client, name: &str, token: u64) -> f64 {
    db.query_one(
        "SELECT ((extract(epoch FROM expires_at) - extract(epoch FROM clock_timestamp())) * 1000.0)::float8 \
         FROM lockbox_leases_shared WHERE name = $1 AND token = $2",
        &[&name, &(token as i64)],
    )
    .unwrap()
    .get::<_, f64>(0)
}

#[test]
fn a_renewal_queued_behind_a_grant_never_revives_an_expired_permit() {
    let name = unique("coord-renew-race");
    let proxy = common::proxy::Proxy::to_test_server();
    let a_app = unique("app");
    let a_client = lockbox::LockClient::builder(&proxy.app_url(&a_app))
        .ttl(ms(1500))
        .build()
        .unwrap();
    let (d_client, _) = client(ms(10_000));
    let sem_a = a_client.semaphore(&name, 2).unwrap();
    let p1 = sem_a.try_acquire().unwrap().expect("first permit");
    a_client.__pause_renewals(true);
    let p2 = d_client
        .semaphore(&name, 2)
        .unwrap()
        .try_acquire()
        .unwrap()
        .expect("second permit");

    let mut db = admin();
    // An ended permit (expired long ago) whose holder's fenced transaction
    // is still open: a grant waits for it (holding the name's row).
    db.execute(
        "INSERT INTO lockbox_leases_shared (name, token, owner, kind, permits, holder_pid, \
             holder_started, metadata, acquired_at, renewed_at, expires_at, released_at) \
         VALUES ($1, 1, 'host:1:gone', 'permit', 2, 0, clock_timestamp(), NULL, \
             clock_timestamp() - interval '1 minute', clock_timestamp() - interval '1 minute', \
             clock_timestamp() - interval '1 minute', NULL)",
        &[&name],
    )
    .unwrap();
    let mut fence_db = admin();
    let mut fenced = fence_db.transaction().unwrap();
    assert_eq!(
        fenced
            .query(
                "SELECT 1 FROM lockbox_leases_shared WHERE name = $1 AND token = 1 \
                 FOR KEY SHARE",
                &[&name],
            )
            .unwrap()
            .len(),
        1
    );
    // An operator's transaction on the name's row, for the queue to form.
    let mut row_db = admin();
    let mut row_tx = row_db.transaction().unwrap();
    row_tx
        .execute(
            "SELECT 1 FROM lockbox_leases WHERE name = $1 FOR NO KEY UPDATE",
            &[&name],
        )
        .unwrap();

    // First in the queue: a grant, which needs the first permit gone.
    let (b_client, b_app) = client(ms(8000));
    let granter = {
        let name = name.clone();
        thread::spawn(move || {
            let sem = b_client.semaphore(&name, 2).unwrap();
            sem.acquire_timeout(Duration::from_secs(10))
                .ok()
                .map(|p| (p.fencing_token(), p))
        })
    };
    assert!(
        eventually(Duration::from_secs(5), || pids_of(&b_app)
            .into_iter()
            .any(blocked_on_lock)),
        "the grant never queued for the row"
    );
    // Second: the first permit's renewal.
    let renewal = thread::spawn(move || {
        let result = p1.extend(ms(1500));
        (result, p1)
    });
    assert!(
        eventually(Duration::from_secs(5), || pids_of(&a_app)
            .into_iter()
            .any(blocked_on_lock)),
        "the renewal never queued for the row"
    );
    // The holder is cut off: its renewal runs on in the server, and no
    // cancel reaches it.
    proxy.pause();
    // Let the grant in well before the first permit's end; it then waits
    // for the fenced transaction, holding the row, past that end.
    let p1_token: u64 = db
        .query_one(
            "SELECT token FROM lockbox_leases_shared WHERE name = $1 AND owner = $2",
            &[&name, &a_client.owner_id()],
        )
        .unwrap()
        .get::<_, i64>(0) as u64;
    assert!(eventually(Duration::from_secs(5), || ms_left(
        &mut db, &name, p1_token
    ) < 600.0));
    row_tx.commit().unwrap();
    assert!(eventually(Duration::from_secs(5), || ms_left(
        &mut db, &name, p1_token
    ) < -20.0));
    fenced.commit().unwrap();

    let granted = granter.join().unwrap();
    // The renewal's statement has ended in the server (its session idle).
    assert!(
        eventually(Duration::from_secs(10), || {
            let pids = pids_of(&a_app);
            !pids.is_empty()
                && db
                    .query_one(
                        "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1) \
                         AND state <> 'idle'",
                        &[&pids],
                    )
                    .unwrap()
                    .get::<_, i64>(0)
                    == 0
        }),
        "the renewal never ended"
    );
    let live = live_permits(&mut db, &name);
    assert!(
        live <= 2,
        "{live} live permits of 2: the expired first permit was renewed after its place \
         was granted ({:?})",
        granted.as_ref().map(|g| g.0)
    );
    drop(granted);
    proxy.cut();
    let (_, p1) = renewal.join().unwrap();
    drop(p1);
    p2.release().unwrap();
    db.execute(
        "DELETE FROM lockbox_leases_shared WHERE name = $1 AND token = 1",
        &[&name],
    )
    .unwrap();
}
