//! Bounds an acquire's statement as a whole.
//!
//! `lock_timeout` bounds each wait for a lock, not their sum: transactions
//! taking turns on the lease row (or on an unlogged table's epoch row), each
//! letting go within the wait allowed, hold a grant for as long as they keep
//! it up, and with it a `try_lock` or a timed acquire well past its time. The
//! watchdog sends the statement's session a cancel request once the
//! statement has run past its bound; the acquire treats the cancel as a lock
//! wait that ran out.
//!
//! A cancel request cancels whatever the session is running when it lands,
//! so [`Watchdog::bounded`] returns only once a cancel it started has been
//! sent: the server has then signalled the session, which cancels the
//! statement if it is still running and ignores the signal once idle. No
//! cancel can reach a later statement on the session (another lock's, on a
//! shared session, whose connection the caller holds until then).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use postgres::CancelToken;

use super::tls::PgTarget;

/// How often an idle watchdog looks again, for [`LINGER`] after its last
/// statement: every bound is longer, so a statement armed meanwhile needs
/// no wake-up of the watchdog's thread (a busy client arms with none).
const TICK: Duration = Duration::from_millis(100);
/// How long an idle watchdog keeps looking every [`TICK`] before it sleeps
/// until a statement is armed again (which then wakes it).
const LINGER: Duration = Duration::from_secs(2);

/// Cancels the statement running on one session (PostgreSQL's cancel
/// request, the way the session was opened).
pub(crate) struct Canceller {
    target: Arc<PgTarget>,
    token: CancelToken,
}

impl Canceller {
    pub fn new(target: Arc<PgTarget>, token: CancelToken) -> Canceller {
        Canceller { target, token }
    }

    fn cancel(&self) -> bool {
        match self.target.cancel(&self.token) {
            Ok(()) => true,
            Err(e) => {
                log::warn!("lockbox: could not cancel a statement past its bound: {e}");
                false
            }
        }
    }
}

/// One client's watchdog: a thread of its own, started by the first
/// statement it bounds and stopped when the client is dropped.
#[derive(Default)]
pub(crate) struct Watchdog {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Watchdog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watchdog").finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Inner {
    state: Mutex<State>,
    wake: Condvar,
    /// The process whose thread watches (0: no thread). A forked child
    /// starts its own, and never touches the parent's (whose lock the fork
    /// may have copied held).
    thread_of: AtomicU32,
}

#[derive(Default)]
struct State {
    /// The statements running, by bound.
    armed: BTreeMap<(Instant, u64), Arc<Shot>>,
    next_id: u64,
    /// When the thread looks next (`None`: not until woken).
    looks_at: Option<Instant>,
    closing: bool,
}

/// A statement's cancel: `None` while it is being sent, then whether it was.
struct Shot {
    canceller: Arc<Canceller>,
    sent: Mutex<Option<bool>>,
    done: Condvar,
}

impl Watchdog {
    /// Runs `run` (a statement on the session `canceller` cancels), and
    /// cancels it if it runs for longer than `bound`. Returns its result and
    /// whether it ran past the bound (a cancel was then sent, or tried, and
    /// has been by now).
    pub fn bounded<T>(
        &self,
        canceller: &Arc<Canceller>,
        bound: Duration,
        run: impl FnOnce() -> T,
    ) -> (T, bool) {
        let mut armed = self.arm(canceller, bound);
        let out = run();
        let overran = armed.disarm();
        (out, overran)
    }

    fn arm(&self, canceller: &Arc<Canceller>, bound: Duration) -> Armed<'_> {
        let Some(deadline) = Instant::now().checked_add(bound) else {
            return Armed {
                dog: self,
                armed: None,
            };
        };
        let shot = Arc::new(Shot {
            canceller: canceller.clone(),
            sent: Mutex::new(None),
            done: Condvar::new(),
        });
        let mut st = self.inner.state.lock();
        let key = (deadline, st.next_id);
        st.next_id += 1;
        st.armed.insert(key, shot.clone());
        let pid = std::process::id();
        if self.inner.thread_of.load(Ordering::Relaxed) != pid {
            let inner = self.inner.clone();
            match thread::Builder::new()
                .name("lockbox-watchdog".to_owned())
                .spawn(move || watch(&inner))
            {
                Ok(_) => {
                    self.inner.thread_of.store(pid, Ordering::Relaxed);
                    st.looks_at = None;
                }
                Err(e) => log::warn!(
                    "lockbox: could not start the watchdog thread ({e}); statements are \
                     bounded by each lock wait only"
                ),
            }
        } else if st.looks_at.is_none_or(|at| deadline < at) {
            self.inner.wake.notify_one();
        }
        Armed {
            dog: self,
            armed: Some((key, shot)),
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        if self.inner.thread_of.load(Ordering::Relaxed) != std::process::id() {
            return;
        }
        self.inner.state.lock().closing = true;
        self.inner.wake.notify_one();
    }
}

/// A statement being watched; disarmed when it returns (or on unwinding).
struct Armed<'w> {
    dog: &'w Watchdog,
    armed: Option<((Instant, u64), Arc<Shot>)>,
}

impl Armed<'_> {
    /// Whether the statement ran past its bound: its cancel, if the watchdog
    /// started one, has been sent (or failed) when this returns.
    fn disarm(&mut self) -> bool {
        let Some((key, shot)) = self.armed.take() else {
            return false;
        };
        if self.dog.inner.state.lock().armed.remove(&key).is_some() {
            return false;
        }
        let mut sent = shot.sent.lock();
        while sent.is_none() {
            shot.done.wait(&mut sent);
        }
        true
    }
}

impl Drop for Armed<'_> {
    fn drop(&mut self) {
        self.disarm();
    }
}

/// The watchdog's thread: cancels each statement past its bound, each on a
/// thread of its own (a cancel that hangs until its connect timeout holds
/// up no other).
fn watch(inner: &Inner) {
    let mut st = inner.state.lock();
    let mut busy_at = Instant::now();
    loop {
        if st.closing {
            return;
        }
        let now = Instant::now();
        while let Some(entry) = st.armed.first_entry() {
            if entry.key().0 > now {
                break;
            }
            fire(entry.remove());
        }
        st.looks_at = match st.armed.keys().next() {
            Some(&(deadline, _)) => {
                busy_at = now;
                Some(deadline)
            }
            None if now.duration_since(busy_at) < LINGER => Some(now + TICK),
            None => None,
        };
        match st.looks_at {
            Some(at) => {
                inner.wake.wait_until(&mut st, at);
            }
            None => inner.wake.wait(&mut st),
        }
    }
}

fn fire(shot: Arc<Shot>) {
    let sending = shot.clone();
    let spawned = thread::Builder::new()
        .name("lockbox-cancel".to_owned())
        .spawn(move || {
            let sent = sending.canceller.cancel();
            *sending.sent.lock() = Some(sent);
            sending.done.notify_all();
        });
    if let Err(e) = spawned {
        log::warn!("lockbox: could not start a thread to cancel a statement past its bound: {e}");
        *shot.sent.lock() = Some(false);
        shot.done.notify_all();
    }
}
