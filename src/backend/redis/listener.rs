//! The release listener: one subscriber connection per client that wakes the
//! waiters of each released name.
//!
//! It subscribes only while the client has a waiter that was refused (or a
//! watch), and for [`LINGER`] after the last one left: every release is
//! published to every subscribed client, so a client that waits for nothing
//! would otherwise be sent — and woken for — every release in the store. A
//! waiter registers before it tries (a release between its try and its wait
//! then wakes it) and, refused, asks for the subscription if there is none;
//! it is woken once subscribed, as every waiter is on every subscription, and
//! tries again: a release it missed meanwhile is found by that try.
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

use super::conn::{Conn, Manager, OpenError, is_reply_error};

/// The pattern every release is published on.
pub(crate) const CHANNELS: &str = "lockbox:released:*";
const PREFIX: &str = "lockbox:released:";

/// How often the subscriber checks for messages (and whether it should stop).
const POLL: Duration = Duration::from_millis(250);
/// How long the listener stays subscribed after its last waiter left: a name
/// handed around among the client's threads keeps one subscription.
pub(crate) const LINGER: Duration = Duration::from_secs(2);
/// Silence after which the subscriber PINGs the server.
pub(crate) const PING_EVERY: Duration = Duration::from_secs(1);
/// How long a PING (or a subscription) may take before the connection is dead.
pub(crate) const PING_TIMEOUT: Duration = Duration::from_secs(1);
/// How often waiters retry while the listener is not connected.
pub(crate) const POLL_WHILE_DEAD: Duration = Duration::from_millis(200);
/// Pause between reconnection attempts.
const RECONNECT_PAUSE: Duration = Duration::from_millis(200);
/// The longest pause after refusals in a row (an ACL that does not let the
/// user subscribe): each one doubles it, so a misconfigured server is not
/// sent a new connection five times a second by every client. Waiters poll
/// meanwhile.
const REFUSED_PAUSE_MAX: Duration = Duration::from_secs(30);

/// Waiters by lock name: each an id and the sender that wakes it.
type Waiters = HashMap<String, Vec<(u64, Sender<()>)>>;

/// Who waits, and whether the listener is subscribed (changed only with the
/// state locked, so a waiter either sees it subscribed or asks for it).
#[derive(Default)]
struct State {
    waiters: Waiters,
    subscribed: bool,
    /// Watches that need messages ([`Watch::need_messages`]).
    asking: usize,
    /// When the last of them left (`None` while there are some).
    idle_since: Option<Instant>,
}

/// The wake-up fan-out: per-name lists of waiters, and the listener's state.
pub(crate) struct Listener {
    state: Mutex<State>,
    /// A waiter needs the subscription (it was not subscribed).
    wanted: (Sender<()>, Receiver<()>),
    next_id: AtomicU64,
    /// Connected, allowed to subscribe (it did when the connection opened),
    /// subscribed whenever a watch needs messages, and the server answered
    /// within [`PING_TIMEOUT`] of being asked.
    pub alive: AtomicBool,
    pub stop: AtomicBool,
    /// Disconnected once the listener's first attempt has an outcome (it
    /// subscribed, or the attempt failed): health waits for it rather than
    /// call a listener that is still connecting, right after `build()`, dead.
    settled: Receiver<()>,
    /// The process whose thread listens: a child forked from it has none.
    pid: u32,
}

/// Held by the listener thread until its first attempt has an outcome:
/// dropping it lets [`Listener::first_attempt`] return.
pub(crate) struct Settle(Option<Sender<()>>);

impl Settle {
    fn done(&mut self) {
        self.0 = None;
    }
}

impl Listener {
    /// A listener, and what its thread drops once its first attempt is over.
    pub fn new() -> (Listener, Settle) {
        let (settle, settled) = crossbeam_channel::bounded(0);
        let listener = Listener {
            state: Mutex::default(),
            wanted: crossbeam_channel::bounded(1),
            next_id: AtomicU64::new(0),
            alive: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            settled,
            pid: std::process::id(),
        };
        (listener, Settle(Some(settle)))
    }

    /// Waits until `deadline` at most for the listener's first attempt to
    /// subscribe or fail; at once after that, or in a forked child (whose
    /// copy of the listener has no thread to end it). Returns whether that
    /// attempt's outcome is known: until it is, `alive` may be set by an
    /// attempt whose unsubscribe the server has yet to refuse.
    pub fn first_attempt(&self, deadline: Instant) -> bool {
        self.forked()
            || matches!(
                self.settled.recv_deadline(deadline),
                Err(crossbeam_channel::RecvTimeoutError::Disconnected)
            )
    }

    fn forked(&self) -> bool {
        std::process::id() != self.pid
    }

