//! Many waiters giving up at every moment, some while they are being granted:
//! never two holders, tokens increase, and nothing is left behind.

use crate::common;

use std::sync::{Arc, Mutex};
use std::thread;

use common::etcd_server::single;
use common::{eventually, ms, unique};
use lockbox::LockClient;

#[test]
fn waiters_giving_up_at_every_moment() {
    let name = unique("review-etcd-give-up");
    // (holding now, last token granted, grants)
    let state = Arc::new(Mutex::new((false, 0u64, 0u32)));
    let threads: Vec<_> = (0..6u64)
        .map(|t| {
            let (name, state) = (name.clone(), state.clone());
            thread::spawn(move || {
                let c = LockClient::etcd(&single().endpoints())
                    .ttl(ms(30_000))
                    .build()
                    .unwrap();
                for i in 0..12u64 {
                    // Waits of 20 ms to 150 ms: many end while the lock
                    // passes from one holder to the next.
                    let wait = ms(20 + (t * 37 + i * 53) % 130);
                    if let Ok(lock) = c.lock_timeout(&name, wait) {
                        {
                            let mut s = state.lock().unwrap();
                            assert!(!s.0, "two holders at once");
                            assert!(lock.fencing_token() > s.1, "token went back");
                            *s = (true, lock.fencing_token(), s.2 + 1);
                        }
                        thread::sleep(ms(10));
                        state.lock().unwrap().0 = false;
                        lock.release().unwrap();
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert!(state.lock().unwrap().2 > 0, "nobody was ever granted");
    // Waiters that gave up revoke their leases (on a thread of their own
    // after a failure): every key goes, well before the 30 s leases would.
    let prefix = format!("lockbox/lock/{name}/");
    assert!(
        eventually(ms(10_000), || single().count_keys(&prefix) == Some(0)),
        "keys left: {:?}",
        single().count_keys(&prefix)
    );
}
