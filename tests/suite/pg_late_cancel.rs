//! A review of the watchdog's tainted sessions (helper-68) found a late
//! cancel (one sent for a statement past its bound, still on its way when
//! the statement had ended and the absorbing sleep too) failing whatever the
//! session ran next: a tainted session keeps serving the acquire under way
//! and the lock it grants, so the acquire's next statement, or the lock's
//! `release()`, failed with "canceling statement due to user request". A
//! 57014 on a tainted session is now taken as that cancel: the acquire
//! treats it as a lock wait that ran out, a release sends its statement
//! again, within the lease's time.
//!
//! Here a proxy holds the watchdog's cancel back until the statement it is
//! to land on has been sent, and a trigger scripts the updates of the name's
//! lease row (stalled past the bound, failed as a row wait): each run saw
//! the late cancel land where it was aimed.

use crate::common;

use std::thread;
use std::time::Duration;

use common::*;
use lockbox::{AcquireOptions, Lock, LockClient};

use super::review_pg_row_wait_takeover::{assert_key_left_free, is_cancel_request, proxied};

/// A trigger scripting the updates of one name's lease row by attempt (1,
/// 2, …: a sequence counts each one, a cancelled one too). An attempt
/// scripted to `stall` waits until let go (at most 20 s) or cancelled; one
/// scripted to `fail` then fails as a row wait that ran out (55P03).
struct Script {
    table: String,
    db: postgres::Client,
}

impl Script {
    fn install(table: &str, name: &str) -> Script {
        let mut db = admin();
        db.batch_execute(&format!(
            "CREATE TABLE public.{table}_script (attempt int8, what text); \
             CREATE SEQUENCE public.{table}_attempts; \
             CREATE FUNCTION public.{table}_scripted() RETURNS trigger LANGUAGE plpgsql AS $$ \
             DECLARE n int8; since timestamptz := pg_catalog.clock_timestamp(); BEGIN \
                 IF NEW.name = '{name}' THEN \
                     n := pg_catalog.nextval('public.{table}_attempts'); \
                     WHILE EXISTS (SELECT 1 FROM public.{table}_script \
                                   WHERE attempt = n AND what = 'stall') \
                           AND pg_catalog.clock_timestamp() < since + interval '20 s' LOOP \
                         PERFORM pg_catalog.pg_sleep(0.01); \
                     END LOOP; \
                     IF EXISTS (SELECT 1 FROM public.{table}_script \
                                WHERE attempt = n AND what = 'fail') THEN \
                         RAISE EXCEPTION 'a scripted row wait' USING ERRCODE = '55P03'; \
                     END IF; \
                 END IF; \
                 RETURN NEW; \
             END $$; \
             CREATE TRIGGER scripted BEFORE UPDATE ON public.{table} \
                 FOR EACH ROW EXECUTE FUNCTION public.{table}_scripted()"
        ))
        .unwrap();
        Script {
            table: table.to_owned(),
            db,
        }
    }

    fn set(&mut self, attempt: i64, what: &str) {
        self.db
            .execute(
                &format!("INSERT INTO public.{}_script VALUES ($1, $2)", self.table),
                &[&attempt, &what],
            )
            .unwrap();
    }

    /// Lets a stalled attempt go on.
    fn let_go(&mut self, attempt: i64) {
        self.db
            .execute(
                &format!(
                    "DELETE FROM public.{}_script WHERE attempt = $1 AND what = 'stall'",
                    self.table
                ),
                &[&attempt],
            )
            .unwrap();
    }

    /// How many attempts have begun.
    fn attempts(&mut self) -> i64 {
        self.db
            .query_one(
                &format!(
                    "SELECT CASE WHEN is_called THEN last_value ELSE 0 END \
                     FROM public.{}_attempts",
                    self.table
                ),
                &[],
            )
            .unwrap()
            .get(0)
    }
}

/// B through a proxy that holds the watchdog's cancel back; the script of
/// `name`'s row.
struct HeldCancel {
    proxy: common::proxy::Proxy,
    b: LockClient,
    script: Script,
    /// B's application name.
    app: String,
    /// A session through the proxy, whose statement lets the cancel go.
    poke: postgres::Client,
}

const LET_GO: &str = "SELECT 'let the cancel go'";

