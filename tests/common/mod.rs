//! Shared test harness: a real PostgreSQL server, unique names, admin queries,
//! and child processes running lockbox.

#![allow(dead_code)]

pub mod conformance;
pub mod coordination;
pub mod etcd_server;
pub mod history;
pub mod hostile;
pub mod proxy;
pub mod redis_server;
pub mod server;
pub mod shadow;
pub mod tls;
pub mod wg;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use lockbox::{LockClient, LockClientBuilder};

pub use server::database_url;

pub fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// A name no other test (or earlier run) uses.
pub fn unique(prefix: &str) -> String {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "{prefix}-{}-{nanos}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// `url` with `application_name` set, so a test can find its client's sessions.
pub fn url_with_app(url: &str, app: &str) -> String {
    if url.contains("://") {
        let sep = if url.contains('?') { '&' } else { '?' };
        format!("{url}{sep}application_name={app}")
    } else {
        format!("{url} application_name={app}")
    }
}

/// A builder for the test server whose sessions carry application name `app`.
pub fn builder_for(app: &str) -> LockClientBuilder {
    LockClient::builder(&url_with_app(database_url(), app))
}

/// A client with a short TTL and its own application name (returned too).
pub fn client(ttl: Duration) -> (LockClient, String) {
    let app = unique("app");
    let client = builder_for(&app).ttl(ttl).build().expect("build client");
    (client, app)
}

/// A plain connection for inspecting and poking the server.
pub fn admin() -> postgres::Client {
    postgres::Client::connect(database_url(), postgres::NoTls).expect("admin connection")
}

/// The backends holding and waiting for `name`'s semaphore gate on
/// PostgreSQL (the single-`bigint` advisory key of the name's hash):
/// (holding, waiting).
pub fn pg_gate(db: &mut postgres::Client, name: &str) -> (Vec<i32>, Vec<i32>) {
    let (hi, lo) = lockbox::advisory_key(name);
    let rows = db
        .query(
            "SELECT pid, granted FROM pg_locks WHERE locktype = 'advisory' \
             AND objsubid = 1 AND classid::int8 = ($1::int4::int8 & 4294967295) \
             AND objid::int8 = ($2::int4::int8 & 4294967295)",
            &[&hi, &lo],
        )
        .unwrap();
    let pids = |granted: bool| {
        rows.iter()
            .filter(|r| r.get::<_, bool>(1) == granted)
            .map(|r| r.get(0))
            .collect()
    };
    (pids(true), pids(false))
}

/// How many advisory locks the sessions of application `app` hold.
pub fn advisory_locks_of(app: &str) -> i64 {
    admin()
        .query_one(
            "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
             WHERE l.locktype = 'advisory' AND a.application_name = $1",
            &[&app],
        )
        .unwrap()
        .get(0)
}

/// How many sessions application `app` has open.
pub fn sessions_of(app: &str) -> i64 {
    admin()
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
            &[&app],
        )
        .unwrap()
        .get(0)
}

/// The backend pid holding lock `name`, from the lease table.
pub fn holder_pid(name: &str) -> i32 {
    admin()
        .query_one(
            "SELECT holder_pid FROM lockbox_leases WHERE name = $1",
            &[&name],
        )
        .unwrap()
        .get(0)
}

/// The lease row of `name` as the database has it.
pub fn lease_row(name: &str) -> LeaseRow {
    let row = admin()
        .query_one(
            "SELECT token, owner, released_at IS NOT NULL, \
                    extract(epoch FROM acquired_at)::float8, extract(epoch FROM expires_at)::float8 \
             FROM lockbox_leases WHERE name = $1",
            &[&name],
        )
        .unwrap();
    LeaseRow {
        token: row.get(0),
        owner: row.get(1),
        released: row.get(2),
        acquired_at: row.get(3),
        expires_at: row.get(4),
    }
}

/// Asserts, by the database's own clock, that the current grant of `name` was made
/// no earlier than the end of the `previous` lease (as read while it was held).
pub fn assert_granted_after(name: &str, previous: &LeaseRow) {
    let now = lease_row(name);
    assert!(
        now.acquired_at >= previous.expires_at,
        "{name}: granted at {} before the previous lease ended at {}",
        now.acquired_at,
        previous.expires_at
    );
}

/// One lease row, timestamps as seconds since the epoch by the database clock.
#[derive(Debug, Clone)]
pub struct LeaseRow {
    pub token: i64,
    pub owner: String,
    pub released: bool,
    pub acquired_at: f64,
    pub expires_at: f64,
}

