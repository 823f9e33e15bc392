//! [`EtcdBackend`]: locks in an etcd cluster (feature `etcd`), with the
//! semantics of etcd's own `concurrency.Mutex`.
//!
//! # How a lock works
//!
//! - Each acquire grants an etcd **lease** of the lock's TTL (rounded up to
//!   whole seconds; see [`LockClient::etcd`](crate::LockClient::etcd)) and, in
//!   one transaction, creates its key `lockbox/lock/<name>/<lease id>` on it
//!   (only if absent, so a resent transaction changes nothing) and reads the
//!   name's oldest key. The **holder** is the key with the lowest create
//!   revision; its create revision is the **fencing token**: etcd's revision is
//!   cluster-wide, increases with every write and is kept through Raft, so the
//!   tokens of a name increase across release, expiry, crash and restart.
//! - A **waiter** keeps its key (it is queued in arrival order) and watches the
//!   deletion of the key just ahead of it — from the revision it read, so no
//!   deletion is missed — then looks again. Never polling: between events it
//!   wakes only to keep its own lease alive (every third of the TTL). A waiter
//!   that gives up revokes its lease, which deletes its key.
//! - The client's renewal thread keeps a held lock's lease alive and checks
//!   that its key is still the one granted; the lock is **lost** when the lease
//!   is gone or the key changed, or when no keep-alive succeeds before the
//!   local deadline. **Release** deletes the key if it is still the one granted
//!   (writing a release record, kept [`RELEASED_RETENTION`]) and revokes the
//!   lease. A crashed holder's lock is free when its lease runs out.
//! - Readers and semaphore permits queue in the same place, their kind in
//!   their key's value, and are granted from the kinds of the keys ahead of
//!   them: see `group.rs`.
//!
//! # Requests
//!
//! Every request goes through etcd's v3 JSON gateway (HTTP/1.1), to the member
//! that answered last; one that cannot answer (down, frozen, cut off, without
//! a leader) is given up on after its share of the request's time, and the
//! next is tried. Every request is bounded: acquires and listings by the
//! `connect_timeout` (and the acquire's wait), renewals and releases by what is
//! left before the holder's local deadline.
//!
//! Over `https://` endpoints every request is TLS (rustls, the `ring`
//! provider): the member's certificate verified against the CA file or the
//! platform's trust store read at `build()`, its host name checked, the
//! client certificate presented if one is set. Redirects are never followed,
//! and the health check does not contact a member URL of the other scheme.

mod group;
mod http;
mod inspect;
mod keys;
mod session;
mod watch;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use parking_lot::Mutex;
use serde_json::json;

use crate::backend::{AcquireRequest, Backend, Grant, LeaseKind, Wait, Watch};
use crate::config::LockClientBuilder;
use crate::error::{Error, Result};
use crate::health::{DatabaseHealth, PoolHealth};
use crate::lease_info::LeaseInfo;

use self::http::Gateway;
pub(crate) use self::http::describe_endpoints;
use self::keys::{Record, kvs, queue, revision};
use self::session::EtcdSession;
use self::watch::{NameWatch, Woken};

/// How long the record of a name's last release is kept, for
/// [`LockClient::leases`](crate::LockClient::leases) to show it (between half
/// of this and all of it).
pub const RELEASED_RETENTION: Duration = Duration::from_secs(5 * 60);

/// The least time an acquire's request is given, even when its wait has less
/// left: enough for a healthy cluster to answer.
const MIN_REQUEST: Duration = Duration::from_millis(500);

fn unexpected(what: &str, answer: impl std::fmt::Debug) -> Error {
    Error::database(std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!("unexpected answer from etcd to {what}: {answer:?}"),
    ))
}

/// The client's wall clock, in ms since the Unix epoch (for records only).
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// What the backend and its held locks share.
pub(crate) struct Shared {
    gateway: Gateway,
    /// The bound of every request other than renewals and releases.
    request_timeout: Duration,
    /// The lease release records are written on, and when it was granted.
    record_lease: Mutex<Option<(i64, Instant)>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("gateway", &self.gateway)
            .finish_non_exhaustive()
    }
}

