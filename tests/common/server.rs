//! Finds a PostgreSQL server to run against, shared by the tests and the examples.
//!
//! In order: `DATABASE_URL` if set; else a server on 127.0.0.1:5432 that answers
//! (as `$PGUSER`, `postgres` or `$USER`, in plain text: `sslmode=disable`); else a throwaway cluster started from the
//! machine's own `initdb`/`pg_ctl` (as the `postgres` user when running as root),
//! stopped and deleted when this process exits; else a panic that says how to
//! provide one.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

/// The URL of a server to use, found (or started) once per process.
pub fn database_url() -> &'static str {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(find_or_start)
}

fn find_or_start() -> String {
    if let Ok(url) = std::env::var("DATABASE_URL") {
        return url;
    }
    let mut users = vec![];
    users.extend(std::env::var("PGUSER").ok());
    users.push("postgres".to_owned());
    users.extend(std::env::var("USER").ok());
    for user in users {
        // Plain text, as before TLS support: the suite's short TTLs (and the
        // benchmark's figures) were set on plain-text sessions, and the
        // machine's server has ssl = on, which the default sslmode=prefer
        // would take. TLS is tested on a cluster of its own (pg_tls.rs,
        // pg_conformance_tls.rs).
        let url = format!("postgres://{user}@127.0.0.1:5432/postgres?sslmode=disable");
        if answers(&url) {
            return url;
        }
    }
    match Cluster::start() {
        Ok(cluster) => {
            let url = cluster.url.clone();
            // Kept for the life of the process; its watchdog stops it at exit.
            std::mem::forget(cluster);
            url
        }
        Err(why) => panic!(
            "no PostgreSQL server found: set DATABASE_URL, run one on 127.0.0.1:5432 \
             (trust or password in the URL), or install the server binaries \
             (Debian: apt-get install postgresql) so a throwaway cluster can be started. \
             Starting one failed: {why}"
        ),
    }
}

fn answers(url: &str) -> bool {
    let Ok(mut config) = url.parse::<postgres::Config>() else {
        return false;
    };
    config.connect_timeout(Duration::from_secs(2));
    config.connect(postgres::NoTls).is_ok()
}

/// A throwaway PostgreSQL cluster on a free loopback port. Stopped (immediately) and
/// deleted when dropped, or when the process exits, whichever comes first.
pub struct Cluster {
    pub url: String,
    pub port: u16,
    pub dir: PathBuf,
    bin: PathBuf,
    as_postgres: bool,
    /// Its stdin is a pipe from this process: EOF (our exit) makes it stop the cluster.
    watchdog: Option<Child>,
}

/// Serialises `initdb`/`pg_ctl` runs: they are heavy on two cores.
static CLUSTER_OPS: Mutex<()> = Mutex::new(());

impl Cluster {
    pub fn start() -> Result<Cluster, String> {
        Cluster::start_with(|_| Ok(()))
    }

    /// A cluster set up by `configure` after `initdb` and before its server
    /// starts (to write `postgresql.conf`, `pg_hba.conf`, certificates …).
    pub fn start_with(
        configure: impl FnOnce(&Cluster) -> Result<(), String>,
    ) -> Result<Cluster, String> {
        let cluster = Cluster::init(|cluster| {
            let data = cluster.data();
            cluster.pg(
                "initdb",
                &[
                    "-D",
                    &data,
                    "-U",
                    "postgres",
                    "-A",
                    "trust",
                    "--no-sync",
                    "-E",
                    "UTF8",
                ],
            )?;
            configure(cluster)
        })?;
        Ok(cluster)
    }

    /// A hot standby of `primary` (`pg_basebackup -R`, streaming from it), on
    /// a port of its own.
    pub fn standby_of(primary: &Cluster) -> Result<Cluster, String> {
        let port = primary.port.to_string();
        Cluster::init(|cluster| {
            cluster.pg(
                "pg_basebackup",
                &[
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &port,
                    "-U",
                    "postgres",
                    "-D",
                    &cluster.data(),
                    "-R",
                    "-X",
                    "stream",
                    "--no-sync",
                ],
            )?;
            // The primary's socket directory and port settings are not copied
            // (they are command-line options), so nothing else needs changing.
            Ok(())
        })
    }

