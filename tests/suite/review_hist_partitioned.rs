//! Careful operator, broken by the history (pruning): an audit table is
//! naturally partitioned by time, and `build()` accepts a partitioned
//! `<table>_history`. Pruning deleted `WHERE ctid = ANY (ctids of old rows)`,
//! but a ctid is unique only within one partition: the old rows' ctids
//! matched fresh rows in the current partition, and each pruning deleted up
//! to 32 fresh events with the old ones.

use crate::common;

use std::time::Duration;

use common::*;
use lockbox::LockClient;

#[test]
fn pruning_a_partitioned_history_deletes_only_old_events() {
    let table = unique("hist_part").replace('-', "_");
    // The lease table first, then a partitioned history of lockbox's shape.
    drop(
        LockClient::builder(database_url())
            .table(&table)
            .build()
            .unwrap(),
    );
    admin()
        .batch_execute(&format!(
            "CREATE TABLE {table}_history (name text NOT NULL, token bigint NOT NULL, \
                 owner text NOT NULL, metadata text, event text NOT NULL, \
                 at timestamptz NOT NULL, holder_pid integer) PARTITION BY RANGE (at); \
             CREATE TABLE {table}_history_old PARTITION OF {table}_history \
                 FOR VALUES FROM (MINVALUE) TO ('2020-01-01'); \
             CREATE TABLE {table}_history_new PARTITION OF {table}_history \
                 FOR VALUES FROM ('2020-01-01') TO (MAXVALUE); \
             INSERT INTO {table}_history (name, token, owner, event, at) \
                 SELECT 'old-' || i, i, 'someone', 'granted', '2019-06-01' \
                 FROM generate_series(1, 40) i;"
        ))
        .unwrap();
    let client = LockClient::builder(database_url())
        .table(&table)
        .history(true)
        .history_retention(Duration::from_secs(60))
        .build()
        .unwrap();
    let name = unique("hist-part");
    // Sixteen cycles: the sixteenth release prunes.
    for _ in 0..16 {
        client.try_lock(&name).unwrap().unwrap().release().unwrap();
    }
    let fresh = client.history(&name, 1000).unwrap().len();
    let old: i64 = admin()
        .query_one(
            &format!("SELECT count(*) FROM {table}_history WHERE name LIKE 'old-%'"),
            &[],
        )
        .unwrap()
        .get(0);
    drop(client);
    let _ = admin().batch_execute(&format!(
        "DROP TABLE IF EXISTS {table}, {table}_history CASCADE; \
         DROP FUNCTION IF EXISTS {table}_wait_grant_hist_v2(integer, integer, text, text, \
             bigint, text, integer, timestamp with time zone, bigint, bigint, bigint); \
         DROP FUNCTION IF EXISTS {table}_wait_grant_hist_v5(integer, integer, text, text, \
             bigint, text, integer, timestamp with time zone, bigint, bigint, bigint); \
         DROP FUNCTION IF EXISTS {table}_fence(text, bigint);"
    ));
    assert_eq!(fresh, 32, "fresh events were pruned with old ones");
    assert_eq!(old, 8, "32 of the 40 old events pruned");
}
