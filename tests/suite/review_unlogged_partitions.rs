//! "What the table is decides, not the setting": but only the lease table's
//! own `relpersistence` is looked at. A partitioned lease table (relkind 'p',
//! accepted by build) is logged, while its partitions, where every row lives,
//! may be UNLOGGED (legal in PostgreSQL 15). No client gates, no bound is
//! kept: a crash emptied the leases, and the name was granted again at once
//! while its holder still believed it held it (its local deadline running).
//! Fixed: a table any of whose partitions is unlogged is gated.

use crate::common;

use std::time::Duration;

use common::server::Cluster;
use lockbox::LockClient;

#[test]
fn an_unlogged_partition_is_gated_too() {
    let cluster = Cluster::start().expect("throwaway cluster");
    let mut db = postgres::Client::connect(&cluster.url, postgres::NoTls).unwrap();
    db.batch_execute(&common::partitioned_lease_table("part_leases", true))
        .unwrap();
    drop(db);
    let ttl = Duration::from_secs(10);
    let build = || {
        LockClient::builder(&cluster.url)
            .table("part_leases")
            .ttl(ttl)
            .build()
            .expect("build accepts the partitioned table")
    };
    let (holder, other) = (build(), build());
    let held = holder.try_lock("x").unwrap().unwrap();

    cluster.stop_server("immediate").unwrap();
    cluster.start_server().unwrap();

    let again = other.try_lock("x").unwrap();
    let left = held.time_left();
    assert!(
        again.is_none(),
        "granted again (token {:?}, the crashed lease's {}) while its holder's local deadline \
         still has {left:?} to run",
        again.as_ref().map(|g| g.fencing_token()),
        held.fencing_token()
    );
}