/// Locks in an etcd cluster, from [`LockClient::etcd`](crate::LockClient::etcd).
///
/// Guarantees and limits: a lock is granted by a Raft write, so it holds as
/// long as a majority of the members does — through the loss of a minority,
/// leader elections included (etcd extends every lease by an election timeout
/// when a new leader takes over). Without a majority nothing is granted,
/// renewed or released: acquires fail within their wait and holders lose their
/// locks at their local deadline. Lease expiry uses the leader's clock.
///
/// Each lock is an etcd lease with one key, `lockbox/lock/<name>/<lease id>`;
/// the holder is the name's oldest key (lowest create revision), whose create
/// revision is the fencing token; waiters watch the deletion of the key just
/// ahead of them, in arrival order; release deletes the key and revokes the
/// lease. See [`LockClient::etcd`](crate::LockClient::etcd) for the TTL rounding
/// and failover.
pub struct EtcdBackend {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for EtcdBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdBackend")
            .field("endpoints", &self.shared.gateway.describe())
            .finish_non_exhaustive()
    }
}

impl EtcdBackend {
    /// Checks the endpoints and that a member answers, within the builder's
    /// connect timeout.
    pub(crate) fn connect(b: &LockClientBuilder) -> Result<EtcdBackend> {
        let endpoints = http::parse_endpoints(&b.url)?;
        let tls = if endpoints[0].is_tls() {
            Some(crate::backend::load_tls_files(
                &b.etcd_tls,
                "etcd_tls_ca_file",
                "etcd_tls_client_cert",
                "https://",
            )?)
        } else if b.etcd_tls.is_set() {
            // A TLS setting is never ignored: plain text where TLS was asked for.
            return Err(Error::InvalidConfig(format!(
                "etcd_tls_ca_file or etcd_tls_client_cert is set, but the endpoints ({}) are \
                 not https://",
                http::describe_endpoints(&b.url)
            )));
        } else {
            None
        };
        let gateway = Gateway::new(endpoints, tls)?;
        let (status, _) = gateway
            .call("/v3/maintenance/status", &json!({}), b.connect_timeout)
            .map_err(|e| Error::Connect {
                target: gateway.describe(),
                source: match e {
                    Error::Database(source) => source,
                    other => Arc::new(other),
                },
            })?;
        let version = http::text(&status, "version").unwrap_or_default();
        if !version_supported(&version) {
            return Err(Error::Unsupported(format!(
                "etcd {version:?} at {}: lockbox needs etcd 3.4 or later (its /v3 JSON gateway)",
                gateway.describe()
            )));
        }
        Ok(EtcdBackend {
            shared: Arc::new(Shared {
                gateway,
                request_timeout: b.connect_timeout,
                record_lease: Mutex::new(None),
            }),
        })
    }

    /// The bound of one request of `req`'s: the request timeout, and no more
    /// than what is left of its wait (but at least [`MIN_REQUEST`]).
    fn limit(&self, req: &AcquireRequest<'_>) -> Duration {
        let timeout = self.shared.request_timeout;
        match req.remaining() {
            None => timeout,
            Some(left) => timeout.min(left.max(MIN_REQUEST)),
        }
    }
}

/// `major.minor` at least 3.4.
fn version_supported(version: &str) -> bool {
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (major, minor) >= (3, 4)
}

/// A lease granted for an acquire, revoked unless handed over to the lock.
struct Queued<'a> {
    shared: &'a Shared,
    lease: i64,
    armed: bool,
}

impl Queued<'_> {
    /// Revokes the lease now, within `limit`; when that fails, it runs out by
    /// itself.
    fn give_up(mut self, limit: Duration) {
        self.armed = false;
        if let Err(e) = self.shared.revoke(self.lease, limit) {
            log::debug!(
                "lockbox: etcd lease {:x} of a waiter that gave up not revoked ({e}); it runs \
                 out by itself",
                self.lease
            );
        }
    }
}

impl Drop for Queued<'_> {
    /// On a failure: revoked on a thread of its own, so the error is reported
    /// without waiting for that too.
    fn drop(&mut self) {
        if self.armed {
            self.shared.revoke_later(self.lease);
        }
    }
}

/// An acquire's key at the back of its name's queue, for
/// [`EtcdBackend::enqueue`]'s caller to wait on and grant.
struct Enqueued<'a> {
    /// The key's lease, revoked unless granted.
    queued: Queued<'a>,
    place: Place,
    /// When the lease's grant (or last keep-alive) was sent.
    lease_sent: Instant,
    /// The enqueueing transaction's answer, and its ranges (the queue as it
    /// read it).
    answer: serde_json::Value,
    ranges: Vec<serde_json::Value>,
}

/// Where an acquire's key stands: what its grant is made of.
struct Place {
    key: String,
    lease: i64,
    /// The lease's TTL in seconds, as etcd granted it.
    granted: i64,
    /// The key's create revision: the grant's token (0 when the transaction
    /// did not show it).
    mine: i64,
}