impl HeldCancel {
    fn new(name: &str, ttl: Duration) -> HeldCancel {
        let (proxy, table, b, app) = proxied(false, &[name], |b| b.ttl(ttl).pool_size(1));
        let script = Script::install(&table, name);
        let poke = postgres::Client::connect(
            &format!("{} sslmode=disable", proxy.app_url(&unique("poke"))),
            postgres::NoTls,
        )
        .unwrap();
        proxy.hold_until(is_cancel_request, |piece| {
            piece.windows(LET_GO.len()).any(|w| w == LET_GO.as_bytes())
        });
        HeldCancel {
            proxy,
            b,
            script,
            app,
            poke,
        }
    }

    /// Waits for the watchdog's cancel to be held.
    fn wait_for_the_cancel(&self) {
        assert!(
            eventually(Duration::from_secs(10), || self.proxy.held() > 0),
            "the watchdog sent no cancel"
        );
    }

    /// Once `attempt` has begun (and stalls), lets the held cancel go: it
    /// lands on that attempt. (Let go as the statement is sent, it may
    /// arrive before the session has read it: the server then drops it.)
    fn cancel_attempt(&mut self, attempt: i64) {
        assert!(
            eventually(Duration::from_secs(10), || self.script.attempts()
                >= attempt),
            "attempt {attempt} never began"
        );
        let_the_cancel_go(&mut self.poke, &self.proxy);
    }
}

/// A try whose grant stalls past its bound (attempt 1; the cancel is held)
/// is granted once let go, on a session left tainted; its release (attempt
/// 2) stalls, and the held cancel lands on it.
fn release_after_a_late_cancel(options: AcquireOptions) {
    let name = unique("latecancel");
    let mut t = HeldCancel::new(&name, Duration::from_secs(10));
    t.script.set(1, "stall");
    t.script.set(2, "stall");
    let trying = {
        let (b, name) = (t.b.clone(), name.clone());
        thread::spawn(move || b.acquire(&name, &options))
    };
    t.wait_for_the_cancel();
    t.script.let_go(1);
    let lock: Lock = trying
        .join()
        .unwrap()
        .unwrap()
        .expect("granted once let go");
    let releasing = thread::spawn(move || lock.release());
    t.cancel_attempt(2);
    releasing
        .join()
        .unwrap()
        .expect("the release sent again after a late cancel");
    assert!(
        t.script.attempts() >= 3,
        "the release was not cancelled and sent again ({} attempts)",
        t.script.attempts()
    );
    assert!(t.b.try_lock(&name).unwrap().is_some(), "released");
}

/// Seen failing before the fix: `release()` returned "canceling statement
/// due to user request" (SQLSTATE 57014).
#[test]
fn a_late_cancel_fails_no_release_of_a_lock_on_a_shared_session() {
    release_after_a_late_cancel(AcquireOptions::new());
}

/// Seen failing before the fix, as the shared session's.
#[test]
fn a_late_cancel_fails_no_release_of_a_lock_on_a_session_of_its_own() {
    release_after_a_late_cancel(AcquireOptions::new().dedicated_session(true));
}

/// Runs `acquire` (of B, a timed acquire of `name`) on a thread: its first
/// grant (attempt 1) stalls past its bound (the cancel is held) and then
/// fails as a row wait; it retries, its next grant (attempt 2) stalls, and
/// the held cancel lands on it: a row wait that ran out too, and the third
/// is granted. Returns what `acquire` returned.
fn acquire_under_a_late_cancel<T: Send + 'static>(
    acquire: impl FnOnce(LockClient, String) -> lockbox::Result<T> + Send + 'static,
) -> T {
    let name = unique("latecancel");
    let mut t = HeldCancel::new(&name, Duration::from_secs(2));
    t.script.set(1, "stall");
    t.script.set(1, "fail");
    t.script.set(2, "stall");
    let waiting = {
        let (b, name) = (t.b.clone(), name.clone());
        thread::spawn(move || acquire(b, name))
    };
    t.wait_for_the_cancel();
    t.script.let_go(1);
    t.cancel_attempt(2);
    let got = waiting
        .join()
        .unwrap()
        .expect("granted after a late cancel");
    assert!(
        t.script.attempts() >= 3,
        "the late cancel did not land on the second grant ({} attempts)",
        t.script.attempts()
    );
    got
}

