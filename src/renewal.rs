//! Keeping held locks alive: one scheduler thread per client, and I/O workers.
//!
//! The scheduler (`lockbox-renewal-N`) never does I/O and never runs user code.
//! It sleeps in `select!` on a command channel and a timer set to the earliest
//! due renewal or deadline; at a deadline it latches the loss, which fires
//! `lost()` at once whatever any statement is doing; for a due renewal it hands
//! the lock to a worker. Each worker (`lockbox-io-N-M`) runs one renewal at a
//! time on that lock's own session, bounded by what the lock has left; a lock has
//! at most one renewal in flight, and a new worker is started whenever none is
//! idle. So a renewal stuck on the server (a row lock, DDL, a hung backend, a
//! frozen network path) holds up only its own lock, and renewal capacity grows
//! with the number of locks instead of hinging on one thread's round trips.
//! Locks that share a store session ([`Session::shared`](crate::backend::Session::shared))
//! are renewed together: when one is due, its neighbours due within half
//! their interval join it, and one worker sends one request for them all; a
//! session has at most one such request in flight, and the locks that fall
//! due meanwhile go in its next one. Such locks share the session's fate (a
//! request stuck on it holds up all of them, and each still fires `lost()` at
//! its own deadline), never the fate of another session's locks.
//! Each job is handed to one chosen idle worker through that worker's own
//! channel: workers never wait together on a shared queue, which with many
//! locks due at once made them spin against each other, starve the CPU, look
//! busy, and so make the scheduler start ever more of them. Idle workers exit
//! after [`WORKER_IDLE`].
//!
//! Threads hold only per-lock state, never the client, so they cannot keep it
//! alive. The scheduler exits when the client's sender is dropped and is joined
//! there; workers exit once the scheduler is gone and their job is done, and are
//! never joined (one may be stuck in a statement until the network gives up).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, select};
use parking_lot::Mutex;

use crate::backend::SharedSession;
use crate::clock::BootInstant;
use crate::error::LostReason;
use crate::lease::{Latch, LeaseState, Now, RenewOutcome};

/// The longest the scheduler sleeps. It then wakes by itself, so registering a
/// lock whose first renewal is further away than the planned wake-up needs no
/// message (the common acquire costs the caller no cross-thread signal), and a
/// machine resumed from suspend is noticed within this.
const IDLE_WAKE: Duration = Duration::from_secs(1);
/// How long an idle worker waits for work before it exits.
pub(crate) const WORKER_IDLE: Duration = Duration::from_secs(10);
/// How soon the scheduler tries again to start a worker after a start failed
/// (a thread or address-space limit, often passing): the job waits meanwhile,
/// and its lock's deadline still fires on time.
const SPAWN_RETRY: Duration = Duration::from_millis(20);

/// The held locks, shared with the client (for health) and read by the
/// scheduler only long enough to copy what is due: never across I/O.
type Registry = Arc<Mutex<Locks>>;

#[derive(Debug, Default)]
struct Locks {
    map: HashMap<u64, Arc<LeaseState>>,
    /// Test-only: renewals suspended (as in a frozen process); deadlines still pass.
    paused: bool,
    /// When the scheduler will next wake by itself (`None`: it is computing it).
    planned: Option<Instant>,
    /// Set when the scheduler has ended: nothing registered now would be renewed.
    stopped: bool,
    /// A wake is queued that the scheduler has not planned after yet: another
    /// would add nothing.
    wake_queued: bool,
}

#[derive(Debug)]
enum Command {
    /// The set of locks or a schedule changed: recompute the next wake-up.
    Wake,
    #[cfg(any(test, feature = "test-support"))]
    Panic,
}

/// The worker pool.
#[derive(Debug, Default)]
struct Workers {
    /// The idle workers, most recently idle last (reused first, so the others
    /// time out), each by its id and the sender of its own one-job channel.
    pool: Mutex<Pool>,
    running: AtomicUsize,
    seq: AtomicU64,
}

#[derive(Debug, Default)]
struct Pool {
    idle: Vec<(u64, Sender<Job>)>,
    /// Jobs no worker could be started for: the next worker to finish a job
    /// takes them, or the scheduler tries to start one again after
    /// [`SPAWN_RETRY`].
    backlog: VecDeque<Job>,
    /// Set when the scheduler ends: workers then exit instead of idling.
    stopped: bool,
}

