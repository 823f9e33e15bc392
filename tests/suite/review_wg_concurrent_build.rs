//! Hostile review of the wait-and-grant function: many clients of one fresh
//! lease table built at once (a fleet starting together) all succeed, and
//! leave exactly one function, lockbox's, that their waiters use.

use crate::common;

use std::thread;

use common::*;

#[test]
fn clients_built_at_once_on_a_fresh_table_all_succeed_and_share_one_function() {
    let schema = unique("wgr_conc").replace('-', "_");
    admin()
        .batch_execute(&format!("CREATE SCHEMA {schema}"))
        .unwrap();
    let table = format!("{schema}.leases");
    let apps: Vec<String> = (0..6).map(|i| unique(&format!("wgr-conc{i}"))).collect();
    let clients: Vec<_> = thread::scope(|s| {
        let handles: Vec<_> = apps
            .iter()
            .map(|app| {
                let table = &table;
                s.spawn(move || builder_for(app).table(table).ttl(ms(30_000)).build())
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let clients: Vec<_> = clients
        .into_iter()
        .map(|c| c.expect("every concurrent build succeeds"))
        .collect();
    // One wait-and-grant function, and one fence function (`Lock::fence`'s
    // SQL twin), created by the same builds.
    let n: Vec<String> = admin()
        .query(
            "SELECT proname::text FROM pg_proc WHERE pronamespace = to_regnamespace($1) \
             ORDER BY proname",
            &[&schema],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        n,
        ["leases_fence", "leases_wait_grant_v3"],
        "one function of each"
    );
    let name = unique("wgr-conc");
    let held = clients[0].try_lock(&name).unwrap().expect("a free lock");
    thread::scope(|s| {
        let w = s.spawn(|| clients[1].lock(&name).unwrap());
        let query = common::wg::waiting_query(&apps[1]);
        assert!(query.contains("_wait_grant_v3"), "{query}");
        held.release().unwrap();
        w.join().unwrap().release().unwrap();
    });
    drop(clients);
    let _ = admin().batch_execute(&format!("DROP SCHEMA {schema} CASCADE"));
}
