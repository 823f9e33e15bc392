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

use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

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
    child: Option<Child>,
}

impl RedisServer {
    pub fn start() -> Result<RedisServer, String> {
        RedisServer::start_with(&[])
    }

    /// Starts one with extra arguments (`["--maxmemory-policy", "allkeys-lru"]`).
    /// With `--requirepass`, `url` carries no password: tests build their own.
    pub fn start_with(args: &[&str]) -> Result<RedisServer, String> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| e.to_string())?
            .port();
        let mut server = RedisServer {
            url: format!("redis://127.0.0.1:{port}/"),
            port,
            args: args.iter().map(|a| a.to_string()).collect(),
            socket: std::env::temp_dir().join(format!("lockbox-redis-{port}.sock")),
            child: None,
        };
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
        for _ in 0..200 {
            if answers(&self.url) {
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

    fn spawn(&mut self) -> Result<(), String> {
        let child = Command::new("redis-server")
            .args([
                "--bind",
                "127.0.0.1",
                "--port",
                &self.port.to_string(),
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

    /// A plain connection to it (no password).
    pub fn connection(&self) -> redis::Connection {
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
    }
}
