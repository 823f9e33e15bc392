//! Event handlers are user code: they run on the client's event thread, never under
//! an internal lock nor inside a query of a lock's state, and a panicking handler
//! breaks nothing.

use crate::common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use crossbeam_channel::{Receiver, Sender, unbounded};
use lockbox::{
    AcquiredEvent, HandleEvent, Lock, LockClient, LostEvent, LostReason, RenewalFailedEvent,
    RenewedEvent,
};

type Slot = Arc<Mutex<Option<Lock>>>;

/// On a renewal of the lock in `renewed_slot`: extends it, then releases it. On a
/// loss of the lock in `lost_slot`: drops it and acquires `next` with `client`.
#[derive(Debug)]
struct Reentrant {
    renewed_slot: Slot,
    lost_slot: Slot,
    client: Arc<Mutex<Option<LockClient>>>,
    next: String,
    acquired: Slot,
    done: Sender<&'static str>,
}

impl HandleEvent for Reentrant {
    fn handle_renewed(&self, e: &RenewedEvent) {
        let mut slot = self.renewed_slot.lock().unwrap();
        if slot.as_ref().is_some_and(|l| l.name() == e.name()) {
            let lock = slot.take().unwrap();
            lock.extend(ms(2000)).expect("extend from the handler");
            lock.release().expect("release from the handler");
            self.done.send("released").unwrap();
        }
    }

    fn handle_lost(&self, e: &LostEvent) {
        let mut slot = self.lost_slot.lock().unwrap();
        if slot.as_ref().is_some_and(|l| l.name() == e.name()) {
            drop(slot.take());
            let client = self.client.lock().unwrap();
            let lock = client.as_ref().unwrap().lock_timeout(&self.next, ms(5000));
            *self.acquired.lock().unwrap() = Some(lock.expect("acquire from the handler"));
            self.done.send("reacquired").unwrap();
        }
    }
}

/// A handler may release, extend or drop the very lock it is told about, and
/// acquire others, while every other lock keeps being renewed.
#[test]
fn a_handler_may_use_the_lock_it_is_told_about() {
    let ttl = ms(600);
    let (done_tx, done_rx) = unbounded();
    let renewed_slot = Slot::default();
    let lost_slot = Slot::default();
    let client_slot = Arc::new(Mutex::new(None));
    let acquired = Slot::default();
    let next = unique("next");
    let client = builder_for(&unique("reentrant"))
        .ttl(ttl)
        .event_handler(Reentrant {
            renewed_slot: renewed_slot.clone(),
            lost_slot: lost_slot.clone(),
            client: client_slot.clone(),
            next: next.clone(),
            acquired: acquired.clone(),
            done: done_tx,
        })
        .build()
        .unwrap();
    *client_slot.lock().unwrap() = Some(client.clone());
    let bystander = client.try_lock(&unique("bystander")).unwrap().unwrap();

    let renewed_name = unique("renewed");
    *renewed_slot.lock().unwrap() = Some(client.try_lock(&renewed_name).unwrap().unwrap());
    let lost_name = unique("lost");
    // On a session of its own, so that terminating it loses this lock alone.
    let lost_lock = client
        .acquire(
            &lost_name,
            &lockbox::AcquireOptions::new().dedicated_session(true),
        )
        .unwrap()
        .unwrap();
    let lost_signal = lost_lock.lost();
    *lost_slot.lock().unwrap() = Some(lost_lock);
    terminate(holder_pid(&lost_name));

    let mut seen = vec![
        done_rx.recv_timeout(ms(5000)).expect("handler finished"),
        done_rx.recv_timeout(ms(5000)).expect("handler finished"),
    ];
    seen.sort();
    assert_eq!(seen, ["reacquired", "released"]);
    assert_eq!(lost_signal.recv(), Ok(LostReason::SessionLost));
    assert!(lease_row(&renewed_name).released);
    let reacquired = acquired.lock().unwrap().take().unwrap();
    assert!(reacquired.is_held());
    // Every other lock kept renewing meanwhile.
    let renewed = client.metrics().renewals_ok;
    assert!(eventually(ttl, || client.metrics().renewals_ok > renewed + 1));
    assert!(bystander.is_held());
    assert!(client.renewal_thread_alive());
    reacquired.release().unwrap();
    bystander.release().unwrap();
    client_slot.lock().unwrap().take();
}

/// Panics in every handler method, every time.
#[derive(Debug)]
struct Panicky(Sender<()>);

impl HandleEvent for Panicky {
    fn handle_acquired(&self, _: &AcquiredEvent) {
        panic!("handler panic on acquired");
    }
    fn handle_renewed(&self, _: &RenewedEvent) {
        let _ = self.0.send(());
        panic!("handler panic on renewed");
    }
    fn handle_lost(&self, _: &LostEvent) {
        panic!("handler panic on lost");
    }
}

