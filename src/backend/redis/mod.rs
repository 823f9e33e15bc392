//! [`RedisBackend`]: locks in a single Redis server (feature `redis`).
//!
//! # Keys
//!
//! - `lockbox:lock:{name}`: the lock, holding `token|owner`, with the lease's TTL
//!   in milliseconds (the server's clock).
//! - `lockbox:meta:{name}`: what operators see (owner, metadata, token, times).
//!   It expires [`RELEASED_RETENTION`] after the lease ends (released or run
//!   out): per-name state is reclaimed, so programs that lock per order, per job
//!   or per file do not grow the keyspace without bound.
//! - `lockbox:token`: the store-wide fencing-token counter, no TTL. Tokens come
//!   from it (and the server clock, see below), not from per-name counters, so
//!   reclaiming a name's state never lets its tokens repeat or go back.
//!   `lockbox:token:{name}`, the per-name counter of earlier versions, is read
//!   (the next token stands above it) and deleted at the name's next grant.
//! - `lockbox:epoch` (no TTL) and `lockbox:fence`: data-loss detection and the
//!   lock-delay after it (below).
//! - `lockbox:holders:{name}` (sorted set): the name's shared leases (readers,
//!   or permits of one semaphore), one member `token|owner` each, scored by
//!   the lease's end in ms of the server's clock; a crashed holder's lease ends
//!   by its score, and the key's own TTL is never below its latest member's.
//!   `lockbox:group:{name}` (hash): their kind (`shared`, `permits:N`) and each
//!   one's metadata and times. Every check-and-set is one script: an exclusive
//!   grant refuses while a member is live (one `TYPE` more on its path when
//!   there is none), a shared one while the lock key is live, on another kind,
//!   or past N.
//! - `lockbox:writers:{name}` and `lockbox:queue:{name}` (sorted sets): writers
//!   waiting behind readers (new readers are refused while one is marked) and
//!   permit waiters in arrival order (a freed permit goes to the first), each
//!   mark scored by when it lapses unless its waiter tries again: the waiter's
//!   TTL, at most [`WAIT_MARK`]. A crashed waiter holds nobody back longer.
//! - Channel `lockbox:released:{name}`: releases (of any kind), forced
//!   releases and announced grants (leaders) wake waiters and watches through
//!   one subscriber connection per client, subscribed only while the client
//!   has a waiter or a watch (see [`listener`]); waiters also
//!   wake when what blocks them runs out (the holder's TTL, the earliest
//!   permit's end, a writer's mark), so a missed message only delays them to
//!   that point. Ordinary grants publish nothing.
//!
//! # Data loss and restarts
//!
//! A Redis restart without persistence, one that reloads an older snapshot, a
//! failover to a replica that had not received every write, or a flush loses
//! locks whose holders keep working until their next renewal. Every acquire
//! (and `build()`) checks the `lockbox:epoch` marker: missing, or written under
//! another server process (`run_id`, read when each connection opens), it means
//! earlier grants may be gone, and the script sets `lockbox:fence` for the
//! longest TTL in use — the longest this client has used or learned from the
//! store's record (which every acquire and renewal keeps up to date) — and
//! grants nothing until it expires. Holders whose keys are gone see
//! [`LostReason::NotOwner`](crate::LostReason::NotOwner) at their next renewal.
//! A brand-new server or database looks exactly like one that lost its data, so
//! its first use waits out one such lock-delay too (create the marker by hand,
//! `HSET lockbox:epoch run_id ''`, to skip it on a server known to be new).
//! Every restart or failover causes a lock-delay, with or without persistence.
//!
//! Fencing tokens are `max(counter + 1, server time in µs)`: after a loss of
//! the counter they still exceed every earlier token, as long as the server's
//! wall clock does not step back and fewer than one grant per microsecond was
//! made on average. Tokens stay below 2^53 (exact in Redis' Lua); past that,
//! acquires fail rather than issue a rounded token.

