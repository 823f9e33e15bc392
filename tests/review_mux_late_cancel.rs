//! Review of multiplexed sessions: when a lock's deadline passes with its
//! renewal in flight, the scheduler sends a cancel request to its session. On
//! a session of its own that session is then closed with the lock; a shared
//! session goes on serving its other locks, so a cancel request that arrives
//! late (it travels over a new connection: TCP, TLS, a slow network; and the
//! renewal it was meant for usually ends by its own `lock_timeout` at that
//! very deadline) cancels whatever a *neighbour* is doing on it then. Here it
//! is the neighbour's release, which fails for no fault of its own and leaves
//! the name locked until its lease runs out.
//!
//! The late arrival is made deterministic by a gate in front of the server
//! that holds new connections (the cancel's) until the test opens it.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;

use common::*;
use lockbox::LockClient;

/// `(armed, connections held, held connections forwarded and closed by the server)`.
type GateState = Arc<(Mutex<(bool, usize, usize)>, Condvar)>;

/// Forwards to the test server; while armed, a new connection is held (not
/// forwarded) until disarmed.
struct Gate {
    port: u16,
    state: GateState,
}

impl Gate {
    fn start() -> Gate {
        let parts = server_parts();
        let upstream = format!("{}:{}", parts.host, parts.port);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let state: GateState = Arc::new((Mutex::new((false, 0, 0)), Condvar::new()));
        let st = state.clone();
        thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let st = st.clone();
                let upstream = upstream.clone();
                thread::spawn(move || {
                    let mut was_held = false;
                    {
                        let (m, cv) = &*st;
                        let mut g = m.lock().unwrap();
                        if g.0 {
                            was_held = true;
                            g.1 += 1;
                            cv.notify_all();
                            while g.0 {
                                g = cv.wait(g).unwrap();
                            }
                        }
                    }
                    let Ok(server) = TcpStream::connect(&upstream) else {
                        return;
                    };
                    let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                    thread::spawn(move || pump(c2, s2));
                    pump(server, client);
                    if was_held {
                        st.0.lock().unwrap().2 += 1;
                    }
                });
            }
        });
        Gate { port, state }
    }

    fn arm(&self, armed: bool) {
        let (m, cv) = &*self.state;
        m.lock().unwrap().0 = armed;
        cv.notify_all();
    }

    fn held(&self) -> usize {
        self.state.0.lock().unwrap().1
    }

    fn delivered(&self) -> usize {
        self.state.0.lock().unwrap().2
    }

    fn url(&self, app: &str) -> String {
        let p = server_parts();
        format!(
            "host=127.0.0.1 port={} user={} dbname={} application_name={app}",
            self.port, p.user, p.db
        )
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Both);
}

/// An operator's transaction holding the lease table in EXCLUSIVE mode (reads
/// go on; every write waits).
fn lock_table() -> postgres::Client {
    let mut op = admin();
    op.batch_execute("BEGIN; LOCK TABLE lockbox_leases IN EXCLUSIVE MODE")
        .unwrap();
    op
}

#[test]
fn a_late_cancel_for_a_lost_lock_does_not_fail_its_neighbours_release() {
    // The table exists before the operator locks it.
    drop(client(ms(1000)));
    let gate = Gate::start();
    let app = unique("mux-cancel");
    let ttl = ms(1000);
    let client = LockClient::builder(&gate.url(&app))
        .ttl(ttl)
        .build()
        .unwrap();
    let (_, a, _, b, pid) = two_on_one_session(&client, "cancel");

    // `a`'s renewal is held up on the server past its deadline; the cancel
    // request sent for it is slow to arrive.
    gate.arm(true);
    let mut op = lock_table();
    assert!(
        eventually(ms(3000), || blocked_on_lock(pid)),
        "a's renewal never blocked"
    );
    assert!(
        a.lost().recv_timeout(ttl * 3).is_ok(),
        "a lost at its deadline"
    );
    // The stuck renewal ends by its own lock timeout; no cancel request is
    // sent to a session its neighbours keep using (the fix). Were one sent, the
    // gate would hold it now, and deliver it during b's release below.
    op.batch_execute("COMMIT").unwrap();
    drop(a);

    // `b` is released while the table is briefly locked again (a release on a
    // session of its own would simply wait for it, and succeed).
    let mut op = lock_table();
    let releasing = thread::spawn(move || b.release());
    assert!(
        eventually(ms(3000), || blocked_on_lock(pid)),
        "b's release never blocked"
    );
    // Any cancel request held for `a` arrives now.
    let held = gate.held();
    gate.arm(false);
    assert!(
        eventually(ms(5000), || gate.delivered() >= held),
        "a held cancel request was never delivered"
    );
    op.batch_execute("COMMIT").unwrap();
    let released = releasing.join().unwrap();
    assert!(
        released.is_ok(),
        "b's release failed because of the cancel request meant for a's renewal: {released:?}"
    );
}