impl Place {
    /// The grant of this key: its lease is kept from now on.
    fn grant(
        &self,
        shared: &Arc<Shared>,
        record: &Record,
        mut queued: Queued<'_>,
        lease_sent: Instant,
        waited: bool,
    ) -> Grant {
        queued.armed = false;
        Grant {
            session: Box::new(EtcdSession {
                shared: shared.clone(),
                key: self.key.clone(),
                lease: self.lease,
                granted: self.granted,
                record: record.clone(),
            }),
            token: u64::try_from(self.mine).unwrap_or(0),
            sent_at: lease_sent,
            waited,
        }
    }
}

impl EtcdBackend {
    /// Queues one acquire of any kind: a fresh lease, and a transaction that
    /// writes the key (with `record`, stamped now) at the back of the name's
    /// queue and reads the queue (its `oldest` keys; 0: all of them).
    fn enqueue(
        &self,
        req: &AcquireRequest<'_>,
        record: &Record,
        oldest: i64,
    ) -> Result<Enqueued<'_>> {
        let shared = &*self.shared;
        let name = req.name();
        let (lease, granted, lease_sent) = shared.grant(req.ttl(), self.limit(req))?;
        let queued = Queued {
            shared,
            lease,
            armed: true,
        };
        let key = keys::lock_key(name, lease);
        let value = Record {
            at_ms: now_ms(),
            ..record.clone()
        };
        let (answer, _) = shared.gateway.call(
            "/v3/kv/txn",
            &keys::enqueue(name, &key, &value.to_json(), lease, oldest),
            self.limit(req),
        )?;
        let (created, ranges) = keys::txn_answers(&answer);
        let mine = if created {
            revision(&answer)
        } else {
            ranges
                .first()
                .and_then(|r| kvs(r).into_iter().next())
                .map_or(0, |kv| kv.create_revision)
        };
        Ok(Enqueued {
            queued,
            place: Place {
                key,
                lease,
                granted,
                mine,
            },
            lease_sent,
            answer,
            ranges,
        })
    }
}

