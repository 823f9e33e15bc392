//! A reader-writer lock: readers share it, a writer waits for them, and a
//! reader arriving while the writer waits queues behind it (no writer
//! starvation). Tokens come from one sequence per name.
//!
//! Run with `cargo run --example rwlock`. It uses `DATABASE_URL` if set, else
//! a PostgreSQL server on 127.0.0.1:5432, else it starts a throwaway one from
//! the machine's own PostgreSQL binaries (the same way the tests do).

#[path = "../tests/common/server.rs"]
mod server;

use std::thread;
use std::time::Duration;

use lockbox::LockClient;

fn main() -> Result<(), lockbox::Error> {
    let url = server::database_url();
    let name = format!("examples/config/{}", std::process::id());
    // A client each, as if each ran in its own process.
    let client = || {
        LockClient::builder(url)
            .ttl(Duration::from_secs(10))
            .build()
    };
    let (a, b, w, late) = (client()?, client()?, client()?, client()?);

    let ra = a.rwlock(&name)?.try_read()?.expect("free");
    let rb = b.rwlock(&name)?.try_read()?.expect("readers share");
    println!(
        "two readers at once: tokens {} and {}",
        ra.fencing_token(),
        rb.fencing_token()
    );
    thread::scope(|s| -> Result<(), lockbox::Error> {
        let writer = s.spawn(|| w.rwlock(&name)?.write_timeout(Duration::from_secs(30)));
        while w.metrics().acquires_waiting == 0 {
            thread::sleep(Duration::from_millis(10));
        }
        println!("a writer waits for the readers");
        match late.rwlock(&name)?.try_read()? {
            None => println!("a new reader queues behind the waiting writer"),
            Some(_) => println!("unexpected: a new reader overtook the writer"),
        }
        ra.release()?;
        rb.release()?;
        let writing = writer.join().expect("writer panicked")?;
        println!(
            "the readers left; the writer holds it alone with token {}",
            writing.fencing_token()
        );
        writing.release()?;
        Ok(())
    })?;
    let again = late.rwlock(&name)?.read_timeout(Duration::from_secs(5))?;
    println!("and a reader again, token {}", again.fencing_token());
    again.release()?;
    Ok(())
}