mod conn;
mod inspect;
mod listener;
mod scripts;
mod session;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::select;
use r2d2::Pool;

use crate::backend::{AcquireRequest, Backend, Grant, LeaseKind, Wait};
use crate::config::{LockClientBuilder, MAX_TTL};
use crate::error::{Error, Result};
use crate::health::{DatabaseHealth, PoolHealth};
use crate::lease_info::LeaseInfo;

pub(crate) use self::conn::describe_url;
use self::conn::{Conn, Lane, Manager, info_field};
use self::listener::{Listener, POLL_WHILE_DEAD};
use self::session::{LaneScript, RedisSession};

/// How long a name's state (`lockbox:meta:{name}`) is kept after its lease
/// ends, for [`LockClient::leases`](crate::LockClient::leases) to show it.
pub const RELEASED_RETENTION: Duration = Duration::from_secs(5 * 60);

fn lock_key(name: &str) -> String {
    format!("lockbox:lock:{name}")
}
fn meta_key(name: &str) -> String {
    format!("lockbox:meta:{name}")
}
fn legacy_token_key(name: &str) -> String {
    format!("lockbox:token:{name}")
}
fn counter_key() -> &'static str {
    "lockbox:token"
}
fn marker_key() -> &'static str {
    "lockbox:epoch"
}
fn fence_key() -> &'static str {
    "lockbox:fence"
}
fn channel(name: &str) -> String {
    format!("lockbox:released:{name}")
}
fn holders_key(name: &str) -> String {
    format!("lockbox:holders:{name}")
}
fn group_key(name: &str) -> String {
    format!("lockbox:group:{name}")
}
fn writers_key(name: &str) -> String {
    format!("lockbox:writers:{name}")
}
fn queue_key(name: &str) -> String {
    format!("lockbox:queue:{name}")
}

/// How long a waiter's mark (a waiting writer, a permit waiter's place in the
/// queue) lives unless the waiter refreshes it: the waiter's TTL, at most
/// this (`WAIT_MARK_MS` in the scripts). A waiter that crashed holds nobody
/// back for longer, nor for longer than a crashed holder's lease would.
const WAIT_MARK: Duration = Duration::from_millis(3000);

/// How often a waiter with a mark tries again, refreshing it: a third of the
/// mark's life, so a slow round trip does not let it lapse.
fn mark_refresh(ttl: Duration) -> Duration {
    ttl.min(WAIT_MARK) / 3
}

/// Waiter ids, unique within the process (with the owner id, in the store).
static NEXT_WAITER: AtomicU64 = AtomicU64::new(0);

fn waiter_nonce(owner: &str) -> String {
    format!("{owner}|{}", NEXT_WAITER.fetch_add(1, Ordering::Relaxed))
}

/// How a shared kind is written in the store (`kind` of the group hash).
fn kind_tag(kind: LeaseKind) -> (String, u32) {
    match kind {
        LeaseKind::Permit { permits } => (format!("permits:{permits}"), permits),
        _ => ("shared".to_owned(), 0),
    }
}

/// The kind a store's `kind` tag names.
fn tag_kind(tag: &str) -> LeaseKind {
    match tag
        .strip_prefix("permits:")
        .and_then(|n| n.parse::<u32>().ok())
    {
        Some(permits) => LeaseKind::Permit { permits },
        None => LeaseKind::Shared,
    }
}

/// Whole milliseconds, saturating.
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn unexpected(what: &str, reply: impl std::fmt::Debug) -> Error {
    Error::database(std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!("unexpected answer from Redis to {what}: {reply:?}"),
    ))
}

/// What the backend and its held locks share: one per client, through which
/// all of its locks are renewed together ([`SharedSession`](crate::backend::SharedSession)).
pub(crate) struct Shared {
    lane: Lane,
    renew: LaneScript,
    release: LaneScript,
    /// The longest TTL (ms) this client has used, or learned the store uses:
    /// the lock-delay after a detected data loss.
    max_ttl: AtomicU64,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("longest_ttl_ms", &self.longest_ttl())
            .finish_non_exhaustive()
    }
}

