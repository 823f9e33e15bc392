//! Pooled connections: each carries its prepared statements and its session identity,
//! and can be marked broken so that r2d2 closes it instead of reusing it.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use postgres::{Client, Statement};
use r2d2::ManageConnection;

use super::db_error;
use super::sql::{
    SESSION_INFO, SESSION_SETUP, Sql, UNLOCK_ALL, WAIT_GRANT_CHECK, WAIT_GRANT_RESULT,
};
use super::tls::{self, PgTarget};
use crate::backend::{Bounded, UNPARSEABLE, Unfinished, bracket_ipv6};
use crate::error::Error;

/// One database session owned by lockbox's pool.
pub(crate) struct PgConn {
    pub client: Client,
    pub stmts: Statements,
    /// `pg_backend_pid()` of this session.
    pub pid: i32,
    /// `backend_start` of this session, read and bound as a binary `timestamptz`
    /// (exact to the microsecond, whatever the session's `DateStyle` or `TimeZone`).
    pub backend_start: SystemTime,
    /// Set when the session may hold an advisory lock or is in an unknown state: r2d2
    /// then closes it rather than handing it out again.
    pub broken: bool,
    /// When the connection last went back to the pool (or was opened).
    pub idle_since: Instant,
    /// How it was opened: cancel requests for it go the same way (over TLS
    /// when it uses TLS).
    pub target: Arc<PgTarget>,
    /// The statements of shared leases, prepared on this connection's first
    /// shared lease (never for connections that hold exclusive locks only).
    pub coord: Option<Box<super::coord::CoordStatements>>,
    /// What this session last saw of an unlogged lease table's bounds.
    pub bounds: super::bounds::Bounds,
    /// Cancels this session's statement (for the watchdog of an acquire's).
    pub canceller: Arc<super::watchdog::Canceller>,
    /// A cancel the watchdog sent may still land on this session (its
    /// sending was not over when the statement it was for had ended): it
    /// is closed rather than pooled again.
    pub taint: super::watchdog::Taint,
}

impl PgConn {
    /// Whether `err` may be a late cancel: one the watchdog sent for an
    /// earlier statement of this tainted session, landing on a later one.
    /// Such a statement was cancelled for nothing it did: the callers treat
    /// it as a lock wait that ran out, or send it again (an operator's
    /// cancel, indistinguishable, is treated the same; every such retry is
    /// within its acquire's or lease's time).
    pub fn late_cancel(&self, err: &postgres::Error) -> bool {
        self.taint.any() && err.code() == Some(&postgres::error::SqlState::QUERY_CANCELED)
    }
}

impl std::fmt::Debug for PgConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgConn")
            .field("pid", &self.pid)
            .field("broken", &self.broken)
            .finish_non_exhaustive()
    }
}

/// The hot-path statements, prepared once per connection.
pub(crate) struct Statements {
    pub try_acquire: Statement,
    pub wait_key: Statement,
    pub slice: Statement,
    pub upsert: Statement,
    pub renew: Statement,
    pub renew_shared: Statement,
    pub unlock_keys: Statement,
    pub release: Statement,
    pub release_reclaim: Option<Statement>,
    /// The call of the wait-and-grant function, when this session may use it.
    pub wait_grant: Option<WaitGrantCall>,
    pub holds_key: Statement,
    pub probe: Statement,
    pub unlock_all: Statement,
}

/// The wait-and-grant function as this session checked it.
pub(crate) struct WaitGrantCall {
    pub call: Statement,
    /// Its schema and name, which must still name `oid`, owned by `owner`,
    /// when it is called.
    pub schema: String,
    pub name: String,
    pub oid: u32,
    pub owner: u32,
    /// The lease table, whose owner `owner` must still be (or this role).
    pub table_oid: u32,
}

/// Why a session could not be opened.
#[derive(Debug)]
pub(crate) enum OpenError {
    /// The driver could not open the session: unreachable, refused, or the server
    /// rejected the startup or authentication.
    Connect(postgres::Error),
    /// The session was opened but setting it up failed (the server's answer).
    Setup(postgres::Error),
    /// The server did not finish the startup, authentication and session setup
    /// within the connect timeout (a frozen server or a hung proxy: the TCP
    /// connection was accepted, nothing answered).
    TimedOut(Duration),
    /// Earlier attempts to open a session are still waiting for the server; no
    /// further one is started until they end.
    Busy(usize),
    /// No thread could be started for the attempt.
    Spawn(std::io::Error),
    /// The session cannot take locks: the server is a standby, or its sessions
    /// are read-only by default. Says which.
    ReadOnly(String),
}

