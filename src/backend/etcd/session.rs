//! [`EtcdSession`]: a held etcd lock — its lease, kept alive by the client's
//! renewal thread, and its key; and the lease requests every part of the
//! backend uses.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::backend::{LeaseRef, Release, Renewal, Session};
use crate::error::{Error, LostReason, Result};

use super::http::{EtcdError, int};
use super::keys::{self, Record, b64};
use super::{Shared, unexpected};

/// The etcd lease TTL, in whole seconds, for a lock TTL: rounded up, at least
/// one. etcd may raise it further, to its minimum (1.5 × the election
/// timeout, rounded up to a second: 2 s by default).
pub(crate) fn lease_secs(ttl: Duration) -> i64 {
    let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    i64::try_from(secs.max(1)).unwrap_or(i64::MAX)
}

/// Checks a lease's TTL as etcd answered it against the lock's: the holder's
/// local deadline (the lock's TTL from the request's sending) must end before
/// the lease (etcd's TTL from no earlier than that), so etcd's may not be
/// shorter.
fn check_ttl(granted: i64, ttl: Duration) -> Result<()> {
    let granted_for = Duration::from_secs(u64::try_from(granted).unwrap_or(0));
    if granted_for < ttl {
        return Err(unexpected(
            "a lease request",
            format!("a lease of {granted} s, shorter than the lock's TTL {ttl:?}"),
        ));
    }
    Ok(())
}

impl Shared {
    /// Grants a lease for a lock of `ttl`: its id, its TTL in seconds as etcd
    /// granted it, and when the request that got it was sent (the lease runs
    /// from no earlier).
    pub(crate) fn grant(&self, ttl: Duration, limit: Duration) -> Result<(i64, i64, Instant)> {
        let secs = lease_secs(ttl);
        let (answer, sent) =
            self.gateway
                .call("/v3/lease/grant", &json!({"TTL": secs.to_string()}), limit)?;
        let id = int(&answer, "ID");
        if id == 0 {
            return Err(unexpected("a lease grant", answer));
        }
        let granted = int(&answer, "TTL");
        if let Err(e) = check_ttl(granted, ttl) {
            self.revoke_later(id);
            return Err(e);
        }
        Ok((id, granted, sent))
    }

    /// Refreshes lease `id` for a lock of `ttl`: `Some(sent)` (when the
    /// request was sent) while it lives, `None` once it is gone.
    pub(crate) fn keep_alive(
        &self,
        id: i64,
        ttl: Duration,
        limit: Duration,
    ) -> Result<Option<Instant>> {
        let (answer, sent) =
            self.gateway
                .call("/v3/lease/keepalive", &json!({"ID": id.to_string()}), limit)?;
        let result = answer.get("result").unwrap_or(&answer);
        let granted = int(result, "TTL");
        if granted <= 0 {
            return Ok(None);
        }
        check_ttl(granted, ttl)?;
        Ok(Some(sent))
    }

