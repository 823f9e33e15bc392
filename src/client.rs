//! The [`LockClient`].

use std::hash::{BuildHasher, Hasher};
use std::mem::ManuallyDrop;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::backend::MemoryBackend;
use crate::backend::postgres::PgBackend;
use crate::backend::{self, AcquireRequest, Backend, LeaseKind};
use crate::clock::BootInstant;
use crate::config::{LockClientBuilder, Store, Timing};
use crate::election::Election;
use crate::error::{Error, Result};
use crate::health::{Health, RenewalHealth};
use crate::lease::{LeaseState, NewLease, rebase_after_wait};
use crate::lease_info::LeaseInfo;
use crate::lock::Lock;
use crate::lock_set::LockSet;
use crate::metrics::MetricsSnapshot;
use crate::name;
use crate::options::{AcquireOptions, MAX_METADATA_LEN, Wait};
use crate::renewal::Renewer;
use crate::rwlock::RwLock;
use crate::semaphore::Semaphore;
use crate::telemetry::{AcquireEnd, Slow, Telemetry};

/// A handle on a lock store: a connection pool, a lease table and a renewal thread.
///
/// Cheap to clone (all clones share one pool and one renewal thread), `Send` and
/// `Sync`. The renewal thread stops and is joined when the last clone *and* the last
/// [`Lock`] taken through it are dropped.
///
/// Locks are **not reentrant**: acquiring a name that this same client (or process)
/// already holds waits like any other contender.
///
/// **`fork()`**: a child process's copy of a client refuses to acquire
/// ([`Error::Unsupported`]) and dropping it stops, joins and closes nothing (the
/// threads and sessions are the parent's). Build a new client in the child; drop
/// or `exec` soon after forking, as with any multi-threaded program.
#[derive(Clone)]
pub struct LockClient {
    inner: Arc<ClientInner>,
}

/// What clients and locks share. Dropped by hand (see `Drop`): the renewal
/// thread stops before the pool goes, and a forked child drops neither.
pub(crate) struct ClientInner {
    pub renewer: ManuallyDrop<Renewer>,
    pub timing: Timing,
    telemetry: Arc<Telemetry>,
    health_timeout: Duration,
    backend: ManuallyDrop<Arc<dyn Backend>>,
    owner: Arc<str>,
    next_id: AtomicU64,
    /// The process that built the client.
    pid: u32,
}

impl ClientInner {
    /// The client's store.
    pub(crate) fn backend(&self) -> &dyn Backend {
        &**self.backend
    }

    /// Whether this is a copy inherited through `fork()`.
    fn forked(&self) -> bool {
        std::process::id() != self.pid
    }
}

impl Drop for ClientInner {
    fn drop(&mut self) {
        // SAFETY: each field is taken exactly once, here, and never used again.
        let (renewer, backend) = unsafe {
            (
                ManuallyDrop::take(&mut self.renewer),
                ManuallyDrop::take(&mut self.backend),
            )
        };
        if self.forked() {
            // In a forked child the renewal thread does not exist (joining it
            // would be undefined) and the pool's connections are the parent's
            // sessions (closing them would end the parent's locks): leak both.
            renewer.forget();
            std::mem::forget(backend);
            return;
        }
        drop(renewer);
        drop(backend);
    }
}

static CLIENT_SEQ: AtomicU64 = AtomicU64::new(0);

impl LockClient {
    /// Starts configuring a client for the PostgreSQL database at `url`, given as a
    /// `postgres://user:password@host:port/db?param=value` URL or a
    /// `host=… user=… dbname=…` string (anything `postgres::Config` parses).
    ///
    /// TLS follows libpq: `sslmode` is `disable`, `allow`, `prefer` (the
    /// default), `require`, `verify-ca` or `verify-full`; `sslrootcert` names a
    /// PEM file of CA certificates or `system` (the platform's trust store, which
    /// needs and defaults to `verify-full`), else `~/.postgresql/root.crt` when it
    /// exists; `sslcert` and `sslkey` (PEM) are the client certificate and key.
    /// `require` checks the server's certificate only when a CA file is given (then
    /// as `verify-ca`); `verify-ca` checks it was issued by a trusted CA;
    /// `verify-full` also checks it is valid for the host name. No mode ever falls
    /// back to a weaker one. A host given as a directory (`host=/var/run/postgresql`,
    /// `postgres:///db?host=/path`) is a Unix-domain socket, which carries no TLS:
    /// `require` and weaker connect in plain text over it, `verify-ca` and
    /// `verify-full` are refused by [`build`](LockClientBuilder::build) with
    /// [`Error::InvalidConfig`](crate::Error::InvalidConfig), as are unreadable
    /// certificate files. `application_name` defaults to `lockbox`. Several hosts
    /// with `target_session_attrs=read-write` connect to whichever is the primary;
    /// `build()` refuses a standby or a read-only session with
    /// [`Error::Unsupported`](crate::Error::Unsupported).
    ///
    /// # Example
    /// ```no_run
    /// # fn main() -> Result<(), lockbox::Error> {
    /// use std::time::Duration;
    /// let client = lockbox::LockClient::builder("postgres://app@127.0.0.1/app")
    ///     .ttl(Duration::from_secs(30))
    ///     .pool_size(16)
    ///     .build()?;
    /// # let _ = client; Ok(()) }
    /// ```
    pub fn builder(url: &str) -> LockClientBuilder {
        LockClientBuilder::new(url)
    }

