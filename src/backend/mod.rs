//! The interface a lock store implements, and the stores lockbox ships.
//!
//! The client, the [`Lock`](crate::Lock) guard, the renewal thread, the metrics
//! and the health report are written once against [`Backend`] and [`Session`];
//! a store provides exactly this:
//!
//! - **acquire-if-free** with a TTL and an owner, returning a fencing token that
//!   strictly increases per name, and **waiting** for a release (without polling)
//!   as long as the request allows: [`Backend::acquire`];
//! - **renew** and **release** that act only while the lease is still the
//!   caller's (name, owner, token) and never re-create one: [`Session`];
//! - **inspection** and **health**: [`Backend::leases`], [`Backend::probe`],
//!   [`Backend::pool_health`].
//!
//! PostgreSQL ([`LockClient::builder`](crate::LockClient::builder)) is the
//! default store; [`MemoryBackend`] is process-local; `RedisBackend` (feature
//! `redis`, `LockClient::redis`) uses one Redis server; `EtcdBackend` (feature
//! `etcd`, `LockClient::etcd`) an etcd cluster.

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use rustls::RootCertStore;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::error::{LostReason, Result};
use crate::health::{DatabaseHealth, PoolHealth};
use crate::lease_info::LeaseInfo;
use crate::telemetry::{Gauge, Telemetry};

#[cfg(feature = "etcd")]
pub(crate) mod etcd;
pub(crate) mod memory;
pub(crate) mod postgres;
#[cfg(feature = "redis")]
pub(crate) mod redis;

#[cfg(feature = "etcd")]
pub use self::etcd::EtcdBackend;
#[cfg(feature = "redis")]
pub use self::redis::RedisBackend;
pub use memory::MemoryBackend;

/// How long an acquire may wait for a held lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// Report "not acquired" at once.
    No,
    /// Wait until this instant at the latest.
    Until(Instant),
    /// Wait as long as it takes.
    Forever,
}

/// What kind of lease an acquire asks for. Every kind draws its fencing token
/// from the name's one sequence, so a token is above every token issued
/// before for the name, whatever their kinds.
///
/// A store keeps, per name, either one exclusive lease or a *group* of shared
/// leases (readers, or permits of one semaphore), each held, renewed, released
/// and lost on its own. An exclusive acquire is granted only once no lease of
/// the name is live; a shared one only while no exclusive lease is live, and
/// never to a reader while an exclusive acquire waits for the name (readers
/// queue behind a waiting writer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum LeaseKind {
    /// The only holder of the name: a [`Lock`](crate::Lock), a writer, a leader.
    Exclusive,
    /// One of any number of readers.
    Shared,
    /// One of at most `permits` holders of a counting semaphore. Every live
    /// permit of a name was granted with the same `permits`: an acquire with
    /// another count while permits are live is refused
    /// ([`Error::InvalidConfig`](crate::Error::InvalidConfig)).
    Permit {
        /// The semaphore's number of permits (at least 1).
        permits: u32,
    },
}

impl LeaseKind {
    /// Whether this is [`LeaseKind::Exclusive`].
    pub fn is_exclusive(self) -> bool {
        self == LeaseKind::Exclusive
    }

    /// The refusal of an acquire of `self` on a name whose live shared leases
    /// are of kind `live`: a semaphore with another count, or readers and
    /// permits mixed on one name.
    pub fn mismatch(self, live: LeaseKind, name: &str) -> crate::Error {
        let what = |k: LeaseKind| match k {
            LeaseKind::Exclusive => "an exclusive lock".to_owned(),
            LeaseKind::Shared => "a reader-writer lock".to_owned(),
            LeaseKind::Permit { permits } => format!("a semaphore of {permits} permits"),
        };
        crate::Error::InvalidConfig(format!(
            "{name:?} is in use as {}; it cannot be used as {} until every lease of it has ended",
            what(live),
            what(self)
        ))
    }
}

/// One acquire request, validated by the client: a non-empty name, a TTL within
/// bounds, metadata within bounds.
pub struct AcquireRequest<'a> {
    pub(crate) name: &'a str,
    pub(crate) owner: &'a str,
    pub(crate) ttl: Duration,
    pub(crate) metadata: Option<&'a str>,
    pub(crate) wait: Wait,
    pub(crate) dedicated: bool,
    pub(crate) kind: LeaseKind,
    pub(crate) announce: bool,
    pub(crate) telemetry: &'a Telemetry,
}

