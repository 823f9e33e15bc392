//! A loopback TCP proxy between a client and the database that can pause traffic
//! (a partition with the TCP connections still up) or cut every connection.
//! Bounded: its threads end when it is dropped.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;

pub struct Proxy {
    pub port: u16,
    state: Arc<State>,
}

struct State {
    /// (every direction, server-to-client only)
    paused: Mutex<(bool, bool)>,
    resumed: Condvar,
    streams: Mutex<Vec<TcpStream>>,
    stopped: AtomicBool,
    /// Looks at each piece the client sends, after it was forwarded: true
    /// pauses every direction (see [`Proxy::pause_when`]).
    trigger: Mutex<Option<Trigger>>,
    /// See [`Proxy::hold_until`]: what is held, what lets it go, and how
    /// many pieces are held now (`None` once let go).
    hold: Mutex<Option<(Trigger, Trigger, usize)>>,
    let_go: Condvar,
}

type Trigger = Box<dyn FnMut(&[u8]) -> bool + Send>;

impl State {
    fn wait_while_paused(&self, reply: bool) {
        let mut paused = self.paused.lock().unwrap();
        while (paused.0 || (reply && paused.1)) && !self.stopped.load(Ordering::SeqCst) {
            paused = self.resumed.wait(paused).unwrap();
        }
    }

    /// Waits while `piece`, from a client, is to be held back.
    fn hold(&self, piece: &[u8]) {
        let mut hold = self.hold.lock().unwrap();
        let Some((held, _, count)) = hold.as_mut() else {
            return;
        };
        if held(piece) {
            *count += 1;
            while hold.is_some() && !self.stopped.load(Ordering::SeqCst) {
                hold = self.let_go.wait(hold).unwrap();
            }
        }
    }

    /// Lets every held piece go when `piece`, just forwarded, is the one
    /// that does.
    fn let_go(&self, piece: &[u8]) {
        let mut hold = self.hold.lock().unwrap();
        if let Some((_, until, _)) = hold.as_mut()
            && until(piece)
        {
            *hold = None;
            self.let_go.notify_all();
        }
    }
}

impl Proxy {
    /// Forwards 127.0.0.1:`port` to `upstream` (`host:port`).
    pub fn start(upstream: &str) -> Proxy {
        let upstream = upstream.to_socket_addrs().unwrap().next().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(State {
            paused: Mutex::new((false, false)),
            resumed: Condvar::new(),
            streams: Mutex::new(Vec::new()),
            stopped: AtomicBool::new(false),
            trigger: Mutex::new(None),
            hold: Mutex::new(None),
            let_go: Condvar::new(),
        });
        let shared = state.clone();
        thread::spawn(move || {
            for client in listener.incoming() {
                if shared.stopped.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(upstream) else {
                    continue;
                };
                {
                    let mut streams = shared.streams.lock().unwrap();
                    streams.push(client.try_clone().unwrap());
                    streams.push(server.try_clone().unwrap());
                }
                for (from, to, reply) in [
                    (
                        client.try_clone().unwrap(),
                        server.try_clone().unwrap(),
                        false,
                    ),
                    (server, client, true),
                ] {
                    let state = shared.clone();
                    thread::spawn(move || pump(from, to, reply, &state));
                }
            }
        });
        Proxy { port, state }
    }

    /// A URL for `base_url`'s database and user, through this proxy.
    /// A proxy in front of the test server.
    pub fn to_test_server() -> Proxy {
        let parts = super::server_parts();
        Proxy::start(&format!("{}:{}", parts.host, parts.port))
    }

    /// A connection string through the proxy for the test server's user and
    /// database, with application name `app`.
    pub fn app_url(&self, app: &str) -> String {
        let parts = super::server_parts();
        self.url(&parts.user, &parts.db, app)
    }

    pub fn url(&self, user: &str, db: &str, app: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user={user} dbname={db} application_name={app}",
            self.port
        )
    }

    /// Stops forwarding bytes in both directions; connections stay open.
    pub fn pause(&self) {
        self.state.paused.lock().unwrap().0 = true;
    }

    /// Stops forwarding the server's answers only: statements still reach the
    /// server and run, their outcome never reaches the client.
    pub fn pause_replies(&self) {
        self.state.paused.lock().unwrap().1 = true;
    }

    /// Pauses every direction (as [`pause`](Self::pause)) right after
    /// forwarding a piece the client sent for which `trigger` returns true:
    /// to the server, the client then froze at that point.
    pub fn pause_when(&self, trigger: impl FnMut(&[u8]) -> bool + Send + 'static) {
        *self.state.trigger.lock().unwrap() = Some(Box::new(trigger));
    }

    /// Holds back, on its own connection only, each piece a client sends for
    /// which `held` returns true, until a piece (either way, on any other
    /// connection: the held one sends nothing more) for which `until` returns true has been forwarded: then
    /// everything held goes on. Other connections flow meanwhile.
    pub fn hold_until(
        &self,
        held: impl FnMut(&[u8]) -> bool + Send + 'static,
        until: impl FnMut(&[u8]) -> bool + Send + 'static,
    ) {
        *self.state.hold.lock().unwrap() = Some((Box::new(held), Box::new(until), 0));
    }

    /// How many pieces [`hold_until`](Self::hold_until) holds back now.
    pub fn held(&self) -> usize {
        self.state.hold.lock().unwrap().as_ref().map_or(0, |h| h.2)
    }

    /// Forwards bytes again in both directions.
    pub fn resume(&self) {
        *self.state.paused.lock().unwrap() = (false, false);
        self.state.resumed.notify_all();
    }

    /// Closes every proxied connection.
    pub fn cut(&self) {
        for s in self.state.streams.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, reply: bool, state: &State) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                state.wait_while_paused(reply);
                if !reply {
                    state.hold(&buf[..n]);
                }
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
                state.let_go(&buf[..n]);
                if !reply
                    && let Some(trigger) = state.trigger.lock().unwrap().as_mut()
                    && trigger(&buf[..n])
                {
                    state.paused.lock().unwrap().0 = true;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Both);
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.state.stopped.store(true, Ordering::SeqCst);
        // Under the mutex: a pump between its check of `stopped` and its
        // wait would otherwise miss this and hold its piece for good.
        let hold = self.state.hold.lock().unwrap();
        self.state.let_go.notify_all();
        drop(hold);
        self.resume();
        self.cut();
        // Wake the accept loop so it sees `stopped`.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}
