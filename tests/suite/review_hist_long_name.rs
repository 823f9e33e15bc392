//! Careless user (history): long lease-table names. `<table>_history` must
//! fit PostgreSQL's 63-byte identifiers (a longer one would be cut, and two
//! tables' histories could be one), and the history's wait-and-grant
//! function must not collide with the plain one's. A 55-byte table name
//! (63 with `_history`) works, waits included; a 56-byte one is refused at
//! build with a clear error.

use crate::common;

use std::time::Duration;

use common::*;
use lockbox::{Error, LeaseEventKind, LockClient};

fn named(len: usize) -> String {
    let base = unique("hl").replace('-', "_");
    let mut name: String = base.chars().take(len).collect();
    while name.len() < len {
        name.push('x');
    }
    name
}

fn drop_all(table: &str) {
    let _ = admin().batch_execute(&format!(
        "DROP TABLE IF EXISTS {table}, {table}_history CASCADE; \
         DO $$ DECLARE f regprocedure; BEGIN \
             FOR f IN SELECT p.oid::regprocedure FROM pg_proc p \
                 WHERE p.proname LIKE '{prefix}%' LOOP \
                 EXECUTE 'DROP FUNCTION ' || f; END LOOP; END $$;",
        prefix = &table[..20]
    ));
}

#[test]
fn a_63_byte_history_name_works_and_a_longer_one_is_refused() {
    let table = named(55);
    let client = builder_for(&unique("hist-long"))
        .table(&table)
        .history(true)
        .ttl(ms(1000))
        .build()
        .unwrap();
    let plain = LockClient::builder(database_url())
        .table(&table)
        .ttl(ms(1000))
        .build()
        .unwrap();
    let name = unique("hist-long");
    let held = plain.try_lock(&name).unwrap().unwrap();
    let waited = std::thread::scope(|s| {
        let w = s.spawn(|| {
            let lock = client.lock_timeout(&name, Duration::from_secs(10)).unwrap();
            let t = lock.fencing_token();
            lock.release().unwrap();
            t
        });
        assert!(eventually(Duration::from_secs(10), || {
            a_statement_waits_on_lock("%wait_grant_hist%")
        }));
        held.release().unwrap();
        w.join().unwrap()
    });
    let kinds: Vec<(LeaseEventKind, u64)> = client
        .history(&name, 10)
        .unwrap()
        .into_iter()
        .map(|e| (e.kind, e.fencing_token))
        .collect();
    drop((client, plain));
    drop_all(&table);
    // The plain client's grant and release are not recorded; the waiter's are.
    assert_eq!(
        kinds,
        vec![
            (LeaseEventKind::Released, waited),
            (LeaseEventKind::Granted, waited)
        ]
    );

    let table = named(56);
    let built = LockClient::builder(database_url())
        .table(&table)
        .history(true)
        .build();
    drop_all(&table);
    match built {
        Err(Error::InvalidConfig(msg)) => assert!(msg.contains("63"), "{msg}"),
        other => panic!("expected InvalidConfig, got {other:?}"),
    }
}