impl fmt::Debug for AcquireRequest<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AcquireRequest")
            .field("name", &self.name)
            .field("owner", &self.owner)
            .field("ttl", &self.ttl)
            .field("wait", &self.wait)
            .field("dedicated", &self.dedicated)
            .field("kind", &self.kind)
            .field("announce", &self.announce)
            .finish_non_exhaustive()
    }
}

impl<'a> AcquireRequest<'a> {
    /// The lock's name.
    pub fn name(&self) -> &'a str {
        self.name
    }

    /// The client's owner id, to store with the lease.
    pub fn owner(&self) -> &'a str {
        self.owner
    }

    /// The lease length to grant.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Free-form metadata to store with the lease.
    pub fn metadata(&self) -> Option<&'a str> {
        self.metadata
    }

    /// How long the acquire may wait.
    pub fn wait(&self) -> Wait {
        self.wait
    }

    /// Whether the lock must have a store session of its own, shared with no
    /// other lock ([`AcquireOptions::dedicated_session`](crate::AcquireOptions::dedicated_session)).
    pub fn dedicated(&self) -> bool {
        self.dedicated
    }

    /// The kind of lease asked for.
    pub fn kind(&self) -> LeaseKind {
        self.kind
    }

    /// Whether the grant, and the end of the lease (its release, or the next
    /// grant of the name), must be announced to [`Backend::watch`]ers of the
    /// name (a leader's lease). Others need not be.
    pub fn announce(&self) -> bool {
        self.announce
    }

    /// What is left of the wait: `None` for "do not wait", `Duration::MAX` for
    /// forever, zero once it has run out.
    pub fn remaining(&self) -> Option<Duration> {
        match self.wait {
            Wait::No => None,
            Wait::Forever => Some(Duration::MAX),
            Wait::Until(until) => Some(until.saturating_duration_since(Instant::now())),
        }
    }

    /// How long ago the wait ran out (zero while it has not, or when it is
    /// not bounded).
    pub fn overdue(&self) -> Duration {
        match self.wait {
            Wait::Until(until) => Instant::now().saturating_duration_since(until),
            Wait::No | Wait::Forever => Duration::ZERO,
        }
    }

    /// Counts this acquire as waiting on a holder (the `acquires_waiting` gauge)
    /// until the returned guard is dropped.
    pub fn waiting(&self) -> WaitingGuard<'a> {
        WaitingGuard(self.telemetry.waiting())
    }

    /// Counts this acquire as waiting for a pooled connection until the guard is
    /// dropped (reported by health as pool waiters).
    pub fn pool_waiting(&self) -> WaitingGuard<'a> {
        WaitingGuard(self.telemetry.pool_waiting())
    }

    /// Reports that a zombie holder's session was terminated to take its lock over.
    pub fn zombie_terminated(&self) {
        self.telemetry.zombie_terminated();
    }
}

/// Keeps a gauge raised while it lives; from [`AcquireRequest::waiting`].
#[derive(Debug)]
pub struct WaitingGuard<'a>(#[allow(dead_code)] Gauge<'a>);

/// Identifies one lease for ownership checks.
#[derive(Debug, Clone, Copy)]
pub struct LeaseRef<'a> {
    /// The lock's name.
    pub name: &'a str,
    /// The owner id the lease was granted to.
    pub owner: &'a str,
    /// The grant's fencing token.
    pub token: u64,
    /// How long the store may take to answer: what is left before the holder's
    /// local deadline (never zero). A store must bound the renewal or release by
    /// it and give up with an error rather than act later: past it the holder
    /// has already reported the lock lost, and the lease may be someone else's.
    pub limit: Duration,
}

/// A granted lock: the session that holds it and its lease.
#[derive(Debug)]
pub struct Grant {
    /// The store-side handle of the lock, kept by the guard.
    pub session: Box<dyn Session>,
    /// The grant's fencing token.
    pub token: u64,
    /// When the granting request was sent: the lease must run from no earlier.
    pub sent_at: Instant,
    /// Whether the acquire had to wait for a holder (for the metrics).
    pub waited: bool,
}

