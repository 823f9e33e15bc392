//! Production connections to PostgreSQL: TLS with libpq's `sslmode` semantics
//! against a throwaway cluster that takes TCP over TLS only (`hostssl`), client
//! certificates, Unix-domain sockets, and standbys or read-only sessions
//! refused at `build()`. Real servers; every wait bounded.

use crate::common;

use std::time::Duration;

use common::server::Cluster;
use common::tls::tls_server;
use common::*;
use lockbox::{Error, LockClient};

const PASSWORD: &str = "pw-never-shown-7731";

fn build(url: &str) -> Result<LockClient, Error> {
    LockClient::builder(url)
        .connect_timeout(Duration::from_secs(10))
        .build()
}

/// The `Connect` error's message; panics on anything else.
fn connect_error(url: &str) -> String {
    match build(url) {
        Err(e @ Error::Connect { .. }) => {
            let msg = e.to_string();
            eprintln!("{msg}");
            assert!(!msg.contains(PASSWORD), "password in {msg}");
            assert!(!format!("{e:?}").contains(PASSWORD), "password in {e:?}");
            msg
        }
        Err(other) => panic!("expected Error::Connect, got {other:?}"),
        Ok(_) => panic!("connected to {url}"),
    }
}

/// How many sessions of application `app` the TLS server has, and how many of
/// them are encrypted (by the server's own `pg_stat_ssl`).
fn sessions_and_encrypted(app: &str) -> (i64, i64) {
    let row = tls_server()
        .admin()
        .query_one(
            "SELECT count(*), count(*) FILTER (WHERE s.ssl) FROM pg_stat_activity a \
             JOIN pg_stat_ssl s USING (pid) WHERE a.application_name = $1",
            &[&app],
        )
        .unwrap();
    (row.get(0), row.get(1))
}

/// Takes and releases a lock, and checks the health probe, which opens a
/// connection of its own with the same settings.
fn exercise(client: &LockClient) {
    let name = unique("tls");
    let lock = client.try_lock(&name).unwrap().expect("lock free");
    assert!(client.try_lock(&name).unwrap().is_none());
    lock.release().unwrap();
    let health = client.health();
    assert!(health.database.reachable, "{health:?}");
    assert_eq!(health.database.writable, Some(true), "{health:?}");
}

#[test]
fn verify_full_with_the_ca_connects_and_every_session_is_encrypted() {
    let server = tls_server();
    let app = unique("tls-full");
    let client = build(&url_with_app(&server.verified_url(), &app)).unwrap();
    exercise(&client);
    let held = client.try_lock(&unique("tls-held")).unwrap().unwrap();
    let (sessions, encrypted) = sessions_and_encrypted(&app);
    assert!(sessions > 0);
    assert_eq!(encrypted, sessions, "unencrypted sessions of lockbox");
    drop(held);
}

#[test]
fn application_name_defaults_to_lockbox_and_the_url_overrides_it() {
    let server = tls_server();
    let client = build(&server.verified_url()).unwrap();
    let held = client.try_lock(&unique("tls-app")).unwrap().unwrap();
    let (sessions, encrypted) = sessions_and_encrypted("lockbox");
    assert!(sessions > 0, "no session named lockbox");
    assert_eq!(encrypted, sessions);
    drop(held);
}

#[test]
fn verify_full_with_a_wrong_host_name_fails_clearly() {
    let server = tls_server();
    // The certificate names `localhost`; 127.0.0.1 is the same server.
    let msg = connect_error(&server.url(
        &format!("postgres:{PASSWORD}@127.0.0.1"),
        &format!("sslmode=verify-full&sslrootcert={}", server.ca),
    ));
    assert!(msg.contains("host name mismatch"), "{msg}");
    assert!(msg.contains("127.0.0.1"), "{msg}");
}

#[test]
fn verify_ca_does_not_check_the_host_name() {
    let server = tls_server();
    let client = build(&server.url(
        "127.0.0.1",
        &format!("sslmode=verify-ca&sslrootcert={}", server.ca),
    ))
    .unwrap();
    exercise(&client);
}

#[test]
fn another_ca_fails_clearly_under_verify_ca_and_verify_full() {
    let server = tls_server();
    for mode in ["verify-ca", "verify-full"] {
        let msg = connect_error(&server.url(
            &format!("postgres:{PASSWORD}@localhost"),
            &format!("sslmode={mode}&sslrootcert={}", server.other_ca),
        ));
        assert!(msg.contains("not trusted"), "{mode}: {msg}");
    }
}