    /// Starts configuring a client on the process-wide in-memory store
    /// ([`MemoryBackend::global`]): no database, the same semantics within this
    /// process. For an isolated store use
    /// `LockClient::with_backend(MemoryBackend::new())`.
    ///
    /// # Example
    /// ```
    /// # fn main() -> Result<(), lockbox::Error> {
    /// let client = lockbox::LockClient::memory().build()?;
    /// let lock = client.try_lock("jobs/42")?.expect("free");
    /// assert!(client.try_lock("jobs/42")?.is_none());
    /// lock.release()?;
    /// # Ok(()) }
    /// ```
    pub fn memory() -> LockClientBuilder {
        LockClient::with_backend(MemoryBackend::global())
    }

    /// Starts configuring a client on a single Redis server at `url`. Feature
    /// `redis`. See [`RedisBackend`](crate::backend::RedisBackend) for what it
    /// guarantees.
    ///
    /// The URL forms (`redis-cli -u` takes the TCP ones):
    ///
    /// - `redis://[[user]:password@]host[:port][/db]`: plain TCP (port 6379,
    ///   database 0 by default). `user:password` logs in as an ACL user,
    ///   `:password` as the default user (`requirepass`).
    /// - `rediss://…`, the same over TLS (rustls, no OpenSSL needed). The
    ///   server's certificate must chain to the platform's trust store, or to
    ///   the CA file given with
    ///   [`redis_tls_ca_file`](LockClientBuilder::redis_tls_ca_file), and be
    ///   valid for `host`; a client certificate is presented with
    ///   [`redis_tls_client_cert`](LockClientBuilder::redis_tls_client_cert).
    ///   Nothing falls back to plain text, and `#insecure` (no certificate
    ///   check) is refused. The platform's trust store, when used, is read
    ///   once by `build()`, never at each connection. The driver uses rustls'
    ///   process-wide crypto provider: when none is installed as a `rediss://`
    ///   client is built, lockbox installs ring (the one it is built with),
    ///   once the TLS files have checked out.
    /// - `redis+unix:///path/to/redis.sock[?db=N][&user=U][&pass=P]`, or
    ///   `unix://…`: a Unix-domain socket (which carries no TLS).
    ///
    /// Percent-encode what URLs reserve in a password (`/ ? # @ %`, spaces).
    /// `?protocol=resp3` (or `3`) is refused with
    /// [`Error::InvalidConfig`](crate::Error::InvalidConfig): lockbox speaks
    /// RESP2 only. Every connection (acquires, renewals and releases, the
    /// release listener, health checks) uses the same address, TLS settings and
    /// credentials. Errors name the target from the parsed URL, never the
    /// password, and say which check failed: certificate not trusted, host
    /// name mismatch, no TLS on the server's port, client certificate missing
    /// or refused, credentials refused. A server's error message is never shown
    /// (only its code, such as `ERR`): it may repeat what it was sent. The
    /// README gives the least ACL rule a lockbox user needs.
    ///
    /// # Example
    /// ```no_run
    /// # fn main() -> Result<(), lockbox::Error> {
    /// let client = lockbox::LockClient::redis("rediss://lockbox:secret@cache.internal:6380/")
    ///     .redis_tls_ca_file("/etc/ssl/cache-ca.pem")
    ///     .build()?;
    /// # let _ = client; Ok(()) }
    /// ```
    #[cfg(feature = "redis")]
    pub fn redis(url: &str) -> LockClientBuilder {
        LockClientBuilder::for_store(Store::Redis, url)
    }

