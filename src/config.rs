//! The client builder and the validated timing rules shared by every backend.

use std::path::PathBuf;
use std::time::Duration;

use std::sync::Arc;

use crate::backend::Backend;
use crate::client::LockClient;
use crate::error::{Error, Result};
use crate::event::HandleEvent;

/// The shortest accepted lease (TTL).
pub const MIN_TTL: Duration = Duration::from_millis(100);
/// The longest accepted lease (TTL).
pub const MAX_TTL: Duration = Duration::from_secs(24 * 60 * 60);
/// The shortest accepted renewal interval.
pub const MIN_RENEW_INTERVAL: Duration = Duration::from_millis(10);
/// The largest accepted pool size.
pub const MAX_POOL_SIZE: u32 = 1000;

const DEFAULT_TTL: Duration = Duration::from_secs(30);
const DEFAULT_POOL_SIZE: u32 = 10;
/// The most locks one database session holds by default.
const DEFAULT_LOCKS_PER_SESSION: u32 = 1000;
/// The largest accepted [`LockClientBuilder::locks_per_session`].
pub const MAX_LOCKS_PER_SESSION: u32 = 100_000;
const DEFAULT_POOL_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_TABLE: &str = "lockbox_leases";
const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(5);
const DEFAULT_HISTORY_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);
/// The shortest accepted [`LockClientBuilder::history_retention`].
const MIN_HISTORY_RETENTION: Duration = Duration::from_secs(60);
/// The longest accepted [`LockClientBuilder::history_retention`]: ten years.
const MAX_HISTORY_RETENTION: Duration = Duration::from_secs(3650 * 24 * 3600);

/// Which store a builder builds a client for.
#[derive(Clone, Debug)]
pub(crate) enum Store {
    /// PostgreSQL at the builder's URL.
    Postgres,
    /// Redis at the builder's URL.
    #[cfg(feature = "redis")]
    Redis,
    /// The etcd cluster at the builder's endpoints.
    #[cfg(feature = "etcd")]
    Etcd,
    /// A store given ready-made (in-memory, or the user's own).
    Given(Arc<dyn Backend>),
}

/// The lease timing every lock follows, derived from the client configuration.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timing {
    pub ttl: Duration,
    /// A fixed renewal interval, or `None` for a third of each lock's TTL.
    pub renew_interval: Option<Duration>,
}

impl Timing {
    /// Checks a TTL (the client's or a per-call one) against the limits and the
    /// renewal interval.
    pub fn check_ttl(&self, ttl: Duration) -> Result<()> {
        if ttl < MIN_TTL || ttl > MAX_TTL {
            return Err(Error::InvalidConfig(format!(
                "ttl {ttl:?} is outside the accepted range {MIN_TTL:?} ..= {MAX_TTL:?}"
            )));
        }
        let every = self.renew_interval_for(ttl);
        if every < MIN_RENEW_INTERVAL || every > ttl / 2 {
            return Err(Error::InvalidConfig(format!(
                "renew interval {every:?} is outside the accepted range {MIN_RENEW_INTERVAL:?} ..= \
                 {:?} (at most half the ttl {ttl:?}, so that a failed renewal can be retried \
                 before the lease ends)",
                ttl / 2
            )));
        }
        Ok(())
    }

    /// How often a lock with this TTL is renewed.
    pub fn renew_interval_for(&self, ttl: Duration) -> Duration {
        self.renew_interval.unwrap_or(ttl / 3)
    }
}

/// How much earlier than the database lease a holder's local deadline ends.
///
/// The local deadline is measured from *before* the acquire or renew statement was
/// sent, so network and queueing delays already work in the holder's favour; this
/// margin only absorbs a difference in clock *rate* between the client's monotonic
/// clock and the database server's clock (1 % of the TTL is orders of magnitude above
/// real crystal drift) plus scheduling jitter in the check itself.
pub(crate) fn safety_margin(ttl: Duration) -> Duration {
    ttl / 100 + Duration::from_millis(2)
}

