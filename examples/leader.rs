//! Leader election: three candidate processes campaign for one name; the
//! parent watches who leads. It kills the leader (`SIGKILL`: no resignation),
//! and a follower takes over with a higher term once the dead leader's lease
//! has ended.
//!
//! Run with `cargo run --example leader`. It uses `DATABASE_URL` if set, else
//! a PostgreSQL server on 127.0.0.1:5432, else it starts a throwaway one from
//! the machine's own PostgreSQL binaries (the same way the tests do).

#[path = "../tests/common/server.rs"]
mod server;

use std::process::{Child, Command};
use std::time::Duration;

use lockbox::{AcquireOptions, LockClient};

/// Short, so that the takeover after the kill comes quickly.
const TTL: Duration = Duration::from_secs(2);

fn main() -> Result<(), lockbox::Error> {
    let url = server::database_url();
    if let Ok(me) = std::env::var("LOCKBOX_EXAMPLE_CANDIDATE") {
        return candidate(url, &me);
    }
    let election_name = format!("examples/scheduler/{}", std::process::id());
    let follower = LockClient::builder(url).ttl(TTL).build()?;
    let election = follower.election(&election_name)?;
    let watch = election.watch()?;
    let mut candidates: Vec<(String, Child)> = ["alpha", "beta", "gamma"]
        .into_iter()
        .map(|me| {
            let child = Command::new(std::env::current_exe().expect("own path"))
                .env("LOCKBOX_EXAMPLE_CANDIDATE", me)
                .env("LOCKBOX_EXAMPLE_ELECTION", &election_name)
                .env("DATABASE_URL", url)
                .spawn()
                .expect("start a candidate");
            (me.to_owned(), child)
        })
        .collect();
    let next = || {
        watch
            .changes()
            .recv_timeout(Duration::from_secs(30))
            .expect("a change of leader")
    };
    let mut leader = None;
    while leader.is_none() {
        leader = next();
    }
    let first = leader.expect("a leader");
    println!(
        "follower: {} leads in term {} (since {:?})",
        first.identity, first.term, first.since
    );
    let (_, child) = candidates
        .iter_mut()
        .find(|(me, _)| *me == first.identity)
        .expect("one of ours");
    child.kill().expect("kill the leader");
    child.wait().expect("reap it");
    println!("follower: killed {}; nobody resigned", first.identity);
    let second = loop {
        match next() {
            Some(l) if l.term != first.term => break l,
            Some(_) => {}
            None => println!("follower: the dead leader's lease ended; nobody leads"),
        }
    };
    println!(
        "follower: {} took over in term {} (> {})",
        second.identity, second.term, first.term
    );
    assert!(second.term > first.term);
    for (_, mut child) in candidates {
        let _ = child.kill();
        let _ = child.wait();
    }
    Ok(())
}

/// A candidate process: campaigns until it leads, then leads until killed
/// or until its leadership is lost.
fn candidate(url: &str, me: &str) -> Result<(), lockbox::Error> {
    let name = std::env::var("LOCKBOX_EXAMPLE_ELECTION").expect("set by the parent");
    let client = LockClient::builder(url).ttl(TTL).build()?;
    let election = client.election(&name)?;
    let leadership = election
        .campaign(me, &AcquireOptions::new().wait_forever())?
        .expect("waited forever");
    println!("{me}: leading in term {}", leadership.term());
    let reason = leadership.lost().recv();
    println!("{me}: leadership ended: {reason:?}");
    Ok(())
}
