//! [`RedisBackend`]: locks in a single Redis server (feature `redis`).
//!
//! A lock is a key `lockbox:lock:{name}` holding `token|owner` with a millisecond
//! TTL; `lockbox:token:{name}` is the name's fencing-token counter and never
//! expires; `lockbox:meta:{name}` keeps what operators see (owner, metadata,
//! times). Acquire, renew and release are server-side scripts, so each check and
//! its write are atomic. Releases publish on `lockbox:released:{name}`; waiters
//! sleep on that through one listener connection per client and also wake when
//! the holder's TTL runs out, so a missed message only delays a waiter to that
//! point.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, Sender, select};
use parking_lot::Mutex;
use r2d2::Pool;

use crate::backend::{AcquireRequest, Backend, Grant, LeaseRef, Release, Renewal, Session, Wait};
use crate::config::LockClientBuilder;
use crate::error::{Error, LostReason, Result};
use crate::health::{DatabaseHealth, PoolHealth};
use crate::lease_info::{LeaseInfo, LeaseStatus};

/// Takes the lock if the key is absent: the next token, then the key with its TTL.
/// Returns `{token, 0}` when granted, `{0, pttl}` when held (`pttl` -1: no TTL).
const ACQUIRE: &str = r"
local pttl = redis.call('PTTL', KEYS[1])
if pttl ~= -2 then return {0, pttl} end
local token = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], token .. '|' .. ARGV[1], 'PX', ARGV[2])
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('HSET', KEYS[3], 'owner', ARGV[1], 'token', token, 'metadata', ARGV[3],
  'acquired_ms', now, 'renewed_ms', now, 'released_ms', '')
return {token, 0}
";

/// Extends the TTL only while the key still holds our `token|owner`; never
/// re-creates it.
const RENEW: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
local t = redis.call('TIME')
redis.call('HSET', KEYS[2], 'renewed_ms', t[1] * 1000 + math.floor(t[2] / 1000))
return 1
";

/// Deletes the key only while it holds our `token|owner`, and wakes waiters.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
local t = redis.call('TIME')
redis.call('HSET', KEYS[2], 'released_ms', t[1] * 1000 + math.floor(t[2] / 1000))
redis.call('PUBLISH', ARGV[2], '1')
return 1
";

const CHANNELS: &str = "lockbox:released:*";

fn lock_key(name: &str) -> String {
    format!("lockbox:lock:{name}")
}
fn token_key(name: &str) -> String {
    format!("lockbox:token:{name}")
}
fn meta_key(name: &str) -> String {
    format!("lockbox:meta:{name}")
}
fn channel(name: &str) -> String {
    format!("lockbox:released:{name}")
}

fn redis_error(e: redis::RedisError) -> Error {
    Error::database(e)
}

/// Locks in one Redis server, from [`LockClient::redis`](crate::LockClient::redis).
///
/// Guarantees and limits: exclusion and fencing tokens hold for a single Redis
/// server. Tokens survive a Redis restart only with persistence that writes every
/// command before answering (`appendonly yes`, `appendfsync always`); otherwise
/// the counter can go back after a crash. Asynchronous replication can lose a
/// lock on failover (the replica may not have the key yet) — a resource that
/// checks fencing tokens still rejects the old holder's writes, as long as the
/// token counter itself was not lost. Expiry uses the Redis server's clock.
/// There is no session to crash with the holder: a crashed holder's lock is free
/// when its TTL runs out.
pub struct RedisBackend {
    pool: Pool<redis::Client>,
    client: redis::Client,
    acquire: redis::Script,
    renew: Arc<redis::Script>,
    release: Arc<redis::Script>,
    listener: Arc<Listener>,
    pool_size: u32,
    pool_timeout: Duration,
    connect_timeout: Duration,
}

impl std::fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBackend")
            .field(
                "server",
                &self.client.get_connection_info().addr().to_string(),
            )
            .field("pool_size", &self.pool_size)
            .finish_non_exhaustive()
    }
}

/// Waiters by lock name: each an id and the sender that wakes it.
type Waiters = HashMap<String, Vec<(u64, Sender<()>)>>;

/// The wake-up fan-out: one subscriber connection, per-name lists of waiters.
#[derive(Default)]
struct Listener {
    waiters: Mutex<Waiters>,
    next_id: std::sync::atomic::AtomicU64,
    alive: AtomicBool,
    stop: AtomicBool,
}

