//! Review: clients built and dropped over and over leave no threads behind, so
//! a process that builds a client per job (or per test) does not pile them up.

mod common;

use common::*;

#[derive(Debug)]
struct Nop;
impl lockbox::HandleEvent for Nop {}

/// The number of this process's threads, as the kernel counts them.
fn thread_count() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("Threads:")).unwrap();
    line["Threads:".len()..].trim().parse().unwrap()
}

/// The names of this process's threads. A thread's name can fail to read
/// while `/proc/self/task` still lists it: CI saw the last client's
/// watchdog, as it ended, left out of one listing (six names, seven tasks)
/// and back in the next. So a listing counts only when it names as many
/// threads as the kernel counted before and after it.
fn threads() -> Vec<String> {
    loop {
        let before = thread_count();
        let names: Vec<String> = std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("comm")).ok())
            .map(|s| s.trim().to_owned())
            .collect();
        if names.len() == before && thread_count() == before {
            return names;
        }
    }
}

/// Whether a client's own threads are still there: lockbox's, but the
/// process-wide pool threads.
fn clients_threads_left(threads: &[String]) -> bool {
    threads
        .iter()
        .any(|t| t.starts_with("lockbox") && !t.starts_with("lockbox-pool"))
}

/// Twenty PostgreSQL clients, each with an event handler, two locks renewed by
/// workers, dropped in both orders (client before its last lock and after).
/// Every thread they started must be gone within a few seconds: lockbox's own
/// (scheduler, I/O workers, event thread) and the pool's. The pool's are not:
/// r2d2's scheduled thread pool completes its pending jobs on drop, and its
/// connection reaper is a job scheduled every 30 s, so each dropped client
/// left three `r2d2-worker` threads for up to 30 s. All pools now share the
/// process-wide `lockbox-pool-N` threads (four, started by the first client).
#[test]
fn clients_built_and_dropped_leave_no_threads() {
    // The first client starts the process-wide pool threads. Threads lockbox
    // does not join end on their own soon after a drop: the count to come
    // back to is taken once no client's thread is left.
    drop(builder_for(&unique("threads")).build().unwrap());
    let first_gone = eventually(ms(5000), || !clients_threads_left(&threads()));
    assert!(first_gone, "the first client's threads: {:?}", threads());
    let base = threads().len();
    for _ in 0..20 {
        let client = builder_for(&unique("threads"))
            // Renewed every 200 ms: workers are started, yet a stalled commit
            // (seen after large builds flush to disk) loses nothing.
            .ttl(ms(600))
            .event_handler(Nop)
            .build()
            .unwrap();
        let a = client.try_lock(&unique("t")).unwrap().unwrap();
        let b = client.try_lock(&unique("t")).unwrap().unwrap();
        let renewed = eventually(ms(2000), || client.metrics().renewals_ok >= 2);
        assert!(renewed, "{:?} {}", client.metrics(), client.health());
        drop(a);
        drop(client);
        drop(b);
    }
    let settled = eventually(ms(5000), || {
        let now = threads();
        now.len() <= base && !clients_threads_left(&now)
    });
    let left = threads();
    assert!(
        !clients_threads_left(&left),
        "lockbox threads left: {left:?}"
    );
    assert!(
        left.iter()
            .filter(|t| t.starts_with("lockbox-pool"))
            .count()
            <= 4
    );
    assert!(
        settled,
        "{} threads 5 s after dropping every client, {base} before: {left:?}",
        left.len()
    );
}