    /// Starts configuring a client on an etcd cluster (3.4 or later) at
    /// `endpoints`: members' client URLs, `http://host:port` or
    /// `https://host:port`, separated by commas, all of one scheme (a list that
    /// mixes them is refused: a request failing over would leave TLS). Feature
    /// `etcd`. See [`EtcdBackend`](crate::backend::EtcdBackend) for what it
    /// guarantees.
    ///
    /// - **Requests** go through etcd's v3 JSON gateway over HTTP/1.1, to the
    ///   member that answered last; a member that is down, frozen, cut off or
    ///   without a leader is given up on after its share of the request's time,
    ///   and the next is tried. `connect_timeout` bounds `build()`'s first
    ///   request and every acquire's and listing's request, failover included
    ///   (an acquire's also by what is left of its wait, though never below
    ///   half a second); renewals and releases are bounded by what is left
    ///   before the holder's local deadline.
    /// - **TTL**: etcd leases last whole seconds, so a lock's lease is its TTL
    ///   rounded **up** to a second, and etcd raises it to its own minimum
    ///   (1.5 × its election timeout, rounded up: 2 s with etcd's defaults).
    ///   The holder's local deadline still ends its TTL after the request was
    ///   sent, before the lease; a crashed holder's lock is free only when the
    ///   (longer) lease runs out. A lease etcd grants shorter than the TTL is
    ///   refused.
    /// - **TLS** (`https://` endpoints): rustls with the `ring` provider (never
    ///   the process-wide default). The member's certificate must chain to a CA
    ///   of [`etcd_tls_ca_file`](LockClientBuilder::etcd_tls_ca_file) (or,
    ///   without one, of the platform's trust store, read once at `build()`)
    ///   and be valid for the endpoint's host;
    ///   [`etcd_tls_client_cert`](LockClientBuilder::etcd_tls_client_cert)
    ///   presents a client certificate to members started with
    ///   `--client-cert-auth`. A handshake that fails says why (an untrusted
    ///   certificate, a host name mismatch, a missing or refused client
    ///   certificate) in the [`Error::Connect`](crate::Error::Connect) of
    ///   `build()`. Never a fallback to plain text.
    /// - etcd users (`user:password@` in an endpoint) are not supported yet:
    ///   [`build`](LockClientBuilder::build) refuses them with
    ///   [`Error::InvalidConfig`](crate::Error::InvalidConfig). The pool and
    ///   table settings do not apply.
    ///
    /// # Example
    /// ```no_run
    /// # fn main() -> Result<(), lockbox::Error> {
    /// let client = lockbox::LockClient::etcd(
    ///     "http://10.0.0.1:2379,http://10.0.0.2:2379,http://10.0.0.3:2379",
    /// )
    /// .build()?;
    /// let lock = client.lock("reports/nightly")?;
    /// println!("token {}", lock.fencing_token());
    /// # Ok(()) }
    /// ```
    #[cfg(feature = "etcd")]
    pub fn etcd(endpoints: &str) -> LockClientBuilder {
        LockClientBuilder::for_store(Store::Etcd, endpoints)
    }

    /// Starts configuring a client on any [`Backend`]: a store of your own, or one
    /// of lockbox's configured by hand.
    pub fn with_backend(backend: impl Backend) -> LockClientBuilder {
        LockClientBuilder::for_store(Store::Given(Arc::new(backend)), "")
    }

    pub(crate) fn from_builder(builder: LockClientBuilder) -> Result<LockClient> {
        let backend: Arc<dyn Backend> = match &builder.store {
            Store::Postgres => Arc::new(PgBackend::connect(&builder)?),
            #[cfg(feature = "redis")]
            Store::Redis => Arc::new(crate::backend::RedisBackend::connect(&builder)?),
            #[cfg(feature = "etcd")]
            Store::Etcd => Arc::new(crate::backend::EtcdBackend::connect(&builder)?),
            Store::Given(backend) => backend.clone(),
        };
        let seq = CLIENT_SEQ.fetch_add(1, Ordering::Relaxed);
        let telemetry = Telemetry::new(
            builder.event_handler.clone(),
            format!("lockbox-events-{seq}"),
        )
        .map_err(Error::database)?;
        let renewer = Renewer::spawn(format!("lockbox-renewal-{seq}")).map_err(Error::database)?;
        Ok(LockClient {
            inner: Arc::new(ClientInner {
                renewer: ManuallyDrop::new(renewer),
                timing: builder.timing(),
                telemetry: Arc::new(telemetry),
                health_timeout: builder.health_timeout,
                backend: ManuallyDrop::new(backend),
                owner: owner_id().into(),
                next_id: AtomicU64::new(0),
                pid: std::process::id(),
            }),
        })
    }