/// Builds a [`LockClient`]; returned by [`LockClient::builder`] (PostgreSQL),
/// [`LockClient::memory`] or [`LockClient::with_backend`].
///
/// The pool, connection and table settings apply to PostgreSQL; other stores
/// ignore what does not apply to them, except the Redis and etcd TLS files,
/// which [`build`](Self::build) refuses on a client of another store. Timing, health
/// and event settings apply to every store.
///
/// Every setter documents its default. Nothing is checked until [`build`](Self::build),
/// which validates the whole configuration and returns [`Error::InvalidConfig`] naming
/// the first problem it finds.
#[derive(Clone)]
#[must_use = "a builder does nothing until `build()` is called"]
pub struct LockClientBuilder {
    pub(crate) store: Store,
    /// The PostgreSQL connection string (empty for other stores).
    pub(crate) url: String,
    pub(crate) ttl: Duration,
    pub(crate) renew_interval: Option<Duration>,
    pub(crate) pool_size: u32,
    pub(crate) locks_per_session: u32,
    pub(crate) pool_timeout: Duration,
    pub(crate) connect_timeout: Duration,
    pub(crate) table: String,
    pub(crate) create_table: bool,
    pub(crate) keep_history: bool,
    pub(crate) unlogged_leases: bool,
    pub(crate) history_retention: Duration,
    pub(crate) health_timeout: Duration,
    pub(crate) event_handler: Option<Arc<dyn HandleEvent>>,
    /// Name → 64-bit advisory key; replaceable only by tests (to force collisions).
    pub(crate) key_fn: fn(&str) -> i64,
    /// Redis only: accept a server whose `maxmemory-policy` may evict keys.
    pub(crate) allow_evicting_redis: bool,
    /// Redis only: the certificate files for a `rediss://` URL.
    pub(crate) redis_tls: TlsFiles,
    /// etcd only: the certificate files for `https://` endpoints.
    pub(crate) etcd_tls: TlsFiles,
}

/// The PEM files a TLS connection uses (a `rediss://` URL, `https://` etcd
/// endpoints): the CA that the server's certificate must chain to, and a client
/// certificate with its key. `Debug` shows the paths only, never the contents.
#[derive(Clone, Debug, Default)]
pub(crate) struct TlsFiles {
    /// `None`: the platform's trust store.
    pub ca_file: Option<PathBuf>,
    /// Certificate (chain) file and private key file.
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

impl TlsFiles {
    pub fn is_set(&self) -> bool {
        self.ca_file.is_some() || self.client_cert.is_some()
    }
}

impl LockClientBuilder {
    /// The longest accepted [`pool_timeout`](Self::pool_timeout),
    /// [`connect_timeout`](Self::connect_timeout) and
    /// [`health_timeout`](Self::health_timeout): one day. Longer values (up to
    /// `Duration::MAX`) are refused by [`build`](Self::build) rather than let
    /// through to deadlines that cannot be represented.
    pub const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 60 * 60);

    pub(crate) fn new(url: &str) -> Self {
        LockClientBuilder::for_store(Store::Postgres, url)
    }

    pub(crate) fn for_store(store: Store, url: &str) -> Self {
        LockClientBuilder {
            store,
            url: url.to_owned(),
            ttl: DEFAULT_TTL,
            renew_interval: None,
            pool_size: DEFAULT_POOL_SIZE,
            locks_per_session: DEFAULT_LOCKS_PER_SESSION,
            pool_timeout: DEFAULT_POOL_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            table: DEFAULT_TABLE.to_owned(),
            create_table: true,
            keep_history: false,
            unlogged_leases: false,
            history_retention: DEFAULT_HISTORY_RETENTION,
            health_timeout: DEFAULT_HEALTH_TIMEOUT,
            event_handler: None,
            key_fn: crate::backend::postgres::name_key,
            allow_evicting_redis: false,
            redis_tls: TlsFiles::default(),
            etcd_tls: TlsFiles::default(),
        }
    }

    /// Sets the lease length: how long the database keeps a lock for a holder that
    /// stops renewing (crashed, paused or cut off) before someone else may take it.
    ///
    /// Defaults to 30 seconds; must lie within [`MIN_TTL`] ..= [`MAX_TTL`] (100 ms
    /// ..= 24 h), else [`build`](Self::build) fails with [`Error::InvalidConfig`].
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// Sets a fixed interval between renewals of every held lock.
    ///
    /// Defaults to a third of each lock's TTL; must lie within
    /// [`MIN_RENEW_INTERVAL`] ..= half of every TTL used with this client (the
    /// client's, checked by [`build`](Self::build), and each per-call one, checked
    /// by that call), else [`Error::InvalidConfig`].
    pub fn renew_interval(mut self, every: Duration) -> Self {
        self.renew_interval = Some(every);
        self
    }

    /// Sets the maximum number of database connections. Held locks share them
    /// (see [`locks_per_session`](Self::locks_per_session)); an acquire that
    /// must wait for a holder uses one of its own while it waits.
    ///
    /// Defaults to 10; must be 1 ..= [`MAX_POOL_SIZE`], else
    /// [`build`](Self::build) fails with [`Error::InvalidConfig`].
    pub fn pool_size(mut self, size: u32) -> Self {
        self.pool_size = size;
        self
    }

