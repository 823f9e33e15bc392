//! Bad input gets a typed error and loses nothing: names, configuration, an
//! unreachable database, a missing table, an exhausted pool.

mod common;

use std::thread;
use std::time::{Duration, Instant};

use common::*;
use lockbox::{AcquireOptions, Error, LockClient, MAX_METADATA_LEN, MAX_NAME_LEN};

#[test]
fn invalid_names_are_refused() {
    let (client, _) = client(ms(1000));
    for bad in [
        String::new(),
        "a\0b".to_owned(),
        "x".repeat(MAX_NAME_LEN + 1),
    ] {
        match client.try_lock(&bad) {
            Err(Error::InvalidName(_)) => {}
            other => panic!("{bad:?}: expected InvalidName, got {other:?}"),
        }
        assert!(matches!(
            client.lock_timeout(&bad, ms(10)),
            Err(Error::InvalidName(_))
        ));
    }
}

#[test]
fn unusual_names_work_and_are_case_sensitive() {
    let (client, _) = client(ms(1000));
    let base = unique("n");
    let names = [
        "x".to_owned(),
        format!("{base}-{}", "y".repeat(MAX_NAME_LEN - base.len() - 1)),
        format!("{base}'; DROP TABLE lockbox_leases; --"),
        format!("{base}\"quoted\" \\back\\slash %_"),
        format!("{base}-ключ-鍵-🔒"),
        format!("{base}-Case"),
        format!("{base}-case"),
    ];
    assert_eq!(names[1].len(), MAX_NAME_LEN);
    let held: Vec<_> = names
        .iter()
        .map(|n| {
            client
                .try_lock(n)
                .unwrap()
                .unwrap_or_else(|| panic!("{n:?} not acquired"))
        })
        .collect();
    for (lock, name) in held.iter().zip(&names) {
        assert_eq!(lock.name(), name);
        assert_eq!(lease_row(name).token as u64, lock.fencing_token());
    }
}

#[test]
fn invalid_configuration_is_refused_at_build() {
    let url = database_url();
    let cases = vec![
        ("ttl", LockClient::builder(url).ttl(Duration::ZERO)),
        (
            "ttl",
            LockClient::builder(url).ttl(Duration::from_secs(365 * 86400)),
        ),
        (
            "renew interval",
            LockClient::builder(url)
                .ttl(ms(1000))
                .renew_interval(ms(900)),
        ),
        ("pool size", LockClient::builder(url).pool_size(0)),
        (
            "table",
            LockClient::builder(url).table("Robert'); DROP TABLE x;--"),
        ),
        (
            "connection string",
            LockClient::builder("postgres://h:notaport/db"),
        ),
    ];
    for (what, builder) in cases {
        match builder.build() {
            Err(Error::InvalidConfig(msg)) => assert!(msg.contains(what), "{what}: {msg}"),
            other => panic!("{what}: expected InvalidConfig, got {other:?}"),
        }
    }
}

#[test]
fn per_call_options_are_validated() {
    let (client, app) = client(ms(1000));
    let name = unique("opts");
    for (what, opts) in [
        ("ttl", AcquireOptions::new().ttl(ms(5))),
        (
            "metadata",
            AcquireOptions::new().metadata("x".repeat(MAX_METADATA_LEN + 1)),
        ),
        ("metadata", AcquireOptions::new().metadata("nul\0")),
    ] {
        match client.acquire(&name, &opts) {
            Err(Error::InvalidConfig(msg)) => assert!(msg.contains(what), "{msg}"),
            other => panic!("{what}: expected InvalidConfig, got {other:?}"),
        }
    }
    assert_eq!(advisory_locks_of(&app), 0);
    // Valid options are stored with the lease.
    let opts = AcquireOptions::new()
        .ttl(ms(5000))
        .metadata("job=42 host=w3");
    let lock = client.acquire(&name, &opts).unwrap().unwrap();
    let meta: Option<String> = admin()
        .query_one(
            "SELECT metadata FROM lockbox_leases WHERE name = $1",
            &[&name],
        )
        .unwrap()
        .get(0);
    assert_eq!(meta.as_deref(), Some("job=42 host=w3"));
    let row = lease_row(&name);
    assert!(
        row.expires_at - row.acquired_at > 4.9,
        "per-call ttl applied: {row:?}"
    );
    assert_eq!(lock.ttl(), ms(5000));
}

#[test]
fn unreachable_database_is_a_connect_error_without_the_password() {
    // Nothing listens on port 1.
    let start = Instant::now();
    let err = LockClient::builder("postgres://app:s3cret-pw@127.0.0.1:1/appdb")
        .connect_timeout(ms(2000))
        .build()
        .unwrap_err();
    assert!(start.elapsed() < Duration::from_secs(10));
    let text = format!("{err} {err:?}");
    assert!(matches!(err, Error::Connect { .. }), "{text}");
    assert!(
        text.contains("127.0.0.1:1") && text.contains("appdb"),
        "{text}"
    );
    assert!(!text.contains("s3cret-pw"), "password leaked: {text}");
}

#[test]
fn missing_table_without_auto_creation_is_reported() {
    let table = unique("absent").replace('-', "_");
    let err = builder_for("x")
        .table(&table)
        .create_table(false)
        .build()
        .unwrap_err();
    assert!(
        matches!(err, Error::MissingTable { table: ref t } if *t == table),
        "{err}"
    );
}

#[test]
fn a_schema_qualified_table_is_created_and_used() {
    let schema = unique("lbx").replace('-', "_");
    admin()
        .batch_execute(&format!("CREATE SCHEMA {schema}"))
        .unwrap();
    let table = format!("{schema}.my_leases");
    let client = builder_for("schema-test").table(&table).build().unwrap();
    let lock = client.try_lock("in-own-table").unwrap().unwrap();
    let n: i64 = admin()
        .query_one(
            &format!("SELECT count(*) FROM {table} WHERE name = 'in-own-table'"),
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    lock.release().unwrap();
    drop(client);
    admin()
        .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
        .unwrap();
}

#[test]
fn exhausted_pool_is_a_pool_timeout_while_holders_keep_renewing() {
    let app = unique("pool");
    let ttl = ms(300);
    let client = builder_for(&app)
        .ttl(ttl)
        .pool_size(2)
        .pool_timeout(ms(250))
        .build()
        .unwrap();
    let a = client.try_lock(&unique("pool-a")).unwrap().unwrap();
    let b = client.try_lock(&unique("pool-b")).unwrap().unwrap();
    let start = Instant::now();
    match client.try_lock(&unique("pool-c")) {
        Err(Error::PoolTimeout { pool_size: 2, .. }) => {}
        other => panic!("expected PoolTimeout, got {other:?}"),
    }
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "a full pool must not hang"
    );
    assert!(
        client
            .lock_timeout(&unique("pool-d"), ms(50))
            .unwrap_err()
            .is_pool_timeout()
    );
    // Several TTLs later the holders still hold: renewals use their own sessions.
    thread::sleep(ttl * 3);
    assert!(a.is_held() && b.is_held());
    a.release().unwrap();
    assert!(client.try_lock(&unique("pool-e")).unwrap().is_some());
    b.release().unwrap();
    assert!(sessions_of(&app) <= 2);
}
