//! Redis ACL users (`redis://user:password@host:port`): a user with only the
//! rule the README gives can do everything lockbox does (acquire, wait, renew,
//! release, list, health, restart detection), its release listener included;
//! refused credentials are a clear error that never shows the password.

use crate::common;

use std::time::Duration;

use common::redis_server::{
    ACL_PASSWORD, ACL_RULE, ACL_USER, RedisServer, add_acl_user, encode, release_is_heard,
    release_wakes_the_waiter,
};
use common::*;
use lockbox::{Error, LockClient};

const ADMIN_PASSWORD: &str = "admin-secret";

/// A server whose default user needs [`ADMIN_PASSWORD`], with the ACL user.
fn server() -> (RedisServer, redis::Connection) {
    let server = RedisServer::start_with(&["--requirepass", ADMIN_PASSWORD]).expect("redis-server");
    let admin_url = format!(
        "redis+unix://{}?pass={ADMIN_PASSWORD}",
        server.socket.display()
    );
    let mut admin = (0..500)
        .find_map(|_| {
            redis::Client::open(admin_url.as_str())
                .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(5)))
                .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c).map(|_| c))
                .map_err(|_| std::thread::sleep(ms(10)))
                .ok()
        })
        .expect("admin connection");
    add_acl_user(&mut admin);
    common::redis_server::mark_intact(&admin_url);
    (server, admin)
}

fn user_url(server: &RedisServer, password: &str) -> String {
    format!(
        "redis://{ACL_USER}:{}@127.0.0.1:{}/",
        encode(password),
        server.port
    )
}

/// The README's rule is the one these tests give the user.
#[test]
fn the_readme_gives_the_rule_tested_here() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let squeeze = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(
        squeeze(&readme).contains(&squeeze(ACL_RULE)),
        "README.md does not give the ACL rule: {ACL_RULE}"
    );
}

#[test]
fn a_user_with_only_the_readme_rule_can_do_everything() {
    let (server, mut admin) = server();
    let url = user_url(&server, ACL_PASSWORD);
    let builder = || LockClient::redis(&url).ttl(ms(600));
    let (holder, waiter) = (builder().build().unwrap(), builder().build().unwrap());
    let name = unique("acl");
    let lock = holder
        .acquire(&name, &lockbox::AcquireOptions::new().metadata("acl"))
        .unwrap()
        .expect("free");
    // Renewals (the renewal script) go through.
    assert!(eventually(ms(5000), || holder.metrics().renewals_ok >= 2));
    assert!(lock.is_held());
    lock.extend(ms(900)).unwrap();
    // Listing (SCAN and the listing script).
    let listed = holder.leases().unwrap();
    assert!(listed.iter().any(|l| l.name == name), "{listed:?}");
    lock.release().unwrap();
    // Health reads INFO (the server's run id too: restart detection works)
    // and finds nothing to warn about.
    let health = holder.health();
    assert!(health.is_healthy(), "{health}");
    assert!(health.database.warnings.is_empty(), "{health}");
    assert!(health.database.server_version.is_some(), "{health}");
    // Readers, a waiting writer, permits and a waiting permit (the shared
    // lease scripts, their marks and queue), a forced release.
    let shared = unique("acl-shared");
    let rw = holder.rwlock(&shared).unwrap();
    let reader = rw.try_read().unwrap().expect("free");
    assert!(
        waiter
            .rwlock(&shared)
            .unwrap()
            .write_timeout(ms(200))
            .is_err()
    );
    assert!(eventually(ms(5000), || holder.metrics().renewals_ok >= 4));
    assert!(!holder.leases_of(&shared).unwrap().is_empty());
    reader.release().unwrap();
    let sem = holder.semaphore(&format!("{shared}-sem"), 1).unwrap();
    let permit = sem.try_acquire().unwrap().expect("free");
    assert!(sem.acquire_timeout(ms(200)).is_err());
    assert_eq!(
        holder.force_release(&format!("{shared}-sem")).unwrap(),
        Some(permit.fencing_token())
    );
    // (The handles hold their clients: dropped so the clients can end.)
    drop((permit, sem, rw));
    // Waiting, and the release listener, as the user.
    let subs = release_wakes_the_waiter(&holder, &waiter, &mut admin);
    assert_eq!(subs.len(), 2, "{subs:?}");
    for line in &subs {
        assert!(line.contains(&format!(" user={ACL_USER} ")), "{line}");
    }
    // Nothing was refused along the way, the listeners' unsubscribing when
    // their clients are dropped included (but the driver's `CLIENT SETINFO`,
    // whose answer it ignores, on servers that have it: 7.2 and later).
    drop((holder, waiter));
    assert!(eventually(ms(5000), || common::redis_server::subscribers(
        &mut admin
    )
    .is_empty()));
    let log: Vec<redis::Value> = redis::cmd("ACL").arg("LOG").query(&mut admin).unwrap();
    let refused: Vec<String> = log
        .iter()
        .map(|entry| format!("{entry:?}"))
        .filter(|entry| !entry.contains("client|setinfo"))
        .collect();
    assert!(refused.is_empty(), "refused: {refused:#?}");
}

