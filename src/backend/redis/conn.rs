//! Connections to the Redis server: how they are opened (connect timeout, TCP
//! keepalive, read and write timeouts, TLS), how a target is described without
//! its password, what a failed connection attempt means in words, and the two
//! places connections come from — the r2d2 pool for acquires and listings, and
//! the lease lane for renewals and releases, which never waits for anything but
//! the connection it opens.
//!
//! Every connection (pool, lane, release listener, health probe) is opened by
//! one [`redis::Client`], so all of them use the same address, TLS settings
//! and credentials.

use std::fmt;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use redis::io::tcp::{TcpSettings, socket2::TcpKeepalive};
use redis::{
    ConnectionAddr, ConnectionInfo, ErrorKind, ProtocolVersion, RedisError, RedisResult, Value,
};
use rustls::pki_types::CertificateDer;
use rustls::{AlertDescription, CertificateError};

use crate::backend::{Bounded, UNPARSEABLE, Unfinished, bracket_ipv6};
use crate::config::TlsFiles;
use crate::error::{Error, Result};

/// Idle time after which TCP sends keepalive probes, the interval between
/// probes, and how many may go unanswered: a dead peer (or a NAT that forgot the
/// connection) is noticed within about 11 s of silence.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(5);
#[cfg(any(target_os = "linux", target_os = "android"))]
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(2);
#[cfg(any(target_os = "linux", target_os = "android"))]
const KEEPALIVE_PROBES: u32 = 3;

/// A connection idle for longer than this is checked with a PING (within the
/// caller's time limit) before it is used: after a restart or a silent drop the
/// pool's idle connections are dead, and a release must not fail on one.
pub(crate) const VALIDATE_AFTER: Duration = Duration::from_secs(1);

/// How many idle connections the lease lane keeps for reuse.
const LANE_IDLE: usize = 4;

/// The most of a pipeline written with one time limit: what is left before the
/// deadline is taken again between pieces, and none is started after it.
const WRITE_PIECE: usize = 16 * 1024;

/// `redis://user@host:port/db` (or `rediss://…`, `redis+unix://user@/path?db=N`):
/// the target named from the parsed configuration, so nothing the user typed — a
/// password in the user info, in `?pass=` or `?password=`, or anywhere else — can
/// reach a message.
pub(crate) fn describe(info: &ConnectionInfo) -> String {
    let settings = info.redis_settings();
    let user = settings
        .username()
        .map(|u| format!("{u}@"))
        .unwrap_or_default();
    let db = settings.db();
    match info.addr() {
        ConnectionAddr::Tcp(host, port) => {
            format!("redis://{user}{}:{port}/{db}", bracket_ipv6(host))
        }
        ConnectionAddr::TcpTls { host, port, .. } => {
            format!("rediss://{user}{}:{port}/{db}", bracket_ipv6(host))
        }
        ConnectionAddr::Unix(path) => {
            format!("redis+unix://{user}{}?db={db}", path.display())
        }
        // A kind added to the driver later: say nothing rather than guess.
        _ => format!("redis server (db {db})"),
    }
}

/// [`describe`] for a URL; an unparseable one is named only as such (it may be
/// a password typed in the wrong place).
pub(crate) fn describe_url(url: &str) -> String {
    redis::IntoConnectionInfo::into_connection_info(url)
        .map_or_else(|_| UNPARSEABLE.to_owned(), |i| describe(&i))
}

/// The URL parsed, with the socket settings every connection gets: no Nagle
/// delay, keepalive probes, and (Linux) `TCP_USER_TIMEOUT` so that data the
/// peer never acknowledges fails the connection after `io_timeout`.
pub(crate) fn connection_info(url: &str, io_timeout: Duration) -> Result<ConnectionInfo> {
    let info = redis::IntoConnectionInfo::into_connection_info(url)
        .map_err(|e| Error::InvalidConfig(url_error(&e)))?;
    if info.redis_settings().protocol() != ProtocolVersion::RESP2 {
        return Err(Error::InvalidConfig(
            "the redis URL asks for RESP3 (protocol=resp3 or protocol=3); lockbox speaks RESP2 \
             only: it needs nothing of RESP3, and RESP3 logs in with a HELLO command that \
             carries the password, which a server without HELLO (renamed away, or before Redis \
             6) quotes back in its error. Remove protocol= from the URL"
                .to_owned(),
        ));
    }
    if let ConnectionAddr::TcpTls { insecure: true, .. } = info.addr() {
        return Err(Error::InvalidConfig(
            "the redis URL ends in #insecure, which turns off every check of the server's \
             certificate; lockbox does not connect that way: give the CA that issued the \
             server's certificate with `redis_tls_ca_file`"
                .to_owned(),
        ));
    }
    let keepalive = TcpKeepalive::new().with_time(KEEPALIVE_IDLE);
    #[cfg(any(target_os = "linux", target_os = "android"))]
    let keepalive = keepalive
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_PROBES);
    let tcp = TcpSettings::default()
        .set_nodelay(true)
        .set_keepalive(keepalive);
    #[cfg(any(target_os = "linux", target_os = "android"))]
    let tcp = tcp.set_user_timeout(io_timeout);
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let _ = io_timeout;
    Ok(info.set_tcp_settings(tcp))
}