    /// The owner id this client writes into every lease it takes:
    /// `host:pid:random`, unique per client.
    pub fn owner_id(&self) -> &str {
        &self.inner.owner
    }

    /// Takes the lock if it is free right now; `Ok(None)` if someone else holds it.
    /// Never waits for a holder (it may wait up to the pool timeout for a free
    /// connection).
    ///
    /// # Errors
    /// [`Error::InvalidName`], [`Error::PoolTimeout`], or a database error.
    ///
    /// # Example
    /// ```no_run
    /// # fn main() -> Result<(), lockbox::Error> {
    /// # let client = lockbox::LockClient::builder("postgres://app@127.0.0.1/app").build()?;
    /// if let Some(lock) = client.try_lock("reports/nightly")? {
    ///     println!("writing with token {}", lock.fencing_token());
    ///     lock.release()?;
    /// }
    /// # Ok(()) }
    /// ```
    pub fn try_lock(&self, name: &str) -> Result<Option<Lock>> {
        self.acquire(name, &AcquireOptions::new())
    }

    /// Waits as long as it takes for the lock. The wait happens inside the database
    /// server, not in a polling loop.
    ///
    /// # Errors
    /// [`Error::InvalidName`], [`Error::PoolTimeout`], or a database error (for
    /// example when the server restarts during the wait).
    pub fn lock(&self, name: &str) -> Result<Lock> {
        let start = Instant::now();
        self.acquire(name, &AcquireOptions::new().wait_forever())?
            .ok_or_else(|| timeout(name, start))
    }

    /// Waits up to `timeout` for the lock.
    ///
    /// # Errors
    /// [`Error::Timeout`] when the wait runs out (a lock granted just as it ran out
    /// is returned, never leaked); otherwise as [`lock`](Self::lock).
    ///
    /// # Example
    /// ```no_run
    /// # fn main() -> Result<(), lockbox::Error> {
    /// # let client = lockbox::LockClient::builder("postgres://app@127.0.0.1/app").build()?;
    /// use std::time::Duration;
    /// match client.lock_timeout("invoices", Duration::from_secs(5)) {
    ///     Ok(lock) => println!("got it, token {}", lock.fencing_token()),
    ///     Err(e) if e.is_timeout() => println!("busy, try later"),
    ///     Err(e) => return Err(e),
    /// }
    /// # Ok(()) }
    /// ```
    pub fn lock_timeout(&self, name: &str, timeout: Duration) -> Result<Lock> {
        let start = Instant::now();
        if timeout.is_zero() {
            return self
                .try_lock(name)?
                .ok_or_else(|| self::timeout(name, start));
        }
        self.acquire(name, &AcquireOptions::new().wait(timeout))?
            .ok_or_else(|| self::timeout(name, start))
    }

    /// Runs `f` under the lock (waiting up to `timeout` for it), then releases it.
    ///
    /// # Errors
    /// As [`lock_timeout`](Self::lock_timeout); and [`Error::LockLost`] if the lock
    /// was lost while `f` ran — `f`'s result is then discarded because its effects
    /// may have overlapped with another holder's (fence them with
    /// [`Lock::fencing_token`]). If only the release could not be confirmed (the
    /// store did not answer) while the lock was held throughout, `f`'s result is
    /// returned and the failure is logged: the lease then ends at its expiry.
    ///
    /// # Example
    /// ```no_run
    /// # fn main() -> Result<(), lockbox::Error> {
    /// # let client = lockbox::LockClient::builder("postgres://app@127.0.0.1/app").build()?;
    /// use std::time::Duration;
    /// let token = client.with_lock("invoices", Duration::from_secs(5), |lock| lock.fencing_token())?;
    /// # let _ = token; Ok(()) }
    /// ```
    pub fn with_lock<T>(
        &self,
        name: &str,
        timeout: Duration,
        f: impl FnOnce(&Lock) -> T,
    ) -> Result<T> {
        let lock = self.lock_timeout(name, timeout)?;
        let out = f(&lock);
        // Whether the lock was held until `f` returned, judged before the release.
        let held = lock.ensure_held();
        match (held, lock.release()) {
            (Err(lost), _) => Err(lost),
            (Ok(()), Err(e)) if e.is_lock_lost() => Err(e),
            (Ok(()), Err(e)) => {
                log::warn!(
                    "lockbox: lock {name:?} was held throughout, but its release was not confirmed \
                     (the lease ends at its expiry): {e}"
                );
                Ok(out)
            }
            (Ok(()), Ok(())) => Ok(out),
        }
    }

