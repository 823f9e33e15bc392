//! TLS for PostgreSQL connections, with libpq's `sslmode` semantics.
//!
//! The driver's own parser knows only `disable`, `prefer` and `require`, so the
//! TLS options (`sslmode`, `sslrootcert`, `sslcert`, `sslkey`) are taken out of
//! the connection string here, in both the URL and the key/value forms, and the
//! rest is handed to the driver. What each mode means:
//!
//! | `sslmode` | TLS | server certificate |
//! | --- | --- | --- |
//! | `disable` | never | — |
//! | `allow` | only if the server refuses plain text | not checked |
//! | `prefer` (default) | if the server offers it, else plain text | not checked, unless `sslrootcert` names a file (then as `verify-ca`) |
//! | `require` | always, else an error | not checked, unless a CA file is given (or libpq's `~/.postgresql/root.crt` exists): then as `verify-ca` |
//! | `verify-ca` | always | signed by a CA in `sslrootcert` |
//! | `verify-full` | always | signed by such a CA and valid for the host name |
//!
//! `sslrootcert` is a PEM file or `system` (the platform's trust store, which
//! like libpq allows only `verify-full`, and makes it the default). Without it,
//! `verify-ca` and `verify-full` use libpq's `~/.postgresql/root.crt`, and fail
//! when it does not exist. `sslcert` and `sslkey` (PEM) are sent when the server
//! asks for a client certificate. Nothing ever falls back to a weaker mode than
//! the one asked for.
//!
//! Unix-domain sockets carry no TLS (the server offers none there, as with
//! libpq): `disable` … `require` connect in plain text over a socket, and
//! `verify-ca`/`verify-full`, which cannot be honoured there, are refused.
//!
//! A `hostaddr` makes its position a TCP connection to that address, whatever
//! `host` says there (as in libpq and the driver): a socket path with a
//! `hostaddr` is TCP, not a socket, and keeps its `sslmode`. Where there is no
//! host name (a `hostaddr` alone, or with a socket path), `prefer`, `require`
//! and `verify-ca` work without checking the certificate's name, and
//! `verify-full`, which needs a name to check, is refused.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use postgres::config::{Host, SslMode as DriverMode};
use postgres::{CancelToken, Client};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::backend::{Bounded, Unfinished};
use crate::error::Error;