/// A URL the driver refused, described by the kind of error only. The
/// driver's URL errors are a fixed description plus, for some, a detail that
/// quotes part of the URL — the value of `protocol=`, where a query typed with
/// `?` for `&` (`?protocol=resp3?pass=…`) puts the password — so only the
/// fixed description is shown.
fn url_error(e: &RedisError) -> String {
    const NOT_SHOWN: &str = "the URL is not shown, as it may hold a password";
    let text = e.to_string();
    // `Display` is `{description} - {kind:?}` and, with a detail, `: {detail}`.
    let fixed = match e.detail() {
        Some(detail) => text.strip_suffix(detail).and_then(|t| t.strip_suffix(": ")),
        None => Some(text.as_str()),
    }
    .filter(|_| e.kind() == ErrorKind::InvalidClientConfig);
    match fixed {
        Some(fixed) => {
            let fixed = fixed
                .strip_suffix(" - InvalidClientConfig")
                .unwrap_or(fixed);
            format!("invalid redis URL: {fixed} ({NOT_SHOWN})")
        }
        None => format!("invalid redis URL ({NOT_SHOWN})"),
    }
}

/// The client that opens every connection: `info` with the TLS files, which
/// are read and checked now (a bad file fails `build()`, not every later
/// connection). TLS files with a URL that is not `rediss://` are refused: they
/// would be ignored, and plain text would be used where TLS was asked for.
///
/// Over TLS the driver is always handed the roots to trust: the CA file's
/// certificates, or the platform's trust store read here, once. Left to
/// itself it would read the platform's store again at every connection, and
/// fail the connection on any unreadable entry, a CA file given or not (the
/// crate's `tls-rustls-webpki-roots` feature, on in lockbox's dependency,
/// switches that off; its compiled-in roots are never used, as lockbox always
/// passes its own).
pub(crate) fn client(info: ConnectionInfo, files: &TlsFiles) -> Result<redis::Client> {
    if !matches!(info.addr(), ConnectionAddr::TcpTls { .. }) {
        if files.is_set() {
            return Err(Error::InvalidConfig(format!(
                "redis_tls_ca_file or redis_tls_client_cert is set, but the URL ({}) is not \
                 rediss://: use rediss://host:port (Redis serves TLS on its tls-port, never on \
                 a Unix socket)",
                describe(&info)
            )));
        }
        return redis::Client::open(info).map_err(|e| Error::InvalidConfig(url_error(&e)));
    }
    let material = crate::backend::load_tls_files(
        files,
        "redis_tls_ca_file",
        "redis_tls_client_cert",
        "rediss://",
    )?;
    let client_tls = material
        .client_pem
        .map(|(client_cert, client_key)| redis::ClientTlsConfig {
            client_cert,
            client_key,
        });
    let roots = material.roots;
    // Only now that every file checked out: a build that fails on a file
    // leaves the process's crypto provider as it was.
    use_default_crypto();
    redis::Client::build_with_tls(
        info,
        redis::TlsCertificates {
            client_tls,
            root_cert: Some(pem(&roots)),
        },
    )
    .map_err(|e| Error::InvalidConfig(format!("TLS setup: {e}")))
}

