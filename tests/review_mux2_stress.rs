//! Review of multiplexed sessions (second round): many threads acquiring,
//! releasing, dropping and extending locks on few shared sessions while an
//! operator cancels and terminates their backends. Checked: exclusion (a
//! grant while the name's previous holder still holds it), tokens increase,
//! and after everything is released and the client dropped: no session, no
//! advisory lock, no `lockbox-unlock` thread left.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Instant;

use common::history::Rng;
use common::*;
use lockbox::{AcquireOptions, Lock};

#[derive(Default)]
struct Book {
    holder: Option<Arc<Lock>>,
    last_token: u64,
}

fn stress(seed: u64, cancels: bool, terminates: bool, rows: bool) {
    // STRESS_SEED replays or varies a run.
    let seed = seed
        + std::env::var("STRESS_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
            * 10;
    eprintln!("seed {seed}");
    let app = unique("mux2-stress");
    let client = builder_for(&app)
        .ttl(ms(800))
        .pool_size(3)
        .locks_per_session(3)
        .build()
        .unwrap();
    let names: Vec<String> = (0..5).map(|i| unique(&format!("stress{i}"))).collect();
    let books: Arc<Mutex<HashMap<String, Book>>> = Arc::new(Mutex::new(HashMap::new()));
    let violations = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for w in 0..6u64 {
        let (client, names, books, violations, stop) = (
            client.clone(),
            names.clone(),
            books.clone(),
            violations.clone(),
            stop.clone(),
        );
        workers.push(thread::spawn(move || {
            let mut rng = Rng::new(seed * 31 + w);
            while !stop.load(Ordering::Relaxed) {
                let name = &names[rng.below(names.len() as u64) as usize];
                let opts = match rng.below(3) {
                    0 => AcquireOptions::new(),
                    1 => AcquireOptions::new().wait(ms(rng.below(200))),
                    _ => AcquireOptions::new().ttl(ms(400 + rng.below(2000))),
                };
                let lock = match client.acquire(name, &opts) {
                    Ok(Some(lock)) => Arc::new(lock),
                    _ => continue,
                };
                {
                    let mut books = books.lock().unwrap();
                    let book = books.entry(name.clone()).or_default();
                    if let Some(prev) = &book.holder
                        && prev.is_held()
                    {
                        violations.lock().unwrap().push(format!(
                            "{name}: granted token {} while token {} is held",
                            lock.fencing_token(),
                            prev.fencing_token()
                        ));
                    }
                    if lock.fencing_token() <= book.last_token {
                        violations.lock().unwrap().push(format!(
                            "{name}: token {} after {}",
                            lock.fencing_token(),
                            book.last_token
                        ));
                    }
                    book.last_token = lock.fencing_token();
                    book.holder = Some(lock.clone());
                }
                thread::sleep(ms(rng.below(60)));
                if rng.below(3) == 0 {
                    let _ = lock.extend(ms(300 + rng.below(1500)));
                    thread::sleep(ms(rng.below(40)));
                }
                // Only the book and this thread hold it.
                let lock = {
                    let mut books = books.lock().unwrap();
                    let book = books.get_mut(name).unwrap();
                    if book.holder.as_ref().is_some_and(|h| Arc::ptr_eq(h, &lock)) {
                        book.holder = None;
                    }
                    Arc::try_unwrap(lock).ok().unwrap()
                };
                if rng.below(2) == 0 {
                    let _ = lock.release();
                } else {
                    drop(lock);
                }
            }
        }));
    }
    let operator = {
        let (app, stop, names) = (app.clone(), stop.clone(), names.clone());
        thread::spawn(move || {
            let mut rng = Rng::new(seed);
            let mut op = admin();
            while !stop.load(Ordering::Relaxed) {
                thread::sleep(ms(5 + rng.below(30)));
                if rows && rng.below(2) == 0 {
                    // An operator's transaction holding a lease row, or the
                    // whole table, for a moment.
                    let name = &names[rng.below(names.len() as u64) as usize];
                    op.batch_execute("BEGIN").unwrap();
                    if rng.below(4) == 0 {
                        op.batch_execute("LOCK TABLE lockbox_leases IN EXCLUSIVE MODE")
                            .unwrap();
                    } else {
                        op.execute(
                            "SELECT 1 FROM lockbox_leases WHERE name = $1 FOR UPDATE",
                            &[name],
                        )
                        .unwrap();
                    }
                    thread::sleep(ms(rng.below(150)));
                    op.batch_execute("ROLLBACK").unwrap();
                    continue;
                }
                let pids = pids_of(&app);
                if pids.is_empty() {
                    continue;
                }
                let pid = pids[rng.below(pids.len() as u64) as usize];
                if terminates && rng.below(15) == 0 {
                    op.execute("SELECT pg_terminate_backend($1)", &[&pid])
                        .unwrap();
                } else if cancels {
                    op.execute("SELECT pg_cancel_backend($1)", &[&pid]).unwrap();
                }
            }
        })
    };
    thread::sleep(ms(8000));
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    operator.join().unwrap();
    let violations = violations.lock().unwrap().clone();
    books.lock().unwrap().clear();
    // Every lock released or dropped, the client alive: the sessions left
    // (pooled, idle) hold no advisory lock.
    let pooled_clean = eventually(ms(8000), || {
        advisory_locks_of(&app) == 0 && threads_named("lockbox-unlock") == 0
    });
    let pooled_locks = advisory_locks_of(&app);
    drop(client);
    let started = Instant::now();
    let clean = eventually(ms(8000), || {
        sessions_of(&app) == 0
            && advisory_locks_of(&app) == 0
            && threads_named("lockbox-unlock") == 0
    });
    assert!(violations.is_empty(), "violations: {violations:#?}");
    assert!(
        pooled_clean,
        "with every lock gone and the client alive, its sessions hold {pooled_locks} advisory locks"
    );
    assert!(
        clean,
        "after {:?}: {} sessions, {} advisory locks, {} lockbox-unlock threads left",
        started.elapsed(),
        sessions_of(&app),
        advisory_locks_of(&app),
        threads_named("lockbox-unlock")
    );
}

#[test]
#[ignore = "review stress (about 8 s each); run with --ignored"]
fn stress_without_faults() {
    stress(1, false, false, false);
}

#[test]
#[ignore = "review stress (about 8 s each); run with --ignored"]
fn stress_with_cancels_and_terminations() {
    stress(2, true, true, false);
}

#[test]
#[ignore = "review stress (about 8 s each); run with --ignored"]
fn stress_with_row_and_table_locks() {
    stress(3, false, false, true);
}

#[test]
#[ignore = "review stress (about 8 s each); run with --ignored"]
fn stress_with_everything() {
    stress(4, true, true, true);
}