    /// Sets how many held locks one database session may hold (PostgreSQL).
    ///
    /// Held locks share sessions: an acquire that need not wait, when no pooled
    /// connection is idle, takes its advisory lock on a session that already
    /// holds others, and an acquire that waited keeps the session it waited
    /// on, which then takes others too.
    /// All leases on a session are renewed by one statement per round, so
    /// renewal costs grow with sessions, not locks; a session goes back to the
    /// pool when it holds nothing. What the locks on one session share: its
    /// fate. When the session ends (terminated, its connection broken, or a
    /// statement on it stuck past a lock's deadline and cancelled), every lock
    /// on it is lost, and each one's [`Lock::lost`](crate::Lock::lost) fires.
    /// Lost *leases* are not shared: one lease taken over, or run out, is lost
    /// alone, and its advisory lock is freed by the session's next renewal.
    /// `1` gives every lock a session of its own (the pool size then bounds
    /// the locks held at once); so does
    /// [`AcquireOptions::dedicated_session`](crate::AcquireOptions::dedicated_session)
    /// for one lock.
    ///
    /// PostgreSQL's lock table is finite: about `max_locks_per_transaction ×
    /// (max_connections + max_prepared_transactions)` advisory locks for the
    /// whole server (6 400 with the defaults). An acquire past that fails with
    /// [`Error::LockTableFull`].
    ///
    /// Defaults to 1000; must be 1 ..= [`MAX_LOCKS_PER_SESSION`], else
    /// [`build`](Self::build) fails with [`Error::InvalidConfig`].
    pub fn locks_per_session(mut self, n: u32) -> Self {
        self.locks_per_session = n;
        self
    }

    /// Sets how long an acquire (or a lease listing) waits for a free pooled
    /// connection before failing with [`Error::PoolTimeout`]. This bounds the wait
    /// for a connection separately from an acquire's wait for the lock.
    ///
    /// Defaults to 30 seconds; must be non-zero and at most
    /// [`MAX_TIMEOUT`](Self::MAX_TIMEOUT) (one day), else [`build`](Self::build)
    /// fails with [`Error::InvalidConfig`].
    pub fn pool_timeout(mut self, timeout: Duration) -> Self {
        self.pool_timeout = timeout;
        self
    }

    /// Sets the timeout for opening one database connection. With PostgreSQL
    /// it also bounds each wait of [`build`](Self::build) for another
    /// transaction's lock while it checks or creates the lease table (an
    /// operator's `LOCK TABLE`, a concurrent first build): past it, `build`
    /// fails with the server's error (SQLSTATE 55P03).
    ///
    /// Defaults to 10 seconds; must be non-zero and at most
    /// [`MAX_TIMEOUT`](Self::MAX_TIMEOUT) (one day), else [`build`](Self::build)
    /// fails with [`Error::InvalidConfig`].
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Sets the lease table: `name` or `schema.name`, each part an unquoted
    /// lower-case identifier (`[a-z_][a-z0-9_]*`, at most 63 bytes). The schema must
    /// exist.
    ///
    /// Defaults to `lockbox_leases` (found through the role's `search_path`).
    pub fn table(mut self, table: &str) -> Self {
        self.table = table.to_owned();
        self
    }

    /// Whether [`build`](Self::build) creates the lease table when it is missing. Turn
    /// it off when migrations are managed elsewhere (the DDL is in the README); a
    /// missing table then fails the build with [`Error::MissingTable`].
    ///
    /// Defaults to `true`.
    pub fn create_table(mut self, create: bool) -> Self {
        self.create_table = create;
        self
    }

