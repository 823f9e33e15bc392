//! Review (attack on the Redis "Production connections" change): a
//! `redis+unix://` connection's setup must be bounded by `connect_timeout`, as
//! a TCP or TLS one is.
//!
//! The driver opens a Unix-domain socket with a plain blocking
//! `UnixStream::connect`, with no timeout. Linux blocks such a `connect()` for
//! as long as the server's accept queue stays full — a frozen Redis (stopped,
//! or stuck in a long script) whose queue filled up with reconnecting clients.
//! Then `build()` hangs instead of failing with `Error::Connect`, and a release
//! that needs a new connection hangs past the holder's deadline (the guarantee
//! `redis_timeouts.rs` checks over TCP).
//!
//! Each test runs its own `redis-server` (Unix socket only, default
//! `tcp-backlog`), freezes it with SIGSTOP, and fills its accept queue with
//! non-blocking connects until the kernel answers EAGAIN (the queue is full:
//! a signal, not a sleep). What must happen within the connect timeout or the
//! holder's deadline is then given a watchdog many times longer than that; on
//! a hang the server is resumed (which unblocks the hung call) and the test
//! fails.

use crate::common;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::redis_server::{connect, mark_intact};
use common::*;
use lockbox::{AcquireOptions, Error, LockClient};

/// How long a call bounded by a sub-second limit may take before it is taken
/// to hang (far beyond any scheduling delay).
const WATCHDOG: Duration = Duration::from_secs(60);

/// A redis-server on a Unix socket only, which the test can freeze; resumed
/// and killed when dropped.
struct FrozenableRedis {
    child: Child,
    socket: PathBuf,
}

impl FrozenableRedis {
    fn start() -> FrozenableRedis {
        let socket = std::env::temp_dir().join(format!("{}.sock", unique("lockbox-review-unix")));
        let child = Command::new("redis-server")
            .args(["--port", "0", "--unixsocket"])
            .arg(&socket)
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting redis-server");
        let server = FrozenableRedis { child, socket };
        assert!(
            eventually(Duration::from_secs(10), || common::redis_server::answers(
                &server.url()
            )),
            "redis-server did not answer on its socket"
        );
        mark_intact(&server.url());
        server
    }

    fn url(&self) -> String {
        format!("redis+unix://{}", self.socket.display())
    }

    fn signal(&self, sig: libc::c_int) {
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
        assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
    }

    /// Stops the server and fills its accept queue: returns the queued
    /// connections once the kernel refuses another (EAGAIN).
    fn freeze_with_full_queue(&self) -> Vec<OwnedFd> {
        self.signal(libc::SIGSTOP);
        fill_accept_queue(&self.socket)
    }

    fn resume(&self) {
        self.signal(libc::SIGCONT);
    }
}

impl Drop for FrozenableRedis {
    fn drop(&mut self) {
        let _ = unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGCONT) };
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Non-blocking connects to `path` until the kernel says the listener's
/// queue is full (EAGAIN).
fn fill_accept_queue(path: &Path) -> Vec<OwnedFd> {
    let mut queued = Vec::new();
    loop {
        let fd = unsafe {
            libc::socket(
                libc::AF_UNIX,
                libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
            )
        };
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
        addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
        let bytes = path.as_os_str().as_bytes();
        assert!(bytes.len() < addr.sun_path.len(), "socket path too long");
        for (i, b) in bytes.iter().enumerate() {
            addr.sun_path[i] = *b as libc::c_char;
        }
        let rc = unsafe {
            libc::connect(
                fd.as_raw_fd(),
                &addr as *const libc::sockaddr_un as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            queued.push(fd);
            assert!(queued.len() < 10_000, "the accept queue never filled");
            continue;
        }
        let err = std::io::Error::last_os_error();
        assert_eq!(
            err.raw_os_error(),
            Some(libc::EAGAIN),
            "unexpected connect error: {err}"
        );
        return queued;
    }
}

/// `build()` against a frozen server whose accept queue is full fails with
/// `Error::Connect` within its connect timeout (0.5 s), as over TCP; it must
/// not wait until the server wakes up.
#[test]
fn build_over_a_unix_socket_is_bounded_by_the_connect_timeout() {
    let server = FrozenableRedis::start();
    let _queued = server.freeze_with_full_queue();
    let url = server.url();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let result = LockClient::redis(&url).connect_timeout(ms(500)).build();
        let _ = tx.send(result.map(|_| ()));
    });
    let result = rx.recv_timeout(WATCHDOG);
    // Unblocks a hung build (and lets the thread end) before failing.
    server.resume();
    match result {
        Err(_) => panic!(
            "build() with connect_timeout 500 ms did not return within {WATCHDOG:?}: the Unix \
             socket connect() has no timeout and waits for the frozen server's accept queue"
        ),
        Ok(Err(Error::Connect { .. })) => {}
        Ok(other) => panic!("expected Error::Connect, got {other:?}"),
    }
}