    /// Makes the cluster's directory, runs `populate` to fill its data
    /// directory, then starts the server and its watchdog.
    fn init(populate: impl FnOnce(&Cluster) -> Result<(), String>) -> Result<Cluster, String> {
        let _serial = CLUSTER_OPS.lock().unwrap_or_else(|p| p.into_inner());
        let bin = server_bin_dir().ok_or("no initdb found in PATH or /usr/lib/postgresql/*/bin")?;
        let as_postgres = is_root();
        let port = free_port()?;
        let dir = std::env::temp_dir().join(format!("lockbox-pg-{}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let mut cluster = Cluster {
            url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
            port,
            dir,
            bin,
            as_postgres,
            watchdog: None,
        };
        if as_postgres {
            cluster.run("chown", &["-R", "postgres:postgres", &cluster.path()])?;
        }
        populate(&cluster)?;
        // The port chosen free can be taken (by any outgoing connection: they
        // draw from the same range) before the server binds it; the server
        // then refuses to start. Another port, then (the etcd members' harness
        // was seen failing that way).
        let mut attempt = 1;
        while let Err(e) = cluster.start_server() {
            let log = std::fs::read_to_string(cluster.dir.join("server.log")).unwrap_or_default();
            if attempt >= 5 || !log.contains("could not bind") {
                return Err(e);
            }
            attempt += 1;
            cluster.port = free_port()?;
            cluster.url = format!("postgres://postgres@127.0.0.1:{}/postgres", cluster.port);
        }
        cluster.spawn_watchdog()?;
        Ok(cluster)
    }

    fn path(&self) -> String {
        self.dir.display().to_string()
    }

    /// The data directory.
    pub fn data(&self) -> String {
        self.dir.join("data").display().to_string()
    }

    /// The directory of the server's Unix-domain socket.
    pub fn socket_dir(&self) -> String {
        self.path()
    }

    /// Hands `path` to the user the server runs as (with mode `mode`), so that
    /// it can read it.
    pub fn give_to_server(&self, path: &str, mode: &str) -> Result<(), String> {
        if self.as_postgres {
            self.run("chown", &["postgres:postgres", path])?;
        }
        self.run("chmod", &[mode, path])
    }

    /// Starts the server and waits (`pg_ctl -w`) until it accepts connections.
    pub fn start_server(&self) -> Result<(), String> {
        // fsync off: a throwaway cluster's flushes would otherwise stall the WAL
        // flushes of every other server on this disk (a commit was seen to wait
        // over a second), which is what made short-TTL tests elsewhere fail.
        // Crash tests here stop the server process, never the machine, so what
        // was written to the OS survives them as before.
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=300 -c fsync=off",
            self.port,
            self.path()
        );
        let log = self.dir.join("server.log").display().to_string();
        self.pg(
            "pg_ctl",
            &[
                "-D",
                &self.data(),
                "-l",
                &log,
                "-o",
                &opts,
                "-w",
                "-t",
                "60",
                "start",
            ],
        )
    }

    /// The running server's postmaster pid (first line of `postmaster.pid`).
    pub fn postmaster_pid(&self) -> u32 {
        let text = std::fs::read_to_string(self.dir.join("data/postmaster.pid")).unwrap();
        text.lines().next().unwrap().trim().parse().unwrap()
    }

    /// Stops the server: `mode` is `fast` or `immediate` (a crash, for the server).
    pub fn stop_server(&self, mode: &str) -> Result<(), String> {
        self.pg(
            "pg_ctl",
            &["-D", &self.data(), "-m", mode, "-w", "-t", "60", "stop"],
        )
    }

    /// Promotes a standby to a primary, waiting until it accepts writes.
    pub fn promote(&self) -> Result<(), String> {
        self.pg("pg_ctl", &["-D", &self.data(), "-w", "-t", "60", "promote"])
    }

    fn pg(&self, tool: &str, args: &[&str]) -> Result<(), String> {
        let exe = self.bin.join(tool).display().to_string();
        if self.as_postgres {
            let mut full = vec!["-u", "postgres", "--", exe.as_str()];
            full.extend_from_slice(args);
            self.run("runuser", &full)
        } else {
            self.run(&exe, args)
        }
    }

    fn run(&self, program: &str, args: &[&str]) -> Result<(), String> {
        let out = Command::new(program)
            .args(args)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("running {program}: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{program} {args:?} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    fn spawn_watchdog(&mut self) -> Result<(), String> {
        let pg_ctl = self.bin.join("pg_ctl").display().to_string();
        let stop = format!("{pg_ctl} -D '{}' -m immediate -w stop", self.data());
        let stop = if self.as_postgres {
            format!("runuser -u postgres -- {stop}")
        } else {
            stop
        };
        let script = format!(
            "cat >/dev/null; {stop} >/dev/null 2>&1; rm -rf '{}'",
            self.path()
        );
        let child = Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("starting the watchdog: {e}"))?;
        self.watchdog = Some(child);
        Ok(())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(mut watchdog) = self.watchdog.take() {
            // Closing its stdin makes it stop the server and delete the directory.
            drop(watchdog.stdin.take());
            let _ = watchdog.wait();
        }
    }
}

fn server_bin_dir() -> Option<PathBuf> {
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if dir.join("initdb").exists() {
            return Some(dir);
        }
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("initdb").exists())
        .collect();
    versions.sort_by_key(|p| {
        p.parent()
            .and_then(Path::file_name)
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    versions.pop()
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn free_port() -> Result<u16, String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| e.to_string())
}