    /// PostgreSQL only: whether [`build`](Self::build) creates a missing lease
    /// table `UNLOGGED`, so that no grant, renewal or release waits for a WAL
    /// flush (about twice the grants per second of a durable table on a disk
    /// where a flush costs what it does on most).
    ///
    /// Every guarantee still holds. A crash (or a failover: a promoted standby
    /// has no unlogged rows) empties the lease table, so two tables beside it
    /// keep what must survive: `<table>_epoch`, written durably but rarely,
    /// bounds every token and every lease end ever granted; `<table>_alive`,
    /// unlogged, says whether the lease table is still whole. A client that
    /// finds it emptied starts a new *epoch*: tokens go on above every earlier
    /// one, and **no lock is granted until every lease granted before the crash
    /// would have ended** (a holder that did not yet learn of the crash may
    /// still be at work until its deadline). That lock-delay is at most the
    /// longest TTL ever granted plus the larger of it and one second. Acquires
    /// wait it out ([`try_lock`](crate::LockClient::try_lock) reports the lock
    /// not acquired meanwhile). The trade: a durable table makes a crash cost
    /// nothing but the crashed holders' leases; an unlogged one pauses every
    /// name for up to that long.
    ///
    /// What a table is, not this setting, decides how it is used: every client
    /// of an unlogged table (whatever this says) gates its grants on it, and
    /// an existing durable table is never converted (turning this on with one
    /// fails the build: convert it with every client stopped, see the README).
    /// Shared leases (readers, semaphores) are not available on an unlogged
    /// table yet.
    ///
    /// Defaults to `false`.
    pub fn unlogged_leases(mut self, unlogged: bool) -> Self {
        self.unlogged_leases = unlogged;
        self
    }

    /// PostgreSQL only: whether this client records the lease history — every
    /// grant, release, expired lease taken over and zombie session terminated
    /// (name, token, owner, metadata, when, what) — in the table
    /// `<table>_history` beside the lease table, which [`build`](Self::build)
    /// creates when missing (with [`create_table`](Self::create_table)).
    /// Each event is written by the statement that makes the change, so it
    /// costs no round trip; read it with
    /// [`LockClient::history`](crate::LockClient::history). Events of clients
    /// that do not record are missing: turn it on in every client of the table.
    ///
    /// Defaults to `false`.
    pub fn history(mut self, keep: bool) -> Self {
        self.keep_history = keep;
        self
    }

    /// PostgreSQL only: how long history events are kept. Older ones are
    /// deleted a few at a time by this client's releases (one in sixteen),
    /// skipping rows another transaction holds, so pruning never makes an
    /// acquire wait. The table is shared: each client prunes with its own
    /// retention, so the shortest of any client of the table wins. A client
    /// whose role lacks DELETE, SELECT or UPDATE on the history table prunes
    /// nothing (logged at build); one lacking INSERT is refused at build with
    /// [`Error::InsufficientPrivilege`] (every grant writes its event, so each
    /// would fail; revoking INSERT later fails grants, and releases, which
    /// then leave the lease to expire, with that error).
    /// Pruning happens only on releases: leases that mostly end by expiry
    /// rather than release are pruned more slowly than they are recorded.
    ///
    /// Defaults to 7 days; accepted from one minute to ten years, else
    /// [`build`](Self::build) fails with [`Error::InvalidConfig`].
    pub fn history_retention(mut self, retention: Duration) -> Self {
        self.history_retention = retention;
        self
    }

    /// Sets how long [`LockClient::health`](crate::LockClient::health) may take: a
    /// database that has not answered by then is reported unreachable.
    ///
    /// Defaults to 5 seconds; must be non-zero and at most
    /// [`MAX_TIMEOUT`](Self::MAX_TIMEOUT) (one day), else [`build`](Self::build)
    /// fails with [`Error::InvalidConfig`].
    pub fn health_timeout(mut self, timeout: Duration) -> Self {
        self.health_timeout = timeout;
        self
    }

    /// Sets a handler that receives every acquire, release, renewal and loss.
    ///
    /// Defaults to none.
    pub fn event_handler(mut self, handler: impl HandleEvent) -> Self {
        self.event_handler = Some(Arc::new(handler));
        self
    }

    /// Redis only: whether [`build`](Self::build) accepts a server whose
    /// `maxmemory-policy` may evict keys (anything but `noeviction`). Such a server
    /// can evict a live lock key under memory pressure (`volatile-*`: a second
    /// holder is granted the lock) or the fencing-token counter (`allkeys-*`), so
    /// by default `build()` refuses it with [`Error::Unsupported`]. Turn this on
    /// only if you accept that; `health()` still reports the policy.
    ///
    /// Defaults to `false`.
    pub fn allow_evicting_redis(mut self, allow: bool) -> Self {
        self.allow_evicting_redis = allow;
        self
    }