/// The result of a renewal that reached the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewal {
    /// The lease was ours and live, and now runs for the new TTL.
    Renewed,
    /// The lease is no longer ours (or the session holding it is gone).
    Lost(LostReason),
}

/// The result of a release that reached the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Release {
    /// The lease was ours and live; it is now released.
    Released,
    /// The lease was ours but had already run out; it is marked released.
    WasExpired,
    /// The lease was no longer ours; nothing was changed.
    NotOwner,
    /// The session holding the lock had already ended; the lock was freed with it
    /// and its lease runs out by itself.
    SessionLost,
}

/// What is shown for a connection string that does not parse: the string may be
/// a password typed in the wrong place, so none of it is shown.
pub(crate) const UNPARSEABLE: &str = "(unparseable connection string)";

/// The platform's trust store, read now, as rustls-native-certs finds it
/// (`SSL_CERT_FILE` and `SSL_CERT_DIR`, else the system's store): each
/// certificate in it that rustls takes as a trust anchor. Entries that cannot
/// be read or parsed are skipped, so one bad file or bundle entry does not make
/// the rest unusable. `Err` (with the first problem found) when none is usable.
/// Read once per client, at `build()`: never at each connection.
pub(crate) fn platform_roots() -> std::result::Result<Vec<CertificateDer<'static>>, String> {
    let found = rustls_native_certs::load_native_certs();
    let roots = usable_roots(found.certs);
    if roots.is_empty() {
        return Err(found
            .errors
            .first()
            .map(|e| format!("no CA certificate found in the platform's trust store: {e}"))
            .unwrap_or_else(|| {
                "no CA certificate found in the platform's trust store".to_owned()
            }));
    }
    if let Some(e) = found.errors.first() {
        log::debug!(
            "lockbox: {} entries of the platform's trust store skipped (the first: {e})",
            found.errors.len()
        );
    }
    Ok(roots)
}

/// What a TLS client is set up with, read from a [`TlsFiles`](crate::config::TlsFiles)
/// by [`load_tls_files`]: the roots to trust and, optionally, a client identity.
#[cfg_attr(not(any(feature = "etcd", feature = "redis")), allow(dead_code))]
pub(crate) struct TlsMaterial {
    /// The CA file's certificates, or the platform's trust store.
    pub roots: Vec<CertificateDer<'static>>,
    /// A client certificate chain and its private key, checked to match.
    pub client: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    /// The same two files as read (PEM), for a driver that takes them so
    /// (Redis's).
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub client_pem: Option<(Vec<u8>, Vec<u8>)>,
}

impl fmt::Debug for TlsMaterial {
    /// Counts only: never the key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsMaterial")
            .field("roots", &self.roots.len())
            .field("client_cert", &self.client.is_some())
            .finish()
    }
}

