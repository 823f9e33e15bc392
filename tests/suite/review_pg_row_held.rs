//! Hostile review: an operator's transaction holding a lease row (`SELECT … FOR
//! UPDATE`, an `UPDATE` left open in psql) or the table (`LOCK TABLE`, a
//! non-concurrent `CREATE INDEX`). Renewals and releases are bounded by their
//! limit, but the acquire statements run with `lock_timeout = 0` (pinned): an
//! acquire, even `try_lock`, blocks on the row for as long as that transaction
//! lasts, whatever its own timeout.

use crate::common;

use std::thread;
use std::time::Duration;

use common::*;

fn returns_within(limit: Duration, f: impl FnOnce() -> String + Send + 'static) -> Option<String> {
    let t = thread::spawn(f);
    if eventually(limit, || t.is_finished()) {
        Some(t.join().unwrap())
    } else {
        None
    }
}

#[test]
fn try_lock_and_lock_timeout_return_while_an_operator_holds_the_lease_row() {
    let (c, _) = client(ms(1000));
    let name = unique("row-held");
    c.try_lock(&name)
        .unwrap()
        .expect("a free lock")
        .release()
        .unwrap();
    let hold = RowHold::lease(&name);
    let try_res = {
        let c = c.clone();
        let name = name.clone();
        returns_within(Duration::from_secs(5), move || {
            format!(
                "{:?}",
                c.try_lock(&name).map(|l| l.map(|l| l.fencing_token()))
            )
        })
    };
    let wait_res = {
        let c = c.clone();
        let name = name.clone();
        returns_within(Duration::from_secs(5), move || {
            format!(
                "{:?}",
                c.lock_timeout(&name, ms(500)).map(|l| l.fencing_token())
            )
        })
    };
    hold.release();
    assert!(
        try_res.is_some(),
        "try_lock had not returned 5 s after it started, the row held by another transaction"
    );
    assert!(
        wait_res.is_some(),
        "lock_timeout(500ms) had not returned 5 s after it started, the row held by another \
         transaction"
    );
    // Not acquired (the row was not free), and said so plainly, not as an error.
    assert_eq!(try_res.as_deref(), Some("Ok(None)"));
    let wait_res = wait_res.unwrap();
    assert!(wait_res.starts_with("Err(Timeout"), "{wait_res}");
}