/// libpq's `sslmode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SslMode {
    Disable,
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> Option<SslMode> {
        Some(match value {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

/// The TLS options found in a connection string.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct TlsOptions {
    pub mode: Option<SslMode>,
    pub root_cert: Option<String>,
    pub cert: Option<String>,
    pub key: Option<String>,
}

impl TlsOptions {
    /// Records one option; `Ok(false)` when `key` is not a TLS option.
    fn set(&mut self, key: &str, value: String) -> Result<bool, Error> {
        match key {
            "sslmode" => {
                self.mode = Some(SslMode::parse(&value).ok_or_else(|| {
                    Error::InvalidConfig(
                        "sslmode is not one of disable, allow, prefer, require, verify-ca, \
                         verify-full (the value is not shown, as it may be part of a password)"
                            .to_owned(),
                    )
                })?)
            }
            "sslrootcert" => self.root_cert = Some(value),
            "sslcert" => self.cert = Some(value),
            "sslkey" => self.key = Some(value),
            _ => return Ok(false),
        }
        Ok(true)
    }
}

/// Splits a connection string into the part the driver parses and the TLS
/// options, which it does not (or not with libpq's meaning).
///
/// Both forms are read exactly as the driver reads them, so that an option
/// the driver would see is never missed here (an `sslmode=require` only the
/// driver saw would otherwise become lockbox's default, `prefer`). What
/// cannot be read that way is refused, without quoting the string (it may
/// hold a password).
pub(crate) fn split_options(url: &str) -> Result<(String, TlsOptions), Error> {
    let mut opts = TlsOptions::default();
    for prefix in ["postgres://", "postgresql://"] {
        if let Some(rest) = url.strip_prefix(prefix) {
            // The driver (like libpq) takes everything up to the first `@` for
            // the credentials: an `@` in the path or query would make the text
            // before it (a password given as a query parameter, an sslmode) the
            // user name, and the text after it the host.
            // A second `@` before the path or query is an unencoded `@` in a
            // password: the text after the first would become the host, shown
            // in every description of the target.
            let first_at = rest.find('@');
            let host_ends = rest.find(['/', '?']);
            let authority = &rest[..host_ends.unwrap_or(rest.len())];
            let after_host = matches!((first_at, host_ends), (Some(at), Some(end)) if end < at);
            if after_host || authority.matches('@').count() > 1 {
                return Err(Error::InvalidConfig(
                    "invalid connection string: the URL has an `@` that is not the one \
                     ending its credentials (in a user name or password, in its path or query, \
                     or in credentials holding `/` or `?`): \
                     percent-encode `@` as %40 there (and `/`, `?` in credentials as %2F, %3F); \
                     the URL is not shown, as it may hold a password"
                        .to_owned(),
                ));
            }
            // The credentials run to the first `@`, the query starts at the
            // first `?` after them.
            let after_creds = first_at.map_or(0, |i| i + 1);
            let Some(q) = rest[after_creds..].find('?') else {
                return Ok((url.to_owned(), opts));
            };
            let q = prefix.len() + after_creds + q;
            let mut kept = Vec::new();
            for pair in url[q + 1..].split('&') {
                let Some((key, value)) = pair.split_once('=') else {
                    return Err(Error::InvalidConfig(
                        "invalid connection string: a URL query parameter has no `=` (the URL \
                         is not shown, as it may hold a password)"
                            .to_owned(),
                    ));
                };
                let Some(key) = percent_decode(key) else {
                    kept.push(pair);
                    continue;
                };
                let taken = match percent_decode(value) {
                    Some(value) => opts.set(&key, value)?,
                    None => false,
                };
                if !taken {
                    kept.push(pair);
                }
            }
            let mut out = url[..q].to_owned();
            if !kept.is_empty() {
                out.push('?');
                out.push_str(&kept.join("&"));
            }
            return Ok((out, opts));
        }
    }
    let pairs = key_value_pairs(url).map_err(|why| {
        Error::InvalidConfig(format!(
            "invalid connection string: {why} (the string is not shown, as it may hold a \
             password: quote values that contain spaces, as in password='…')"
        ))
    })?;
    let mut out = String::with_capacity(url.len());
    let mut from = 0;
    for (key, value, span) in pairs {
        if opts.set(&key, value)? {
            out.push_str(&url[from..span.start]);
            from = span.end;
        }
    }
    out.push_str(&url[from..]);
    Ok((out, opts))
}

/// `%XX`-decodes a URL component; `None` for invalid UTF-8 after decoding.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            out.push((h * 16 + l) as u8);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8(out).ok()
}

/// A key, its value (unquoted, unescaped), and the byte range the pair takes up.
type Pair = (String, String, std::ops::Range<usize>);

/// The `key = value` pairs of a key/value connection string, read exactly as
/// the driver's parser reads them (tokio-postgres `config.rs`, `Parser`):
/// separated by `char::is_whitespace`, a value quoted in `'…'` or running to
/// the next whitespace, `\` escaping the character after it (a trailing `\`
/// is dropped). Each pair comes with the byte range it takes up. What the
/// driver would reject is an error here, saying what is wrong without
/// quoting the string; so is an `=` where a keyword should be, after which
/// the driver would silently ignore the rest of the string.
fn key_value_pairs(s: &str) -> Result<Vec<Pair>, &'static str> {
    type Chars<'a> = std::iter::Peekable<std::str::CharIndices<'a>>;
    fn skip_ws(it: &mut Chars<'_>) {
        while it.next_if(|&(_, c)| c.is_whitespace()).is_some() {}
    }
    let mut it: Chars<'_> = s.char_indices().peekable();
    let mut pairs = Vec::new();
    loop {
        skip_ws(&mut it);
        let Some(&(start, _)) = it.peek() else {
            return Ok(pairs);
        };
        let mut key = String::new();
        while let Some((_, c)) = it.next_if(|&(_, c)| !c.is_whitespace() && c != '=') {
            key.push(c);
        }
        if key.is_empty() {
            return Err("an `=` stands where a keyword should be");
        }
        skip_ws(&mut it);
        if it.next_if(|&(_, c)| c == '=').is_none() {
            return Err("a keyword is not followed by `=` and a value");
        }
        skip_ws(&mut it);
        let mut value = String::new();
        if it.next_if(|&(_, c)| c == '\'').is_some() {
            loop {
                match it.next() {
                    None => return Err("a quoted value is not terminated"),
                    Some((_, '\'')) => break,
                    Some((_, '\\')) => value.extend(it.next().map(|(_, c)| c)),
                    Some((_, c)) => value.push(c),
                }
            }
        } else {
            while let Some((_, c)) = it.next_if(|&(_, c)| !c.is_whitespace()) {
                if c == '\\' {
                    value.extend(it.next().map(|(_, c)| c));
                } else {
                    value.push(c);
                }
            }
            if value.is_empty() {
                return Err("a keyword has no value");
            }
        }
        let end = it.peek().map_or(s.len(), |&(i, _)| i);
        pairs.push((key, value, start..end));
    }
}