impl Shared {
    fn note_ttl(&self, ms: u64) {
        self.max_ttl
            .fetch_max(ms.min(millis(MAX_TTL)), Ordering::Relaxed);
    }

    fn longest_ttl(&self) -> u64 {
        self.max_ttl.load(Ordering::Relaxed)
    }

    fn retain_ms(&self) -> u64 {
        millis(RELEASED_RETENTION)
    }
}

/// Locks in one Redis server, from [`LockClient::redis`](crate::LockClient::redis).
///
/// Guarantees and limits: exclusion and fencing tokens hold for a single Redis
/// server whose `maxmemory-policy` is `noeviction` (`build()` refuses any other
/// unless [`allow_evicting_redis`](crate::LockClientBuilder::allow_evicting_redis)
/// is set). After a detected loss of data (restart, failover, flush) nothing is
/// granted for the longest TTL in use, and tokens stay above earlier ones (see
/// the module docs for what that rests on). Expiry uses the Redis server's
/// clock. There is no session to crash with the holder: a crashed holder's lock
/// is free when its TTL runs out.
///
/// Readers and semaphore permits (every [`LeaseKind`]) are leases of their own
/// under the same guarantees: never an exclusive lease beside a live shared
/// one, never more than N live permits (a crashed holder's permit returns
/// when its lease ends by the server's clock, not before), tokens from the one
/// store-wide sequence, the same lock-delay after a data loss. A waiting
/// writer keeps new readers out, and permit waiters are served in arrival
/// order, through marks that lapse by themselves if the waiter crashes. A
/// [`watch`](Backend::watch) listens through the client's release listener.
///
/// Connections: acquires and listings use a pool of `pool_size`; renewals and
/// releases use connections of their own, bounded by the holder's deadline,
/// so they never queue behind other work. The renewals of all the locks a
/// client holds go together: one pipeline per round, on one connection, each
/// renewal in it checking its own lease. Every connection has TCP keepalive
/// and read/write timeouts (`connect_timeout`, the builder's, for commands
/// other than renewals and releases), and all of them — the release listener's
/// and the health check's too — are opened by one client, with the same
/// address, TLS settings and credentials. Opening one is bounded by
/// `connect_timeout` (or the holder's deadline, if sooner) over a Unix socket
/// too, where the driver's own connect has no timeout. Nothing here appears
/// with a password: targets are described from the parsed configuration, and
/// a server's error message is never shown while connecting.
pub struct RedisBackend {
    pool: Pool<Manager>,
    manager: Manager,
    target: String,
    acquire: redis::Script,
    acquire_shared: redis::Script,
    list: redis::Script,
    shared: Arc<Shared>,
    listener: Arc<Listener>,
    pool_size: u32,
    pool_timeout: Duration,
    allow_evicting: bool,
}

impl std::fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBackend")
            .field("server", &self.target)
            .field("pool_size", &self.pool_size)
            .finish_non_exhaustive()
    }
}

/// Why a `maxmemory-policy` other than `noeviction` is unsafe.
fn eviction_problem(policy: &str) -> String {
    format!(
        "Redis maxmemory-policy is {policy}: under memory pressure it may evict a live \
         lock (a second holder is then granted it), a semaphore's permits (more than its \
         count are then granted) or the fencing-token counter; set \
         `maxmemory-policy noeviction`, or accept the risk with \
         `.allow_evicting_redis(true)`"
    )
}

