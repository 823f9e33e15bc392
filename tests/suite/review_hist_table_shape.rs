//! Careless user (history): `history(true)` writes into `<table>_history`
//! whatever that relation is. An application that already has a table of that
//! name (`jobs` and `jobs_history` are a common pair), or a history table of
//! another shape, was accepted at build; every grant then failed (or wrote
//! lease events into the application's table). `build()` must refuse it with
//! a clear error naming the table, as it does a lease table of the wrong shape.

use crate::common;

use common::*;
use lockbox::{Error, LockClient};

#[test]
fn a_history_table_of_another_shape_is_refused_at_build() {
    let table = unique("hist_shape").replace('-', "_");
    admin()
        .batch_execute(&format!(
            "CREATE TABLE {table}_history (id bigserial PRIMARY KEY, note text NOT NULL)"
        ))
        .unwrap();
    let built = LockClient::builder(database_url())
        .table(&table)
        .history(true)
        .build();
    let outcome = match built {
        Err(Error::InvalidConfig(msg)) => {
            assert!(msg.contains("_history"), "{msg}");
            Ok(())
        }
        Err(other) => Err(format!("expected InvalidConfig, got {other:?}")),
        Ok(client) => {
            let acquired = client.try_lock(&unique("hist-shape")).map(|l| l.is_some());
            Err(format!(
                "built on a history table of another shape; an acquire then gives {acquired:?}"
            ))
        }
    };
    let _ = admin().batch_execute(&format!(
        "DROP TABLE IF EXISTS {table}, {table}_history CASCADE; \
         DROP FUNCTION IF EXISTS {table}_wait_grant_hist_v2(integer, integer, text, text, \
             bigint, text, integer, timestamp with time zone, bigint, bigint, bigint); \
         DROP FUNCTION IF EXISTS {table}_wait_grant_hist_v5(integer, integer, text, text, \
             bigint, text, integer, timestamp with time zone, bigint, bigint, bigint); \
         DROP FUNCTION IF EXISTS {table}_fence(text, bigint);"
    ));
    outcome.unwrap();
}
