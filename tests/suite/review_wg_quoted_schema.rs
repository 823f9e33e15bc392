//! Hostile review of the wait-and-grant function: an unqualified lease table
//! found through the role's search_path in a schema whose name needs quoting
//! (upper case, a space, a double quote, a dollar sign, a parenthesis). The function's
//! signature, body and call quote it; the function is created, checked and
//! used like any other.

use crate::common;

use std::thread;

use common::*;

#[test]
fn a_lease_table_in_a_schema_whose_name_needs_quoting_waits_through_its_function() {
    let base = unique("wgr_q").replace('-', "_");
    // (A parenthesis: the call's name was once cut from the signature at
    // its first one, review of 1af4b53.)
    let schema = format!("Wg {base} \"Q\" $x$ (p)");
    let quoted = format!("\"{}\"", schema.replace('"', "\"\""));
    let role = format!("{base}_role");
    admin()
        .batch_execute(&format!(
            "CREATE SCHEMA {quoted}; CREATE ROLE {role} LOGIN SUPERUSER; \
             ALTER ROLE {role} SET search_path = {quoted};"
        ))
        .unwrap();
    let mk = |app: &str| {
        lockbox::LockClient::builder(&url_with_app(&url_as_user(&role), app))
            .table("leases")
            .ttl(ms(30_000))
            .build()
            .expect("build")
    };
    let holder = mk(&unique("wgr-q-h"));
    let w_app = unique("wgr-q-w");
    let waiter = mk(&w_app);
    let name = unique("wgr-q");
    let held = holder.try_lock(&name).unwrap().expect("a free lock");
    let first = held.fencing_token();
    thread::scope(|s| {
        let w = s.spawn(|| waiter.lock(&name).unwrap());
        let query = common::wg::waiting_query(&w_app);
        assert!(
            query.contains(&format!("{quoted}.\"leases_wait_grant_v3\"")),
            "waits inside the schema's function: {query}"
        );
        held.release().unwrap();
        let got = w.join().unwrap();
        assert!(got.fencing_token() > first);
        got.release().unwrap();
    });
    drop((holder, waiter));
    let mut db = admin();
    let _ = db.execute(
        "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity WHERE usename = $1",
        &[&role],
    );
    let _ = db.batch_execute(&format!(
        "DROP SCHEMA {quoted} CASCADE; DROP ROLE IF EXISTS {role}"
    ));
}