impl RedisBackend {
    /// Connects to the Redis server at the builder's URL, checks that it keeps
    /// every key (or that evicting was allowed) and whether it lost data, and
    /// starts the listener.
    pub(crate) fn connect(b: &LockClientBuilder) -> Result<RedisBackend> {
        // Commands other than renewals and releases wait for an answer as long as
        // a connection may take to open.
        let io_timeout = b.connect_timeout;
        let info = conn::connection_info(&b.url, io_timeout)?;
        let target = conn::describe(&info);
        let client = conn::client(info, &b.redis_tls)?;
        let manager = Manager::new(client, b.connect_timeout, io_timeout, b.pool_size);
        // All of it, telling why it failed included, within the connect timeout.
        let mut conn = manager.open_first().map_err(|e| Error::Connect {
            target: target.clone(),
            source: Arc::new(e),
        })?;
        if let Some(policy) = eviction_policy(&mut conn)?
            && policy != "noeviction"
        {
            if !b.allow_evicting_redis {
                return Err(Error::Unsupported(eviction_problem(&policy)));
            }
            log::warn!("lockbox: {}", eviction_problem(&policy));
        }
        let shared = Arc::new(Shared {
            lane: Lane::new(manager.clone()),
            renew: LaneScript::new(scripts::RENEW),
            release: LaneScript::new(scripts::RELEASE),
            max_ttl: AtomicU64::new(0),
        });
        shared.note_ttl(millis(b.ttl));
        let epoch = redis::Script::new(scripts::EPOCH);
        let run_id = conn.run_id.clone();
        let reply: Vec<i64> = conn
            .run(|c| {
                epoch
                    .key(marker_key())
                    .key(fence_key())
                    .arg(run_id)
                    .arg(shared.longest_ttl())
                    .invoke(c)
            })
            .map_err(Error::database)?;
        match reply[..] {
            [fence, longest] => {
                shared.note_ttl(u64::try_from(longest).unwrap_or(0));
                if fence > 0 {
                    log::warn!(
                        "lockbox: Redis at {target} lost its data or restarted since lockbox \
                         last used it: no lock is granted for {fence} ms (lock-delay)"
                    );
                }
            }
            _ => return Err(unexpected("the data-loss check", reply)),
        }
        shared.lane.put(conn);
        let pool = Pool::builder()
            .thread_pool(crate::backend::r2d2_threads())
            .max_size(b.pool_size)
            .min_idle(Some(0))
            .connection_timeout(b.pool_timeout)
            .build_unchecked(manager.clone());
        let (listener, settle) = Listener::new();
        let listener = Arc::new(listener);
        let weak = Arc::downgrade(&listener);
        let listen_manager = manager.clone();
        thread::Builder::new()
            .name("lockbox-redis-listener".to_owned())
            .spawn(move || listener::listen(listen_manager, weak, settle))
            .map_err(Error::database)?;
        Ok(RedisBackend {
            pool,
            manager,
            target,
            acquire: redis::Script::new(scripts::ACQUIRE),
            acquire_shared: redis::Script::new(scripts::SHARED_ACQUIRE),
            list: redis::Script::new(scripts::LIST),
            shared,
            listener,
            pool_size: b.pool_size,
            pool_timeout: b.pool_timeout,
            allow_evicting: b.allow_evicting_redis,
        })
    }

    /// A pooled connection (acquires, listings), within the pool timeout.
    fn conn(&self, req: Option<&AcquireRequest<'_>>) -> Result<r2d2::PooledConnection<Manager>> {
        let _waiting = req.map(|r| r.pool_waiting());
        self.pool.get_timeout(self.pool_timeout).map_err(|e| {
            // Below its size, the pool timed out opening connections: say why.
            if self.pool.state().connections < self.pool_size {
                Error::Connect {
                    target: self.target.clone(),
                    source: Arc::new(e),
                }
            } else {
                Error::PoolTimeout {
                    waited: self.pool_timeout,
                    pool_size: self.pool_size,
                }
            }
        })
    }
}

