//! build() refuses a lease table with BEFORE row triggers or rules ("they may
//! rewrite a token, an expiry"), but looks at no trigger on `<table>_epoch`,
//! nor at who owns it. A BEFORE UPDATE trigger there that keeps the row as it
//! was (an audit or "protect" trigger, or one planted by the role that owns
//! the companion) silently turned every raise into nothing: tokens and lease
//! ends passed the bounds, and after a crash a token repeated. Fixed: build()
//! refuses triggers and rules on the companions as on the lease table.

use crate::common;

use std::time::Duration;

use common::server::Cluster;
use lockbox::LockClient;

#[test]
fn a_trigger_on_the_epoch_table_is_refused() {
    let cluster = Cluster::start().expect("throwaway cluster");
    let table = "trg_leases";
    let build = || {
        LockClient::builder(&cluster.url)
            .table(table)
            .ttl(Duration::from_millis(300))
            .unlogged_leases(true)
            .build()
            .unwrap()
    };
    drop(build());
    let mut db = postgres::Client::connect(&cluster.url, postgres::NoTls).unwrap();
    db.batch_execute(&format!(
        "CREATE FUNCTION keep_bounds() RETURNS trigger LANGUAGE plpgsql AS \
             $$BEGIN NEW.token_ceiling := OLD.token_ceiling; \
                     NEW.lease_horizon := OLD.lease_horizon; RETURN NEW; END$$; \
         CREATE TRIGGER keep BEFORE UPDATE ON {table}_epoch \
             FOR EACH ROW EXECUTE FUNCTION keep_bounds()"
    ))
    .unwrap();
    // Refused (any trigger on a companion is).
    let err = LockClient::builder(&cluster.url)
        .table(table)
        .unlogged_leases(true)
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("it has triggers (keep)"), "{err}");
}
