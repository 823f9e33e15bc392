//! `with_lock` returns `f`'s result when the lock was held throughout, even if
//! only the release could not be confirmed; and an error when it was lost.

use crate::common;

use common::*;
use lockbox::LostReason;

#[test]
fn a_failed_release_after_a_held_run_still_returns_the_result() {
    let schema = unique("wl").replace('-', "_");
    let table = format!("{schema}.leases");
    let mut db = admin();
    db.batch_execute(&format!("CREATE SCHEMA {schema}"))
        .unwrap();
    let client = builder_for(&unique("wl"))
        .table(&table)
        .ttl(ms(1500))
        .build()
        .unwrap();
    let name = unique("wl");
    let out = client.with_lock(&name, ms(1000), |lock| {
        // The release will fail: an AFTER trigger (allowed: it cannot change
        // rows) that refuses the release's update.
        admin()
            .batch_execute(&format!(
                "CREATE FUNCTION {schema}.refuse() RETURNS trigger LANGUAGE plpgsql AS \
                 $$ BEGIN RAISE EXCEPTION 'releases refused'; END $$; \
                 CREATE TRIGGER refuse AFTER UPDATE ON {table} \
                 FOR EACH ROW EXECUTE FUNCTION {schema}.refuse();"
            ))
            .unwrap();
        lock.fencing_token()
    });
    let token = out.expect("held throughout: f's result, though the release failed");
    assert!(token > 0);

    // Lost while f ran: an error, and f's result is discarded.
    let other = unique("wl-lost");
    db.batch_execute(&format!("DROP TRIGGER refuse ON {table}"))
        .unwrap();
    let err = client
        .with_lock(&other, ms(1000), |lock| {
            let pid: i32 = admin()
                .query_one(
                    &format!("SELECT holder_pid FROM {table} WHERE name = $1"),
                    &[&other],
                )
                .unwrap()
                .get(0);
            terminate(pid);
            assert_eq!(
                lock.lost().recv_timeout(ms(3000)),
                Ok(LostReason::SessionLost)
            );
        })
        .unwrap_err();
    assert!(err.is_lock_lost(), "{err}");
    drop(client);
    db.batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
        .unwrap();
}