/// How lockbox reaches one server: the driver's configuration plus the TLS
/// settings, shared by the pool, `build()`'s checks, the health prober and
/// cancel requests.
#[derive(Clone)]
pub(crate) struct PgTarget {
    config: postgres::Config,
    tls: MakeRustlsConnect,
    mode: SslMode,
    /// `allow` over TCP: a refused plain-text attempt is retried over TLS.
    retry_over_tls: bool,
    /// Cancel requests still waiting for the server (see [`PgTarget::cancel`]).
    cancels: Bounded,
}

/// The most cancel requests of one client left waiting for a server that does
/// not answer; further ones are not sent until some end.
const MAX_PENDING_CANCELS: usize = 8;

/// Why a cancel request was not sent.
#[derive(Debug)]
pub(crate) enum CancelError {
    /// The driver could not send it (the server is unreachable, or refused).
    Driver(postgres::Error),
    /// The server did not complete the exchange (TCP connect, and over TLS
    /// the SSLRequest and the handshake) within the connect timeout.
    TimedOut(Duration),
    /// Earlier cancel requests are still waiting for the server.
    Busy(usize),
    /// No thread could be started for it.
    Spawn(std::io::Error),
}

impl fmt::Display for CancelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CancelError::Driver(e) => write!(f, "{e}"),
            CancelError::TimedOut(after) => write!(
                f,
                "the server did not take the request within the connect timeout ({after:?})"
            ),
            CancelError::Busy(n) => write!(
                f,
                "{n} earlier cancel requests are still waiting for the server; this one is \
                 not sent"
            ),
            CancelError::Spawn(e) => write!(f, "could not start a thread for it: {e}"),
        }
    }
}

impl fmt::Debug for PgTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgTarget")
            .field("target", &super::connection::describe_target(&self.config))
            .field("sslmode", &self.mode.name())
            .finish_non_exhaustive()
    }
}

