//! [`MemoryBackend`]: a process-local lock store with the same semantics.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use parking_lot::{Condvar, Mutex};

use crate::backend::{
    AcquireRequest, Backend, Grant, LeaseKind, LeaseRef, Release, Renewal, Session, Wait,
};
use crate::error::{LostReason, Result};
use crate::health::{DatabaseHealth, PoolHealth};
use crate::lease_info::{LeaseInfo, LeaseStatus};

/// A lock store in this process's memory: zero setup, the same semantics as the
/// database stores. Leases expire by the monotonic clock; fencing tokens increase
/// per name for as long as the store exists; waiters sleep on a condition variable
/// and wake on a release or when the holder's lease runs out, never by polling.
///
/// **Bounded memory.** The state of released and expired names is reclaimed,
/// so a program that locks per order or per file does not grow without bound:
/// the store keeps the [`RETAINED_FREE`](Self::RETAINED_FREE) most recent free
/// leases for [`leases`](Backend::leases) and reclaims older ones, a constant
/// amount of work per grant (with very many locks held at once, up to about a
/// third as many free leases as held ones may wait their turn). Tokens keep
/// increasing per name while the store remembers it; a name it does not (new,
/// or reclaimed) starts above every token the store has issued, so no name's
/// token ever repeats or goes back.
///
/// **Abandoned locks.** A lock whose session is dropped without a release (its
/// holder gave up on it, or the renewal thread stopped) is no longer reported
/// `holder_alive`; its lease runs out at its TTL like a crashed holder's.
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
    state: Mutex<State>,
    /// Notified on every release.
    released: Condvar,
}

/// Everything behind the store's one mutex.
#[derive(Debug, Default)]
struct State {
    leases: HashMap<String, Lease>,
    /// Every name in `leases`, once, roughly oldest first: the reclaim cursor.
    order: VecDeque<String>,
    /// How many leases have `session_alive` set.
    alive: usize,
    /// The highest token this store has issued, for any name. A name without
    /// an entry (new, or reclaimed) starts above it, so no name's token ever
    /// repeats or goes back even though its entry was forgotten.
    high_water: u64,
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

/// How many entries at the front of the reclaim queue each grant examines. Above
/// 1 (a grant adds at most one entry), so free entries beyond the retained ones
/// are reclaimed faster than they can be created.
const RECLAIM_STEPS: usize = 4;

impl State {
    /// The token for a new grant of `name`: the next of its own sequence while
    /// the store remembers it, else above every token issued so far.
    fn next_token(&self, name: &str) -> u64 {
        match self.leases.get(name) {
            Some(l) => l.token + 1,
            None => self.high_water + 1,
        }
    }

    /// Records a grant, replacing any free lease of the name.
    fn grant(&mut self, name: &str, lease: Lease) {
        self.high_water = self.high_water.max(lease.token);
        self.alive += 1;
        match self.leases.get_mut(name) {
            Some(old) => {
                // A free lease whose session is still alive is an expired holder
                // being taken over: that session no longer counts.
                if old.session_alive {
                    self.alive -= 1;
                }
                *old = lease;
            }
            None => {
                self.leases.insert(name.to_owned(), lease);
                self.order.push_back(name.to_owned());
            }
        }
    }

    /// Marks the session holding `lease` gone, keeping the `alive` count.
    fn session_ended(lease: &mut Lease, alive: &mut usize) {
        if lease.session_alive {
            lease.session_alive = false;
            *alive -= 1;
        }
    }

