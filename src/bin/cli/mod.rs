//! Arguments, exit statuses and the store, shared by every subcommand.

mod exec;
mod guard;
mod inspect;

use std::ffi::OsString;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use lockbox::{Error, LockClient};

/// Exit statuses (sysexits.h where one fits).
pub(crate) mod status {
    /// The command line is wrong (EX_USAGE).
    pub const USAGE: i32 = 64;
    /// The store cannot be reached (EX_UNAVAILABLE).
    pub const UNAVAILABLE: i32 = 69;
    /// The lock was lost while held, and the program was stopped (EX_IOERR).
    pub const LOST: i32 = 74;
    /// The lock was not acquired within `--wait` (EX_TEMPFAIL).
    pub const NOT_ACQUIRED: i32 = 75;
    /// The store refused for lack of privilege (EX_NOPERM).
    pub const NO_PERMISSION: i32 = 77;
    /// Anything else that went wrong.
    pub const FAILED: i32 = 1;
}

const EXIT_STATUSES: &str = "\
EXIT STATUS:
  exec     the program's own status, or 128 + N when signal N ended it;
           126/127 when the program cannot be run / is not found
  0        success (hold: ended by a signal)
  1        other failure (show: no such lease; health: degraded)
  2        health: unhealthy
  64       usage error
  69       the store cannot be reached
  74       the lock was lost while held (exec: the program was stopped)
  75       the lock was not acquired within --wait
  77       the store refused for lack of privilege (release --force)

ENVIRONMENT:
  LOCKBOX_URL, DATABASE_URL   the store, when --url is not given (in that order)
  exec sets LOCKBOX_NAME, LOCKBOX_TOKEN (the fencing token) and LOCKBOX_TTL_MS
  for the program.";

/// Run a program under a distributed lock; inspect and manage locks.
///
/// The store is a PostgreSQL database (postgres://, postgresql://, or a
/// libpq key=value string), a Redis server (redis://, rediss://,
/// redis+unix://) or an etcd cluster (etcd://host:port,host:port, or its
/// members' http:// endpoints).
#[derive(Debug, Parser)]
#[command(name = "lockbox", version, after_help = EXIT_STATUSES)]
pub(crate) struct Cli {
    /// The store's URL [default: $LOCKBOX_URL, else $DATABASE_URL].
    #[arg(long, global = true, value_name = "URL")]
    url: Option<String>,

    /// The lease table (PostgreSQL) [default: lockbox_leases].
    #[arg(long, global = true, value_name = "TABLE")]
    table: Option<String>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run PROGRAM while holding the lock NAME; stop it if the lock is lost.
    ///
    /// PROGRAM runs (without a shell) in a process group of its own, with
    /// LOCKBOX_NAME, LOCKBOX_TOKEN (the fencing token) and LOCKBOX_TTL_MS in
    /// its environment. SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2
    /// are forwarded to the whole group. When PROGRAM exits, what is left of
    /// its group is killed before the lock is released.
    ///
    /// Stopping on loss: if renewals fail until only the kill grace is left
    /// before the lock's local deadline, the group gets SIGTERM, then SIGKILL
    /// at the deadline, which ends before the lease (exit 74). If the store
    /// reports the lock lost (taken over, released by force, its session
    /// ended), the lease may already be someone else's: the group gets
    /// SIGKILL at once (exit 74). If lockbox itself dies, even by SIGKILL,
    /// the group is killed; if it is stopped or hangs, the group is killed
    /// at the lock's deadline.
    #[command(after_help = EXIT_STATUSES)]
    Exec(ExecArgs),

    /// List the leases: name, state, owner, token, expires in, metadata.
    List {
        /// Only names that start with this.
        #[arg(long, value_name = "P")]
        prefix: Option<String>,
        /// JSON (an array of objects) instead of a table.
        #[arg(long)]
        json: bool,
    },