/// A handler that panics on every event loses no lock, leaks no lease, stops no
/// renewal; its panics are counted and later events still arrive.
#[test]
fn handler_panics_are_contained() {
    let ttl = ms(600);
    let (tx, renewals) = unbounded();
    let client = builder_for(&unique("panicky"))
        .ttl(ttl)
        .event_handler(Panicky(tx))
        .build()
        .unwrap();
    let name = unique("panicky");
    let lock = client.try_lock(&name).unwrap().unwrap();
    assert_eq!(client.metrics().locks_held, 1);
    // Renewals go on, and every one reaches the handler although each panics.
    for _ in 0..4 {
        renewals
            .recv_timeout(Duration::from_secs(10))
            .expect("renewal event delivered");
    }
    assert!(lock.is_held());
    assert!(client.renewal_thread_alive());
    assert!(client.metrics().handler_panics >= 4);
    // A loss is still signalled, and the next acquire works.
    terminate(holder_pid(&name));
    assert_eq!(
        lock.lost().recv_timeout(ttl * 2),
        Ok(LostReason::SessionLost)
    );
    drop(lock);
    let again = client.lock_timeout(&name, ttl * 3).unwrap();
    assert_eq!(client.metrics().locks_held, 1);
    again.release().unwrap();
    assert_eq!(client.metrics().locks_held, 0);
    assert!(!lease_row(&name).token.is_negative());
}

/// Takes the user's mutex in `handle_lost`.
#[derive(Debug)]
struct TakesMutex(Arc<Mutex<()>>, Sender<LostReason>);

impl HandleEvent for TakesMutex {
    fn handle_lost(&self, e: &LostEvent) {
        let _guard = self.0.lock().unwrap();
        let _ = self.1.send(e.reason());
    }
}

/// Checking a lock (`is_held`, `ensure_held`, `lost_reason`, `Debug`) while
/// holding a mutex that `handle_lost` also takes must not deadlock: the handler
/// never runs inside those queries. The lock's renewal is blocked on its lease row,
/// so its deadline passes with the renewal in flight.
#[test]
fn checking_a_lock_never_runs_the_handler() {
    let ttl = ms(400);
    let user_mutex = Arc::new(Mutex::new(()));
    let (tx, lost_events): (Sender<LostReason>, Receiver<LostReason>) = unbounded();
    let client = builder_for(&unique("mutex"))
        .ttl(ttl)
        .event_handler(TakesMutex(user_mutex.clone(), tx))
        .build()
        .unwrap();
    let name = unique("mutex");
    let lock = client.try_lock(&name).unwrap().unwrap();
    let row = RowHold::lease(&name);
    let (checked_tx, checked) = unbounded();
    let mutex = user_mutex.clone();
    // Not scoped: if checking deadlocks, the test fails instead of hanging.
    std::thread::spawn(move || {
        let _guard = mutex.lock().unwrap();
        let signalled = lock.lost().recv_timeout(ttl * 3);
        let held = lock.is_held();
        let ensured = lock.ensure_held().is_ok();
        let reason = lock.lost_reason();
        let shown = format!("{lock:?}");
        checked_tx
            .send((signalled, held, ensured, reason, shown))
            .unwrap();
    });
    let (signalled, held, ensured, reason, shown) = checked
        .recv_timeout(Duration::from_secs(5))
        .expect("checking the lock deadlocked");
    row.release();
    assert_eq!(signalled, Ok(LostReason::Expired));
    assert!(!held && !ensured);
    assert_eq!(reason, Some(LostReason::Expired));
    assert!(shown.contains("held: false"), "{shown}");
    // The handler ran once the mutex was free, on its own thread.
    assert_eq!(
        lost_events.recv_timeout(Duration::from_secs(5)),
        Ok(LostReason::Expired)
    );
}

/// Reports failed renewals.
#[derive(Debug)]
struct Failures(Sender<(String, Duration)>);

impl HandleEvent for Failures {
    fn handle_renewal_failed(&self, e: &RenewalFailedEvent) {
        let _ = self.0.send((e.error().to_string(), e.deadline_in()));
    }
}

/// A renewal that fails (the server refuses the write) is an event, with the
/// server's message and what the lock has left.
#[test]
fn failed_renewals_are_events() {
    let schema = unique("failev").replace('-', "_");
    let table = format!("{schema}.leases");
    let mut db = admin();
    db.batch_execute(&format!("CREATE SCHEMA {schema}"))
        .unwrap();
    let ttl = ms(1500);
    let (tx, failures) = unbounded();
    let client = builder_for(&unique("failev"))
        .table(&table)
        .ttl(ttl)
        .event_handler(Failures(tx))
        .build()
        .unwrap();
    let lock = client.try_lock(&unique("failev")).unwrap().unwrap();
    db.batch_execute(&format!(
        "CREATE FUNCTION {schema}.refuse() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN RAISE EXCEPTION 'writes refused by policy'; END $$; \
         CREATE TRIGGER refuse BEFORE UPDATE ON {table} \
         FOR EACH ROW EXECUTE FUNCTION {schema}.refuse();"
    ))
    .unwrap();
    let (error, deadline_in) = failures.recv_timeout(ttl).expect("failure event");
    drop(lock);
    db.batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
        .unwrap();
    assert!(error.contains("writes refused by policy"), "{error}");
    assert!(error.contains("P0001"), "SQLSTATE shown: {error}");
    assert!(deadline_in < ttl && deadline_in > Duration::ZERO);
}
