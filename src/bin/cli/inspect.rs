//! `list`, `show`, `release --force`, `hold` and `health`.

use std::io::Write;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crossbeam_channel::select;
use lockbox::{HealthStatus, LeaseInfo, LeaseKind, LeaseStatus};
use serde::Serialize;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use super::exec::{acquire, finish};
use super::{Cli, Exit, LockArgs, connect, human, status};

/// One lease as `list --json` and `show --json` print it.
#[derive(Debug, Serialize)]
struct LeaseJson<'a> {
    name: &'a str,
    /// `lock` (exclusive), `reader`, or `permit/N` (one of a semaphore's N).
    kind: String,
    /// `held`, `expired` or `released`.
    state: &'static str,
    owner: &'a str,
    token: u64,
    /// Milliseconds until the lease ends (negative: ended that long ago;
    /// `null` once released).
    expires_in_ms: Option<i64>,
    metadata: Option<&'a str>,
    /// Whether the holder's session still holds the lock.
    holder_alive: bool,
    acquired_at_ms: Option<u128>,
    released_at_ms: Option<u128>,
}

fn epoch_ms(t: SystemTime) -> Option<u128> {
    t.duration_since(UNIX_EPOCH).ok().map(|d| d.as_millis())
}

fn signed_ms(d: Duration, negative: bool) -> i64 {
    let ms = i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
    if negative { -ms } else { ms }
}

fn to_json(l: &LeaseInfo) -> LeaseJson<'_> {
    let (state, expires_in_ms, released_at_ms) = match l.status {
        LeaseStatus::Held { expires_in } => ("held", Some(signed_ms(expires_in, false)), None),
        LeaseStatus::Expired { ago } => ("expired", Some(signed_ms(ago, true)), None),
        LeaseStatus::Released { at } => ("released", None, epoch_ms(at)),
    };
    LeaseJson {
        name: &l.name,
        kind: kind_text(l.kind),
        state,
        owner: &l.owner,
        token: l.fencing_token,
        expires_in_ms,
        metadata: l.metadata.as_deref(),
        holder_alive: l.holder_alive,
        acquired_at_ms: epoch_ms(l.acquired_at),
        released_at_ms,
    }
}

/// What kind of lease `kind` is, in a word.
fn kind_text(kind: LeaseKind) -> String {
    match kind {
        LeaseKind::Shared => "reader".to_owned(),
        LeaseKind::Permit { permits } => format!("permit/{permits}"),
        _ => "lock".to_owned(),
    }
}

fn state_text(l: &LeaseInfo) -> (&'static str, String) {
    match l.status {
        LeaseStatus::Held { expires_in } => ("held", human(expires_in)),
        LeaseStatus::Expired { ago } => ("expired", format!("-{}", human(ago))),
        LeaseStatus::Released { .. } => ("released", "-".to_owned()),
    }
}

fn print_json(value: &impl Serialize) -> Result<(), Exit> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| Exit::new(status::FAILED, format!("cannot write JSON: {e}")))?;
    println!("{text}");
    Ok(())
}

/// One line per lease, columns padded to the widest cell. Control characters
/// in names and metadata are escaped, so a row is always one line.
fn print_table(leases: &[LeaseInfo]) {
    let clean = |s: &str| s.escape_debug().to_string();
    let mut rows = vec![[
        "NAME".to_owned(),
        "KIND".to_owned(),
        "STATE".to_owned(),
        "OWNER".to_owned(),
        "TOKEN".to_owned(),
        "EXPIRES IN".to_owned(),
        "METADATA".to_owned(),
    ]];
    for l in leases {
        let (state, expires) = state_text(l);
        rows.push([
            clean(&l.name),
            kind_text(l.kind),
            state.to_owned(),
            clean(&l.owner),
            l.fencing_token.to_string(),
            expires,
            clean(l.metadata.as_deref().unwrap_or("")),
        ]);
    }
    let mut widths = [0usize; 7];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = std::io::stdout().lock();
    for row in &rows {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(widths).enumerate() {
            if i == row.len() - 1 {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}  "));
            }
        }
        let _ = writeln!(out, "{}", line.trim_end());
    }
}

pub(crate) fn list(cli: &Cli, prefix: Option<&str>, json: bool) -> Result<i32, Exit> {
    let client = connect(cli, None)?;
    let mut leases = client
        .leases()
        .map_err(|e| Exit::from_error("cannot list the leases", &e))?;
    if let Some(prefix) = prefix {
        leases.retain(|l| l.name.starts_with(prefix));
    }
    if json {
        print_json(&leases.iter().map(to_json).collect::<Vec<_>>())?;
    } else {
        print_table(&leases);
    }
    Ok(0)
}