#[test]
fn verify_full_without_any_ca_is_refused_not_downgraded() {
    let server = tls_server();
    // No sslrootcert and (for this test's HOME) no ~/.postgresql/root.crt.
    let home = std::env::var_os("HOME").map(std::path::PathBuf::from);
    if home.is_some_and(|h| h.join(".postgresql/root.crt").exists()) {
        return;
    }
    match build(&server.url("localhost", "sslmode=verify-full")) {
        Err(Error::InvalidConfig(msg)) => assert!(msg.contains("sslrootcert"), "{msg}"),
        other => panic!("expected InvalidConfig, got {other:?}"),
    }
}

#[test]
fn require_and_prefer_encrypt_without_checking_the_certificate() {
    let server = tls_server();
    for mode in ["require", "prefer", "allow"] {
        let app = unique(&format!("tls-{mode}"));
        let url = url_with_app(&server.url("127.0.0.1", &format!("sslmode={mode}")), &app);
        let client = build(&url).unwrap_or_else(|e| panic!("{mode}: {e}"));
        exercise(&client);
        let held = client.try_lock(&unique("tls-held")).unwrap().unwrap();
        let (sessions, encrypted) = sessions_and_encrypted(&app);
        assert!(sessions > 0, "{mode}");
        assert_eq!(encrypted, sessions, "{mode}");
        drop(held);
    }
}

#[test]
fn the_default_sslmode_is_prefer() {
    let server = tls_server();
    let app = unique("tls-default");
    let client = build(&url_with_app(
        &format!("postgres://postgres@127.0.0.1:{}/postgres", server.port()),
        &app,
    ))
    .unwrap();
    let held = client.try_lock(&unique("tls-held")).unwrap().unwrap();
    let (sessions, encrypted) = sessions_and_encrypted(&app);
    assert!(sessions > 0);
    assert_eq!(encrypted, sessions);
    drop(held);
}

#[test]
fn disable_against_a_hostssl_only_server_fails_clearly() {
    let server = tls_server();
    let msg =
        connect_error(&server.url(&format!("postgres:{PASSWORD}@127.0.0.1"), "sslmode=disable"));
    assert!(msg.contains("no pg_hba.conf entry"), "{msg}");
    assert!(msg.contains("no encryption"), "{msg}");
    assert!(msg.contains("SQLSTATE 28000"), "{msg}");
}

#[test]
fn key_value_strings_take_the_same_options() {
    let server = tls_server();
    let client = build(&format!(
        "host=localhost port={} user=postgres dbname=postgres sslmode=verify-full sslrootcert='{}'",
        server.port(),
        server.ca
    ))
    .unwrap();
    exercise(&client);
}

#[test]
fn client_certificate_authentication_works() {
    let server = tls_server();
    let with_cert = format!(
        "postgres://certuser@localhost:{}/postgres?sslmode=verify-full&sslrootcert={}\
         &sslcert={}&sslkey={}",
        server.port(),
        server.ca,
        server.client_cert,
        server.client_key
    );
    let app = unique("tls-cert");
    let client = build(&url_with_app(&with_cert, &app)).unwrap();
    exercise(&client);
    let held = client.try_lock(&unique("tls-held")).unwrap().unwrap();
    let row = server
        .admin()
        .query_one(
            "SELECT count(*), count(*) FILTER (WHERE s.ssl AND s.client_dn = '/CN=certuser') \
             FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
             WHERE a.application_name = $1 AND a.usename = 'certuser'",
            &[&app],
        )
        .unwrap();
    let (sessions, by_cert): (i64, i64) = (row.get(0), row.get(1));
    assert!(sessions > 0);
    assert_eq!(by_cert, sessions);
    drop(held);
    // Without the certificate the server refuses the role.
    let msg = connect_error(&format!(
        "postgres://certuser:{PASSWORD}@localhost:{}/postgres?sslmode=verify-full&sslrootcert={}",
        server.port(),
        server.ca
    ));
    assert!(msg.contains("certificate"), "{msg}");
}

#[test]
fn require_against_a_server_without_tls_fails_clearly() {
    // A throwaway cluster's default: ssl = off.
    let plain = Cluster::start().unwrap();
    let msg = connect_error(&format!(
        "postgres://postgres:{PASSWORD}@127.0.0.1:{}/postgres?sslmode=require",
        plain.port
    ));
    assert!(msg.contains("does not support TLS"), "{msg}");
    // `prefer` goes on in plain text there, as in libpq.
    build(&format!(
        "postgres://postgres@127.0.0.1:{}/postgres?sslmode=prefer",
        plain.port
    ))
    .unwrap();
}

