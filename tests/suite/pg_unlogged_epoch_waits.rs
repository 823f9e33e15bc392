//! An unlogged lease table's grants that pass the bounds raise them in the
//! epoch row after writing the lease, and `lock_timeout` bounds each wait
//! for that row, not their sum: operator transactions taking turns on
//! `<table>_epoch` (each holding it `FOR SHARE` for less than the wait
//! allowed) could hold such a grant past its lease's end. It then committed
//! anyway, writing a lease that had already ended: the try failed with
//! `LockLost` while the history kept a `granted` event, and a waiter was
//! handed the ended lease. Such a grant is now undone once the raise has
//! run. Seen failing before the fix (both grant tests). A renewal held
//! there the same way is cancelled at its lock's deadline, before its lease
//! ends, and so cannot revive it: the last test checks that (it passed
//! before the fix too).

use crate::common;

use std::thread;
use std::time::{Duration, Instant};

use common::*;
use lockbox::LockClient;

/// `n` operator transactions, each holding `table`'s epoch row `FOR SHARE`
/// (which a raise, an `UPDATE`, waits for).
fn epoch_lockers(table: &str, n: usize) -> Vec<postgres::Client> {
    (0..n)
        .map(|_| {
            let mut op = admin();
            op.batch_execute(&format!(
                "BEGIN; SELECT 1 FROM {table}_epoch WHERE id = 1 FOR SHARE"
            ))
            .unwrap();
            op
        })
        .collect()
}

/// The lockers `ops` let go, one every 400 ms (each within the 500 ms a 2 s
/// TTL allows a wait, all together past the TTL).
fn let_go_in_turn(ops: Vec<postgres::Client>) {
    for mut op in ops {
        thread::sleep(Duration::from_millis(400));
        op.batch_execute("COMMIT").unwrap();
    }
}

/// A client of unlogged lease table `table` (with a history), TTL `ttl`.
fn client(table: &str, app: &str, ttl: Duration) -> LockClient {
    builder_for(app)
        .table(table)
        .unlogged_leases(true)
        .history(true)
        .ttl(ttl)
        .build()
        .unwrap()
}

/// A new unlogged table whose longest TTL so far is 1 s (a client of that
/// TTL granted on it), and that client.
fn table_of_short_leases() -> (String, LockClient) {
    let table = unique("epochwait").replace('-', "_");
    let short = client(&table, &unique("epochwait-a"), Duration::from_secs(1));
    warm(&short);
    (table, short)
}

/// The `granted` events the history holds for `name`.
fn granted_events(table: &str, name: &str) -> i64 {
    admin()
        .query_one(
            &format!("SELECT count(*) FROM {table}_history WHERE name = $1 AND event = 'granted'"),
            &[&name],
        )
        .unwrap()
        .get(0)
}

/// A try with a TTL longer than any before must raise the bounds; eight
/// lockers of the epoch row hold its raise for 3.2 s, past its 2 s TTL. It
/// is not acquired, and leaves no lease, no history event and no key held.
#[test]
fn a_raising_try_held_past_its_ttl_by_the_epoch_row_grants_nothing() {
    let (table, short) = table_of_short_leases();
    let app = unique("epochwait-b");
    let long = client(&table, &app, Duration::from_secs(2));
    let name = unique("epochwait");
    let ops = epoch_lockers(&table, 8);
    let sent = Instant::now();
    let trying = {
        let name = name.clone();
        thread::spawn(move || long.try_lock(&name).map(|got| got.is_some()))
    };
    assert!(
        eventually(Duration::from_secs(2), || pids_of(&app)
            .into_iter()
            .any(blocked_on_lock)),
        "the try waits for the epoch row"
    );
    let_go_in_turn(ops);
    let got = trying.join().unwrap();
    assert!(sent.elapsed() > Duration::from_secs(2), "held past its TTL");
    assert!(
        !got.expect("not acquired, not an error"),
        "a grant whose lease ended while it raised the bounds grants nothing"
    );
    assert_eq!(lease_rows(&table, &name), 0, "no lease was written");
    assert_eq!(granted_events(&table, &name), 0, "no grant was recorded");
    short
        .try_lock(&name)
        .unwrap()
        .expect("the key was left free")
        .release()
        .unwrap();
}

/// The same for a waiter granted by the wait-and-grant function: its grant
/// is held past its TTL by the raise, and it is not handed that ended
/// lease; it is granted afresh, within its time, a lease that is live.
#[test]
fn a_waiter_whose_raise_is_held_past_its_ttl_is_granted_afresh() {
    let (table, short) = table_of_short_leases();
    let long = client(&table, &unique("epochwait-b"), Duration::from_secs(2));
    let name = unique("epochwait");
    let held = short.try_lock(&name).unwrap().expect("a free name");
    let waiting = wait_in_function(long, &table, &name, Duration::from_secs(15), |got, _| {
        got.map(|l| (l.fencing_token(), l.is_held(), l.release()))
    });
    let ops = epoch_lockers(&table, 8);
    let first = held.fencing_token();
    held.release().unwrap();
    let_go_in_turn(ops);
    let (token, held_then, released) = waiting.join().unwrap().expect("granted afresh");
    assert!(held_then, "granted a lease that had ended");
    assert!(token > first);
    released.unwrap();
    assert_eq!(
        granted_events(&table, &name),
        2,
        "the first holder's grant and the waiter's, no more"
    );
}

/// An `extend` to a TTL longer than any before must raise the bounds; eight
/// lockers of the epoch row hold its raise past the lease's end. The lock
/// is lost at its deadline, and the lease stays ended: the renewal does not
/// bring it back for 30 s. On a session shared with another lock, which is
/// never cancelled (a session of its own has its stuck statement cancelled
/// at the deadline, which undoes it too).
#[test]
fn an_extend_held_past_the_lease_by_the_epoch_row_does_not_revive_it() {
    let (table, _short) = table_of_short_leases();
    let holder = builder_for(&unique("epochwait-h"))
        .table(&table)
        .unlogged_leases(true)
        .ttl(Duration::from_secs(1))
        .build()
        .unwrap();
    let (name, other) = (unique("epochwait"), unique("epochwait"));
    let neighbour = holder.try_lock(&other).unwrap().expect("a free name");
    let held = holder.try_lock(&name).unwrap().expect("a free name");
    let pid_of = |n: &str| -> i32 {
        admin()
            .query_one(
                &format!("SELECT holder_pid FROM {table} WHERE name = $1"),
                &[&n],
            )
            .unwrap()
            .get(0)
    };
    assert_eq!(pid_of(&name), pid_of(&other), "both on one session");
    let lost = held.lost();
    let ops = epoch_lockers(&table, 8);
    let extending = thread::spawn(move || {
        let res = held.extend(Duration::from_secs(30));
        (res, held)
    });
    assert!(
        lost.recv_timeout(Duration::from_secs(3)).is_ok(),
        "lost at its deadline"
    );
    let_go_in_turn(ops);
    let (res, held) = extending.join().unwrap();
    assert!(res.is_err(), "the extend did not succeed: {res:?}");
    assert!(!held.is_held());
    let live: bool = admin()
        .query_one(
            &format!(
                "SELECT expires_at > clock_timestamp() FROM {table} \
                 WHERE name = $1 AND token = $2"
            ),
            &[&name, &(held.fencing_token() as i64)],
        )
        .unwrap()
        .get(0);
    assert!(!live, "the lease lost at its deadline was revived");
    drop(neighbour);
}
