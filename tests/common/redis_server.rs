//! Finds a Redis server for the tests: `REDIS_URL` if set, else one on
//! 127.0.0.1:6379 that answers, else a throwaway `redis-server` on a free loopback
//! port (no persistence), stopped when this process exits.
//!
//! lockbox treats a server without its data-loss marker (or with one written
//! under another server process) as one that lost its data, and grants nothing
//! for a lock-delay. The suites' servers are never flushed and nothing is held
//! across their restarts, so the harness marks them intact ([`mark_intact`]) —
//! what an operator may do for a server known to be new — rather than make the
//! first acquire of every suite wait that delay out. Tests of the detection
//! itself restart a [`RedisServer`], which is not marked again.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use lockbox::{LockClient, LockClientBuilder};

use super::tls::{Certs, make_certs};

/// The least a Redis user needs for lockbox, as the README gives it (after
/// `ACL SETUSER name on` and the password): lockbox's keys and release
/// channels, and the commands it sends or its scripts call.
pub const ACL_RULE: &str = "resetkeys ~lockbox:* resetchannels &lockbox:released:* -@all \
     +ping +info +evalsha +script|load +scan +psubscribe +punsubscribe +unsubscribe \
     +get +set +del +type +time +pttl +pexpire +hget +hmget +hset +hgetall +hdel \
     +zadd +zrem +zscore +zrange +zrangebyscore +zremrangebyscore +zcount +publish";

/// The user and password the TLS server's ACL user has.
pub const ACL_USER: &str = "lockbox";
pub const ACL_PASSWORD: &str = "Acl-Pass/word?1";

pub fn redis_url() -> &'static str {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| {
        let url = find();
        mark_intact(&url);
        url
    })
}

fn find() -> String {
    if let Ok(url) = std::env::var("REDIS_URL") {
        return url;
    }
    let local = "redis://127.0.0.1:6379/".to_owned();
    if answers(&local) {
        return local;
    }
    start_for_process().unwrap_or_else(|e| {
        panic!("no Redis server: set REDIS_URL, run one on 127.0.0.1:6379, or install redis-server ({e})")
    })
}

/// The last answer of `health()`'s probe of the server `conn` is on: the
/// marker's run id (`HGET`) as a bulk string, as a proxy sees it go by.
#[allow(dead_code)]
pub fn probe_last_answer(conn: &mut redis::Connection) -> Vec<u8> {
    let run_id: String = redis::cmd("HGET")
        .arg("lockbox:epoch")
        .arg("run_id")
        .query(conn)
        .unwrap();
    format!("${}\r\n{run_id}\r\n", run_id.len()).into_bytes()
}

/// Records the server process now running at `url` as the one whose data
/// lockbox's marker vouches for (see the module docs).
pub fn mark_intact(url: &str) {
    let mut c = redis::Client::open(url)
        .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(5)))
        .expect("connect to redis");
    let info: String = redis::cmd("INFO").arg("server").query(&mut c).unwrap();
    let run_id = info
        .lines()
        .find_map(|l| l.strip_prefix("run_id:"))
        .unwrap_or("")
        .trim()
        .to_owned();
    redis::cmd("HSET")
        .arg("lockbox:epoch")
        .arg("run_id")
        .arg(run_id)
        .query::<i64>(&mut c)
        .unwrap();
}

/// Starts a redis-server that lives as long as this process: a shell watchdog
/// runs it and stops it when its stdin, a pipe from this process, closes.
fn start_for_process() -> Result<String, String> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| e.to_string())?
        .port();
    let script = format!(
        "redis-server --bind 127.0.0.1 --port {port} --save '' --appendonly no & p=$!; \
         cat >/dev/null; kill $p; wait $p"
    );
    let watchdog = Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("starting redis-server: {e}"))?;
    // Kept open until the process exits.
    std::mem::forget(watchdog);
    let url = format!("redis://127.0.0.1:{port}/");
    for _ in 0..200 {
        if answers(&url) {
            return Ok(url);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Err("redis-server did not answer".into())
}

/// A directory of this process's, removed (with what is in it) when the
/// process exits: a shell watchdog waits for its stdin, a pipe from this
/// process, to close.
fn process_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lockbox-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temporary directory");
    let watchdog = Command::new("sh")
        .args(["-c", "cat >/dev/null; rm -rf \"$0\""])
        .arg(&dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting the directory's watchdog");
    // Kept open until the process exits.
    std::mem::forget(watchdog);
    dir
}

/// This process's certificates (CA, server for `localhost`, clients).
pub fn certs() -> &'static Certs {
    static CERTS: OnceLock<Certs> = OnceLock::new();
    CERTS.get_or_init(|| {
        make_certs(&process_dir("redis-certs")).unwrap_or_else(|e| panic!("certificates: {e}"))
    })
}

