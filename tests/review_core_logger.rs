//! Review of the renewal scheduler: a `log` implementation is user code, and a
//! logger that blocks (a full pipe, a hung NFS file, a bounded channel) must not
//! stop the renewals or loss signals of other locks. (Its own process: it
//! installs the global logger.)

mod common;

use std::sync::{Condvar, Mutex, OnceLock};

use common::*;
use lockbox::LostReason;

/// The lock whose loss line blocks the logger.
static BLOCK_ON: OnceLock<String> = OnceLock::new();
/// `(gate open, name of the thread blocked in the logger)`.
static GATE: Mutex<(bool, Option<String>)> = Mutex::new((false, None));
static GATE_CV: Condvar = Condvar::new();
/// The test's own thread, never blocked: it opens the gate. (A grant slower
/// than its TTL on a loaded machine is reported lost on the acquiring thread,
/// and blocking there hung the test.)
static TEST_THREAD: OnceLock<std::thread::ThreadId> = OnceLock::new();

struct BlockingLogger;

impl log::Log for BlockingLogger {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }
    fn log(&self, record: &log::Record) {
        let line = record.args().to_string();
        let Some(name) = BLOCK_ON.get() else { return };
        if TEST_THREAD.get() == Some(&std::thread::current().id()) {
            return;
        }
        if line.contains(name.as_str()) && line.contains("lost") {
            let mut gate = GATE.lock().unwrap();
            gate.1 = Some(
                std::thread::current()
                    .name()
                    .unwrap_or("unnamed")
                    .to_owned(),
            );
            GATE_CV.notify_all();
            // Blocks like a logger writing to a pipe nobody reads, until the test
            // ends (bounded: the guard below opens the gate on every exit).
            while !gate.0 {
                gate = GATE_CV.wait(gate).unwrap();
            }
        }
    }
    fn flush(&self) {}
}

/// Opens the gate when the test ends, pass or fail, so every thread finishes.
struct OpenGate;

impl Drop for OpenGate {
    fn drop(&mut self) {
        GATE.lock().unwrap().0 = true;
        GATE_CV.notify_all();
    }
}

/// Lock `a`'s renewal is stuck on its lease row until its deadline passes; the
/// line reporting its loss blocks in the logger. Lock `b`, on the same client,
/// has nothing wrong with it: it must go on being renewed. It is not: the loss
/// is reported (logged, and counted through the `metrics` facade) on the
/// renewal scheduler's own thread, so a blocking logger stops every renewal
/// and every loss signal of the client, and `b` is lost too.
#[test]
fn a_blocking_logger_does_not_stop_other_locks_renewals() {
    TEST_THREAD.set(std::thread::current().id()).unwrap();
    log::set_logger(&BlockingLogger).unwrap();
    log::set_max_level(log::LevelFilter::Warn);
    let open = OpenGate;

    // Long enough that a grant on a loaded machine is not lost on arrival.
    let ttl = ms(1500);
    let (client, _) = client(ttl);
    let (a_name, b_name) = (unique("log-a"), unique("log-b"));
    BLOCK_ON.set(a_name.clone()).unwrap();
    let a = client.try_lock(&a_name).unwrap().unwrap();
    let b = client.try_lock(&b_name).unwrap().unwrap();
    let row = RowHold::lease(&a_name);

    assert_eq!(a.lost().recv_timeout(ttl * 4), Ok(LostReason::Expired));
    // Wait for the logger to be blocked on the line reporting `a`'s loss.
    let blocked_thread = {
        let gate = GATE.lock().unwrap();
        let (gate, _) = GATE_CV
            .wait_timeout_while(gate, ttl * 4, |g| g.1.is_none())
            .unwrap();
        gate.1.clone().expect("the loss of `a` was never logged")
    };
    let renewed = client.metrics().renewals_ok;
    let kept_renewing = eventually(ttl * 2, || client.metrics().renewals_ok > renewed);
    let b_lost = b.lost().try_recv().ok();
    row.release();
    // Let the scheduler go before anything joins it.
    drop(open);
    assert!(
        kept_renewing,
        "`b` was not renewed for {:?} while the logger was blocked on thread \
         {blocked_thread:?} reporting `a`'s loss",
        ttl * 2
    );
    assert_eq!(b_lost, None, "`b` was lost because of `a`'s log line");
    assert!(b.is_held());
    drop(a);
    b.release().unwrap();
}
