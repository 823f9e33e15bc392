//! No Redis password reaches an error, a Debug output or a log line, whatever
//! form the URL gives it in (user info, `?pass=`, `?password=`; TCP, TLS or
//! unix socket; the default user or an ACL user) and whatever it contains
//! (`/`, `?`, `@`, spaces), and whatever failed (credentials, a TLS check, a
//! server that does not speak TLS). Targets are described from the parsed
//! configuration. (Its own process: it installs the global logger.)

mod common;

use std::sync::{Mutex, Once};
use std::time::Duration;

use common::redis_server::{RedisServer, add_acl_user_with_password, certs, encode};
use common::*;
use lockbox::LockClient;

/// The secret's distinctive part, which percent-encoding leaves as it is.
const MARK: &str = "Hunter2Zebra";
const PASSWORD: &str = "Hunter2Zebra/?@ x y";
const WRONG: &str = "Hunter2ZebraWrong/?@ z";

static LINES: Mutex<Vec<String>> = Mutex::new(Vec::new());

struct Capture;

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }
    fn log(&self, record: &log::Record) {
        LINES.lock().unwrap().push(record.args().to_string());
    }
    fn flush(&self) {}
}

fn capture_logs() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        log::set_logger(&Capture).unwrap();
        log::set_max_level(log::LevelFilter::Trace);
    });
}

fn assert_clean(what: &str, shown: &str) {
    assert!(!shown.contains(MARK), "{what} shows the password: {shown}");
}

fn assert_no_secret_logged() {
    for line in LINES.lock().unwrap().iter() {
        assert_clean("a log line", line);
    }
}

fn server() -> RedisServer {
    RedisServer::start_with(&["--requirepass", PASSWORD]).expect("redis-server")
}

/// A TLS-only server with the same password.
fn tls_server() -> RedisServer {
    RedisServer::start_tls("no", &["--requirepass", PASSWORD]).expect("redis-server")
}

/// An administrative connection over `server`'s socket, with the password.
fn admin(server: &RedisServer) -> redis::Connection {
    let url = format!(
        "redis+unix://{}?pass={}",
        server.socket.display(),
        encode(PASSWORD)
    );
    let mut admin = redis::Client::open(url.as_str())
        .unwrap()
        .get_connection()
        .unwrap();
    common::redis_server::mark_intact(&url);
    add_acl_user_with_password(&mut admin, PASSWORD);
    admin
}

/// Every URL form with a wrong (or unused) password fails, and neither the
/// error's Display nor its Debug nor the builder's Debug shows it: plain TCP,
/// TLS (refused credentials, and each failed TLS check), a plain-text server
/// behind a `rediss://` URL, ACL users, Unix sockets.
#[test]
fn failed_builds_never_show_the_password() {
    capture_logs();
    let (s, tls, plain) = (server(), tls_server(), RedisServer::start().unwrap());
    let _admins = (admin(&s), admin(&tls));
    let (port, sock, tls_port) = (s.port, s.socket.display().to_string(), tls.port);
    let urls = [
        format!("redis://:{}@127.0.0.1:{port}/", encode(WRONG)),
        format!("redis://default:{}@127.0.0.1:{port}/0", encode(WRONG)),
        // `@` and a space left raw in the user info.
        format!("redis://:{MARK}@x y@127.0.0.1:{port}/"),
        // Not used by the driver for TCP: the server refuses (NOAUTH).
        format!("redis://127.0.0.1:{port}/?password={}", encode(PASSWORD)),
        format!("redis://127.0.0.1:{port}/?pass={}", encode(PASSWORD)),
        format!("redis+unix://{sock}?pass={}", encode(WRONG)),
        format!("unix://{sock}?pass={}&db=0", encode(WRONG)),
        // Nothing listens there: a connect error naming the target.
        format!("redis://127.0.0.1:1/?pass={}", encode(PASSWORD)),
        format!("redis://:{}@127.0.0.1:1/", encode(PASSWORD)),
        format!(
            "redis+unix:///nonexistent/lockbox.sock?pass={}",
            encode(PASSWORD)
        ),
        // Unparsable.
        format!("redis://:{PASSWORD}@127.0.0.1:{port}/"),
        // An ACL user with a wrong password, over TCP and the socket.
        format!("redis://lockbox:{}@127.0.0.1:{port}/", encode(WRONG)),
        format!("redis+unix://{sock}?user=lockbox&pass={}", encode(WRONG)),
        // TLS: a wrong password, as the default user and as an ACL user.
        format!("rediss://:{}@localhost:{tls_port}/", encode(WRONG)),
        format!("rediss://lockbox:{}@localhost:{tls_port}/", encode(WRONG)),
        // TLS: the right password, but a host name the certificate is not for
        // (checked before anything is sent).
        format!(
            "rediss://lockbox:{}@127.0.0.1:{tls_port}/",
            encode(PASSWORD)
        ),
        // TLS to a plain-text server: never sent in the clear.
        format!("rediss://:{}@127.0.0.1:{}/", encode(PASSWORD), plain.port),
    ];
    let ca = &certs().ca;
    let mut builders: Vec<(String, lockbox::LockClientBuilder)> = urls
        .iter()
        .map(|url| {
            let b = LockClient::redis(url);
            let b = if url.starts_with("rediss") {
                b.redis_tls_ca_file(ca)
            } else {
                b
            };
            (url.clone(), b)
        })
        .collect();
    // TLS: a CA that did not issue the server's certificate.
    let good_tls = format!(
        "rediss://lockbox:{}@localhost:{tls_port}/",
        encode(PASSWORD)
    );
    builders.push((
        good_tls.clone(),
        LockClient::redis(&good_tls).redis_tls_ca_file(&certs().other_ca),
    ));
    for (url, builder) in builders {
        let builder = builder.connect_timeout(Duration::from_secs(2));
        assert_clean("the builder's Debug", &format!("{builder:?}"));
        let err = builder.build().expect_err(&url);
        assert_clean("an error", &err.to_string());
        assert_clean("an error's Debug", &format!("{err:?}"));
    }
    // The connect errors say where, from the parsed configuration.
    let err = LockClient::redis(&urls[8]).build().unwrap_err();
    assert!(err.to_string().contains("127.0.0.1:1"), "{err}");
    assert_no_secret_logged();
}