/// The `redis-server` arguments for TLS only on `port` (plain-text TCP off),
/// with this process's certificates.
fn tls_args(port: u16, auth_clients: &str) -> Vec<String> {
    let c = certs();
    [
        "--port",
        "0",
        "--tls-port",
        &port.to_string(),
        "--tls-cert-file",
        &c.server_cert,
        "--tls-key-file",
        &c.server_key,
        "--tls-ca-cert-file",
        &c.ca,
        "--tls-auth-clients",
        auth_clients,
    ]
    .iter()
    .map(|a| a.to_string())
    .collect()
}

/// A TLS-only Redis server (and its Unix socket) for the whole test process,
/// stopped when the process exits; it has the ACL user [`ACL_USER`] with
/// [`ACL_RULE`].
pub struct TlsRedis {
    pub port: u16,
    pub socket: PathBuf,
}

impl TlsRedis {
    /// `rediss://localhost:{port}/` (the name the certificate is for).
    pub fn url(&self) -> String {
        format!("rediss://localhost:{}/", self.port)
    }

    /// As the ACL user.
    pub fn acl_url(&self) -> String {
        format!(
            "rediss://{ACL_USER}:{}@localhost:{}/",
            encode(ACL_PASSWORD),
            self.port
        )
    }

    /// The server over its Unix socket.
    pub fn socket_url(&self) -> String {
        format!("redis+unix://{}", self.socket.display())
    }

    /// A client builder over TLS that trusts this process's CA.
    pub fn builder(&self) -> LockClientBuilder {
        LockClient::redis(&self.url()).redis_tls_ca_file(&certs().ca)
    }

    /// An administrative connection (over the socket).
    pub fn admin(&self) -> redis::Connection {
        connect(&self.socket_url())
    }
}

pub fn tls_redis() -> &'static TlsRedis {
    static SERVER: OnceLock<TlsRedis> = OnceLock::new();
    SERVER.get_or_init(|| {
        let dir = process_dir("redis-tls");
        let port = free_port().expect("free port");
        let socket = dir.join("redis.sock");
        let mut args = tls_args(port, "no");
        args.extend(
            [
                "--bind",
                "127.0.0.1",
                "--unixsocket",
                &socket.display().to_string(),
                "--save",
                "",
                "--appendonly",
                "no",
            ]
            .iter()
            .map(|a| a.to_string()),
        );
        let quoted: Vec<String> = args.iter().map(|a| format!("'{a}'")).collect();
        let script = format!(
            "redis-server {} & p=$!; cat >/dev/null; kill $p; wait $p",
            quoted.join(" ")
        );
        let watchdog = Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting redis-server");
        // Kept open until the process exits.
        std::mem::forget(watchdog);
        let server = TlsRedis { port, socket };
        assert!(
            wait_until_answers(&server.socket_url()),
            "the TLS redis-server did not answer on its socket"
        );
        mark_intact(&server.socket_url());
        add_acl_user(&mut server.admin());
        server
    })
}

/// Creates (or resets) [`ACL_USER`] with [`ACL_RULE`] and [`ACL_PASSWORD`].
pub fn add_acl_user(admin: &mut redis::Connection) {
    add_acl_user_with_password(admin, ACL_PASSWORD);
}

/// Creates (or resets) [`ACL_USER`] with [`ACL_RULE`] and `password`.
pub fn add_acl_user_with_password(admin: &mut redis::Connection, password: &str) {
    let mut cmd = redis::cmd("ACL");
    cmd.arg("SETUSER")
        .arg(ACL_USER)
        .arg("reset")
        .arg("on")
        .arg(format!(">{password}"));
    for rule in ACL_RULE.split_whitespace() {
        cmd.arg(rule);
    }
    let () = cmd.query(admin).expect("ACL SETUSER");
}

/// Percent-encodes everything but letters and digits (for URL user info).
pub fn encode(s: &str) -> String {
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

fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| e.to_string())
}