    /// Acquires with per-call options (TTL, wait, metadata). `Ok(None)` when the
    /// lock was not acquired within the options' wait.
    ///
    /// # Errors
    /// [`Error::InvalidName`], [`Error::InvalidConfig`] for a bad TTL or metadata,
    /// [`Error::PoolTimeout`], [`Error::InsufficientPrivilege`] when a zombie holder
    /// must be terminated and the role may not, or a database error.
    ///
    /// # Example
    /// ```no_run
    /// # fn main() -> Result<(), lockbox::Error> {
    /// # let client = lockbox::LockClient::builder("postgres://app@127.0.0.1/app").build()?;
    /// use lockbox::AcquireOptions;
    /// use std::time::Duration;
    /// let opts = AcquireOptions::new()
    ///     .ttl(Duration::from_secs(120))
    ///     .wait(Duration::from_secs(1))
    ///     .metadata("batch 42 on worker-3");
    /// if let Some(lock) = client.acquire("batch/42", &opts)? {
    ///     lock.release()?;
    /// }
    /// # Ok(()) }
    /// ```
    pub fn acquire(&self, name: &str, opts: &AcquireOptions) -> Result<Option<Lock>> {
        self.acquire_kind(name, opts, LeaseKind::Exclusive, false)
    }

    /// An acquire of a lease of `kind`, announced to watchers of the name if
    /// `announce`: what every guard of this crate is made by.
    pub(crate) fn acquire_kind(
        &self,
        name: &str,
        opts: &AcquireOptions,
        kind: LeaseKind,
        announce: bool,
    ) -> Result<Option<Lock>> {
        let called_boot = BootInstant::now();
        let start = Instant::now();
        let result = self.acquire_inner(name, opts, kind, announce, start, called_boot);
        let end = match &result {
            Ok(Some((_, waited))) => AcquireEnd::Acquired { waited: *waited },
            Ok(None) if opts.wait == Wait::No => AcquireEnd::Contended,
            Ok(None) => AcquireEnd::TimedOut,
            Err(_) => AcquireEnd::Failed,
        };
        self.inner.telemetry.acquire_ended(&end, start.elapsed());
        result.map(|granted| granted.map(|(lock, _)| lock))
    }

    /// The acquire itself; also says whether it waited for a holder.
    fn acquire_inner(
        &self,
        name: &str,
        opts: &AcquireOptions,
        kind: LeaseKind,
        announce: bool,
        start: Instant,
        called_boot: BootInstant,
    ) -> Result<Option<(Lock, bool)>> {
        self.refuse_forked()?;
        name::validate(name)?;
        let inner = &self.inner;
        if !inner.backend().supports(kind) {
            return Err(Error::Unsupported(format!(
                "this lock store ({:?}) does not grant leases of kind {kind:?}",
                inner.backend()
            )));
        }
        let ttl = opts.ttl.unwrap_or(inner.timing.ttl);
        inner.timing.check_ttl(ttl)?;
        if let Some(meta) = &opts.metadata
            && (meta.len() > MAX_METADATA_LEN || meta.contains('\0'))
        {
            return Err(Error::InvalidConfig(format!(
                "metadata must be at most {MAX_METADATA_LEN} bytes without NUL characters"
            )));
        }
        let wait = match opts.wait {
            Wait::No => backend::Wait::No,
            // A wait too long to represent is a wait forever.
            Wait::For(d) => start
                .checked_add(d)
                .map_or(backend::Wait::Forever, backend::Wait::Until),
            Wait::Forever => backend::Wait::Forever,
        };
        let req = AcquireRequest {
            name,
            owner: &inner.owner,
            ttl,
            metadata: opts.metadata.as_deref(),
            wait,
            dedicated: opts.dedicated,
            kind,
            announce,
            telemetry: &inner.telemetry,
        };
        let Some(grant) = inner.backend.acquire(&req)? else {
            log::debug!("lockbox: lock {name:?} not acquired");
            return Ok(None);
        };
        let state = Arc::new(LeaseState::new(NewLease {
            id: inner.next_id.fetch_add(1, Ordering::Relaxed),
            name: name.to_owned(),
            owner: inner.owner.clone(),
            token: grant.token,
            kind,
            ttl,
            renew_every: inner.timing.renew_interval_for(ttl),
            sent_at: grant.sent_at,
            called_at: start,
            called_boot,
            session: grant.session,
            telemetry: inner.telemetry.clone(),
        }));
        // How long the grant took to reach us after its lease began (the part of
        // the call spent waiting for a holder is not counted).
        let grant_took = grant.sent_at.elapsed();
        inner.telemetry.slow(Slow::Grant, name, grant_took, ttl);
        inner.telemetry.acquired(name, grant.token, start.elapsed());
        let lock = Lock::new(state.clone(), inner.clone());
        if rebase_after_wait(ttl, grant.sent_at.saturating_duration_since(start)) {
            // After a long wait the deadline rests on the store's measure of it,
            // shortened for clock-rate error; one renewal re-bases it on a
            // statement that did not wait. A failure here leaves the shorter
            // deadline in force, which is safe.
            let _ = state.renew(None, true);
        }
        if inner.renewer.register(state).is_err() {
            drop(lock);
            return Err(Error::RenewalStopped);
        }
        // A grant that took longer than its own lease is useless: report it rather
        // than hand out a lock that is already expired.
        if let Err(e) = lock.ensure_held() {
            log::warn!(
                "lockbox: lock {name:?} was granted, but only {:?} after its lease began, \
                 longer than its {ttl:?} TTL: reported as lost",
                grant_took
            );
            return Err(e);
        }
        Ok(Some((lock, grant.waited)))
    }

