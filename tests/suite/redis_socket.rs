//! Redis over a Unix-domain socket: `redis+unix:///path` and `unix:///path`,
//! with `?db=N` and `?user=…&pass=…`; the release listener comes the same way.

use crate::common;

use common::redis_server::{
    ACL_PASSWORD, ACL_USER, RedisServer, add_acl_user, encode, mark_intact,
    release_wakes_the_waiter,
};
use common::*;
use lockbox::LockClient;

fn exists(admin: &mut redis::Connection, db: i64, key: &str) -> bool {
    let () = redis::cmd("SELECT").arg(db).query(admin).unwrap();
    redis::cmd("EXISTS").arg(key).query::<i64>(admin).unwrap() == 1
}

#[test]
fn both_url_forms_and_the_database_number() {
    let server = RedisServer::start().expect("redis-server");
    let mut admin = server.connection();
    let sock = server.socket.display().to_string();
    for (url, db) in [
        (format!("redis+unix://{sock}"), 0),
        (format!("unix://{sock}"), 0),
        (format!("redis+unix://{sock}?db=3"), 3),
        (format!("unix://{sock}?db=5"), 5),
    ] {
        // The database's own data-loss marker (see the harness).
        mark_intact(&url);
        let client = LockClient::redis(&url).ttl(ms(1000)).build().unwrap();
        let name = unique("socket");
        let lock = client.try_lock(&name).unwrap().expect("free");
        let key = format!("lockbox:lock:{name}");
        assert!(exists(&mut admin, db, &key), "{url}: not in db {db}");
        for other in [0, 3, 5].into_iter().filter(|d| *d != db) {
            assert!(!exists(&mut admin, other, &key), "{url}: in db {other}");
        }
        lock.release().unwrap();
        // Healthy once its release listener is connected (over the socket).
        assert!(
            eventually(ms(5000), || client.health().is_healthy()),
            "{url}: {}",
            client.health()
        );
        let shown = format!("{client:?} {:?}", LockClient::redis(&url));
        assert!(
            shown.contains(&format!("redis+unix://{sock}?db={db}")),
            "{shown}"
        );
    }
}

/// An ACL user over the socket (`?user=…&pass=…`), its release listener too.
#[test]
fn an_acl_user_over_the_socket_and_its_listener() {
    let server = RedisServer::start().expect("redis-server");
    let mut admin = server.connection();
    add_acl_user(&mut admin);
    let url = format!(
        "redis+unix://{}?user={ACL_USER}&pass={}",
        server.socket.display(),
        encode(ACL_PASSWORD)
    );
    let builder = || LockClient::redis(&url);
    let (holder, waiter) = (builder().build().unwrap(), builder().build().unwrap());
    let subs = release_wakes_the_waiter(&holder, &waiter, &mut admin);
    assert_eq!(subs.len(), 2, "{subs:?}");
    for line in &subs {
        assert!(
            line.contains(&format!(" user={ACL_USER} ")) && line.contains(" laddr=/"),
            "a subscriber did not come over the socket as the user: {line}"
        );
    }
    let shown = format!("{holder:?}");
    assert!(!shown.contains("Acl-Pass"), "{shown}");
}
