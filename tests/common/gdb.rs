//! gdb driving a PostgreSQL backend, to make a race certain: an operator's
//! cancel landing on one exact statement, or a connection ending just after
//! a commit.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// `ROLLBACK`'s eight bytes as gdb reads `debug_query_string`'s first word.
const ROLLBACK: &str = "0x4B4341424C4C4F52";

/// `COMMIT` and its terminating NUL, as gdb reads `debug_query_string`'s
/// first word masked to seven bytes.
const COMMIT: &str = "0x54494D4D4F43";

/// Attaches gdb to backend `pid` so that the first `ROLLBACK` it is sent is
/// cancelled: gdb holds the backend in that statement's parse and queues
/// SIGINT (what a cancel request sends), which the backend takes at the
/// statement's first interrupt check, before the `ROLLBACK` runs. Returns
/// once gdb has attached and let the backend go on; `said` tells whether
/// the breakpoint was hit.
pub fn cancel_first_rollback(pid: i32) -> Child {
    attach(
        pid,
        &[
            &format!("break pg_parse_query if *(long*)*(char**)&debug_query_string == {ROLLBACK}"),
            "continue",
            "delete",
            "queue-signal SIGINT",
            "detach",
        ],
    )
}

/// Attaches gdb to backend `pid` so that its connection ends once its first
/// `COMMIT` has committed, before the answer is sent: gdb holds the backend
/// where the statement's completion is reported (`EndCommand`, after the
/// commit) and shuts its client socket down (the first field of
/// `MyProcPort` is the socket), so the client reads the end of the
/// connection instead of the answer. Returns once gdb has attached.
pub fn end_connection_at_first_commit(pid: i32) -> Child {
    attach(
        pid,
        &[
            &format!(
                "break EndCommand if (*(long*)*(char**)&debug_query_string \
                 & 0xFFFFFFFFFFFFFF) == {COMMIT}"
            ),
            "continue",
            "delete",
            "print (int)shutdown(*(int*)*(void**)&MyProcPort, 2)",
            "detach",
        ],
    )
}

/// Attaches gdb to backend `pid` so that its first `COMMIT` is never run:
/// gdb holds the backend in that statement's parse until the file `gate`
/// exists, then queues SIGTERM (what `pg_terminate_backend` sends), which
/// the backend takes at the statement's first interrupt check: it answers
/// FATAL (57P01) and rolls the transaction back. Returns once gdb has
/// attached; [`stopped`] tells when the backend is held.
pub fn terminate_at_first_commit(pid: i32, gate: &std::path::Path) -> Child {
    attach(
        pid,
        &[
            &format!(
                "break pg_parse_query if (*(long*)*(char**)&debug_query_string \
                 & 0xFFFFFFFFFFFFFF) == {COMMIT}"
            ),
            "continue",
            "delete",
            &format!(
                "shell while [ ! -e {g} ]; do sleep 0.02; done",
                g = gate.display()
            ),
            "queue-signal SIGTERM",
            "detach",
        ],
    )
}

/// Attaches gdb to backend `pid` so that its connection ends as its first
/// `COMMIT` arrives, and the `COMMIT` runs only later: gdb holds the backend
/// in that statement's parse, shuts its client socket down (the client reads
/// the end of the connection), and lets it go on once the file `gate`
/// exists; the `COMMIT` then commits, its answer lost. Returns once gdb has
/// attached.
pub fn cut_off_at_first_commit(pid: i32, gate: &std::path::Path) -> Child {
    attach(
        pid,
        &[
            &format!(
                "break pg_parse_query if (*(long*)*(char**)&debug_query_string \
                 & 0xFFFFFFFFFFFFFF) == {COMMIT}"
            ),
            "continue",
            "delete",
            "print (int)shutdown(*(int*)*(void**)&MyProcPort, 2)",
            &format!(
                "shell while [ ! -e {g} ]; do sleep 0.02; done",
                g = gate.display()
            ),
            "detach",
        ],
    )
}

/// Whether backend `pid` is held by its tracer (at a breakpoint).
pub fn stopped(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("State:") && l.contains("t (tracing stop)"))
}

/// Runs gdb's `commands` on backend `pid` (a breakpoint, and what to do
/// there), and returns once it has attached and the backend waits for its
/// client again.
fn attach(pid: i32, commands: &[&str]) -> Child {
    let mut gdb = Command::new("timeout");
    gdb.args(["20", "gdb", "-nx", "-p", &pid.to_string(), "-batch"])
        .args(["-ex", "handle all nostop noprint pass"])
        .args(["-ex", "handle SIGINT nostop noprint pass"]);
    for c in commands {
        gdb.args(["-ex", c]);
    }
    let child = gdb
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("gdb (Debian's package gdb) runs");
    let waits = || {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let traced = status
            .lines()
            .any(|l| l.starts_with("TracerPid:") && l.split_whitespace().nth(1) != Some("0"));
        let sleeping = status
            .lines()
            .any(|l| l.starts_with("State:") && l.contains("S ("));
        traced && sleeping
    };
    assert!(
        super::eventually(Duration::from_secs(10), waits),
        "gdb never attached to backend {pid}"
    );
    child
}

/// Waits for gdb to end; panics unless its breakpoint was hit.
///
/// That the cancel then lands on the `ROLLBACK` (and not on a later
/// statement) is not checked here: each test using this was seen failing
/// with 25P02 with its fix reverted, and the server's log said `canceling
/// statement due to user request` for `ROLLBACK` (review helper-74). A
/// temporary breakpoint at `ProcessInterrupts` to show it is not hit from
/// that statement's check on Debian's build (a later statement's lock wait
/// hits it), so it cannot be used for that.
pub fn said_hit(gdb: Child) {
    let out = gdb.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("Breakpoint 1,"), "gdb: {out:?}");
}
