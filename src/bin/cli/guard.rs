//! The guard: a small process between `lockbox exec` and the program, so
//! that the program's whole process group dies with `lockbox`, however
//! `lockbox` ends (SIGKILL included).
//!
//! `lockbox exec` starts `lockbox __lockbox-guard FD PROGRAM ARGS…` as the
//! leader of a new process group, with FD the read end of a pipe whose only
//! write end `lockbox` keeps. The guard runs PROGRAM (in its group) and
//! waits for it. When the pipe reads end-of-file — `lockbox` is gone, and the
//! kernel closed its end — the guard sends SIGKILL to its own group: the
//! program, its children, and itself. A signal that `lockbox` forwards to the
//! group reaches the guard too: it ignores those (with a handler that does
//! nothing, so the program, which it `exec`s, gets the default disposition).
//! It exits with the program's status (128 + N for signal N), which `lockbox`
//! passes on.
//!
//! The pipe also carries the lock's local deadline (on the boot-time clock,
//! in nanoseconds, 8 bytes little-endian), which `lockbox` sends again as
//! renewals move it on; the first comes as an argument. When the last one
//! passes without a later one — `lockbox` is stopped (SIGSTOP, Ctrl-Z) or
//! hung — the guard kills its group at that deadline, as `lockbox` would.

use std::ffi::OsString;
use std::io::Read;
use std::os::fd::FromRawFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use super::exec::FORWARDED;

/// The hidden first argument that makes `lockbox` the guard.
pub(crate) const GUARD_ARG: &str = "__lockbox-guard";

/// Now on the boot-time clock (which counts suspended time), in nanoseconds:
/// the clock of the library's deadlines, the same in every process.
pub(crate) fn boot_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime fills `ts`.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    (ts.tv_sec as u64).saturating_mul(1_000_000_000) + ts.tv_nsec as u64
}

pub(crate) fn main(args: Vec<OsString>) -> i32 {
    let mut args = args.into_iter();
    let Some(fd) = args
        .next()
        .and_then(|fd| fd.to_str().and_then(|fd| fd.parse::<i32>().ok()))
    else {
        eprintln!("lockbox: {GUARD_ARG} is internal to lockbox exec");
        return super::status::USAGE;
    };
    let Some(mut deadline) = args
        .next()
        .and_then(|d| d.to_str().and_then(|d| d.parse::<u64>().ok()))
    else {
        eprintln!("lockbox: {GUARD_ARG} is internal to lockbox exec");
        return super::status::USAGE;
    };
    let Some(program) = args.next() else {
        eprintln!("lockbox: {GUARD_ARG} is internal to lockbox exec");
        return super::status::USAGE;
    };
    // SAFETY: `fd` is the pipe's read end, handed over by `lockbox exec` and
    // owned by nothing else in this process.
    let mut parent = unsafe { std::fs::File::from_raw_fd(fd) };
    // Not inherited by the program.
    // SAFETY: plain fcntl on a descriptor we own.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };

    let ignored = Arc::new(AtomicBool::new(false));
    for &sig in FORWARDED {
        // A handler (not SIG_IGN): exec resets it to the default for the program.
        if let Err(e) = signal_hook::flag::register(sig, ignored.clone()) {
            eprintln!("lockbox: cannot set up the guard's signal handling: {e}");
            return super::status::FAILED;
        }
    }

    std::thread::Builder::new()
        .name("lockbox-guard".to_owned())
        .spawn(move || {
            // Ends when `lockbox` is gone (end-of-file), the pipe failed, or
            // the last deadline it sent passed without a later one (lockbox
            // stopped or hung): in each case nobody keeps the lock for the
            // group any more.
            loop {
                let now = boot_ns();
                if now >= deadline {
                    break;
                }
                // Short waits: poll's timeout does not count suspended time,
                // the boot-time clock does.
                let wait_ms = ((deadline - now) / 1_000_000).clamp(1, 50) as i32;
                let mut pfd = libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: poll on one descriptor we own.
                let ready = unsafe { libc::poll(&mut pfd, 1, wait_ms) };
                if ready < 0 {
                    if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                        continue;
                    }
                    break;
                }
                if ready == 0 {
                    continue;
                }
                let mut buf = [0u8; 8];
                if parent.read_exact(&mut buf).is_err() {
                    break;
                }
                deadline = u64::from_le_bytes(buf);
            }
            // SAFETY: kill(0, …) signals this process's own group.
            unsafe { libc::kill(0, libc::SIGKILL) };
        })
        .expect("the guard's watch thread starts");

    let mut command = Command::new(&program);
    command.args(args);
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        command.pre_exec(|| {
            // Should the guard die anyhow, so does the program.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
            Ok(())
        });
    }
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => {
            eprintln!("lockbox: cannot run {}: {e}", program.to_string_lossy());
            return if e.kind() == std::io::ErrorKind::NotFound {
                127
            } else {
                126
            };
        }
    };
    match child.wait() {
        Ok(status) => status
            .code()
            .or_else(|| status.signal().map(|s| 128 + s))
            .unwrap_or(super::status::FAILED),
        Err(e) => {
            eprintln!("lockbox: cannot wait for the program: {e}");
            super::status::FAILED
        }
    }
}