/// Certificates as PEM, the form the driver takes them in.
fn pem(certs: &[CertificateDer<'_>]) -> Vec<u8> {
    use base64::Engine as _;
    let mut out = String::new();
    for cert in certs {
        out.push_str("-----BEGIN CERTIFICATE-----\n");
        let b64 = base64::engine::general_purpose::STANDARD.encode(cert.as_ref());
        for (i, c) in b64.chars().enumerate() {
            if i > 0 && i % 64 == 0 {
                out.push('\n');
            }
            out.push(c);
        }
        out.push_str("\n-----END CERTIFICATE-----\n");
    }
    out.into_bytes()
}

/// The driver builds its rustls configuration with the process-wide default
/// crypto provider, which rustls picks by itself only when exactly one is
/// compiled in (and panics otherwise). When none is installed yet, lockbox's
/// (ring) is, so that a program that also links another provider gets no
/// panic; a provider the program installed itself is left alone.
fn use_default_crypto() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Another thread may install one meanwhile: then that one is used.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

/// A connection that could not be opened (or set up), told in words: which
/// TLS check failed, that the server does not speak TLS, that the credentials
/// were refused. Never shows the password, nor anything else the server said:
/// the driver's errors do not quote the URL, these texts do not either, and a
/// server's error message is never shown (see [`driver_text`]). `Debug` shows
/// the same text, never the driver's error.
#[derive(Clone)]
pub(crate) struct OpenError {
    /// What `Display` shows.
    shown: String,
    /// Not attempted: earlier attempts are still waiting for the server.
    busy: bool,
    /// The driver's error as the `source()`, only when its own text holds
    /// nothing the server sent ([`own_text`]).
    source: Option<RedisError>,
}

impl OpenError {
    /// `e`, from opening a connection to `addr` within `timeout`.
    fn new(e: RedisError, addr: &ConnectionAddr, timeout: Duration) -> OpenError {
        let tls = matches!(addr, ConnectionAddr::TcpTls { .. });
        match explain(&e, tls, timeout) {
            Some(why) => OpenError::from(e).explained(why),
            None => OpenError::from(e),
        }
    }

    /// An attempt run on a thread of its own ([`Manager::open`]) that gave no
    /// result: out of time (said as the driver's own timeout is, TLS included),
    /// too many earlier attempts still waiting, or no thread.
    fn unfinished(u: Unfinished, addr: &ConnectionAddr) -> OpenError {
        let io = match u {
            Unfinished::TimedOut(after) => {
                let e = RedisError::from(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "the server did not accept and set up the connection within {after:?} \
                         (it is stopped or stuck, or its accept queue is full)"
                    ),
                ));
                return OpenError::new(e, addr, after);
            }
            Unfinished::Busy(n) => {
                let e = RedisError::from(std::io::Error::new(
                    std::io::ErrorKind::WouldBlock,
                    format!(
                        "{n} earlier connection attempts are still waiting for the server; no \
                         further one is started until they end"
                    ),
                ));
                return OpenError {
                    busy: true,
                    ..OpenError::from(e)
                };
            }
            Unfinished::Spawn(e) => std::io::Error::new(
                e.kind(),
                format!("could not start a connection thread: {e}"),
            ),
        };
        RedisError::from(io).into()
    }

    /// Whether nothing was attempted because earlier attempts are still
    /// waiting for the server.
    pub fn is_busy(&self) -> bool {
        self.busy
    }

    /// Replaces the explanation (with what a later check found out).
    pub fn explained(mut self, why: String) -> OpenError {
        self.shown = why;
        self
    }
}

impl From<RedisError> for OpenError {
    fn from(e: RedisError) -> OpenError {
        OpenError {
            shown: driver_text(&e),
            busy: false,
            source: own_text(&e).then_some(e),
        }
    }
}

impl fmt::Display for OpenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.shown)
    }
}

/// Written by hand: the driver's error (whose `Debug` is its `Display`, a
/// server's message included) is never shown.
impl fmt::Debug for OpenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenError")
            .field("shown", &self.shown)
            .field("busy", &self.busy)
            .finish_non_exhaustive()
    }
}

impl std::error::Error for OpenError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_ref().map(|e| e as _)
    }
}

/// Whether the driver's error text is its own or the system's (an I/O or TLS
/// failure, one of its fixed messages), with nothing in it that the server
/// sent. A server's error reply, an answer of the wrong type and a parse error
/// carry the server's words; so may any error with a detail.
fn own_text(e: &RedisError) -> bool {
    match e.kind() {
        ErrorKind::Io => true,
        ErrorKind::Server(_) | ErrorKind::Extension | ErrorKind::Parse => false,
        _ => e.detail().is_none(),
    }
}

/// A driver error in words that hold nothing the server sent: its own text
/// when [`own_text`], else only its kind and the server's error code.
///
/// A server's error message may repeat the command it answers, and a command
/// sent while the connection is set up carries the password: Redis 7 answers
/// a `HELLO 3 AUTH user password` it does not know (renamed away) with `ERR
/// unknown command 'HELLO', with args beginning with: '3' 'AUTH' 'user'
/// 'password'`. So no server message is ever shown here: not in errors, the
/// health report, or the release listener's log line.
pub(crate) fn driver_text(e: &RedisError) -> String {
    if own_text(e) {
        return e.to_string();
    }
    // An error code is one word of capitals (`ERR`, `NOPERM`, `WRONGTYPE`);
    // anything else in its place is not shown either.
    let code = e.code().filter(|c| {
        !c.is_empty()
            && c.len() <= 32
            && c.bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
    });
    match code {
        Some(code) => format!(
            "the server answered with an error ({code}); its message is not shown, as it may \
             repeat what the server was sent, credentials included"
        ),
        None => format!(
            "{:?} error; its message is not shown, as it may repeat what the server sent or \
             was sent, credentials included",
            e.kind()
        ),
    }
}

