//! `lockbox exec`: run a program under a lock.
//!
//! # What is guaranteed, and how
//!
//! - The program runs only while the lock is held: it is started after the
//!   grant, and the lock is released only after its whole process group is
//!   dead and reaped (`lockbox` is a child subreaper, so the group's orphans
//!   become its children and are waited for).
//! - **Renewals failing** (the store unreachable): when only the kill grace
//!   is left before the lock's local deadline, the group gets SIGTERM, and
//!   SIGKILL at the deadline. The library keeps the local deadline ahead of
//!   the store's lease (by 1 % of the TTL + 2 ms, and measured from before
//!   each renewal was sent), so the group is killed before the lease could
//!   be granted to anyone else; that margin is the time the kernel has to end
//!   a killed process (one stuck in uninterruptible I/O may outlive it).
//!   lockbox then exits 74, even if a late renewal succeeds.
//! - **A loss the store reports** (the lease taken over or released by force,
//!   the holder's session ended): the lease may already be someone else's,
//!   so there is no grace: the group gets SIGKILL at once, and lockbox exits
//!   74. The store reports it at the next renewal (within a third of the TTL)
//!   or, at the latest, at the local deadline.
//! - **lockbox dies** (SIGKILL included): the guard (see `guard.rs`) sees its
//!   pipe close and kills the group. **lockbox stopped or hung** (SIGSTOP,
//!   Ctrl-Z): lockbox keeps the guard told of the lock's deadline as renewals
//!   move it; when the last one passes with no later one, the guard kills
//!   the group there (SIGKILL, no grace).
//! - Not covered: processes that leave the group (`setsid`, `setpgid`). The
//!   group is not made the terminal's foreground group: a program run from
//!   an interactive shell that reads the terminal is stopped (SIGTTIN).
//!   Pipes, files and cron are unaffected.

use std::ffi::OsString;
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{never, select};
use lockbox::{AcquireOptions, LeaseStatus, Lock, LockClient};
use parking_lot::Mutex;
use signal_hook::consts::{SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGUSR1, SIGUSR2};
use signal_hook::iterator::Signals;

use super::guard::GUARD_ARG;
use super::{Cli, ExecArgs, Exit, LockArgs, connect, human, status};

/// The signals forwarded to the program's process group.
pub(crate) const FORWARDED: &[i32] = &[SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2];

/// The default kill grace: a quarter of the TTL, at most this.
const MAX_DEFAULT_GRACE: Duration = Duration::from_secs(10);

pub(crate) fn run(cli: &Cli, args: &ExecArgs) -> Result<i32, Exit> {
    let ttl = args.lock.ttl;
    let grace = match args.kill_grace {
        Some(grace) if grace > ttl / 2 => {
            return Err(Exit::usage(format!(
                "--kill-grace {} is more than half the TTL ({}): the program would be stopped \
                 between two renewals that work",
                human(grace),
                human(ttl)
            )));
        }
        Some(grace) => grace,
        None => (ttl / 4).min(MAX_DEFAULT_GRACE),
    };
    let program = &args.program[0];
    let metadata = args.lock.metadata.clone().unwrap_or_else(|| {
        let mut m = format!("lockbox exec {}", program.to_string_lossy());
        m.truncate(200);
        m
    });
    let client = connect(cli, Some(ttl))?;
    let lock = acquire(&client, &args.name, &args.lock, metadata)?;
    let status = Supervisor::start(&lock, &args.program, grace)?.supervise(&lock)?;
    finish(client, lock);
    Ok(status)
}

/// Releases a lock still held (the program and its group are gone), waiting
/// for the store no longer than the lock's deadline plus a second. A lost
/// lock has nothing to release. Neither the lock nor its client is dropped:
/// either could wait for a renewal stuck on a store that stopped answering
/// (whose loss was reported at the deadline, the statement still in flight);
/// the process's end closes their connections, and a lease whose release was
/// not confirmed runs out at its expiry.
pub(crate) fn finish(client: LockClient, lock: Lock) {
    if !lock.is_held() {
        std::mem::forget(lock);
        std::mem::forget(client);
        return;
    }
    let name = lock.name().to_owned();
    let limit = lock.time_left() + Duration::from_secs(1);
    let (tx, rx) = crossbeam_channel::bounded(1);
    let released = std::thread::Builder::new()
        .name("lockbox-release".to_owned())
        .spawn(move || {
            let _ = tx.send(lock.release());
        });
    let outcome = match released {
        Ok(_) => rx.recv_timeout(limit).ok(),
        Err(_) => None,
    };
    match outcome {
        Some(Ok(())) => {}
        Some(Err(e)) => {
            eprintln!("lockbox: releasing lock {name:?}: {e} (its lease ends at its expiry)")
        }
        None => eprintln!(
            "lockbox: the store did not confirm the release of lock {name:?} (its lease ends \
             at its expiry)"
        ),
    }
    std::mem::forget(client);
}