impl RedisBackend {
    /// Runs `f` on a pooled connection. When a connection that had served
    /// before fails (the server closed it while it sat in the pool, as on a
    /// restart), `f` runs once more on another: nothing was done on the dead one
    /// unless the server died right after doing it, and then at worst this
    /// caller finds its own unreported grant held until its TTL ends.
    fn with_conn<T>(
        &self,
        req: Option<&AcquireRequest<'_>>,
        mut f: impl FnMut(&mut Conn) -> redis::RedisResult<T>,
    ) -> Result<T> {
        let mut conn = self.conn(req)?;
        match f(&mut conn) {
            Err(e) if conn.closed_while_idle(&e) => {
                log::debug!("lockbox: pooled Redis connection failed ({e}); retrying on another");
                drop(conn);
                f(&mut *self.conn(req)?).map_err(Error::database)
            }
            result => result.map_err(Error::database),
        }
    }
}

/// The outcome of one try at an acquire.
enum Attempt {
    Granted(u64),
    /// Not granted: what blocks it may end in `wake_ms` (-1: unknown); `mark`
    /// is the mark the try left (set, member), to refresh or take back.
    Refused {
        wake_ms: i64,
        mark: Option<(String, String)>,
    },
    /// The name's live shared leases are of this other kind.
    Mismatch(LeaseKind),
}

impl RedisBackend {
    /// One try at an exclusive lease, in one script call.
    fn try_exclusive(
        &self,
        req: &AcquireRequest<'_>,
        waiter: &str,
        announce: &str,
    ) -> Result<Attempt> {
        let name = req.name();
        let reply: Vec<i64> = self.with_conn(Some(req), |conn| {
            let run_id = conn.run_id.clone();
            conn.run(|c| {
                self.acquire
                    .key(lock_key(name))
                    .key(meta_key(name))
                    .key(counter_key())
                    .key(legacy_token_key(name))
                    .key(marker_key())
                    .key(fence_key())
                    .key(holders_key(name))
                    .key(writers_key(name))
                    .arg(req.owner())
                    .arg(millis(req.ttl()))
                    .arg(req.metadata().unwrap_or(""))
                    .arg(self.shared.longest_ttl())
                    .arg(run_id)
                    .arg(self.shared.retain_ms())
                    .arg(waiter)
                    .arg(announce)
                    .invoke(c)
            })
        })?;
        let [granted, value, longest, marked] = reply[..] else {
            return Err(unexpected("an acquire", reply));
        };
        self.shared.note_ttl(u64::try_from(longest).unwrap_or(0));
        if granted == 1 {
            let token = u64::try_from(value)
                .ok()
                .filter(|t| *t > 0)
                .ok_or_else(|| unexpected("an acquire (token)", value))?;
            return Ok(Attempt::Granted(token));
        }
        Ok(Attempt::Refused {
            wake_ms: value,
            mark: (marked == 1).then(|| (writers_key(name), waiter.to_owned())),
        })
    }

    /// One try at a shared lease (a reader, a permit), in one script call.
    fn try_shared(&self, req: &AcquireRequest<'_>, place: &str, announce: &str) -> Result<Attempt> {
        let name = req.name();
        let (tag, permits) = kind_tag(req.kind());
        let nonce = waiter_nonce(req.owner());
        let waits = if req.wait() == Wait::No { "0" } else { "1" };
        let reply: (i64, i64, i64, String) = self.with_conn(Some(req), |conn| {
            let run_id = conn.run_id.clone();
            conn.run(|c| {
                self.acquire_shared
                    .key(lock_key(name))
                    .key(meta_key(name))
                    .key(counter_key())
                    .key(legacy_token_key(name))
                    .key(marker_key())
                    .key(fence_key())
                    .key(holders_key(name))
                    .key(group_key(name))
                    .key(writers_key(name))
                    .key(queue_key(name))
                    .arg(req.owner())
                    .arg(millis(req.ttl()))
                    .arg(req.metadata().unwrap_or(""))
                    .arg(self.shared.longest_ttl())
                    .arg(run_id)
                    .arg(self.shared.retain_ms())
                    .arg(&tag)
                    .arg(permits)
                    .arg(place)
                    .arg(waits)
                    .arg(&nonce)
                    .arg(announce)
                    .invoke(c)
            })
        })?;
        let (code, value, longest, new_place) = reply;
        self.shared.note_ttl(u64::try_from(longest).unwrap_or(0));
        match code {
            1 => {
                let token = u64::try_from(value)
                    .ok()
                    .filter(|t| *t > 0)
                    .ok_or_else(|| unexpected("an acquire (token)", value))?;
                Ok(Attempt::Granted(token))
            }
            0 => Ok(Attempt::Refused {
                wake_ms: value,
                mark: (!new_place.is_empty()).then(|| (queue_key(name), new_place)),
            }),
            2 => Ok(Attempt::Mismatch(match u32::try_from(value) {
                Ok(permits) if permits > 0 => LeaseKind::Permit { permits },
                _ => LeaseKind::Shared,
            })),
            _ => Err(unexpected("an acquire", (code, value, longest))),
        }
    }

