//! What the etcd backend does that the shared suite does not cover: waiting
//! by watch (never polling), waiters that give up leaving nothing behind,
//! names that never see each other's keys, TTLs rounded up to etcd's whole
//! seconds, a dead or silent endpoint failed over, and health.

use crate::common;

use std::thread;
use std::time::{Duration, Instant};

use common::etcd_server::{EtcdCluster, etcd_url, post, single};
use common::{SilentServer, eventually, ms, unique};
use lockbox::{AcquireOptions, Error, LockClient, LostReason};

fn client(ttl: Duration) -> LockClient {
    LockClient::etcd(&etcd_url()).ttl(ttl).build().unwrap()
}

/// The keys under `prefix` on the single member.
fn keys_under(prefix: &str) -> u64 {
    single().count_keys(prefix).expect("etcd answers")
}

/// How many KV, lease and watch requests a member has started, from its
/// metrics.
fn requests(cluster: &EtcdCluster) -> u64 {
    let port = cluster.members[0].client_port;
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = std::net::TcpStream::connect_timeout(&addr, ms(2000)).unwrap();
    use std::io::{Read, Write};
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text.lines()
        .filter(|l| l.starts_with("grpc_server_started_total{"))
        .filter(|l| {
            ["\"Range\"", "\"Txn\"", "\"Watch\"", "\"LeaseKeepAlive\""]
                .iter()
                .any(|m| l.contains(&format!("grpc_method={m}")))
                && l.contains("etcdserverpb")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// A waiter waits on a watch: while the holder holds, it sends nothing
/// (its lease's keep-alive is due only every third of the TTL), and it is
/// granted as soon as the holder releases. On a member of its own, so that
/// no other test's requests are counted.
#[test]
fn waiting_is_a_watch_not_polling() {
    let cluster = EtcdCluster::start(1);
    let (a, b) = (
        cluster
            .builder()
            .ttl(Duration::from_secs(30))
            .build()
            .unwrap(),
        cluster
            .builder()
            .ttl(Duration::from_secs(30))
            .build()
            .unwrap(),
    );
    let name = unique("etcd-no-poll");
    let held = a.try_lock(&name).unwrap().unwrap();
    thread::scope(|s| {
        let waiter = s.spawn(|| b.lock(&name).unwrap());
        assert!(eventually(ms(5000), || b.metrics().acquires_waiting == 1));
        // The waiter opens its watch right after it counts as waiting.
        let before = requests(&cluster);
        thread::sleep(ms(3000));
        let during = requests(&cluster) - before;
        assert!(during <= 1, "{during} requests while waiting 3 s: polling");
        held.release().unwrap();
        let lock = waiter.join().unwrap();
        assert!(lock.is_held());
        lock.release().unwrap();
    });
}

/// A waiter whose wait runs out revokes its lease: its key is gone when
/// `lock_timeout` returns, and it never becomes the holder later.
#[test]
fn a_waiter_that_gives_up_leaves_no_key() {
    let name = unique("etcd-give-up");
    let prefix = format!("lockbox/lock/{name}/");
    let (a, b) = (client(ms(3000)), client(ms(3000)));
    let held = a.try_lock(&name).unwrap().unwrap();
    assert_eq!(keys_under(&prefix), 1);
    let err = b.lock_timeout(&name, ms(500)).unwrap_err();
    assert!(err.is_timeout(), "{err}");
    assert_eq!(keys_under(&prefix), 1, "the waiter left its key behind");
    // A try that finds the lock held leaves nothing either.
    assert!(b.try_lock(&name).unwrap().is_none());
    assert_eq!(keys_under(&prefix), 1);
    held.release().unwrap();
    assert_eq!(keys_under(&prefix), 0);
    assert!(b.try_lock(&name).unwrap().is_some());
}

/// Names never see each other's keys: `a` is not held by a holder of `a/b`
/// or of `a%2Fb`, and each lists only itself.
#[test]
fn names_are_prefix_free() {
    let base = unique("etcd-names");
    // The longer names first: a key of theirs under `base`'s prefix would
    // then stand ahead of `base`'s own.
    let names = [
        format!("{base}/b"),
        format!("{base}%2Fb"),
        format!("{base}/"),
        format!("{base}%"),
        base.clone(),
    ];
    let c = client(ms(3000));
    let locks: Vec<_> = names
        .iter()
        .map(|n| c.try_lock(n).unwrap().unwrap_or_else(|| panic!("{n} held")))
        .collect();
    for (n, lock) in names.iter().zip(&locks) {
        let listed = c.lease(n).unwrap().expect("listed");
        assert_eq!(&listed.name, n);
        assert_eq!(listed.fencing_token, lock.fencing_token());
    }
    let all: Vec<String> = c
        .leases()
        .unwrap()
        .into_iter()
        .map(|l| l.name)
        .filter(|n| n.starts_with(&base))
        .collect();
    assert_eq!(all.len(), names.len(), "{all:?}");
    for lock in locks {
        lock.release().unwrap();
    }
}

/// A TTL under a second is accepted and rounded up in etcd: the lease etcd
/// holds is at least a whole second (its minimum, 2 s by default) while the
/// holder's deadline keeps to the TTL. Renewed, the lock stays held far past
/// it; left unrenewed, it is free only when etcd's lease has run out.
#[test]
fn a_short_ttl_is_rounded_up_in_etcd() {
    let name = unique("etcd-short-ttl");
    let ttl = ms(500);
    let (a, b) = (client(ttl), client(ttl));
    let held = a.try_lock(&name).unwrap().unwrap();
    let lease = a.lease(&name).unwrap().unwrap();
    match lease.status {
        lockbox::LeaseStatus::Held { expires_in } => {
            assert!(expires_in >= Duration::from_secs(1), "{expires_in:?}");
        }
        other => panic!("{other:?}"),
    }
    for _ in 0..6 {
        thread::sleep(ttl / 2);
        assert!(held.is_held());
    }
    let lost = held.lost();
    let paused = Instant::now();
    a.__pause_renewals(true);
    assert_eq!(lost.recv_timeout(ttl * 2), Ok(LostReason::Expired));
    let next = b.lock_timeout(&name, Duration::from_secs(10)).unwrap();
    // Not before etcd's whole-second lease ran out.
    assert!(paused.elapsed() >= Duration::from_secs(1));
    assert!(next.fencing_token() > held.fencing_token());
    a.__pause_renewals(false);
    next.release().unwrap();
}

/// An etcd lease keeps its TTL: `extend` to a longer one is refused (the
/// lock stays held with its own), to a shorter one renews the lease.
#[test]
fn extend_within_the_granted_lease_only() {
    let name = unique("etcd-extend");
    let c = client(ms(3000));
    let lock = c.try_lock(&name).unwrap().unwrap();
    let err = lock.extend(Duration::from_secs(60)).unwrap_err();
    assert!(matches!(err, Error::Unsupported(_)), "{err:?}");
    assert!(err.to_string().contains("3 s"), "{err}");
    assert!(lock.is_held());
    lock.extend(ms(2500)).unwrap();
    assert!(lock.is_held());
    lock.release().unwrap();
}

/// A per-call TTL rounds the same way, and metadata is kept with the lock.
#[test]
fn per_call_ttl_and_metadata() {
    let name = unique("etcd-per-call");
    let c = client(ms(3000));
    let lock = c
        .acquire(
            &name,
            &AcquireOptions::new().ttl(ms(1200)).metadata("batch 7"),
        )
        .unwrap()
        .unwrap();
    let info = c.lease(&name).unwrap().unwrap();
    assert_eq!(info.metadata.as_deref(), Some("batch 7"));
    assert_eq!(info.owner, c.owner_id());
    assert_eq!(info.fencing_token, lock.fencing_token());
    lock.release().unwrap();
}

/// A member that accepts connections and never answers, listed first:
/// `build()` and acquires fail over to the member that answers; alone, it
/// makes `build()` fail with an error naming it, within the connect timeout.
#[test]
fn a_silent_endpoint_is_failed_over() {
    let silent = SilentServer::start();
    let silent_url = format!("http://127.0.0.1:{}", silent.port);
    let c = LockClient::etcd(&format!("{silent_url},{}", etcd_url()))
        .connect_timeout(ms(2000))
        .ttl(ms(3000))
        .build()
        .unwrap();
    let name = unique("etcd-silent");
    let lock = c.try_lock(&name).unwrap().unwrap();
    assert!(lock.is_held());
    lock.release().unwrap();

    let start = Instant::now();
    let err = LockClient::etcd(&silent_url)
        .connect_timeout(ms(1000))
        .build()
        .unwrap_err();
    assert!(matches!(err, Error::Connect { .. }), "{err:?}");
    assert!(err.to_string().contains(&silent_url), "{err}");
    assert!(
        start.elapsed() < ms(3000),
        "build took {:?}",
        start.elapsed()
    );
}

/// Endpoints that are not `http://host:port` are refused before anything is
/// sent, without repeating a password typed into them.
#[test]
fn bad_endpoints_are_refused() {
    for bad in ["", "localhost:2379", "http://host", "ftp://h:1"] {
        let err = LockClient::etcd(bad).build().unwrap_err();
        assert!(matches!(err, Error::InvalidConfig(_)), "{bad}: {err:?}");
    }
    let err = LockClient::etcd("http://root:s3cret@127.0.0.1:2379")
        .build()
        .unwrap_err();
    assert!(!err.to_string().contains("s3cret"), "{err}");
    let builder = LockClient::etcd("http://root:s3cret@127.0.0.1:2379");
    assert!(!format!("{builder:?}").contains("s3cret"));
    // Mixed schemes: a failover would leave TLS.
    let err = LockClient::etcd("https://127.0.0.1:2379,http://127.0.0.1:2380")
        .build()
        .unwrap_err();
    assert!(matches!(err, Error::InvalidConfig(_)), "{err:?}");
    // A TLS setting with plain-text endpoints is never ignored.
    let err = LockClient::etcd("http://127.0.0.1:2379")
        .etcd_tls_ca_file("/nonexistent/ca.pem")
        .build()
        .unwrap_err();
    assert!(
        matches!(&err, Error::InvalidConfig(m) if m.contains("not https://")),
        "{err:?}"
    );
}

/// Health on one member: reachable, the member listed as leader, quorum.
#[test]
fn health_lists_the_member_and_leader() {
    let c = client(ms(3000));
    let health = c.health();
    assert!(health.is_healthy(), "{health}");
    let cluster = health.database.cluster.expect("cluster health");
    assert!(cluster.quorum);
    assert_eq!(cluster.members.len(), 1);
    assert!(cluster.members[0].is_leader && cluster.members[0].reachable);
    assert_eq!(
        cluster.leader.as_deref(),
        Some(cluster.members[0].name.as_str())
    );
    assert!(
        health
            .database
            .server_version
            .as_deref()
            .is_some_and(|v| v.starts_with("etcd 3."))
    );
}

/// A key deleted behind the holder's back (an operator's `etcdctl del`) is
/// found at the next renewal: the lock is reported lost, not kept.
#[test]
fn a_key_deleted_by_hand_is_a_loss() {
    let name = unique("etcd-deleted");
    let c = client(ms(1500));
    let lock = c.try_lock(&name).unwrap().unwrap();
    let lost = lock.lost();
    let prefix = format!("lockbox/lock/{name}/");
    let mut end = prefix.as_bytes().to_vec();
    *end.last_mut().unwrap() += 1;
    use base64::Engine;
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let body = format!(
        r#"{{"key":"{}","range_end":"{}"}}"#,
        b64(prefix.as_bytes()),
        b64(&end)
    );
    let port = single().members[0].client_port;
    assert!(post(port, "/v3/kv/deleterange", &body, ms(2000)).is_some());
    assert_eq!(lost.recv_timeout(ms(3000)), Ok(LostReason::NotOwner));
    assert!(lock.release().unwrap_err().is_lock_lost());
}