impl fmt::Display for OpenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OpenError::Connect(e) | OpenError::Setup(e) => match e.as_db_error() {
                Some(db) => write!(
                    f,
                    "{}: {} (SQLSTATE {})",
                    db.severity(),
                    db.message(),
                    db.code().code()
                ),
                None => {
                    if let Some(why) = tls::explain(e) {
                        return write!(f, "{why}");
                    }
                    // The driver's `Display` leaves out the cause ("error
                    // connecting to server"); it is what says why.
                    write!(f, "{e}")?;
                    let mut cause = std::error::Error::source(e);
                    while let Some(c) = cause {
                        write!(f, ": {c}")?;
                        cause = c.source();
                    }
                    Ok(())
                }
            },
            OpenError::TimedOut(after) => write!(
                f,
                "the server accepted the connection but did not complete the startup, \
                 authentication and session setup within {after:?}"
            ),
            OpenError::Busy(n) => write!(
                f,
                "{n} earlier connection attempts are still waiting for the server; \
                 no further one is started until they end"
            ),
            OpenError::Spawn(e) => write!(f, "could not start a connection thread: {e}"),
            OpenError::ReadOnly(why) => write!(
                f,
                "{why}: lockbox takes locks only on a primary that accepts writes; connect to \
                 the primary (with several hosts, add target_session_attrs=read-write)"
            ),
        }
    }
}

impl std::error::Error for OpenError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            OpenError::Connect(e) | OpenError::Setup(e) => Some(e),
            OpenError::Spawn(e) => Some(e),
            OpenError::TimedOut(_) | OpenError::Busy(_) | OpenError::ReadOnly(_) => None,
        }
    }
}

impl OpenError {
    /// The lockbox error: [`Error::Connect`] (naming `target`, never the
    /// password) unless the server answered a setup statement with an error.
    pub fn into_error(self, target: &str) -> Error {
        let source: crate::error::BoxError = match self {
            OpenError::Setup(e) if e.as_db_error().is_some() => return db_error(e),
            OpenError::ReadOnly(_) => return Error::Unsupported(self.to_string()),
            OpenError::Connect(e) | OpenError::Setup(e) if e.as_db_error().is_some() => Arc::new(e),
            // Told with its cause, and a failed TLS negotiation in words (which
            // check failed).
            other @ OpenError::Connect(_) => Arc::new(other),
            OpenError::Setup(e) => Arc::new(e),
            other => Arc::new(other),
        };
        Error::Connect {
            target: target.to_owned(),
            source,
        }
    }
}

/// Opens sessions with the *whole* setup bounded by the connect timeout: TCP
/// connect, TLS/startup, authentication and the caller's session setup.
///
/// The driver's own `connect_timeout` covers the TCP connect only, and a
/// blocking driver call cannot be cancelled, so each attempt runs on a thread of
/// its own (`lockbox-connect`, through [`Bounded`]) while the caller waits at
/// most the timeout. An attempt whose caller gave up finishes by itself when the
/// server answers (or TCP keepalive declares it dead) and then closes its
/// session at once. At most `max_pending` attempts run at a time: against a
/// frozen server the threads and connections left waiting stay bounded, and
/// further attempts fail at once with [`OpenError::Busy`] instead of piling up.
#[derive(Clone)]
pub(crate) struct Connector {
    target: Arc<PgTarget>,
    timeout: Duration,
    attempts: Bounded,
}

impl fmt::Debug for Connector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connector")
            .field("target", &self.target)
            .field("timeout", &self.timeout)
            .field("attempts", &self.attempts)
            .finish_non_exhaustive()
    }
}

impl From<Unfinished> for OpenError {
    fn from(e: Unfinished) -> OpenError {
        match e {
            Unfinished::TimedOut(after) => OpenError::TimedOut(after),
            Unfinished::Busy(n) => OpenError::Busy(n),
            Unfinished::Spawn(e) => OpenError::Spawn(e),
        }
    }
}