/// A child process: this same test binary re-run with only its `child_entry` test,
/// acting out `role`. It reports on stdout lines starting with `@@ ` and takes
/// commands on stdin, one per line, so the parent synchronises on messages.
pub struct ChildProc {
    pub child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl ChildProc {
    pub fn spawn(role: &str, env: &[(&str, &str)]) -> ChildProc {
        ChildProc::spawn_with_url(role, database_url(), env)
    }

    /// Like [`spawn`](Self::spawn), against the server at `url`.
    pub fn spawn_with_url(role: &str, url: &str, env: &[(&str, &str)]) -> ChildProc {
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args([
            "child_entry",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env("LOCKBOX_CHILD_ROLE", role)
        .env("DATABASE_URL", url)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        // The parent's etcd member, if it started one.
        cmd.envs(etcd_server::child_env());
        let mut child = cmd.spawn().expect("spawn child process");
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        ChildProc {
            child,
            stdin,
            stdout,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The next `@@ ` message (without the prefix). Panics if the child exits first.
    pub fn recv(&mut self) -> String {
        let mut line = String::new();
        loop {
            line.clear();
            let n = self.stdout.read_line(&mut line).unwrap();
            assert!(n > 0, "child process exited without reporting");
            // libtest may print `test child_entry ... ` before the first message.
            if let Some((_, msg)) = line.trim_end().split_once("@@ ") {
                return msg.to_owned();
            }
        }
    }

    pub fn send(&mut self, cmd: &str) {
        writeln!(self.stdin, "{cmd}").unwrap();
        self.stdin.flush().unwrap();
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    pub fn wait_success(mut self) {
        drop(self.stdin);
        let status = self.child.wait().unwrap();
        assert!(status.success(), "child failed: {status}");
    }
}

/// In a child: the role it was started for, if any.
pub fn child_role() -> Option<String> {
    std::env::var("LOCKBOX_CHILD_ROLE").ok()
}

/// In a child: report a message to the parent.
pub fn report(msg: &str) {
    println!("@@ {msg}");
}

/// In a child: wait for the parent's next command.
pub fn next_command() -> String {
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).unwrap();
    line.trim_end().to_owned()
}

/// Polls `cond` until it holds or `limit` passes; returns whether it held. For
/// conditions only the database can report (a session waiting on a lock), where
/// no signal exists to wait on.
pub fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = std::time::Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if std::time::Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Whether a session of application `app` is waiting (not granted) on an advisory lock.
pub fn is_waiting(app: &str) -> bool {
    admin()
        .query_one(
            "SELECT count(*) > 0 FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
             WHERE l.locktype = 'advisory' AND NOT l.granted AND a.application_name = $1",
            &[&app],
        )
        .unwrap()
        .get(0)
}

/// Terminates the backend of `pid`, as an operator (or a crash) would.
pub fn terminate(pid: i32) {
    let done: bool = admin()
        .query_one("SELECT pg_terminate_backend($1, 5000)", &[&pid])
        .unwrap()
        .get(0);
    assert!(done, "backend {pid} did not exit");
}

/// Where the test server is: host, port, user and database.
pub struct ServerParts {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub db: String,
}

/// A connection string for the test server with application name `app` and
/// the session `options` given (as libpq's `options`).
pub fn url_with_options(app: &str, options: &str) -> String {
    let ServerParts {
        host,
        port,
        user,
        db,
    } = server_parts();
    format!(
        "host={host} port={port} dbname={db} user={user} application_name={app} \
         options='{options}'"
    )
}

pub fn server_parts() -> ServerParts {
    let config: postgres::Config = database_url().parse().unwrap();
    ServerParts {
        host: match config.get_hosts().first() {
            Some(postgres::config::Host::Tcp(h)) => h.clone(),
            Some(postgres::config::Host::Unix(p)) => p.display().to_string(),
            None => "127.0.0.1".to_owned(),
        },
        port: config.get_ports().first().copied().unwrap_or(5432),
        user: config.get_user().unwrap_or("postgres").to_owned(),
        db: config.get_dbname().unwrap_or("postgres").to_owned(),
    }
}

/// A connection string for the test server as another `user`.
pub fn url_as_user(user: &str) -> String {
    let ServerParts { host, port, db, .. } = server_parts();
    format!("host={host} port={port} dbname={db} user={user}")
}

/// Writes a lease for `name` as if the session `holder_pid` had taken it, expiring
/// in `expires_in_ms` (negative: already expired), with token `token`.
pub fn fake_lease(name: &str, token: i64, expires_in_ms: i64, holder_pid: i32) {
    // Building a client creates the table if this process has not yet.
    drop(client(ms(1000)));
    admin()
        .execute(
            "INSERT INTO lockbox_leases (name, owner, token, holder_pid, holder_started, \
                 metadata, acquired_at, renewed_at, expires_at) \
             SELECT $1, 'another-process', $2, pid, backend_start, NULL, now(), now(), \
                    clock_timestamp() + $3 * interval '1 millisecond' \
             FROM pg_stat_activity WHERE pid = $4",
            &[&name, &token, &(expires_in_ms as f64), &holder_pid],
        )
        .unwrap();
}

/// The backend pid of a plain connection.
pub fn pid_of(db: &mut postgres::Client) -> i32 {
    db.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0)
}

/// Holds the lease row of a lock `FOR UPDATE` in an open transaction, so that its
/// renewals block on the row (where they can be observed, cancelled or timed).
/// Rolled back by [`RowHold::release`] or on drop.
pub struct RowHold(postgres::Client);

impl RowHold {
    pub fn lease(name: &str) -> RowHold {
        let mut db = admin();
        db.batch_execute("BEGIN").unwrap();
        db.execute(
            "SELECT 1 FROM lockbox_leases WHERE name = $1 FOR UPDATE",
            &[&name],
        )
        .unwrap();
        RowHold(db)
    }

    pub fn release(mut self) {
        self.0.batch_execute("ROLLBACK").unwrap();
    }
}

impl Drop for RowHold {
    fn drop(&mut self) {
        let _ = self.0.batch_execute("ROLLBACK");
    }
}

/// Whether backend `pid` is waiting on a lock (a row lock, here).
pub fn blocked_on_lock(pid: i32) -> bool {
    admin()
        .query_one(
            "SELECT count(*) > 0 FROM pg_stat_activity WHERE pid = $1 AND wait_event_type = 'Lock'",
            &[&pid],
        )
        .unwrap()
        .get(0)
}

/// Whether some backend running a statement whose text is `LIKE` `pattern`
/// is waiting on a lock (an acquire waiting for the advisory key inside the
/// wait-and-grant function, say).
pub fn a_statement_waits_on_lock(pattern: &str) -> bool {
    admin()
        .query_one(
            "SELECT count(*) > 0 FROM pg_stat_activity WHERE query LIKE $1 \
             AND wait_event_type = 'Lock'",
            &[&pattern],
        )
        .unwrap()
        .get(0)
}

/// Creates the shared counter row `name` (value 0) that tests increment under a lock.
pub fn setup_counter(name: &str) {
    let mut db = admin();
    db.batch_execute(
        "CREATE TABLE IF NOT EXISTS lockbox_test_counter \
         (name text PRIMARY KEY, value bigint NOT NULL, last_token bigint NOT NULL)",
    )
    .unwrap();
    db.execute(
        "INSERT INTO lockbox_test_counter VALUES ($1, 0, 0)",
        &[&name],
    )
    .unwrap();
}

/// The counter row's value.
pub fn counter(name: &str) -> i64 {
    admin()
        .query_one(
            "SELECT value FROM lockbox_test_counter WHERE name = $1",
            &[&name],
        )
        .unwrap()
        .get(0)
}

/// A TCP server that accepts connections and never answers (a frozen
/// postmaster, a hung load balancer). Counts what it accepted; closes every
/// connection when dropped, which ends any client still waiting on one.
pub struct SilentServer {
    pub port: u16,
    accepted: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
    stopped: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl SilentServer {
    pub fn start() -> SilentServer {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stopped = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (keep, stop) = (accepted.clone(), stopped.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(stream) = stream {
                    keep.lock().unwrap().push(stream);
                }
            }
        });
        SilentServer {
            port,
            accepted,
            stopped,
        }
    }

    /// How many connections it has accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.lock().unwrap().len()
    }

    /// A connection string for it.
    pub fn url(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres password='pw with spaces'",
            self.port
        )
    }
}

impl Drop for SilentServer {
    fn drop(&mut self) {
        self.stopped.store(true, Ordering::SeqCst);
        for s in self.accepted.lock().unwrap().drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        // Wake the accept loop so it sees `stopped`.
        let _ = std::net::TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// How many threads of this process are named `name` (Linux: from
/// /proc/self/task/*/comm; names are cut to 15 bytes there).
pub fn threads_named(name: &str) -> usize {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    tasks
        .filter_map(|t| t.ok())
        .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
        .filter(|comm| comm.trim_end() == &name[..name.len().min(15)])
        .count()
}

/// The backend pids of application `app`'s sessions, from `pg_stat_activity`.
pub fn pids_of(app: &str) -> Vec<i32> {
    admin()
        .query(
            "SELECT pid FROM pg_stat_activity WHERE application_name = $1",
            &[&app],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Two locks of `client` on one shared session: `a` with the client's TTL,
/// and a neighbour `b` with a 60 s lease (renewed only every 20 s). Returns
/// their names, guards and the session's pid.
pub fn two_on_one_session(
    client: &lockbox::LockClient,
    prefix: &str,
) -> (String, lockbox::Lock, String, lockbox::Lock, i32) {
    let (a_name, b_name) = (
        unique(&format!("{prefix}-a")),
        unique(&format!("{prefix}-b")),
    );
    let a = client.try_lock(&a_name).unwrap().unwrap();
    let b = client
        .acquire(
            &b_name,
            &lockbox::AcquireOptions::new().ttl(Duration::from_secs(60)),
        )
        .unwrap()
        .unwrap();
    let pid = holder_pid(&a_name);
    assert_eq!(holder_pid(&b_name), pid, "both on one shared session");
    (a_name, a, b_name, b, pid)
}

/// A builder of a client of the named store (`postgres`, `redis`, `etcd`), as
/// the test processes (and their children) share it.
pub fn store_builder(store: &str) -> LockClientBuilder {
    match store {
        "postgres" => LockClient::builder(database_url()),
        "redis" => LockClient::redis(redis_server::redis_url()),
        "etcd" => LockClient::etcd(&etcd_server::etcd_url()),
        other => panic!("unknown store {other}"),
    }
}
