//! Concurrent recoveries racing each other and the first grants after them:
//! the tables emptied as a crash empties them (sequence reset included), then
//! eight clients at once acquire; repeated. Every token of a round must be
//! above every token before it (per name and store-wide against the ceiling).
use crate::common;
use common::*;
use std::sync::{Arc, Barrier, Mutex};
use std::thread;

#[test]
fn racing_recoveries_never_repeat_a_token() {
    let table = unique("ulrace").replace('-', "_");
    let ttl = ms(150);
    let names = ["a", "b", "c"].map(unique);
    drop(
        builder_for(&unique("app"))
            .table(&table)
            .ttl(ttl)
            .unlogged_leases(true)
            .build()
            .unwrap(),
    );
    let mut db = admin();
    let mut highest = 0u64;
    for round in 0..8 {
        if round > 0 {
            db.batch_execute(&format!(
                "BEGIN; DELETE FROM {table}_alive; DELETE FROM {table}; \
                 SELECT setval(pg_get_serial_sequence('{table}', 'token'), 1, false); COMMIT"
            ))
            .unwrap();
        }
        let barrier = Arc::new(Barrier::new(8));
        let got = Arc::new(Mutex::new(Vec::new()));
        let hs: Vec<_> = (0..8)
            .map(|i| {
                let (barrier, got, table, name) = (
                    barrier.clone(),
                    got.clone(),
                    table.clone(),
                    names[i % 3].clone(),
                );
                thread::spawn(move || {
                    let c = builder_for(&unique("app"))
                        .table(&table)
                        .ttl(ttl)
                        .build()
                        .unwrap();
                    barrier.wait();
                    let g = c.lock_timeout(&name, ms(8000)).unwrap();
                    got.lock().unwrap().push((name.clone(), g.fencing_token()));
                    g.release().unwrap();
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        let mut pairs = got.lock().unwrap().clone();
        pairs.sort();
        let min = pairs.iter().map(|p| p.1).min().unwrap();
        assert!(
            min > highest,
            "round {round}: tokens {pairs:?} after {highest}"
        );
        let n = pairs.len();
        pairs.dedup();
        assert_eq!(pairs.len(), n, "round {round}: a name's token repeated");
        highest = pairs.iter().map(|p| p.1).max().unwrap();
    }
}