impl Connector {
    pub fn new(target: Arc<PgTarget>, timeout: Duration, max_pending: usize) -> Connector {
        Connector {
            target,
            timeout,
            attempts: Bounded::new(max_pending, "lockbox-connect"),
        }
    }

    /// Opens a session and runs `setup` on it, all within the connect timeout.
    /// What `setup` returns (normally holding the client) is dropped, closing the
    /// session, if the caller has stopped waiting by then.
    pub fn open<T, F>(&self, setup: F) -> Result<T, OpenError>
    where
        T: Send + 'static,
        F: FnOnce(Client) -> Result<T, OpenError> + Send + 'static,
    {
        let target = self.target.clone();
        self.attempts.run(self.timeout, move || {
            target.connect().map_err(OpenError::Connect).and_then(setup)
        })?
    }
}

/// The r2d2 manager: opens sessions through the bounded [`Connector`], then
/// applies lockbox's session settings and prepares its statements.
#[derive(Debug)]
pub(crate) struct PgManager {
    connector: Connector,
    sql: Arc<Sql>,
}

impl PgManager {
    pub fn new(connector: Connector, sql: Arc<Sql>) -> PgManager {
        PgManager { connector, sql }
    }

    /// Opens a session with lockbox's session settings and prepared statements.
    pub fn connect_configured(&self) -> Result<PgConn, OpenError> {
        let sql = self.sql.clone();
        let target = self.connector.target.clone();
        self.connector
            .open(move |client| configure(client, &sql, target))
    }
}

/// Pins the session settings, reads the session's identity and prepares the
/// statements. Never panics on the server's answer.
fn configure(mut client: Client, sql: &Sql, target: Arc<PgTarget>) -> Result<PgConn, OpenError> {
    client
        .batch_execute(SESSION_SETUP)
        .map_err(OpenError::Setup)?;
    let row = client
        .query_one(SESSION_INFO, &[])
        .map_err(OpenError::Setup)?;
    let in_recovery: bool = row.try_get(3).map_err(OpenError::Setup)?;
    let read_only_default: Option<String> = row.try_get(4).map_err(OpenError::Setup)?;
    if let Some(why) =
        super::read_only_reason(in_recovery, read_only_default.as_deref() == Some("on"))
    {
        return Err(OpenError::ReadOnly(why));
    }
    prepare(client, sql, target, &row).map_err(OpenError::Setup)
}

/// Prepares the statements of a session set up by [`configure`].
fn prepare(
    mut client: Client,
    sql: &Sql,
    target: Arc<PgTarget>,
    row: &postgres::Row,
) -> Result<PgConn, postgres::Error> {
    let stmts = Statements {
        try_acquire: client.prepare(&sql.try_acquire)?,
        wait_key: client.prepare(&sql.wait_key)?,
        slice: client.prepare(&sql.slice)?,
        upsert: client.prepare(&sql.upsert)?,
        renew: client.prepare(&sql.renew)?,
        renew_shared: client.prepare(&sql.renew_shared)?,
        unlock_keys: client.prepare(&sql.unlock_keys)?,
        release: client.prepare(&sql.release)?,
        release_reclaim: match &sql.release_reclaim {
            Some(text) => Some(client.prepare(text)?),
            None => None,
        },
        wait_grant: match &sql.wait_grant {
            // Checked again for each session: a function dropped or replaced since
            // `build()` is not used (waits then grant with `upsert`).
            Some((call, w)) => {
                let row = client.query_opt(
                    WAIT_GRANT_CHECK,
                    &[&w.signature, &w.body, &WAIT_GRANT_RESULT, &w.table_oid],
                )?;
                // Preparing can still fail (an overload created since the check
                // makes the call ambiguous): then it is not used either.
                let prepared = match row {
                    Some(row) => {
                        let (oid, owner) = (row.try_get(0)?, row.try_get(1)?);
                        client.prepare(call).ok().map(|call| WaitGrantCall {
                            call,
                            schema: w.schema.clone(),
                            name: w.name.clone(),
                            oid,
                            owner,
                            table_oid: w.table_oid,
                        })
                    }
                    None => None,
                };
                if prepared.is_none() {
                    log::warn!(
                        "lockbox: the function {} was dropped or changed since the client was \
                         built; this session's waits grant with a statement of their own",
                        w.signature
                    );
                }
                prepared
            }
            None => None,
        },
        holds_key: client.prepare(&sql.holds_key)?,
        probe: client.prepare(&sql.probe)?,
        unlock_all: client.prepare(UNLOCK_ALL)?,
    };
    let cancel = client.cancel_token();
    Ok(PgConn {
        client,
        stmts,
        pid: row.try_get(0)?,
        backend_start: row.try_get(1)?,
        broken: false,
        idle_since: Instant::now(),
        canceller: Arc::new(super::watchdog::Canceller::new(target.clone(), cancel)),
        taint: super::watchdog::Taint::Clean,
        target,
        coord: None,
        bounds: Default::default(),
    })
}

