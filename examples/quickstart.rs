//! Take a lock, use its fencing token, see a second contender turned away, release.
//!
//! Run with `cargo run --example quickstart`. It uses `DATABASE_URL` if set, else a
//! PostgreSQL server on 127.0.0.1:5432, else it starts a throwaway one from the
//! machine's own PostgreSQL binaries (the same way the tests do).

#[path = "../tests/common/server.rs"]
mod server;

use std::time::Duration;

use lockbox::{AcquireOptions, LockClient};

fn main() -> Result<(), lockbox::Error> {
    let url = server::database_url();
    println!("database: {}", redact(url));

    let client = LockClient::builder(url)
        .ttl(Duration::from_secs(10))
        .build()?;
    let other = LockClient::builder(url)
        .ttl(Duration::from_secs(10))
        .build()?;

    let opts = AcquireOptions::new()
        .wait(Duration::from_secs(5))
        .metadata("quickstart example");
    let lock = client
        .acquire("quickstart/report", &opts)?
        .expect("nobody else holds quickstart/report");
    println!(
        "acquired {:?} with fencing token {} (ttl {:?})",
        lock.name(),
        lock.fencing_token(),
        lock.ttl()
    );

    // Use the token to fence writes: a store that remembers the highest token it
    // has seen rejects a write from a holder that has since lost the lock.
    println!(
        "writing the report, tagged with token {}",
        lock.fencing_token()
    );

    match other.try_lock("quickstart/report")? {
        Some(_) => println!("unexpected: a second client got the lock too"),
        None => println!("a second client's try_lock: held elsewhere, not acquired"),
    }
    match other.lock_timeout("quickstart/report", Duration::from_millis(300)) {
        Err(e) if e.is_timeout() => println!("a second client's lock_timeout: {e}"),
        other => println!("unexpected: {other:?}"),
    }

    lock.ensure_held()?;
    lock.release()?;
    println!("released");

    let token = other.with_lock("quickstart/report", Duration::from_secs(5), |lock| {
        lock.fencing_token()
    })?;
    println!("the second client then got it with token {token} and released it");
    Ok(())
}

/// The URL without a password, for printing.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{}@{}", &url[..scheme + 3], user, &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}
