//! [`MemoryBackend`]: a process-local lock store with the same semantics.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use parking_lot::{Condvar, Mutex};

use crate::backend::{AcquireRequest, Backend, Grant, LeaseRef, Release, Renewal, Session, Wait};
use crate::error::{LostReason, Result};
use crate::health::{DatabaseHealth, PoolHealth};
use crate::lease_info::{LeaseInfo, LeaseStatus};

/// A lock store in this process's memory: zero setup, the same semantics as the
/// database stores. Leases expire by the monotonic clock; fencing tokens increase
/// per name for as long as the store exists; waiters sleep on a condition variable
/// and wake on a release or when the holder's lease runs out, never by polling.
///
/// For single-process programs, and for unit tests of code that takes a lock.
/// Clones share one store; [`LockClient::memory`](crate::LockClient::memory) uses
/// a process-wide one, [`MemoryBackend::new`] an isolated one.
///
/// Not a distributed lock: other processes do not see it, and its tokens restart
/// from 1 with the process.
#[derive(Debug, Clone, Default)]
pub struct MemoryBackend {
    inner: Arc<Store>,
}

#[derive(Debug, Default)]
struct Store {
    leases: Mutex<HashMap<String, Lease>>,
    /// Notified on every release.
    released: Condvar,
}

#[derive(Debug, Clone)]
struct Lease {
    owner: String,
    token: u64,
    metadata: Option<String>,
    expires: Instant,
    released_at: Option<SystemTime>,
    acquired_at: SystemTime,
    renewed_at: SystemTime,
    /// Whether the guard's session still exists (the analogue of a live database
    /// session holding the advisory lock).
    session_alive: bool,
}

impl Lease {
    fn is_free(&self, now: Instant) -> bool {
        self.released_at.is_some() || self.expires <= now
    }
}

impl MemoryBackend {
    /// A new, empty store of its own.
    pub fn new() -> MemoryBackend {
        MemoryBackend::default()
    }

    /// The process-wide store.
    pub fn global() -> MemoryBackend {
        static GLOBAL: OnceLock<MemoryBackend> = OnceLock::new();
        GLOBAL.get_or_init(MemoryBackend::new).clone()
    }
}

impl Backend for MemoryBackend {
    fn acquire(&self, req: &AcquireRequest<'_>) -> Result<Option<Grant>> {
        let mut waited = false;
        let mut _waiting = None;
        let mut leases = self.inner.leases.lock();
        loop {
            let now = Instant::now();
            let current = leases.get(req.name());
            if current.is_none_or(|l| l.is_free(now)) {
                let token = current.map_or(1, |l| l.token + 1);
                let wall = SystemTime::now();
                leases.insert(
                    req.name().to_owned(),
                    Lease {
                        owner: req.owner().to_owned(),
                        token,
                        metadata: req.metadata().map(str::to_owned),
                        expires: now + req.ttl(),
                        released_at: None,
                        acquired_at: wall,
                        renewed_at: wall,
                        session_alive: true,
                    },
                );
                let session = MemorySession {
                    store: self.inner.clone(),
                };
                return Ok(Some(Grant {
                    session: Box::new(session),
                    token,
                    // The lease runs from `now`, taken before it was written.
                    sent_at: now,
                    waited,
                }));
            }
            let expires = current.map_or(now, |l| l.expires);
            let until = match req.wait() {
                Wait::No => return Ok(None),
                Wait::Until(until) if until <= now => return Ok(None),
                Wait::Until(until) => until.min(expires),
                Wait::Forever => expires,
            };
            waited = true;
            _waiting.get_or_insert_with(|| req.waiting());
            // Woken by a release, or at the holder's expiry (or our deadline).
            self.inner.released.wait_until(&mut leases, until);
        }
    }

    fn probe(&self, _timeout: Duration) -> DatabaseHealth {
        let start = Instant::now();
        drop(self.inner.leases.lock());
        DatabaseHealth {
            reachable: true,
            latency: Some(start.elapsed()),
            server_version: Some("in-memory".to_owned()),
            session_state_kept: Some(true),
            error: None,
            listener_alive: None,
            writable: None,
        }
    }

    fn pool_health(&self) -> PoolHealth {
        // No pool: never saturated.
        PoolHealth {
            max_size: u32::MAX,
            ..PoolHealth::default()
        }
    }

    fn leases(&self, name: Option<&str>) -> Result<Vec<LeaseInfo>> {
        let now = Instant::now();
        let wall = SystemTime::now();
        let leases = self.inner.leases.lock();
        let mut out: Vec<LeaseInfo> = leases
            .iter()
            .filter(|(n, _)| name.is_none_or(|want| want == n.as_str()))
            .map(|(n, l)| {
                let status = match l.released_at {
                    Some(at) => LeaseStatus::Released { at },
                    None if l.expires > now => LeaseStatus::Held {
                        expires_in: l.expires - now,
                    },
                    None => LeaseStatus::Expired {
                        ago: now - l.expires,
                    },
                };
                let expires_at = if l.expires > now {
                    wall + (l.expires - now)
                } else {
                    wall - (now - l.expires)
                };
                LeaseInfo {
                    name: n.clone(),
                    owner: l.owner.clone(),
                    metadata: l.metadata.clone(),
                    fencing_token: l.token,
                    holder_pid: std::process::id() as i32,
                    acquired_at: l.acquired_at,
                    renewed_at: l.renewed_at,
                    expires_at,
                    status,
                    holder_alive: l.session_alive && l.released_at.is_none(),
                }
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }
}

/// A held in-memory lock.
#[derive(Debug)]
struct MemorySession {
    store: Arc<Store>,
}

impl MemorySession {
    /// The lease of `lease`, if it is still that grant.
    fn ours<'m>(
        leases: &'m mut HashMap<String, Lease>,
        lease: &LeaseRef<'_>,
    ) -> Option<&'m mut Lease> {
        leases
            .get_mut(lease.name)
            .filter(|l| l.token == lease.token && l.owner == lease.owner)
    }
}

impl Session for MemorySession {
    fn renew(&mut self, lease: &LeaseRef<'_>, ttl: Duration) -> Result<Renewal> {
        let now = Instant::now();
        let mut leases = self.store.leases.lock();
        match Self::ours(&mut leases, lease) {
            Some(l) if !l.is_free(now) => {
                l.expires = now + ttl;
                l.renewed_at = SystemTime::now();
                Ok(Renewal::Renewed)
            }
            _ => Ok(Renewal::Lost(LostReason::NotOwner)),
        }
    }

    fn release(self: Box<Self>, lease: &LeaseRef<'_>) -> Result<Release> {
        let now = Instant::now();
        let outcome = {
            let mut leases = self.store.leases.lock();
            match Self::ours(&mut leases, lease) {
                Some(l) if l.released_at.is_none() => {
                    let was_live = l.expires > now;
                    l.released_at = Some(SystemTime::now());
                    l.session_alive = false;
                    if was_live {
                        Release::Released
                    } else {
                        Release::WasExpired
                    }
                }
                _ => Release::NotOwner,
            }
        };
        self.store.released.notify_all();
        Ok(outcome)
    }
}