fn wait_until_answers(url: &str) -> bool {
    for _ in 0..500 {
        if answers(url) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

/// A plain connection to `url` (a socket or `redis://` URL).
pub fn connect(url: &str) -> redis::Connection {
    redis::Client::open(url)
        .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(5)))
        .unwrap_or_else(|e| panic!("connecting for administration: {e}"))
}

pub fn answers(url: &str) -> bool {
    redis::Client::open(url)
        .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(1)))
        .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c))
        .is_ok()
}

/// A throwaway Redis server a test controls (kill, restart); killed when dropped.
pub struct RedisServer {
    pub url: String,
    pub port: u16,
    /// Extra `redis-server` arguments, e.g. `--requirepass`.
    args: Vec<String>,
    /// The server's unix socket, also listened on.
    pub socket: std::path::PathBuf,
    /// TLS only (`rediss://localhost:{port}/`), with this `tls-auth-clients`.
    tls: Option<String>,
    child: Option<Child>,
}

impl RedisServer {
    pub fn start() -> Result<RedisServer, String> {
        RedisServer::start_with(&[])
    }

    /// Starts one with extra arguments (`["--maxmemory-policy", "allkeys-lru"]`).
    /// With `--requirepass`, `url` carries no password: tests build their own.
    pub fn start_with(args: &[&str]) -> Result<RedisServer, String> {
        RedisServer::start_as(None, args)
    }

    /// Starts one that takes TCP connections over TLS only, with this
    /// process's certificates ([`certs`]) and `tls-auth-clients` set to
    /// `auth_clients` (`no`, `yes`, `optional`). Administered over its socket.
    pub fn start_tls(auth_clients: &str, args: &[&str]) -> Result<RedisServer, String> {
        RedisServer::start_as(Some(auth_clients.to_owned()), args)
    }