/// What a failed attempt to open a connection means, in words; `None` when
/// the driver's own message says it.
fn explain(e: &RedisError, tls: bool, timeout: Duration) -> Option<String> {
    if let Some(tls_err) = rustls_error(e) {
        return Some(explain_tls(tls_err));
    }
    if e.kind() == ErrorKind::AuthenticationFailed {
        return Some(
            "authentication failed: the server refused the user name and password in the URL \
             (wrong password, or a user that does not exist or is off); the password is not \
             shown"
                .to_owned(),
        );
    }
    match e.code() {
        Some("NOAUTH") => {
            return Some(
                "the server requires authentication and the URL gives no password: use \
                 redis://user:password@host:port (or redis://:password@… for the default user)"
                    .to_owned(),
            );
        }
        Some("WRONGPASS") => {
            return Some(
                "authentication failed: the server refused the user name and password \
                 (WRONGPASS); the password is not shown"
                    .to_owned(),
            );
        }
        _ => {}
    }
    if tls && e.is_timeout() {
        return Some(format!(
            "no answer within {timeout:?} while opening the connection (TCP connect, TLS \
             handshake, authentication): the server or the path to it is not answering, or \
             the port does not speak TLS (a plain-text Redis waits silently for the rest of \
             what it takes for a command)"
        ));
    }
    None
}

/// The rustls error behind a driver error, if there is one.
fn rustls_error(e: &RedisError) -> Option<&rustls::Error> {
    type Shared = Arc<dyn std::error::Error + Send + Sync>;
    // The driver keeps its causes as a shared `dyn Error` (which `source()`
    // shows as the `Arc` itself); an I/O error keeps rustls' inside it.
    fn find<'a>(c: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
        if let Some(tls) = c.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        if let Some(shared) = c.downcast_ref::<Shared>() {
            return find(shared.as_ref());
        }
        c.downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    }
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        if let Some(tls) = find(c) {
            return Some(tls);
        }
        cause = c.source();
    }
    None
}

fn explain_tls(err: &rustls::Error) -> String {
    match err {
        rustls::Error::InvalidCertificate(cert) => match cert {
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                format!(
                    "TLS handshake failed: host name mismatch: the server's certificate is not \
                     valid for the host name in the URL ({cert})"
                )
            }
            CertificateError::UnknownIssuer | CertificateError::BadSignature => format!(
                "TLS handshake failed: the server's certificate is not trusted: it was not \
                 issued by a CA in redis_tls_ca_file (or, without one, in the platform's trust \
                 store) ({cert})"
            ),
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                format!("TLS handshake failed: the server's certificate has expired ({cert})")
            }
            other => {
                format!("TLS handshake failed: the server's certificate was refused: {other}")
            }
        },
        rustls::Error::AlertReceived(AlertDescription::CertificateRequired) => {
            "TLS handshake failed: the server requires a client certificate \
             (tls-auth-clients) and none was given: set redis_tls_client_cert"
                .to_owned()
        }
        rustls::Error::AlertReceived(
            alert @ (AlertDescription::UnknownCA
            | AlertDescription::BadCertificate
            | AlertDescription::CertificateUnknown
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::CertificateExpired
            | AlertDescription::CertificateRevoked
            | AlertDescription::AccessDenied),
        ) => format!(
            "TLS handshake failed: the server refused the client certificate ({alert:?}): it \
             must be issued by a CA in the server's tls-ca-cert-file, and valid"
        ),
        rustls::Error::InvalidMessage(_) => {
            "TLS handshake failed: the server does not speak TLS on this port (its answer to \
             the TLS hello is not TLS); a rediss:// URL never falls back to plain text"
                .to_owned()
        }
        other => format!("TLS handshake failed: {other}"),
    }
}

/// Whether the TLS port at `addr` answers a plain-text `PING` as Redis does,
/// i.e. the server does not speak TLS there, by `deadline`. Nothing of the
/// URL's credentials is sent.
fn answers_plain_text(addr: &ConnectionAddr, deadline: Instant) -> bool {
    let ConnectionAddr::TcpTls { host, port, .. } = addr else {
        return false;
    };
    let Ok(addrs) = (host.as_str(), *port).to_socket_addrs() else {
        return false;
    };
    let left = || Some(deadline.saturating_duration_since(Instant::now())).filter(|d| !d.is_zero());
    addrs.take(4).any(|a| {
        let Some(Ok(mut s)) = left().map(|t| TcpStream::connect_timeout(&a, t)) else {
            return false;
        };
        let Some(t) = left() else {
            return false;
        };
        let mut first = [0u8; 1];
        s.set_read_timeout(Some(t)).is_ok()
            && s.set_write_timeout(Some(t)).is_ok()
            && s.write_all(b"PING\r\n").is_ok()
            && s.read_exact(&mut first).is_ok()
            // A RESP answer: `+PONG`, or an error such as `-NOAUTH …`.
            && matches!(first[0], b'+' | b'-')
    })
}

/// What a `rediss://` build says when the port answers plain text.
const NOT_TLS: &str = "TLS handshake failed: the server does not speak TLS on this port (it \
                       answers plain-text Redis commands there); a rediss:// URL never falls \
                       back to plain text: use the server's tls-port, or a redis:// URL";