impl Listener {
    /// Subscribes a waiter to `name`'s releases until the guard drops.
    fn watch(self: &Arc<Self>, name: &str) -> Watch {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.waiters
            .lock()
            .entry(name.to_owned())
            .or_default()
            .push((id, tx));
        Watch {
            listener: self.clone(),
            name: name.to_owned(),
            id,
            rx,
        }
    }

    fn wake(&self, name: &str) {
        if let Some(list) = self.waiters.lock().get(name) {
            for (_, tx) in list {
                let _ = tx.try_send(());
            }
        }
    }
}

/// One waiter's subscription; unsubscribes on drop.
struct Watch {
    listener: Arc<Listener>,
    name: String,
    id: u64,
    rx: Receiver<()>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        let mut waiters = self.listener.waiters.lock();
        if let Some(list) = waiters.get_mut(&self.name) {
            list.retain(|(id, _)| *id != self.id);
            if list.is_empty() {
                waiters.remove(&self.name);
            }
        }
    }
}

/// The listener thread: subscribed to every release channel, it wakes the
/// waiters of each released name. It reconnects after a failure, and ends once
/// the backend is gone (it holds only a weak reference, and reads with a timeout
/// so that it notices).
fn listen(client: redis::Client, listener: Weak<Listener>) {
    const READ_TIMEOUT: Duration = Duration::from_millis(500);
    loop {
        let Some(l) = listener.upgrade() else { return };
        if l.stop.load(Ordering::Relaxed) {
            return;
        }
        drop(l);
        let subscribed = client
            .get_connection_with_timeout(Duration::from_secs(2))
            .and_then(|mut conn| {
                conn.set_read_timeout(Some(READ_TIMEOUT))?;
                let mut pubsub = conn.as_pubsub();
                pubsub.psubscribe(CHANNELS)?;
                loop {
                    let Some(l) = listener.upgrade() else {
                        return Ok(());
                    };
                    if l.stop.load(Ordering::Relaxed) {
                        return Ok(());
                    }
                    l.alive.store(true, Ordering::Relaxed);
                    drop(l);
                    match pubsub.get_message() {
                        Ok(msg) => {
                            if let (Some(name), Some(l)) = (
                                msg.get_channel_name().strip_prefix("lockbox:released:"),
                                listener.upgrade(),
                            ) {
                                l.wake(name);
                            }
                        }
                        Err(e) if e.is_timeout() => {}
                        Err(e) => return Err(e),
                    }
                }
            });
        let Some(l) = listener.upgrade() else { return };
        l.alive.store(false, Ordering::Relaxed);
        if l.stop.load(Ordering::Relaxed) {
            return;
        }
        drop(l);
        if let Err(e) = subscribed {
            log::warn!("lockbox: redis release listener lost its connection, reconnecting: {e}");
        }
        // Waiters still wake at the holder's expiry meanwhile.
        thread::sleep(Duration::from_millis(200));
    }
}

impl RedisBackend {
    /// Connects to the Redis server at the builder's URL and starts the listener.
    pub(crate) fn connect(b: &LockClientBuilder) -> Result<RedisBackend> {
        let client = redis::Client::open(b.url.as_str())
            .map_err(|e| Error::InvalidConfig(format!("invalid redis URL: {e}")))?;
        let target = crate::config::redact_password(&b.url);
        let mut conn = client
            .get_connection_with_timeout(b.connect_timeout)
            .map_err(|e| Error::Connect {
                target: target.clone(),
                source: std::sync::Arc::new(e),
            })?;
        redis::cmd("PING")
            .query::<String>(&mut conn)
            .map_err(redis_error)?;
        drop(conn);
        let pool = Pool::builder()
            .max_size(b.pool_size)
            .min_idle(Some(0))
            .connection_timeout(b.pool_timeout)
            .build_unchecked(client.clone());
        let listener = Arc::new(Listener::default());
        let weak = Arc::downgrade(&listener);
        let listen_client = client.clone();
        thread::Builder::new()
            .name("lockbox-redis-listener".to_owned())
            .spawn(move || listen(listen_client, weak))
            .map_err(|e| Error::database(e))?;
        Ok(RedisBackend {
            pool,
            client,
            acquire: redis::Script::new(ACQUIRE),
            renew: Arc::new(redis::Script::new(RENEW)),
            release: Arc::new(redis::Script::new(RELEASE)),
            listener,
            pool_size: b.pool_size,
            pool_timeout: b.pool_timeout,
            connect_timeout: b.connect_timeout,
        })
    }

