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
//! A cancel request cancels whatever the session is running when it
//! arrives, and the driver's returns once the request is written, before
//! the server has read it. So when a statement past its bound ends some
//! other way than cancelled (it finished, or its own lock wait ran out just
//! then), [`Watchdog::bounded`] gives the cancel a statement to land on
//! before the session runs anything else: a short sleep ([`ABSORB`]), which
//! the cancel ends, or which ends by itself once a cancel that was on its
//! way would have arrived. It waits at most [`SENDING_WAIT`] for the cancel
//! to be written first (a cancel's connection can hang until its connect
//! timeout); past that, or if the cancel arrives after the sleep, it may
//! still land on a later statement of the session, which is therefore
//! *tainted*: closed rather than pooled once it is free (a lock granted on
//! it keeps it until then). So is a session whose statement was cancelled
//! once its cancel was sent: the cancel that ended it may have been an
//! operator's, and its own still on its way. A cancel landing on a later statement of a
//! tainted session is taken for the late one (see `PgConn::late_cancel`):
//! an acquire's statement counts it as a lock wait that ran out, a
//! renewal's or release's is sent again.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use postgres::error::SqlState;
use postgres::{CancelToken, GenericClient};

use super::tls::{CancelError, PgTarget};

/// The statement a cancel that was sent for a statement that ended some
/// other way lands on: on this machine's loopback the next statement was
/// cancelled within milliseconds (`review_r2_watchdog.rs`); a quarter of a
/// second leaves room for a slow network and the server starting the
/// process that reads the request.
const ABSORB: &str = "SELECT pg_catalog.pg_sleep(0.25)";

/// How long a statement that ended past its bound waits for its cancel to
/// be written, before its session is left tainted instead.
const SENDING_WAIT: Duration = Duration::from_millis(250);

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

    /// Whether the cancel was written (`None`: unknown, it may still be:
    /// a driver error or a timeout leaves the attempt running on its
    /// thread, its TLS exchange unbounded).
    fn cancel(&self) -> Option<bool> {
        match self.target.cancel(&self.token) {
            Ok(()) => Some(true),
            Err(e) => {
                log::warn!("lockbox: could not cancel a statement past its bound: {e}");
                match e {
                    CancelError::Busy(_) | CancelError::Spawn(_) => Some(false),
                    CancelError::TimedOut(_) | CancelError::Driver(_) => None,
                }
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

/// A statement's cancel: `None` while it is being sent, then whether it
/// was (see [`Canceller::cancel`]).
struct Shot {
    canceller: Arc<Canceller>,
    sent: Mutex<Option<Option<bool>>>,
    done: Condvar,
}

impl Watchdog {
    /// Runs `run` (a statement on `client`, whose session `canceller`
    /// cancels), and cancels it if it runs for longer than `bound`. Returns
    /// its result and what became of the bound.
    pub fn bounded<C: GenericClient, T>(
        &self,
        client: &mut C,
        canceller: &Arc<Canceller>,
        bound: Duration,
        run: impl FnOnce(&mut C) -> Result<T, postgres::Error>,
    ) -> (Result<T, postgres::Error>, Overrun) {
        let mut armed = self.arm(canceller, bound);
        let out = run(client);
        let cancelled = matches!(&out, Err(e) if e.code() == Some(&SqlState::QUERY_CANCELED));
        let overrun = match armed.disarm(if cancelled {
            Duration::ZERO
        } else {
            SENDING_WAIT
        }) {
            Sending::NotFired => Overrun::No,
            // Never written: an operator's cancel, if this was cancelled.
            Sending::Failed => Overrun::Cancelled,
            // Cancelled, by this cancel most likely; but an operator's (or a
            // statement timeout's) cannot be told from it, and this one
            // would then still be on its way (helper-70).
            _ if cancelled => Overrun::Doubtful,
            Sending::Sent => match client.batch_execute(ABSORB) {
                Err(e) if e.code() == Some(&SqlState::QUERY_CANCELED) => Overrun::Cancelled,
                Ok(()) => {
                    log::debug!(
                        "lockbox: a cancel sent for a statement past its bound did not \
                         arrive within 250 ms"
                    );
                    Overrun::Tainted
                }
                Err(e) => {
                    log::debug!("lockbox: waiting for a cancel to arrive: {e}");
                    Overrun::Tainted
                }
            },
            Sending::Unknown => Overrun::Tainted,
        };
        (out, overrun)
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

/// What became of a statement's bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Overrun {
    /// It ended within its bound.
    No,
    /// Past its bound, and its cancel could not be written, or landed on
    /// the sleep that followed. The session is as clean as before.
    Cancelled,
    /// Past its bound and cancelled, by its own cancel most likely: another
    /// one cannot be told from it, and its own would then still be on its
    /// way. See [`Taint::Doubtful`].
    Doubtful,
    /// Past its bound, and its cancel may still land on a later statement.
    /// See [`Taint::Tainted`].
    Tainted,
}

/// What a session's watchdog cancels may still do to it (see the module's
/// docs).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Taint {
    #[default]
    Clean,
    /// A cancel of its own may still land on it, though most likely none
    /// will: a cancel on it is taken for that one (`PgConn::late_cancel`),
    /// and it is closed rather than pooled once free; but, shared, it goes
    /// on taking locks (retired for so unlikely a cancel, one session of a
    /// pool of one held by a long-held lock took no other: helper-71).
    Doubtful,
    /// As `Doubtful`, and the cancel is likely: it takes no new lock either.
    Tainted,
}

impl Taint {
    /// Adds what a statement's bound became.
    pub fn add(&mut self, overrun: Overrun) {
        let taint = match overrun {
            Overrun::Tainted => Taint::Tainted,
            Overrun::Doubtful => Taint::Doubtful,
            Overrun::No | Overrun::Cancelled => Taint::Clean,
        };
        *self = (*self).max(taint);
    }

    /// Whether a cancel of its own may still land on the session.
    pub fn any(self) -> bool {
        self != Taint::Clean
    }
}

impl Overrun {
    /// Whether the statement ran past its bound.
    pub fn overran(self) -> bool {
        self != Overrun::No
    }
}

/// Where a statement's cancel is when the statement has ended.
enum Sending {
    NotFired,
    Sent,
    /// Never written (no thread for it, or too many pending).
    Failed,
    /// Still being written, or given up on while it may still be.
    Unknown,
}

/// A statement being watched; disarmed when it returns (or on unwinding).
struct Armed<'w> {
    dog: &'w Watchdog,
    armed: Option<((Instant, u64), Arc<Shot>)>,
}

impl Armed<'_> {
    /// Where the statement's cancel is, waiting up to `wait` for the
    /// watchdog to finish writing it.
    fn disarm(&mut self, wait: Duration) -> Sending {
        let Some((key, shot)) = self.armed.take() else {
            return Sending::NotFired;
        };
        if self.dog.inner.state.lock().armed.remove(&key).is_some() {
            return Sending::NotFired;
        }
        let until = Instant::now() + wait;
        let mut sent = shot.sent.lock();
        while sent.is_none() && !shot.done.wait_until(&mut sent, until).timed_out() {}
        match *sent {
            Some(Some(true)) => Sending::Sent,
            Some(Some(false)) => Sending::Failed,
            Some(None) | None => Sending::Unknown,
        }
    }
}

impl Drop for Armed<'_> {
    fn drop(&mut self) {
        self.disarm(Duration::ZERO);
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
        *shot.sent.lock() = Some(Some(false));
        shot.done.notify_all();
    }
}