    /// Revokes lease `id` (deleting its keys): `true` when it was there.
    pub(crate) fn revoke(&self, id: i64, limit: Duration) -> Result<bool> {
        match self
            .gateway
            .call("/v3/lease/revoke", &json!({"ID": id.to_string()}), limit)
        {
            Ok(_) => Ok(true),
            Err(Error::Database(e))
                if e.downcast_ref::<EtcdError>()
                    .is_some_and(EtcdError::lease_not_found) =>
            {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Revokes lease `id` on a thread of its own, within the request timeout:
    /// for a lease given up after a failure, whose caller should not wait.
    /// When it fails, the lease runs out by itself.
    pub(crate) fn revoke_later(&self, id: i64) {
        let gateway = self.gateway.clone();
        let limit = self.request_timeout;
        let spawned = std::thread::Builder::new()
            .name("lockbox-etcd-revoke".to_owned())
            .spawn(move || {
                let body = json!({"ID": id.to_string()});
                if let Err(e) = gateway.call("/v3/lease/revoke", &body, limit) {
                    log::debug!(
                        "lockbox: etcd lease {id:x} not revoked ({e}); it runs out by itself"
                    );
                }
            });
        if let Err(e) = spawned {
            log::debug!("lockbox: etcd lease {id:x} not revoked ({e}); it runs out by itself");
        }
    }

    /// The client-wide lease release records are written on: one granted for
    /// [`RELEASED_RETENTION`](super::RELEASED_RETENTION) and used for half of
    /// it, so a record stays between half of that and all of it. `None` when
    /// none can be had in time: the release then writes no record (one
    /// without a lease would stay for ever).
    fn record_lease(&self, limit: Duration) -> Option<i64> {
        let retention = super::RELEASED_RETENTION;
        if let Some((id, granted)) = *self.record_lease.lock()
            && granted.elapsed() < retention / 2
        {
            return Some(id);
        }
        let sent = Instant::now();
        let body = json!({"TTL": retention.as_secs().to_string()});
        match self.gateway.call("/v3/lease/grant", &body, limit) {
            Ok((answer, _)) if int(&answer, "ID") != 0 => {
                let id = int(&answer, "ID");
                *self.record_lease.lock() = Some((id, sent));
                Some(id)
            }
            _ => None,
        }
    }

    fn forget_record_lease(&self, id: i64) {
        let mut cached = self.record_lease.lock();
        if cached.is_some_and(|(cached, _)| cached == id) {
            *cached = None;
        }
    }
}

/// A held lock: its key and lease.
pub(crate) struct EtcdSession {
    pub shared: Arc<Shared>,
    pub key: String,
    pub lease: i64,
    /// The lease's TTL in seconds, as etcd granted it.
    pub granted: i64,
    pub record: Record,
}

impl std::fmt::Debug for EtcdSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdSession")
            .field("key", &self.key)
            .field("lease", &format_args!("{:x}", self.lease))
            .finish_non_exhaustive()
    }
}

impl Session for EtcdSession {
    /// Keeps the lease alive, then checks that the key is still the one
    /// granted (created at the token, on this lease): two requests, both
    /// within the limit.
    ///
    /// An etcd lease keeps the TTL it was granted with: a renewal for a longer
    /// TTL ([`Lock::extend`](crate::Lock::extend)) is refused with
    /// [`Error::Unsupported`] before anything is sent, and the lock keeps its
    /// TTL; a shorter one renews the whole lease.
    fn renew(&mut self, lease: &LeaseRef<'_>, ttl: Duration) -> Result<Renewal> {
        if Duration::from_secs(u64::try_from(self.granted).unwrap_or(0)) < ttl {
            return Err(Error::Unsupported(format!(
                "etcd cannot lengthen a lease: the lease of lock {:?} was granted for {} s,                  shorter than {ttl:?}; extend it up to that, or acquire it with the longer TTL",
                lease.name, self.granted
            )));
        }
        let deadline = Instant::now() + lease.limit;
        if self
            .shared
            .keep_alive(self.lease, ttl, lease.limit)?
            .is_none()
        {
            return Ok(Renewal::Lost(LostReason::NotOwner));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(unexpected("a renewal", "no time left to check the key"));
        }
        let (answer, _) =
            self.shared
                .gateway
                .call("/v3/kv/range", &json!({"key": b64(&self.key)}), left)?;
        let ours = keys::kvs(&answer).first().is_some_and(|kv| {
            u64::try_from(kv.create_revision) == Ok(lease.token) && kv.lease == self.lease
        });
        Ok(if ours {
            Renewal::Renewed
        } else {
            Renewal::Lost(LostReason::NotOwner)
        })
    }

    /// Deletes the key if it is still the one granted, writing the release
    /// record, in one transaction; then revokes the lease. All within the
    /// limit; a revoke that fails is only logged (the lease, with no key left,
    /// runs out by itself).
    fn release(self: Box<Self>, lease: &LeaseRef<'_>) -> Result<Release> {
        let deadline = Instant::now() + lease.limit;
        let left = || deadline.saturating_duration_since(Instant::now());
        let record = Record {
            token: lease.token,
            at_ms: super::now_ms(),
            ..self.record.clone()
        }
        .to_json();
        let mut record_lease = self.shared.record_lease(left() / 4);
        let mut retried = false;
        let answer = loop {
            let txn = keys::release(lease.name, &self.key, lease.token, &record, record_lease);
            match self.shared.gateway.call("/v3/kv/txn", &txn, left()) {
                Ok((answer, _)) => break answer,
                // The record lease ran out (a client idle for long, a cluster
                // restored from a backup): write the record on a new one.
                Err(Error::Database(e))
                    if !retried
                        && record_lease.is_some()
                        && e.downcast_ref::<EtcdError>()
                            .is_some_and(EtcdError::lease_not_found) =>
                {
                    retried = true;
                    if let Some(id) = record_lease {
                        self.shared.forget_record_lease(id);
                    }
                    record_lease = self.shared.record_lease(left() / 4);
                }
                Err(e) => return Err(e),
            }
        };
        let (succeeded, ranges) = keys::txn_answers(&answer);
        let outcome = if succeeded {
            Release::Released
        } else {
            let previous = ranges
                .first()
                .and_then(|r| keys::kvs(r).into_iter().next())
                .map(|kv| Record::parse(kv.value.as_deref()));
            if previous.is_some_and(|p| p.token == lease.token && p.owner == self.record.owner) {
                // Sent twice (a failover after the first answer was lost).
                Release::Released
            } else {
                Release::NotOwner
            }
        };
        match self.shared.revoke(self.lease, left()) {
            Ok(false) if outcome == Release::NotOwner => return Ok(Release::WasExpired),
            Ok(_) => {}
            Err(e) => {
                log::debug!(
                    "lockbox: etcd lease {:x} of {:?} not revoked ({e}); it runs out by itself",
                    self.lease,
                    lease.name
                );
            }
        }
        Ok(outcome)
    }
}
