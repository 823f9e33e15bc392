//! [`MemoryBackend`]: a process-local lock store with the same semantics.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use parking_lot::{Condvar, Mutex};

use crate::backend::{
    AcquireRequest, Backend, Grant, LeaseKind, LeaseRef, Release, Renewal, Session, Wait, Watch,
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
    /// Notified on every release (and when the last waiting writer of a name
    /// stops waiting).
    released: Condvar,
    /// Notified on every announced change of a watched name.
    changed: Condvar,
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
    /// The shared leases (readers, permits) of names that have some, apart
    /// from the exclusive leases: a name's group is removed once empty.
    groups: HashMap<String, Group>,
    /// Names whose group may hold only ended leases of gone holders (a
    /// holder's session dropped while its lease still stood), oldest first:
    /// the groups' reclaim cursor, so such groups do not outlive their leases
    /// when the name is never granted shared again.
    group_order: VecDeque<String>,
    /// How many exclusive acquires wait for each name: readers and permits
    /// queue behind.
    writers_waiting: HashMap<String, usize>,
    /// The permit acquires waiting for each name, by ticket in arrival
    /// order: a free permit goes to the first of them (see [`State::turn`]).
    permit_queue: HashMap<String, VecDeque<u64>>,
    /// The last ticket handed out.
    tickets: u64,
    /// The watched names: how many watches each has, and how many announced
    /// changes it has seen.
    watched: HashMap<String, (usize, u64)>,
}

/// The shared leases of one name, all of one kind.
#[derive(Debug)]
struct Group {
    kind: LeaseKind,
    /// Live, expired (their holder crashed or stopped renewing) and nothing
    /// else: a release removes its lease.
    holders: Vec<Lease>,
    /// The last token granted to the group.
    last_token: u64,
}

impl Group {
    fn live(&self, now: Instant) -> impl Iterator<Item = &Lease> {
        self.holders.iter().filter(move |l| !l.is_free(now))
    }
}