/// Reads and checks TLS files now (a bad file fails `build()`, not every later
/// connection): the CA file's certificates (none usable is an error), or
/// without one the platform's trust store, read once; and the client
/// certificate with its key, which must belong together. `ca_setting` and
/// `cert_setting` name the builder settings in messages (`etcd_tls_ca_file`,
/// …) and `scheme` the kind of address (`https://`). Messages name the files,
/// never their contents.
#[cfg_attr(not(any(feature = "etcd", feature = "redis")), allow(dead_code))]
pub(crate) fn load_tls_files(
    files: &crate::config::TlsFiles,
    ca_setting: &str,
    cert_setting: &str,
    scheme: &str,
) -> Result<TlsMaterial> {
    use crate::error::Error;
    use rustls::pki_types::pem::PemObject;

    fn read(path: &std::path::Path, what: &str) -> Result<Vec<u8>> {
        std::fs::read(path)
            .map_err(|e| Error::InvalidConfig(format!("{what} {}: {e}", path.display())))
    }
    fn certs(
        pem: &[u8],
        path: &std::path::Path,
        what: &str,
    ) -> Result<Vec<CertificateDer<'static>>> {
        let certs = CertificateDer::pem_slice_iter(pem)
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| {
                Error::InvalidConfig(format!("{what} {}: {}", path.display(), pem_problem(&e)))
            })?;
        if certs.is_empty() {
            return Err(Error::InvalidConfig(format!(
                "{what} {}: holds no PEM certificate",
                path.display()
            )));
        }
        Ok(certs)
    }

    let roots = match &files.ca_file {
        Some(path) => {
            let pem = read(path, ca_setting)?;
            let roots = usable_roots(certs(&pem, path, ca_setting)?);
            if roots.is_empty() {
                return Err(Error::InvalidConfig(format!(
                    "{ca_setting} {}: no usable CA certificate in it",
                    path.display()
                )));
            }
            roots
        }
        None => platform_roots().map_err(|why| {
            Error::InvalidConfig(format!(
                "{scheme} without {ca_setting} trusts the platform's trust store: {why}; give \
                 the CA that issued the server's certificate with {ca_setting}"
            ))
        })?,
    };
    let mut client_pem = None;
    let client = match &files.client_cert {
        Some((cert_path, key_path)) => {
            let cert_what = format!("{cert_setting} certificate");
            let pem = read(cert_path, &cert_what)?;
            let chain = certs(&pem, cert_path, &cert_what)?;
            let key_pem = read(key_path, &format!("{cert_setting} key"))?;
            // The error names the file and the problem in fixed words: the
            // parser's own errors can carry the key's bytes (`pem_problem`).
            let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
                Error::InvalidConfig(format!(
                    "{cert_setting} key {}: no PEM private key in it ({})",
                    key_path.display(),
                    pem_problem(&e)
                ))
            })?;
            // A key that does not belong to the certificate fails here, not
            // at every connection.
            rustls::ClientConfig::builder_with_provider(ring_provider())
                .with_safe_default_protocol_versions()
                .and_then(|b| {
                    b.with_root_certificates(RootCertStore::empty())
                        .with_client_auth_cert(chain.clone(), key.clone_key())
                })
                .map_err(|e| {
                    Error::InvalidConfig(format!(
                        "{cert_setting} {} and {}: {e}",
                        cert_path.display(),
                        key_path.display()
                    ))
                })?;
            client_pem = Some((pem, key_pem));
            Some((chain, key))
        }
        None => None,
    };
    Ok(TlsMaterial {
        roots,
        client,
        client_pem,
    })
}

