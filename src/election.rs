//! [`Election`]: one leader per name, and followers who watch it.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{Receiver, Sender, TrySendError};

use crate::backend::{Backend, LeaseKind, Watch};
use crate::client::LockClient;
use crate::error::Result;
use crate::guards::lock_guard;
use crate::lease_info::{LeaseInfo, LeaseStatus};
use crate::options::AcquireOptions;

/// How often a watch thread looks whether its [`LeaderWatch`] was dropped
/// while nothing happens (it reads nothing from the store for that).
const STOP_CHECK: Duration = Duration::from_millis(250);
/// The pause before a watch that failed (the store unreachable) tries again.
const WATCH_RETRY: Duration = Duration::from_secs(1);

/// Leader election on one name: candidates [`campaign`](Self::campaign), and
/// exactly one of them leads at a time.
///
/// The leader holds a [`Leadership`]: an exclusive lease on the name, like a
/// [`Lock`](crate::Lock), whose **term** (its fencing token) is above every
/// earlier leader's and whose [`lost`](crate::Lock::lost) fires when the
/// leadership ends (the lease could not be kept). Resigning is releasing or
/// dropping it. A leader that crashes leads until its lease ends; then the
/// next candidate takes over with a higher term.
///
/// Anyone can ask who leads now ([`leader`](Self::leader)) and
/// [`watch`](Self::watch) for changes of leader through a channel, without
/// polling: grants and resignations of leaders are announced by the store
/// (PostgreSQL `LISTEN`/`NOTIFY`, Redis pub/sub, etcd watches, a condition
/// variable in memory), and a leader that vanished without resigning is
/// noticed when its lease ends.
///
/// ```no_run
/// # fn main() -> Result<(), lockbox::Error> {
/// # let client = lockbox::LockClient::builder("postgres://app@127.0.0.1/app").build()?;
/// use lockbox::AcquireOptions;
/// let election = client.election("scheduler")?;
/// let leadership = election
///     .campaign("worker-3", &AcquireOptions::new().wait_forever())?
///     .expect("waited forever");
/// println!("leading in term {}", leadership.term());
/// // … lead until leadership.lost() fires, or resign:
/// leadership.release()?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Election {
    client: LockClient,
    name: String,
}

lock_guard!(
    /// Leadership in an [`Election`]: an exclusive lease on its name. Resign by
    /// releasing or dropping it; [`lost`](crate::Lock::lost) fires when the
    /// leadership ends otherwise. Derefs to the [`Lock`](crate::Lock)
    /// underneath.
    Leadership,
    "leadership"
);

impl Leadership {
    /// The leadership's term: its fencing token, above every earlier leader's.
    pub fn term(&self) -> u64 {
        self.lock.fencing_token()
    }
}

/// Who leads an [`Election`], as the store records it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Leader {
    /// The identity the leader campaigned with.
    pub identity: String,
    /// The leader's client ([`LockClient::owner_id`]).
    pub owner: String,
    /// The leader's term: its lease's fencing token.
    pub term: u64,
    /// When it became leader.
    pub since: SystemTime,
}

impl Leader {
    /// The leader of a name whose leases are `leases`: its live exclusive one.
    fn of(leases: Vec<LeaseInfo>) -> Option<(Leader, Duration)> {
        leases.into_iter().find_map(|l| match l.status {
            LeaseStatus::Held { expires_in } if l.kind == LeaseKind::Exclusive => Some((
                Leader {
                    identity: l.metadata.unwrap_or_default(),
                    owner: l.owner,
                    term: l.fencing_token,
                    since: l.acquired_at,
                },
                expires_in,
            )),
            _ => None,
        })
    }
}

impl Election {
    pub(crate) fn new(client: LockClient, name: &str) -> Result<Election> {
        crate::name::validate(name)?;
        Ok(Election {
            client,
            name: name.to_owned(),
        })
    }

    /// The election's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Campaigns to lead as `identity` (what [`leader`](Self::leader) shows
    /// followers; stored as the lease's metadata, so `opts`' metadata is
    /// replaced), waiting as `opts` allows (by default, not at all).
    /// `Ok(None)`: another candidate led throughout the wait.
    ///
    /// # Errors
    /// As [`LockClient::acquire`].
    pub fn campaign(&self, identity: &str, opts: &AcquireOptions) -> Result<Option<Leadership>> {
        let opts = opts.clone().metadata(identity);
        Ok(self
            .client
            .acquire_kind(&self.name, &opts, LeaseKind::Exclusive, true)?
            .map(Leadership::from_lock))
    }