impl Workers {
    /// Ends the pool: idle workers see their channel close and exit.
    fn stop(&self) {
        let mut pool = self.pool.lock();
        pool.stopped = true;
        pool.idle.clear();
    }
}

/// The client's handle on its renewal scheduler.
#[derive(Debug)]
pub(crate) struct Renewer {
    locks: Registry,
    workers: Arc<Workers>,
    tx: Option<Sender<Command>>,
    thread: Option<JoinHandle<()>>,
}

impl Renewer {
    pub fn spawn(name: String) -> std::io::Result<Renewer> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let locks = Registry::default();
        let workers = Arc::new(Workers::default());
        let scheduler = Scheduler {
            locks: locks.clone(),
            workers: workers.clone(),
            name: name.clone(),
            retry_spawn: None,
            shared_busy: HashMap::new(),
        };
        let thread = thread::Builder::new()
            .name(name)
            .spawn(move || scheduler.run(&rx))?;
        Ok(Renewer {
            locks,
            workers,
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// Starts renewing `lock`. Fails when the scheduler is no longer running.
    pub fn register(&self, lock: Arc<LeaseState>) -> Result<(), ()> {
        let id = lock.id;
        let due = lock.due(true, Now::read());
        let wake = {
            let mut locks = self.locks.lock();
            if locks.stopped {
                return Err(());
            }
            locks.map.insert(id, lock);
            // Under the same mutex the scheduler publishes its plan with, so no
            // registration can slip between its plan and its sleep.
            let wake = match (due, locks.planned) {
                (Some(due), Some(planned)) => due < planned,
                _ => true,
            } && !locks.wake_queued;
            locks.wake_queued |= wake;
            wake
        };
        if wake {
            self.send(Command::Wake).inspect_err(|_| {
                self.locks.lock().map.remove(&id);
            })?;
        }
        Ok(())
    }

    pub fn unregister(&self, id: u64) {
        self.locks.lock().map.remove(&id);
    }

    pub fn wake(&self) {
        let _ = self.send(Command::Wake);
    }

    /// The locks being renewed.
    pub fn held(&self) -> Vec<Arc<LeaseState>> {
        self.locks.lock().map.values().cloned().collect()
    }

    /// Whether the scheduler is still running.
    pub fn is_alive(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Renewal workers running now (idle ones included).
    pub fn workers(&self) -> usize {
        self.workers.running.load(Ordering::Relaxed)
    }

    #[cfg(any(test, feature = "test-support"))]
    pub fn pause(&self, paused: bool) {
        self.locks.lock().paused = paused;
        self.wake();
    }

    #[cfg(any(test, feature = "test-support"))]
    pub fn inject_panic(&self) {
        let _ = self.send(Command::Panic);
    }

    fn send(&self, cmd: Command) -> Result<(), ()> {
        match &self.tx {
            Some(tx) => tx.send(cmd).map_err(|_| ()),
            None => Err(()),
        }
    }

    /// Forgets the scheduler without stopping or joining it: for a copy of the
    /// client inherited through `fork()`, where that thread does not exist.
    pub fn forget(mut self) {
        if let Some(thread) = self.thread.take() {
            std::mem::forget(thread);
        }
        if let Some(tx) = self.tx.take() {
            std::mem::forget(tx);
        }
        std::mem::forget(self);
    }
}

impl Drop for Renewer {
    fn drop(&mut self) {
        // Dropping the only sender is the shutdown signal.
        self.tx = None;
        if let Some(thread) = self.thread.take() {
            // The scheduler never holds the client, so this drop cannot run on it;
            // the check only guards against a future change breaking that.
            if thread.thread().id() != thread::current().id() && thread.join().is_err() {
                log::error!("lockbox: the renewal thread had panicked");
            }
        }
    }
}

/// Runs when the scheduler ends, normally or by a panic: any lock still
/// registered can no longer be renewed and is marked lost.
struct StopGuard<'a>(&'a Registry, &'a Workers);

impl Drop for StopGuard<'_> {
    fn drop(&mut self) {
        self.1.stop();
        if thread::panicking() {
            log::error!("lockbox: the renewal thread panicked; marking every held lock lost");
        }
        let orphans: Vec<Arc<LeaseState>> = {
            let mut locks = self.0.lock();
            locks.stopped = true;
            locks.map.drain().map(|(_, l)| l).collect()
        };
        for lock in &orphans {
            lock.mark_lost(LostReason::RenewalStopped);
        }
        // Then free their locks at once rather than when their guards go (the
        // scheduler is ending, so this I/O delays no deadline of its own; a
        // session a worker is renewing is taken when that bounded statement ends).
        for lock in orphans {
            drop(lock.take_session());
        }
    }
}

/// A job for a worker.
#[derive(Debug)]
enum Job {
    /// Renew this lock once.
    Renew(Arc<LeaseState>),
    /// Renew these locks, which share this store session, in one request.
    RenewShared(Vec<Arc<LeaseState>>, Arc<dyn SharedSession>),
    /// The lock was lost: close its session now (which frees a still-held
    /// advisory lock) rather than when its guard goes.
    Drop(Arc<LeaseState>),
}

struct Scheduler {
    locks: Registry,
    workers: Arc<Workers>,
    name: String,
    /// Set when a worker could not be started: when to try again.
    retry_spawn: Option<Instant>,
    /// The shared sessions with a renewal request in flight (by
    /// [`session_id`]), each with the locks on it that became due meanwhile
    /// (claimed, so they are planned only for their deadlines): they go in the
    /// session's next request, sent when this one ends. One request at a time
    /// per session: its statements run one after another anyway.
    shared_busy: HashMap<usize, Vec<Arc<LeaseState>>>,
}

/// What a worker reports when it finishes a job.
#[derive(Debug)]
struct Done {
    /// For a shared session's renewal: its id, and whether the store said the
    /// session is gone.
    shared: Option<(usize, bool)>,
}

/// Identifies a shared session while a lock holds it.
fn session_id(shared: &Weak<dyn SharedSession>) -> usize {
    Weak::as_ptr(shared).cast::<()>() as usize
}

impl Scheduler {
    fn run(mut self, rx: &Receiver<Command>) {
        let locks = self.locks.clone();
        let workers = self.workers.clone();
        let _stop = StopGuard(&locks, &workers);
        // Workers report finished renewals here, so the scheduler plans the
        // lock's next renewal; this channel stays open while workers live, which
        // is why it is not the command channel.
        let (done_tx, done_rx) = crossbeam_channel::unbounded::<Done>();
        loop {
            let next = {
                let mut locks = self.locks.lock();
                let idle = Instant::now() + IDLE_WAKE;
                // While paused (tests only), wake for deadlines rather than renewals.
                let renewals = !locks.paused;
                let clock_now = Now::read();
                let next = locks
                    .map
                    .values()
                    .filter_map(|l| l.due(renewals, clock_now))
                    .min()
                    .map_or(idle, |d| d.min(idle));
                let next = self.retry_spawn.map_or(next, |r| r.min(next));
                locks.planned = Some(next);
                // Wakes sent before this plan are covered by it.
                locks.wake_queued = false;
                next
            };
            let timer = crossbeam_channel::at(next);
            let mut finished = Vec::new();
            select! {
                recv(rx) -> cmd => match cmd {
                    Ok(cmd) => Self::command(cmd),
                    Err(_) => return,
                },
                recv(done_rx) -> done => finished.extend(done.ok()),
                recv(timer) -> _ => {}
            }
            // One pass covers everything queued meanwhile: a pass per message
            // costs a pass over every lock per finished renewal, and let a burst
            // of registrations queue thousands of wakes ahead of a shutdown.
            for cmd in rx.try_iter() {
                Self::command(cmd);
            }
            finished.extend(done_rx.try_iter());
            self.locks.lock().planned = None;
            self.finished_shared(finished, &done_tx);
            self.tick(&done_tx);
        }
    }

    fn command(cmd: Command) {
        match cmd {
            Command::Wake => {}
            #[cfg(any(test, feature = "test-support"))]
            Command::Panic => panic!("lockbox: renewal thread panic injected by a test"),
        }
    }

    /// Sends the next request of each shared session whose request ended, with
    /// the locks that became due meanwhile; when the store said the session is
    /// gone, marks every lock on it lost first (they are then closed by
    /// [`tick`](Self::tick)).
    fn finished_shared(&mut self, finished: Vec<Done>, done: &Sender<Done>) {
        for (id, gone) in finished.into_iter().filter_map(|d| d.shared) {
            let waiting = self.shared_busy.remove(&id).unwrap_or_default();
            if gone {
                let on_it: Vec<Arc<LeaseState>> = self
                    .locks
                    .lock()
                    .map
                    .values()
                    .filter(|l| l.shared().is_some_and(|s| session_id(s) == id))
                    .cloned()
                    .collect();
                // Latched only: reported by the workers that close them
                // (`tick` hands each to one), never on this thread.
                for lock in on_it {
                    lock.latch_lost(LostReason::SessionLost);
                }
            }
            self.dispatch_shared(id, waiting, done);
        }
    }

    /// Latches passed deadlines and hands due renewals to workers.
    fn tick(&mut self, done: &Sender<Done>) {
        let now = Instant::now();
        if self.retry_spawn.is_some_and(|at| at <= now) {
            self.retry_spawn = None;
            let waiting: Vec<Job> = self.workers.pool.lock().backlog.drain(..).collect();
            for job in waiting {
                self.dispatch(job, done);
            }
        }
        let boot_now = BootInstant::now();
        let (paused, all): (bool, Vec<Arc<LeaseState>>) = {
            let locks = self.locks.lock();
            (locks.paused, locks.map.values().cloned().collect())
        };
        let mut finished = Vec::new();
        // Due locks on shared sessions, by session.
        let mut due_shared: HashMap<usize, Vec<Arc<LeaseState>>> = HashMap::new();
        for lock in &all {
            // The loss is signalled here, at the deadline, whatever the lock's
            // session is doing: this touches only the lock's clock.
            let Latch::Ended { lost, statement } = lock.latch_deadline(boot_now) else {
                if !paused && lock.claim_renewal(now) {
                    match lock.shared() {
                        Some(shared) => due_shared
                            .entry(session_id(shared))
                            .or_default()
                            .push(lock.clone()),
                        None => self.dispatch(Job::Renew(lock.clone()), done),
                    }
                }
                continue;
            };
            let lock = lock.clone();
            finished.push(lock.id);
            if !lost {
                continue;
            }
            if statement && lock.can_interrupt() {
                // The renewal is still stuck on the server at the deadline:
                // interrupt it so its worker and connection are freed, on a thread
                // of its own (it may open a connection). Marked first, so that no
                // release can hand the session back for reuse before it lands.
                lock.mark_interrupted();
                let target = lock.clone();
                let spawned = thread::Builder::new()
                    .name(self.name.replace("renewal", "interrupt"))
                    .spawn(move || target.interrupt());
                if let Err(e) = spawned {
                    log::error!("lockbox: could not start an interrupt thread: {e}");
                }
            }
            // Reported and closed on a worker: reporting runs the logger and the
            // metrics recorder, user code that must not hold up this thread.
            self.dispatch(Job::Drop(lock), done);
        }
        if !due_shared.is_empty() {
            // The neighbours of a due lock that are due soon go in the same
            // request: one request per session and round, not one per lock.
            for lock in &all {
                if let Some(shared) = lock.shared()
                    && let Some(batch) = due_shared.get_mut(&session_id(shared))
                    && lock.claim_renewal_early(now)
                {
                    batch.push(lock.clone());
                }
            }
            for (id, batch) in due_shared {
                match self.shared_busy.get_mut(&id) {
                    Some(waiting) => waiting.extend(batch),
                    None => self.dispatch_shared(id, batch, done),
                }
            }
        }
        if !finished.is_empty() {
            let mut locks = self.locks.lock();
            for id in finished {
                locks.map.remove(&id);
            }
        }
    }

    /// Hands the renewal of `batch`, locks on shared session `id`, to a worker.
    fn dispatch_shared(&mut self, id: usize, batch: Vec<Arc<LeaseState>>, done: &Sender<Done>) {
        if batch.is_empty() {
            return;
        }
        match batch
            .first()
            .and_then(|l| l.shared())
            .and_then(Weak::upgrade)
        {
            Some(shared) => {
                self.shared_busy.insert(id, Vec::new());
                self.dispatch(Job::RenewShared(batch, shared), done);
            }
            // The session is gone: so is every lock on it (lost or released).
            None => {
                for lock in batch {
                    lock.end_renewal();
                }
            }
        }
    }

    fn dispatch(&mut self, job: Job, done: &Sender<Done>) {
        // Hand the job to an idle worker, or start one: no job ever waits
        // behind another.
        let idle = self.workers.pool.lock().idle.pop();
        let job = match idle {
            // The worker waits on that channel until it leaves the pool, and it
            // leaves only through the pool's mutex, so this cannot fail; if it
            // did, the job goes to a new worker.
            Some((_, tx)) => match tx.send(job) {
                Ok(()) => return,
                Err(e) => e.into_inner(),
            },
            None => job,
        };
        let n = self.workers.seq.fetch_add(1, Ordering::Relaxed);
        let workers = self.workers.clone();
        let done = done.clone();
        self.workers.running.fetch_add(1, Ordering::Relaxed);
        // The job travels in a slot the scheduler keeps should the spawn fail.
        let slot = Arc::new(Mutex::new(Some(job)));
        let taken = slot.clone();
        let spawned = thread::Builder::new()
            .name(format!("{}-{n}", self.name.replace("renewal", "io")))
            .spawn(move || {
                if let Some(job) = taken.lock().take() {
                    worker(n, job, &workers, &done);
                }
            });
        if let Err(e) = spawned {
            self.workers.running.fetch_sub(1, Ordering::Relaxed);
            log::error!("lockbox: could not start a renewal worker: {e}");
            // The next worker to finish a job takes it, or a worker started on
            // the next try; the deadline still fires on time whatever happens.
            if let Some(job) = slot.lock().take() {
                self.workers.pool.lock().backlog.push_back(job);
                self.retry_spawn
                    .get_or_insert_with(|| Instant::now() + SPAWN_RETRY);
            }
        }
    }
}

/// One renewal worker: runs `job`, then takes the backlog, then waits in the
/// pool for a job handed to it alone, and exits after [`WORKER_IDLE`] without one.
fn worker(id: u64, job: Job, workers: &Workers, done: &Sender<Done>) {
    let mut next = Some(job);
    while let Some(job) = next.take() {
        let mut report = Done { shared: None };
        match job {
            Job::Renew(lock) => {
                // Every outcome is recorded in the lock's state; a lost lock's
                // session is dropped by `renew` itself.
                let _: RenewOutcome = lock.renew(None, false);
                lock.end_renewal();
            }
            Job::RenewShared(locks, shared) => {
                let gone = LeaseState::renew_shared(&locks, &*shared);
                for lock in &locks {
                    lock.end_renewal();
                }
                report.shared = Some((session_id(&Arc::downgrade(&shared)), gone));
            }
            Job::Drop(lock) => {
                lock.report_pending();
                drop(lock.take_session());
            }
        }
        let _ = done.send(report);
        let rx = {
            let mut pool = workers.pool.lock();
            if let Some(job) = pool.backlog.pop_front() {
                next = Some(job);
                continue;
            }
            if pool.stopped {
                break;
            }
            // A fresh one-job channel per wait: when the pool is stopped, its
            // sender goes and the wait ends at once.
            let (tx, rx) = crossbeam_channel::bounded(1);
            pool.idle.push((id, tx));
            rx
        };
        next = match rx.recv_timeout(WORKER_IDLE) {
            Ok(job) => Some(job),
            Err(RecvTimeoutError::Disconnected) => None,
            Err(RecvTimeoutError::Timeout) => {
                let mut pool = workers.pool.lock();
                match pool.idle.iter().position(|(i, _)| *i == id) {
                    Some(at) => {
                        pool.idle.remove(at);
                        None
                    }
                    // The scheduler took this worker meanwhile: its job is on
                    // the way (or the pool stopped and the channel closed).
                    None => {
                        drop(pool);
                        rx.recv().ok()
                    }
                }
            }
        };
    }
    workers.running.fetch_sub(1, Ordering::Relaxed);
}
