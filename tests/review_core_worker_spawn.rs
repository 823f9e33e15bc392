//! Attack on "spawn failure puts the job in a backlog": a renewal job whose
//! worker cannot be started waits for "the next worker to finish a job". With
//! no worker running, none ever does; and the lock's renewal stays claimed (in
//! flight), so the scheduler never dispatches it again. A transient failure
//! to start a thread (address space, thread limits, a fork storm) then loses a
//! lock that could have been renewed a moment later.
//!
//! The failure is made real with RLIMIT_AS (a 2 MiB thread stack no longer
//! fits) for 300 ms around the lock's first renewal, then lifted. This binary
//! holds only this test, so the limit touches nothing else.

use std::time::Duration;

use lockbox::{LockClient, MemoryBackend};

fn vm_size_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with("VmSize:"))
        .unwrap()
        .to_owned();
    let kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kb * 1024
}

fn io_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|e| std::fs::read_to_string(e.unwrap().path().join("comm")).ok())
        .filter(|c| c.starts_with("lockbox-io"))
        .count()
}

#[test]
fn a_transient_thread_spawn_failure_does_not_lose_a_lock_for_good() {
    let ttl = Duration::from_secs(1);
    let client = LockClient::with_backend(MemoryBackend::new())
        .ttl(ttl)
        .build()
        .unwrap();
    let lock = client.try_lock("spawn-fail").unwrap().unwrap();
    assert_eq!(
        io_threads(),
        0,
        "no worker yet: the first renewal starts one"
    );
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    unsafe { assert_eq!(libc::getrlimit(libc::RLIMIT_AS, &mut old), 0) };
    let tight = libc::rlimit {
        rlim_cur: vm_size_bytes() + 512 * 1024,
        rlim_max: old.rlim_max,
    };
    // From 200 ms to 500 ms after the grant: the first renewal (at a third of
    // the TTL) cannot start a worker.
    std::thread::sleep(Duration::from_millis(200));
    unsafe { assert_eq!(libc::setrlimit(libc::RLIMIT_AS, &tight), 0) };
    std::thread::sleep(Duration::from_millis(300));
    let workers_during = io_threads();
    unsafe { assert_eq!(libc::setrlimit(libc::RLIMIT_AS, &old), 0) };
    // Threads can be started again; the lock has ~500 ms left before its
    // deadline, and the next renewals are due every third of a TTL.
    let lost = lock.lost().recv_timeout(ttl * 2);
    let metrics = client.metrics();
    assert_eq!(
        workers_during, 0,
        "the limit did not stop the worker's start"
    );
    assert!(
        lost.is_err() && lock.is_held(),
        "the lock was lost ({lost:?}) after one failed worker start, though threads could \
         be started again 500 ms before its deadline: renewals ok = {}, failed = {}, \
         workers now = {}",
        metrics.renewals_ok,
        metrics.renewals_failed,
        io_threads()
    );
}