pub(crate) fn show(cli: &Cli, name: &str, json: bool) -> Result<i32, Exit> {
    let client = connect(cli, None)?;
    let lease = client
        .lease(name)
        .map_err(|e| Exit::from_error(&format!("cannot read lock {name:?}"), &e))?;
    let Some(l) = lease else {
        if json {
            println!("null");
        }
        return Err(Exit::new(
            status::FAILED,
            format!("lock {name:?} has no lease"),
        ));
    };
    if json {
        print_json(&to_json(&l))?;
        return Ok(0);
    }
    let (state, expires) = state_text(&l);
    println!("name:         {}", l.name.escape_debug());
    println!("kind:         {}", kind_text(l.kind));
    println!("state:        {state}");
    println!("owner:        {}", l.owner.escape_debug());
    println!("token:        {}", l.fencing_token);
    println!("expires in:   {expires}");
    println!(
        "metadata:     {}",
        l.metadata.as_deref().unwrap_or("").escape_debug()
    );
    println!("holder alive: {}", l.holder_alive);
    Ok(0)
}

pub(crate) fn release(cli: &Cli, name: &str, force: bool) -> Result<i32, Exit> {
    if !force {
        return Err(Exit::usage(
            "release ends another process's lock: pass --force to do it (a holder releases \
             its own lock by exiting)",
        ));
    }
    let client = connect(cli, None)?;
    match client.force_release(name) {
        Ok(Some(token)) => {
            eprintln!(
                "lockbox: released lock {name:?} (token {token}); its holder is told at its \
                 next renewal, and the next grant's token is higher"
            );
            Ok(0)
        }
        Ok(None) => {
            eprintln!("lockbox: lock {name:?} has no lease to release");
            Ok(0)
        }
        Err(e) => Err(Exit::from_error(
            &format!("cannot release lock {name:?}"),
            &e,
        )),
    }
}

pub(crate) fn hold(cli: &Cli, name: &str, args: &LockArgs) -> Result<i32, Exit> {
    let client = connect(cli, Some(args.ttl))?;
    // Signals are caught from before the grant, so one that comes as the
    // lock is taken still releases it.
    let mut signals = Signals::new([SIGINT, SIGTERM, SIGHUP]).map_err(|e| {
        Exit::new(
            status::FAILED,
            format!("cannot set up signal handling: {e}"),
        )
    })?;
    let metadata = args
        .metadata
        .clone()
        .unwrap_or_else(|| "lockbox hold".to_owned());
    let lock = acquire(&client, name, args, metadata)?;
    println!("{}", lock.fencing_token());
    let _ = std::io::stdout().flush();
    let (tx, signalled) = crossbeam_channel::bounded(1);
    std::thread::Builder::new()
        .name("lockbox-signals".to_owned())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                let _ = tx.send(sig);
            }
        })
        .map_err(|e| {
            Exit::new(
                status::FAILED,
                format!("cannot start the signal thread: {e}"),
            )
        })?;
    select! {
        recv(signalled) -> _ => {
            if !lock.is_held() {
                eprintln!("lockbox: lock {name:?} was lost");
                finish(client, lock);
                return Ok(status::LOST);
            }
            finish(client, lock);
            Ok(0)
        }
        recv(lock.lost()) -> reason => {
            let reason = reason.map_or_else(|_| "the client stopped".to_owned(), |r| r.to_string());
            eprintln!("lockbox: lock {name:?} was lost: {reason}");
            // Nothing to release; see `finish`.
            finish(client, lock);
            Ok(status::LOST)
        }
    }
}

#[derive(Debug, Serialize)]
struct HealthJson<'a> {
    status: &'static str,
    reasons: &'a [String],
    reachable: bool,
    latency_ms: Option<f64>,
    server_version: Option<&'a str>,
    error: Option<&'a str>,
    warnings: &'a [String],
}

pub(crate) fn health(cli: &Cli, json: bool) -> Result<i32, Exit> {
    const UNHEALTHY: i32 = 2;
    const DEGRADED: i32 = 1;
    let client = match connect(cli, None) {
        Ok(client) => client,
        // A usage error stays one; a store that cannot be used is unhealthy.
        Err(exit) if exit.status == status::USAGE => return Err(exit),
        Err(exit) => {
            let message = exit.message.unwrap_or_default();
            if json {
                print_json(&HealthJson {
                    status: "unhealthy",
                    reasons: std::slice::from_ref(&message),
                    reachable: false,
                    latency_ms: None,
                    server_version: None,
                    error: Some(&message),
                    warnings: &[],
                })?;
            } else {
                println!("unhealthy: {message}");
            }
            return Ok(UNHEALTHY);
        }
    };
    let health = client.health();
    let (word, code) = match health.status {
        HealthStatus::Healthy => ("healthy", 0),
        HealthStatus::Degraded => ("degraded", DEGRADED),
        _ => ("unhealthy", UNHEALTHY),
    };
    if json {
        print_json(&HealthJson {
            status: word,
            reasons: &health.reasons,
            reachable: health.database.reachable,
            latency_ms: health.database.latency.map(|d| d.as_secs_f64() * 1000.0),
            server_version: health.database.server_version.as_deref(),
            error: health.database.error.as_deref(),
            warnings: &health.database.warnings,
        })?;
    } else {
        println!("{word}");
        for reason in &health.reasons {
            println!("  {reason}");
        }
    }
    Ok(code)
}