/// A timed lock. Seen failing before the fix: the acquire returned
/// "canceling statement due to user request".
#[test]
fn a_late_cancel_fails_no_acquire_under_way() {
    acquire_under_a_late_cancel(|b, name| b.lock_timeout(&name, Duration::from_secs(10)))
        .release()
        .unwrap();
}

/// A timed permit: its grant transactions are the attempts. Seen failing
/// before the fix, as the lock's.
#[test]
fn a_late_cancel_fails_no_permit_acquire_under_way() {
    acquire_under_a_late_cancel(|b, name| {
        b.semaphore(&name, 2)?
            .acquire_timeout(Duration::from_secs(10))
    })
    .release()
    .unwrap();
}

/// A review of the fix (helper-70) found an operator's cancel hiding the
/// watchdog's: the statement past its bound was cancelled by the operator
/// while the watchdog's cancel was still on its way, and the session, taken
/// for clean, went back to the pool; the next lock granted on it failed its
/// release with 57014 when the watchdog's cancel arrived. A statement
/// cancelled once its cancel was sent now leaves its session tainted: here
/// it is closed, not pooled again. Seen failing before the fix (the next
/// lock was granted on the same backend).
#[test]
fn an_operators_cancel_before_the_watchdogs_leaves_the_session_tainted() {
    let name = unique("latecancel");
    let mut t = HeldCancel::new(&name, Duration::from_secs(10));
    t.script.set(1, "stall");
    let dedicated = AcquireOptions::new().dedicated_session(true);
    let trying = {
        let (b, name, dedicated) = (t.b.clone(), name.clone(), dedicated.clone());
        thread::spawn(move || b.acquire(&name, &dedicated))
    };
    t.wait_for_the_cancel();
    let stalled: i32 = admin()
        .query_one(
            "SELECT pid FROM pg_stat_activity WHERE application_name = $1 AND state = 'active'",
            &[&t.app],
        )
        .unwrap()
        .get(0);
    let cancelled: bool = admin()
        .query_one("SELECT pg_cancel_backend($1)", &[&stalled])
        .unwrap()
        .get(0);
    assert!(cancelled, "the operator's cancel was sent");
    assert!(matches!(trying.join().unwrap(), Ok(None)), "not acquired");
    assert_eq!(t.proxy.held(), 1, "the watchdog's cancel is on its way");
    let lock =
        t.b.acquire(&name, &dedicated)
            .unwrap()
            .expect("granted on another session");
    assert!(
        eventually(Duration::from_secs(5), || !pids_of(&t.app)
            .contains(&stalled)),
        "the session the watchdog's cancel is on its way to was pooled again"
    );
    lock.release().unwrap();
    t.poke.batch_execute(LET_GO).unwrap();
}

/// A review of that (helper-71) found the taint too wide: a statement the
/// watchdog's own cancel ended tainted its session too, and a shared one
/// took no other lock for as long as a lock on it was held. With a pool of
/// one and a leader's lock held, one try that overran its bound left the
/// client unable to take any lock (`PoolTimeout`). Such a session is now
/// closed once free but goes on taking locks. Seen failing before
/// (`PoolTimeout` after 2 s).
#[test]
fn a_try_cancelled_past_its_bound_leaves_its_shared_session_taking_locks() {
    let table = unique("latecancel").replace('-', "_");
    let b = builder_for(&unique("latecancel-b"))
        .table(&table)
        .ttl(Duration::from_secs(10))
        .pool_size(1)
        .pool_timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let (leader, stalled, other) = (
        unique("latecancel"),
        unique("latecancel"),
        unique("latecancel"),
    );
    // The stalled name's row exists: its grant is an update.
    assert_key_left_free(&b, &stalled);
    let held = b.try_lock(&leader).unwrap().expect("the leader's lock");
    let mut script = Script::install(&table, &stalled);
    script.set(1, "stall");
    // Cancelled past its bound, the try looks for another session: there
    // is none (`PoolTimeout`).
    let tried = b.try_lock(&stalled);
    assert!(
        matches!(tried, Ok(None) | Err(lockbox::Error::PoolTimeout { .. })),
        "not acquired: {tried:?}"
    );
    assert_eq!(script.attempts(), 1, "the try's grant stalled");
    let next = b.try_lock(&other);
    assert!(
        matches!(&next, Ok(Some(_))),
        "a free name was not taken beside the leader's lock: {next:?}"
    );
    drop(next);
    held.release().unwrap();
}

