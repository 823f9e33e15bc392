//! Does some locking work, then prints the client's health report, its leases and
//! its metrics in the Prometheus text format.
//!
//! Run with `cargo run --example monitoring` (finds or starts a database like the
//! quickstart does).

#[path = "../tests/common/server.rs"]
mod server;

use std::time::Duration;

use lockbox::{AcquireOptions, LockClient};

fn main() -> Result<(), lockbox::Error> {
    let url = server::database_url();
    let client = LockClient::builder(url)
        .ttl(Duration::from_secs(10))
        .build()?;
    let other = LockClient::builder(url)
        .ttl(Duration::from_secs(10))
        .build()?;

    // Some work: uncontended cycles, a contended try, a timeout, a held lock.
    for i in 0..20 {
        client
            .try_lock(&format!("monitoring/job-{i}"))?
            .map(|l| l.release())
            .transpose()?;
    }
    let busy = other.try_lock("monitoring/busy")?.expect("free");
    assert!(client.try_lock("monitoring/busy")?.is_none());
    let _ = client.lock_timeout("monitoring/busy", Duration::from_millis(200));
    drop(busy);
    let held = client.acquire(
        "monitoring/report",
        &AcquireOptions::new().metadata("nightly report, worker 3"),
    )?;
    held.as_ref()
        .map(|l| l.extend(Duration::from_secs(10)))
        .transpose()?;

    println!("== health\n{}\n", client.health());
    println!("== leases");
    for lease in client
        .leases()?
        .iter()
        .filter(|l| l.name.starts_with("monitoring/report"))
    {
        println!(
            "{} token={} owner={} status={:?} holder_alive={} metadata={:?}",
            lease.name,
            lease.fencing_token,
            lease.owner,
            lease.status,
            lease.holder_alive,
            lease.metadata
        );
    }
    println!(
        "\n== metrics (Prometheus text format)\n{}",
        client.metrics().to_prometheus()
    );
    drop(held);
    Ok(())
}
