//! Review of multiplexed sessions: when a shared session's batch renewal finds
//! the session gone, the scheduler marks every *other* lock on it lost
//! (`finished_shared` -> `mark_lost`) on its own thread, and reporting that loss
//! runs the user's logger and metrics recorder there. A logger that blocks then
//! stops every renewal and loss signal of the client, for locks on other
//! sessions too. (Its own process: it installs the global logger.)

mod common;

use std::sync::{Condvar, Mutex, OnceLock};

use common::*;
use lockbox::AcquireOptions;

static BLOCK_ON: OnceLock<String> = OnceLock::new();
/// `(gate open, name of the thread blocked in the logger)`.
static GATE: Mutex<(bool, Option<String>)> = Mutex::new((false, None));
static GATE_CV: Condvar = Condvar::new();

struct BlockingLogger;

impl log::Log for BlockingLogger {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }
    fn log(&self, record: &log::Record) {
        let line = record.args().to_string();
        let Some(name) = BLOCK_ON.get() else { return };
        if line.contains(name.as_str()) && line.contains("lost") {
            let mut gate = GATE.lock().unwrap();
            gate.1 = Some(
                std::thread::current()
                    .name()
                    .unwrap_or("unnamed")
                    .to_owned(),
            );
            GATE_CV.notify_all();
            while !gate.0 {
                gate = GATE_CV.wait(gate).unwrap();
            }
        }
    }
    fn flush(&self) {}
}

struct OpenGate;

impl Drop for OpenGate {
    fn drop(&mut self) {
        GATE.lock().unwrap().0 = true;
        GATE_CV.notify_all();
    }
}

#[test]
fn a_blocking_logger_on_a_gone_shared_session_does_not_stop_other_sessions_renewals() {
    log::set_logger(&BlockingLogger).unwrap();
    log::set_max_level(log::LevelFilter::Warn);
    let open = OpenGate;

    let app = unique("mux-gonelog");
    let ttl = ms(600);
    let client = builder_for(&app).ttl(ttl).build().unwrap();
    let (a_name, b_name, c_name) = (unique("gl-a"), unique("gl-b"), unique("gl-c"));
    BLOCK_ON.set(b_name.clone()).unwrap();
    let a = client.try_lock(&a_name).unwrap().unwrap();
    let b = client.try_lock(&b_name).unwrap().unwrap();
    let pid = holder_pid(&a_name);
    assert_eq!(holder_pid(&b_name), pid, "a and b on one shared session");
    // `b` is renewed rarely from now on: it is not in `a`'s next batch.
    b.extend(ms(30_000)).unwrap();
    // `c` on a session of its own, with nothing wrong with it.
    let c = client
        .acquire(&c_name, &AcquireOptions::new().dedicated_session(true))
        .unwrap()
        .unwrap();
    assert_ne!(holder_pid(&c_name), pid);

    terminate(pid);
    // `a`'s next batch finds the session gone; `b` is marked lost with it.
    assert!(
        a.lost().recv_timeout(ttl * 3).is_ok(),
        "a lost with its session"
    );
    let blocked_thread = {
        let gate = GATE.lock().unwrap();
        let (gate, _) = GATE_CV
            .wait_timeout_while(gate, ttl * 4, |g| g.1.is_none())
            .unwrap();
        gate.1.clone().expect("the loss of `b` was never logged")
    };
    let renewed = client.metrics().renewals_ok;
    let kept_renewing = eventually(ttl * 2, || client.metrics().renewals_ok > renewed);
    let c_held = c.is_held();
    drop(open);
    assert!(
        kept_renewing && c_held,
        "`c` (another session) was not renewed for {:?} (held: {c_held}) while the logger \
         was blocked on thread {blocked_thread:?} reporting `b`'s loss",
        ttl * 2
    );
    drop((a, b));
    c.release().unwrap();
}
