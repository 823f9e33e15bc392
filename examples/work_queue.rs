//! A fenced work queue: jobs in a table, workers claiming each under a lock,
//! and every job completed — its effect and its "done" mark — in one
//! transaction fenced by the lock itself, so a worker that froze past its lease
//! cannot complete a job another worker has taken over.
//!
//! Run with `cargo run --example work_queue`. It uses `DATABASE_URL` if set,
//! else a PostgreSQL server on 127.0.0.1:5432, else it starts a throwaway one
//! from the machine's own PostgreSQL binaries. `tests/work_queue.rs` runs the
//! same worker in several processes, killing and freezing them.

#![allow(dead_code)] // The test uses this file's functions, not its `main`.

#[path = "../tests/common/server.rs"]
mod server;

use std::thread;
use std::time::Duration;

use lockbox::LockClient;

/// Errors of the database (`postgres::Error`) and of the lock (`lockbox::Error`).
pub type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// The queue's tables, `{queue}_jobs` and `{queue}_effects`, with `jobs` jobs.
pub fn setup(db: &mut postgres::Client, queue: &str, jobs: i64) -> Result<()> {
    db.batch_execute(&format!(
        "CREATE TABLE {queue}_jobs (id bigint PRIMARY KEY, done boolean NOT NULL DEFAULT false, \
             done_token bigint);
         CREATE TABLE {queue}_effects (job bigint NOT NULL, worker text NOT NULL, token bigint NOT NULL);
         INSERT INTO {queue}_jobs (id) SELECT generate_series(1, {jobs});"
    ))?;
    Ok(())
}

/// What one [`work_one`] call did.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Completed this job.
    Done(i64),
    /// Worked on this job but the check refused the completion: the lock was
    /// lost meanwhile (frozen past the lease, say); nothing was written.
    Refused(i64),
    /// Every undone job is held by another worker.
    Busy,
    /// No job is left undone.
    Empty,
}

/// Claims one undone job (the first whose lock is free), does the work, and
/// completes it in one fenced transaction.
pub fn work_one(
    client: &LockClient,
    db: &mut postgres::Client,
    queue: &str,
    worker: &str,
    work: impl FnOnce(i64),
) -> Result<Outcome> {
    let pending = db.query(
        &format!("SELECT id FROM {queue}_jobs WHERE NOT done ORDER BY id"),
        &[],
    )?;
    if pending.is_empty() {
        return Ok(Outcome::Empty);
    }
    for row in pending {
        let job: i64 = row.get(0);
        let Some(lock) = client.try_lock(&format!("{queue}/job/{job}"))? else {
            continue; // another worker has it
        };
        // Under the lock, read again: it may have been completed since.
        let done: bool = db
            .query_one(
                &format!("SELECT done FROM {queue}_jobs WHERE id = $1"),
                &[&job],
            )?
            .get(0);
        if done {
            continue;
        }
        work(job);
        // The effect and the "done" mark, in one transaction, fenced by the
        // lock: if the lease ended (and another worker may have taken the job
        // over), the check fails and the transaction rolls back on drop.
        let mut tx = db.transaction()?;
        let token = lock.fencing_token() as i64;
        tx.execute(
            &format!("INSERT INTO {queue}_effects VALUES ($1, $2, $3)"),
            &[&job, &worker, &token],
        )?;
        tx.execute(
            &format!("UPDATE {queue}_jobs SET done = true, done_token = $2 WHERE id = $1"),
            &[&job, &token],
        )?;
        match lock.fence(&mut tx) {
            Ok(()) => {}
            Err(e) if e.is_lock_lost() => return Ok(Outcome::Refused(job)),
            Err(e) => return Err(e.into()),
        }
        tx.commit()?;
        lock.release()?;
        return Ok(Outcome::Done(job));
    }
    Ok(Outcome::Busy)
}

fn main() -> Result<()> {
    let url = server::database_url();
    let queue = format!("work_queue_example_{}", std::process::id());
    let mut db = postgres::Client::connect(url, postgres::NoTls)?;
    setup(&mut db, &queue, 12)?;
    let client = LockClient::builder(url)
        .ttl(Duration::from_secs(5))
        .build()?;
    thread::scope(|s| {
        let workers: Vec<_> = (0..3)
            .map(|w| {
                let (client, queue) = (&client, &queue);
                s.spawn(move || -> Result<()> {
                    let worker = format!("worker-{w}");
                    let mut db = postgres::Client::connect(url, postgres::NoTls)?;
                    loop {
                        match work_one(client, &mut db, queue, &worker, |_| {
                            thread::sleep(Duration::from_millis(50))
                        })? {
                            Outcome::Done(job) => println!("{worker}: completed job {job}"),
                            Outcome::Refused(job) => println!("{worker}: lost job {job}'s lock"),
                            Outcome::Busy => thread::sleep(Duration::from_millis(20)),
                            Outcome::Empty => return Ok(()),
                        }
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .try_for_each(|w| w.join().expect("a worker panicked"))
    })?;
    let effects: i64 = db
        .query_one(&format!("SELECT count(*) FROM {queue}_effects"), &[])?
        .get(0);
    println!("12 jobs, {effects} effects applied");
    db.batch_execute(&format!("DROP TABLE {queue}_jobs, {queue}_effects"))?;
    Ok(())
}
