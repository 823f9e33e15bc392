//! Review of the deadline interrupt (a renewal still running at the deadline is
//! cancelled with PostgreSQL's cancel request): what happens to the session of a
//! lock lost that way, and where the cancel request lands.

use crate::common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;

use common::*;
use lockbox::{AcquireOptions, LockClient, LostReason};

/// A renewal blocked on its lease row runs into the deadline; the lock is lost.
/// Its session still holds the advisory lock, and a lost lock's session is meant
/// to be closed at once ("rather than when its guard goes"), as it is when no
/// renewal is in flight. Here the in-flight renewal ends with an error (lock
/// timeout, or the cancel), and nobody closes the session: the advisory lock
/// stays held by a lost lock until the user drops the guard.
#[test]
fn a_lock_lost_with_its_renewal_in_flight_frees_its_session_at_once() {
    let ttl = ms(600);
    let (client, app) = client(ttl);
    let name = unique("interrupted");
    let lock = client.try_lock(&name).unwrap().unwrap();
    let failed = client.metrics().renewals_failed;
    let row = RowHold::lease(&name);
    assert_eq!(lock.lost().recv_timeout(ttl * 4), Ok(LostReason::Expired));
    // The stuck renewal has come back (with an error).
    assert!(eventually(ttl * 4, || client.metrics().renewals_failed > failed));
    row.release();
    let freed = eventually(ttl * 2, || advisory_locks_of(&app) == 0);
    let left = advisory_locks_of(&app);
    drop(lock);
    assert!(
        freed,
        "{left} advisory lock(s) still held by the session of a lock lost {:?} ago; \
         freed only when its guard was dropped",
        ttl * 2
    );
}

/// A loopback proxy to the database that forwards ordinary connections at once
/// and holds every PostgreSQL cancel request until `deliver` is called: a cancel
/// request travels on a connection of its own, which can take longer than the
/// statement it aims at (a SYN retransmit, a slow path, a loaded server).
struct CancelDelayingProxy {
    port: u16,
    held: Arc<AtomicUsize>,
    gate: Arc<(Mutex<bool>, Condvar)>,
}

const CANCEL_REQUEST_CODE: u32 = 80_877_102;

impl CancelDelayingProxy {
    fn start(upstream: String) -> CancelDelayingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let held = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        let (held2, gate2) = (held.clone(), gate.clone());
        thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(mut client) = client else { continue };
                let (upstream, held, gate) = (upstream.clone(), held2.clone(), gate2.clone());
                thread::spawn(move || {
                    let mut head = [0u8; 8];
                    if client.read_exact(&mut head).is_err() {
                        return;
                    }
                    let code = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
                    if code == CANCEL_REQUEST_CODE {
                        held.fetch_add(1, Ordering::SeqCst);
                        let (open, cv) = &*gate;
                        let mut open = open.lock().unwrap();
                        while !*open {
                            open = cv.wait(open).unwrap();
                        }
                    }
                    let Ok(mut server) = TcpStream::connect(&upstream) else {
                        return;
                    };
                    if server.write_all(&head).is_err() {
                        return;
                    }
                    let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                    thread::spawn(move || pump(c2, s2));
                    pump(server, client);
                });
            }
        });
        CancelDelayingProxy { port, held, gate }
    }

    fn held(&self) -> usize {
        self.held.load(Ordering::SeqCst)
    }

    fn deliver(&self) {
        let (open, cv) = &*self.gate;
        *open.lock().unwrap() = true;
        cv.notify_all();
    }
}

impl Drop for CancelDelayingProxy {
    fn drop(&mut self) {
        self.deliver();
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = [0u8; 16 * 1024];
    while let Ok(n) = from.read(&mut buf) {
        if n == 0 || to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Both);
}

/// The cancel request sent at a lock's deadline names a *connection*, not a
/// statement. When it arrives after the renewal it aimed at has ended, the lock
/// has been released and its connection has gone back to the pool, it cancels
/// whatever that connection runs next: here another caller's wait for a lock,
/// which fails with "canceling statement due to user request" instead of
/// timing out (or being granted). It could as well be another lock's release.
#[test]
fn a_late_cancel_request_never_hits_another_callers_statement() {
    let ttl = ms(600);
    let server = server_parts();
    let proxy = CancelDelayingProxy::start(format!("{}:{}", server.host, server.port));
    let app = unique("late-cancel");
    // Plain text: the proxy reads the protocol to spot cancel requests, which
    // under TLS travel encrypted.
    let url = format!(
        "host=127.0.0.1 port={} user={} dbname={} application_name={app} sslmode=disable",
        proxy.port, server.user, server.db
    );
    // One connection, so the next caller gets the lost lock's connection; a
    // session per lock, where a renewal waits for the row lock (a shared
    // session's renewal skips it, and a shared session sent a cancel is never
    // pooled again).
    let client = LockClient::builder(&url)
        .ttl(ttl)
        .pool_size(1)
        .locks_per_session(1)
        .build()
        .unwrap();
    let (contender, _) = common::client(ms(30_000));
    let (a_name, b_name) = (unique("late-cancel-a"), unique("late-cancel-b"));
    let b_held = contender.try_lock(&b_name).unwrap().unwrap();

    let a = client.try_lock(&a_name).unwrap().unwrap();
    let failed = client.metrics().renewals_failed;
    let row = RowHold::lease(&a_name);
    assert_eq!(a.lost().recv_timeout(ttl * 4), Ok(LostReason::Expired));
    // The deadline's cancel request is on its way (held by the proxy), and the
    // renewal it aims at has already ended by itself (its lock timeout).
    assert!(
        eventually(ttl * 4, || proxy.held() >= 1),
        "no cancel was sent"
    );
    assert!(eventually(ttl * 4, || client.metrics().renewals_failed > failed));
    row.release();
    // The user sees the loss and lets the lock go; the connection is pooled.
    assert!(a.release().unwrap_err().is_lock_lost());

    // Another caller of the same client waits for `b` on that connection.
    let waited = thread::scope(|s| {
        let wait = s
            .spawn(|| client.acquire(&b_name, &AcquireOptions::new().ttl(ms(5000)).wait(ms(2500))));
        assert!(eventually(ms(2000), || is_waiting(&app)), "never waited");
        // Only now does the cancel request arrive.
        proxy.deliver();
        wait.join().unwrap()
    });
    drop(b_held);
    match waited {
        Ok(None) => {}
        Ok(Some(_)) => panic!("granted `b` while the contender held it"),
        Err(e) => panic!(
            "a cancel request meant for the lost lock's renewal cancelled another \
             caller's wait on the same pooled connection: {e}"
        ),
    }
}
