//! The release listener: one subscriber connection per client that wakes the
//! waiters of each released name.
//!
//! A subscriber only reads, so a connection that a NAT or load balancer dropped
//! silently would look idle forever. The listener therefore PINGs the server
//! whenever nothing arrived for [`PING_EVERY`], and a PING unanswered within
//! [`PING_TIMEOUT`] counts the connection dead: `alive` turns false (health
//! reports it), waiters fall back to polling every [`POLL_WHILE_DEAD`], and the
//! listener reconnects. On every (re)subscription all waiters are woken, since
//! releases may have been missed meanwhile.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use parking_lot::Mutex;

use super::conn::{Conn, Manager, OpenError};

/// The pattern every release is published on.
pub(crate) const CHANNELS: &str = "lockbox:released:*";
const PREFIX: &str = "lockbox:released:";

/// How often the subscriber checks for messages (and whether it should stop).
const POLL: Duration = Duration::from_millis(250);
/// Silence after which the subscriber PINGs the server.
pub(crate) const PING_EVERY: Duration = Duration::from_secs(1);
/// How long a PING (or a subscription) may take before the connection is dead.
pub(crate) const PING_TIMEOUT: Duration = Duration::from_secs(1);
/// How often waiters retry while the listener is not connected.
pub(crate) const POLL_WHILE_DEAD: Duration = Duration::from_millis(200);
/// Pause between reconnection attempts.
const RECONNECT_PAUSE: Duration = Duration::from_millis(200);

/// Waiters by lock name: each an id and the sender that wakes it.
type Waiters = HashMap<String, Vec<(u64, Sender<()>)>>;

/// The wake-up fan-out: per-name lists of waiters, and the listener's state.
#[derive(Default)]
pub(crate) struct Listener {
    waiters: Mutex<Waiters>,
    next_id: AtomicU64,
    /// Subscribed, and the server answered within [`PING_TIMEOUT`] of being asked.
    pub alive: AtomicBool,
    pub stop: AtomicBool,
}

impl Listener {
    /// Subscribes a waiter to `name`'s releases until the guard drops.
    pub fn watch(self: &Arc<Self>, name: &str) -> Watch {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.waiters
            .lock()
            .entry(name.to_owned())
            .or_default()
            .push((id, tx));
        Watch {
            listener: self.clone(),
            name: name.to_owned(),
            id,
            rx,
        }
    }

    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::Relaxed)
    }

    fn wake(&self, name: &str) {
        if let Some(list) = self.waiters.lock().get(name) {
            for (_, tx) in list {
                let _ = tx.try_send(());
            }
        }
    }

    fn wake_all(&self) {
        for list in self.waiters.lock().values() {
            for (_, tx) in list {
                let _ = tx.try_send(());
            }
        }
    }
}

/// One waiter's subscription; unsubscribes on drop.
pub(crate) struct Watch {
    listener: Arc<Listener>,
    name: String,
    id: u64,
    pub rx: Receiver<()>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        let mut waiters = self.listener.waiters.lock();
        if let Some(list) = waiters.get_mut(&self.name) {
            list.retain(|(id, _)| *id != self.id);
            if list.is_empty() {
                waiters.remove(&self.name);
            }
        }
    }
}

/// The listener thread. It holds only a weak reference, and reads with a
/// timeout, so it ends soon after the backend is gone.
pub(crate) fn listen(manager: Manager, listener: Weak<Listener>) {
    // Against a frozen server (over a Unix socket) an attempt may wait long
    // after the listener gave up on it: then it waits for that one rather
    // than leave another behind.
    let manager = manager.with_one_attempt("lockbox-subscribe");
    loop {
        let Some(l) = listener.upgrade() else { return };
        if l.stop.load(Ordering::Relaxed) {
            return;
        }
        drop(l);
        // The backend's client: the same address, TLS settings and credentials
        // as every other connection, and the same bound on opening it.
        let result = manager
            .open(
                manager.connect_timeout.min(PING_TIMEOUT * 5),
                manager.io_timeout,
            )
            .and_then(|mut conn| subscribed(&mut conn, &listener).map_err(OpenError::from));
        let Some(l) = listener.upgrade() else { return };
        l.alive.store(false, Ordering::Relaxed);
        if l.stop.load(Ordering::Relaxed) {
            return;
        }
        // Waiters poll while nobody listens; wake them to start doing so.
        l.wake_all();
        drop(l);
        match result {
            // Said once, when the attempt that is still waiting failed.
            Err(e) if e.is_busy() => {}
            Err(e) => {
                log::warn!("lockbox: redis release listener lost its connection, reconnecting: {e}")
            }
            Ok(()) => {}
        }
        thread::sleep(RECONNECT_PAUSE);
    }
}

/// Subscribes and delivers messages until the connection fails, a PING goes
/// unanswered, or the backend is gone (`Ok`).
fn subscribed(conn: &mut Conn, listener: &Weak<Listener>) -> redis::RedisResult<()> {
    conn.call(PING_TIMEOUT, |c| {
        let mut pubsub = c.as_pubsub();
        pubsub.psubscribe(CHANNELS)?;
        match listener.upgrade() {
            Some(l) => {
                l.alive.store(true, Ordering::Relaxed);
                // Releases published while we were not subscribed were missed.
                l.wake_all();
            }
            None => return Ok(()),
        }
        pubsub.set_read_timeout(Some(POLL))?;
        let mut heard = Instant::now();
        loop {
            let Some(l) = listener.upgrade() else {
                return Ok(());
            };
            if l.stop.load(Ordering::Relaxed) {
                return Ok(());
            }
            drop(l);
            if heard.elapsed() >= PING_EVERY {
                pubsub.set_read_timeout(Some(PING_TIMEOUT))?;
                // In subscriber mode the answer is `pong`; messages that arrive
                // first are kept for `get_message`.
                pubsub.ping::<redis::Value>()?;
                pubsub.set_read_timeout(Some(POLL))?;
                heard = Instant::now();
            }
            match pubsub.get_message() {
                Ok(msg) => {
                    heard = Instant::now();
                    if let (Some(name), Some(l)) = (
                        msg.get_channel_name().strip_prefix(PREFIX),
                        listener.upgrade(),
                    ) {
                        l.wake(name);
                    }
                }
                Err(e) if e.is_timeout() => {}
                Err(e) => return Err(e),
            }
        }
    })
}
