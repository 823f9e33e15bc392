//! No Redis password reaches an error, a Debug output or a log line, whatever
//! form the URL gives it in (user info, `?pass=`, `?password=`, TCP or unix
//! socket) and whatever it contains (`/`, `?`, `@`, spaces). Targets are
//! described from the parsed configuration. (Its own process: it installs the
//! global logger.)

mod common;

use std::sync::{Mutex, Once};
use std::time::Duration;

use common::redis_server::RedisServer;
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

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
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

/// Every URL form with a wrong (or unused) password fails, and neither the
/// error's Display nor its Debug nor the builder's Debug shows it.
#[test]
fn failed_builds_never_show_the_password() {
    capture_logs();
    let s = server();
    let (port, sock) = (s.port, s.socket.display().to_string());
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
    ];
    for url in &urls {
        let builder = LockClient::redis(url).connect_timeout(Duration::from_secs(2));
        assert_clean("the builder's Debug", &format!("{builder:?}"));
        let err = builder.build().expect_err(url);
        assert_clean("an error", &err.to_string());
        assert_clean("an error's Debug", &format!("{err:?}"));
    }
    // The connect errors say where, from the parsed configuration.
    let err = LockClient::redis(&urls[8]).build().unwrap_err();
    assert!(err.to_string().contains("127.0.0.1:1"), "{err}");
    assert_no_secret_logged();
}

/// With the right password in the user info or in `?pass=` (unix socket), the
/// client works, and nothing it shows or logs (a listener reconnecting after
/// its connection was killed) carries the password.
#[test]
fn working_clients_never_show_the_password() {
    capture_logs();
    let s = server();
    let urls = [
        format!("redis://:{}@127.0.0.1:{}/", encode(PASSWORD), s.port),
        format!("redis://default:{}@127.0.0.1:{}/", encode(PASSWORD), s.port),
        format!(
            "redis+unix://{}?pass={}",
            s.socket.display(),
            encode(PASSWORD)
        ),
    ];
    common::redis_server::mark_intact(&urls[0]);
    let mut admin = redis::Client::open(urls[0].as_str())
        .unwrap()
        .get_connection()
        .unwrap();
    for url in &urls {
        let client = LockClient::redis(url).ttl(ms(1000)).build().unwrap();
        let lock = client.try_lock(&unique("secret")).unwrap().unwrap();
        assert_clean("the client's Debug", &format!("{client:?}"));
        assert_clean("the lock's Debug", &format!("{lock:?}"));
        assert_clean("the health report", &format!("{:?}", client.health()));
        lock.release().unwrap();
        // The listener loses its connection and logs it.
        let before = LINES.lock().unwrap().len();
        redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg("pubsub")
            .query::<i64>(&mut admin)
            .unwrap();
        assert!(eventually(ms(3000), || LINES.lock().unwrap().len() > before));
    }
    assert!(
        LINES.lock().unwrap().iter().any(|l| l.contains("listener")),
        "nothing was logged"
    );
    assert_no_secret_logged();
}
