//! The `lockbox` command, driven as a user drives it: the real binary against
//! the real stores. Lock names start with `cli-`.

mod common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use common::proxy::Proxy;
use common::*;
use lockbox::{AcquireOptions, LeaseStatus, LockClient};

const BIN: &str = env!("CARGO_BIN_EXE_lockbox");

/// `lockbox` with the test database as its store, and nothing from the
/// environment that could point it elsewhere.
fn lockbox(args: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.env_remove("LOCKBOX_URL")
        .env_remove("DATABASE_URL")
        .arg("--url")
        .arg(database_url())
        .args(args);
    c
}

fn run(args: &[&str]) -> Output {
    run_cmd(&mut lockbox(args))
}

/// Runs `c` to its end (bounded, see [`output`]), capturing its output.
fn run_cmd(c: &mut Command) -> Output {
    output(
        c.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("lockbox runs"),
    )
}

fn code(out: &Output) -> i32 {
    out.status.code().expect("lockbox exited by itself")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A scratch directory of the test's own, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let dir = std::env::temp_dir().join(unique(&format!("lockbox-cli-{tag}")));
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    fn path(&self, file: &str) -> String {
        self.0.join(file).to_str().unwrap().to_owned()
    }

    /// Writes an executable shell script.
    fn script(&self, file: &str, body: &str) -> String {
        use std::os::unix::fs::PermissionsExt;
        let path = self.path(file);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    /// The file's contents once it holds a full line (bounded wait).
    fn wait_for(&self, file: &str) -> String {
        let path = self.path(file);
        let mut text = String::new();
        assert!(
            eventually(Duration::from_secs(20), || {
                text = std::fs::read_to_string(&path).unwrap_or_default();
                text.ends_with('\n')
            }),
            "{file} was never written"
        );
        text
    }

    fn pid(&self, file: &str) -> i32 {
        self.wait_for(file).trim().parse().unwrap()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Whether process `pid` exists and is not a zombie.
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name in parentheses.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X'])),
        Err(_) => false,
    }
}

/// The child's output once it exits; killed (and the test failed) if it
/// has not exited within a minute, so that no test hangs.
fn output(child: Child) -> Output {
    let pid = child.id() as i32;
    let (tx, rx) = crossbeam_channel::bounded(1);
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            // SAFETY: kill on our own (unreaped) child's pid.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("lockbox did not exit within a minute");
        }
    }
}

fn wait_exit(child: Child) -> i32 {
    code(&output(child))
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: kill on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
}

fn lease_status(name: &str) -> LeaseStatus {
    LockClient::builder(database_url())
        .build()
        .unwrap()
        .lease(name)
        .unwrap()
        .expect("a lease")
        .status
}

/// Four concurrent `exec`s on one name: the programs' enter/leave lines never
/// interleave, and their tokens increase.
#[test]
fn concurrent_execs_never_overlap_and_tokens_increase() {
    let dir = Scratch::new("overlap");
    let log = dir.path("log");
    let name = unique("cli-overlap");
    let body = format!(
        "echo \"enter $LOCKBOX_TOKEN\" >> {log}; sleep 0.2; echo \"leave $LOCKBOX_TOKEN\" >> {log}"
    );
    let children: Vec<Child> = (0..4)
        .map(|_| {
            lockbox(&["exec", "--quiet", &name, "--", "sh", "-c", &body])
                .spawn()
                .unwrap()
        })
        .collect();
    for child in children {
        assert_eq!(wait_exit(child), 0);
    }
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 8, "{text}");
    let mut last = 0u64;
    for pair in lines.chunks(2) {
        let enter: u64 = pair[0]
            .strip_prefix("enter ")
            .expect(&text)
            .parse()
            .unwrap();
        let leave: u64 = pair[1]
            .strip_prefix("leave ")
            .expect(&text)
            .parse()
            .unwrap();
        assert_eq!(enter, leave, "two programs overlapped:\n{text}");
        assert!(enter > last, "tokens must increase:\n{text}");
        last = enter;
    }
}

