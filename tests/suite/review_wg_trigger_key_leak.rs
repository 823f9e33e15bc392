//! Hostile review of the wait-and-grant function: an error after the key was
//! taken is read as "the function is gone".
//!
//! `wait_for_key` takes SQLSTATE 42883 (undefined_function) from the call to
//! mean that the function was dropped, "so the key is not held". But the call
//! raises 42883 for anything undefined it meets, also *after* its
//! `pg_advisory_lock`: in the grant, an AFTER trigger on the lease table (which
//! lockbox accepts) calling a function an operator dropped. The session then
//! holds the key (session advisory locks outlive the failed statement) while
//! the acquire believes it does not. When the acquire's wait has run out
//! meanwhile (a slow trigger), it returns "not acquired" with `holds == false`,
//! skips `pg_advisory_unlock_all`, and the connection goes back to the pool
//! holding the name's key: the name is blocked for everyone, though free,
//! until that idle session is found stranded a TTL later.

use crate::common;

use std::thread;

use common::wg::*;
use common::*;

#[test]
fn an_undefined_function_error_after_the_key_was_taken_leaks_no_key_to_the_pool() {
    let f = WgFixture::new();
    let holder = f.app_client(&unique("wgr-trg-h"), ttl());
    let w_app = unique("wgr-trg-w");
    let waiter = f.app_client(&w_app, ttl());
    // An audit trigger whose helper was dropped, and slow: it fails the waiter's
    // grant with 42883 after the acquire's wait (2 s) has run out. A sequence
    // (not transactional) records that it fired.
    admin()
        .batch_execute(&format!(
            "CREATE SEQUENCE {s}.audit_fired; \
             GRANT USAGE ON SEQUENCE {s}.audit_fired TO {app}; \
             CREATE FUNCTION {s}.audit() RETURNS trigger LANGUAGE plpgsql AS $a$ \
             BEGIN \
                 IF NEW.owner = '{owner}' THEN \
                     PERFORM nextval('{s}.audit_fired'); \
                     PERFORM pg_sleep(3); \
                     PERFORM {s}.audit_write(NEW.name); \
                 END IF; \
                 RETURN NULL; \
             END $a$; \
             CREATE TRIGGER audit AFTER INSERT OR UPDATE ON {t} \
                 FOR EACH ROW EXECUTE FUNCTION {s}.audit();",
            s = f.schema,
            app = f.app_role,
            t = f.table(),
            owner = waiter.owner_id(),
        ))
        .unwrap();

    let name = unique("wgr-trg");
    let held = holder.try_lock(&name).unwrap().expect("a free lock");
    let outcome = thread::scope(|s| {
        let w = s.spawn(|| waiter.lock_timeout(&name, ms(2000)));
        let query = waiting_query(&w_app);
        assert!(
            query.contains("_wait_grant_v3"),
            "the waiter waits inside the function: {query}"
        );
        held.release().unwrap();
        w.join().unwrap()
    });
    let fired: bool = admin()
        .query_one(
            &format!("SELECT is_called FROM {}.audit_fired", f.schema),
            &[],
        )
        .unwrap()
        .get(0);
    assert!(fired, "the waiter's grant ran (the trigger fired)");
    assert!(
        outcome.is_err(),
        "the grant failed, so the acquire did not get the lock"
    );
    assert_eq!(
        advisory_locks_of(&w_app),
        0,
        "the waiter's pooled session still holds the name's advisory key \
         (the acquire ended with {:?})",
        outcome.err()
    );
    let again = holder.try_lock(&name).unwrap();
    assert!(again.is_some(), "the name is free, yet nobody can take it");
    again.unwrap().release().unwrap();
}
