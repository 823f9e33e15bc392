//! Review (fence): the fence locks one version of the lease row; renewals
//! (`FOR NO KEY UPDATE`, not held up by it) then write newer versions, and
//! a grant locks the newest. The fence's `FOR KEY SHARE` must carry over to
//! each new version (PostgreSQL keeps key-share lockers in the new version's
//! xmax), or a grant after a few renewals and a release would not wait.
//! pg_fence.rs checks renewals go on, and a grant after a release with no
//! renewal in between; not both. Passes on 94f1bbf: pinned, not a hole.

use crate::common;

use std::time::Duration;

use common::*;
use lockbox::{AcquireOptions, LockClient};

#[test]
fn a_fence_holds_the_next_grant_back_after_renewals_and_a_release() {
    let other = LockClient::builder(database_url()).build().unwrap();
    for dedicated in [false, true] {
        let (client, _) = client(ms(1000));
        let name = unique("fence-after-renewals");
        let lock = client
            .acquire(&name, &AcquireOptions::new().dedicated_session(dedicated))
            .unwrap()
            .unwrap();
        let mut db = admin();
        let mut tx = db.transaction().unwrap();
        lock.fence(&mut tx).unwrap();
        let before = client.metrics().renewals_ok;
        assert!(eventually(Duration::from_secs(10), || client
            .metrics()
            .renewals_ok
            >= before + 3));
        lock.release().unwrap();
        assert!(
            other.try_lock(&name).unwrap().is_none(),
            "granted past a fence after renewals (dedicated: {dedicated})"
        );
        tx.commit().unwrap();
        other.try_lock(&name).unwrap().unwrap().release().unwrap();
    }
}