    /// Reclaims free entries beyond the [`MemoryBackend::RETAINED_FREE`] most
    /// recent ones, examining at most [`RECLAIM_STEPS`] entries: constant work.
    /// An entry is reclaimable when its lease is free and no session holds it (an
    /// expired lease whose session lives on still answers that holder's
    /// release); others go to the back of the queue.
    fn reclaim(&mut self, now: Instant) {
        for _ in 0..RECLAIM_STEPS {
            if self.leases.len() - self.alive <= MemoryBackend::RETAINED_FREE {
                return;
            }
            let Some(name) = self.order.pop_front() else {
                return;
            };
            match self.leases.get(&name) {
                Some(l) if l.is_free(now) && !l.session_alive => {
                    self.leases.remove(&name);
                }
                Some(_) => self.order.push_back(name),
                None => {}
            }
        }
    }
}

impl MemoryBackend {
    /// How many released or expired leases the store keeps for inspection
    /// ([`LockClient::leases`](crate::LockClient::leases)) before it reclaims the
    /// oldest. Held leases are always kept.
    pub const RETAINED_FREE: usize = 1024;

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
        let mut state = self.inner.state.lock();
        loop {
            let now = Instant::now();
            let current = state.leases.get(req.name());
            if current.is_none_or(|l| l.is_free(now)) {
                let token = state.next_token(req.name());
                let wall = SystemTime::now();
                state.grant(
                    req.name(),
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
                state.reclaim(now);
                let session = MemorySession {
                    store: self.inner.clone(),
                    name: req.name().to_owned(),
                    token,
                    ended: false,
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
            self.inner.released.wait_until(&mut state, until);
        }
    }

    fn probe(&self, _timeout: Duration) -> DatabaseHealth {
        let start = Instant::now();
        drop(self.inner.state.lock());
        DatabaseHealth {
            reachable: true,
            latency: Some(start.elapsed()),
            server_version: Some("in-memory".to_owned()),
            session_state_kept: Some(true),
            error: None,
            listener_alive: None,
            writable: None,
            warnings: Vec::new(),
            lease_table: None,
            cluster: None,
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
        let state = self.inner.state.lock();
        let mut out: Vec<LeaseInfo> = state
            .leases
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
                    kind: LeaseKind::Exclusive,
                }
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    fn force_release(&self, name: &str) -> Result<Option<u64>> {
        let ended = {
            let mut state = self.inner.state.lock();
            let State { leases, alive, .. } = &mut *state;
            match leases.get_mut(name) {
                Some(l) if l.released_at.is_none() => {
                    // The holder's renewal now finds the lease free (not its
                    // own); its session no longer counts as holding it. The
                    // entry (and its token) stays, so the next grant is above.
                    l.released_at = Some(SystemTime::now());
                    State::session_ended(l, alive);
                    Some(l.token)
                }
                _ => None,
            }
        };
        if ended.is_some() {
            self.inner.released.notify_all();
        }
        Ok(ended)
    }
}

/// A held in-memory lock. Dropping it without a release marks its lease's
/// holder gone (the lease itself runs out at its TTL).
#[derive(Debug)]
struct MemorySession {
    store: Arc<Store>,
    /// The grant this session holds: `(name, token)` identifies it for good.
    name: String,
    token: u64,
    /// Set by a release, after which the drop has nothing to do.
    ended: bool,
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
        let mut state = self.store.state.lock();
        match Self::ours(&mut state.leases, lease) {
            Some(l) if !l.is_free(now) => {
                l.expires = now + ttl;
                l.renewed_at = SystemTime::now();
                Ok(Renewal::Renewed)
            }
            _ => Ok(Renewal::Lost(LostReason::NotOwner)),
        }
    }

    fn release(mut self: Box<Self>, lease: &LeaseRef<'_>) -> Result<Release> {
        let now = Instant::now();
        self.ended = true;
        let outcome = {
            let mut state = self.store.state.lock();
            let State { leases, alive, .. } = &mut *state;
            match Self::ours(leases, lease) {
                Some(l) if l.released_at.is_none() => {
                    let was_live = l.expires > now;
                    l.released_at = Some(SystemTime::now());
                    State::session_ended(l, alive);
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

impl Drop for MemorySession {
    fn drop(&mut self) {
        if self.ended {
            return;
        }
        // Abandoned without a release: like a crashed holder's session, it no
        // longer holds the lock, and its lease runs out by itself. Only this very
        // grant is touched (a later holder of the name has another token).
        let mut state = self.store.state.lock();
        let State { leases, alive, .. } = &mut *state;
        if let Some(l) = leases.get_mut(&self.name)
            && l.token == self.token
        {
            State::session_ended(l, alive);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::Telemetry;

    fn request<'a>(name: &'a str, ttl: Duration, telemetry: &'a Telemetry) -> AcquireRequest<'a> {
        AcquireRequest {
            name,
            owner: "owner",
            ttl,
            metadata: None,
            wait: Wait::No,
            dedicated: false,
            kind: LeaseKind::Exclusive,
            announce: false,
            telemetry,
        }
    }

    fn lease_of(store: &MemoryBackend, name: &str) -> LeaseInfo {
        store.leases(Some(name)).unwrap().pop().expect("listed")
    }

    /// A session dropped without a release is reported dead at once; its lease
    /// stands until its TTL (nobody is granted before), like a crashed holder's.
    #[test]
    fn a_dropped_session_is_not_alive_and_its_lease_runs_out() {
        let store = MemoryBackend::new();
        let telemetry = Telemetry::new(None, String::new()).unwrap();
        let ttl = Duration::from_millis(200);
        let grant = store
            .acquire(&request("n", ttl, &telemetry))
            .unwrap()
            .unwrap();
        assert!(lease_of(&store, "n").holder_alive);
        drop(grant.session);
        let info = lease_of(&store, "n");
        assert!(!info.holder_alive, "{info:?}");
        assert!(matches!(info.status, LeaseStatus::Held { .. }), "{info:?}");
        assert!(
            store
                .acquire(&request("n", ttl, &telemetry))
                .unwrap()
                .is_none()
        );
        let mut wait = request("n", ttl, &telemetry);
        wait.wait = Wait::Until(Instant::now() + Duration::from_secs(5));
        let next = store.acquire(&wait).unwrap().expect("free at the TTL");
        assert!(next.sent_at >= grant.sent_at + ttl);
        assert!(next.token > grant.token);
        assert!(lease_of(&store, "n").holder_alive);
        // The old session's end does not touch the new holder's lease.
        assert_eq!(store.inner.state.lock().alive, 1);
    }

    /// Releasing marks the holder gone once; the drop after it changes nothing.
    #[test]
    fn release_then_drop_counts_the_session_once() {
        let store = MemoryBackend::new();
        let telemetry = Telemetry::new(None, String::new()).unwrap();
        let ttl = Duration::from_secs(5);
        let grant = store
            .acquire(&request("n", ttl, &telemetry))
            .unwrap()
            .unwrap();
        let lease = LeaseRef {
            name: "n",
            owner: "owner",
            token: grant.token,
            limit: ttl,
        };
        assert_eq!(grant.session.release(&lease).unwrap(), Release::Released);
        assert_eq!(store.inner.state.lock().alive, 0);
        assert!(!lease_of(&store, "n").holder_alive);
    }
}