/// One connection and what lockbox knows about it.
pub(crate) struct Conn {
    inner: redis::Connection,
    /// Set on any failure that may leave a reply unread (timeout, I/O error):
    /// such a connection is closed, never reused, so a late reply can never be
    /// taken for the answer to a later command.
    broken: bool,
    /// The server process's `run_id` when this connection was opened (empty when
    /// `INFO` is not allowed). A restart or failover always means new
    /// connections, so scripts compare it with the one recorded in the store.
    pub run_id: String,
    last_used: Instant,
    io_timeout: Duration,
    /// Commands sent on it so far.
    uses: u64,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("broken", &self.broken)
            .field("run_id", &self.run_id)
            .finish_non_exhaustive()
    }
}

impl Conn {
    /// Opens a connection within `connect_timeout` (as far as the driver bounds
    /// it: see [`Manager::open`]); commands then time out after `io_timeout`
    /// unless a call says otherwise.
    fn open(
        client: &redis::Client,
        connect_timeout: Duration,
        io_timeout: Duration,
    ) -> Result<Conn, OpenError> {
        let addr = client.get_connection_info().addr();
        Conn::open_inner(client, connect_timeout, io_timeout)
            .map_err(|e| OpenError::new(e, addr, connect_timeout))
    }

    fn open_inner(
        client: &redis::Client,
        connect_timeout: Duration,
        io_timeout: Duration,
    ) -> RedisResult<Conn> {
        let inner = client.get_connection_with_timeout(connect_timeout)?;
        let mut conn = Conn {
            inner,
            broken: false,
            run_id: String::new(),
            last_used: Instant::now(),
            io_timeout,
            uses: 0,
        };
        conn.set_timeout(io_timeout.min(connect_timeout))?;
        match redis::cmd("INFO")
            .arg("server")
            .query::<String>(&mut conn.inner)
        {
            Ok(info) => conn.run_id = info_field(&info, "run_id").unwrap_or_default(),
            // Not authenticated: nothing else would work either.
            Err(e) if e.code() == Some("NOAUTH") => return Err(e),
            // Refused by the server (an ACL): run without restart detection.
            Err(e) if is_reply_error(&e) => {}
            Err(e) => return Err(e),
        }
        conn.set_timeout(io_timeout)?;
        Ok(conn)
    }

    fn set_timeout(&mut self, timeout: Duration) -> RedisResult<()> {
        // Zero means "no timeout" to the socket: never pass it.
        let timeout = Some(timeout.max(Duration::from_millis(1)));
        let set = self
            .inner
            .set_read_timeout(timeout)
            .and_then(|()| self.inner.set_write_timeout(timeout));
        if set.is_err() {
            self.broken = true;
        }
        set
    }

    /// Runs `f` with reads and writes bounded by `timeout`; a failure other than
    /// an error reply from the server marks the connection broken.
    pub fn call<T>(
        &mut self,
        timeout: Duration,
        f: impl FnOnce(&mut redis::Connection) -> RedisResult<T>,
    ) -> RedisResult<T> {
        self.set_timeout(timeout)?;
        self.uses += 1;
        let result = f(&mut self.inner);
        self.last_used = Instant::now();
        if let Err(e) = &result
            && !is_reply_error(e)
        {
            self.broken = true;
        }
        if !self.broken && timeout != self.io_timeout {
            let _ = self.set_timeout(self.io_timeout);
        }
        result
    }

    /// Sends `commands` (`count` packed commands) without waiting in between
    /// and reads their replies in order, all by `deadline`: each piece written
    /// ([`WRITE_PIECE`]) and each reply read has what is left then as its
    /// socket timeout, and nothing more is written or read once it has passed
    /// (the socket's timeout bounds each system call: a server that trickles
    /// one reply byte by byte can stretch that reply's read, never more).
    /// Returns the replies read — an error reply is one of them, as
    /// [`Value::ServerError`], and leaves the connection in step — and, when
    /// fewer than `count` came, why. The connection is then broken (never
    /// reused: a late reply cannot be taken for a later command's).
    ///
    /// Not [`redis::Pipeline::query`]: after a read times out the driver reads
    /// on for the remaining replies, each with the whole timeout again, so a
    /// server that stops answering would hold a pipeline of n commands for n
    /// times the time left.
    pub fn pipeline(
        &mut self,
        deadline: Instant,
        commands: &[u8],
        count: usize,
    ) -> (Vec<Value>, Option<RedisError>) {
        self.uses += 1;
        let mut replies = Vec::with_capacity(count);
        let failed = self
            .pipeline_inner(deadline, commands, count, &mut replies)
            .err();
        self.last_used = Instant::now();
        if failed.is_some() {
            self.broken = true;
        } else {
            let _ = self.set_timeout(self.io_timeout);
        }
        (replies, failed)
    }

