//! Review (attack on the Redis "Production connections" change): no Redis
//! password in an error, whatever URL form the driver accepts.
//!
//! 1. `?protocol=resp3` (accepted by lockbox, and lockbox works over it) makes
//!    the driver log in with `HELLO 3 AUTH user password` instead of `AUTH`.
//!    When the server refuses `HELLO` as an unknown command — a Redis 7 with
//!    `rename-command HELLO …`, as hardened deployments do — Redis 7 answers
//!    `ERR unknown command 'HELLO', with args beginning with: '3' 'AUTH' 'user'
//!    'password'`, and the driver passes that text on (it only recognises the
//!    backquoted form of Redis 6). `OpenError` has no explanation for it, so
//!    its Display — the `Error::Connect` text, the health report, the
//!    listener's log line — and every Debug show the password, over TCP, TLS
//!    and the Unix socket, for the default user and an ACL user.
//! 2. The driver's URL error for a bad `protocol` value quotes the value; a
//!    query typed with `?` for `&` (`?protocol=resp3?pass=…`) puts the
//!    password in it, and lockbox's `InvalidConfig` text repeats it (its
//!    comment says the driver's URL errors are fixed texts).

use crate::common;

use std::time::Duration;

use common::redis_server::{RedisServer, certs, encode};
use lockbox::LockClient;

const MARK: &str = "Hunter2Zebra";
const PASSWORD: &str = "Hunter2Zebra/?@ x";

fn assert_clean(url: &str, what: &str, shown: &str) {
    assert!(
        !shown.contains(MARK),
        "{what} shows the password (URL {url}): {shown}"
    );
}

#[test]
fn a_server_that_refuses_hello_never_gets_the_password_into_an_error() {
    let renamed = ["--rename-command", "HELLO", "lockbox-review-hello-off"];
    let plain = RedisServer::start_with(&renamed).expect("redis-server");
    let tls = RedisServer::start_tls("no", &renamed).expect("redis-server");
    let pw = encode(PASSWORD);
    let urls = [
        format!("redis://:{pw}@127.0.0.1:{}/?protocol=resp3", plain.port),
        format!(
            "redis://lockbox:{pw}@127.0.0.1:{}/?protocol=resp3",
            plain.port
        ),
        format!(
            "redis+unix://{}?user=lockbox&pass={pw}&protocol=resp3",
            plain.socket.display()
        ),
        format!("unix://{}?pass={pw}&protocol=3", plain.socket.display()),
        format!(
            "rediss://lockbox:{pw}@localhost:{}/?protocol=resp3",
            tls.port
        ),
    ];
    for url in &urls {
        let builder = LockClient::redis(url).connect_timeout(Duration::from_secs(2));
        let builder = if url.starts_with("rediss") {
            builder.redis_tls_ca_file(&certs().ca)
        } else {
            builder
        };
        assert_clean(url, "the builder's Debug", &format!("{builder:?}"));
        let err = match builder.build() {
            Ok(_) => panic!("connected to a server without HELLO over RESP3: {url}"),
            Err(e) => e,
        };
        assert_clean(url, "the error", &err.to_string());
        assert_clean(url, "the error's Debug", &format!("{err:?}"));
    }
}

#[test]
fn a_mistyped_protocol_parameter_never_gets_the_password_into_an_error() {
    let urls = [
        format!("redis+unix:///run/redis.sock?protocol=resp3?pass={MARK}"),
        format!("unix:///run/redis.sock?db=0&protocol=3?pass={MARK}"),
        format!("rediss://lockbox@localhost:6380/?protocol=resp3?password={MARK}"),
    ];
    for url in &urls {
        assert_clean(
            url,
            "the builder's Debug",
            &format!("{:?}", LockClient::redis(url)),
        );
        let err = match LockClient::redis(url).build() {
            Ok(_) => panic!("built with an invalid protocol: {url}"),
            Err(e) => e,
        };
        assert_clean(url, "the error", &err.to_string());
        assert_clean(url, "the error's Debug", &format!("{err:?}"));
    }
}