#[test]
fn refused_credentials_are_a_clear_error_without_the_password() {
    let (server, mut admin) = server();
    let wrong = "Wrong-Pass/word 9";
    let err = LockClient::redis(&user_url(&server, wrong))
        .build()
        .unwrap_err();
    let (shown, debug) = (err.to_string(), format!("{err:?}"));
    assert!(matches!(err, Error::Connect { .. }), "{debug}");
    assert!(shown.contains("authentication failed"), "{shown}");
    assert!(
        shown.contains(&format!("redis://{ACL_USER}@127.0.0.1:")),
        "{shown}"
    );
    for secret in ["Wrong", "word 9", "word%209"] {
        assert!(
            !shown.contains(secret) && !debug.contains(secret),
            "{debug}"
        );
    }
    // A user that is off: the same.
    let () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg(ACL_USER)
        .arg("off")
        .query(&mut admin)
        .unwrap();
    let err = LockClient::redis(&user_url(&server, ACL_PASSWORD))
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("authentication failed"), "{err}");
    // No password at all for a server that requires one.
    let err = LockClient::redis(&server.url).build().unwrap_err();
    assert!(matches!(err, Error::Connect { .. }), "{err:?}");
    assert!(err.to_string().contains("requires authentication"), "{err}");
}

/// A user the server does not let subscribe (the README's rule without
/// `+psubscribe`): the listener subscribes once as its connection opens, so
/// health reports it dead at once (before: alive, the refusal taken for a
/// confirmation), and a waiter, which polls while nobody listens, still gets
/// the lock soon after the release (before: only at its timeout).
#[test]
fn a_user_that_may_not_subscribe_shows_in_health_and_waiters_still_get_the_lock() {
    let (server, mut admin) = server();
    deny(&mut admin, "-psubscribe");
    let url = user_url(&server, ACL_PASSWORD);
    let ttl = Duration::from_secs(30);
    let waiter = LockClient::redis(&url).ttl(ttl).build().unwrap();
    assert!(
        eventually(ms(5000), || waiter.health().database.listener_alive
            == Some(false)),
        "health says the listener is alive: {}",
        waiter.health()
    );
    assert!(!waiter.health().is_healthy());
    // Refused, the listener tries again less and less often (before: a new
    // connection every 200 ms, with a warning each time, for ever).
    let connections = |admin: &mut redis::Connection| -> u64 {
        let info: String = redis::cmd("INFO").arg("stats").query(admin).unwrap();
        common::redis_server::info_u64(&info, "total_connections_received")
    };
    let before = connections(&mut admin);
    std::thread::sleep(ms(3000));
    let opened = connections(&mut admin) - before;
    assert!(opened <= 6, "{opened} connections in 3 s");
    let holder = LockClient::redis(&url).ttl(ttl).build().unwrap();
    let name = unique("acl-no-psubscribe");
    let lock = holder.try_lock(&name).unwrap().expect("free");
    release_is_heard(
        &waiter,
        &name,
        lock,
        Duration::from_secs(6),
        || waiter.metrics().acquires_waiting == 1,
        || (),
    );
}