    /// Who leads now, by the store's record: `None` when nobody does (no
    /// candidate has won yet, or the last leader resigned or its lease ended).
    ///
    /// # Errors
    /// Any failure to reach the store.
    pub fn leader(&self) -> Result<Option<Leader>> {
        Ok(Leader::of(self.client.leases_of(&self.name)?).map(|(l, _)| l))
    }

    /// Watches the election: the returned [`LeaderWatch`] receives the leader
    /// now (first), then the new leader (or `None`) on every change: a new
    /// term, a resignation, a lease that ended. Changes are announced by the
    /// store, not polled for; the store is read again on each announcement
    /// and when the known leader's lease is due to end.
    ///
    /// A thread of its own serves the watch until the `LeaderWatch` is
    /// dropped; a watch that cannot reach the store retries every second and
    /// sends nothing meanwhile.
    ///
    /// # Errors
    /// [`Error::Unsupported`](crate::Error::Unsupported) for a store that
    /// cannot watch, or in a child process forked from the one that built the
    /// client; any failure to reach the store or to start the thread.
    pub fn watch(&self) -> Result<LeaderWatch> {
        // A forked child's copy would watch on the parent's store handle (its
        // pool's sessions, mutexes a parent thread may have held at the fork).
        self.client.refuse_forked()?;
        let backend = self.client.backend_arc();
        // Watching starts before the first read, so no change after it is missed.
        let watch = backend.watch(&self.name)?;
        let (tx, rx) = crossbeam_channel::unbounded();
        let stop = Arc::new(AtomicBool::new(false));
        let watcher = Watcher {
            backend,
            name: self.name.clone(),
            stop: stop.clone(),
            tx,
        };
        thread::Builder::new()
            .name("lockbox-leader-watch".to_owned())
            .spawn(move || watcher.run(watch))
            .map_err(crate::error::Error::database)?;
        Ok(LeaderWatch { rx, stop })
    }
}

impl fmt::Debug for Election {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Election")
            .field("name", &self.name)
            .finish()
    }
}

/// The changes of leader of an [`Election`], from [`Election::watch`]: the
/// leader when the watch began, then each new one (`None`: nobody leads).
/// Stops its thread when dropped.
pub struct LeaderWatch {
    rx: Receiver<Option<Leader>>,
    stop: Arc<AtomicBool>,
}

impl LeaderWatch {
    /// The channel the changes arrive on, to `recv` or `select!` on.
    pub fn changes(&self) -> &Receiver<Option<Leader>> {
        &self.rx
    }
}

impl Drop for LeaderWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl fmt::Debug for LeaderWatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LeaderWatch")
            .field("pending", &self.rx.len())
            .finish()
    }
}

/// The thread behind a [`LeaderWatch`].
struct Watcher {
    backend: Arc<dyn Backend>,
    name: String,
    stop: Arc<AtomicBool>,
    tx: Sender<Option<Leader>>,
}

impl Watcher {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    fn run(self, mut watch: Box<dyn Watch>) {
        // `None` before the first read: the first state is always sent.
        let mut last: Option<Option<u64>> = None;
        while !self.stopped() {
            let (leader, ends) = match self.backend.leases(Some(&self.name)) {
                Ok(leases) => match Leader::of(leases) {
                    Some((leader, left)) => (Some(leader), Some(Instant::now() + left)),
                    None => (None, None),
                },
                Err(e) => {
                    log::warn!("lockbox: watching election {:?}: {e}", self.name);
                    thread::sleep(WATCH_RETRY);
                    continue;
                }
            };
            let term = leader.as_ref().map(|l| l.term);
            if last != Some(term) {
                last = Some(term);
                match self.tx.try_send(leader) {
                    Ok(()) | Err(TrySendError::Full(_)) => {}
                    Err(TrySendError::Disconnected(_)) => return,
                }
            }
            // Until an announcement, or the leader's lease end (a leader that
            // crashed announces nothing), looking for a drop now and then.
            loop {
                if self.stopped() {
                    return;
                }
                let now = Instant::now();
                if ends.is_some_and(|end| end <= now) {
                    break;
                }
                let until = ends.map_or(now + STOP_CHECK, |end| end.min(now + STOP_CHECK));
                match watch.wait(until) {
                    Ok(true) => break,
                    Ok(false) => {}
                    Err(e) => {
                        log::warn!("lockbox: watching election {:?}: {e}", self.name);
                        thread::sleep(WATCH_RETRY);
                        match self.backend.watch(&self.name) {
                            Ok(w) => watch = w,
                            Err(e) => {
                                log::warn!("lockbox: watching election {:?} again: {e}", self.name)
                            }
                        }
                        // Read again: a change may have been missed meanwhile.
                        break;
                    }
                }
            }
        }
    }
}
