//! Review of shared leases on PostgreSQL: `force_release` by a client that
//! cannot use the shared-lease table (its role may not write it, so shared
//! leases are unsupported for it) while a group of shared leases holds the
//! name.
//!
//! It released the group's row and reported success, but left every shared
//! lease live in `<table>_shared` (their holders' sessions running, still
//! holding the key): the name's row said "free" while readers or permits
//! were live. It must refuse instead, changing nothing.

use crate::common;

use common::*;
use lockbox::{Error, LeaseStatus, LockClient};

struct Role(String);

impl Role {
    fn create() -> Role {
        let role = unique("rev4_nocoord").replace('-', "_");
        // A client of the default table first, so that it and its shared
        // table exist.
        let _ = client(ms(5000));
        let mut db = admin();
        let seq: String = db
            .query_one(
                "SELECT pg_get_serial_sequence('lockbox_leases', 'token')",
                &[],
            )
            .unwrap()
            .get(0);
        acl_change(&format!(
            "CREATE ROLE {role} LOGIN; \
             GRANT pg_signal_backend, pg_read_all_stats TO {role}; \
             GRANT USAGE ON SCHEMA public TO {role}; \
             GRANT SELECT, INSERT, UPDATE, DELETE ON lockbox_leases TO {role}; \
             GRANT USAGE, SELECT ON SEQUENCE {seq} TO {role};"
        ))
        .unwrap();
        Role(role)
    }
}

impl Drop for Role {
    fn drop(&mut self) {
        let _ = acl_change(&format!(
            "DROP OWNED BY {r}; DROP ROLE IF EXISTS {r}",
            r = self.0
        ));
    }
}

fn live_shared(name: &str) -> i64 {
    admin()
        .query_one(
            "SELECT count(*) FROM lockbox_leases_shared WHERE name = $1 \
             AND released_at IS NULL AND expires_at > clock_timestamp()",
            &[&name],
        )
        .unwrap()
        .get(0)
}

#[test]
fn force_release_without_the_shared_table_ends_all_or_nothing() {
    let role = Role::create();
    let name = unique("coord-force-nocoord");
    let (holder_client, _) = client(ms(5000));
    let reader = holder_client
        .rwlock(&name)
        .unwrap()
        .try_read()
        .unwrap()
        .expect("free");
    let operator = LockClient::builder(&url_as_user(&role.0))
        .create_table(false)
        .build()
        .unwrap();
    let other = unique("coord-force-nocoord-probe");
    assert!(
        matches!(
            operator.rwlock(&other).and_then(|r| r.try_read()),
            Err(Error::Unsupported(_))
        ),
        "the role may not use the shared-lease table"
    );
    match operator.force_release(&name) {
        Ok(ended) => {
            assert_eq!(
                live_shared(&name),
                0,
                "force_release returned {ended:?} and left a reader live"
            );
        }
        Err(e) => {
            assert!(
                matches!(e, Error::Unsupported(_) | Error::InsufficientPrivilege(_)),
                "{e:?}"
            );
            // Nothing changed: the reader is held, and its group too.
            assert_eq!(live_shared(&name), 1);
            assert!(matches!(
                holder_client.lease(&name).unwrap().map(|l| l.status),
                Some(LeaseStatus::Held { .. })
            ));
            assert!(reader.is_held());
        }
    }
    drop(reader);
}
