//! Hostile review (2) of the wait-and-grant function: the owner check is made
//! once per session, the call trusts the OID for the session's life.
//!
//! A session checks, when it opens, that the function is lockbox's body and
//! belongs to the lease table's owner (or to the role using it); each call then
//! only checks that the name still resolves to that OID. `CREATE OR REPLACE`
//! keeps a function's OID. So once the function has passed to another role
//! (`ALTER FUNCTION … OWNER TO`, `REASSIGN OWNED`, an operator's mistake — all
//! of which the session check would refuse in a new session), that role may
//! replace its body, and every session already in a pool runs the new body,
//! with the application role's rights: here it grants at once, without the
//! advisory lock: two holders. The call's gate could check the owner (and the
//! body) as well as the OID.

use crate::common;

use common::wg::*;
use common::*;

#[test]
fn a_function_given_to_another_role_is_not_called_by_pooled_sessions() {
    let mut f = WgFixture::new();
    let mallory = f.role(
        "wgr2_mallory",
        "GRANT USAGE, CREATE ON SCHEMA {schema} TO {role};",
    );
    let holder = f.app_client(&unique("wgr2-own-h"), ttl());
    let waiter = f.app_client(&unique("wgr2-own-w"), ttl());
    assert!(f.body().contains("pg_advisory_lock($1, $2)"));
    // A pooled session of the waiter, which checked lockbox's function.
    warm_pool(&waiter);
    // The function passes to another role, which replaces its body (same OID).
    admin()
        .batch_execute(&format!(
            "ALTER FUNCTION {} OWNER TO {mallory}",
            f.signature()
        ))
        .unwrap();
    f.connect_as(&mallory)
        .batch_execute(&f.impostor_sql("CREATE OR REPLACE"))
        .expect("the function's new owner replaces its body");
    assert_eq!(f.function_owner().as_deref(), Some(mallory.as_str()));

    let name = unique("wgr2-own");
    let held = holder.try_lock(&name).unwrap().expect("a free lock");
    let second = waiter.lock_timeout(&name, ms(2000));
    assert!(
        second.is_err(),
        "two holders: the waiter was granted token {} while the holder holds {} \
         (by the body {mallory} wrote into the function it was given)",
        second.as_ref().map_or(0, |l| l.fencing_token()),
        held.fencing_token()
    );
    assert!(held.is_held());
    held.release().unwrap();
}