#[test]
fn unix_socket_urls_connect_and_are_described_by_path() {
    let server = tls_server();
    let dir = server.cluster.socket_dir();
    for url in [
        server.socket_url(),
        format!(
            "host={dir} port={} user=postgres dbname=postgres sslmode=require",
            server.port()
        ),
    ] {
        let builder = LockClient::builder(&url);
        let debug = format!("{builder:?}");
        assert!(debug.contains(&dir), "{debug}");
        let client = builder.build().unwrap_or_else(|e| panic!("{url}: {e}"));
        exercise(&client);
    }
    match build(&format!(
        "host={dir} port={} user=postgres sslmode=verify-full sslrootcert={}",
        server.port(),
        server.ca
    )) {
        Err(Error::InvalidConfig(msg)) => assert!(msg.contains("Unix-domain socket"), "{msg}"),
        other => panic!("expected InvalidConfig, got {other:?}"),
    }
}

#[test]
fn a_standby_is_refused_and_a_failover_url_finds_the_primary() {
    let primary = Cluster::start().unwrap();
    let standby = Cluster::standby_of(&primary).unwrap();
    let url = |ports: &[u16], query: &str| {
        let hosts: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        format!("postgres://postgres@{}/postgres{query}", hosts.join(","))
    };
    // The table exists on the standby too, so only its read-only state stops it.
    build(&url(&[primary.port], "")).unwrap();
    assert!(eventually(Duration::from_secs(20), || {
        postgres::Client::connect(&url(&[standby.port], ""), postgres::NoTls)
            .and_then(|mut c| {
                c.query_one(
                    "SELECT count(*) FROM pg_class WHERE relname = 'lockbox_leases'",
                    &[],
                )
            })
            .is_ok_and(|r| r.get::<_, i64>(0) == 1)
    }));
    match build(&url(&[standby.port], "")) {
        Err(Error::Unsupported(msg)) => {
            assert!(msg.contains("standby"), "{msg}");
            assert!(msg.contains("primary"), "{msg}");
        }
        other => panic!("expected Unsupported, got {other:?}"),
    }
    // Standby listed first: target_session_attrs=read-write skips it.
    let app = unique("failover");
    let client = build(&url_with_app(
        &url(
            &[standby.port, primary.port],
            "?target_session_attrs=read-write",
        ),
        &app,
    ))
    .unwrap();
    exercise(&client);
    // Only standbys: the driver's check says why it found no host.
    let msg = connect_error(&url(&[standby.port], "?target_session_attrs=read-write"));
    assert!(msg.contains("does not allow writes"), "{msg}");
    // Without it, the first host answers and is refused.
    match build(&url(&[standby.port, primary.port], "")) {
        Err(Error::Unsupported(msg)) => assert!(msg.contains("standby"), "{msg}"),
        other => panic!("expected Unsupported, got {other:?}"),
    }
}

#[test]
fn a_read_only_session_is_refused() {
    let server = tls_server();
    let role = unique("ro").replace('-', "_");
    server
        .admin()
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN SUPERUSER; \
             ALTER ROLE {role} SET default_transaction_read_only = on"
        ))
        .unwrap();
    match build(&format!(
        "postgres://{role}@localhost:{}/postgres?sslmode=verify-full&sslrootcert={}",
        server.port(),
        server.ca
    )) {
        Err(Error::Unsupported(msg)) => assert!(msg.contains("read-only"), "{msg}"),
        other => panic!("expected Unsupported, got {other:?}"),
    }
}

#[test]
fn sessions_opened_after_a_write_fence_are_refused() {
    let server = tls_server();
    let role = unique("fenced").replace('-', "_");
    server
        .admin()
        .batch_execute(&format!("CREATE ROLE {role} LOGIN SUPERUSER"))
        .unwrap();
    let client = LockClient::builder(&format!(
        "postgres://{role}@localhost:{}/postgres?sslmode=verify-full&sslrootcert={}",
        server.port(),
        server.ca
    ))
    .pool_timeout(Duration::from_secs(2))
    .build()
    .unwrap();
    // An operator fences writes off (as a failover tool does on the old
    // primary): the pool's next session is refused, not pinned writable.
    server
        .admin()
        .batch_execute(&format!(
            "ALTER ROLE {role} SET default_transaction_read_only = on"
        ))
        .unwrap();
    match client.try_lock(&unique("fenced")) {
        Err(e) => assert!(e.to_string().contains("read-only"), "{e}"),
        Ok(lock) => panic!("granted on a fenced server: {lock:?}"),
    }
}