    fn conn(
        &self,
        req: Option<&AcquireRequest<'_>>,
    ) -> Result<r2d2::PooledConnection<redis::Client>> {
        let _waiting = req.map(|r| r.pool_waiting());
        self.pool
            .get_timeout(self.pool_timeout)
            .map_err(|_| Error::PoolTimeout {
                waited: self.pool_timeout,
                pool_size: self.pool_size,
            })
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
        let ttl_ms = u64::try_from(req.ttl().as_millis()).unwrap_or(u64::MAX);
        let mut waited = false;
        let mut _waiting = None;
        loop {
            // Watch before trying, so a release between the try and the wait wakes us.
            let watch = (req.wait() != Wait::No).then(|| self.listener.watch(name));
            let sent_at = Instant::now();
            let (token, pttl): (u64, i64) = {
                let mut conn = self.conn(Some(req))?;
                self.acquire
                    .key(lock_key(name))
                    .key(token_key(name))
                    .key(meta_key(name))
                    .arg(req.owner())
                    .arg(ttl_ms)
                    .arg(req.metadata().unwrap_or(""))
                    .invoke(&mut *conn)
                    .map_err(redis_error)?
            };
            if token > 0 {
                let session = RedisSession {
                    pool: self.pool.clone(),
                    renew: self.renew.clone(),
                    release: self.release.clone(),
                    value: format!("{token}|{}", req.owner()),
                };
                return Ok(Some(Grant {
                    session: Box::new(session),
                    token,
                    sent_at,
                    waited,
                }));
            }
            let Some(watch) = watch else { return Ok(None) };
            let now = Instant::now();
            // Wake on a release, or when the holder's TTL runs out (a missed
            // message, or a holder that died without releasing).
            let expiry = if pttl >= 0 {
                now + Duration::from_millis(pttl as u64 + 1)
            } else {
                now + Duration::from_secs(1)
            };
            let until = match req.wait() {
                Wait::Until(until) if until <= now => return Ok(None),
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
        let client = self.client.clone();
        let connect_timeout = self.connect_timeout.min(timeout);
        let (tx, rx) = crossbeam_channel::bounded(1);
        let spawned = thread::Builder::new()
            .name("lockbox-health".to_owned())
            .spawn(move || {
                let result = (|| -> redis::RedisResult<DatabaseHealth> {
                    let mut conn = client.get_connection_with_timeout(connect_timeout)?;
                    let start = Instant::now();
                    redis::cmd("PING").query::<String>(&mut conn)?;
                    let latency = start.elapsed();
                    let info: String = redis::cmd("INFO").arg("server").query(&mut conn)?;
                    let version = info
                        .lines()
                        .find_map(|l| l.strip_prefix("redis_version:"))
                        .map(|v| format!("Redis {}", v.trim()));
                    Ok(DatabaseHealth {
                        reachable: true,
                        latency: Some(latency),
                        server_version: version,
                        session_state_kept: None,
                        error: None,
                        listener_alive: None,
                        writable: None,
                    })
                })();
                let _ =
                    tx.send(result.unwrap_or_else(|e| DatabaseHealth::unreachable(e.to_string())));
            });
        if let Err(e) = spawned {
            return DatabaseHealth::unreachable(format!("could not start the probe thread: {e}"));
        }
        let mut health = rx.recv_timeout(timeout).unwrap_or_else(|_| {
            DatabaseHealth::unreachable(format!("no answer within {timeout:?}"))
        });
        health.listener_alive = Some(self.listener.alive.load(Ordering::Relaxed));
        health
    }

    fn pool_health(&self) -> PoolHealth {
        crate::backend::r2d2_pool_health(&self.pool)
    }

    fn leases(&self, name: Option<&str>) -> Result<Vec<LeaseInfo>> {
        let mut conn = self.conn(None)?;
        let keys: Vec<String> = match name {
            Some(name) => vec![meta_key(name)],
            // SCAN, not KEYS: it does not block the server on a large keyspace.
            None => {
                let mut keys = std::collections::BTreeSet::new();
                let mut cursor: u64 = 0;
                loop {
                    let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg("lockbox:meta:*")
                        .arg("COUNT")
                        .arg(500)
                        .query(&mut *conn)
                        .map_err(redis_error)?;
                    // SCAN may return a key more than once: the set keeps one.
                    keys.extend(batch);
                    if next == 0 {
                        break keys.into_iter().collect();
                    }
                    cursor = next;
                }
            }
        };
        let now = SystemTime::now();
        let ms = |v: Option<&String>| {
            v.and_then(|s| s.parse::<u64>().ok())
                .map(|m| UNIX_EPOCH + Duration::from_millis(m))
        };
        let mut out = Vec::new();
        for key in keys {
            let Some(name) = key.strip_prefix("lockbox:meta:") else {
                continue;
            };
            let meta: HashMap<String, String> = redis::cmd("HGETALL")
                .arg(&key)
                .query(&mut *conn)
                .map_err(redis_error)?;
            if meta.is_empty() {
                continue;
            }
            let token: u64 = meta.get("token").and_then(|t| t.parse().ok()).unwrap_or(0);
            let held: Option<String> = redis::cmd("GET")
                .arg(lock_key(name))
                .query(&mut *conn)
                .map_err(redis_error)?;
            let pttl: i64 = redis::cmd("PTTL")
                .arg(lock_key(name))
                .query(&mut *conn)
                .map_err(redis_error)?;
            let ours = held
                .as_deref()
                .is_some_and(|v| v.starts_with(&format!("{token}|")));
            let released_at = ms(meta.get("released_ms"));
            let renewed_at = ms(meta.get("renewed_ms")).unwrap_or(UNIX_EPOCH);
            let (status, expires_at) = match (released_at, ours && pttl > 0) {
                (Some(at), _) => (LeaseStatus::Released { at }, at),
                (None, true) => {
                    let left = Duration::from_millis(pttl as u64);
                    (LeaseStatus::Held { expires_in: left }, now + left)
                }
                // The key is gone without a release: it expired.
                (None, false) => (
                    LeaseStatus::Expired {
                        ago: now.duration_since(renewed_at).unwrap_or_default(),
                    },
                    renewed_at,
                ),
            };
            out.push(LeaseInfo {
                name: name.to_owned(),
                owner: meta.get("owner").cloned().unwrap_or_default(),
                metadata: meta.get("metadata").filter(|m| !m.is_empty()).cloned(),
                fencing_token: token,
                holder_pid: 0,
                acquired_at: ms(meta.get("acquired_ms")).unwrap_or(UNIX_EPOCH),
                renewed_at,
                expires_at,
                holder_alive: matches!(status, LeaseStatus::Held { .. }),
                status,
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }
}

/// A held Redis lock: what identifies it in its key. Renewals and the release use
/// any pooled connection; Redis has no session to pin.
struct RedisSession {
    pool: Pool<redis::Client>,
    renew: Arc<redis::Script>,
    release: Arc<redis::Script>,
    value: String,
}

impl std::fmt::Debug for RedisSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSession")
            .field("value", &self.value)
            .finish()
    }
}

impl RedisSession {
    fn conn(&self) -> Result<r2d2::PooledConnection<redis::Client>> {
        self.pool.get().map_err(|e| Error::database(e))
    }
}

impl Session for RedisSession {
    fn renew(&mut self, lease: &LeaseRef<'_>, ttl: Duration) -> Result<Renewal> {
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        let mut conn = self.conn()?;
        let renewed: i64 = self
            .renew
            .key(lock_key(lease.name))
            .key(meta_key(lease.name))
            .arg(&self.value)
            .arg(ttl_ms)
            .invoke(&mut *conn)
            .map_err(redis_error)?;
        Ok(if renewed == 1 {
            Renewal::Renewed
        } else {
            Renewal::Lost(LostReason::NotOwner)
        })
    }

    fn release(self: Box<Self>, lease: &LeaseRef<'_>) -> Result<Release> {
        let mut conn = self.conn()?;
        let released: i64 = self
            .release
            .key(lock_key(lease.name))
            .key(meta_key(lease.name))
            .arg(&self.value)
            .arg(channel(lease.name))
            .invoke(&mut *conn)
            .map_err(redis_error)?;
        Ok(if released == 1 {
            Release::Released
        } else {
            Release::NotOwner
        })
    }
}
