//! Advisory keys: 64-bit, out of reach of lockbox's internal keys, and correct
//! waiting and takeover when two names share one; the session identity stored
//! with a lease survives hostile date settings.

use crate::common;

use std::collections::HashSet;
use std::thread;
use std::time::Duration;

use common::*;
use lockbox::LockClient;

/// Under lockbox 0.1's 32-bit scheme these names hashed onto the key `build()`
/// takes to create the table and onto the session-keeping probe's key: holding
/// them blocked every other process's `build()`.
#[test]
fn names_never_reach_the_internal_keys() {
    let (holder, _) = client(ms(5000));
    let locks: Vec<_> = ["jobs/f1VCAo", "jobs/dlesMt"]
        .into_iter()
        .map(|base| {
            // The exact names, so that they hash as the issue found; taken only
            // if free (a concurrent run may hold them too, which is fine).
            holder.lock_timeout(base, ms(5000)).unwrap()
        })
        .collect();
    let (tx, rx) = crossbeam_channel::bounded(1);
    thread::spawn(move || {
        let built = LockClient::builder(database_url()).build();
        let healthy = built.as_ref().map(|c| c.health().is_healthy());
        let _ = tx.send(healthy.map_err(|e| e.to_string()));
    });
    let healthy = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("build() blocked behind a held lock");
    assert_eq!(healthy, Ok(true));
    for lock in locks {
        lock.release().unwrap();
    }
}

/// Every name on one key (a key of its own per test, so that tests running at
/// once do not meet).
fn key_one(_: &str) -> i64 {
    0x1234_5678_0000_0007
}

fn key_two(_: &str) -> i64 {
    0x1234_5678_0000_0008
}

fn colliding(app: &str, key_fn: fn(&str) -> i64) -> LockClient {
    builder_for(app)
        .ttl(ms(2000))
        .__advisory_key_fn(key_fn)
        .build()
        .unwrap()
}

/// A zombie holding *another* name on the same key (its lease expired, its
/// session still holding the key) is terminated by a waiter for this name.
#[test]
fn a_zombie_on_a_shared_key_is_taken_over() {
    let (a, b) = (unique("zkey-a"), unique("zkey-b"));
    let mut zombie = admin();
    let (k1, k2) = ((key_one("") >> 32) as i32, key_one("") as i32);
    zombie
        .execute("SELECT pg_advisory_lock($1, $2)", &[&k1, &k2])
        .unwrap();
    fake_lease(&a, 3, -10, pid_of(&mut zombie));

    let client = colliding(&unique("zkey"), key_one);
    let lock = client
        .lock_timeout(&b, Duration::from_secs(5))
        .expect("the zombie holding a's key was taken over");
    assert!(
        zombie.simple_query("SELECT 1").is_err(),
        "the zombie session survived"
    );
    assert_eq!(client.metrics().zombie_terminations, 1);
    lock.release().unwrap();
}

/// While a live holder of another name on the same key holds it, a waiter for
/// this name (which has an expired lease of its own, from a dead session) stays
/// in server-side waits: after its first, its slices follow the key holder's
/// lease, not its own name's expired one (which made them 1 ms: polling).
#[test]
fn a_waiter_on_a_shared_key_does_not_poll() {
    let (a, b) = (unique("poll-a"), unique("poll-b"));
    let mut gone = admin();
    fake_lease(&b, 9, -10, pid_of(&mut gone));
    drop(gone);
    let holder = colliding(&unique("poll-h"), key_two);
    let waiter_app = unique("poll-w");
    let waiter = colliding(&waiter_app, key_two);
    let held = holder.try_lock(&a).unwrap().unwrap();
    thread::scope(|s| {
        let w = s.spawn(|| waiter.lock_timeout(&b, Duration::from_secs(10)));
        assert!(eventually(Duration::from_secs(5), || is_waiting(
            &waiter_app
        )));
        // Every statement the waiter starts shows as a new query_start.
        let mut db = admin();
        let mut starts = HashSet::new();
        let end = std::time::Instant::now() + ms(400);
        while std::time::Instant::now() < end {
            let start: Option<f64> = db
                .query_one(
                    "SELECT extract(epoch FROM query_start)::float8 FROM pg_stat_activity \
                     WHERE application_name = $1",
                    &[&waiter_app],
                )
                .unwrap()
                .get(0);
            starts.insert(start.map(f64::to_bits));
            thread::sleep(ms(5));
        }
        // Its first slice (100 ms at most) may end in the window: a look
        // at the key, a probe, the next slice's length and its wait are four
        // statements more. Polling in 1 ms slices would show dozens.
        assert!(
            starts.len() <= 6,
            "the waiter ran {} statements in 400 ms: it polls",
            starts.len()
        );
        held.release().unwrap();
        let lock = w.join().unwrap().expect("granted on a's release");
        assert_eq!(lock.fencing_token(), 10);
        lock.release().unwrap();
    });
}

/// The lease stores the holder's session start bound as a timestamp, so a
/// session whose `DateStyle`/`TimeZone` print it ambiguously (`IST`, read back
/// as Israel time) is still recognised as a zombie and taken over.
#[test]
fn a_zombie_with_hostile_date_settings_is_taken_over() {
    let name = unique("datestyle");
    let url = format!(
        "{} options='-c DateStyle=SQL,DMY -c TimeZone=Asia/Kolkata'",
        url_with_app(&url_as_user(&server_parts().user), &unique("ist"))
    );
    let hostile = LockClient::builder(&url).ttl(ms(600)).build().unwrap();
    let lock = hostile.try_lock(&name).unwrap().unwrap();
    let pid = holder_pid(&name);
    // Frozen: it keeps its session (and advisory lock) but stops renewing.
    hostile.__pause_renewals(true);
    let (other, _) = client(ms(1000));
    let taken = other
        .lock_timeout(&name, Duration::from_secs(5))
        .expect("the expired holder was not recognised as a zombie");
    assert_eq!(taken.fencing_token(), lock.fencing_token() + 1);
    let alive: i64 = admin()
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = $1",
            &[&pid],
        )
        .unwrap()
        .get(0);
    assert_eq!(alive, 0, "the zombie session was not terminated");
    taken.release().unwrap();
}
