//! An application role with the privileges a lease table has always needed
//! (SELECT, INSERT, UPDATE, DELETE on the tables; an identity column needs no
//! sequence privilege for nextval) builds and locks fine on an unlogged
//! table — until the first crash. Recovery's `setval` needs UPDATE on the
//! token sequence, which nothing checked at build: after the crash no client
//! of that role could ever be granted a lock again. Fixed: build() refuses
//! the role, naming the missing privilege; with it, the role locks after a
//! crash too.

use crate::common;

use std::time::Duration;

use common::server::Cluster;
use lockbox::{Error, LockClient};

fn role_url(cluster: &Cluster, role: &str) -> String {
    format!(
        "postgres://{role}@127.0.0.1:{}/postgres?sslmode=disable",
        cluster.port
    )
}

#[test]
fn a_role_that_could_not_recover_after_a_crash_is_refused_at_build() {
    let cluster = Cluster::start().expect("throwaway cluster");
    let table = "priv_leases";
    // The owner creates the table and its companions.
    drop(
        LockClient::builder(&cluster.url)
            .table(table)
            .unlogged_leases(true)
            .build()
            .unwrap(),
    );
    let mut db = postgres::Client::connect(&cluster.url, postgres::NoTls).unwrap();
    db.batch_execute(
        "CREATE ROLE app LOGIN; \
         GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO app",
    )
    .unwrap();
    drop(db);
    let build = || {
        LockClient::builder(&role_url(&cluster, "app"))
            .table(table)
            .create_table(false)
            .ttl(Duration::from_millis(500))
            .build()
    };
    // Refused at build, naming what is missing, rather than failing after the
    // first crash.
    let err = build().unwrap_err();
    assert!(
        matches!(&err, Error::InsufficientPrivilege(m) if m.contains("UPDATE on its token sequence")),
        "{err:?}"
    );
    let mut db = postgres::Client::connect(&cluster.url, postgres::NoTls).unwrap();
    db.batch_execute("GRANT SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA public TO app")
        .unwrap();
    drop(db);
    let app = build().expect("build() accepts the role once it may recover");
    // A fresh table has no `_alive` row yet: the owner's first grant begins
    // epoch 1, so the role itself never needs to recover before the crash.
    let owner = LockClient::builder(&cluster.url)
        .table(table)
        .ttl(Duration::from_millis(500))
        .build()
        .unwrap();
    owner.try_lock("warm").unwrap().unwrap().release().unwrap();
    // Before the crash, the role locks as it pleases.
    for i in 0..3 {
        let g = app
            .try_lock(&format!("n{i}"))
            .unwrap()
            .expect("granted before the crash");
        g.release().unwrap();
    }

    cluster.stop_server("immediate").unwrap();
    cluster.start_server().unwrap();

    // After the crash, the role recovers and is granted (within the lock-delay).
    let mut errors = Vec::new();
    for i in 0..3 {
        match app.lock_timeout(&format!("n{i}"), Duration::from_secs(3)) {
            Ok(g) => {
                g.release().unwrap();
            }
            Err(e) => errors.push(e),
        }
    }
    assert!(
        errors.is_empty(),
        "after the crash the role's acquires fail: {:?}",
        errors
            .iter()
            .map(|e| match e {
                Error::InsufficientPrivilege(m) => format!("InsufficientPrivilege({m})"),
                other => format!("{other}"),
            })
            .collect::<Vec<_>>()
    );
}
