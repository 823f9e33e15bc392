//! Lease inspection: held, expired and released leases, with holder liveness.

use crate::common;

use std::time::{Duration, SystemTime};

use common::*;
use lockbox::{AcquireOptions, LeaseStatus, advisory_key};

#[test]
fn leases_show_held_expired_and_released() {
    let (client, _) = client(ms(5000));
    let held = unique("held");
    let released = unique("released");
    let dead = unique("dead");
    let zombie = unique("zombie");

    let lock = client
        .acquire(&held, &AcquireOptions::new().metadata("worker 7"))
        .unwrap()
        .unwrap();
    client
        .try_lock(&released)
        .unwrap()
        .unwrap()
        .release()
        .unwrap();
    let mut gone = admin();
    fake_lease(&dead, 3, -2000, pid_of(&mut gone));
    drop(gone);
    let mut zombie_db = admin();
    let (k1, k2) = advisory_key(&zombie);
    zombie_db
        .execute("SELECT pg_advisory_lock($1, $2)", &[&k1, &k2])
        .unwrap();
    fake_lease(&zombie, 4, -500, pid_of(&mut zombie_db));

    let info = client.lease(&held).unwrap().expect("listed");
    assert_eq!(info.name, held);
    assert_eq!(info.owner, client.owner_id());
    assert_eq!(info.metadata.as_deref(), Some("worker 7"));
    assert_eq!(info.fencing_token, lock.fencing_token());
    assert_eq!(info.holder_pid, holder_pid(&held));
    assert!(info.holder_alive);
    match info.status {
        LeaseStatus::Held { expires_in } => {
            assert!(expires_in <= ms(5000) && expires_in > ms(3000))
        }
        other => panic!("{other:?}"),
    }
    assert!(info.acquired_at <= SystemTime::now() + Duration::from_secs(5));
    assert!(info.expires_at > info.acquired_at);

    let info = client.lease(&released).unwrap().unwrap();
    assert!(
        matches!(info.status, LeaseStatus::Released { .. }),
        "{info:?}"
    );
    assert!(!info.holder_alive);

    let info = client.lease(&dead).unwrap().unwrap();
    match info.status {
        LeaseStatus::Expired { ago } => assert!(ago >= ms(1500)),
        other => panic!("{other:?}"),
    }
    assert!(!info.holder_alive, "the session is gone");

    let info = client.lease(&zombie).unwrap().unwrap();
    assert!(matches!(info.status, LeaseStatus::Expired { .. }));
    assert!(info.holder_alive, "a zombie still holds the advisory lock");

    let all = client.leases().unwrap();
    for name in [&held, &released, &dead, &zombie] {
        assert_eq!(all.iter().filter(|l| &l.name == name).count(), 1, "{name}");
    }
    assert!(client.lease(&unique("never")).unwrap().is_none());
    assert!(client.lease("").unwrap_err().is_invalid_input());
    drop(lock);
}
