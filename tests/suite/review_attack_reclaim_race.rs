//! Attack on "reclaiming moved to the release of one grant in 16, at most 32
//! rows, with synchronous_commit off": reclaiming releases race with acquires
//! of the very names being reclaimed (rows aged by hand past the retention the
//! moment they are released, so every reclaiming release finds them). Tokens
//! must strictly increase per name in grant order (b), and no two grants of a
//! name may overlap (a). Bounded: ~12 s of churn.

use crate::common;

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use lockbox::LockClient;

struct Table(String);

impl Table {
    fn new() -> Table {
        Table(format!(
            "{}_leases",
            unique("atk_reclaim").replace('-', "_")
        ))
    }

    fn client(&self) -> LockClient {
        LockClient::builder(database_url())
            .table(&self.0)
            .ttl(ms(2000))
            .pool_size(4)
            .build()
            .unwrap()
    }

    /// Moves every released lease of `names` two hours into the past.
    fn age(&self, db: &mut postgres::Client, names: &[String]) {
        db.execute(
            &format!(
                "UPDATE {} SET acquired_at = acquired_at - interval '2 hours', \
                     renewed_at = renewed_at - interval '2 hours', \
                     expires_at = expires_at - interval '2 hours', \
                     released_at = released_at - interval '2 hours' \
                 WHERE name = ANY($1) AND released_at > clock_timestamp() - interval '1 hour'",
                self.0
            ),
            &[&names],
        )
        .unwrap();
    }

    fn rows(&self) -> i64 {
        admin()
            .query_one(&format!("SELECT count(*) FROM {}", self.0), &[])
            .unwrap()
            .get(0)
    }
}

impl Drop for Table {
    fn drop(&mut self) {
        let _ = admin().batch_execute(&format!("DROP TABLE IF EXISTS {}", self.0));
    }
}

#[test]
fn reclaim_racing_acquires_of_the_reclaimed_names_never_repeats_a_token() {
    let table = Table::new();
    let names: Vec<String> = (0..12).map(|i| unique(&format!("r{i}"))).collect();
    let clients: Vec<LockClient> = (0..4).map(|_| table.client()).collect();
    let reclaimer = table.client();
    // Per-name counters run ahead of the sequence: several grants each.
    for name in &names {
        for _ in 0..3 {
            clients[0]
                .try_lock(name)
                .unwrap()
                .unwrap()
                .release()
                .unwrap();
        }
    }
    let log: Mutex<Vec<(String, u64)>> = Mutex::new(Vec::new());
    let in_use: Mutex<HashMap<String, u64>> = Mutex::new(HashMap::new());
    let overlaps = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let reclaims_seen = AtomicU64::new(0);
    let end = Instant::now() + Duration::from_secs(12);
    thread::scope(|s| {
        // Acquirers of the old names.
        for (i, c) in clients.iter().enumerate() {
            let (names, log, in_use, overlaps, stop) = (&names, &log, &in_use, &overlaps, &stop);
            s.spawn(move || {
                let mut n = i;
                while !stop.load(Ordering::Relaxed) {
                    n = (n * 7 + 3) % names.len();
                    let name = &names[n];
                    let Ok(lock) = c.lock_timeout(name, Duration::from_millis(300)) else {
                        continue;
                    };
                    let token = lock.fencing_token();
                    if let Some(other) = in_use.lock().unwrap().insert(name.clone(), token) {
                        overlaps.fetch_add(1, Ordering::Relaxed);
                        eprintln!("overlap on {name}: {other} and {token}");
                    }
                    log.lock().unwrap().push((name.clone(), token));
                    thread::sleep(Duration::from_micros(300));
                    in_use.lock().unwrap().remove(name);
                    let _ = lock.release();
                }
            });
        }
        // Ages the old names' rows as soon as they are released.
        {
            let (names, stop, table) = (&names, &stop, &table);
            s.spawn(move || {
                let mut db = admin();
                while !stop.load(Ordering::Relaxed) {
                    table.age(&mut db, names);
                    thread::sleep(Duration::from_millis(2));
                }
            });
        }
        // Releases that reclaim: one grant in 16 of this client.
        {
            let (stop, reclaims_seen, table) = (&stop, &reclaims_seen, &table);
            let reclaimer = &reclaimer;
            s.spawn(move || {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let before = table.rows();
                    reclaimer
                        .try_lock(&unique("fresh"))
                        .unwrap()
                        .unwrap()
                        .release()
                        .unwrap();
                    i += 1;
                    if i.is_multiple_of(16) && table.rows() < before {
                        reclaims_seen.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
        while Instant::now() < end {
            thread::sleep(Duration::from_millis(100));
        }
        stop.store(true, Ordering::Relaxed);
    });
    let log = log.into_inner().unwrap();
    let mut last: HashMap<&str, u64> = HashMap::new();
    let mut bad = Vec::new();
    let mut recreated = 0;
    for (name, token) in &log {
        if let Some(prev) = last.insert(name.as_str(), *token) {
            if *token <= prev {
                bad.push(format!("{name}: {prev} then {token}"));
            } else if *token > prev + 1 {
                // A row re-created from the sequence: the name was reclaimed.
                recreated += 1;
            }
        }
    }
    let deleted: i64 = admin()
        .query_one(
            "SELECT COALESCE(sum(n_tup_del), 0)::int8 FROM pg_stat_user_tables WHERE relname = $1",
            &[&table.0],
        )
        .unwrap()
        .get(0);
    eprintln!(
        "{} grants of {} old names; {recreated} of them re-created a reclaimed row; \
         {deleted} rows deleted in all; {} reclaiming releases shrank the table",
        log.len(),
        names.len(),
        reclaims_seen.load(Ordering::Relaxed)
    );
    assert!(
        recreated > 10,
        "the race was not exercised: {recreated} re-created rows"
    );
    assert!(
        log.len() > 100,
        "too few grants to mean anything: {}",
        log.len()
    );
    assert_eq!(overlaps.load(Ordering::Relaxed), 0, "two holders at once");
    assert!(bad.is_empty(), "tokens went back or repeated: {bad:?}");
}