/// With the right password in the user info or in `?pass=` (unix socket), as
/// the default user or an ACL user, over TCP, TLS or the socket, the client
/// works, and nothing it shows or logs (a listener reconnecting after its
/// connection was killed) carries the password.
#[test]
fn working_clients_never_show_the_password() {
    capture_logs();
    let (s, tls) = (server(), tls_server());
    let (mut admin, mut tls_admin) = (admin(&s), admin(&tls));
    let pw = encode(PASSWORD);
    let urls = [
        (format!("redis://:{pw}@127.0.0.1:{}/", s.port), false),
        (format!("redis://default:{pw}@127.0.0.1:{}/", s.port), false),
        (format!("redis://lockbox:{pw}@127.0.0.1:{}/", s.port), false),
        (
            format!("redis+unix://{}?pass={pw}", s.socket.display()),
            false,
        ),
        (
            format!("unix://{}?user=lockbox&pass={pw}", s.socket.display()),
            false,
        ),
        (format!("rediss://:{pw}@localhost:{}/", tls.port), true),
        (
            format!("rediss://lockbox:{pw}@localhost:{}/", tls.port),
            true,
        ),
    ];
    for (url, is_tls) in &urls {
        let builder = LockClient::redis(url).ttl(ms(1000));
        let builder = if *is_tls {
            builder.redis_tls_ca_file(&certs().ca)
        } else {
            builder
        };
        let client = builder.build().unwrap();
        let lock = client.try_lock(&unique("secret")).unwrap().unwrap();
        assert_clean("the client's Debug", &format!("{client:?}"));
        assert_clean("the lock's Debug", &format!("{lock:?}"));
        assert_clean("the health report", &format!("{:?}", client.health()));
        lock.release().unwrap();
        // The listener loses its connection and logs it.
        assert!(eventually(ms(5000), || client
            .health()
            .database
            .listener_alive
            == Some(true)));
        let before = LINES.lock().unwrap().len();
        let admin = if *is_tls { &mut tls_admin } else { &mut admin };
        // Every connection but the admin's: the listener is subscribed only
        // while its client has waiters, so it is not always of type pubsub.
        for kind in ["normal", "pubsub"] {
            redis::cmd("CLIENT")
                .arg("KILL")
                .arg("TYPE")
                .arg(kind)
                .query::<i64>(admin)
                .unwrap();
        }
        assert!(eventually(ms(3000), || LINES.lock().unwrap().len() > before));
    }
    assert!(
        LINES.lock().unwrap().iter().any(|l| l.contains("listener")),
        "nothing was logged"
    );
    assert_no_secret_logged();
}
