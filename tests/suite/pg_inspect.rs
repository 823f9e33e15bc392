//! Inspection and the health probe against what operators do to the lease
//! table: `'infinity'` timestamps are listed (never a panic), and a table that
//! refuses writes is reported by the probe.

use crate::common;

use std::time::{Duration, UNIX_EPOCH};

use common::*;
use lockbox::{LeaseStatus, LockClient};

/// A throwaway schema for a lease table of its own, dropped at the end.
struct Schema(String);

impl Schema {
    fn create() -> Schema {
        let name = unique("inspect").replace('-', "_");
        admin()
            .batch_execute(&format!("CREATE SCHEMA {name}"))
            .unwrap();
        Schema(name)
    }

    fn table(&self) -> String {
        format!("{}.leases", self.0)
    }

    fn client(&self) -> LockClient {
        LockClient::builder(database_url())
            .table(&self.table())
            .health_timeout(Duration::from_secs(10))
            .build()
            .unwrap()
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        let _ = admin().batch_execute(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.0));
    }
}

#[test]
fn infinite_timestamps_are_listed_without_panicking() {
    let schema = Schema::create();
    let client = schema.client();
    admin()
        .batch_execute(&format!(
            "INSERT INTO {t} (name, owner, token, holder_pid, holder_started, metadata, \
                 acquired_at, renewed_at, expires_at, released_at) VALUES \
             ('forever', 'operator', 5, 1, now(), NULL, '-infinity', now(), 'infinity', NULL), \
             ('never-ends', 'operator', 6, 1, now(), NULL, now(), now(), now(), 'infinity'), \
             ('long-gone', 'operator', 7, 1, now(), NULL, now(), now(), '-infinity', NULL)",
            t = schema.table()
        ))
        .unwrap();

    let all = client.leases().expect("listing with infinite timestamps");
    assert_eq!(all.len(), 3);
    let forever = client.lease("forever").unwrap().expect("the row");
    assert_eq!(forever.fencing_token, 5);
    assert_eq!(
        forever.status,
        LeaseStatus::Held {
            expires_in: Duration::MAX
        }
    );
    let year_3000 = UNIX_EPOCH + Duration::from_secs(32_503_680_000);
    assert!(forever.expires_at > year_3000, "{forever:?}");
    assert!(forever.acquired_at < UNIX_EPOCH, "{forever:?}");

    let never = client.lease("never-ends").unwrap().expect("the row");
    assert!(
        matches!(never.status, LeaseStatus::Released { at } if at > year_3000),
        "{never:?}"
    );
    let gone = client.lease("long-gone").unwrap().expect("the row");
    assert_eq!(gone.status, LeaseStatus::Expired { ago: Duration::MAX });

    // Acquiring those names works as their leases say: a lease that never ends
    // (its holder's session gone) is waited out, without an error; one that
    // ended at '-infinity' is free; a released one is free.
    assert!(client.try_lock("forever").unwrap().is_none());
    let waited = client.lock_timeout("forever", Duration::from_millis(300));
    assert!(waited.as_ref().is_err_and(|e| e.is_timeout()), "{waited:?}");
    let lock = client
        .try_lock("long-gone")
        .unwrap()
        .expect("an ended lease is free");
    assert!(lock.fencing_token() > 7);
    lock.release().unwrap();
    let lock = client
        .try_lock("never-ends")
        .unwrap()
        .expect("a released lease is free");
    lock.release().unwrap();
}

#[test]
fn the_health_probe_reports_a_lease_table_that_refuses_writes() {
    let schema = Schema::create();
    let client = schema.client();
    let h = client.health();
    assert_eq!(h.database.writable, Some(true), "{h}");
    assert!(
        h.database
            .server_version
            .as_deref()
            .is_some_and(|v| v.starts_with("PostgreSQL ")),
        "{h}"
    );

    admin()
        .batch_execute(&format!(
            "CREATE FUNCTION {s}.refuse() RETURNS trigger LANGUAGE plpgsql AS \
                 $$ BEGIN RAISE EXCEPTION 'lease table frozen by the operator'; END $$; \
             CREATE TRIGGER refuse BEFORE INSERT OR UPDATE ON {t} \
                 FOR EACH ROW EXECUTE FUNCTION {s}.refuse()",
            s = schema.0,
            t = schema.table()
        ))
        .unwrap();
    let h = client.health();
    assert!(h.database.reachable, "{h}");
    assert_eq!(h.database.writable, Some(false), "{h}");
    assert!(
        h.database
            .error
            .as_deref()
            .is_some_and(|e| e.contains("lease table frozen by the operator")),
        "{h:?}"
    );
    // Nothing of the probe was left behind.
    let rows: i64 = admin()
        .query_one(&format!("SELECT count(*) FROM {}", schema.table()), &[])
        .unwrap()
        .get(0);
    assert_eq!(rows, 0);
}