    /// A snapshot of this client's metrics (shared by all its clones). Cheap: reads
    /// atomics, takes no lock, does no I/O.
    ///
    /// # Example
    /// ```no_run
    /// # fn main() -> Result<(), lockbox::Error> {
    /// # let client = lockbox::LockClient::builder("postgres://app@127.0.0.1/app").build()?;
    /// let m = client.metrics();
    /// println!("{} acquired, {} held now", m.acquired, m.locks_held);
    /// print!("{}", m.to_prometheus()); // serve this from your /metrics endpoint
    /// # Ok(()) }
    /// ```
    pub fn metrics(&self) -> MetricsSnapshot {
        self.inner.telemetry.metrics.snapshot()
    }

    /// Checks the database, the pool and the renewal thread, and rates the whole.
    /// Never panics; returns within the health timeout
    /// ([`LockClientBuilder::health_timeout`]) plus a few milliseconds even when
    /// the database hangs. See [`Health`] for what turns a client `Degraded` or
    /// `Unhealthy`.
    ///
    /// # Example
    /// ```no_run
    /// # fn main() -> Result<(), lockbox::Error> {
    /// # let client = lockbox::LockClient::builder("postgres://app@127.0.0.1/app").build()?;
    /// let health = client.health();
    /// if !health.is_healthy() {
    ///     eprintln!("lockbox is {:?}: {:?}", health.status, health.reasons);
    /// }
    /// # Ok(()) }
    /// ```
    pub fn health(&self) -> Health {
        let inner = &self.inner;
        let database = inner.backend.probe(inner.health_timeout);
        let mut pool = inner.backend.pool_health();
        pool.waiting = inner
            .telemetry
            .metrics
            .pool_waiting
            .load(Ordering::Relaxed)
            .max(0) as u64;
        let now = Instant::now();
        let views: Vec<_> = inner
            .renewer
            .held()
            .iter()
            .filter_map(|l| l.renewal_view(now))
            .collect();
        let renewal = RenewalHealth {
            // A forked child's copy: the thread is the parent's.
            thread_alive: !inner.forked() && inner.renewer.is_alive(),
            held_locks: views.len(),
            max_lag: views.iter().map(|v| v.lag).max().unwrap_or_default(),
            // Each lock against its own schedule: half its renewal interval late.
            lagging_locks: views.iter().filter(|v| v.lag > v.renew_every / 2).count(),
            failing_locks: views.iter().filter(|v| v.failing).count(),
            // A renewal is due or failing and under a third of the lease is left.
            at_risk_locks: views
                .iter()
                .filter(|v| (v.failing || v.lag > Duration::ZERO) && v.time_left < v.ttl / 3)
                .count(),
            since_last_success: inner.telemetry.since_last_renewal(),
            since_last_loss: inner.telemetry.since_last_loss(),
            locks_lost: inner.telemetry.metrics.snapshot().lost_total(),
            workers: inner.renewer.workers(),
        };
        Health::rate(database, pool, renewal)
    }