/// A user who may subscribe but not unsubscribe: the listener's first
/// attempt subscribes, unsubscribes and is refused. Health right after
/// `build()` waits for that whole attempt and says the listener is dead
/// (review of 6af2d93: it said alive, and Healthy, read between the
/// confirmation and the refusal). The listener's unsubscribe is held in a
/// proxy until the probe's last answer (the marker's run id) has passed.
#[test]
fn a_user_that_may_not_unsubscribe_shows_in_health_right_after_build() {
    let (server, mut admin) = server();
    deny(&mut admin, "-punsubscribe");
    let answer = common::redis_server::probe_last_answer(&mut admin);
    let proxy = common::proxy::Proxy::start(&format!("127.0.0.1:{}", server.port));
    proxy.hold_until(
        |piece| piece.windows(12).any(|w| w == b"PUNSUBSCRIBE"),
        move |piece| piece == answer,
    );
    let url = format!(
        "redis://{ACL_USER}:{}@127.0.0.1:{}/",
        encode(ACL_PASSWORD),
        proxy.port
    );
    let client = LockClient::redis(&url)
        .health_timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    assert!(eventually(ms(5000), || proxy.held() == 1));
    let health = client.health();
    assert_eq!(health.database.listener_alive, Some(false), "{health}");
    assert!(!health.is_healthy(), "{health}");
}

/// The same, with the refusal arriving only after the health timeout (a
/// slow link, not a lost one): health cannot wait for the attempt's outcome,
/// and a listener whose first attempt is unsettled counts as not alive
/// (review of 5cf0bbd: it read `alive`, set at the subscription's
/// confirmation, and said Healthy). The unsubscribe is held until a marker,
/// sent once health has answered, passes the proxy.
#[test]
fn a_user_that_may_not_unsubscribe_is_not_healthy_before_the_refusal_arrives() {
    let (server, mut admin) = server();
    deny(&mut admin, "-punsubscribe");
    let marker = unique("let-go").into_bytes();
    let m = marker.clone();
    let proxy = common::proxy::Proxy::start(&format!("127.0.0.1:{}", server.port));
    proxy.hold_until(
        |piece| piece.windows(12).any(|w| w == b"PUNSUBSCRIBE"),
        move |piece| piece.windows(m.len()).any(|w| w == &m[..]),
    );
    let url = format!(
        "redis://{ACL_USER}:{}@127.0.0.1:{}/",
        encode(ACL_PASSWORD),
        proxy.port
    );
    let client = LockClient::redis(&url)
        .health_timeout(ms(300))
        .build()
        .unwrap();
    assert!(eventually(ms(5000), || proxy.held() == 1));
    let first = client.health();
    let mut via_proxy = redis::Client::open(
        format!("redis://:{ADMIN_PASSWORD}@127.0.0.1:{}/", proxy.port).as_str(),
    )
    .unwrap()
    .get_connection()
    .unwrap();
    let _: Vec<u8> = redis::cmd("ECHO")
        .arg(&marker)
        .query(&mut via_proxy)
        .unwrap();
    assert!(eventually(ms(5000), || proxy.held() == 0));
    assert_eq!(first.database.listener_alive, Some(false), "{first}");
    assert!(!first.is_healthy(), "{first}");
    // Once the refusal has arrived, every later health says so too.
    assert!(eventually(ms(5000), || {
        client.health().database.listener_alive == Some(false)
    }));
}

/// Takes `rule` (`-psubscribe`…) away from the ACL user.
fn deny(admin: &mut redis::Connection, rule: &str) {
    let () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg(ACL_USER)
        .arg(rule)
        .query(admin)
        .unwrap();
}

/// A script whose command the user may not run fails with the server's
/// refusal, not with a message that blames a key's type (the scripts check
/// types with their reads, whose failures are told apart).
#[test]
fn a_refused_command_is_reported_as_refused() {
    let (server, mut admin) = server();
    deny(&mut admin, "-hmget");
    let err = LockClient::redis(&user_url(&server, ACL_PASSWORD))
        .build()
        .and_then(|c| c.try_lock("refused").map(|_| ()))
        .expect_err("HMGET is refused");
    let shown = err.to_string();
    assert!(shown.contains("can't run this command"), "{shown}");
    assert!(!shown.contains("holds a"), "{shown}");
}