    /// Redis only: the CA certificates (a PEM file) that a `rediss://` server's
    /// certificate must have been issued by, as `redis-cli --tls --cacert FILE`
    /// takes them. The certificate must also be valid for the URL's host name
    /// (use the name it was issued for, not an IP address it does not list).
    ///
    /// Defaults to none: the platform's trust store, as `redis-cli --tls`
    /// without `--cacert`, read once by [`build`](Self::build) (entries rustls
    /// cannot use are skipped; a store with none it can is
    /// [`Error::InvalidConfig`]). With a file given, the platform's trust
    /// store plays no part. The file is read by [`build`](Self::build), which
    /// fails with [`Error::InvalidConfig`] when it cannot be read or holds no
    /// certificate, when the URL is not `rediss://` (a TLS setting is never
    /// ignored), or when the client is not a Redis one. Feature `redis`.
    #[cfg(feature = "redis")]
    pub fn redis_tls_ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.redis_tls.ca_file = Some(path.into());
        self
    }

    /// Redis only: a client certificate (chain) and its private key, PEM files,
    /// presented to a `rediss://` server that asks for one (`tls-auth-clients
    /// yes` or `optional`), as `redis-cli --tls --cert FILE --key FILE`.
    ///
    /// Defaults to none: no client certificate is sent, and a server that
    /// requires one refuses the connection. [`build`](Self::build) reads both
    /// files and fails with [`Error::InvalidConfig`] when either cannot be read,
    /// they do not hold a certificate and a matching key, the URL is not
    /// `rediss://`, or the client is not a Redis one. Feature `redis`.
    #[cfg(feature = "redis")]
    pub fn redis_tls_client_cert(
        mut self,
        cert_file: impl Into<PathBuf>,
        key_file: impl Into<PathBuf>,
    ) -> Self {
        self.redis_tls.client_cert = Some((cert_file.into(), key_file.into()));
        self
    }

    /// etcd only: the CA certificates (a PEM file) that the certificate of an
    /// `https://` endpoint must have been issued by, as `etcdctl --cacert FILE`
    /// takes them. The certificate must also be valid for the endpoint's host
    /// (a DNS name or an IP address it lists; use the name it was issued for).
    ///
    /// Defaults to none: the platform's trust store, read once by
    /// [`build`](Self::build) (entries rustls cannot use are skipped; a store
    /// with none it can is [`Error::InvalidConfig`]). With a file given, the
    /// platform's trust store plays no part. The file is read by
    /// [`build`](Self::build), which fails with [`Error::InvalidConfig`] when it
    /// cannot be read or holds no certificate, when the endpoints are not
    /// `https://` (a TLS setting is never ignored), or when the client is not
    /// an etcd one. Feature `etcd`.
    #[cfg(feature = "etcd")]
    pub fn etcd_tls_ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.etcd_tls.ca_file = Some(path.into());
        self
    }

    /// etcd only: a client certificate (chain) and its private key, PEM files,
    /// presented to `https://` endpoints that ask for one (etcd's
    /// `--client-cert-auth`), as `etcdctl --cert FILE --key FILE`.
    ///
    /// Defaults to none: no client certificate is sent, and a member started
    /// with `--client-cert-auth` refuses the connection. [`build`](Self::build)
    /// reads both files and fails with [`Error::InvalidConfig`] when either
    /// cannot be read, they do not hold a certificate and a matching key, the
    /// endpoints are not `https://`, or the client is not an etcd one. Neither
    /// the key nor its contents ever appear in an error, a log or `Debug`
    /// output (the paths do). Feature `etcd`.
    #[cfg(feature = "etcd")]
    pub fn etcd_tls_client_cert(
        mut self,
        cert_file: impl Into<PathBuf>,
        key_file: impl Into<PathBuf>,
    ) -> Self {
        self.etcd_tls.client_cert = Some((cert_file.into(), key_file.into()));
        self
    }

    /// Test-only: replaces the name → advisory key function, to force collisions.
    #[cfg(feature = "test-support")]
    #[doc(hidden)]
    pub fn __advisory_key_fn(mut self, key_fn: fn(&str) -> i64) -> Self {
        self.key_fn = key_fn;
        self
    }

    pub(crate) fn timing(&self) -> Timing {
        Timing {
            ttl: self.ttl,
            renew_interval: self.renew_interval,
        }
    }

    /// Checks everything that can be checked without the database.
    pub(crate) fn validate(&self) -> Result<()> {
        self.timing().check_ttl(self.ttl)?;
        if self.pool_size == 0 || self.pool_size > MAX_POOL_SIZE {
            return Err(Error::InvalidConfig(format!(
                "pool size {} is outside the accepted range 1 ..= {MAX_POOL_SIZE}",
                self.pool_size
            )));
        }
        if self.locks_per_session == 0 || self.locks_per_session > MAX_LOCKS_PER_SESSION {
            return Err(Error::InvalidConfig(format!(
                "locks per session {} is outside the accepted range 1 ..= {MAX_LOCKS_PER_SESSION}",
                self.locks_per_session
            )));
        }
        check_timeout("pool timeout", self.pool_timeout)?;
        check_timeout("connect timeout", self.connect_timeout)?;
        check_timeout("health timeout", self.health_timeout)?;
        if !(MIN_HISTORY_RETENTION..=MAX_HISTORY_RETENTION).contains(&self.history_retention) {
            return Err(Error::InvalidConfig(format!(
                "history retention {:?} is outside the accepted range 1 minute ..= 10 years",
                self.history_retention
            )));
        }
        if self.unlogged_leases && !matches!(self.store, Store::Postgres) {
            return Err(Error::InvalidConfig(
                "unlogged leases are a setting of the PostgreSQL store only".to_owned(),
            ));
        }
        if self.keep_history && !matches!(self.store, Store::Postgres) {
            return Err(Error::InvalidConfig(
                "the lease history is kept by the PostgreSQL store only".to_owned(),
            ));
        }
        self.check_tls_files()?;
        validate_table(&self.table)
    }

    /// Refuses Redis or etcd TLS files on a client of another store: they
    /// would be ignored, and a TLS setting is never silently ignored.
    fn check_tls_files(&self) -> Result<()> {
        self.check_redis_tls()?;
        self.check_etcd_tls()
    }

    fn check_redis_tls(&self) -> Result<()> {
        #[cfg(feature = "redis")]
        if matches!(self.store, Store::Redis) {
            return Ok(());
        }
        if self.redis_tls.is_set() {
            return Err(Error::InvalidConfig(
                "redis_tls_ca_file and redis_tls_client_cert apply to Redis clients only \
                 (PostgreSQL takes sslrootcert, sslcert and sslkey in its connection string)"
                    .to_owned(),
            ));
        }
        Ok(())
    }

    fn check_etcd_tls(&self) -> Result<()> {
        #[cfg(feature = "etcd")]
        if matches!(self.store, Store::Etcd) {
            return Ok(());
        }
        if self.etcd_tls.is_set() {
            return Err(Error::InvalidConfig(
                "etcd_tls_ca_file and etcd_tls_client_cert apply to etcd clients only \
                 (PostgreSQL takes sslrootcert, sslcert and sslkey in its connection string)"
                    .to_owned(),
            ));
        }
        Ok(())
    }

    /// Validates the configuration, connects, creates the lease table if it is
    /// missing (unless turned off) and starts the renewal thread.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for a bad setting or connection string;
    /// [`Error::Connect`] when the database cannot be reached (the message names the
    /// address, never the password); [`Error::MissingTable`],
    /// [`Error::Unsupported`] (PostgreSQL older than 14, a standby, a read-only
    /// session, or a transaction-pooling proxy) or [`Error::Database`] for
    /// problems found on the server.
    pub fn build(self) -> Result<LockClient> {
        self.validate()?;
        LockClient::from_builder(self)
    }
}