/// The crypto provider of every TLS client lockbox builds: `ring`, named
/// explicitly, never the process-wide default.
#[cfg_attr(not(any(feature = "etcd", feature = "redis")), allow(dead_code))]
pub(crate) fn ring_provider() -> Arc<rustls::crypto::CryptoProvider> {
    static PROVIDER: OnceLock<Arc<rustls::crypto::CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

/// What is wrong with a PEM file, in fixed words: the parser's own errors
/// carry bytes of the file (a whole line, or a section label that is the
/// whole key when the file's newlines became spaces or `\n`), and a key must
/// never reach a message.
pub(crate) fn pem_problem(err: &rustls::pki_types::pem::Error) -> String {
    use rustls::pki_types::pem::Error as Pem;
    match err {
        Pem::MissingSectionEnd { .. } => "a BEGIN line without its END line (is the file on one \
             line, or are its newlines written as \\n?)"
            .to_owned(),
        Pem::IllegalSectionStart { .. } => "a malformed BEGIN line (are its newlines written as \
             \\n?)"
            .to_owned(),
        Pem::Base64Decode(_) => "a section whose base64 does not decode".to_owned(),
        Pem::Io(e) => format!("it could not be read ({e})"),
        Pem::NoItemsFound => "no PEM section of the kind needed".to_owned(),
        Pem::SectionTooLarge => "a PEM section larger than 256 MB".to_owned(),
        _ => "it is not PEM".to_owned(),
    }
}

/// The certificates of `certs` that rustls takes as trust anchors.
pub(crate) fn usable_roots(certs: Vec<CertificateDer<'static>>) -> Vec<CertificateDer<'static>> {
    certs
        .into_iter()
        .filter(|c| RootCertStore::empty().add(c.clone()).is_ok())
        .collect()
}

/// A host for a URL-like description: an IPv6 address in brackets.
pub(crate) fn bracket_ipv6(host: &str) -> String {
    if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_owned()
    }
}

/// Blocking work that cannot be cancelled — opening a connection, sending a
/// cancel request — bounded in time for its caller and in number for a client.
///
/// A blocking driver call has no way to be interrupted (a PostgreSQL startup or
/// TLS handshake, a Unix-socket `connect()` to a server whose accept queue is
/// full), so each piece of work runs on a thread of its own while the caller
/// waits at most its time limit. Work whose caller gave up finishes by itself
/// when the server answers (or the connection breaks), and what it produced —
/// a connection, normally — is dropped there and then, which closes it. At
/// most `max_pending` pieces of work run at a time: against a frozen server the
/// threads and connections left waiting stay bounded, and further work fails at
/// once with [`Unfinished::Busy`] instead of piling up.
///
/// Used by the PostgreSQL connector and cancel requests, and by the Redis
/// backend's connections over a Unix socket (and its `build()`).
#[derive(Debug, Clone)]
pub(crate) struct Bounded {
    pending: Arc<AtomicUsize>,
    max_pending: usize,
    thread_name: &'static str,
}

/// Why bounded work gave no result.
#[derive(Debug)]
pub(crate) enum Unfinished {
    /// The caller's time limit (given here) ran out first; the work goes on by
    /// itself, and what it produces is dropped.
    TimedOut(Duration),
    /// This many pieces of earlier work are still running (waiting for the
    /// server); this one was not started.
    Busy(usize),
    /// No thread could be started for the work, or it ended without a result
    /// (it panicked).
    Spawn(std::io::Error),
}

/// Counts one piece of running work; the count drops when its thread ends.
struct PendingWork(Arc<AtomicUsize>);

impl Drop for PendingWork {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Work started by [`Bounded::start`], whose result may be waited for.
pub(crate) struct Started<T> {
    rx: Receiver<T>,
    thread_name: &'static str,
}

impl<T> Started<T> {
    /// The result, if it comes within `timeout`. May be called again after a
    /// [`Unfinished::TimedOut`].
    pub fn wait(&self, timeout: Duration) -> Result<T, Unfinished> {
        match self.rx.recv_timeout(timeout) {
            Ok(done) => Ok(done),
            Err(RecvTimeoutError::Timeout) => Err(Unfinished::TimedOut(timeout)),
            Err(RecvTimeoutError::Disconnected) => Err(Unfinished::Spawn(std::io::Error::other(
                format!("the {} thread ended without a result", self.thread_name),
            ))),
        }
    }
}

impl Bounded {
    /// At most `max_pending` (at least one) pieces of work at a time, each on a
    /// thread named `thread_name`.
    pub fn new(max_pending: usize, thread_name: &'static str) -> Bounded {
        Bounded {
            pending: Arc::new(AtomicUsize::new(0)),
            max_pending: max_pending.max(1),
            thread_name,
        }
    }

    /// Runs `work` on a thread of its own and waits at most `timeout` for it.
    pub fn run<T, F>(&self, timeout: Duration, work: F) -> Result<T, Unfinished>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        self.start(work)?.wait(timeout)
    }

    /// Starts `work` on a thread of its own; its result is dropped on that
    /// thread if nobody waits for it any more.
    pub fn start<T, F>(&self, work: F) -> Result<Started<T>, Unfinished>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let before = self.pending.fetch_add(1, Ordering::SeqCst);
        let pending = PendingWork(self.pending.clone());
        if before >= self.max_pending {
            return Err(Unfinished::Busy(before));
        }
        let (tx, rx) = crossbeam_channel::bounded(1);
        thread::Builder::new()
            .name(self.thread_name.to_owned())
            .spawn(move || {
                let _pending = pending;
                let done = work();
                // Fails when the caller gave up: the result (a connection) is
                // dropped here, closing it.
                let _ = tx.send(done);
            })
            .map_err(Unfinished::Spawn)?;
        Ok(Started {
            rx,
            thread_name: self.thread_name,
        })
    }
}

