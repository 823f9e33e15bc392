//! Review attacks on the Redis store's shared leases (issue 12): a waiting
//! writer's mark that lapses while the writer still waits, a lost group key
//! letting kinds and counts mix, garbage in the keys, and keys that never
//! expire.

use crate::common;

use std::thread;
use std::time::Duration;

use common::redis_server::redis_url;
use common::*;
use lockbox::{Error, LockClient};

fn conn() -> redis::Connection {
    redis::Client::open(redis_url())
        .unwrap()
        .get_connection_with_timeout(Duration::from_secs(5))
        .unwrap()
}

fn live_marks(c: &mut redis::Connection, key: &str) -> usize {
    let (s, us): (u64, u64) = redis::cmd("TIME").query(c).unwrap();
    let now = s * 1000 + us / 1000;
    redis::cmd("ZCOUNT")
        .arg(key)
        .arg(format!("({now}"))
        .arg("+inf")
        .query(c)
        .unwrap()
}

/// A writer marked behind readers, then held off by an exclusive lease taken
/// in between (here: a lock key another holder wrote), still waits: its mark
/// must stay live the whole time, and no new reader may be granted when that
/// lease ends before the writer is served.
#[test]
fn a_waiting_writers_mark_outlives_an_exclusive_lease_in_between() {
    let name = unique("rrc-mark");
    let client = LockClient::redis(redis_url())
        .ttl(ms(1000))
        .build()
        .unwrap();
    let rw = client.rwlock(&name).unwrap();
    let reader = rw.try_read().unwrap().unwrap();
    let writer = {
        let rw = client.rwlock(&name).unwrap();
        thread::spawn(move || {
            let w = rw.write_timeout(Duration::from_secs(30)).unwrap();
            let token = w.fencing_token();
            w.release().unwrap();
            token
        })
    };
    let mut c = conn();
    let writers = format!("lockbox:writers:{name}");
    assert!(
        eventually(ms(5000), || live_marks(&mut c, &writers) == 1),
        "the waiting writer left no mark"
    );
    // Another exclusive holder slips in between the reader's release and the
    // writer's next try (a holder on another machine whose try came first).
    let _: () = redis::cmd("SET")
        .arg(format!("lockbox:lock:{name}"))
        .arg("1|someone-else")
        .arg("PX")
        .arg(60_000)
        .query(&mut c)
        .unwrap();
    reader.release().unwrap();
    // Three of the mark's lives (1 s each): the writer keeps trying meanwhile.
    for _ in 0..6 {
        thread::sleep(ms(500));
        assert_eq!(
            live_marks(&mut c, &writers),
            1,
            "the writer still waits but its mark lapsed: readers may overtake it"
        );
    }
    // That holder's lease ends (without a publication, as by expiry).
    let _: () = redis::cmd("DEL")
        .arg(format!("lockbox:lock:{name}"))
        .query(&mut c)
        .unwrap();
    let overtaker = rw.try_read().unwrap();
    assert!(
        overtaker.is_none(),
        "a new reader was granted while a writer waited"
    );
    let token = writer.join().unwrap();
    assert!(token > 1);
}

/// Permits of a semaphore of 3 are live, but the name's group key (their
/// kind) is gone — evicted, deleted by hand. Neither a semaphore of 5 nor a
/// reader may join them: the store must not count them as "no kind".
#[test]
fn a_lost_group_key_lets_no_other_kind_or_count_in() {
    let name = unique("rrc-group");
    let client = LockClient::redis(redis_url())
        .ttl(ms(5000))
        .build()
        .unwrap();
    let three = client.semaphore(&name, 3).unwrap();
    let held: Vec<_> = (0..3)
        .map(|_| three.try_acquire().unwrap().unwrap())
        .collect();
    let mut c = conn();
    let _: () = redis::cmd("DEL")
        .arg(format!("lockbox:group:{name}"))
        .query(&mut c)
        .unwrap();
    let five = client.semaphore(&name, 5).unwrap();
    match five.try_acquire() {
        Ok(None) | Err(_) => {}
        Ok(Some(p)) => panic!(
            "a fourth permit ({}) was granted beside 3 live permits of a semaphore of 3",
            p.fencing_token()
        ),
    }
    match client.rwlock(&name).unwrap().try_read() {
        Ok(None) | Err(_) => {}
        Ok(Some(_)) => panic!("a reader was granted beside live permits"),
    }
    assert!(three.try_acquire().unwrap().is_none());
    for p in held {
        p.release().unwrap();
    }
}

