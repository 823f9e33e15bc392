//! The renewal thread: one per client, keeps every held lock's lease alive.
//!
//! It sleeps in `select!` on a command channel and a timer set to the earliest due
//! renewal (or deadline), renews each due lock on that lock's own session, and
//! marks a lock lost when its session is gone, its lease is no longer ours, or its
//! local deadline passes. It holds only the per-lock state, never the client, so
//! it cannot keep the client alive; it exits when the client's sender is dropped
//! and is joined there.

use std::collections::HashMap;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, select};
use parking_lot::Mutex;

use crate::error::LostReason;
use crate::lease::{LeaseState, RenewOutcome};

/// How long the thread sleeps when it has nothing to renew. It then wakes by
/// itself, so registering a lock whose first renewal is further away than the
/// planned wake-up (30 s TTLs renew after 10 s) needs no wake-up message: the
/// common acquire costs the caller no cross-thread signal.
const IDLE_WAKE: Duration = Duration::from_secs(1);

/// The held locks, shared with the client (for health) and read by the thread
/// only long enough to copy what is due: never across I/O.
type Registry = Arc<Mutex<Locks>>;

#[derive(Debug, Default)]
struct Locks {
    map: HashMap<u64, Arc<LeaseState>>,
    /// Test-only: renewals suspended (as in a frozen process); deadlines still pass.
    paused: bool,
    /// When the thread will next wake by itself (`None`: it is computing it).
    planned: Option<Instant>,
    /// Set when the thread has ended: nothing registered now would be renewed.
    stopped: bool,
}

#[derive(Debug)]
enum Command {
    /// The set of locks or a schedule changed: recompute the next wake-up.
    Wake,
    #[cfg(any(test, feature = "test-support"))]
    Panic,
}

/// The client's handle on its renewal thread.
#[derive(Debug)]
pub(crate) struct Renewer {
    locks: Registry,
    tx: Option<Sender<Command>>,
    thread: Option<JoinHandle<()>>,
}

impl Renewer {
    pub fn spawn(name: String) -> std::io::Result<Renewer> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let locks = Registry::default();
        let shared = locks.clone();
        let thread = thread::Builder::new()
            .name(name)
            .spawn(move || run(&shared, &rx))?;
        Ok(Renewer {
            locks,
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// Starts renewing `lock`. Fails when the thread is no longer running.
    pub fn register(&self, lock: Arc<LeaseState>) -> Result<(), ()> {
        let id = lock.id;
        let due = lock.due();
        let wake = {
            let mut locks = self.locks.lock();
            if locks.stopped {
                return Err(());
            }
            locks.map.insert(id, lock);
            // Under the same mutex the thread publishes its plan with, so no
            // registration can slip between its plan and its sleep.
            match (due, locks.planned) {
                (Some(due), Some(planned)) => due < planned,
                _ => true,
            }
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

    /// Whether the thread is still running.
    pub fn is_alive(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
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
}

impl Drop for Renewer {
    fn drop(&mut self) {
        // Dropping the only sender is the shutdown signal.
        self.tx = None;
        if let Some(thread) = self.thread.take() {
            // The thread never holds the client, so this drop cannot run on it; the
            // check only guards against a future change breaking that.
            if thread.thread().id() != thread::current().id() && thread.join().is_err() {
                log::error!("lockbox: the renewal thread had panicked");
            }
        }
    }
}

/// Runs when the thread ends, normally or by a panic: any lock still registered
/// can no longer be renewed and is marked lost.
struct StopGuard<'a>(&'a Registry);

impl Drop for StopGuard<'_> {
    fn drop(&mut self) {
        if thread::panicking() {
            log::error!("lockbox: the renewal thread panicked; marking every held lock lost");
        }
        let orphans: Vec<Arc<LeaseState>> = {
            let mut locks = self.0.lock();
            locks.stopped = true;
            locks.map.drain().map(|(_, l)| l).collect()
        };
        for lock in orphans {
            lock.mark_lost(LostReason::RenewalStopped);
            // Free the advisory lock at once rather than when the guard goes.
            drop(lock.take_session());
        }
    }
}

fn run(locks: &Registry, rx: &Receiver<Command>) {
    let _stop = StopGuard(locks);
    loop {
        let next = {
            let mut locks = locks.lock();
            let idle = Instant::now() + IDLE_WAKE;
            // While paused (tests only), wake for deadlines rather than renewals.
            let paused = locks.paused;
            let next = locks
                .map
                .values()
                .filter_map(|l| if paused { l.deadline() } else { l.due() })
                .min()
                .map_or(idle, |d| d.min(idle));
            locks.planned = Some(next);
            next
        };
        let timer = crossbeam_channel::at(next);
        select! {
            recv(rx) -> cmd => match cmd {
                Ok(Command::Wake) => {}
                #[cfg(any(test, feature = "test-support"))]
                Ok(Command::Panic) => panic!("lockbox: renewal thread panic injected by a test"),
                Err(_) => return,
            },
            recv(timer) -> _ => {}
        }
        locks.lock().planned = None;
        renew_due(locks);
    }
}

fn renew_due(locks: &Registry) {
    let now = Instant::now();
    let due: Vec<Arc<LeaseState>> = {
        let locks = locks.lock();
        if locks.paused {
            // Renewals suspended: only latch the losses whose deadlines passed.
            for lock in locks.map.values() {
                let _ = lock.check();
            }
            return;
        }
        locks
            .map
            .values()
            .filter(|l| l.due().is_none_or(|at| at <= now))
            .cloned()
            .collect()
    };
    for lock in due {
        if let RenewOutcome::Finished = lock.renew(None, false) {
            locks.lock().map.remove(&lock.id);
        }
    }
}