    /// Every lease in the table, held or not, as operators need to see them.
    ///
    /// # Errors
    /// A database or pool error.
    pub fn leases(&self) -> Result<Vec<LeaseInfo>> {
        self.inner.backend.leases(None)
    }

    /// The lease of `name`, if it was ever taken. For a name held by readers
    /// or semaphore permits, one of their leases (the newest grant); see
    /// [`leases_of`](Self::leases_of) for all of them.
    ///
    /// # Errors
    /// [`Error::InvalidName`], or a database or pool error.
    pub fn lease(&self, name: &str) -> Result<Option<LeaseInfo>> {
        Ok(self
            .leases_of(name)?
            .into_iter()
            .max_by_key(|l| l.fencing_token))
    }

    /// Every lease of `name` the store lists: one for a name locked
    /// exclusively (the last grant, held or not), one per holder for a name
    /// held by readers or semaphore permits.
    ///
    /// # Errors
    /// [`Error::InvalidName`], or a database or pool error.
    pub fn leases_of(&self, name: &str) -> Result<Vec<LeaseInfo>> {
        name::validate(name)?;
        self.inner.backend.leases(Some(name))
    }

    /// [`Error::Unsupported`] in a child process forked from the one that
    /// built the client: its store handle is the parent's.
    pub(crate) fn refuse_forked(&self) -> Result<()> {
        if self.inner.forked() {
            return Err(Error::Unsupported(
                "this client was built in another process (before fork()); build a new \
                 client in the child"
                    .to_owned(),
            ));
        }
        Ok(())
    }

    /// The client's store, shared.
    pub(crate) fn backend_arc(&self) -> Arc<dyn Backend> {
        Arc::clone(&self.inner.backend)
    }

    /// A counting semaphore of `permits` permits on `name`; see [`Semaphore`].
    ///
    /// # Errors
    /// [`Error::InvalidName`]; [`Error::InvalidConfig`] for `permits` of 0 or
    /// above [`MAX_PERMITS`](crate::MAX_PERMITS).
    pub fn semaphore(&self, name: &str, permits: u32) -> Result<Semaphore> {
        Semaphore::new(self.clone(), name, permits)
    }

    /// A reader-writer lock on `name`; see [`RwLock`].
    ///
    /// # Errors
    /// [`Error::InvalidName`].
    pub fn rwlock(&self, name: &str) -> Result<RwLock> {
        RwLock::new(self.clone(), name)
    }

    /// A leader election on `name`; see [`Election`].
    ///
    /// # Errors
    /// [`Error::InvalidName`].
    pub fn election(&self, name: &str) -> Result<Election> {
        Election::new(self.clone(), name)
    }

    /// Acquires every name of `names` exclusively, all or nothing, waiting as
    /// `opts` allows for the whole set (one budget, not one per name); see
    /// [`LockSet`]. `Ok(None)`: not all of them within the wait (none is then
    /// held).
    ///
    /// # Errors
    /// [`Error::InvalidName`] for any bad name; [`Error::InvalidConfig`] for an
    /// empty set or one of over [`MAX_LOCK_SET`](crate::MAX_LOCK_SET) names;
    /// otherwise as [`acquire`](Self::acquire) (none is then held).
    pub fn lock_set<S: AsRef<str>>(
        &self,
        names: &[S],
        opts: &AcquireOptions,
    ) -> Result<Option<LockSet>> {
        LockSet::acquire(self, names, opts)
    }

    /// The last `limit` events of `name`'s lease history, newest first: its
    /// grants, releases, expired leases taken over and zombie sessions
    /// terminated, as recorded by clients built with
    /// [`history(true)`](crate::LockClientBuilder::history).
    ///
    /// # Errors
    /// [`Error::Unsupported`](crate::Error::Unsupported) when this client keeps
    /// no history; [`Error::InvalidName`]; a database or pool error.
    pub fn history(&self, name: &str, limit: usize) -> Result<Vec<crate::LeaseEvent>> {
        name::validate(name)?;
        self.inner.backend.history(name, limit)
    }