    fn start_as(tls: Option<String>, args: &[&str]) -> Result<RedisServer, String> {
        let port = free_port()?;
        let scheme = if tls.is_some() {
            "rediss://localhost"
        } else {
            "redis://127.0.0.1"
        };
        let mut server = RedisServer {
            url: format!("{scheme}:{port}/"),
            port,
            args: args.iter().map(|a| a.to_string()).collect(),
            socket: std::env::temp_dir().join(format!("lockbox-redis-{port}.sock")),
            tls,
            child: None,
        };
        if server.tls.is_some() {
            server.spawn()?;
            if args.contains(&"--requirepass") {
                for _ in 0..500 {
                    if std::os::unix::net::UnixStream::connect(&server.socket).is_ok() {
                        return Ok(server);
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                return Err("redis-server did not listen on its socket".into());
            }
            if !wait_until_answers(&server.socket_url()) {
                return Err("redis-server did not answer on its socket".into());
            }
            mark_intact(&server.socket_url());
            return Ok(server);
        }
        if args.contains(&"--requirepass") {
            server.run_unchecked()?;
            return Ok(server);
        }
        server.run()?;
        mark_intact(&server.url);
        Ok(server)
    }

    /// Starts (again) on the same port.
    pub fn run(&mut self) -> Result<(), String> {
        self.spawn()?;
        let url = if self.tls.is_some() {
            self.socket_url()
        } else {
            self.url.clone()
        };
        for _ in 0..200 {
            if answers(&url) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Err("redis-server did not answer".into())
    }

    /// Starts it and waits until its port accepts connections (for servers
    /// that answer nothing without a password).
    fn run_unchecked(&mut self) -> Result<(), String> {
        self.spawn()?;
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Err("redis-server did not listen".into())
    }

    /// `redis+unix://{socket}`.
    pub fn socket_url(&self) -> String {
        format!("redis+unix://{}", self.socket.display())
    }

    fn spawn(&mut self) -> Result<(), String> {
        let port = match &self.tls {
            Some(auth_clients) => tls_args(self.port, auth_clients),
            None => vec!["--port".to_owned(), self.port.to_string()],
        };
        let child = Command::new("redis-server")
            .args(port)
            .args([
                "--bind",
                "127.0.0.1",
                "--unixsocket",
                &self.socket.display().to_string(),
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("starting redis-server: {e}"))?;
        self.child = Some(child);
        Ok(())
    }

    /// A plain connection to it (no password; over the socket for a TLS one).
    pub fn connection(&self) -> redis::Connection {
        if self.tls.is_some() {
            return connect(&self.socket_url());
        }
        redis::Client::open(self.url.as_str())
            .unwrap()
            .get_connection_with_timeout(Duration::from_secs(5))
            .unwrap()
    }

    /// Kills the server at once (no save), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        // A killed server leaves its socket file behind.
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// The number `field` holds in an `INFO` answer.
pub fn info_u64(info: &str, field: &str) -> u64 {
    info.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in INFO"))
}

/// The `CLIENT LIST` lines of the server's subscribers (lockbox's release
/// listeners), as seen on `admin`.
pub fn subscribers(admin: &mut redis::Connection) -> Vec<String> {
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .arg("TYPE")
        .arg("pubsub")
        .query(admin)
        .expect("CLIENT LIST");
    list.lines().map(str::to_owned).collect()
}

/// `waiter.lock_timeout(name, wait)` on a thread of its own; once `ready`
/// says it is in place, `lock` (held by someone else) is released and
/// `after_release` runs; the waiter must then get the lock well before its
/// timeout (a release it did not hear is made up for only at the timeout,
/// by a last try). Releases what it got.
pub fn release_is_heard(
    waiter: &LockClient,
    name: &str,
    lock: lockbox::Lock,
    wait: Duration,
    mut ready: impl FnMut() -> bool,
    after_release: impl FnOnce(),
) {
    std::thread::scope(|s| {
        let w = s.spawn(|| waiter.lock_timeout(name, wait));
        assert!(
            super::eventually(Duration::from_secs(5), || ready() || w.is_finished()),
            "the waiter never got in place"
        );
        let released = std::time::Instant::now();
        lock.release().unwrap();
        after_release();
        let got = w.join().unwrap();
        assert!(
            released.elapsed() < wait / 2,
            "the release was not heard: woken after {:?}",
            released.elapsed()
        );
        got.unwrap().release().unwrap();
    });
}

/// A waiter on a lock held with a long lease is woken by the release through
/// its release listener, not by the lease's end nor by polling: the holder's
/// lease (60 s) outlasts the waiter's wait (30 s), so only the release message
/// can grant the waiter the lock within its wait. Done both ways (each client
/// waits once), since a listener subscribes only while its client has a
/// waiter; each listener's connection is the same before, during and after
/// (a listener that reconnects wakes every waiter, and waiters poll while it
/// is down). Returns the `CLIENT LIST` lines of both listeners, as seen while
/// subscribed, for the caller to check how they came.
pub fn release_wakes_the_waiter(
    holder: &LockClient,
    waiter: &LockClient,
    admin: &mut redis::Connection,
) -> Vec<String> {
    let alive = |c: &LockClient| c.health().database.listener_alive == Some(true);
    for c in [holder, waiter] {
        assert!(
            super::eventually(Duration::from_secs(10), || alive(c)),
            "a release listener did not connect: {}",
            c.health()
        );
    }
    let id = |line: &str| line.split(' ').next().unwrap_or_default().to_owned();
    let connected = |admin: &mut redis::Connection| -> Vec<String> {
        let list: String = redis::cmd("CLIENT")
            .arg("LIST")
            .query(admin)
            .expect("CLIENT LIST");
        list.lines().map(id).collect()
    };
    let before = connected(admin);
    // Each listener's line, by connection id, as seen while it was subscribed.
    let mut seen = std::collections::BTreeMap::new();
    for (round, (h, w)) in [(holder, waiter), (waiter, holder)].into_iter().enumerate() {
        let name = super::unique("wake");
        let lock = h
            .acquire(
                &name,
                &lockbox::AcquireOptions::new().ttl(Duration::from_secs(60)),
            )
            .unwrap()
            .expect("free");
        std::thread::scope(|s| {
            let waiting = s.spawn(|| w.lock_timeout(&name, Duration::from_secs(30)));
            assert!(super::eventually(Duration::from_secs(10), || w
                .metrics()
                .acquires_waiting
                == 1));
            // Its listener subscribes for it.
            assert!(
                super::eventually(Duration::from_secs(10), || {
                    for line in subscribers(admin) {
                        seen.insert(id(&line), line);
                    }
                    seen.len() > round
                }),
                "the waiter's listener did not subscribe"
            );
            lock.release().unwrap();
            let got = waiting
                .join()
                .unwrap()
                .expect("the waiter was not woken by the release");
            got.release().unwrap();
        });
        assert!(alive(w));
    }
    let after = connected(admin);
    for id in seen.keys() {
        assert!(
            before.contains(id) && after.contains(id),
            "a listener reconnected meanwhile (which wakes every waiter): {id}"
        );
    }
    seen.into_values().collect()
}