/// The threads every r2d2 pool of the process does its background work on
/// (opening connections, reaping idle ones): shared, so that clients built and
/// dropped one after another do not each leave three threads behind for the
/// length of r2d2's reaper period.
pub(crate) fn r2d2_threads() -> Arc<scheduled_thread_pool::ScheduledThreadPool> {
    static THREADS: OnceLock<Arc<scheduled_thread_pool::ScheduledThreadPool>> = OnceLock::new();
    THREADS
        .get_or_init(|| {
            Arc::new(
                scheduled_thread_pool::ScheduledThreadPool::builder()
                    .num_threads(4)
                    .thread_name_pattern("lockbox-pool-{}")
                    .build(),
            )
        })
        .clone()
}

/// The health of an r2d2 pool, as the stores built on one report it.
pub(crate) fn r2d2_pool_health<M: r2d2::ManageConnection>(pool: &r2d2::Pool<M>) -> PoolHealth {
    let state = pool.state();
    PoolHealth {
        max_size: pool.max_size(),
        connections: state.connections,
        idle: state.idle_connections,
        in_use: state.connections.saturating_sub(state.idle_connections),
        waiting: 0,
    }
}

/// A lock store. Implementations must be safe to share between threads; every
/// method may block.
pub trait Backend: Send + Sync + fmt::Debug + 'static {
    /// Acquires the lock if it is free (no lease, or a released or expired one),
    /// waiting as [`AcquireRequest::wait`] allows without polling. Grants carry a
    /// fencing token above every token issued before for the name.
    /// `Ok(None)`: not acquired within the wait.
    ///
    /// # Errors
    /// Any failure to reach or use the store.
    fn acquire(&self, req: &AcquireRequest<'_>) -> Result<Option<Grant>>;

    /// Checks the store on a connection of its own, answering within `timeout`
    /// whatever the store does.
    fn probe(&self, timeout: Duration) -> DatabaseHealth;

    /// The connection pool's state. `waiting` is filled in by the client.
    fn pool_health(&self) -> PoolHealth;

    /// The leases in the store: all of them, or the one of `name`.
    ///
    /// # Errors
    /// Any failure to reach or use the store.
    fn leases(&self, name: Option<&str>) -> Result<Vec<LeaseInfo>>;

    /// Whether the store grants leases of `kind`. The client refuses other kinds
    /// with [`Error::Unsupported`](crate::Error::Unsupported) before calling
    /// [`acquire`](Self::acquire). Defaults to exclusive leases only.
    fn supports(&self, kind: LeaseKind) -> bool {
        kind == LeaseKind::Exclusive
    }

    /// Watches `name` for changes of its holder: the returned [`Watch`] wakes
    /// when an announced lease ([`AcquireRequest::announce`]) of the name is
    /// granted or released, or the name is force-released, after the watch
    /// began. Used by [`Election::watch`](crate::Election::watch), which reads
    /// the lease again on each wake and at its expiry (a holder that crashes
    /// announces nothing).
    ///
    /// # Errors
    /// [`Error::Unsupported`](crate::Error::Unsupported) (the default) when the
    /// store cannot; any failure to reach the store.
    fn watch(&self, name: &str) -> Result<Box<dyn Watch>> {
        let _ = name;
        Err(crate::Error::Unsupported(format!(
            "this lock store ({self:?}) cannot watch a name"
        )))
    }

    /// The statement with which a transaction on this store's database fences
    /// itself with a held lock ([`Lock::fence`](crate::Lock::fence)). `None`
    /// (the default): the store is not a database the caller's transactions
    /// can run on.
    #[doc(hidden)]
    fn fence_statement(&self, kind: LeaseKind) -> Option<&str> {
        let _ = kind;
        None
    }

    /// The last `limit` events of `name`'s lease history, newest first.
    ///
    /// # Errors
    /// [`Error::Unsupported`](crate::Error::Unsupported) (the default) when the
    /// store keeps no history; any failure to reach or use the store.
    fn history(&self, name: &str, limit: usize) -> Result<Vec<crate::LeaseEvent>> {
        let _ = (name, limit);
        Err(crate::Error::Unsupported(
            "this store keeps no lease history (the PostgreSQL store does, with \
             LockClientBuilder::history(true))"
                .to_owned(),
        ))
    }

    /// An operator's override: ends the current lease of `name`, whoever holds
    /// it, so that the name can be granted again. Returns the ended lease's
    /// fencing token, or `None` when the name had no unreleased lease.
    ///
    /// A store must keep every guarantee but exclusion against the holder it
    /// overrides: the next grant's token is above the ended one, and the
    /// holder learns of the loss through its next renewal (which must find the
    /// lease no longer its own) or, at the latest, at its local deadline.
    ///
    /// Defaults to [`Error::Unsupported`](crate::Error::Unsupported): a store
    /// need not offer it.
    ///
    /// # Errors
    /// [`Error::Unsupported`](crate::Error::Unsupported) when the store cannot
    /// do it; [`Error::InsufficientPrivilege`](crate::Error::InsufficientPrivilege)
    /// when the store refuses it; any failure to reach or use the store.
    fn force_release(&self, name: &str) -> Result<Option<u64>> {
        let _ = name;
        Err(crate::Error::Unsupported(format!(
            "this lock store ({self:?}) does not support forcing a release"
        )))
    }
}

