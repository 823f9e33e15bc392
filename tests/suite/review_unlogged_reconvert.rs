//! The epoch row is seeded only when `<table>_epoch` is created. A table that
//! was unlogged, set LOGGED for a while (its clients then neither gate nor
//! raise the bounds: the table is logged), and set UNLOGGED again keeps the
//! old `_epoch` table with its old ceiling: build() accepts it as it is. A
//! crash before a grant passes that stale ceiling set the sequence back
//! below tokens already issued, and a name's token went backwards. Fixed:
//! every build raises the bounds to what the table and its sequence hold.
//! (The million-token step is stood in for by `setval`, as if the logged
//! period had granted that many.)

use crate::common;

use std::time::Duration;

use common::server::Cluster;
use lockbox::LockClient;

#[test]
fn a_table_converted_back_and_forth_keeps_tokens_increasing_after_a_crash() {
    let cluster = Cluster::start().expect("throwaway cluster");
    let table = "rc_leases";
    let build = |unlogged: bool| {
        LockClient::builder(&cluster.url)
            .table(table)
            .ttl(Duration::from_millis(300))
            .unlogged_leases(unlogged)
            .build()
            .unwrap()
    };
    let mut db = postgres::Client::connect(&cluster.url, postgres::NoTls).unwrap();
    // 1. Unlogged for a while.
    let c = build(true);
    c.try_lock("a").unwrap().unwrap().release().unwrap();
    drop(c);
    let ceiling: i64 = db
        .query_one(&format!("SELECT token_ceiling FROM {table}_epoch"), &[])
        .unwrap()
        .get(0);
    // 2. Every client stopped; the table set LOGGED; logged clients issue
    //    more than a ceiling step of tokens.
    db.batch_execute(&format!("ALTER TABLE {table} SET LOGGED"))
        .unwrap();
    let c = build(false);
    db.execute(
        &format!("SELECT setval(pg_get_serial_sequence('{table}', 'token'), $1)"),
        &[&(ceiling + 10)],
    )
    .unwrap();
    let before = c.try_lock("b").unwrap().unwrap();
    let issued = before.fencing_token();
    assert!(issued as i64 > ceiling);
    before.release().unwrap();
    drop(c);
    // 3. Every client stopped; UNLOGGED again, as the README says to convert.
    db.batch_execute(&format!("ALTER TABLE {table} SET UNLOGGED"))
        .unwrap();
    drop(db);
    let c = build(true);
    // 4. A crash before any grant.
    cluster.stop_server("immediate").unwrap();
    cluster.start_server().unwrap();
    let after = c.lock_timeout("b", Duration::from_secs(5)).unwrap();
    assert!(
        after.fencing_token() > issued,
        "name b: token {} after token {issued}",
        after.fencing_token()
    );
}