/// Takes the lock as `args` say: once at once; then, saying who holds it
/// (unless quiet), waiting as `--wait` allows.
pub(crate) fn acquire(
    client: &LockClient,
    name: &str,
    args: &LockArgs,
    metadata: String,
) -> Result<Lock, Exit> {
    let opts = AcquireOptions::new().ttl(args.ttl).metadata(metadata);
    let failed = |e: lockbox::Error| Exit::from_error(&format!("cannot acquire lock {name:?}"), &e);
    if let Some(lock) = client.acquire(name, &opts).map_err(failed)? {
        return Ok(lock);
    }
    if !args.quiet {
        eprintln!("lockbox: {}", holder(client, name));
    }
    let opts = match args.wait {
        Some(wait) if wait.is_zero() => {
            return Err(Exit {
                status: status::NOT_ACQUIRED,
                message: Some(format!("lock {name:?} not acquired (--wait 0)")),
            });
        }
        Some(wait) => opts.wait(wait),
        None => opts.wait_forever(),
    };
    match client.acquire(name, &opts).map_err(failed)? {
        Some(lock) => Ok(lock),
        None => Err(Exit {
            status: status::NOT_ACQUIRED,
            message: Some(format!(
                "lock {name:?} not acquired within --wait {}",
                human(args.wait.unwrap_or_default())
            )),
        }),
    }
}

/// Who holds `name`, for a waiter.
fn holder(client: &LockClient, name: &str) -> String {
    let info = match client.lease(name) {
        Ok(Some(info)) => info,
        Ok(None) => return format!("waiting for lock {name:?} (being granted to someone)"),
        Err(e) => return format!("waiting for lock {name:?} (its holder cannot be read: {e})"),
    };
    let since = SystemTime::now()
        .duration_since(info.acquired_at)
        .unwrap_or_default();
    let meta = info
        .metadata
        .as_deref()
        .filter(|m| !m.is_empty())
        .map(|m| format!(", metadata {m:?}"))
        .unwrap_or_default();
    let state = match info.status {
        LeaseStatus::Held { expires_in } => {
            format!("expires in {} unless renewed", human(expires_in))
        }
        LeaseStatus::Expired { .. } => "its lease has expired; waiting for its session".to_owned(),
        LeaseStatus::Released { .. } => "released just now".to_owned(),
    };
    format!(
        "waiting for lock {name:?}: held by {} (token {}{meta}) for {}; {state}",
        info.owner,
        info.fencing_token,
        human(since)
    )
}

/// Whether signals may still be sent to the group: false once lockbox is
/// about to reap its last member (after which its id may be reused).
type GroupOpen = Arc<Mutex<bool>>;

struct Supervisor {
    /// The guard's pid: the process group's id.
    pgid: libc::pid_t,
    /// The write end of the guard's pipe: open as long as lockbox lives.
    pipe: std::fs::File,
    open: GroupOpen,
    /// Fires when the guard has exited (not yet reaped).
    exited: crossbeam_channel::Receiver<()>,
    signals: signal_hook::iterator::Handle,
    grace: Duration,
}

/// The lock's deadline (boot-time ns) now: the clock is read before
/// `time_left`, so it is never later than the real one.
fn deadline_ns(lock: &Lock) -> u64 {
    let now = super::guard::boot_ns();
    now.saturating_add(u64::try_from(lock.time_left().as_nanos()).unwrap_or(u64::MAX))
}

/// How the supervision ended.
enum Ending {
    /// The program exited by itself.
    Exited,
    /// lockbox stopped it because the lock was (about to be) lost.
    Stopped,
}