    /// Subscribes a waiter to `name`'s releases until the guard drops: it
    /// hears them while the listener is subscribed, which
    /// [`Watch::need_messages`] makes sure of.
    pub fn watch(self: &Arc<Self>, name: &str) -> Watch {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut state = self.state.lock();
        state
            .waiters
            .entry(name.to_owned())
            .or_default()
            .push((id, tx));
        drop(state);
        Watch {
            listener: self.clone(),
            name: name.to_owned(),
            id,
            asked: false,
            rx,
        }
    }

    /// Whether it is alive (never in a forked child: the thread is the
    /// parent's).
    pub fn is_alive(&self) -> bool {
        !self.forked() && self.alive.load(Ordering::Relaxed)
    }

    fn wake(&self, name: &str) {
        if let Some(list) = self.state.lock().waiters.get(name) {
            for (_, tx) in list {
                let _ = tx.try_send(());
            }
        }
    }

    fn wake_all(&self) {
        for list in self.state.lock().waiters.values() {
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
    asked: bool,
    pub rx: Receiver<()>,
}

impl Watch {
    /// Keeps the listener subscribed while this watch lives: asks it to
    /// subscribe if it is not, which wakes this watch once done (messages
    /// published before were not heard: try again then).
    pub fn need_messages(&mut self) {
        if self.asked {
            return;
        }
        self.asked = true;
        let mut state = self.listener.state.lock();
        state.asking += 1;
        state.idle_since = None;
        if !state.subscribed {
            let _ = self.listener.wanted.0.try_send(());
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let mut state = self.listener.state.lock();
        if let Some(list) = state.waiters.get_mut(&self.name) {
            list.retain(|(id, _)| *id != self.id);
            if list.is_empty() {
                state.waiters.remove(&self.name);
            }
        }
        if self.asked {
            state.asking -= 1;
            if state.asking == 0 {
                state.idle_since = Some(Instant::now());
            }
        }
    }
}

/// The listener thread. It holds only a weak reference, and reads with a
/// timeout, so it ends soon after the backend is gone.
pub(crate) fn listen(manager: Manager, listener: Weak<Listener>, mut settle: Settle) {
    // Against a frozen server (over a Unix socket) an attempt may wait long
    // after the listener gave up on it: then it waits for that one rather
    // than leave another behind.
    let manager = manager.with_one_attempt("lockbox-subscribe");
    let mut pause = RECONNECT_PAUSE;
    loop {
        let Some(l) = listener.upgrade() else { return };
        if l.stop.load(Ordering::Relaxed) {
            return;
        }
        drop(l);
        // The backend's client: the same address, TLS settings and credentials
        // as every other connection, and the same bound on opening it.
        let mut refused = false;
        let result = manager
            .open(
                manager.connect_timeout.min(PING_TIMEOUT * 5),
                manager.io_timeout,
            )
            .and_then(|mut conn| {
                serve(&mut conn, &listener, &mut settle).map_err(|e| {
                    // Answered with an error: the server refuses, it is not lost.
                    refused = is_reply_error(&e);
                    OpenError::from(e)
                })
            });
        let Some(l) = listener.upgrade() else { return };
        l.alive.store(false, Ordering::Relaxed);
        l.state.lock().subscribed = false;
        settle.done();
        if l.stop.load(Ordering::Relaxed) {
            return;
        }
        // Waiters poll while nobody listens; wake them to start doing so.
        l.wake_all();
        drop(l);
        match result {
            // Said once, when the attempt that is still waiting failed.
            Err(e) if e.is_busy() => {}
            // Said once for refusals in a row.
            Err(e) if refused && pause > RECONNECT_PAUSE => {
                log::debug!("lockbox: the Redis server refused the release listener again: {e}")
            }
            Err(e) if refused => log::warn!(
                "lockbox: the Redis server refused the release listener (waiters poll \
                 meanwhile; trying again, less and less often, up to every \
                 {REFUSED_PAUSE_MAX:?}): {e}"
            ),
            Err(e) => {
                log::warn!("lockbox: redis release listener lost its connection, reconnecting: {e}")
            }
            Ok(()) => {}
        }
        pause = if refused { pause } else { RECONNECT_PAUSE };
        // In slices, so the thread ends soon after the backend is gone.
        let until = Instant::now() + pause;
        while Instant::now() < until {
            match listener.upgrade() {
                Some(l) if !l.stop.load(Ordering::Relaxed) => drop(l),
                _ => return,
            }
            thread::sleep(POLL.min(until.saturating_duration_since(Instant::now())));
        }
        if refused {
            pause = (pause * 2).min(REFUSED_PAUSE_MAX);
        }
    }
}

/// Serves the listener on `conn` until the connection fails, a PING goes
/// unanswered, or the backend is gone (`Ok`): subscribed while watches need
/// messages (and for [`LINGER`] after), otherwise idle, PINGing the server
/// every [`PING_EVERY`] so that a dead connection is still noticed.
fn serve(
    conn: &mut Conn,
    listener: &Weak<Listener>,
    settle: &mut Settle,
) -> redis::RedisResult<()> {
    conn.call(PING_TIMEOUT, |c| {
        let mut heard = Instant::now();
        // Subscribed once at once (and unsubscribed again unless a watch
        // needs it): a server that refuses either (an ACL without them)
        // shows as a dead listener now, in health, and not only when a
        // waiter needs it.
        let first = subscribed(c, listener, &mut heard, settle);
        if first.is_err()
            && let Some(l) = listener.upgrade()
        {
            // Refused or failed: not alive (before health is let read it).
            l.alive.store(false, Ordering::Relaxed);
        }
        // Subscribed and unsubscribed again (or not): as health now reports.
        settle.done();
        if !first? {
            return Ok(());
        }
        loop {
            // Idle: until a watch needs messages (asks, or still needs them
            // after a reconnection), or the end.
            loop {
                let Some(l) = listener.upgrade() else {
                    return Ok(());
                };
                if l.stop.load(Ordering::Relaxed) {
                    return Ok(());
                }
                if l.state.lock().asking > 0 {
                    break;
                }
                let asked = l.wanted.1.clone();
                drop(l);
                if asked.recv_timeout(POLL.min(PING_EVERY)).is_ok() {
                    break;
                }
                if heard.elapsed() >= PING_EVERY {
                    c.set_read_timeout(Some(PING_TIMEOUT))?;
                    redis::cmd("PING").query::<String>(c)?;
                    heard = Instant::now();
                }
            }
            if !subscribed(c, listener, &mut heard, settle)? {
                return Ok(());
            }
        }
    })
}

/// Subscribes and delivers messages until [`LINGER`] after the last watch
/// that needed messages went (at once if none ever did; `Ok(true)`,
/// unsubscribed again), the connection fails, the server refuses, a PING goes
/// unanswered, or the backend is gone (`Ok(false)`).
///
/// The driver's `PubSub` takes a refusal (`NOPERM`) of `PSUBSCRIBE` for a
/// confirmation and drops its unsubscribing's errors: the subscription is
/// sent and confirmed by hand, and a PING after unsubscribing finds out
/// whether that went through (the driver tries again then, and fails).
fn subscribed(
    c: &mut redis::Connection,
    listener: &Weak<Listener>,
    heard: &mut Instant,
    settle: &mut Settle,
) -> redis::RedisResult<bool> {
    c.set_read_timeout(Some(PING_TIMEOUT))?;
    c.send_packed_command(&redis::cmd("PSUBSCRIBE").arg(CHANNELS).get_packed_command())?;
    // Nothing else is pending on the connection: the next reply is this one.
    if let redis::Value::ServerError(e) = c.recv_response()? {
        return Err(e.into());
    }
    *heard = Instant::now();
    match listener.upgrade() {
        Some(l) => {
            l.alive.store(true, Ordering::Relaxed);
            let mut state = l.state.lock();
            state.subscribed = true;
            // Asks from before are answered (none comes while subscribed).
            while l.wanted.1.try_recv().is_ok() {}
            drop(state);
            // Releases published while we were not subscribed were missed:
            // every waiter tries again.
            l.wake_all();
        }
        None => return Ok(false),
    }
    let mut pubsub = c.as_pubsub();
    pubsub.set_read_timeout(Some(POLL))?;
    loop {
        let Some(l) = listener.upgrade() else {
            return Ok(false);
        };
        if l.stop.load(Ordering::Relaxed) {
            return Ok(false);
        }
        let mut state = l.state.lock();
        // (No watch ever asked: at once.)
        if state.asking == 0 && state.idle_since.is_none_or(|t| t.elapsed() >= LINGER) {
            // From here on a new waiter asks for the subscription.
            state.subscribed = false;
            drop(state);
            pubsub.set_read_timeout(Some(PING_TIMEOUT))?;
            // Unsubscribes, reading the confirmations (messages in between
            // are dropped: nobody waits for them).
            drop(pubsub);
            redis::cmd("PING").query::<String>(c)?;
            *heard = Instant::now();
            return Ok(true);
        }
        drop(state);
        // Staying subscribed for a watch: settled now, not when this
        // subscription ends (a watch that asked before the first one was
        // confirmed keeps it open, maybe for good, and health would wait out
        // its timeout every time). Whether the server lets it unsubscribe is
        // found out when it does.
        settle.done();
        drop(l);
        if heard.elapsed() >= PING_EVERY {
            pubsub.set_read_timeout(Some(PING_TIMEOUT))?;
            // In subscriber mode the answer is `pong`; messages that arrive
            // first are kept for `get_message`.
            pubsub.ping::<redis::Value>()?;
            pubsub.set_read_timeout(Some(POLL))?;
            *heard = Instant::now();
        }
        match pubsub.get_message() {
            Ok(msg) => {
                *heard = Instant::now();
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
}