/// The deadline's cancel request reaches a TLS server: it goes through the
/// same TLS settings as the session (with `sslmode=verify-full` the driver
/// would refuse to send it in plain text). A renewal stuck in the executor,
/// where no timeout of its own reaches, is cancelled.
#[test]
fn a_stuck_renewal_is_cancelled_over_tls() {
    let server = tls_server();
    let ttl = ms(600);
    let schema = unique("tlsddl").replace('-', "_");
    let table = format!("{schema}.leases");
    let mut db = server.admin();
    db.batch_execute(&format!("CREATE SCHEMA {schema}"))
        .unwrap();
    // A session of its own: a shared session is never sent a cancel request
    // (its renewals bound their own wait for the table: stuck_renewal.rs).
    let client = LockClient::builder(&server.verified_url())
        .table(&table)
        .ttl(ttl)
        .locks_per_session(1)
        .build()
        .unwrap();
    let name = unique("tlsddl");
    let lock = client.try_lock(&name).unwrap().unwrap();
    let holder: i32 = db
        .query_one(
            &format!("SELECT holder_pid FROM {table} WHERE name = $1"),
            &[&name],
        )
        .unwrap()
        .get(0);
    let stuck = |pid: i32| -> bool {
        server
            .admin()
            .query_one(
                "SELECT count(*) > 0 FROM pg_stat_activity \
                 WHERE pid = $1 AND wait_event = 'PgSleep'",
                &[&pid],
            )
            .unwrap()
            .get(0)
    };
    // Stuck in the executor, where no timeout of its own reaches: a trigger
    // (after the update, which build() allows) that sleeps for a minute.
    db.batch_execute(&format!(
        "CREATE FUNCTION {schema}.stall() RETURNS trigger LANGUAGE plpgsql AS \
             $$ BEGIN PERFORM pg_sleep(60); RETURN NULL; END $$; \
         CREATE TRIGGER stall AFTER UPDATE ON {table} \
             FOR EACH ROW EXECUTE FUNCTION {schema}.stall()"
    ))
    .unwrap();
    assert!(eventually(ttl * 2, || stuck(holder)), "renewal not stuck");
    assert_eq!(
        lock.lost().recv_timeout(ttl * 2),
        Ok(lockbox::LostReason::Expired)
    );
    // Cancelled while the trigger still sleeps.
    let cancelled = eventually(ttl * 3, || !stuck(holder));
    db.batch_execute(&format!("DROP TRIGGER stall ON {table}"))
        .unwrap();
    assert!(cancelled, "the stuck renewal was never cancelled");
    drop(lock);
}

/// Every lockbox session of `app` on the TLS server is encrypted (and there is one).
fn all_encrypted(client: &LockClient, app: &str) {
    let held = client.try_lock(&unique("tls-held")).unwrap().unwrap();
    let (sessions, encrypted) = sessions_and_encrypted(app);
    assert!(sessions > 0, "no session of {app}");
    assert_eq!(encrypted, sessions, "unencrypted sessions of {app}");
    drop(held);
}

/// A Unix-domain socket path as `host` with a `hostaddr` at the same index is
/// a TCP connection to that address (the driver connects there, with no host
/// name): its `sslmode` holds, never downgraded to the socket's plain text.
#[test]
fn a_socket_host_with_a_hostaddr_is_tcp_and_keeps_its_sslmode() {
    let server = tls_server();
    let dir = server.cluster.socket_dir();
    let app = unique("tls-sockaddr");
    let base = format!(
        "host={dir} hostaddr=127.0.0.1 port={} user=postgres dbname=postgres \
         application_name={app}",
        server.port()
    );
    nameless_tls(
        &base,
        &app,
        &[
            "sslmode=require".to_owned(),
            format!("sslmode=verify-ca sslrootcert={}", server.ca),
        ],
    );
}