impl ManageConnection for PgManager {
    type Connection = PgConn;
    type Error = OpenError;

    fn connect(&self) -> Result<PgConn, OpenError> {
        self.connect_configured()
    }

    fn is_valid(&self, conn: &mut PgConn) -> Result<(), OpenError> {
        conn.client
            .simple_query("")
            .map(drop)
            .map_err(OpenError::Setup)
    }

    /// Called by r2d2 as the connection goes back to the pool.
    fn has_broken(&self, conn: &mut PgConn) -> bool {
        conn.idle_since = Instant::now();
        conn.broken || conn.taint.any() || conn.client.is_closed()
    }
}

/// Where a parsed configuration connects to, for messages and `Debug`:
/// `postgresql://user@host:port,…/database` — hosts (or `hostaddr`s), ports,
/// database and user as the driver parsed them, never the password.
pub(crate) fn describe_target(config: &postgres::Config) -> String {
    use postgres::config::Host;
    let port_of = |i: usize| {
        config
            .get_ports()
            .get(i)
            .or_else(|| config.get_ports().first())
            .copied()
            .unwrap_or(5432)
    };
    let mut hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, host)| match host {
            // A host holding `@` is the tail of a password with an unencoded
            // `@` (refused before it gets here; never shown, should it).
            Host::Tcp(h) if h.contains('@') => {
                format!("(a host holding `@`, not shown):{}", port_of(i))
            }
            Host::Tcp(h) => format!("{}:{}", bracket_ipv6(h), port_of(i)),
            Host::Unix(path) => format!("{}:{}", path.display(), port_of(i)),
        })
        .collect();
    if hosts.is_empty() {
        hosts = config
            .get_hostaddrs()
            .iter()
            .enumerate()
            .map(|(i, addr)| format!("{}:{}", bracket_ipv6(&addr.to_string()), port_of(i)))
            .collect();
    }
    let hosts = if hosts.is_empty() {
        "(default host)".to_owned()
    } else {
        hosts.join(",")
    };
    format!(
        "postgresql://{}@{}/{}",
        config.get_user().unwrap_or("(default user)"),
        hosts,
        config.get_dbname().unwrap_or("(default database)")
    )
}

/// [`describe_target`] for a connection string; an unparseable one is named
/// only as such.
pub(crate) fn describe_url(url: &str) -> String {
    let Ok((url, _)) = tls::split_options(url) else {
        return UNPARSEABLE.to_owned();
    };
    match url.parse::<postgres::Config>() {
        Ok(config) => describe_target(&config),
        Err(_) => UNPARSEABLE.to_owned(),
    }
}

/// A connection-string parse error, without any text of the string itself: the
/// driver quotes an unknown keyword and an unexpected character, and with an
/// unquoted space in a password those are pieces of the password.
pub(crate) fn describe_parse_error(err: &postgres::Error) -> String {
    let msg = err.to_string();
    if msg.contains("unknown option") {
        return "an unknown option (not shown, as it may be part of a password: quote values \
                that contain spaces, as in password='…', or percent-encode them in a URL)"
            .to_owned();
    }
    if let Some(at) = msg.find("unexpected character at byte") {
        let upto = msg[at..].find(':').map_or(msg.len(), |i| at + i);
        return format!(
            "{} (the character is not shown, as it may be part of a password)",
            &msg[at..upto]
        );
    }
    msg
}