    fn pipeline_inner(
        &mut self,
        deadline: Instant,
        commands: &[u8],
        count: usize,
        replies: &mut Vec<Value>,
    ) -> RedisResult<()> {
        let left = || {
            Some(deadline.saturating_duration_since(Instant::now()))
                .filter(|d| !d.is_zero())
                .ok_or_else(out_of_time)
        };
        for piece in commands.chunks(WRITE_PIECE) {
            let timeout = left()?;
            self.inner.set_write_timeout(Some(timeout))?;
            self.inner.send_packed_command(piece)?;
        }
        while replies.len() < count {
            let timeout = left()?;
            self.inner.set_read_timeout(Some(timeout))?;
            replies.push(self.inner.recv_response()?);
        }
        Ok(())
    }

    /// [`call`](Self::call) with the default I/O timeout.
    pub fn run<T>(
        &mut self,
        f: impl FnOnce(&mut redis::Connection) -> RedisResult<T>,
    ) -> RedisResult<T> {
        self.call(self.io_timeout, f)
    }

    /// Whether the last command failed in a way worth one retry on another
    /// connection: this one had served before and the server had closed it
    /// (while it sat idle, as on a restart). Not after a timeout: a server that
    /// does not answer would not answer the retry either.
    pub fn closed_while_idle(&self, e: &RedisError) -> bool {
        self.uses > 1 && self.is_broken() && !e.is_timeout()
    }

    pub fn is_broken(&self) -> bool {
        self.broken || !redis::ConnectionLike::is_open(&self.inner)
    }

    /// PINGs a connection that has been idle a while, within `timeout`; false
    /// (and broken) when it does not answer.
    pub fn validate(&mut self, timeout: Duration) -> bool {
        if self.last_used.elapsed() < VALIDATE_AFTER {
            return !self.is_broken();
        }
        self.call(timeout, |c| redis::cmd("PING").query::<String>(c))
            .is_ok()
            && !self.is_broken()
    }
}

/// An error the server answered with (the reply was read in full, so the
/// connection is still in step), as opposed to a client-side failure.
pub(crate) fn is_reply_error(e: &RedisError) -> bool {
    matches!(
        e.kind(),
        ErrorKind::Server(_) | ErrorKind::Extension | ErrorKind::UnexpectedReturnType
    ) && !e.is_io_error()
}

/// `field:value` from an `INFO` answer.
pub(crate) fn info_field(info: &str, field: &str) -> Option<String> {
    info.lines().find_map(|l| {
        l.strip_prefix(field)
            .and_then(|rest| rest.strip_prefix(':'))
            .map(|v| v.trim().to_owned())
    })
}

/// Opens every connection of one client: pooled ones for r2d2 (acquires,
/// listings), and those of the lease lane, the release listener, the health
/// check and `build()`.
#[derive(Debug, Clone)]
pub(crate) struct Manager {
    pub client: redis::Client,
    pub connect_timeout: Duration,
    pub io_timeout: Duration,
    /// Connection attempts over a Unix socket, each on a thread of its own.
    attempts: Bounded,
}

/// How many connection attempts of one client may be left waiting, beyond the
/// pool's size: the lease lane's (renewals and releases open their own), the
/// release listener's, the health check's and `build()`'s.
const MORE_PENDING_THAN_POOL: usize = 8;

impl Manager {
    pub fn new(
        client: redis::Client,
        connect_timeout: Duration,
        io_timeout: Duration,
        pool_size: u32,
    ) -> Manager {
        let max_pending = usize::try_from(pool_size)
            .unwrap_or(usize::MAX)
            .saturating_add(MORE_PENDING_THAN_POOL);
        Manager {
            client,
            connect_timeout,
            io_timeout,
            attempts: Bounded::new(max_pending, "lockbox-redis-connect"),
        }
    }