impl std::fmt::Debug for LockClientBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("LockClientBuilder");
        d.field("store", &self.store);
        if let Some(target) = self.target() {
            // Never the connection string itself: a password can hide in it in
            // more ways than any editing of it could find.
            d.field("target", &target);
        }
        d.field("ttl", &self.ttl)
            .field("renew_interval", &self.renew_interval)
            .field("pool_size", &self.pool_size)
            .field("locks_per_session", &self.locks_per_session)
            .field("pool_timeout", &self.pool_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("table", &self.table)
            .field("create_table", &self.create_table)
            .field("history", &self.keep_history)
            .field("unlogged_leases", &self.unlogged_leases)
            .field("history_retention", &self.history_retention)
            .field("health_timeout", &self.health_timeout)
            .field("event_handler", &self.event_handler)
            .field("allow_evicting_redis", &self.allow_evicting_redis)
            .field("redis_tls", &self.redis_tls)
            .field("etcd_tls", &self.etcd_tls)
            .finish()
    }
}

impl LockClientBuilder {
    /// Where the builder connects, described from the parsed connection string
    /// (`None` for a store given ready-made, which has no connection string).
    fn target(&self) -> Option<String> {
        match self.store {
            Store::Postgres => Some(crate::backend::postgres::describe_url(&self.url)),
            #[cfg(feature = "redis")]
            Store::Redis => Some(crate::backend::redis::describe_url(&self.url)),
            #[cfg(feature = "etcd")]
            Store::Etcd => Some(crate::backend::etcd::describe_endpoints(&self.url)),
            Store::Given(_) => None,
        }
    }
}

