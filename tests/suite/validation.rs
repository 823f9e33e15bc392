//! Bad input gets a typed error and loses nothing: names, configuration, an
//! unreachable database, a missing table, an exhausted pool.

use crate::common;

use std::thread;
use std::time::{Duration, Instant};

use common::*;
use lockbox::{
    AcquireOptions, Error, LockClient, LockClientBuilder, MAX_METADATA_LEN, MAX_NAME_LEN, MAX_TTL,
};

const MAX_TIMEOUT: Duration = LockClientBuilder::MAX_TIMEOUT;

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

/// With a session per lock, the pool bounds the locks held at once.
#[test]
fn exhausted_pool_is_a_pool_timeout_while_holders_keep_renewing() {
    let app = unique("pool");
    // 1 s, slept through three times below: 300 ms lost a holder once under a
    // loaded full run (renewals late, not blocked by the full pool).
    let ttl = ms(1000);
    let client = builder_for(&app)
        .ttl(ttl)
        .locks_per_session(1)
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

/// A password the forms below carry; none of its parts may show anywhere.
const SECRET: &str = "hunter2Sekret";

fn assert_hidden(text: &str, what: &str) {
    for part in ["hunter2", "Sekret", "with spaces"] {
        assert!(!text.contains(part), "{what}: password leaked: {text}");
    }
}

/// The test server's host, port, user and database, from its parsed URL.
fn pg_parts() -> (String, u16, String, String) {
    let config: postgres::Config = database_url().parse().unwrap();
    let host = match config.get_hosts().first() {
        Some(postgres::config::Host::Tcp(h)) => h.clone(),
        Some(postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "localhost".to_owned(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let user = config.get_user().unwrap_or("postgres").to_owned();
    let db = config.get_dbname().unwrap_or(&user).to_owned();
    (host, port, user, db)
}

/// Every password form PostgreSQL's driver accepts — spaces around `=`, quoted
/// with spaces, tab-separated, escaped, URL passwords holding `/` or `?`, a
/// `?password=` parameter — connects (the server is `trust`, so any password is
/// accepted) and never shows in the builder's or the client's `Debug`, which
/// still name the host, port, user and database.
#[test]
fn postgres_passwords_never_show_in_debug() {
    let (h, p, u, d) = pg_parts();
    let kv = format!("host={h} port={p} user={u} dbname={d}");
    let forms = [
        format!("{kv} password = {SECRET}"),
        format!("{kv} password='{SECRET} with spaces'"),
        format!("host={h}\tport={p}\tuser={u}\tdbname={d}\tpassword={SECRET}"),
        format!("{kv} password={SECRET}\\ with\\ spaces"),
        format!("password = '{SECRET}' {kv}"),
        format!("postgres://{u}:{SECRET}%2Fx@{h}:{p}/{d}"),
        format!("postgres://{u}:{SECRET}%3Fx=1%40{h}@{h}:{p}/{d}"),
        format!("postgres://{u}@{h}:{p}/{d}?password={SECRET}"),
        format!("postgresql://{u}@{h}:{p}/{d}?sslmode=disable&password={SECRET}"),
        format!("postgresql://{u}:{SECRET}@{h}:{p}/{d}"),
    ];
    for url in &forms {
        let builder = LockClient::builder(url).connect_timeout(ms(5000));
        let shown = format!("{builder:?}");
        assert_hidden(&shown, url);
        for part in [&h, &p.to_string(), &u, &d] {
            assert!(
                shown.contains(part.as_str()),
                "{url}: {part} not shown: {shown}"
            );
        }
        let client = match builder.build() {
            Ok(client) => client,
            Err(e) => panic!("{url}: the driver accepts this form, the build failed: {e}"),
        };
        assert_hidden(&format!("{client:?}"), url);
    }
    // An `@` after a `/` or `?` (here in a password) is refused: the driver
    // would take everything before it for the credentials. Never shown.
    for url in [
        format!("postgres://{u}:{SECRET}/x@{h}:{p}/{d}"),
        format!("postgres://{u}:{SECRET}?x=1@{h}:{p}/{d}"),
        format!("postgres://{u}:{SECRET}/a?b@{h}:{p}/{d}?sslmode=disable"),
        format!("postgres://{h}:{p}/{d}?password={SECRET}&application_name=a@b"),
    ] {
        let builder = LockClient::builder(&url);
        let shown = format!("{builder:?}");
        assert_hidden(&shown, &url);
        assert!(shown.contains("(unparseable connection string)"), "{shown}");
        let err = builder.build().unwrap_err();
        assert!(err.to_string().contains("%40"), "{err}");
        assert_hidden(&format!("{err} {err:?}"), &url);
    }
    // A string the driver cannot parse is not shown at all.
    let bad = format!("host={h} password='{SECRET} with spaces");
    let builder = LockClient::builder(&bad);
    let shown = format!("{builder:?}");
    assert_hidden(&shown, &bad);
    assert!(shown.contains("(unparseable connection string)"), "{shown}");
    let err = builder.build().unwrap_err();
    assert_hidden(&format!("{err} {err:?}"), &bad);
}

/// The same for Redis: user-and-password URLs (also with percent-encoded `/`
/// and `?`), `?password=` and `?pass=` parameters and Unix-socket URLs are
/// accepted, and `Debug` shows host, port, db and user, never the password.
#[test]
fn redis_passwords_never_show_in_debug() {
    let info =
        redis::IntoConnectionInfo::into_connection_info(common::redis_server::redis_url()).unwrap();
    let (h, p) = match info.addr() {
        redis::ConnectionAddr::Tcp(h, p) => (h.clone(), *p),
        other => panic!("the test Redis is not on TCP: {other:?}"),
    };
    // The default user has no password: `AUTH default <anything>` is accepted.
    let accepted = [
        format!("redis://default:{SECRET}@{h}:{p}/3"),
        format!("redis://default:{SECRET}%2Fx%3Fy@{h}:{p}/3"),
        format!("redis://default:{SECRET}%20with%20spaces@{h}:{p}/3"),
        format!("redis://{h}:{p}/3?password={SECRET}"),
        format!("redis://{h}:{p}/3?pass={SECRET}&protocol=resp2"),
    ];
    for url in &accepted {
        let builder = LockClient::redis(url);
        let shown = format!("{builder:?}");
        assert_hidden(&shown, url);
        for part in [&h, &p.to_string(), "/3"] {
            assert!(shown.contains(part), "{url}: {part} not shown: {shown}");
        }
        if url.contains("default:") {
            assert!(shown.contains("default@"), "{url}: user not shown: {shown}");
        }
        let client = match builder.build() {
            Ok(client) => client,
            Err(e) => panic!("{url}: accepted by the driver, the build failed: {e}"),
        };
        assert_hidden(&format!("{client:?}"), url);
    }
    // A Unix socket with `?pass=`: the path and db are shown; the failed
    // connection's error does not show the password either.
    let unix = format!("redis+unix:///nonexistent/lockbox.sock?db=2&pass={SECRET}");
    let builder = LockClient::redis(&unix).connect_timeout(ms(1000));
    let shown = format!("{builder:?}");
    assert_hidden(&shown, &unix);
    assert!(
        shown.contains("/nonexistent/lockbox.sock") && shown.contains("db=2"),
        "{shown}"
    );
    let err = builder.build().unwrap_err();
    assert_hidden(&format!("{err} {err:?}"), &unix);
    // Strings redis cannot parse are not shown at all, nor echoed by the error.
    for bad in [
        format!("redis://default:{SECRET}/x@{h}:{p}/3"),
        format!("redis://default:{SECRET}?x@{h}:{p}/3"),
        format!("redis://:{SECRET} with spaces@{h}:{p}"),
    ] {
        let builder = LockClient::redis(&bad);
        let shown = format!("{builder:?}");
        assert_hidden(&shown, &bad);
        if let Err(err) = builder.build() {
            assert_hidden(&format!("{err} {err:?}"), &bad);
        }
    }
}

/// Every duration the builder takes is refused at `build()` when out of range
/// (`Duration::MAX` included), with an `InvalidConfig` naming the setting and
/// the range — instead of building a client whose every acquire and `leases()`
/// then panics on `Instant` overflow.
#[test]
fn extreme_durations_are_refused_at_build() {
    let url = database_url();
    let huge = [
        Duration::MAX,
        Duration::from_secs(u64::MAX / 2),
        MAX_TIMEOUT + ms(1),
    ];
    let mut cases: Vec<(&str, LockClientBuilder)> = vec![];
    for d in huge {
        cases.push(("ttl", LockClient::builder(url).ttl(d)));
        cases.push(("renew interval", LockClient::builder(url).renew_interval(d)));
        cases.push(("pool timeout", LockClient::builder(url).pool_timeout(d)));
        cases.push((
            "connect timeout",
            LockClient::builder(url).connect_timeout(d),
        ));
        cases.push(("health timeout", LockClient::builder(url).health_timeout(d)));
        cases.push(("pool timeout", LockClient::memory().pool_timeout(d)));
    }
    cases.push((
        "renew interval",
        LockClient::builder(url).renew_interval(Duration::ZERO),
    ));
    cases.push((
        "pool timeout",
        LockClient::builder(url).pool_timeout(Duration::ZERO),
    ));
    cases.push((
        "connect timeout",
        LockClient::builder(url).connect_timeout(Duration::ZERO),
    ));
    cases.push((
        "health timeout",
        LockClient::builder(url).health_timeout(Duration::ZERO),
    ));
    for (what, builder) in cases {
        let shown = format!("{builder:?}");
        match builder.build() {
            Err(Error::InvalidConfig(msg)) => {
                assert!(msg.contains(what), "{what}: {msg}");
                assert!(msg.contains("..="), "{what}: no accepted range in {msg:?}");
            }
            other => panic!("{what} in {shown}: expected InvalidConfig, got {other:?}"),
        }
    }
}

/// The largest accepted timeouts build a client that works: acquire, wait,
/// list leases and rate its health without panicking.
#[test]
fn the_longest_accepted_timeouts_work() {
    let app = unique("maxtimeouts");
    let client = builder_for(&app)
        .ttl(MAX_TTL)
        .pool_timeout(MAX_TIMEOUT)
        .connect_timeout(MAX_TIMEOUT)
        .health_timeout(MAX_TIMEOUT)
        .pool_size(2)
        .build()
        .unwrap();
    let name = unique("maxtimeouts");
    let lock = client.try_lock(&name).unwrap().unwrap();
    assert_eq!(lock.ttl(), MAX_TTL);
    assert!(client.lease(&name).unwrap().is_some());
    assert!(!client.leases().unwrap().is_empty());
    assert!(client.health().database.reachable);
    lock.release().unwrap();
    let lock = client.lock_timeout(&name, Duration::MAX).unwrap();
    lock.release().unwrap();
    assert_eq!(advisory_locks_of(&app), 0);
}

/// Per-call durations: a TTL of `Duration::MAX` (or zero) is an `InvalidConfig`,
/// also for `extend`; waits of any length, `Duration::MAX` included, wait (as
/// long as it takes) and are granted on release — on PostgreSQL and in memory.
#[test]
fn extreme_per_call_durations_never_panic() {
    let pg = || {
        builder_for(&unique("percall"))
            .ttl(ms(2000))
            .build()
            .unwrap()
    };
    let shared = lockbox::MemoryBackend::new();
    let stores: [(&str, LockClient, LockClient); 2] = [
        ("postgres", pg(), pg()),
        (
            "memory",
            LockClient::with_backend(shared.clone())
                .ttl(ms(2000))
                .build()
                .unwrap(),
            LockClient::with_backend(shared)
                .ttl(ms(2000))
                .build()
                .unwrap(),
        ),
    ];
    let waits = [
        Duration::MAX,
        Duration::from_secs(u64::MAX / 2),
        Duration::from_secs(1 << 40),
        MAX_TIMEOUT + ms(1),
    ];
    for (store, a, b) in &stores {
        let name = unique("percall");
        for ttl in [Duration::MAX, Duration::ZERO, MAX_TTL + ms(1)] {
            match a.acquire(&name, &AcquireOptions::new().ttl(ttl)) {
                Err(Error::InvalidConfig(msg)) => assert!(msg.contains("ttl"), "{msg}"),
                other => panic!("{store}: ttl {ttl:?}: expected InvalidConfig, got {other:?}"),
            }
        }
        for wait in waits {
            // Free: granted at once.
            let opts = AcquireOptions::new().wait(wait);
            let lock = a.acquire(&name, &opts).unwrap().expect("free lock granted");
            assert!(matches!(
                lock.extend(Duration::MAX),
                Err(Error::InvalidConfig(_))
            ));
            lock.extend(MAX_TTL).unwrap();
            // Held: the waiter waits, and is granted on release.
            let token = lock.fencing_token();
            thread::scope(|s| {
                let waiter = s.spawn(|| b.acquire(&name, &opts));
                let waiting = eventually(Duration::from_secs(10), || {
                    b.metrics().acquires_waiting == 1
                });
                // Released whatever happened, so that the waiter ends.
                lock.release().unwrap();
                let got = waiter.join().unwrap().unwrap().expect("granted on release");
                assert!(waiting, "{store}: wait {wait:?}: the waiter did not wait");
                assert!(got.fencing_token() > token);
                got.release().unwrap();
            });
        }
        let lock = b.lock_timeout(&name, Duration::MAX).unwrap();
        lock.release().unwrap();
        let n = a
            .with_lock(&name, Duration::MAX, |l| l.fencing_token())
            .unwrap();
        assert!(n > 0);
    }
}
