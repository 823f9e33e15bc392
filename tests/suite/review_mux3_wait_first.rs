//! Review of multiplexed sessions (third round): when every shared session's
//! connection is busy at the first pass and the pool is full,
//! `acquire_shared` waits the whole pool timeout on the *first* candidate
//! only (the one holding the fewest locks), and returns `PoolTimeout` when it
//! stays busy, although another candidate's connection is free most of that
//! time. The crate docs say a stuck statement on a shared session ("a hung
//! backend, a frozen network path") holds up only its worker; here it makes
//! every new try that reaches the wait fail with `PoolTimeout`.
//!
//! S1 (one lock) has its backend stopped (SIGSTOP) so its renewal hangs; S2
//! (one lock) is busy in 20 ms slices with a release waiting for its lease
//! row, handing the connection over between slices. A try of a free name
//! finds both busy, waits on S1, and times out.

use crate::common;

use std::thread;
use std::time::Instant;

use common::*;
use lockbox::{AcquireOptions, Error};

const TABLE: &str = "review_mux3.leases";

fn pid_holding(name: &str) -> i32 {
    admin()
        .query_one(
            &format!("SELECT holder_pid FROM {TABLE} WHERE name = $1 AND released_at IS NULL"),
            &[&name],
        )
        .unwrap()
        .get(0)
}

#[test]
fn a_try_does_not_time_out_on_one_stuck_shared_session_while_another_is_free() {
    admin()
        .batch_execute("CREATE SCHEMA IF NOT EXISTS review_mux3")
        .unwrap();
    let ttl = ms(10_000);
    let app = unique("mux3");
    let a_client = builder_for(&app)
        .table(TABLE)
        .ttl(ttl)
        .renew_interval(ms(200))
        .pool_size(2)
        .locks_per_session(10)
        .pool_timeout(ms(2000))
        .build()
        .unwrap();
    let b_client = builder_for(&unique("mux3b"))
        .table(TABLE)
        .ttl(ttl)
        .build()
        .unwrap();

    let (a_name, w_name, z_name) = (unique("a"), unique("w"), unique("z"));
    let w_other = b_client
        .acquire(&w_name, &AcquireOptions::new())
        .unwrap()
        .unwrap();
    let a = a_client
        .acquire(&a_name, &AcquireOptions::new())
        .unwrap()
        .unwrap();
    // w waits on a session of its own, which becomes the second shared one.
    let waiter = {
        let c = a_client.clone();
        let w = w_name.clone();
        thread::spawn(move || c.acquire(&w, &AcquireOptions::new().wait(ms(8000))))
    };
    thread::sleep(ms(500));
    w_other.release().unwrap();
    let w = waiter
        .join()
        .unwrap()
        .unwrap()
        .expect("w granted after its release");
    let (p1, p2) = (pid_holding(&a_name), pid_holding(&w_name));
    assert_ne!(p1, p2, "two shared sessions");
    // A second lock on each session (the one holding the fewest is joined
    // first, the older on a tie), so that w's release below is not S2's last:
    // a session whose last lock is being released takes no new one.
    let (b2_name, v_name) = (unique("b2"), unique("v"));
    let b2 = a_client
        .acquire(&b2_name, &AcquireOptions::new())
        .unwrap()
        .unwrap();
    let v = a_client
        .acquire(&v_name, &AcquireOptions::new())
        .unwrap()
        .unwrap();
    assert_eq!(pid_holding(&b2_name), p1);
    assert_eq!(pid_holding(&v_name), p2);

    // S1's backend hangs: its next renewal holds its connection.
    let stopped = Stopped::new(p1);
    thread::sleep(ms(600));

    // S2's connection is busy in slices: w's release waits for its row.
    let mut op = admin();
    op.batch_execute(&format!(
        "BEGIN; SELECT 1 FROM {TABLE} WHERE name = '{w_name}' FOR UPDATE"
    ))
    .unwrap();
    let releasing = thread::spawn(move || w.release());
    thread::sleep(ms(200));

    let t0 = Instant::now();
    let got = a_client.acquire(&z_name, &AcquireOptions::new());
    let took = t0.elapsed();
    op.batch_execute("ROLLBACK").unwrap();
    let _ = releasing.join();
    drop(stopped);
    drop((a, b2, v));
    assert!(
        !matches!(got, Err(Error::PoolTimeout { .. })),
        "a try of a free name failed with PoolTimeout after {took:?} although shared \
         session S2 (pid {p2}) was free between its 20 ms slices: {got:?}"
    );
    assert!(
        matches!(got, Ok(Some(_))),
        "a try of a free name was not granted ({took:?}): {got:?}"
    );
}