/// Refuses a zero timeout and one above [`LockClientBuilder::MAX_TIMEOUT`]
/// (`Duration::MAX` would overflow every deadline computed from it).
fn check_timeout(what: &str, timeout: Duration) -> Result<()> {
    let max = LockClientBuilder::MAX_TIMEOUT;
    if timeout.is_zero() || timeout > max {
        return Err(Error::InvalidConfig(format!(
            "{what} {timeout:?} is outside the accepted range 1ns ..= {max:?}"
        )));
    }
    Ok(())
}

/// Accepts `name` or `schema.name` made of unquoted lower-case identifiers, so the
/// table name can be spliced into SQL safely (it is also quoted there).
fn validate_table(table: &str) -> Result<()> {
    let parts: Vec<&str> = table.split('.').collect();
    let ident_ok = |p: &str| {
        let mut chars = p.chars();
        matches!(chars.next(), Some('a'..='z' | '_'))
            && chars.all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_'))
            && p.len() <= 63
    };
    if parts.len() > 2 || !parts.iter().all(|p| ident_ok(p)) {
        return Err(Error::InvalidConfig(format!(
            "table {table:?} is not `name` or `schema.name` made of lower-case identifiers \
             ([a-z_][a-z0-9_]*, at most 63 bytes each)"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn builder() -> LockClientBuilder {
        LockClientBuilder::new("postgres://u@127.0.0.1/db")
    }

    fn invalid(b: LockClientBuilder) -> String {
        match b.validate() {
            Err(Error::InvalidConfig(msg)) => msg,
            other => panic!("expected InvalidConfig, got {other:?}"),
        }
    }

    #[test]
    fn defaults_are_valid() {
        builder().validate().unwrap();
    }

    #[test]
    fn rejects_bad_ttls_and_intervals() {
        assert!(invalid(builder().ttl(Duration::ZERO)).contains("ttl"));
        assert!(invalid(builder().ttl(Duration::from_millis(99))).contains("ttl"));
        assert!(invalid(builder().ttl(MAX_TTL + Duration::from_secs(1))).contains("ttl"));
        assert!(
            invalid(builder().renew_interval(Duration::from_secs(16))).contains("renew interval")
        );
        assert!(
            invalid(builder().renew_interval(Duration::from_millis(1))).contains("renew interval")
        );
        builder()
            .renew_interval(Duration::from_secs(15))
            .validate()
            .unwrap();
    }

    #[test]
    fn rejects_bad_pool_settings() {
        assert!(invalid(builder().pool_size(0)).contains("pool size"));
        assert!(invalid(builder().pool_size(MAX_POOL_SIZE + 1)).contains("pool size"));
        assert!(invalid(builder().locks_per_session(0)).contains("locks per session"));
        assert!(
            invalid(builder().locks_per_session(MAX_LOCKS_PER_SESSION + 1))
                .contains("locks per session")
        );
        assert!(invalid(builder().pool_timeout(Duration::ZERO)).contains("pool timeout"));
        assert!(invalid(builder().connect_timeout(Duration::ZERO)).contains("connect timeout"));
    }

    #[test]
    fn table_identifiers() {
        for ok in ["leases", "app.leases", "_x1", "a_b.c_d"] {
            builder().table(ok).validate().unwrap();
        }
        for bad in [
            "",
            "Leases",
            "a.b.c",
            "x;drop table y",
            "\"q\"",
            "1abc",
            "a.",
            &"a".repeat(64),
        ] {
            assert!(invalid(builder().table(bad)).contains("table"), "{bad:?}");
        }
    }

    #[test]
    fn rejects_timeouts_out_of_range() {
        let max = LockClientBuilder::MAX_TIMEOUT;
        for d in [Duration::ZERO, max + Duration::from_nanos(1), Duration::MAX] {
            assert!(invalid(builder().pool_timeout(d)).contains("pool timeout"));
            assert!(invalid(builder().connect_timeout(d)).contains("connect timeout"));
            assert!(invalid(builder().health_timeout(d)).contains("health timeout"));
        }
        assert!(invalid(builder().ttl(Duration::MAX)).contains("ttl"));
        assert!(invalid(builder().renew_interval(Duration::MAX)).contains("renew interval"));
        builder()
            .pool_timeout(max)
            .connect_timeout(max)
            .health_timeout(max)
            .validate()
            .unwrap();
    }

    /// Every place a password can sit in a string the drivers accept.
    const PG_FORMS: &[&str] = &[
        "postgres://app:hunter2@db:5432/appdb",
        "postgres://app@db:5432/appdb?password=hunter2&sslmode=disable",
        "host=db port=5432 user=app password=hunter2 dbname=appdb",
        "host=db port=5432 user=app password = hunter2 dbname=appdb",
        "host=db port=5432 user=app password='hunter2 and more' dbname=appdb",
        "host=db port=5432 user=app password=hunter2\\ more dbname=appdb",
        "host=db\tport=5432\tuser=app\tpassword=hunter2\tdbname=appdb",
        "host=db port=5432 user=app dbname=appdb password =\t'hunter2'",
    ];

    #[test]
    fn debug_describes_postgres_targets_without_the_password() {
        for url in PG_FORMS {
            assert!(
                url.parse::<postgres::Config>().is_ok(),
                "{url} does not parse"
            );
            let shown = format!("{:?}", LockClientBuilder::new(url));
            for secret in ["hunter2", "ter2", "ter?2", "more"] {
                assert!(!shown.contains(secret), "{shown}");
            }
            assert!(
                shown.contains("postgresql://app@db:5432/appdb"),
                "{url}: {shown}"
            );
        }
        for bad in [
            // An `@` after a `/` or `?` is refused (the driver would split the
            // credentials there): percent-encode them.
            "postgres://app:hun/ter2@db:5432/appdb",
            "postgres://app:hun?ter2@db:5432/appdb",
            "postgres://app:hun/ter?2@db:5432/appdb?password=hunter2",
            "postgres://db:5432/appdb?password=hunter2&application_name=a@b",
            "host=db password='hunter2",
            "password hunter2",
            "postgres://h:hunter2x/db",
        ] {
            let shown = format!("{:?}", LockClientBuilder::new(bad));
            assert!(!shown.contains("hunter2"), "{shown}");
            assert!(
                shown.contains(crate::backend::UNPARSEABLE),
                "{bad}: {shown}"
            );
        }
    }

    #[test]
    fn postgres_description_names_every_host() {
        let shown = crate::backend::postgres::describe_url(
            "host=a,b,::1 port=1,2,3 user=u dbname=d password=x",
        );
        assert_eq!(shown, "postgresql://u@a:1,b:2,[::1]:3/d");
        let shown = crate::backend::postgres::describe_url("hostaddr=10.0.0.1 port=7 password=x");
        assert_eq!(
            shown,
            "postgresql://(default user)@10.0.0.1:7/(default database)"
        );
    }

    #[cfg(feature = "redis")]
    #[test]
    fn debug_describes_redis_targets_without_the_password() {
        let cases = [
            ("redis://:hunter2@cache:6380/2", "redis://cache:6380/2"),
            (
                "redis://bob:hunter2@cache:6380/2",
                "redis://bob@cache:6380/2",
            ),
            (
                "redis://bob:hun%2Fter2%3F@cache/2",
                "redis://bob@cache:6379/2",
            ),
            (
                "redis://cache:6380/2?password=hunter2",
                "redis://cache:6380/2",
            ),
            ("redis://cache:6380/2?pass=hunter2", "redis://cache:6380/2"),
            (
                "redis+unix:///run/redis.sock?db=3&user=bob&pass=hunter2",
                "redis+unix://bob@/run/redis.sock?db=3",
            ),
            (
                "unix:///run/redis.sock?user=bob&pass=hunter2",
                "redis+unix://bob@/run/redis.sock?db=0",
            ),
            (
                "rediss://bob:hunter2@cache:6380/2",
                "rediss://bob@cache:6380/2",
            ),
            ("rediss://:hunter2@[::1]/", "rediss://[::1]:6379/0"),
            (
                "valkeys://bob:hun%2Fter2@cache/1",
                "rediss://bob@cache:6379/1",
            ),
            (
                "redis://bob:hun/ter2@cache:6380/2",
                crate::backend::UNPARSEABLE,
            ),
            (
                "redis://bob:hun?ter2@cache:6380/2",
                crate::backend::UNPARSEABLE,
            ),
            ("hunter2", crate::backend::UNPARSEABLE),
        ];
        for (url, want) in cases {
            let b = LockClientBuilder::for_store(Store::Redis, url);
            let shown = format!("{b:?}");
            assert!(
                !shown.contains("hunter2") && !shown.contains("ter2"),
                "{shown}"
            );
            assert!(shown.contains(want), "{url}: want {want} in {shown}");
        }
    }

    #[test]
    fn margin_keeps_deadline_inside_lease() {
        for ttl in [MIN_TTL, Duration::from_secs(30), MAX_TTL] {
            assert!(safety_margin(ttl) < ttl / 10);
            assert!(safety_margin(ttl) > Duration::ZERO);
        }
    }
}