    /// Takes back the mark an acquire that gives up left (a waiting writer's,
    /// a permit waiter's place), waking those it held back. Best effort: a
    /// mark left behind lapses by itself within [`WAIT_MARK`].
    fn cancel_wait(&self, name: &str, mark: Option<(String, String)>) {
        let Some((key, member)) = mark else { return };
        let script = redis::Script::new(scripts::CANCEL_WAIT);
        let result: Result<i64> = self.with_conn(None, |conn| {
            conn.run(|c| script.key(&key).arg(&member).arg(channel(name)).invoke(c))
        });
        if let Err(e) = result {
            log::debug!(
                "lockbox: could not take back a waiter's mark on {name:?} ({e}); it lapses by itself"
            );
        }
    }
}

/// A watch on one name: woken by what is published on its channel (releases,
/// announced grants, forced releases), through the client's release listener.
struct RedisWatch {
    watch: listener::Watch,
}

impl std::fmt::Debug for RedisWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisWatch").finish_non_exhaustive()
    }
}

impl crate::backend::Watch for RedisWatch {
    /// Woken by a message on the name's channel, or when the listener lost or
    /// regained its connection (messages may have been missed); never past
    /// `until`.
    fn wait(&mut self, until: Instant) -> Result<bool> {
        select! {
            recv(self.watch.rx) -> _ => Ok(true),
            recv(crossbeam_channel::at(until)) -> _ => Ok(false),
        }
    }
}

/// The server's `maxmemory-policy`, from `INFO memory` (allowed where `CONFIG`
/// often is not); `None` when the server does not say.
fn eviction_policy(conn: &mut Conn) -> Result<Option<String>> {
    match conn.run(|c| redis::cmd("INFO").arg("memory").query::<String>(c)) {
        Ok(info) => Ok(info_field(&info, "maxmemory_policy")),
        Err(e) if !conn.is_broken() => {
            log::warn!("lockbox: cannot read Redis' maxmemory-policy ({e}); assuming noeviction");
            Ok(None)
        }
        Err(e) => Err(Error::database(e)),
    }
}

impl Drop for RedisBackend {
    fn drop(&mut self) {
        self.listener.stop.store(true, Ordering::Relaxed);
    }
}