impl PgTarget {
    /// Applies `opts` to `config` (whose TLS mode it sets), loading the
    /// certificate files now, so that a missing or unreadable one fails
    /// `build()` with [`Error::InvalidConfig`].
    pub fn new(mut config: postgres::Config, opts: &TlsOptions) -> Result<PgTarget, Error> {
        let system = opts.root_cert.as_deref() == Some("system");
        let mode = opts.mode.unwrap_or(if system {
            SslMode::VerifyFull
        } else {
            SslMode::Prefer
        });
        if system && mode != SslMode::VerifyFull {
            return Err(Error::InvalidConfig(format!(
                "sslrootcert=system needs sslmode=verify-full (as in libpq), not sslmode={}",
                mode.name()
            )));
        }
        if opts.cert.is_some() != opts.key.is_some() {
            return Err(Error::InvalidConfig(
                "sslcert and sslkey must be given together".to_owned(),
            ));
        }
        // The driver parses sslmode itself (disable, prefer, require); every one
        // in the string was taken out above, so a mode other than its default
        // means one was read differently here: refused rather than guessed.
        if config.get_ssl_mode() != DriverMode::Prefer {
            return Err(Error::InvalidConfig(
                "the connection string's sslmode was read differently by lockbox and by the                  driver; write it as sslmode=<mode> separated by spaces (key/value form) or                  as a query parameter (URL form)"
                    .to_owned(),
            ));
        }
        let paths = Paths::of(&config)?;
        let encrypts = matches!(
            mode,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull
        );
        if paths.sockets > 0 && encrypts && (!paths.all_sockets() || mode != SslMode::Require) {
            return Err(Error::InvalidConfig(format!(
                "sslmode={} cannot be honoured over a Unix-domain socket (the server offers no \
                 TLS there){}",
                mode.name(),
                if paths.all_sockets() {
                    "; use sslmode=require or weaker for socket hosts"
                } else {
                    "; list socket hosts and TCP hosts in separate clients"
                }
            )));
        }
        if let Some(addr) = paths.unnamed.first()
            && mode == SslMode::VerifyFull
        {
            return Err(Error::InvalidConfig(format!(
                "sslmode=verify-full needs a host name to check the server's certificate \
                 against, and hostaddr={addr} has none (no host= at its position, or a \
                 Unix-domain socket path there, which hostaddr turns into TCP): give the \
                 name in the certificate as host= alongside hostaddr=, or use sslmode=verify-ca"
            )));
        }
        let all_sockets = paths.all_sockets();
        if !paths.unnamed.is_empty() {
            // TCP connections to an address without a host name: the driver
            // would refuse TLS there ("no hostname provided"), so the address
            // itself is the name the handshake is made for (not checked below
            // verify-full, which is refused above).
            config = with_hosts(&config, &paths.hosts);
        }
        // The CA file: the one named, else libpq's default when it exists (which
        // `verify-*` needs, and which makes `require` check the chain).
        let root_file = match opts.root_cert.as_deref() {
            Some("system") => None,
            Some(path) => Some(PathBuf::from(path)),
            None => default_root_cert().filter(|p| p.exists()),
        };
        if matches!(mode, SslMode::VerifyCa | SslMode::VerifyFull) && !system && root_file.is_none()
        {
            return Err(Error::InvalidConfig(format!(
                "sslmode={} needs the CA certificates to check the server's certificate \
                 against: set sslrootcert=<PEM file> or sslrootcert=system (libpq's default \
                 ~/.postgresql/root.crt does not exist)",
                mode.name()
            )));
        }
        let check = match mode {
            SslMode::VerifyFull => Check::Full,
            SslMode::Disable => Check::None,
            _ if root_file.is_some() && mode != SslMode::Allow => Check::Chain,
            SslMode::VerifyCa => Check::Chain,
            _ => Check::None,
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let roots = if system {
            Some(system_roots()?)
        } else if check != Check::None {
            root_file.as_deref().map(file_roots).transpose()?
        } else {
            None
        };
        let verifier: Arc<dyn ServerCertVerifier> = match roots {
            Some(roots) => {
                let webpki =
                    WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                        .build()
                        .map_err(|e| Error::InvalidConfig(format!("sslrootcert: {e}")))?;
                match check {
                    Check::Full => webpki,
                    _ => Arc::new(ChainOnly(webpki)),
                }
            }
            None => Arc::new(AnyCertificate(provider.clone())),
        };
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::InvalidConfig(format!("TLS setup: {e}")))?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let client = match (&opts.cert, &opts.key) {
            (Some(cert), Some(key)) => {
                let certs = read_certs(Path::new(cert), "sslcert")?;
                let key = PrivateKeyDer::from_pem_file(key).map_err(|e| {
                    Error::InvalidConfig(format!(
                        "sslkey {key:?}: no private key could be read: {}",
                        crate::backend::pem_problem(&e)
                    ))
                })?;
                builder.with_client_auth_cert(certs, key).map_err(|e| {
                    Error::InvalidConfig(format!(
                        "sslcert/sslkey {cert:?}, {key_path:?}: {e}",
                        key_path = opts.key.as_deref().unwrap_or_default()
                    ))
                })?
            }
            _ => builder.with_no_client_auth(),
        };
        config.ssl_mode(match mode {
            _ if all_sockets => DriverMode::Disable,
            SslMode::Disable | SslMode::Allow => DriverMode::Disable,
            SslMode::Prefer => DriverMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => DriverMode::Require,
        });
        Ok(PgTarget {
            config,
            tls: MakeRustlsConnect::new(client),
            mode,
            retry_over_tls: mode == SslMode::Allow && !all_sockets,
            cancels: Bounded::new(MAX_PENDING_CANCELS, "lockbox-cancel"),
        })
    }

    /// The driver's configuration (TLS mode included).
    pub fn config(&self) -> &postgres::Config {
        &self.config
    }

    /// Opens a session. Under `allow`, a server that refuses the plain-text
    /// attempt (say, by a `hostssl`-only `pg_hba.conf`) gets a TLS one.
    pub fn connect(&self) -> Result<Client, postgres::Error> {
        match self.config.connect(self.tls.clone()) {
            Err(e) if self.retry_over_tls && e.as_db_error().is_some() => {
                let mut config = self.config.clone();
                config.ssl_mode(DriverMode::Require);
                config.connect(self.tls.clone())
            }
            other => other,
        }
    }