/// A release whose idle connection turns out dead opens a new one; over a
/// Unix socket to a frozen server with a full accept queue that open must
/// still end by the holder's deadline (the lease is 4 s), not hang until the
/// server resumes.
#[test]
fn a_release_over_a_unix_socket_returns_by_the_deadline() {
    let server = FrozenableRedis::start();
    let client = LockClient::redis(&server.url())
        .connect_timeout(ms(500))
        .build()
        .unwrap();
    let lock = client
        .acquire(
            &unique("unix-release"),
            &AcquireOptions::new().ttl(Duration::from_secs(4)),
        )
        .unwrap()
        .expect("free");
    // The server closes lockbox's command connections (the idle one the
    // release would take among them), as a restart or an idle timeout does.
    let mut admin = connect(&server.url());
    let killed: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("normal")
        .arg("SKIPME")
        .arg("yes")
        .query(&mut admin)
        .unwrap();
    assert!(killed >= 1, "no lockbox connection to close");
    let _queued = server.freeze_with_full_queue();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(lock.release());
    });
    let result = rx.recv_timeout(WATCHDOG);
    server.resume();
    assert!(
        result.is_ok(),
        "release() of a 4 s lease did not return within {WATCHDOG:?}: it hung opening a \
         connection over the Unix socket, past the holder's deadline"
    );
}

/// `field:value` from an `INFO` answer, as a number.
fn info_number(admin: &mut redis::Connection, section: &str, field: &str) -> u64 {
    let info: String = redis::cmd("INFO").arg(section).query(admin).unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("no {field} in INFO {section}"))
        .trim()
        .parse()
        .unwrap()
}

/// The attempts a frozen server leaves waiting stay bounded (the pool's size
/// plus eight, and one for the release listener) however often health checks
/// and acquires ask for connections, and each one closes its connection as
/// soon as it finally opens: once the server resumes, none of them is left
/// connected.
#[test]
fn attempts_left_waiting_are_bounded_and_close_when_the_server_wakes() {
    let server = FrozenableRedis::start();
    let client = LockClient::redis(&server.url())
        .pool_size(2)
        .pool_timeout(Duration::from_secs(2))
        .connect_timeout(ms(500))
        .health_timeout(ms(100))
        .build()
        .unwrap();
    assert!(
        eventually(Duration::from_secs(10), || client.health().is_healthy()),
        "{}",
        client.health()
    );
    let mut admin = connect(&server.url());
    let before = info_number(&mut admin, "stats", "total_connections_received");
    let queued = server.freeze_with_full_queue();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for _ in 0..30 {
            let h = client.health();
            assert!(!h.database.reachable, "{h}");
        }
        for _ in 0..3 {
            let err = client
                .try_lock(&unique("frozen-unix"))
                .expect_err("no connection can be opened");
            assert!(matches!(err, Error::Connect { .. }), "{err:?}");
        }
        // Dropped while its attempts still wait.
        drop(client);
        let _ = tx.send(());
    });
    let result = rx.recv_timeout(WATCHDOG);
    let queued_count = queued.len() as u64;
    drop(queued);
    server.resume();
    assert!(
        result.is_ok(),
        "health checks and acquires against a frozen server did not return within {WATCHDOG:?}"
    );
    assert!(
        eventually(Duration::from_secs(10), || info_number(
            &mut admin,
            "clients",
            "connected_clients"
        ) == 1),
        "connections opened after their callers gave up were kept open: {} clients",
        info_number(&mut admin, "clients", "connected_clients")
    );
    let after = info_number(&mut admin, "stats", "total_connections_received");
    let attempts = after - before - queued_count;
    assert!(
        (1..=2 + 8 + 1).contains(&attempts),
        "{attempts} connection attempts were left waiting for the frozen server"
    );
}
