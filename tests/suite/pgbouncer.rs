//! A connection path through PgBouncer in transaction-pooling mode cannot keep a
//! session advisory lock: lockbox refuses it at build time with a clear error
//! instead of silently losing exclusion. PgBouncer is installed from Debian's
//! packages when missing (needs root; skipped with a printed reason otherwise).

use crate::common;

use std::process::{Child, Command, Stdio};

use common::*;
use lockbox::{Error, LockClient};

struct Bouncer {
    child: Child,
    port: u16,
    dir: std::path::PathBuf,
}

impl Drop for Bouncer {
    fn drop(&mut self) {
        // Closing the watchdog's stdin stops PgBouncer.
        drop(self.child.stdin.take());
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0\n"))
        .unwrap_or(false)
}

fn pgbouncer() -> Option<&'static str> {
    let path = "/usr/sbin/pgbouncer";
    if std::path::Path::new(path).exists() {
        return Some(path);
    }
    if !is_root() {
        return None;
    }
    let ok = Command::new("apt-get")
        .args(["install", "-y", "-qq", "pgbouncer"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    (ok && std::path::Path::new(path).exists()).then_some(path)
}

fn start_bouncer(exe: &str) -> Bouncer {
    let ServerParts {
        host,
        port: db_port,
        user,
        ..
    } = server_parts();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = std::env::temp_dir().join(format!("lockbox-bouncer-{}-{port}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("users.txt"), format!("\"{user}\" \"\"\n")).unwrap();
    // PgBouncer's defaults otherwise (server connections reused last-in first-out).
    std::fs::write(
        dir.join("pgbouncer.ini"),
        format!(
            "[databases]\npostgres = host={host} port={db_port} dbname=postgres\n\
             [pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n\
             auth_type = trust\nauth_file = {users}\npool_mode = transaction\n\
             default_pool_size = 4\n\
             logfile = {log}\n",
            users = dir.join("users.txt").display(),
            log = dir.join("pgbouncer.log").display(),
        ),
    )
    .unwrap();
    // PgBouncer will not run as root. A shell watchdog runs it and stops it when
    // its stdin (a pipe from this process) closes: on drop, or when the test
    // process ends in any way.
    let ini = dir.join("pgbouncer.ini").display().to_string();
    let run = if is_root() {
        Command::new("chown")
            .args(["-R", "postgres", &dir.display().to_string()])
            .status()
            .unwrap();
        format!("setpriv --reuid=postgres --regid=postgres --init-groups {exe} '{ini}'")
    } else {
        format!("{exe} '{ini}'")
    };
    let child = Command::new("sh")
        .args([
            "-c",
            &format!("{run} & p=$!; cat >/dev/null; kill $p; wait $p"),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let bouncer = Bouncer { child, port, dir };
    let url = format!("host=127.0.0.1 port={port} user={user} dbname=postgres");
    assert!(
        eventually(ms(10_000), || postgres::Client::connect(
            &url,
            postgres::NoTls
        )
        .is_ok()),
        "pgbouncer did not start"
    );
    bouncer
}

#[test]
fn transaction_pooling_is_refused_at_build() {
    let Some(exe) = pgbouncer() else {
        eprintln!("SKIPPED: pgbouncer is not installed and installing it needs root");
        return;
    };
    let bouncer = start_bouncer(exe);
    let user = server_parts().user;
    let url = format!(
        "host=127.0.0.1 port={} user={user} dbname=postgres",
        bouncer.port
    );
    match LockClient::builder(&url).build() {
        Err(Error::Unsupported(msg)) => assert!(msg.contains("transaction"), "{msg}"),
        other => panic!("expected Unsupported, got {other:?}"),
    }
}