    /// Sends a cancel request for `token`'s session, over TLS when that session
    /// uses it (a `hostssl`-only server refuses it in plain text).
    ///
    /// Bounded by the connect timeout. The driver bounds only the TCP connect
    /// (after which a plain-text request is just written); over TLS it then
    /// waits for the answer to its SSLRequest and for the handshake, which a
    /// frozen server (stopped, or behind a hung proxy) never gives, and its
    /// blocking call cannot be cancelled. So the request runs on a thread of
    /// its own (`lockbox-cancel`, through [`Bounded`]) while the caller waits at most the connect
    /// timeout; a request the caller gave up on ends by itself when the server
    /// answers or the connection breaks. At most [`MAX_PENDING_CANCELS`] run at
    /// a time, so against a frozen server the threads and connections left
    /// waiting stay bounded; further requests fail at once with
    /// [`CancelError::Busy`].
    pub fn cancel(&self, token: &CancelToken) -> Result<(), CancelError> {
        let timeout = self
            .config
            .get_connect_timeout()
            .copied()
            .unwrap_or(Duration::from_secs(10));
        let token = token.clone();
        let tls = self.tls.clone();
        match self.cancels.run(timeout, move || token.cancel_query(tls)) {
            Ok(sent) => sent.map_err(CancelError::Driver),
            Err(Unfinished::TimedOut(after)) => Err(CancelError::TimedOut(after)),
            Err(Unfinished::Busy(n)) => Err(CancelError::Busy(n)),
            Err(Unfinished::Spawn(e)) => Err(CancelError::Spawn(e)),
        }
    }
}

/// Where a configuration's connections go, position by position, as the
/// driver connects: to the `hostaddr` at a position when there is one (over
/// TCP, whatever `host` says there), else to the `host`.
struct Paths {
    /// Positions that reach a Unix-domain socket (a socket path as `host`,
    /// no `hostaddr`): no TLS there.
    sockets: usize,
    /// The hosts to hand the driver: as given, except that a position with a
    /// `hostaddr` but no TCP host name gets the address as its name.
    hosts: Vec<Host>,
    /// The addresses of the positions that have no host name: a socket path
    /// with a `hostaddr`, or a `hostaddr` without any `host`.
    unnamed: Vec<std::net::IpAddr>,
}

impl Paths {
    fn of(config: &postgres::Config) -> Result<Paths, Error> {
        let hosts = config.get_hosts();
        let addrs = config.get_hostaddrs();
        if !hosts.is_empty() && !addrs.is_empty() && hosts.len() != addrs.len() {
            return Err(Error::InvalidConfig(format!(
                "the connection string lists {} hosts and {} hostaddrs; give one hostaddr per \
                 host, or none",
                hosts.len(),
                addrs.len()
            )));
        }
        let mut paths = Paths {
            sockets: 0,
            hosts: Vec::new(),
            unnamed: Vec::new(),
        };
        for i in 0..hosts.len().max(addrs.len()) {
            match (hosts.get(i), addrs.get(i)) {
                (Some(host @ Host::Tcp(_)), _) => paths.hosts.push(host.clone()),
                (Some(host @ Host::Unix(_)), None) => {
                    paths.sockets += 1;
                    paths.hosts.push(host.clone());
                }
                (_, Some(addr)) => {
                    paths.unnamed.push(*addr);
                    paths.hosts.push(Host::Tcp(addr.to_string()));
                }
                (None, None) => {}
            }
        }
        Ok(paths)
    }

    fn all_sockets(&self) -> bool {
        self.sockets > 0 && self.sockets == self.hosts.len()
    }
}