#[test]
fn the_programs_status_is_passed_on() {
    let name = unique("cli-status");
    let out = run(&["exec", &name, "--", "sh", "-c", "exit 3"]);
    assert_eq!(code(&out), 3, "{}", stderr(&out));
    let out = run(&["exec", &name, "--", "sh", "-c", "kill -USR1 $$"]);
    assert_eq!(code(&out), 128 + libc::SIGUSR1, "{}", stderr(&out));
    let out = run(&["exec", &name, "--", "/nonexistent/program"]);
    assert_eq!(code(&out), 127, "{}", stderr(&out));
    let out = run(&[
        "exec",
        &name,
        "--",
        "sh",
        "-c",
        "test \"$LOCKBOX_NAME\" = \"$0\" && test \"$LOCKBOX_TTL_MS\" = 30000 && test \"$LOCKBOX_TOKEN\" -gt 0",
        &name,
    ]);
    assert_eq!(code(&out), 0, "the environment is not as promised");
    // Released after the program: free now.
    assert!(matches!(lease_status(&name), LeaseStatus::Released { .. }));
}

/// 75: not acquired within `--wait`, having said who holds it (unless quiet).
#[test]
fn not_acquired_within_the_wait_is_75_and_names_the_holder() {
    let name = unique("cli-busy");
    let client = LockClient::builder(database_url()).build().unwrap();
    let held = client
        .acquire(&name, &AcquireOptions::new().metadata("cli-test-holder"))
        .unwrap()
        .unwrap();
    let out = run(&["exec", "--wait", "0", &name, "--", "true"]);
    assert_eq!(code(&out), 75, "{}", stderr(&out));
    let out = run(&["exec", "--wait", "300ms", &name, "--", "true"]);
    assert_eq!(code(&out), 75, "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("cli-test-holder"), "{err}");
    assert!(err.contains(client.owner_id()), "{err}");
    assert_eq!(
        err.matches("waiting for lock").count(),
        1,
        "said once: {err}"
    );
    let out = run(&["exec", "--quiet", "--wait", "300ms", &name, "--", "true"]);
    assert_eq!(code(&out), 75);
    assert!(!stderr(&out).contains("waiting"), "{}", stderr(&out));
    held.release().unwrap();
}

/// 69: the store cannot be reached.
#[test]
fn an_unreachable_store_is_69() {
    for url in [
        "postgres://postgres@127.0.0.1:1/postgres?connect_timeout=2",
        "redis://127.0.0.1:1/",
    ] {
        let out = run_cmd(Command::new(BIN).args([
            "--url",
            url,
            "exec",
            "cli-unreachable",
            "--",
            "true",
        ]));
        assert_eq!(code(&out), 69, "{url}: {}", stderr(&out));
    }
}

/// 64: usage errors, each with a message.
#[test]
fn usage_errors_are_64() {
    for args in [
        &["exec", "--ttl", "5", "cli-usage", "--", "true"][..],
        &["exec", "--ttl", "1.5s", "cli-usage", "--", "true"],
        &["exec", "cli-usage"],
        &[
            "exec",
            "--ttl",
            "10s",
            "--kill-grace",
            "6s",
            "cli-usage",
            "--",
            "true",
        ],
        &["exec", "", "--", "true"],
        &["release", "cli-usage"],
        &["frobnicate"],
    ] {
        let out = run(args);
        assert_eq!(code(&out), 64, "{args:?}: {}", stderr(&out));
        assert!(!stderr(&out).is_empty(), "{args:?}: no message");
    }
    // No store at all.
    let out = run_cmd(
        Command::new(BIN)
            .env_remove("LOCKBOX_URL")
            .env_remove("DATABASE_URL")
            .args(["list"]),
    );
    assert_eq!(code(&out), 64, "{}", stderr(&out));
    // The store from the environment.
    let out = run_cmd(
        Command::new(BIN)
            .env_remove("LOCKBOX_URL")
            .env("DATABASE_URL", database_url())
            .args(["list", "--prefix", "cli-none-"]),
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    // --help documents the reserved statuses.
    let out = run(&["exec", "--help"]);
    assert_eq!(code(&out), 0);
    let help = String::from_utf8_lossy(&out.stdout);
    for status in ["64", "69", "74", "75", "128 + N"] {
        assert!(help.contains(status), "--help omits {status}");
    }
}

/// The holder's database session terminated: the program (a script with a
/// child of its own) is killed, whole group, while the lease still stands;
/// status 74.
#[test]
fn backend_terminated_kills_the_whole_group_before_the_lease_ends() {
    let dir = Scratch::new("terminated");
    let name = unique("cli-terminated");
    let script = dir.script(
        "prog",
        &format!(
            "sleep 60 & echo $! > {child}\necho $$ > {me}\nwait",
            child = dir.path("child"),
            me = dir.path("me")
        ),
    );
    let exec = lockbox(&["exec", "--ttl", "6s", &name, "--", &script])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (me, child) = (dir.pid("me"), dir.pid("child"));
    assert!(alive(me) && alive(child));
    terminate(holder_pid(&name));
    let out = output(exec);
    assert_eq!(code(&out), 74, "{}", stderr(&out));
    assert!(stderr(&out).contains("lost"), "{}", stderr(&out));
    // Dead (and reaped) by the time lockbox exits, before the lease ran out.
    assert!(!alive(me), "the program survived");
    assert!(!alive(child), "the program's child survived");
    assert!(
        matches!(lease_status(&name), LeaseStatus::Held { .. }),
        "the lease ended before the program was stopped"
    );
}

/// SIGTERM to lockbox reaches the program's children (the whole group); the
/// program's status is passed on.
#[test]
fn sigterm_reaches_the_programs_children() {
    let dir = Scratch::new("sigterm");
    let name = unique("cli-sigterm");
    let log = dir.path("log");
    let child = dir.script(
        "child",
        &format!(
            "trap 'echo child-got-TERM >> {log}; exit 0' TERM\nsleep 60 &\necho ok > {ready}\nwait",
            ready = dir.path("child-ready")
        ),
    );
    let parent = dir.script(
        "parent",
        &format!(
            "{child} & c=$!\ntrap 'wait $c; exit 5' TERM\necho ok > {ready}\nwait",
            ready = dir.path("parent-ready")
        ),
    );
    let exec = lockbox(&["exec", &name, "--", &parent]).spawn().unwrap();
    dir.wait_for("child-ready");
    dir.wait_for("parent-ready");
    signal(&exec, libc::SIGTERM);
    assert_eq!(wait_exit(exec), 5);
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "child-got-TERM\n");
}

/// lockbox SIGKILLed: the program and its child die too.
#[test]
fn sigkill_to_lockbox_kills_the_program() {
    let dir = Scratch::new("sigkill");
    let name = unique("cli-sigkill");
    let script = dir.script(
        "prog",
        &format!(
            "sleep 60 & echo $! > {child}\necho $$ > {me}\nwait",
            child = dir.path("child"),
            me = dir.path("me")
        ),
    );
    let mut exec = lockbox(&["exec", &name, "--", &script]).spawn().unwrap();
    let (me, child) = (dir.pid("me"), dir.pid("child"));
    exec.kill().unwrap();
    exec.wait().unwrap();
    assert!(
        eventually(Duration::from_secs(10), || !alive(me) && !alive(child)),
        "the program (alive: {}) or its child (alive: {}) outlived lockbox",
        alive(me),
        alive(child)
    );
}

#[test]
fn list_json_parses_and_shows_a_held_lock() {
    let name = unique("cli-list");
    let client = LockClient::builder(database_url()).build().unwrap();
    let lock = client
        .acquire(&name, &AcquireOptions::new().metadata("cli list test"))
        .unwrap()
        .unwrap();
    let out = run(&["list", "--prefix", &name, "--json"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let leases: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let leases = leases.as_array().unwrap();
    assert_eq!(leases.len(), 1, "{leases:?}");
    let l = &leases[0];
    assert_eq!(l["name"], name.as_str());
    assert_eq!(l["state"], "held");
    assert_eq!(l["owner"], client.owner_id());
    assert_eq!(l["token"], lock.fencing_token());
    assert_eq!(l["metadata"], "cli list test");
    assert!(l["expires_in_ms"].as_i64().unwrap() > 0);

    let out = run(&["list", "--prefix", &name]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.starts_with("NAME"), "{table}");
    assert!(table.contains(&name) && table.contains("held"), "{table}");

    let out = run(&["show", &name, "--json"]);
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(shown["token"], lock.fencing_token());
    let out = run(&["show", &unique("cli-never")]);
    assert_eq!(code(&out), 1);
    lock.release().unwrap();
}

/// Starts `lockbox hold` and reads the token it prints.
fn hold(name: &str) -> (Child, u64) {
    let mut child = lockbox(&["hold", name, "--ttl", "3s"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    (child, line.trim().parse().expect("a token"))
}

#[test]
fn release_force_makes_a_holding_hold_exit_74() {
    let name = unique("cli-release");
    let (holder, token) = hold(&name);
    let out = run(&["release", "--force", &name]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(wait_exit(holder), 74);
    let client = LockClient::builder(database_url()).build().unwrap();
    let next = client.try_lock(&name).unwrap().expect("free");
    assert!(next.fencing_token() > token);
    next.release().unwrap();
}

#[test]
fn hold_exits_0_on_a_signal_and_releases() {
    let name = unique("cli-hold");
    let (holder, _) = hold(&name);
    signal(&holder, libc::SIGTERM);
    assert_eq!(wait_exit(holder), 0);
    assert!(matches!(lease_status(&name), LeaseStatus::Released { .. }));
}

/// `release --force` by a role that may not end the holder's session: 77,
/// naming the missing privilege, and the holder keeps its lock.
#[test]
fn release_force_without_privilege_is_77() {
    let role = unique("cli_role").replace('-', "_");
    drop(LockClient::builder(database_url()).build().unwrap());
    admin()
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN; GRANT SELECT, INSERT, UPDATE ON lockbox_leases TO {role};"
        ))
        .unwrap();
    let name = unique("cli-release-priv");
    let (holder, _) = hold(&name);
    let out = run_cmd(Command::new(BIN).args([
        "--url",
        &url_as_user(&role),
        "release",
        "--force",
        &name,
    ]));
    let _ = admin().batch_execute(&format!("DROP OWNED BY {role}; DROP ROLE {role};"));
    assert_eq!(code(&out), 77, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("pg_read_all_stats"),
        "{}",
        stderr(&out)
    );
    assert!(matches!(lease_status(&name), LeaseStatus::Held { .. }));
    signal(&holder, libc::SIGTERM);
    assert_eq!(wait_exit(holder), 0, "the holder lost its lock");
}

/// A redis-server of the test's own, stopped when dropped.
struct OwnRedis {
    child: Child,
    url: String,
}

impl OwnRedis {
    fn start() -> OwnRedis {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        let url = format!("redis://127.0.0.1:{port}/");
        let answers = || {
            redis::Client::open(url.as_str())
                .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(1)))
                .is_ok()
        };
        assert!(eventually(Duration::from_secs(10), answers));
        OwnRedis { child, url }
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn health(url: &str) -> Output {
    run_cmd(Command::new(BIN).args(["--url", url, "health", "--json"]))
}

/// 0 healthy, 1 degraded, 2 unhealthy; the JSON parses.
#[test]
fn health_exit_codes() {
    let out = health(database_url());
    assert_eq!(code(&out), 0, "{}", String::from_utf8_lossy(&out.stdout));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["status"], "healthy");

    // A fresh Redis server holds no record of lockbox's data: lockbox takes
    // it for a data loss and holds grants back for a TTL (lock-delay), which
    // health reports as degraded.
    let redis = OwnRedis::start();
    let out = health(&redis.url);
    assert_eq!(code(&out), 1, "{}", String::from_utf8_lossy(&out.stdout));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["status"], "degraded");

    let out = health("postgres://postgres@127.0.0.1:1/postgres?connect_timeout=2");
    assert_eq!(code(&out), 2, "{}", String::from_utf8_lossy(&out.stdout));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["status"], "unhealthy");
}

/// The store from the URL's scheme: the same command runs on Redis.
#[test]
fn exec_on_redis() {
    let name = unique("cli-redis");
    let out = run_cmd(
        Command::new(BIN)
            .args(["--url", redis_server::redis_url(), "exec", &name, "--"])
            .args(["sh", "-c", "test \"$LOCKBOX_TOKEN\" -gt 0 && exit 4"]),
    );
    assert_eq!(code(&out), 4, "{}", stderr(&out));
}

/// What the program left behind when it exited is killed before the lock is
/// released: nothing of the group runs unprotected.
#[test]
fn the_programs_leftovers_are_killed_when_it_exits() {
    let dir = Scratch::new("leftovers");
    let name = unique("cli-leftovers");
    let body = format!("sleep 60 & echo $! > {}", dir.path("child"));
    let out = run(&["exec", &name, "--", "sh", "-c", &body]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let child = dir.pid("child");
    assert!(!alive(child), "a background child outlived the lock");
}

/// When the lease in the database ends (`expires_at`, as nanoseconds since
/// the epoch by the machine's clock, which the local server shares).
fn expires_at_ns(name: &str) -> u128 {
    let row = admin()
        .query_one(
            "SELECT (extract(epoch FROM expires_at) * 1000000)::int8 FROM lockbox_leases \
             WHERE name = $1",
            &[&name],
        )
        .unwrap();
    row.get::<_, i64>(0) as u128 * 1000
}

/// A running exec whose store stops answering (a paused proxy: connections
/// up, nothing forwarded), so that renewals fail.
fn exec_behind_paused_proxy(dir: &Scratch, name: &str, ttl: &str, body: &str) -> (Output, Proxy) {
    let proxy = Proxy::to_test_server();
    let script = dir.script("prog", &format!("echo $$ > {}\n{body}", dir.path("me")));
    let exec = Command::new(BIN)
        .env_remove("LOCKBOX_URL")
        .env_remove("DATABASE_URL")
        .args(["--url", &proxy.app_url("lockbox-cli-test")])
        .args([
            "exec",
            "--ttl",
            ttl,
            "--kill-grace",
            "1s",
            name,
            "--",
            &script,
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    dir.wait_for("me");
    proxy.pause();
    (output(exec), proxy)
}

/// Renewals failing: the program gets SIGTERM a grace period before the
/// lock's deadline, ahead of the lease's end; status 74.
#[test]
fn failing_renewals_stop_the_program_before_the_lease_ends() {
    let dir = Scratch::new("graceful");
    let name = unique("cli-graceful");
    let body = format!(
        "trap 'date +%s%N > {term}; exit 0' TERM\nwhile :; do sleep 0.05; done",
        term = dir.path("term")
    );
    let (out, _proxy) = exec_behind_paused_proxy(&dir, &name, "3s", &body);
    assert_eq!(code(&out), 74, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("not being renewed"),
        "{}",
        stderr(&out)
    );
    let term: u128 = dir.wait_for("term").trim().parse().unwrap();
    assert!(
        term < expires_at_ns(&name),
        "SIGTERM came after the lease had ended"
    );
}

/// Renewals failing and the program ignoring SIGTERM: SIGKILL at the lock's
/// deadline; its heartbeats stop before the lease ends; status 74.
#[test]
fn a_program_ignoring_sigterm_is_killed_at_the_deadline() {
    let dir = Scratch::new("deadline");
    let name = unique("cli-deadline");
    let body = format!(
        "trap '' TERM\nwhile :; do date +%s%N > {hb}.new; mv {hb}.new {hb}; sleep 0.01; done",
        hb = dir.path("hb")
    );
    // 10 s: the deadline ends 102 ms (1 % + 2 ms) before the lease.
    let (out, _proxy) = exec_behind_paused_proxy(&dir, &name, "10s", &body);
    assert_eq!(code(&out), 74, "{}", stderr(&out));
    assert!(stderr(&out).contains("deadline"), "{}", stderr(&out));
    let me = dir.pid("me");
    assert!(!alive(me), "the program survived");
    let last: u128 = dir.wait_for("hb").trim().parse().unwrap();
    assert!(
        last < expires_at_ns(&name),
        "the program still ran after the lease had ended"
    );
}

/// A forced release on Redis: the holder's next renewal finds the key gone
/// (not its own), and the program with its child is killed at once, without
/// waiting for the grace period; status 74.
#[test]
fn forced_release_on_redis_kills_the_program_at_once() {
    let dir = Scratch::new("redis-forced");
    let name = unique("cli-redis-forced");
    let url = redis_server::redis_url();
    let script = dir.script(
        "prog",
        &format!(
            "trap 'echo got-TERM >> {log}' TERM\nsleep 60 & echo $! > {child}\necho $$ > {me}\nwait",
            log = dir.path("log"),
            child = dir.path("child"),
            me = dir.path("me")
        ),
    );
    let exec = Command::new(BIN)
        .args([
            "--url",
            url,
            "exec",
            "--ttl",
            "6s",
            "--kill-grace",
            "3s",
            &name,
        ])
        .args(["--", &script])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (me, child) = (dir.pid("me"), dir.pid("child"));
    let out = run_cmd(Command::new(BIN).args(["--url", url, "release", "--force", &name]));
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let out = output(exec);
    assert_eq!(code(&out), 74, "{}", stderr(&out));
    assert!(stderr(&out).contains("lost"), "{}", stderr(&out));
    assert!(!alive(me) && !alive(child), "the group survived");
    // SIGKILL, not SIGTERM: the lease may already be someone else's.
    assert!(!std::path::Path::new(&dir.path("log")).exists());
}

/// lockbox stopped (SIGSTOP, as Ctrl-Z would): it renews nothing and kills
/// nothing, so the guard kills the program and its child at the lock's last
/// deadline, before the lease ends. Continued, lockbox reports the loss: 74.
#[test]
fn a_stopped_lockbox_still_has_the_program_killed_by_the_deadline() {
    let dir = Scratch::new("stopped");
    let name = unique("cli-stopped");
    let script = dir.script(
        "prog",
        &format!(
            "sleep 60 & echo $! > {child}\necho $$ > {me}\n\
             while :; do date +%s%N > {hb}.new; mv {hb}.new {hb}; sleep 0.01; done",
            child = dir.path("child"),
            me = dir.path("me"),
            hb = dir.path("hb"),
        ),
    );
    // 10 s: the deadline ends 102 ms (1 % + 2 ms) before the lease.
    let exec = lockbox(&["exec", "--ttl", "10s", &name, "--", &script])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (me, child) = (dir.pid("me"), dir.pid("child"));
    signal(&exec, libc::SIGSTOP);
    let died = eventually(Duration::from_secs(20), || !alive(me) && !alive(child));
    signal(&exec, libc::SIGCONT);
    assert!(died, "the program outlived a stopped lockbox's lease");
    let last: u128 = dir.wait_for("hb").trim().parse().unwrap();
    assert!(
        last < expires_at_ns(&name),
        "the program still ran after the lease had ended"
    );
    let out = output(exec);
    assert_eq!(code(&out), 74, "{}", stderr(&out));
}

/// The etcd store, by its `etcd://` URL: a program runs under the lock with
/// its fencing token (the key's create revision), and `list` shows nothing
/// held afterwards.
#[test]
fn exec_runs_on_etcd() {
    let members = common::etcd_server::etcd_url();
    let url = format!(
        "etcd://{}",
        members
            .split(',')
            .map(|m| m.trim_start_matches("http://"))
            .collect::<Vec<_>>()
            .join(",")
    );
    let name = unique("cli-etcd");
    let mut c = Command::new(BIN);
    c.env_remove("LOCKBOX_URL")
        .env_remove("DATABASE_URL")
        .args(["--url", &url, "exec", "--quiet", &name, "--", "sh", "-c"])
        .arg("echo token=$LOCKBOX_TOKEN");
    let out = run_cmd(&mut c);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let token: u64 = stdout
        .trim()
        .strip_prefix("token=")
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("no token printed: {stdout:?}"));
    assert!(token > 0);
    let mut c = Command::new(BIN);
    c.env_remove("LOCKBOX_URL")
        .env_remove("DATABASE_URL")
        .args(["--url", &url, "list", "--json", "--prefix", &name]);
    let out = run_cmd(&mut c);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        listed
            .as_array()
            .unwrap()
            .iter()
            .all(|l| l["state"] != "held"),
        "{listed}"
    );
}