#[derive(Debug, Clone)]
struct Lease {
    owner: String,
    token: u64,
    /// The highest token issued for the name while this record stands: its
    /// own, or a later shared grant's (carried over when the name's group
    /// ended). The next grant's token is above it. Apart from `token`, which
    /// stays the holder's: its late release or renewal is still recognised
    /// as its own, and the listing shows the token it was granted.
    seq: u64,
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
        let own = self.leases.get(name).map(|l| l.seq);
        let group = self.groups.get(name).map(|g| g.last_token);
        match own.max(group) {
            Some(last) => last + 1,
            None => self.high_water + 1,
        }
    }

    /// What blocks a grant of `kind` on `name` now: `Err` for a kind that can
    /// never share the name with the live group, `Ok(Some(until))` while it is
    /// blocked (until the earliest blocking lease ends: a release wakes the
    /// waiter sooner), `Ok(None)` when it may be granted.
    fn blocked(&self, name: &str, kind: LeaseKind, now: Instant) -> Result<Option<Instant>> {
        let exclusive = self.leases.get(name).filter(|l| !l.is_free(now));
        let group = self.groups.get(name);
        let earliest = |g: &Group| g.live(now).map(|l| l.expires).min();
        if let Some(l) = exclusive {
            if let Some(g) = group.filter(|g| g.kind != kind && g.live(now).next().is_some())
                && !kind.is_exclusive()
            {
                return Err(kind.mismatch(g.kind, name));
            }
            return Ok(Some(l.expires));
        }
        let Some(g) = group else { return Ok(None) };
        let Some(first_end) = earliest(g) else {
            return Ok(None);
        };
        match kind {
            LeaseKind::Exclusive => Ok(Some(first_end)),
            _ if g.kind != kind => Err(kind.mismatch(g.kind, name)),
            LeaseKind::Shared => Ok(None),
            LeaseKind::Permit { permits } => {
                let live = g.live(now).count();
                Ok((live >= permits as usize).then_some(first_end))
            }
        }
    }

    /// Records a shared grant.
    fn grant_shared(&mut self, name: &str, kind: LeaseKind, lease: Lease, now: Instant) {
        self.high_water = self.high_water.max(lease.token);
        let group = self.groups.entry(name.to_owned()).or_insert_with(|| Group {
            kind,
            holders: Vec::new(),
            last_token: 0,
        });
        // Leases that ended with their holder's session are forgotten; an
        // expired one whose session lives on still answers its release.
        group.holders.retain(|l| !l.is_free(now) || l.session_alive);
        group.kind = kind;
        group.last_token = lease.token;
        group.holders.push(lease);
    }

    /// Ends an exclusive acquire's wait for `name`: readers queued behind the
    /// last waiting writer are woken.
    fn stop_waiting(&mut self, name: String, released: &Condvar) {
        if let Some(n) = self.writers_waiting.get_mut(&name) {
            *n -= 1;
            if *n == 0 {
                self.writers_waiting.remove(&name);
                released.notify_all();
            }
        }
    }

    /// Whether a permit acquire holding `ticket` (`None`: not queued) may
    /// take one of the `free` permits of `name` now: only as one of the
    /// first `free` in the queue, so that waiters are served in arrival
    /// order and a newcomer never overtakes them.
    fn turn(&self, name: &str, ticket: Option<u64>, free: usize) -> bool {
        let queue = self.permit_queue.get(name);
        let ahead = match (queue, ticket) {
            (None, _) => 0,
            (Some(q), Some(t)) => q.iter().take_while(|&&other| other != t).count(),
            (Some(q), None) => q.len(),
        };
        ahead < free
    }

    /// Takes `ticket` out of `name`'s permit queue (granted, or given up):
    /// those behind it move up, so they are woken to look again.
    fn leave_queue(&mut self, name: &str, ticket: Option<u64>, released: &Condvar) {
        let Some(ticket) = ticket else { return };
        if let Some(queue) = self.permit_queue.get_mut(name) {
            queue.retain(|&t| t != ticket);
            if queue.is_empty() {
                self.permit_queue.remove(name);
            } else {
                released.notify_all();
            }
        }
    }

    /// The free permits of `name` for an acquire of `permits`.
    fn free_permits(&self, name: &str, permits: u32, now: Instant) -> usize {
        let live = self.groups.get(name).map_or(0, |g| g.live(now).count());
        (permits as usize).saturating_sub(live)
    }

    /// Counts an announced change of `name` for its watchers.
    fn announce(&mut self, name: &str, changed: &Condvar) {
        if let Some((_, seen)) = self.watched.get_mut(name) {
            *seen += 1;
            changed.notify_all();
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

    /// Forgets, examining at most [`RECLAIM_STEPS`] names of `group_order`,
    /// the groups whose every lease has ended with its holder's session gone
    /// (nobody will release them): constant work per grant. The group's last
    /// token is carried over as in a release of its last lease.
    fn reclaim_groups(&mut self, now: Instant) {
        for _ in 0..RECLAIM_STEPS {
            let Some(name) = self.group_order.pop_front() else {
                return;
            };
            let Some(group) = self.groups.get_mut(&name) else {
                continue;
            };
            group.holders.retain(|l| !l.is_free(now) || l.session_alive);
            if group.holders.is_empty() {
                let last = group.last_token;
                self.groups.remove(&name);
                if let Some(l) = self.leases.get_mut(&name) {
                    l.seq = l.seq.max(last);
                }
            } else if group.holders.iter().any(|l| !l.session_alive) {
                // A gone holder's lease still stands: look again later.
                self.group_order.push_back(name);
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
        let kind = req.kind();
        let mut writer_waits = None;
        let mut ticket = None;
        let released = &self.inner.released;
        let mut state = self.inner.state.lock();
        loop {
            let now = Instant::now();
            let mut blocked = match state.blocked(req.name(), kind, now) {
                Ok(blocked) => blocked,
                Err(e) => {
                    state.leave_queue(req.name(), ticket, released);
                    return Err(e);
                }
            };
            // Woken when what holds it back changes (a release, a waiter
            // leaving), not at a time of its own.
            let until_woken = now + Duration::from_secs(3600);
            if blocked.is_none()
                && !kind.is_exclusive()
                && state.writers_waiting.contains_key(req.name())
            {
                // Queued behind the waiting writer (a reader or a permit: an
                // exclusive waiter is not starved by either): woken when it
                // stops waiting.
                blocked = Some(until_woken);
            }
            if let (None, LeaseKind::Permit { permits }) = (blocked, kind) {
                let free = state.free_permits(req.name(), permits, now);
                if !state.turn(req.name(), ticket, free) {
                    // A free permit, but earlier waiters come first.
                    blocked = Some(until_woken);
                }
            }
            if blocked.is_none() {
                let token = state.next_token(req.name());
                let wall = SystemTime::now();
                let lease = Lease {
                    owner: req.owner().to_owned(),
                    token,
                    seq: token,
                    metadata: req.metadata().map(str::to_owned),
                    expires: now + req.ttl(),
                    released_at: None,
                    acquired_at: wall,
                    renewed_at: wall,
                    session_alive: true,
                };
                if kind.is_exclusive() {
                    state.grant(req.name(), lease);
                    state.reclaim(now);
                } else {
                    state.grant_shared(req.name(), kind, lease, now);
                }
                state.reclaim_groups(now);
                if req.announce() {
                    state.announce(req.name(), &self.inner.changed);
                }
                if let Some(waiter) = writer_waits.take() {
                    state.stop_waiting(waiter, released);
                }
                state.leave_queue(req.name(), ticket, released);
                let session = MemorySession {
                    store: self.inner.clone(),
                    name: req.name().to_owned(),
                    token,
                    kind,
                    announce: req.announce(),
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
            let expires = blocked.unwrap_or(now);
            let until = match req.wait() {
                Wait::No => None,
                Wait::Until(until) if until <= now => None,
                Wait::Until(until) => Some(until.min(expires)),
                Wait::Forever => Some(expires),
            };
            let Some(until) = until else {
                if let Some(waiter) = writer_waits.take() {
                    state.stop_waiting(waiter, released);
                }
                state.leave_queue(req.name(), ticket, released);
                return Ok(None);
            };
            waited = true;
            _waiting.get_or_insert_with(|| req.waiting());
            if kind.is_exclusive() && writer_waits.is_none() {
                *state
                    .writers_waiting
                    .entry(req.name().to_owned())
                    .or_insert(0) += 1;
                writer_waits = Some(req.name().to_owned());
            }
            if matches!(kind, LeaseKind::Permit { .. }) && ticket.is_none() {
                state.tickets += 1;
                let t = state.tickets;
                state
                    .permit_queue
                    .entry(req.name().to_owned())
                    .or_default()
                    .push_back(t);
                ticket = Some(t);
            }
            // Woken by a release, or at the holder's expiry (or our deadline).
            released.wait_until(&mut state, until);
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
        let wanted = |n: &&String| name.is_none_or(|want| want == n.as_str());
        let exclusive = state
            .leases
            .iter()
            .filter(|(n, _)| wanted(n))
            .map(|(n, l)| (n, l, LeaseKind::Exclusive));
        let shared = state
            .groups
            .iter()
            .filter(|(n, _)| wanted(n))
            .flat_map(|(n, g)| g.holders.iter().map(move |l| (n, l, g.kind)));
        let mut out: Vec<LeaseInfo> = exclusive
            .chain(shared)
            .map(|(n, l, kind)| {
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
                    kind,
                }
            })
            .collect();
        out.sort_by(|a, b| {
            (a.name.as_str(), a.fencing_token).cmp(&(b.name.as_str(), b.fencing_token))
        });
        Ok(out)
    }

    fn force_release(&self, name: &str) -> Result<Option<u64>> {
        let ended = {
            let mut state = self.inner.state.lock();
            let State {
                leases,
                alive,
                groups,
                ..
            } = &mut *state;
            let exclusive = match leases.get_mut(name) {
                Some(l) if l.released_at.is_none() => {
                    // The holder's renewal now finds the lease free (not its
                    // own); its session no longer counts as holding it. The
                    // entry (and its token) stays, so the next grant is above.
                    l.released_at = Some(SystemTime::now());
                    State::session_ended(l, alive);
                    Some(l.token)
                }
                _ => None,
            };
            // Every shared lease of the name too; each holder's renewal finds
            // its lease released, and the group's tokens stay the high mark.
            let shared = groups.get_mut(name).and_then(|g| {
                g.holders
                    .iter_mut()
                    .filter(|l| l.released_at.is_none())
                    .map(|l| {
                        l.released_at = Some(SystemTime::now());
                        l.token
                    })
                    .max()
            });
            let ended = exclusive.max(shared);
            if ended.is_some() {
                state.announce(name, &self.inner.changed);
            }
            ended
        };
        if ended.is_some() {
            self.inner.released.notify_all();
        }
        Ok(ended)
    }

    fn supports(&self, _kind: LeaseKind) -> bool {
        true
    }

    fn watch(&self, name: &str) -> Result<Box<dyn Watch>> {
        let mut state = self.inner.state.lock();
        let (watches, seen) = state.watched.entry(name.to_owned()).or_insert((0, 0));
        *watches += 1;
        let seen = *seen;
        Ok(Box::new(MemoryWatch {
            store: self.inner.clone(),
            name: name.to_owned(),
            seen,
        }))
    }
}

/// A watch on one name of a [`MemoryBackend`]: a condition variable and a
/// count of announced changes.
#[derive(Debug)]
struct MemoryWatch {
    store: Arc<Store>,
    name: String,
    /// The announced changes seen so far.
    seen: u64,
}

impl Watch for MemoryWatch {
    fn wait(&mut self, until: Instant) -> Result<bool> {
        let mut state = self.store.state.lock();
        loop {
            let now_seen = state.watched.get(&self.name).map_or(0, |w| w.1);
            if now_seen != self.seen {
                self.seen = now_seen;
                return Ok(true);
            }
            if self.store.changed.wait_until(&mut state, until).timed_out() {
                return Ok(false);
            }
        }
    }
}

impl Drop for MemoryWatch {
    fn drop(&mut self) {
        let mut state = self.store.state.lock();
        if let Some((watches, _)) = state.watched.get_mut(&self.name) {
            *watches -= 1;
            if *watches == 0 {
                state.watched.remove(&self.name);
            }
        }
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
    kind: LeaseKind,
    /// Whether its release is announced to watchers of the name.
    announce: bool,
    /// Set by a release, after which the drop has nothing to do.
    ended: bool,
}

impl MemorySession {
    /// The lease of `lease`, if it is still that grant: the name's exclusive
    /// lease, or one of its group's.
    fn ours<'m>(&self, state: &'m mut State, lease: &LeaseRef<'_>) -> Option<&'m mut Lease> {
        let mine = |l: &&mut Lease| l.token == lease.token && l.owner == lease.owner;
        if self.kind.is_exclusive() {
            state.leases.get_mut(lease.name).filter(mine)
        } else {
            let group = state.groups.get_mut(lease.name)?;
            group.holders.iter_mut().find(|l| mine(l))
        }
    }

    /// Forgets a shared lease once it has ended with its holder's session,
    /// and the group once it is empty.
    fn forget_shared(&self, state: &mut State) {
        if self.kind.is_exclusive() {
            return;
        }
        if let Some(group) = state.groups.get_mut(&self.name) {
            group.holders.retain(|l| l.token != self.token);
            if group.holders.is_empty() {
                // The exclusive record (or the high-water mark) keeps tokens
                // rising: carry the group's last token over.
                let last = group.last_token;
                state.groups.remove(&self.name);
                if let Some(l) = state.leases.get_mut(&self.name) {
                    l.seq = l.seq.max(last);
                }
            }
        }
    }
}

impl Session for MemorySession {
    fn renew(&mut self, lease: &LeaseRef<'_>, ttl: Duration) -> Result<Renewal> {
        let now = Instant::now();
        let mut state = self.store.state.lock();
        match self.ours(&mut state, lease) {
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
            let exclusive = self.kind.is_exclusive();
            let mut ended_alive = false;
            let outcome = match self.ours(&mut state, lease) {
                Some(l) if l.released_at.is_none() => {
                    let was_live = l.expires > now;
                    l.released_at = Some(SystemTime::now());
                    ended_alive = exclusive && l.session_alive;
                    l.session_alive = false;
                    if was_live {
                        Release::Released
                    } else {
                        Release::WasExpired
                    }
                }
                _ => Release::NotOwner,
            };
            if ended_alive {
                state.alive -= 1;
            }
            self.forget_shared(&mut state);
            if self.announce && outcome != Release::NotOwner {
                state.announce(&self.name, &self.store.changed);
            }
            outcome
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
        if !self.kind.is_exclusive() {
            let now = Instant::now();
            let Some(l) = state
                .groups
                .get_mut(&self.name)
                .and_then(|g| g.holders.iter_mut().find(|l| l.token == self.token))
            else {
                return;
            };
            l.session_alive = false;
            if l.is_free(now) {
                // Ended already (force-released, or expired): nobody will
                // release it, forget it now.
                self.forget_shared(&mut state);
            } else {
                // Its lease stands until it expires (the permit returns then);
                // the groups' reclaim forgets it after that.
                state.group_order.push_back(self.name.clone());
            }
            return;
        }
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