/// With no host name to check the certificate against (`base` connects by
/// address): each of `modes` connects over TLS, and verify-full is refused.
fn nameless_tls(base: &str, app: &str, modes: &[String]) {
    for extra in modes {
        let client = build(&format!("{base} {extra}")).unwrap_or_else(|e| panic!("{extra}: {e}"));
        exercise(&client);
        all_encrypted(&client, app);
    }
    match build(&format!(
        "{base} sslmode=verify-full sslrootcert={}",
        tls_server().ca
    )) {
        Err(Error::InvalidConfig(msg)) => assert!(msg.contains("host name"), "{msg}"),
        other => panic!("expected InvalidConfig, got {other:?}"),
    }
}

/// `hostaddr` without `host` connects as libpq does: over TLS under prefer
/// (the default), require and verify-ca, the certificate's name unchecked;
/// verify-full, which needs a host name, is refused.
#[test]
fn hostaddr_alone_connects_over_tls_and_verify_full_is_refused() {
    let server = tls_server();
    let app = unique("tls-hostaddr");
    let base = format!(
        "hostaddr=127.0.0.1 port={} user=postgres dbname=postgres application_name={app}",
        server.port()
    );
    nameless_tls(
        &base,
        &app,
        &[
            String::new(),
            "sslmode=prefer".to_owned(),
            "sslmode=require".to_owned(),
            format!("sslmode=verify-ca sslrootcert={}", server.ca),
        ],
    );
}

/// A key/value string is read exactly as the driver reads it (Unicode
/// whitespace separates, a trailing `\` is dropped): an `sslmode=require`
/// the driver sees is honoured, never turned into prefer, and a string that
/// does not parse is refused without showing it.
#[test]
fn key_value_strings_are_read_as_the_driver_reads_them() {
    // A server without TLS: `require` must fail there, prefer would connect.
    let plain = Cluster::start().unwrap();
    for url in [
        format!(
            "host=127.0.0.1\u{2003}sslmode=require port={} user=postgres dbname=postgres",
            plain.port
        ),
        format!(
            "host=127.0.0.1\u{a0}port={}\u{a0}sslmode=require user=postgres",
            plain.port
        ),
        format!(
            "host=127.0.0.1 port={} sslmode=require user=postgres dbname=postgres\\",
            plain.port
        ),
    ] {
        let msg = connect_error(&url);
        assert!(msg.contains("does not support TLS"), "{url:?}: {msg}");
    }
    for bad in [
        format!("host=127.0.0.1 password='{PASSWORD}"),
        format!("host=127.0.0.1 {PASSWORD}"),
        format!("host=127.0.0.1 password={PASSWORD} ={PASSWORD} sslmode=require"),
    ] {
        match build(&bad) {
            Err(e @ Error::InvalidConfig(_)) => {
                let shown = format!("{e} {e:?}");
                assert!(!shown.contains(PASSWORD), "{shown}");
                assert!(shown.contains("connection string"), "{shown}");
            }
            other => panic!("{bad:?}: expected InvalidConfig, got {other:?}"),
        }
    }
}

/// An `@` after the host part (in the path or query) would make the driver
/// take everything before it for credentials, and the text after it for the
/// host: such URLs are refused, telling to percent-encode it, and never show
/// the password.
#[test]
fn an_at_sign_after_the_host_is_refused_without_showing_the_password() {
    let server = tls_server();
    let port = server.port();
    for url in [
        format!(
            "postgres://localhost:{port}/postgres?sslmode=verify-full&sslrootcert={}\
             &application_name=svc@blue",
            server.ca
        ),
        format!("postgres://127.0.0.1:{port}/postgres?password={PASSWORD}&application_name=a@b"),
        format!("postgresql://127.0.0.1:{port}?password={PASSWORD}&x=a@b"),
    ] {
        let shown = format!("{:?}", LockClient::builder(&url));
        assert!(!shown.contains(PASSWORD), "{shown}");
        match build(&url) {
            Err(e @ Error::InvalidConfig(_)) => {
                let shown = format!("{e} {e:?}");
                assert!(shown.contains("%40"), "{shown}");
                assert!(!shown.contains(PASSWORD), "{shown}");
            }
            other => panic!("{url}: expected InvalidConfig, got {other:?}"),
        }
    }
    // Credentials before the host, and an `@` percent-encoded in the query.
    let client = build(&format!(
        "postgres://postgres:{PASSWORD}@localhost:{port}/postgres?sslmode=verify-full\
         &sslrootcert={}&application_name=svc%40blue",
        server.ca
    ))
    .unwrap();
    exercise(&client);
}