impl Supervisor {
    /// Starts the guard (and through it the program) in a new process group.
    fn start(lock: &Lock, program: &[OsString], grace: Duration) -> Result<Supervisor, Exit> {
        let fail =
            |what: &str, e: std::io::Error| Exit::new(status::FAILED, format!("{what}: {e}"));
        // Orphans of the group become lockbox's children, so they can be
        // waited for (reaped) before the lock is released.
        // SAFETY: prctl with integer arguments.
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1) };
        // Registered before the program starts: a signal from now on is
        // forwarded, never lost.
        let mut signals =
            Signals::new(FORWARDED).map_err(|e| fail("cannot set up signal handling", e))?;
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two descriptors into `fds`.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(fail(
                "cannot create a pipe",
                std::io::Error::last_os_error(),
            ));
        }
        let [read_fd, write_fd] = fds;
        // SAFETY: both descriptors were just created and are owned here.
        let (read_end, write_end) = unsafe {
            use std::os::fd::FromRawFd;
            (
                std::fs::File::from_raw_fd(read_fd),
                std::fs::File::from_raw_fd(write_fd),
            )
        };
        // This very executable, even if its file was replaced or removed
        // since it started (an upgrade while a job runs).
        let mut command = Command::new("/proc/self/exe");
        command
            .arg(GUARD_ARG)
            .arg(read_fd.to_string())
            .arg(deadline_ns(lock).to_string())
            .args(program)
            .env("LOCKBOX_NAME", lock.name())
            .env("LOCKBOX_TOKEN", lock.fencing_token().to_string())
            .env("LOCKBOX_TTL_MS", lock.ttl().as_millis().to_string())
            .process_group(0);
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            command.pre_exec(move || {
                // The guard inherits the read end (and only it).
                if libc::fcntl(read_fd, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let guard = command
            .spawn()
            .map_err(|e| fail("cannot start the program's guard", e))?;
        drop(read_end);
        let pgid = guard.id() as libc::pid_t;
        // The std handle is not used to wait: the guard is waited for without
        // reaping it (below), so its pid, the group's id, cannot be reused
        // while signals may still be sent to the group.
        std::mem::forget(guard);

        let open: GroupOpen = Arc::new(Mutex::new(true));
        let handle = signals.handle();
        let forward_open = open.clone();
        std::thread::Builder::new()
            .name("lockbox-signals".to_owned())
            .spawn(move || {
                for sig in signals.forever() {
                    let open = forward_open.lock();
                    if *open {
                        // SAFETY: kill with a negative pid signals the group.
                        unsafe { libc::kill(-pgid, sig) };
                    }
                }
            })
            .map_err(|e| fail("cannot start the signal thread", e))?;

        let (tx, exited) = crossbeam_channel::bounded(1);
        std::thread::Builder::new()
            .name("lockbox-wait".to_owned())
            .spawn(move || {
                loop {
                    // SAFETY: waitid fills `info`; WNOWAIT leaves the guard unreaped.
                    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
                    let r = unsafe {
                        libc::waitid(
                            libc::P_PID,
                            pgid as libc::id_t,
                            &mut info,
                            libc::WEXITED | libc::WNOWAIT,
                        )
                    };
                    if r == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR)
                    {
                        break;
                    }
                }
                let _ = tx.send(());
            })
            .map_err(|e| fail("cannot start the wait thread", e))?;

        // The guard is told of the lock's deadline as renewals move it on,
        // by a thread of `supervise`. Never blocking: when the guard does not
        // read (stopped), a deadline is skipped, never waited on.
        // SAFETY: fcntl on a descriptor we own.
        unsafe { libc::fcntl(write_fd, libc::F_SETFL, libc::O_NONBLOCK) };
        Ok(Supervisor {
            pgid,
            pipe: write_end,
            open,
            exited,
            signals: handle,
            grace,
        })
    }

    fn signal(&self, sig: i32) {
        let open = self.open.lock();
        if *open {
            // SAFETY: kill with a negative pid signals the group.
            unsafe { libc::kill(-self.pgid, sig) };
        }
    }

    /// Waits for the program, stopping it if the lock is (about to be) lost;
    /// then kills what is left of its group, reaps it, and releases the lock.
    fn supervise(self, lock: &Lock) -> Result<i32, Exit> {
        let done = AtomicBool::new(false);
        let every = (lock.ttl() / 10).clamp(Duration::from_millis(1), Duration::from_millis(50));
        let pipe = self
            .pipe
            .try_clone()
            .map_err(|e| Exit::new(status::FAILED, format!("cannot share the pipe: {e}")))?;
        std::thread::scope(|s| {
            let done = &done;
            std::thread::Builder::new()
                .name("lockbox-deadline".to_owned())
                .spawn_scoped(s, move || {
                    // While the lock is held; after a loss the deadline stays
                    // where it was, and the guard kills the group there if
                    // lockbox has not.
                    while !done.load(Ordering::Relaxed) && lock.is_held() {
                        let _ = (&pipe).write(&deadline_ns(lock).to_le_bytes());
                        std::thread::sleep(every);
                    }
                })
                .map_err(|e| Exit::new(status::FAILED, format!("cannot start a thread: {e}")))?;
            let status = self.watch(lock);
            done.store(true, Ordering::Relaxed);
            Ok(status)
        })
    }

    fn watch(self, lock: &Lock) -> i32 {
        let name = lock.name().to_owned();
        let lost = lock.lost();
        let mut lost_rx = &lost;
        let never_lost = never();
        let mut ending = Ending::Exited;
        // Set once the program is being stopped ahead of the deadline: when
        // SIGKILL is due.
        let mut kill_at: Option<Instant> = None;
        loop {
            let timer = match (&ending, kill_at) {
                (_, Some(at)) => crossbeam_channel::at(at),
                // Killed: only the group's end is awaited.
                (Ending::Stopped, None) => never(),
                (Ending::Exited, None) => crossbeam_channel::at(
                    Instant::now() + lock.time_left().saturating_sub(self.grace),
                ),
            };
            select! {
                recv(self.exited) -> _ => break,
                recv(lost_rx) -> reason => {
                    // The lease may be someone else's already: no grace.
                    let reason = reason.map_or_else(|_| "the lock's client stopped".to_owned(), |r| r.to_string());
                    eprintln!(
                        "lockbox: lock {name:?} was lost ({reason}): killing the program's process group"
                    );
                    self.signal(libc::SIGKILL);
                    ending = Ending::Stopped;
                    lost_rx = &never_lost;
                    kill_at = None;
                }
                recv(timer) -> _ => {
                    let left = lock.time_left();
                    match kill_at {
                        Some(at) if Instant::now() >= at => {
                            eprintln!(
                                "lockbox: lock {name:?} reached its deadline: killing the program's process group"
                            );
                            self.signal(libc::SIGKILL);
                            kill_at = None;
                        }
                        Some(_) => {}
                        None if left <= self.grace => {
                            eprintln!(
                                "lockbox: lock {name:?} is not being renewed and has {} left before \
                                 its deadline: stopping the program (SIGTERM, then SIGKILL at the deadline)",
                                human(left)
                            );
                            self.signal(libc::SIGTERM);
                            ending = Ending::Stopped;
                            kill_at = Some(Instant::now() + left);
                        }
                        None => {}
                    }
                }
            }
        }
        let code = self.reap();
        let held = lock.is_held();
        match ending {
            Ending::Stopped => status::LOST,
            Ending::Exited if !held => {
                eprintln!(
                    "lockbox: lock {name:?} was lost ({}) while the program ran",
                    lock.lost_reason()
                        .map_or_else(|| "its deadline passed".to_owned(), |r| r.to_string())
                );
                status::LOST
            }
            Ending::Exited => code,
        }
    }

    /// Kills what is left of the group once the guard has exited, reaps the
    /// guard and every member that is lockbox's child (all the group's
    /// orphans, lockbox being a subreaper), and returns the guard's status.
    fn reap(self) -> i32 {
        {
            let mut open = self.open.lock();
            // The guard is a zombie, so the group's id is still taken: this
            // reaches only the program's leftovers.
            // SAFETY: kill with a negative pid signals the group.
            unsafe { libc::kill(-self.pgid, libc::SIGKILL) };
            *open = false;
        }
        self.signals.close();
        // Nothing is left to forward to: signals act on lockbox again (a
        // SIGTERM during a slow release ends it; the lease then runs out).
        for &sig in FORWARDED {
            // SAFETY: resets a disposition; signal-hook's handler is not
            // needed any more.
            unsafe { libc::signal(sig, libc::SIG_DFL) };
        }
        let mut code = status::FAILED;
        let mut wstatus = 0;
        // SAFETY: waitpid on our own child.
        if unsafe { libc::waitpid(self.pgid, &mut wstatus, 0) } == self.pgid {
            code = if libc::WIFEXITED(wstatus) {
                libc::WEXITSTATUS(wstatus)
            } else if libc::WIFSIGNALED(wstatus) {
                128 + libc::WTERMSIG(wstatus)
            } else {
                status::FAILED
            };
        }
        // Every other member of the group that is our child; ECHILD when none
        // is left.
        loop {
            // SAFETY: as above.
            let r = unsafe { libc::waitpid(-self.pgid, &mut wstatus, 0) };
            if r > 0 {
                continue;
            }
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            break;
        }
        code
    }
}