/// A review of the half-taint (helper-72): a half-tainted shared session
/// goes on serving its locks, and the key a try on it took and had to free
/// (`SharedConn::unlock`) was freed by a statement that took a late cancel
/// for a failure: it closed the session, and the leader's lock on it was
/// lost. The operator's cancel ends the try past its bound while the
/// watchdog's is held; gdb stops the backend in its unlock, and the
/// watchdog's cancel is let go to land there. Seen failing before the fix
/// (the leader's release: `LockLost`, `SessionLost`).
#[test]
fn a_late_cancel_on_a_half_tainted_sessions_unlock_loses_no_neighbour() {
    let (leader, stalled) = (unique("latecancel"), unique("latecancel"));
    let (proxy, table, b, app) = proxied(false, &[&stalled], |b| {
        b.ttl(Duration::from_secs(10))
            .pool_size(1)
            .pool_timeout(Duration::from_secs(2))
    });
    let mut script = Script::install(&table, &stalled);
    script.set(1, "stall");
    let mut poke = postgres::Client::connect(
        &format!("{} sslmode=disable", proxy.app_url(&unique("poke"))),
        postgres::NoTls,
    )
    .unwrap();
    let leader = b.try_lock(&leader).unwrap().expect("the leader's lock");
    let [shared] = pids_of(&app)[..] else {
        panic!("one session: {:?}", pids_of(&app));
    };
    proxy.hold_until(is_cancel_request, |piece| {
        piece.windows(LET_GO.len()).any(|w| w == LET_GO.as_bytes())
    });
    let trying = {
        let (b, stalled) = (b.clone(), stalled.clone());
        thread::spawn(move || b.try_lock(&stalled).map(|l| l.is_some()))
    };
    assert!(
        eventually(Duration::from_secs(10), || proxy.held() > 0),
        "the watchdog sent no cancel"
    );
    let gdb = thread::spawn(move || {
        std::process::Command::new("timeout")
            .args(["30", "gdb", "-p", &shared.to_string(), "-batch"])
            .args(["-ex", "handle all nostop noprint pass"])
            .args(["-ex", "handle SIGINT nostop noprint pass"])
            .args(["-ex", "break pg_advisory_unlock_int4", "-ex", "continue"])
            .args(["-ex", "shell sleep 2", "-ex", "detach"])
            .output()
            .expect("gdb (Debian's package gdb) runs")
    });
    // Attached, and running again (to the breakpoint).
    assert!(
        eventually(Duration::from_secs(20), || traced_and_running(shared)),
        "gdb never let the backend run on"
    );
    let cancelled: bool = admin()
        .query_one("SELECT pg_cancel_backend($1)", &[&shared])
        .unwrap()
        .get(0);
    assert!(cancelled, "the operator's cancel was sent");
    assert!(
        eventually(Duration::from_secs(10), || stopped(shared)),
        "the try never reached its unlock"
    );
    let_the_cancel_go(&mut poke, &proxy);
    let gdb = gdb.join().unwrap();
    assert!(
        String::from_utf8_lossy(&gdb.stdout).contains("Breakpoint 1,"),
        "gdb: {gdb:?}"
    );
    // Whatever became of the try (elsewhere: no session to spare, or one
    // opened in the closed one's place), its neighbour's lock stays held.
    let tried = trying.join().unwrap();
    assert!(
        matches!(tried, Ok(_) | Err(lockbox::Error::PoolTimeout { .. })),
        "{tried:?}"
    );
    leader
        .release()
        .expect("the leader's lock outlived the late cancel");
}

/// Lets the held cancel go.
fn let_the_cancel_go(poke: &mut postgres::Client, proxy: &common::proxy::Proxy) {
    poke.batch_execute(LET_GO).unwrap();
    assert_eq!(proxy.held(), 0, "the cancel was let go");
}

/// Process `pid`'s state letter and tracer (`/proc`).
fn proc_state(pid: i32) -> (char, bool) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
            .unwrap_or("")
            .to_owned()
    };
    let state = field("State:").chars().next().unwrap_or('?');
    (state, !matches!(field("TracerPid:").as_str(), "" | "0"))
}

/// Traced, and not stopped.
fn traced_and_running(pid: i32) -> bool {
    matches!(proc_state(pid), (s, true) if s != 't')
}

/// Stopped by its tracer (at a breakpoint).
fn stopped(pid: i32) -> bool {
    matches!(proc_state(pid), ('t', true))
}