impl Backend for EtcdBackend {
    fn acquire(&self, req: &AcquireRequest<'_>) -> Result<Option<Grant>> {
        if !req.kind().is_exclusive() {
            return self.acquire_shared(req);
        }
        let shared = &*self.shared;
        let gateway = &shared.gateway;
        let name = req.name();
        let renew_every = req.ttl() / 3;
        let mut waited = false;
        let mut _waiting = None;
        let record = Record {
            owner: req.owner().to_owned(),
            metadata: req.metadata().map(str::to_owned),
            at_ms: 0,
            token: 0,
            kind: LeaseKind::Exclusive,
        };
        // Each round queues a new key; a waiter whose lease ran out (its
        // keep-alives failed) starts again at the back of the queue.
        'queue: loop {
            let Enqueued {
                queued,
                place,
                mut lease_sent,
                answer,
                ranges,
            } = self.enqueue(req, &record, 1)?;
            let (key, mine, lease) = (&place.key, place.mine, place.lease);
            // Any key counts in the queue, even one lockbox did not write.
            let first = ranges
                .last()
                .and_then(queue)
                .and_then(|q| q.into_iter().next());
            if mine <= 0 || first.is_none() {
                return Err(unexpected("the enqueueing transaction", answer));
            }
            let grant = |queued: Queued<'_>, lease_sent: Instant, waited: bool| {
                place.grant(&self.shared, &record, queued, lease_sent, waited)
            };
            if first.is_some_and(|kv| kv.is(key)) {
                return Ok(Some(grant(queued, lease_sent, false)));
            }
            if req.wait() == Wait::No {
                queued.give_up(self.limit(req));
                return Ok(None);
            }
            let mut next_keep_alive = lease_sent + renew_every;
            // A waiter's requests are bounded by what is left of its own
            // lease (the TTL from the last keep-alive's sending), not only by
            // the request timeout: a member that does not answer must be
            // given up on while there is still time to keep the lease alive
            // on another, or the waiter loses its place in the queue.
            let ttl = req.ttl();
            let bound = |lease_sent: Instant| {
                self.limit(req)
                    .min((lease_sent + ttl).saturating_duration_since(Instant::now()))
            };
            loop {
                if bound(lease_sent).is_zero() {
                    // Its lease may be gone: queue again.
                    drop(queued);
                    continue 'queue;
                }
                // This waiter's key and the one just ahead of it.
                let (answer, _) = gateway.call(
                    "/v3/kv/range",
                    &keys::range_of_name(name, true, 2, mine),
                    bound(lease_sent),
                )?;
                let read_at = revision(&answer);
                // Watched from the next revision; a read from before this
                // waiter's own key, or at the last revision there can be, is
                // no answer etcd gives.
                let Some(watch_from) = read_at.checked_add(1).filter(|_| read_at >= mine) else {
                    return Err(unexpected("a read of the queue", answer));
                };
                // Every key ahead counts, whatever its bytes: one skipped
                // would let this waiter past a holder.
                let Some(found) = queue(&answer) else {
                    return Err(unexpected("a read of the queue", answer));
                };
                match found.first() {
                    Some(kv) if kv.is(key) && kv.create_revision == mine => {}
                    // The lease ran out while this waiter could not keep it
                    // alive: queue again.
                    _ => {
                        drop(queued);
                        continue 'queue;
                    }
                }
                let Some(ahead) = found.get(1) else {
                    return Ok(Some(grant(queued, lease_sent, waited)));
                };
                waited = true;
                _waiting.get_or_insert_with(|| req.waiting());
                let now = Instant::now();
                let give_up_at = match req.wait() {
                    Wait::Until(until) => Some(until),
                    _ => None,
                };
                if give_up_at.is_some_and(|at| at <= now) {
                    queued.give_up(self.limit(req).min(MIN_REQUEST));
                    return Ok(None);
                }
                let until = give_up_at.map_or(next_keep_alive, |at| at.min(next_keep_alive));
                match watch::deletion(gateway, &ahead.raw_key, watch_from, until) {
                    Woken::Deleted => {}
                    Woken::Broken(why) => {
                        log::debug!(
                            "lockbox: etcd watch for {name:?} broke ({why}); looking again"
                        );
                        // Not a hot loop when a member keeps failing.
                        std::thread::sleep(
                            Duration::from_millis(50)
                                .min(until.saturating_duration_since(Instant::now())),
                        );
                    }
                    Woken::TimedOut => {}
                }
                if Instant::now() >= next_keep_alive {
                    let limit = bound(lease_sent);
                    if limit.is_zero() {
                        drop(queued);
                        continue 'queue;
                    }
                    match shared.keep_alive(lease, req.ttl(), limit)? {
                        Some(sent) => {
                            lease_sent = sent;
                            next_keep_alive = sent + renew_every;
                        }
                        None => {
                            drop(queued);
                            continue 'queue;
                        }
                    }
                }
            }
        }
    }

    fn probe(&self, timeout: Duration) -> DatabaseHealth {
        inspect::probe(&self.shared.gateway, timeout)
    }

    fn pool_health(&self) -> PoolHealth {
        // No pool to run out of: HTTP connections are opened as needed and
        // the idle ones kept for reuse.
        PoolHealth {
            max_size: u32::MAX,
            ..PoolHealth::default()
        }
    }

    fn leases(&self, name: Option<&str>) -> Result<Vec<LeaseInfo>> {
        inspect::leases(&self.shared, name)
    }

    /// Every kind: shared leases queue with exclusive ones (see
    /// [`LockClient::etcd`](crate::LockClient::etcd)).
    fn supports(&self, kind: LeaseKind) -> bool {
        matches!(
            kind,
            LeaseKind::Exclusive | LeaseKind::Shared | LeaseKind::Permit { .. }
        )
    }

    /// An etcd watch on the name's keys from the revision read now: it wakes
    /// on every change of them (grants, releases, leases that end, waiters),
    /// announced or not — more often than needed, never less.
    fn watch(&self, name: &str) -> Result<Box<dyn Watch>> {
        let prefix = keys::name_prefix(name);
        let from = group::current_revision(self, &prefix)?;
        Ok(Box::new(NameWatch::start(
            self.shared.gateway.clone(),
            prefix,
            from.saturating_add(1),
            self.shared.request_timeout,
        )?))
    }

    /// Ends every granted lease of `name` — the exclusive holder, or every
    /// shared one — by revoking its etcd lease (which deletes its key; a key
    /// lockbox did not write is deleted). Waiters stay queued. The holders
    /// learn of it at their next renewal (their lease is gone); the next
    /// grant's token, a later create revision, is above every ended one.
    fn force_release(&self, name: &str) -> Result<Option<u64>> {
        inspect::force_release(&self.shared, name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions() {
        assert!(version_supported("3.4.23"));
        assert!(version_supported("3.5.0"));
        assert!(version_supported("4.0.0"));
        assert!(!version_supported("3.3.9"));
        assert!(!version_supported(""));
    }

    #[test]
    fn lease_seconds_round_up() {
        assert_eq!(session::lease_secs(Duration::from_millis(100)), 1);
        assert_eq!(session::lease_secs(Duration::from_millis(1500)), 2);
        assert_eq!(session::lease_secs(Duration::from_secs(30)), 30);
        assert_eq!(session::lease_secs(Duration::from_millis(30_001)), 31);
    }
}