impl Backend for RedisBackend {
    fn acquire(&self, req: &AcquireRequest<'_>) -> Result<Option<Grant>> {
        let name = req.name();
        self.shared.note_ttl(millis(req.ttl()));
        let waits = req.wait() != Wait::No;
        // Identifies this acquire's mark as a waiting writer.
        let waiter = if waits {
            waiter_nonce(req.owner())
        } else {
            String::new()
        };
        let announce = if req.announce() {
            channel(name)
        } else {
            String::new()
        };
        // A permit waiter's place in the queue, once it has one.
        let mut place = String::new();
        // The mark this acquire left, to take back if it gives up.
        let mut mark: Option<(String, String)> = None;
        let mut waited = false;
        let mut _waiting = None;
        loop {
            // Watch before trying, so a release between the try and the wait wakes us.
            let watch = waits.then(|| self.listener.watch(name));
            let sent_at = Instant::now();
            let attempt = if req.kind().is_exclusive() {
                self.try_exclusive(req, &waiter, &announce)?
            } else {
                self.try_shared(req, &place, &announce)?
            };
            let (wake_ms, marked) = match attempt {
                Attempt::Granted(token) => {
                    let session = RedisSession {
                        shared: self.shared.clone(),
                        value: format!("{token}|{}", req.owner()),
                    };
                    return Ok(Some(Grant {
                        session: Box::new(session),
                        token,
                        sent_at,
                        waited,
                    }));
                }
                Attempt::Mismatch(live) => {
                    self.cancel_wait(name, mark.take());
                    return Err(req.kind().mismatch(live, name));
                }
                Attempt::Refused { wake_ms, mark } => (wake_ms, mark),
            };
            if let Some((key, member)) = marked {
                if !req.kind().is_exclusive() {
                    place.clone_from(&member);
                }
                mark = Some((key, member));
            }
            let Some(mut watch) = watch else {
                return Ok(None);
            };
            // Refused: from here on it waits for a release it must hear.
            watch.need_messages();
            let now = Instant::now();
            // Wake on a release, or when what blocks us (the holder's TTL, the
            // fence, the earliest permit's end) runs out: a missed message, or
            // a holder that died without releasing.
            let mut wake_in = u64::try_from(wake_ms).map_or(Duration::from_secs(1), |ms| {
                Duration::from_millis(ms).saturating_add(Duration::from_millis(1))
            });
            if mark.is_some() {
                // A mark lapses unless refreshed by trying again.
                wake_in = wake_in.min(mark_refresh(req.ttl()));
            }
            if !self.listener.is_alive() {
                // Nobody hears releases: poll until the listener is back.
                wake_in = wake_in.min(POLL_WHILE_DEAD);
            }
            let expiry = now
                .checked_add(wake_in)
                .unwrap_or_else(|| now + Duration::from_secs(1));
            let until = match req.wait() {
                Wait::Until(until) if until <= now => {
                    self.cancel_wait(name, mark.take());
                    return Ok(None);
                }
                Wait::Until(until) => until.min(expiry),
                _ => expiry,
            };
            waited = true;
            _waiting.get_or_insert_with(|| req.waiting());
            select! {
                recv(watch.rx) -> _ => {}
                recv(crossbeam_channel::at(until)) -> _ => {}
            }
        }
    }

    fn probe(&self, timeout: Duration) -> DatabaseHealth {
        let deadline = Instant::now() + timeout;
        let manager = self.manager.clone();
        let allow_evicting = self.allow_evicting;
        let (tx, rx) = crossbeam_channel::bounded(1);
        let spawned = thread::Builder::new()
            .name("lockbox-health".to_owned())
            .spawn(move || {
                let result = probe(&manager, timeout, allow_evicting);
                let _ =
                    tx.send(result.unwrap_or_else(|e| DatabaseHealth::unreachable(e.to_string())));
            });
        if let Err(e) = spawned {
            return DatabaseHealth::unreachable(format!("could not start the probe thread: {e}"));
        }
        let mut health = rx.recv_timeout(timeout).unwrap_or_else(|_| {
            DatabaseHealth::unreachable(format!("no answer within {timeout:?}"))
        });
        // Right after `build()` the listener may still be connecting: what it
        // is then is known once that first attempt ends (within the probe's
        // time), not before; one still unsettled then counts as not alive.
        let settled = self.listener.first_attempt(deadline);
        health.listener_alive = Some(settled && self.listener.is_alive());
        health
    }

    fn pool_health(&self) -> PoolHealth {
        crate::backend::r2d2_pool_health(&self.pool)
    }

    fn leases(&self, name: Option<&str>) -> Result<Vec<LeaseInfo>> {
        inspect::leases(self, name)
    }

    /// Exclusive leases, readers and permits.
    fn supports(&self, _kind: LeaseKind) -> bool {
        true
    }

