//! The same locking code against every backend: PostgreSQL, in-memory, and Redis
//! (with the `redis` feature: `cargo run --example backends --features redis`).
//! PostgreSQL is found or started like the quickstart does; Redis is used when
//! `REDIS_URL` is set or one answers on 127.0.0.1:6379.

#[path = "../tests/common/server.rs"]
mod server;

use std::time::Duration;

use lockbox::{LockClient, LockClientBuilder};

/// The code under test: knows nothing of the store.
fn run(store: &str, builder: LockClientBuilder) -> Result<(), lockbox::Error> {
    let client = builder.ttl(Duration::from_secs(5)).build()?;
    let other = client.clone();
    let first = client.try_lock("backends/demo")?.expect("free");
    let busy = other.try_lock("backends/demo")?.is_none();
    let token = first.fencing_token();
    first.release()?;
    let second = other.lock_timeout("backends/demo", Duration::from_secs(1))?;
    println!(
        "{store:<10} token {token} -> {} (held elsewhere while taken: {busy}), health: {:?}",
        second.fencing_token(),
        client.health().status
    );
    second.release()
}

fn main() -> Result<(), lockbox::Error> {
    run("postgres", LockClient::builder(server::database_url()))?;
    run("memory", LockClient::memory())?;
    #[cfg(feature = "redis")]
    {
        let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".into());
        match LockClient::redis(&url).build() {
            Ok(_) => run("redis", LockClient::redis(&url))?,
            Err(e) => println!("redis      skipped: {e}"),
        }
    }
    #[cfg(not(feature = "redis"))]
    println!("redis      skipped: build with --features redis");
    Ok(())
}