/// A `kind` the store cannot read (garbage in the group hash) is a clear,
/// typed error naming the key, not a claim that readers hold the name.
#[test]
fn a_garbage_kind_is_a_clear_error() {
    let name = unique("rrc-kind");
    let client = LockClient::redis(redis_url())
        .ttl(ms(5000))
        .build()
        .unwrap();
    let sem = client.semaphore(&name, 2).unwrap();
    let p = sem.try_acquire().unwrap().unwrap();
    let mut c = conn();
    let _: () = redis::cmd("HSET")
        .arg(format!("lockbox:group:{name}"))
        .arg("kind")
        .arg("permits:lots")
        .query(&mut c)
        .unwrap();
    match sem.try_acquire() {
        Err(Error::Database(e)) => {
            let text = e.to_string();
            assert!(
                text.contains("lockbox:group:") && text.contains("kind"),
                "unclear: {text}"
            );
        }
        Ok(Some(_)) => panic!("granted against a kind the store cannot read"),
        other => panic!("expected a database error naming the key, got {other:?}"),
    }
    p.release().unwrap();
}

/// Garbage members and scores in the holders and queue keys (no `|`, +inf,
/// -inf) do not panic anything: acquires, listings, renewals and forced
/// releases answer, and an exclusive acquire stays refused while an
/// unreadable member claims the name forever.
#[test]
fn garbage_in_the_shared_keys_panics_nothing() {
    let name = unique("rrc-garbage");
    let client = LockClient::redis(redis_url())
        .ttl(ms(2000))
        .build()
        .unwrap();
    let mut c = conn();
    for (key, score, member) in [
        (format!("lockbox:holders:{name}"), "+inf", "no-bar"),
        (format!("lockbox:holders:{name}"), "-inf", "|"),
        (
            format!("lockbox:holders:{name}"),
            "+inf",
            "99999999999999999999999|x",
        ),
        (format!("lockbox:queue:{name}"), "+inf", "zzz"),
        (format!("lockbox:writers:{name}"), "-inf", ""),
    ] {
        let _: () = redis::cmd("ZADD")
            .arg(&key)
            .arg(score)
            .arg(member)
            .query(&mut c)
            .unwrap();
    }
    let _: () = redis::cmd("HSET")
        .arg(format!("lockbox:group:{name}"))
        .arg("kind")
        .arg("shared")
        .arg("m:|")
        .arg("\u{0}")
        .query(&mut c)
        .unwrap();
    let _: () = redis::cmd("HSET")
        .arg(format!("lockbox:meta:{name}"))
        .arg("top")
        .arg("x")
        .query(&mut c)
        .unwrap();
    assert!(client.try_lock(&name).unwrap().is_none());
    let _ = client.leases_of(&name);
    let _ = client.rwlock(&name).unwrap().try_read();
    let _ = client.semaphore(&name, 2).unwrap().try_acquire();
    let _ = client.force_release(&name);
    let _: () = redis::cmd("DEL")
        .arg(format!("lockbox:holders:{name}"))
        .arg(format!("lockbox:queue:{name}"))
        .arg(format!("lockbox:writers:{name}"))
        .arg(format!("lockbox:group:{name}"))
        .arg(format!("lockbox:meta:{name}"))
        .query(&mut c)
        .unwrap();
}

/// Every key a mixed workload leaves behind expires by itself: none without
/// a TTL, none living past the longest lease plus the retention.
#[test]
fn every_shared_key_expires() {
    let name = unique("rrc-ttl");
    let client = LockClient::redis(redis_url())
        .ttl(ms(1000))
        .build()
        .unwrap();
    let sem = client.semaphore(&name, 1).unwrap();
    let p = sem.try_acquire().unwrap().unwrap();
    // A permit waiter that gives up (a place in the queue, taken back).
    assert!(sem.acquire_timeout(ms(300)).is_err());
    p.release().unwrap();
    let rw = client.rwlock(&format!("{name}-rw")).unwrap();
    let r = rw.try_read().unwrap().unwrap();
    assert!(rw.write_timeout(ms(300)).is_err());
    drop(r);
    let mut c = conn();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("lockbox:*{name}*"))
        .query(&mut c)
        .unwrap();
    assert!(!keys.is_empty());
    for key in keys {
        let pttl: i64 = redis::cmd("PTTL").arg(&key).query(&mut c).unwrap();
        assert!(
            pttl == -2 || (0..=1000 + 5 * 60 * 1000).contains(&pttl),
            "{key} lives {pttl} ms"
        );
    }
}