    /// Through the client's release listener: no connection of its own. Wakes
    /// on releases of any kind, announced grants and forced releases of the
    /// name, and whenever the listener reconnects.
    fn watch(&self, name: &str) -> Result<Box<dyn crate::backend::Watch>> {
        let mut watch = self.listener.watch(name);
        watch.need_messages();
        Ok(Box::new(RedisWatch { watch }))
    }

    fn force_release(&self, name: &str) -> Result<Option<u64>> {
        let script = redis::Script::new(scripts::FORCE_RELEASE);
        let reply: Vec<i64> = self.with_conn(None, |conn| {
            conn.run(|c| {
                script
                    .key(lock_key(name))
                    .key(meta_key(name))
                    .key(holders_key(name))
                    .key(group_key(name))
                    .arg(channel(name))
                    .arg(self.shared.retain_ms())
                    .invoke(c)
            })
        })?;
        match reply[..] {
            [1, token] => Ok(Some(u64::try_from(token).unwrap_or(0))),
            [0, _] => Ok(None),
            _ => Err(unexpected("a forced release", reply)),
        }
    }
}

/// The health check, on a connection of its own. Read-only. Besides
/// reachability it reports, in `error` (with `reachable` true: the client is
/// Unhealthy), an evicting `maxmemory-policy` that was not allowed; and in
/// `warnings` (Degraded) an allowed one and a detected data loss (a running
/// lock-delay, or one the next acquire will start).
fn probe(
    manager: &Manager,
    timeout: Duration,
    allow_evicting: bool,
) -> std::result::Result<DatabaseHealth, conn::OpenError> {
    let mut conn = manager.open(
        manager.connect_timeout.min(timeout),
        manager.io_timeout.min(timeout),
    )?;
    let start = Instant::now();
    conn.run(|c| redis::cmd("PING").query::<String>(c))?;
    let latency = start.elapsed();
    let server: String = conn.run(|c| redis::cmd("INFO").arg("server").query(c))?;
    let memory: String = conn
        .run(|c| redis::cmd("INFO").arg("memory").query(c))
        .unwrap_or_default();
    let mut problems = Vec::new();
    let mut unsafe_policy = None;
    if let Some(policy) = info_field(&memory, "maxmemory_policy").filter(|p| p != "noeviction") {
        if allow_evicting {
            problems.push(format!(
                "{} (allowed by allow_evicting_redis)",
                eviction_problem(&policy)
            ));
        } else {
            unsafe_policy = Some(eviction_problem(&policy));
        }
    }
    let fence: i64 = conn.run(|c| redis::cmd("PTTL").arg(fence_key()).query(c))?;
    let recorded: Option<String> = conn
        .run(|c| redis::cmd("HGET").arg(marker_key()).arg("run_id").query(c))
        .unwrap_or(None);
    if fence > 0 {
        problems.push(format!(
            "lock-delay after a detected loss of Redis data (restart, failover or flush): \
             no lock is granted for another {fence} ms"
        ));
    } else {
        match recorded {
            None => problems.push(
                "Redis has no lockbox data-loss marker (a new server, or its data was lost): \
                 the next acquire starts a lock-delay of the longest TTL in use"
                    .to_owned(),
            ),
            Some(run) if !run.is_empty() && !conn.run_id.is_empty() && run != conn.run_id => {
                problems.push(
                    "Redis restarted or failed over since lockbox last used it: the next \
                     acquire starts a lock-delay of the longest TTL in use"
                        .to_owned(),
                );
            }
            Some(_) => {}
        }
    }
    Ok(DatabaseHealth {
        reachable: true,
        latency: Some(latency),
        server_version: info_field(&server, "redis_version").map(|v| format!("Redis {v}")),
        session_state_kept: None,
        error: unsafe_policy,
        listener_alive: None,
        writable: None,
        warnings: problems,
        lease_table: None,
        cluster: None,
    })
}