    /// `build()`'s first connection: all of it, telling why it failed
    /// included, within `connect_timeout`.
    ///
    /// The attempt runs on a thread of its own whatever the address, so that
    /// what the driver leaves unbounded (a Unix-socket connect, name
    /// resolution, a host with several addresses, each of which it gives the
    /// whole timeout) cannot stretch `build()`. Over TLS, a plain-text Redis
    /// takes the TLS hello for the start of a command and waits silently for
    /// the rest: once half the timeout has passed without an answer, a
    /// plain-text `PING` on the side, within what is left, finds out whether
    /// that is why, and if so the build fails at once saying so.
    pub fn open_first(&self) -> Result<Conn, OpenError> {
        let (connect_timeout, io_timeout) = (self.connect_timeout, self.io_timeout);
        let deadline = Instant::now() + connect_timeout;
        let addr = self.client.get_connection_info().addr().clone();
        let client = self.client.clone();
        let started = self
            .attempts
            .start(move || Conn::open_inner(&client, connect_timeout, io_timeout))
            .map_err(|u| OpenError::unfinished(u, &addr))?;
        let finish = |r: Result<RedisResult<Conn>, Unfinished>| match r {
            Ok(opened) => opened.map_err(|e| OpenError::new(e, &addr, connect_timeout)),
            // Said with the whole timeout, as the driver's own would be.
            Err(Unfinished::TimedOut(_)) => Err(OpenError::unfinished(
                Unfinished::TimedOut(connect_timeout),
                &addr,
            )),
            Err(u) => Err(OpenError::unfinished(u, &addr)),
        };
        if matches!(addr, ConnectionAddr::TcpTls { .. }) {
            match started.wait(connect_timeout / 2) {
                Err(Unfinished::TimedOut(_)) => {}
                done => return finish(done),
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let probed = addr.clone();
            let plain = self
                .attempts
                .run(left, move || answers_plain_text(&probed, deadline))
                .unwrap_or(false);
            if plain {
                return finish(Err(Unfinished::TimedOut(connect_timeout)))
                    .map_err(|e| e.explained(NOT_TLS.to_owned()));
            }
        }
        finish(started.wait(deadline.saturating_duration_since(Instant::now())))
    }

    /// The same, with attempts of its own: at most one left waiting. The
    /// release listener's, so that against a frozen server it never takes the
    /// places of the pool's and the lease lane's attempts.
    pub fn with_one_attempt(&self, thread_name: &'static str) -> Manager {
        Manager {
            attempts: Bounded::new(1, thread_name),
            ..self.clone()
        }
    }

    /// Opens a connection within `connect_timeout`, whatever the server does;
    /// commands then time out after `io_timeout` unless a call says otherwise.
    ///
    /// Over TCP (and TLS) the driver bounds the connect by the timeout and the
    /// rest of the setup by socket timeouts. Over a Unix socket it does not:
    /// `connect()` there blocks for as long as the server's accept queue stays
    /// full (a frozen server, a stopped one, one stuck in a long script). So
    /// such an attempt runs on a thread of its own ([`Bounded`]) while the
    /// caller waits at most `connect_timeout`; an attempt whose caller gave up
    /// closes its connection as soon as it opens, and at most the pool's size
    /// plus [`MORE_PENDING_THAN_POOL`] attempts are left waiting at a time
    /// (further ones fail at once).
    pub fn open(&self, connect_timeout: Duration, io_timeout: Duration) -> Result<Conn, OpenError> {
        let addr = self.client.get_connection_info().addr();
        if !matches!(addr, ConnectionAddr::Unix(_)) {
            return Conn::open(&self.client, connect_timeout, io_timeout);
        }
        let client = self.client.clone();
        match self.attempts.run(connect_timeout, move || {
            Conn::open_inner(&client, connect_timeout, io_timeout)
        }) {
            Ok(opened) => opened.map_err(|e| OpenError::new(e, addr, connect_timeout)),
            Err(u) => Err(OpenError::unfinished(u, addr)),
        }
    }
}

impl r2d2::ManageConnection for Manager {
    type Connection = Conn;
    type Error = OpenError;

    fn connect(&self) -> Result<Conn, OpenError> {
        self.open(self.connect_timeout, self.io_timeout)
    }

    fn is_valid(&self, conn: &mut Conn) -> Result<(), OpenError> {
        // Recently used connections are taken as they are: no extra round trip
        // on the hot path. Idle ones answer a PING first.
        if conn.validate(self.io_timeout.min(self.connect_timeout)) {
            Ok(())
        } else {
            Err(RedisError::from(std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                "pooled connection did not answer a PING",
            ))
            .into())
        }
    }

    fn has_broken(&self, conn: &mut Conn) -> bool {
        conn.is_broken()
    }
}

/// Connections for renewals and releases, apart from the pool that acquires and
/// listings use: a renewal never queues behind them. A caller takes an idle
/// connection or opens its own, all within its time limit; nobody waits for
/// another caller's connection.
#[derive(Debug)]
pub(crate) struct Lane {
    manager: Manager,
    idle: Mutex<Vec<Conn>>,
}

impl Lane {
    pub fn new(manager: Manager) -> Lane {
        Lane {
            manager,
            idle: Mutex::new(Vec::new()),
        }
    }

    /// A working connection, by `deadline` at the latest.
    pub fn take(&self, deadline: Instant) -> Result<Conn, OpenError> {
        loop {
            let Some(mut conn) = self.idle.lock().pop() else {
                break;
            };
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                self.put(conn);
                return Err(out_of_time().into());
            }
            if conn.validate(left) {
                return Ok(conn);
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(out_of_time().into());
        }
        self.manager.open(
            self.manager.connect_timeout.min(left),
            self.manager.io_timeout,
        )
    }

    /// Closes every idle connection: after one was found closed by the server
    /// while idle (a restart, a proxy or NAT that dropped its connections),
    /// the others, idle as long or longer, most likely were too, and a retry
    /// must not land on one of them.
    pub fn discard_idle(&self) {
        let idle = std::mem::take(&mut *self.idle.lock());
        drop(idle);
    }

    /// Returns a connection for reuse, unless it is broken or enough are idle.
    pub fn put(&self, conn: Conn) {
        if conn.is_broken() {
            return;
        }
        let mut idle = self.idle.lock();
        if idle.len() < LANE_IDLE {
            idle.push(conn);
        }
    }
}