/// `config` with `hosts` in place of its hosts, everything else as it was
/// (`postgres::Config` can add hosts but not replace them).
fn with_hosts(config: &postgres::Config, hosts: &[Host]) -> postgres::Config {
    let mut out = postgres::Config::new();
    if let Some(user) = config.get_user() {
        out.user(user);
    }
    if let Some(password) = config.get_password() {
        out.password(password);
    }
    if let Some(dbname) = config.get_dbname() {
        out.dbname(dbname);
    }
    if let Some(options) = config.get_options() {
        out.options(options);
    }
    if let Some(name) = config.get_application_name() {
        out.application_name(name);
    }
    out.ssl_mode(config.get_ssl_mode());
    out.ssl_negotiation(config.get_ssl_negotiation());
    for host in hosts {
        match host {
            Host::Tcp(name) => out.host(name),
            Host::Unix(path) => out.host_path(path),
        };
    }
    for addr in config.get_hostaddrs() {
        out.hostaddr(*addr);
    }
    for port in config.get_ports() {
        out.port(*port);
    }
    if let Some(timeout) = config.get_connect_timeout() {
        out.connect_timeout(*timeout);
    }
    if let Some(timeout) = config.get_tcp_user_timeout() {
        out.tcp_user_timeout(*timeout);
    }
    out.keepalives(config.get_keepalives());
    out.keepalives_idle(config.get_keepalives_idle());
    if let Some(interval) = config.get_keepalives_interval() {
        out.keepalives_interval(interval);
    }
    if let Some(retries) = config.get_keepalives_retries() {
        out.keepalives_retries(retries);
    }
    out.target_session_attrs(config.get_target_session_attrs());
    out.channel_binding(config.get_channel_binding());
    out.load_balance_hosts(config.get_load_balance_hosts());
    out
}

/// What is checked of the server's certificate.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Check {
    None,
    Chain,
    Full,
}

fn default_root_cert() -> Option<PathBuf> {
    std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".postgresql/root.crt"))
}

fn read_certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| {
            Error::InvalidConfig(format!(
                "{what} {}: could not be read: {}",
                path.display(),
                crate::backend::pem_problem(&e)
            ))
        })?;
    if certs.is_empty() {
        return Err(Error::InvalidConfig(format!(
            "{what} {}: holds no PEM certificate",
            path.display()
        )));
    }
    Ok(certs)
}

fn file_roots(path: &Path) -> Result<RootCertStore, Error> {
    let mut roots = RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(read_certs(path, "sslrootcert")?);
    if added == 0 {
        return Err(Error::InvalidConfig(format!(
            "sslrootcert {}: no usable CA certificate in it",
            path.display()
        )));
    }
    Ok(roots)
}

fn system_roots() -> Result<RootCertStore, Error> {
    let mut roots = RootCertStore::empty();
    roots.add_parsable_certificates(
        crate::backend::platform_roots()
            .map_err(|why| Error::InvalidConfig(format!("sslrootcert=system: {why}")))?,
    );
    Ok(roots)
}

