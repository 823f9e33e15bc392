//! Pooled connections: each carries its prepared statements and its session identity,
//! and can be marked broken so that r2d2 closes it instead of reusing it.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use postgres::{Client, NoTls, Statement};
use r2d2::ManageConnection;
use r2d2_postgres::PostgresConnectionManager;

use crate::backend::{UNPARSEABLE, bracket_ipv6};

use super::sql::{SESSION_INFO, SESSION_SETUP, Sql, UNLOCK_ALL};

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
    pub wait_acquire: Statement,
    pub upsert: Statement,
    pub renew: Statement,
    pub release: Statement,
    pub holds_key: Statement,
    pub probe: Statement,
    pub unlock_all: Statement,
}

/// The r2d2 manager: connects through `r2d2_postgres`, then applies lockbox's
/// session defaults and prepares its statements.
#[derive(Debug)]
pub(crate) struct PgManager {
    inner: PostgresConnectionManager<NoTls>,
    sql: Arc<Sql>,
}

impl PgManager {
    pub fn new(config: postgres::Config, sql: Arc<Sql>) -> PgManager {
        PgManager {
            inner: PostgresConnectionManager::new(config, NoTls),
            sql,
        }
    }

    /// Opens a plain session (used to check the server and the lease table).
    pub fn connect_raw(&self) -> Result<Client, postgres::Error> {
        self.inner.connect()
    }

    /// Opens a session with lockbox's session defaults and prepared statements.
    pub fn connect_configured(&self) -> Result<PgConn, postgres::Error> {
        let mut client = self.inner.connect()?;
        client.batch_execute(SESSION_SETUP)?;
        let row = client.query_one(SESSION_INFO, &[])?;
        let sql = &self.sql;
        let stmts = Statements {
            try_acquire: client.prepare(&sql.try_acquire)?,
            wait_acquire: client.prepare(&sql.wait_acquire)?,
            upsert: client.prepare(&sql.upsert)?,
            renew: client.prepare(&sql.renew)?,
            release: client.prepare(&sql.release)?,
            holds_key: client.prepare(&sql.holds_key)?,
            probe: client.prepare(&sql.probe)?,
            unlock_all: client.prepare(UNLOCK_ALL)?,
        };
        Ok(PgConn {
            client,
            stmts,
            pid: row.get(0),
            backend_start: row.try_get(1)?,
            broken: false,
            idle_since: Instant::now(),
        })
    }
}

impl ManageConnection for PgManager {
    type Connection = PgConn;
    type Error = postgres::Error;

    fn connect(&self) -> Result<PgConn, postgres::Error> {
        self.connect_configured()
    }

    fn is_valid(&self, conn: &mut PgConn) -> Result<(), postgres::Error> {
        self.inner.is_valid(&mut conn.client)
    }

    /// Called by r2d2 as the connection goes back to the pool.
    fn has_broken(&self, conn: &mut PgConn) -> bool {
        conn.idle_since = Instant::now();
        conn.broken || conn.client.is_closed()
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
    match url.parse::<postgres::Config>() {
        Ok(config) => describe_target(&config),
        Err(_) => UNPARSEABLE.to_owned(),
    }
}