/// The error for a call that ran out of its time limit before it was sent.
pub(crate) fn out_of_time() -> RedisError {
    RedisError::from(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "no time left before the holder's deadline",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::pem::PemObject;

    const MARK: &str = "Hunter2Zebra";

    /// The driver's error for a server's error reply `line` (without `-`).
    fn reply_error(line: &str) -> RedisError {
        redis::parse_redis_value(format!("-{line}\r\n").as_bytes())
            .and_then(redis::Value::extract_error)
            .expect_err("an error reply")
    }

    fn shown(e: &OpenError) -> String {
        format!("{e} {e:?}")
    }

    #[test]
    fn a_server_message_is_never_shown() {
        let echo = format!(
            "ERR unknown command 'HELLO', with args beginning with: '3' 'AUTH' 'lockbox' '{MARK}' "
        );
        for e in [
            reply_error(&echo),
            reply_error(&format!("WEIRDCODE {MARK}")),
            reply_error(&format!("{MARK} in place of a code")),
            redis::make_extension_error(format!("X{MARK}"), Some(MARK.to_owned())),
            RedisError::from((
                ErrorKind::Server(redis::ServerErrorKind::ResponseError),
                "Redis server refused to switch database",
                echo.clone(),
            )),
            RedisError::from((ErrorKind::UnexpectedReturnType, "type", MARK.to_owned())),
        ] {
            assert!(e.to_string().contains(MARK), "the driver's own text: {e}");
            for err in [
                OpenError::from(e.clone()),
                OpenError::new(
                    e.clone(),
                    &ConnectionAddr::Tcp("h".to_owned(), 1),
                    Duration::from_secs(1),
                ),
            ] {
                assert!(!shown(&err).contains(MARK), "{}", shown(&err));
                assert!(std::error::Error::source(&err).is_none());
            }
        }
        let err = OpenError::from(reply_error(&echo));
        assert!(err.to_string().contains("(ERR)"), "{err}");
        let err = OpenError::from(reply_error("NOPERM this user has no permissions"));
        assert!(err.to_string().contains("(NOPERM)"), "{err}");
    }

    #[test]
    fn the_drivers_own_text_is_shown() {
        let io = RedisError::from(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "Connection refused",
        ));
        let err = OpenError::from(io);
        assert!(err.to_string().contains("Connection refused"), "{err}");
        assert!(std::error::Error::source(&err).is_some());
        assert!(format!("{err:?}").contains("Connection refused"), "{err:?}");
        let err = OpenError::from(RedisError::from((
            ErrorKind::AuthenticationFailed,
            "Password authentication failed",
        )));
        assert!(err.to_string().contains("Password authentication failed"));
    }

    #[test]
    fn a_url_error_shows_no_part_of_the_url() {
        for url in [
            format!("redis+unix:///run/redis.sock?protocol=resp3?pass={MARK}"),
            format!("redis://h/?protocol={MARK}"),
            format!("redis://h/{MARK}"),
            format!("redis://h:{MARK}/"),
            format!("{MARK}://h/"),
        ] {
            let err = match connection_info(&url, Duration::from_secs(1)) {
                Err(Error::InvalidConfig(why)) => why,
                other => panic!("{url}: {other:?}"),
            };
            assert!(!err.contains(MARK), "{url}: {err}");
            assert!(err.starts_with("invalid redis URL"), "{url}: {err}");
        }
        let err = connection_info("redis://h/?protocol=4", Duration::from_secs(1))
            .expect_err("an invalid protocol");
        assert!(
            err.to_string().contains("Invalid protocol version"),
            "{err}"
        );
    }

    #[test]
    fn resp3_is_refused_and_resp2_taken() {
        for url in [
            "redis://h/?protocol=resp3",
            "redis://h/?protocol=3",
            "redis+unix:///run/redis.sock?protocol=resp3",
            "rediss://h/?protocol=3",
        ] {
            match connection_info(url, Duration::from_secs(1)) {
                Err(Error::InvalidConfig(why)) => assert!(why.contains("RESP2 only"), "{why}"),
                other => panic!("{url}: {other:?}"),
            }
        }
        for url in [
            "redis://h/?protocol=resp2",
            "unix:///run/redis.sock?protocol=2",
        ] {
            connection_info(url, Duration::from_secs(1)).unwrap();
        }
    }

    #[test]
    fn pem_round_trips() {
        let certs: Vec<CertificateDer<'static>> = [&b"x"[..], &[7u8; 48][..], &[200u8; 301][..]]
            .iter()
            .map(|der| CertificateDer::from(der.to_vec()))
            .collect();
        let text = pem(&certs);
        assert!(
            String::from_utf8_lossy(&text)
                .lines()
                .all(|l| l.len() <= 64),
            "PEM lines are at most 64 characters"
        );
        let back = CertificateDer::pem_slice_iter(&text)
            .collect::<std::result::Result<Vec<_>, _>>()
            .unwrap();
        assert_eq!(back, certs);
    }
}
