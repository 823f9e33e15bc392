//! Hostile operator (history): privileges on `<table>_history`.
//!
//! - Without INSERT on it, `history(true)` built fine and then every grant
//!   failed: the history became a new way to break locking, found only at
//!   the first acquire. `build()` must say so instead.
//! - With INSERT but not DELETE (an append-only grant, the natural one for an
//!   audit table), every sixteenth release carried the pruning DELETE and
//!   failed on it. Pruning must be skipped, as reclaiming is without DELETE.

use crate::common;

use common::*;
use lockbox::{Error, LockClient};

struct Setup {
    table: String,
    role: String,
}

impl Setup {
    fn create(history_grants: &str) -> Setup {
        let table = unique("hist_priv").replace('-', "_");
        let role = unique("hist_role").replace('-', "_");
        drop(
            LockClient::builder(database_url())
                .table(&table)
                .history(true)
                .build()
                .unwrap(),
        );
        admin()
            .batch_execute(&format!(
                "CREATE ROLE {role} LOGIN; \
                 GRANT SELECT, INSERT, UPDATE ON {table} TO {role}; \
                 GRANT USAGE ON SEQUENCE {seq} TO {role}; \
                 GRANT {history_grants} ON {table}_history TO {role};",
                seq = format_args!("{table}_token_seq"),
            ))
            .unwrap();
        Setup { table, role }
    }

    fn builder(&self) -> lockbox::LockClientBuilder {
        LockClient::builder(&url_as_user(&self.role))
            .table(&self.table)
            .create_table(false)
            .history(true)
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        let t = &self.table;
        let _ = admin().batch_execute(&format!(
            "DROP TABLE IF EXISTS {t}, {t}_history CASCADE; \
             DROP FUNCTION IF EXISTS {t}_wait_grant_hist_v2(integer, integer, text, text, \
                 bigint, text, integer, timestamp with time zone, bigint, bigint, bigint); \
             DROP FUNCTION IF EXISTS {t}_wait_grant_hist_v5(integer, integer, text, text, \
                 bigint, text, integer, timestamp with time zone, bigint, bigint, bigint); \
             DROP FUNCTION IF EXISTS {t}_fence(text, bigint); \
             DROP OWNED BY {r}; DROP ROLE {r};",
            r = self.role
        ));
    }
}

#[test]
fn without_insert_on_the_history_build_fails_rather_than_every_grant() {
    let setup = Setup::create("SELECT");
    match setup.builder().build() {
        Err(Error::InsufficientPrivilege(msg)) => {
            assert!(msg.contains("_history") && msg.contains("INSERT"), "{msg}")
        }
        Err(other) => panic!("expected InsufficientPrivilege, got {other:?}"),
        Ok(client) => panic!(
            "built without INSERT on the history; an acquire then gives {:?}",
            client.try_lock(&unique("hist-priv")).map(|l| l.is_some())
        ),
    }
}

#[test]
fn without_delete_on_the_history_releases_still_succeed() {
    let setup = Setup::create("SELECT, INSERT");
    let client = setup.builder().build().unwrap();
    let name = unique("hist-nodelete");
    for i in 0..20 {
        let lock = client.try_lock(&name).unwrap().expect("a free name");
        if let Err(e) = lock.release() {
            panic!("release {} failed: {e}", i + 1);
        }
    }
    assert_eq!(client.history(&name, 100).unwrap().len(), 40);
}
