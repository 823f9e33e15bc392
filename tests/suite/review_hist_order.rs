//! Careless reader (history): `history(name, limit)` ordered events by `at`
//! alone. Two events of one name can carry the same microsecond (the
//! `expired` and `granted` rows a takeover writes in one statement, each at
//! its own `clock_timestamp()`; a release and the next grant on a fast
//! machine), and their order was then whatever the index scan gave: a grant
//! listed after its own release, and `limit` cutting off the wrong one.

use crate::common;

use common::*;
use lockbox::{LeaseEventKind, LockClient};

#[test]
fn events_of_one_instant_are_listed_newest_first() {
    let table = unique("hist_order").replace('-', "_");
    let client = LockClient::builder(database_url())
        .table(&table)
        .history(true)
        .build()
        .unwrap();
    let name = unique("hist-order");
    // One instant: token 5 granted, released; token 6 granted. Written in
    // the order they happened, as lockbox writes them.
    admin()
        .execute(
            &format!(
                "INSERT INTO {table}_history (name, token, owner, event, at) VALUES \
                     ($1, 5, 'a', 'granted', '2030-01-01 00:00:00+00'), \
                     ($1, 5, 'a', 'released', '2030-01-01 00:00:00+00'), \
                     ($1, 6, 'b', 'granted', '2030-01-01 00:00:00+00')"
            ),
            &[&name],
        )
        .unwrap();
    let got: Vec<(LeaseEventKind, u64)> = client
        .history(&name, 10)
        .unwrap()
        .into_iter()
        .map(|e| (e.kind, e.fencing_token))
        .collect();
    drop(client);
    let _ = admin().batch_execute(&format!(
        "DROP TABLE IF EXISTS {table}, {table}_history CASCADE; \
         DROP FUNCTION IF EXISTS {table}_wait_grant_hist_v5(integer, integer, text, text, \
             bigint, text, integer, timestamp with time zone, bigint, bigint, bigint); \
         DROP FUNCTION IF EXISTS {table}_fence(text, bigint);"
    ));
    assert_eq!(
        got,
        vec![
            (LeaseEventKind::Granted, 6),
            (LeaseEventKind::Released, 5),
            (LeaseEventKind::Granted, 5),
        ]
    );
}
