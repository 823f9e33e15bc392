//! Hostile review of the wait-and-grant function: lease tables whose names
//! leave no room for the `_wait_grant_v3` suffix (50 to 63 bytes) get a
//! function named after the table's OID; at 49 bytes the suffix still fits.
//! Either way a waiter waits inside the table's own function, and two such
//! tables in one schema never share one.

use crate::common;

use std::thread;

use common::*;

fn handoff(schema: &str, relname: &str) -> String {
    let table = format!("{schema}.{relname}");
    let mk = |app: &str| {
        builder_for(app)
            .table(&table)
            .ttl(ms(30_000))
            .build()
            .expect("build")
    };
    let holder = mk(&unique("wgr-long-h"));
    let w_app = unique("wgr-long-w");
    let waiter = mk(&w_app);
    let name = unique("wgr-long");
    let held = holder.try_lock(&name).unwrap().expect("a free lock");
    let first = held.fencing_token();
    thread::scope(|s| {
        let w = s.spawn(|| waiter.lock(&name).unwrap());
        let query = common::wg::waiting_query(&w_app);
        held.release().unwrap();
        let got = w.join().unwrap();
        assert!(got.fencing_token() > first);
        got.release().unwrap();
        query
    })
}

#[test]
fn tables_with_names_of_49_to_63_bytes_each_wait_through_their_own_function() {
    let schema = unique("wgr_long").replace('-', "_");
    admin()
        .batch_execute(&format!("CREATE SCHEMA {schema}"))
        .unwrap();
    let names = [
        "a".repeat(49),
        "b".repeat(50),
        "c".repeat(63),
        format!("{}x", "c".repeat(62)),
    ];
    let mut functions = Vec::new();
    for relname in &names {
        let query = handoff(&schema, relname);
        assert!(
            query.contains("_wait_grant_v3"),
            "{relname}: waits inside the function: {query}"
        );
        let function = query
            .split_whitespace()
            .find(|w| w.contains("_wait_grant_v3"))
            .unwrap()
            .split('(')
            .next()
            .unwrap()
            .to_owned();
        functions.push(function);
    }
    assert!(
        functions[0].contains(&format!("{}_wait_grant_v3", names[0])),
        "49 bytes: named after the table: {functions:?}"
    );
    for f in &functions[1..] {
        assert!(
            f.contains("lockbox_wait_grant_v3_"),
            "50 bytes or more: named after the OID: {functions:?}"
        );
    }
    let mut distinct = functions.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), functions.len(), "shared: {functions:?}");
    let _ = admin().batch_execute(&format!("DROP SCHEMA {schema} CASCADE"));
}
