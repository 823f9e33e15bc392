//! Grants are decided on what the lease table holds *after* a wait, and a waiter
//! waiting out a live lease never sleeps holding the advisory key.

use crate::common;

use std::thread;
use std::time::{Duration, Instant};

use common::*;
use lockbox::LockClient;

/// H holds the name with a 10-minute lease; W1 and W2 wait. H releases, W1 is
/// granted with a 1 s lease and its session dies. W2, woken on the key, must see
/// W1's lease (not H's old one, as its wait's snapshot had it) and be granted
/// when that ends, not sleep for ten minutes.
#[test]
fn a_waiter_woken_after_a_handover_reads_the_live_lease() {
    let name = unique("snapshot");
    let h = LockClient::builder(database_url())
        .ttl(Duration::from_secs(600))
        .build()
        .unwrap();
    let (w1, app1) = client(ms(1000));
    let (w2, app2) = client(ms(1000));
    let held = h.try_lock(&name).unwrap().unwrap();
    thread::scope(|s| {
        let first = s.spawn(|| w1.lock_timeout(&name, Duration::from_secs(10)));
        assert!(eventually(Duration::from_secs(5), || is_waiting(&app1)));
        let second = s.spawn(|| {
            let start = Instant::now();
            (
                w2.lock_timeout(&name, Duration::from_secs(10)),
                start.elapsed(),
            )
        });
        assert!(eventually(Duration::from_secs(5), || is_waiting(&app2)));
        held.release().unwrap();
        let w1_lock = first.join().unwrap().expect("W1 is first in line");
        // W1's session dies holding a live lease: W2 gets the key.
        terminate(holder_pid(&name));
        let (got, waited) = second.join().unwrap();
        let got = got.expect("W2 must be granted once W1's 1 s lease ends");
        assert_eq!(got.fencing_token(), w1_lock.fencing_token() + 1);
        assert!(waited < Duration::from_secs(5), "W2 waited {waited:?}");
        got.release().unwrap();
        drop(w1_lock);
    });
}

/// A waiter waiting out a live lease of a dead session (lock-delay) holds no
/// advisory lock while it sleeps: were its process to freeze, nobody would be
/// blocked behind it.
#[test]
fn lock_delay_sleeps_without_holding_the_key() {
    let name = unique("delay-nokey");
    let mut dead = admin();
    fake_lease(&name, 5, 2000, pid_of(&mut dead));
    drop(dead);
    let (w, app) = client(ms(1000));
    thread::scope(|s| {
        let waiter = s.spawn(|| w.lock_timeout(&name, Duration::from_secs(10)));
        // Its session has read the lease, freed the key and gone idle to sleep.
        let sleeping = eventually(Duration::from_secs(2), || {
            admin()
                .query_one(
                    "SELECT count(*) = 1 FROM pg_stat_activity WHERE application_name = $1 \
                     AND state = 'idle' AND query LIKE '%pg_advisory_unlock($1::int4, $2::int4)%'",
                    &[&app],
                )
                .unwrap()
                .get(0)
        });
        assert!(sleeping, "the waiter never went to sleep without the key");
        assert_eq!(advisory_locks_of(&app), 0, "it sleeps holding the key");
        assert!(!waiter.is_finished());
        let lock = waiter.join().unwrap().expect("granted when the lease ends");
        assert_eq!(lock.fencing_token(), 6);
        lock.release().unwrap();
    });
}

/// A review (helper-69) found the zombie probe judging the holder's leases
/// as its statement's snapshot had them, but by the clock as each row was
/// read: a renewal committed after the snapshot, the row read after the old
/// lease's end, and a live holder that had renewed in time was terminated
/// as a zombie. Here gdb stops the waiter's backend in its probe (at its
/// read of `pg_stat_activity`, after the snapshot, before the lease rows)
/// for longer than a TTL while the holder renews: the holder keeps its
/// lock, and the waiter times out. Seen failing before the fix (the holder
/// lost its lock, `SessionLost`, and the waiter was granted).
#[test]
fn the_zombie_probe_never_terminates_a_holder_that_renewed_meanwhile() {
    probe_stopped_while_the_holder_renews(&["break pg_stat_get_activity", "continue"]);
}

/// The first fix judged by `statement_timestamp()`, taken for a time before
/// the snapshot; a review of it (helper-71) found it is not: lockbox's
/// statements are prepared, a plain `SELECT`'s snapshot is taken at Bind,
/// and the statement's time is set again at Execute. Here gdb stops the
/// probe between the two (once `PortalStart`, which takes the snapshot,
/// has returned). Seen failing with `statement_timestamp()`; the probe now
/// judges by the transaction's start, before Bind.
#[test]
fn the_zombie_probe_judges_by_a_time_before_its_snapshot() {
    probe_stopped_while_the_holder_renews(&[
        // The probe's portal ("WITH z A…", its text's first eight bytes).
        "break PortalStart if *(long*)*(char**)&debug_query_string == 0x41207A2048544957",
        "continue",
        "finish",
    ]);
}

/// The holder (TTL 1.5 s) renews while the waiter's backend, as `stop` (gdb
/// commands) has it, sleeps 2 s in its zombie probe: the holder keeps its
/// lock, and the waiter times out.
fn probe_stopped_while_the_holder_renews(stop: &[&str]) {
    let name = unique("snapshot");
    let (a, _) = client(ms(1500));
    let (b, b_app) = client(ms(1500));
    let held = a.try_lock(&name).unwrap().expect("a free name");
    let a_pid = holder_pid(&name);
    thread::scope(|s| {
        let waiting = s.spawn(|| b.lock_timeout(&name, Duration::from_secs(6)));
        assert!(eventually(Duration::from_secs(5), || is_waiting(&b_app)));
        let b_pid: i32 = admin()
            .query_one(
                "SELECT pid FROM pg_stat_activity WHERE application_name = $1",
                &[&b_app],
            )
            .unwrap()
            .get(0);
        let renewed_before = renewed_at(&name);
        let mut gdb = std::process::Command::new("timeout");
        gdb.args(["20", "gdb", "-p", &b_pid.to_string(), "-batch"])
            // A cancel or a timer's signal must reach the backend as usual.
            .args(["-ex", "handle all nostop noprint pass"])
            .args(["-ex", "handle SIGINT nostop noprint pass"]);
        for command in stop {
            gdb.args(["-ex", command]);
        }
        let gdb = gdb
            .args(["-ex", "shell sleep 2", "-ex", "detach"])
            .output()
            .expect("gdb (Debian's package gdb) runs");
        let said = String::from_utf8_lossy(&gdb.stdout);
        assert!(said.contains("Breakpoint 1,"), "gdb: {gdb:?}");
        assert!(
            renewed_at(&name) > renewed_before + 1.0,
            "the holder renewed while the probe was stopped"
        );
        let got = waiting.join().unwrap();
        assert!(got.is_err(), "the waiter was granted: {got:?}");
    });
    assert_eq!(held.lost_reason(), None, "a live holder was terminated");
    assert_eq!(holder_pid(&name), a_pid);
    held.release().unwrap();
}

/// When `name`'s lease was last renewed (epoch seconds).
fn renewed_at(name: &str) -> f64 {
    admin()
        .query_one(
            "SELECT extract(epoch FROM renewed_at)::float8 FROM lockbox_leases WHERE name = $1",
            &[&name],
        )
        .unwrap()
        .get(0)
}