    /// Show one lease (exit 1 when the name has none).
    Show {
        /// The lock's name.
        name: String,
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
    },

    /// End the current holder's lease (and, on PostgreSQL, its session).
    ///
    /// The holder learns of it at its next renewal (lost()); the next grant's
    /// fencing token is higher. Until the holder notices, it may still work:
    /// only fencing tokens protect the resource in that window.
    Release {
        /// Required: releasing someone else's lock is an override.
        #[arg(long)]
        force: bool,
        /// The lock's name.
        name: String,
    },

    /// Take the lock, print its fencing token, and hold it until a signal
    /// (exit 0) or its loss (exit 74).
    Hold {
        /// The lock's name.
        name: String,
        #[command(flatten)]
        lock: LockArgs,
    },

    /// Check the store: exit 0 healthy, 1 degraded, 2 unhealthy.
    Health {
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// How a lock is taken.
#[derive(Debug, Args)]
struct LockArgs {
    /// The lease length, e.g. 500ms, 30s, 5m.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "30s")]
    ttl: Duration,
    /// How long to wait for the lock (0: try once) [default: forever].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    wait: Option<Duration>,
    /// Stored with the lease, shown to operators (list, show, waiters).
    #[arg(long, value_name = "TEXT")]
    metadata: Option<String>,
    /// Say nothing on stderr while waiting.
    #[arg(long)]
    quiet: bool,
}

#[derive(Debug, Args)]
struct ExecArgs {
    /// The lock's name.
    name: String,
    #[command(flatten)]
    lock: LockArgs,
    /// Time between SIGTERM and SIGKILL when stopping ahead of the lock's
    /// deadline; at most half the TTL [default: the TTL / 4, at most 10s].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    kill_grace: Option<Duration>,
    /// The program and its arguments (after `--`).
    #[arg(last = true, required = true, value_name = "PROGRAM")]
    program: Vec<OsString>,
}

/// `500ms`, `30s`, `5m`, `1h`, or `0`.
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{text:?} has no unit: write e.g. 500ms, 30s, 5m or 1h"))?;
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration: write e.g. 500ms, 30s, 5m or 1h"))?;
    let per = match unit {
        "ms" => Duration::from_millis(1),
        "s" => Duration::from_secs(1),
        "m" => Duration::from_secs(60),
        "h" => Duration::from_secs(3600),
        _ => {
            return Err(format!(
                "{text:?}: unknown unit {unit:?} (use ms, s, m or h)"
            ));
        }
    };
    per.checked_mul(u32::try_from(n).map_err(|_| format!("{text:?} is too long"))?)
        .ok_or_else(|| format!("{text:?} is too long"))
}

/// A failure that ends the command with `status`.
#[derive(Debug)]
pub(crate) struct Exit {
    pub status: i32,
    pub message: Option<String>,
}

impl Exit {
    pub fn new(status: i32, message: impl Into<String>) -> Exit {
        Exit {
            status,
            message: Some(message.into()),
        }
    }

    pub fn usage(message: impl Into<String>) -> Exit {
        Exit::new(status::USAGE, message)
    }