/// The store-side handle of one held lock. Dropping it without
/// [`release`](Session::release) abandons the lock: the store must free it or let
/// its lease run out, never hand the session to another holder.
pub trait Session: Send + fmt::Debug {
    /// Extends the lease by `ttl` from now, only if it is still ours and live.
    /// `Err` means the outcome is unknown (a transient failure worth retrying).
    ///
    /// # Errors
    /// Any failure to reach the store; the lock stays held until its deadline.
    fn renew(&mut self, lease: &LeaseRef<'_>, ttl: Duration) -> Result<Renewal>;

    /// Marks the lease released if it is still ours and frees the lock.
    ///
    /// # Errors
    /// Any failure to reach the store; the lease then runs out by itself.
    fn release(self: Box<Self>, lease: &LeaseRef<'_>) -> Result<Release>;

    /// A way to interrupt, from another thread, a statement in flight on this
    /// session. Called once, at the grant; the client uses it when a renewal is
    /// still running at the lock's deadline, so a statement stuck on the server
    /// (a lock wait, a hung backend) does not keep its worker and connection.
    /// It may block (it may open a connection) and runs on a thread of its own.
    /// `None` (the default): the store bounds every statement by
    /// [`LeaseRef::limit`] by other means.
    fn interrupter(&self) -> Option<Interrupter> {
        None
    }

    /// The store session this lock shares with other locks, if it shares one.
    /// The client renews the locks that share one together, in one request
    /// ([`SharedSession::renew_all`]) per round, instead of one per lock; and
    /// when such a request finds the session gone, every lock on it is lost.
    /// `None` (the default): the lock is renewed on its own.
    fn shared(&self) -> Option<Arc<dyn SharedSession>> {
        None
    }
}

/// A store session shared by several held locks; see [`Session::shared`].
pub trait SharedSession: Send + Sync + fmt::Debug {
    /// Renews each lease of `leases` by its TTL, in one request bounded by
    /// `limit` (the least of their limits), with the ownership checks of
    /// [`Session::renew`] for each. One result per lease, in order: a lease
    /// whose outcome is unknown (its record held up by another transaction)
    /// has an `Err` of its own and is retried. `Err` as a whole: the outcome of
    /// every one is unknown.
    ///
    /// # Errors
    /// Any failure to reach the store; the locks stay held until their deadlines.
    fn renew_all(
        &self,
        leases: &[(LeaseRef<'_>, Duration)],
        limit: Duration,
    ) -> Result<Vec<Result<Renewal>>>;
}

/// A watch on one name; see [`Backend::watch`].
pub trait Watch: Send + fmt::Debug {
    /// Waits until an announced change of the name may have happened since the
    /// watch began or the last call returned, or until `until`. `Ok(true)`:
    /// woken by a change (or possibly one: a store may wake spuriously, say
    /// after reconnecting, when a notification may have been missed);
    /// `Ok(false)`: `until` came first.
    ///
    /// # Errors
    /// The watch broke (its connection failed and could not be restored); the
    /// caller may start a new one.
    fn wait(&mut self, until: Instant) -> Result<bool>;
}

/// Interrupts a statement in flight on a session; see [`Session::interrupter`].
pub type Interrupter = Box<dyn Fn() + Send + Sync>;