/// `verify-ca`: the chain must lead to a trusted CA; the host name is not checked.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            // The name is checked only once the chain has been found valid.
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// `allow`, `prefer` and `require` without a CA: encryption only, as in libpq;
/// the handshake's signatures are still checked.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// What a failed TLS negotiation means, in words: the certificate is not
/// trusted, is for another host name, has expired, or the server offers no
/// TLS; `None` when `err` is not such a failure.
pub(crate) fn explain(err: &postgres::Error) -> Option<String> {
    use std::error::Error as _;
    let text = std::error::Error::source(err).map(|c| c.to_string());
    if text.is_some_and(|t| t.contains("server does not support TLS")) {
        return Some(
            "TLS negotiation failed: the server does not support TLS (ssl = off), and the \
             sslmode asked for forbids plain text"
                .to_owned(),
        );
    }
    let mut cause = err.source();
    while let Some(e) = cause {
        let rustls_err = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
            .or_else(|| e.downcast_ref::<rustls::Error>());
        if let Some(tls) = rustls_err {
            return Some(match tls {
                rustls::Error::InvalidCertificate(cert) => match cert {
                    CertificateError::NotValidForName
                    | CertificateError::NotValidForNameContext { .. } => format!(
                        "TLS handshake failed: host name mismatch: the server's certificate is not valid for the host \
                         name connected to ({cert})"
                    ),
                    CertificateError::UnknownIssuer | CertificateError::BadSignature => format!(
                        "TLS handshake failed: the server's certificate is not trusted: it was not issued by a CA in \
                         sslrootcert ({cert})"
                    ),
                    CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                        format!(
                            "TLS handshake failed: the server's certificate has expired ({cert})"
                        )
                    }
                    other => format!(
                        "TLS handshake failed: the server's certificate was refused: {other}"
                    ),
                },
                other => format!("TLS handshake failed: {other}"),
            });
        }
        cause = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(url: &str) -> (String, TlsOptions) {
        split_options(url).unwrap()
    }

    #[test]
    fn url_options_are_taken_out() {
        let (rest, opts) = split(
            "postgres://u:p%3F@h:5/db?sslmode=verify-full&application_name=x&sslrootcert=%2Fa%20b.pem\
             &sslcert=/c.pem&sslkey=/k.pem",
        );
        assert_eq!(rest, "postgres://u:p%3F@h:5/db?application_name=x");
        assert_eq!(opts.mode, Some(SslMode::VerifyFull));
        assert_eq!(opts.root_cert.as_deref(), Some("/a b.pem"));
        assert_eq!(opts.cert.as_deref(), Some("/c.pem"));
        assert_eq!(opts.key.as_deref(), Some("/k.pem"));
        let (rest, opts) = split("postgresql://u:a%3Fb@h/db?sslmode=require");
        assert_eq!(rest, "postgresql://u:a%3Fb@h/db");
        assert_eq!(opts.mode, Some(SslMode::Require));
        let (rest, opts) = split("postgres:///db?host=/run/pg");
        assert_eq!(rest, "postgres:///db?host=/run/pg");
        assert_eq!(opts, TlsOptions::default());
    }

    #[test]
    fn key_value_options_are_taken_out() {
        let (rest, opts) =
            split("host=h password='a b\\' c' sslmode = verify-ca sslrootcert='/x y.pem' dbname=d");
        assert_eq!(rest, "host=h password='a b\\' c'   dbname=d");
        assert_eq!(opts.mode, Some(SslMode::VerifyCa));
        assert_eq!(opts.root_cert.as_deref(), Some("/x y.pem"));
        rest.parse::<postgres::Config>().unwrap();
    }

    /// The pairs the driver's own parser finds are the pairs found here, for
    /// strings that exercise each of its rules.
    #[test]
    fn key_value_strings_are_tokenised_as_the_driver_does() {
        for s in [
            "host=h\u{2003}sslmode=require",
            "host=h\u{a0}port=5\u{85}user=u",
            "host=h dbname=d\\",
            "host=h password=a\\ b sslmode=disable",
            "host=h password='a\\'b' sslmode=disable",
            "host='h'sslmode=require",
            "host = h port= 5 user =u",
            "password=a'b=c host=h",
            "dbname=d\u{3000}sslmode=require\u{3000}",
        ] {
            let pairs = key_value_pairs(s).unwrap_or_else(|e| panic!("{s:?}: {e}"));
            let config: postgres::Config = s.parse().unwrap();
            let mode = pairs.iter().find(|(k, _, _)| k == "sslmode");
            let driver_mode = config.get_ssl_mode();
            match mode.map(|(_, v, _)| v.as_str()) {
                Some("require") => assert_eq!(driver_mode, DriverMode::Require, "{s:?}"),
                Some("disable") => assert_eq!(driver_mode, DriverMode::Disable, "{s:?}"),
                None => assert_eq!(driver_mode, DriverMode::Prefer, "{s:?}"),
                other => panic!("{other:?}"),
            }
            for (key, value, _) in &pairs {
                match key.as_str() {
                    "host" => assert!(
                        matches!(&config.get_hosts()[0], Host::Tcp(h) if h == value),
                        "{s:?}"
                    ),
                    "user" => assert_eq!(config.get_user(), Some(value.as_str()), "{s:?}"),
                    "dbname" => assert_eq!(config.get_dbname(), Some(value.as_str()), "{s:?}"),
                    "password" => {
                        assert_eq!(config.get_password(), Some(value.as_bytes()), "{s:?}")
                    }
                    _ => {}
                }
            }
            // Taken out, the rest still parses, without any sslmode.
            let (rest, _) = split(s);
            let rest: postgres::Config = rest.parse().unwrap();
            assert_eq!(rest.get_ssl_mode(), DriverMode::Prefer, "{s:?}");
        }
        for bad in [
            "host='h",
            "host=h password",
            "host=h =x sslmode=require",
            "host=",
            "host=\\",
        ] {
            let err = split_options(bad).unwrap_err();
            assert!(err.is_invalid_input(), "{bad:?}");
        }
    }

    #[test]
    fn url_with_an_at_sign_after_the_host_is_refused() {
        for url in [
            "postgres://h/db?application_name=a@b",
            "postgres://h?password=secret&x=a@b",
            "postgresql://u:pa/ss@h/db",
        ] {
            let err = split_options(url).unwrap_err().to_string();
            assert!(err.contains("%40"), "{err}");
            assert!(!err.contains("secret") && !err.contains("pa/ss"), "{err}");
        }
        split("postgres://u:p@h/db?application_name=a@b");
        split("postgres://u@h");
        split("postgres://h/db");
    }

    #[test]
    fn with_hosts_keeps_everything_else() {
        let config: postgres::Config = "host=a,b hostaddr=10.0.0.1,10.0.0.2 port=1,2 user=u \
            password=p dbname=d options=-cx=y application_name=n connect_timeout=3 \
            tcp_user_timeout=4 keepalives=0 keepalives_idle=5 keepalives_interval=6 \
            keepalives_retries=7 target_session_attrs=read-write channel_binding=require \
            load_balance_hosts=random sslmode=require sslnegotiation=direct"
            .parse()
            .unwrap();
        let copy = with_hosts(&config, config.get_hosts());
        assert_eq!(format!("{copy:?}"), format!("{config:?}"));
        assert_eq!(copy.get_password(), config.get_password());
        assert_eq!(copy.get_ssl_negotiation(), config.get_ssl_negotiation());
        assert_eq!(copy.get_channel_binding(), config.get_channel_binding());
        assert_eq!(
            copy.get_load_balance_hosts(),
            config.get_load_balance_hosts()
        );
        assert_eq!(
            copy.get_target_session_attrs(),
            config.get_target_session_attrs()
        );
    }

    #[test]
    fn hostaddr_positions_are_tcp() {
        let target = |url: &str| {
            let (rest, opts) = split(url);
            PgTarget::new(rest.parse().unwrap(), &opts)
        };
        let hosts = |url: &str| target(url).unwrap().config().get_hosts().to_vec();
        assert_eq!(
            hosts("host=/run/pg hostaddr=127.0.0.1 sslmode=require"),
            [Host::Tcp("127.0.0.1".into())]
        );
        assert_eq!(
            hosts("hostaddr=127.0.0.1,::1"),
            [Host::Tcp("127.0.0.1".into()), Host::Tcp("::1".into())]
        );
        assert_eq!(
            hosts("host=db,/run/pg hostaddr=10.0.0.1,127.0.0.1 sslmode=require"),
            [Host::Tcp("db".into()), Host::Tcp("127.0.0.1".into())]
        );
        let t = target("host=/run/pg hostaddr=127.0.0.1 sslmode=require").unwrap();
        assert_eq!(t.config().get_ssl_mode(), DriverMode::Require);
        for url in [
            "hostaddr=127.0.0.1 sslmode=verify-full sslrootcert=/x",
            "host=/run/pg hostaddr=127.0.0.1 sslmode=verify-full sslrootcert=/x",
        ] {
            let err = target(url).unwrap_err().to_string();
            assert!(err.contains("host name"), "{err}");
        }
        let err = target("host=a,b hostaddr=10.0.0.1")
            .unwrap_err()
            .to_string();
        assert!(err.contains("hostaddr"), "{err}");
    }

    #[test]
    fn bad_mode_is_refused_without_echoing_it() {
        let err = split_options("host=h sslmode=secret").unwrap_err();
        assert!(err.is_invalid_input());
        assert!(!err.to_string().contains("secret"), "{err}");
    }

    #[test]
    fn impossible_combinations_are_refused() {
        let target = |url: &str| {
            let (rest, opts) = split(url);
            PgTarget::new(rest.parse().unwrap(), &opts)
        };
        let msg = |url: &str| target(url).unwrap_err().to_string();
        assert!(msg("host=/run/pg sslmode=verify-full sslrootcert=/x").contains("Unix-domain"));
        assert!(msg("host=/run/pg,db sslmode=require").contains("Unix-domain"));
        assert!(msg("host=h sslmode=require sslrootcert=system").contains("verify-full"));
        assert!(msg("host=h sslcert=/c").contains("together"));
        assert!(msg("host=h sslmode=verify-ca sslrootcert=/nonexistent").contains("/nonexistent"));
        target("host=/run/pg sslmode=require").unwrap();
        target("host=h sslmode=disable").unwrap();
        target("host=h").unwrap();
        // The backstop: an sslmode the driver holds that lockbox did not take
        // out (which its tokeniser, matching the driver's, never leaves).
        for mode in [DriverMode::Require, DriverMode::Disable] {
            let mut config: postgres::Config = "host=h".parse().unwrap();
            config.ssl_mode(mode);
            let err = PgTarget::new(config, &TlsOptions::default()).unwrap_err();
            assert!(err.to_string().contains("read differently"), "{err}");
        }
    }
}