    /// The status for a library error: bad input is a usage error, a missing
    /// privilege its own, a store that does not answer 69.
    pub fn from_error(context: &str, e: &Error) -> Exit {
        let status = match e {
            Error::InvalidName(_) | Error::InvalidConfig(_) => status::USAGE,
            Error::InsufficientPrivilege(_) => status::NO_PERMISSION,
            Error::Connect { .. } | Error::PoolTimeout { .. } | Error::Database(_) => {
                status::UNAVAILABLE
            }
            _ => status::FAILED,
        };
        Exit::new(status, format!("{context}: {e}"))
    }
}

/// The store's URL: `--url`, else `LOCKBOX_URL`, else `DATABASE_URL`.
fn store_url(cli: &Cli) -> Result<String, Exit> {
    cli.url
        .clone()
        .or_else(|| std::env::var("LOCKBOX_URL").ok())
        .or_else(|| std::env::var("DATABASE_URL").ok())
        .filter(|u| !u.trim().is_empty())
        .ok_or_else(|| {
            Exit::usage("no store given: pass --url, or set LOCKBOX_URL or DATABASE_URL")
        })
}

/// `etcd://a:2379,b:2379` as the etcd backend takes it:
/// `http://a:2379,http://b:2379`.
fn etcd_endpoints(url: &str) -> String {
    let members = url.split_once("://").map_or(url, |(_, rest)| rest);
    members
        .split(',')
        .map(|m| format!("http://{}", m.trim()))
        .collect::<Vec<_>>()
        .join(",")
}

/// A client for the store the URL names. Its TTL is `ttl` (the renewal
/// interval follows it).
pub(crate) fn connect(cli: &Cli, ttl: Option<Duration>) -> Result<LockClient, Exit> {
    let url = store_url(cli)?;
    let scheme = url.split_once("://").map(|(s, _)| s.to_ascii_lowercase());
    let mut builder = match scheme.as_deref() {
        Some("redis" | "rediss" | "redis+unix" | "unix") => LockClient::redis(&url),
        Some("postgres" | "postgresql") | None => LockClient::builder(&url),
        // etcd's own endpoint form, a comma-separated list of members.
        Some("http" | "https") => LockClient::etcd(&url),
        // The same, named for the store: etcd://a:2379,b:2379.
        Some("etcd") => LockClient::etcd(&etcd_endpoints(&url)),
        Some(other) => {
            return Err(Exit::usage(format!(
                "unknown store scheme {other:?}: use postgres://, postgresql://, redis://, \
                 rediss://, redis+unix://, etcd:// or an etcd member's http://"
            )));
        }
    };
    if let Some(ttl) = ttl {
        builder = builder.ttl(ttl);
    }
    if let Some(table) = &cli.table {
        builder = builder.table(table);
    }
    builder
        .build()
        .map_err(|e| Exit::from_error("cannot use the store", &e))
}

/// Runs the command line; returns the exit status.
pub(crate) fn main() -> i32 {
    let mut args = std::env::args_os();
    if args.nth(1).as_deref() == Some(guard::GUARD_ARG.as_ref()) {
        return guard::main(args.collect());
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { status::USAGE } else { 0 };
        }
    };
    let result = match &cli.command {
        Command::Exec(args) => exec::run(&cli, args),
        Command::List { prefix, json } => inspect::list(&cli, prefix.as_deref(), *json),
        Command::Show { name, json } => inspect::show(&cli, name, *json),
        Command::Release { force, name } => inspect::release(&cli, name, *force),
        Command::Hold { name, lock } => inspect::hold(&cli, name, lock),
        Command::Health { json } => inspect::health(&cli, *json),
    };
    match result {
        Ok(status) => status,
        Err(exit) => {
            if let Some(message) = exit.message {
                eprintln!("lockbox: {message}");
            }
            exit.status
        }
    }
}

/// How long ago / until, for people: `850ms`, `12.3s`, `4m05s`, `2h03m`.
pub(crate) fn human(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        format!("{:.1}s", d.as_secs_f64())
    } else if ms < 3_600_000 {
        format!("{}m{:02}s", ms / 60_000, (ms / 1000) % 60)
    } else {
        format!("{}h{:02}m", ms / 3_600_000, (ms / 60_000) % 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units_and_refuse_the_rest() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        for bad in ["", "5", "1.5s", "s", "-1s", "3d", "99999999999s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn human_durations() {
        assert_eq!(human(Duration::from_millis(850)), "850ms");
        assert_eq!(human(Duration::from_millis(12_340)), "12.3s");
        assert_eq!(human(Duration::from_secs(245)), "4m05s");
        assert_eq!(human(Duration::from_secs(7380)), "2h03m");
    }
}
