//! A counting semaphore: six workers share three permits; never more than
//! three work at once, and each permit has its own lease and fencing token.
//!
//! Run with `cargo run --example semaphore`. It uses `DATABASE_URL` if set,
//! else a PostgreSQL server on 127.0.0.1:5432, else it starts a throwaway one
//! from the machine's own PostgreSQL binaries (the same way the tests do).

#[path = "../tests/common/server.rs"]
mod server;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::Duration;

use lockbox::LockClient;

fn main() -> Result<(), lockbox::Error> {
    let url = server::database_url();
    let name = format!("examples/crawler-slots/{}", std::process::id());
    let working = AtomicUsize::new(0);
    let most = AtomicUsize::new(0);
    thread::scope(|s| -> Result<(), lockbox::Error> {
        let mut workers = Vec::new();
        for worker in 0..6 {
            // A client per worker, as if each ran in its own process.
            let client = LockClient::builder(url)
                .ttl(Duration::from_secs(10))
                .build()?;
            let (name, working, most) = (&name, &working, &most);
            workers.push(s.spawn(move || -> Result<(), lockbox::Error> {
                let slots = client.semaphore(name, 3)?;
                for job in 0..2 {
                    let permit = slots.acquire_timeout(Duration::from_secs(30))?;
                    let now = working.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    println!(
                        "worker {worker} job {job}: permit token {}, {now} of 3 permits in use",
                        permit.fencing_token()
                    );
                    thread::sleep(Duration::from_millis(150));
                    working.fetch_sub(1, Ordering::SeqCst);
                    permit.release()?;
                }
                Ok(())
            }));
        }
        for w in workers {
            w.join().expect("worker panicked")?;
        }
        Ok(())
    })?;
    let most = most.load(Ordering::SeqCst);
    println!("done: at most {most} workers held a permit at once (of 3)");
    assert!(most <= 3);
    Ok(())
}