    /// Ends the current lease of `name`, whoever holds it: an operator's
    /// override for a lock whose holder is stuck or gone. Returns the ended
    /// lease's fencing token, or `None` when the name had no unreleased lease
    /// (nothing was changed).
    ///
    /// What it guarantees:
    /// - the lease is marked released at once: the name can be granted again,
    ///   and the next grant's fencing token is above the ended one;
    /// - the holder is told: its next renewal finds the lease no longer its own
    ///   (or its session gone) and `lost()` fires, at its next renewal or at
    ///   its local deadline at the latest, however stuck it is;
    /// - PostgreSQL: the holder's database session is terminated too (which
    ///   frees its advisory lock at once), unless that session also holds
    ///   other unreleased leases (a shared session: see
    ///   [`LockClientBuilder::locks_per_session`]); then only this lease ends
    ///   and the session's next renewal frees the lock's advisory key.
    ///   Terminating a session of another role needs membership in
    ///   `pg_signal_backend` (a superuser's session: superuser) and
    ///   `pg_read_all_stats` to verify it; without them nothing is changed and
    ///   the call fails with [`Error::InsufficientPrivilege`]. Redis: the lock
    ///   key is deleted and waiters are woken. Memory: the lease is released.
    ///
    /// What it does **not** guarantee: exclusion against the overridden holder.
    /// Until it notices the loss (at most one renewal interval, or its
    /// deadline), it may still believe it holds the lock while the next holder
    /// works. Only the fencing token protects the resource in that window.
    ///
    /// # Errors
    /// [`Error::InvalidName`]; [`Error::InsufficientPrivilege`] (see above);
    /// [`Error::Unsupported`] for a store without it (the default of
    /// [`Backend::force_release`](crate::backend::Backend::force_release));
    /// or a database or pool error. PostgreSQL: when the connection ends at
    /// the commit (closed, or its session terminated), whether the lease is
    /// over is read on another session (once a pooled session is free,
    /// waiting for the name's row as long as the transaction holds it, each
    /// wait up to 5 s): `Ok` with the token when it is — an exclusive
    /// lease released, replaced by a later grant or its row reclaimed,
    /// whether by this release or otherwise (a rolled-back release followed
    /// by the holder's own); readers' or permits' leases only while the row
    /// is still the version the release wrote — else the connection's
    /// error. When the outcome cannot be known (the readers' row written
    /// again or removed since, or the read-back failing) a warning says so:
    /// look at the lease before trying again.
    ///
    /// # Example
    /// ```no_run
    /// # fn main() -> Result<(), lockbox::Error> {
    /// # let client = lockbox::LockClient::builder("postgres://app@127.0.0.1/app").build()?;
    /// if let Some(token) = client.force_release("reports/nightly")? {
    ///     println!("ended the lease with token {token}");
    /// }
    /// # Ok(()) }
    /// ```
    pub fn force_release(&self, name: &str) -> Result<Option<u64>> {
        name::validate(name)?;
        let ended = self.inner.backend.force_release(name)?;
        if let Some(token) = ended {
            log::warn!("lockbox: forced the release of lock {name:?} (token {token})");
        }
        Ok(ended)
    }

    /// Whether the renewal thread is running. It stops only by a panic (which
    /// marks every held lock lost) or when the client is dropped.
    pub fn renewal_thread_alive(&self) -> bool {
        self.inner.renewer.is_alive()
    }

    /// Test-only: suspends (or resumes) renewals, as if the process were frozen.
    #[cfg(feature = "test-support")]
    #[doc(hidden)]
    pub fn __pause_renewals(&self, paused: bool) {
        self.inner.renewer.pause(paused);
    }

    #[cfg(feature = "test-support")]
    #[doc(hidden)]
    pub fn __inject_renewal_panic(&self) {
        self.inner.renewer.inject_panic();
    }
}

fn timeout(name: &str, start: Instant) -> Error {
    Error::Timeout {
        name: name.to_owned(),
        waited: start.elapsed(),
    }
}

/// `host:pid:random`: readable for operators, unique per client.
fn owner_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown-host".to_owned());
    // std's RandomState is seeded from the OS's random source: enough to tell
    // clients apart without another dependency.
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(CLIENT_SEQ.load(Ordering::Relaxed));
    if let Ok(since_epoch) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        hasher.write_u128(since_epoch.as_nanos());
    }
    format!("{host}:{}:{:016x}", std::process::id(), hasher.finish())
}

impl std::fmt::Debug for LockClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LockClient")
            .field("owner", &self.inner.owner)
            .field("backend", &self.inner.backend)
            .field("ttl", &self.inner.timing.ttl)
            .finish_non_exhaustive()
    }
}
