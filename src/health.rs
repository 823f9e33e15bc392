//! [`Health`]: a client's health report, from
//! [`LockClient::health`](crate::LockClient::health).

use std::fmt;
use std::time::Duration;

/// A database answering slower than this makes the client [`HealthStatus::Degraded`].
pub const SLOW_DATABASE: Duration = Duration::from_secs(1);

/// The overall rating, worst first when compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum HealthStatus {
    /// Everything works within its thresholds.
    Healthy,
    /// Locking works but is at risk: see the reasons.
    Degraded,
    /// Locking does not work, or is not safe.
    Unhealthy,
}

/// A client's health: the database, the pool and the renewal thread, and an overall
/// [`status`](Health::status) with the [`reasons`](Health::reasons) for it.
///
/// **Unhealthy** when any of these holds:
/// - the database cannot be reached or does not answer within the health timeout;
/// - the renewal thread is not running (held locks are not renewed);
/// - the connection path does not keep session state (a PgBouncer-style
///   transaction pooler changed the backend between two transactions on one
///   connection): session advisory locks cannot work there.
///
/// **Degraded** when any of these holds:
/// - the renewal lag (how late the most overdue renewal is) exceeds a third of the
///   client's TTL — the default renewal interval, so a lock is at least one renewal
///   behind and close to its local deadline;
/// - the pool is saturated: every connection is in use, or callers are waiting for
///   one;
/// - one database round trip took longer than [`SLOW_DATABASE`];
/// - the store's release listener (Redis) is not connected, so waiters wake only
///   when leases expire.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Health {
    /// The overall rating.
    pub status: HealthStatus,
    /// Why the status is not `Healthy` (empty when it is).
    pub reasons: Vec<String>,
    /// The database.
    pub database: DatabaseHealth,
    /// The connection pool.
    pub pool: PoolHealth,
    /// The renewal thread and the locks it keeps.
    pub renewal: RenewalHealth,
}

/// The database part of a [`Health`] report.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct DatabaseHealth {
    /// Whether a fresh connection could be opened and answered a query in time.
    pub reachable: bool,
    /// One query's round-trip time.
    pub latency: Option<Duration>,
    /// The server's version string.
    pub server_version: Option<String>,
    /// Whether two transactions on one connection ran in the same server session
    /// (`false` behind a transaction-pooling proxy). `None` when not checked.
    pub session_state_kept: Option<bool>,
    /// Why the database is unreachable or, when it is reachable, why the write
    /// check failed.
    pub error: Option<String>,
    /// Whether the store's release listener is connected (Redis); `None` where
    /// there is none.
    pub listener_alive: Option<bool>,
    /// Whether the lease table took a write (PostgreSQL: a probe row inserted and
    /// rolled back, in a session set up like the pooled ones). `false` for a
    /// standby, a read-only role or database, a trigger that refuses, a missing
    /// privilege; the reason is in [`error`](Self::error). `None` when not checked.
    pub writable: Option<bool>,
}

impl DatabaseHealth {
    pub(crate) fn unreachable(error: String) -> DatabaseHealth {
        DatabaseHealth {
            error: Some(error),
            ..DatabaseHealth::default()
        }
    }
}

/// The pool part of a [`Health`] report.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct PoolHealth {
    /// The pool's maximum size.
    pub max_size: u32,
    /// Connections open now.
    pub connections: u32,
    /// Of those, idle.
    pub idle: u32,
    /// Of those, in use (each held lock keeps one).
    pub in_use: u32,
    /// Callers waiting for a connection right now.
    pub waiting: u64,
}

/// The renewal part of a [`Health`] report.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct RenewalHealth {
    /// Whether the renewal thread is running.
    pub thread_alive: bool,
    /// Locks held (and renewed) right now.
    pub held_locks: usize,
    /// How late the most overdue renewal is (zero when none is late).
    pub max_lag: Duration,
    /// Time since the last successful renewal, if there was one.
    pub since_last_success: Option<Duration>,
    /// Locks lost since the client started.
    pub locks_lost: u64,
}

impl Health {
    pub(crate) fn rate(
        database: DatabaseHealth,
        pool: PoolHealth,
        renewal: RenewalHealth,
        ttl: Duration,
    ) -> Health {
        let mut unhealthy = Vec::new();
        let mut degraded = Vec::new();
        if !database.reachable {
            unhealthy.push(format!(
                "database unreachable: {}",
                database.error.as_deref().unwrap_or("no answer")
            ));
        }
        if database.session_state_kept == Some(false) {
            unhealthy.push(
                "the connection path does not keep session state (transaction pooling, \
                 e.g. PgBouncer pool_mode=transaction): session advisory locks are unsafe"
                    .to_owned(),
            );
        }
        if !renewal.thread_alive {
            unhealthy.push("the renewal thread is not running".to_owned());
        }
        if renewal.max_lag > ttl / 3 {
            degraded.push(format!(
                "renewal lag {:?} exceeds a third of the TTL ({:?})",
                renewal.max_lag,
                ttl / 3
            ));
        }
        if pool.in_use >= pool.max_size || pool.waiting > 0 {
            degraded.push(format!(
                "pool saturated: {} of {} connections in use, {} waiting",
                pool.in_use, pool.max_size, pool.waiting
            ));
        }
        if database.listener_alive == Some(false) {
            degraded.push(
                "the release listener is not connected: waiters wake only when leases expire"
                    .to_owned(),
            );
        }
        if let Some(latency) = database.latency.filter(|l| *l > SLOW_DATABASE) {
            degraded.push(format!("database slow: a round trip took {latency:?}"));
        }
        let status = if !unhealthy.is_empty() {
            HealthStatus::Unhealthy
        } else if !degraded.is_empty() {
            HealthStatus::Degraded
        } else {
            HealthStatus::Healthy
        };
        unhealthy.extend(degraded);
        Health {
            status,
            reasons: unhealthy,
            database,
            pool,
            renewal,
        }
    }

    /// Whether the status is [`HealthStatus::Healthy`].
    pub fn is_healthy(&self) -> bool {
        self.status == HealthStatus::Healthy
    }
}

impl fmt::Display for Health {
    /// A short multi-line report for logs and terminals.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "status: {:?}", self.status)?;
        for reason in &self.reasons {
            writeln!(f, "  - {reason}")?;
        }
        let db = &self.database;
        match (&db.latency, &db.server_version) {
            (Some(latency), Some(version)) => writeln!(
                f,
                "database: reachable, PostgreSQL {version}, round trip {latency:?}, session state kept: {}",
                db.session_state_kept
                    .map_or("unknown", |k| if k { "yes" } else { "NO" })
            )?,
            _ => writeln!(
                f,
                "database: unreachable ({})",
                db.error.as_deref().unwrap_or("no answer")
            )?,
        }
        let p = &self.pool;
        writeln!(
            f,
            "pool: {} of {} open, {} in use, {} idle, {} waiting",
            p.connections, p.max_size, p.in_use, p.idle, p.waiting
        )?;
        let r = &self.renewal;
        write!(
            f,
            "renewal: thread {}, {} held, max lag {:?}, last success {}, {} lost since start",
            if r.thread_alive { "alive" } else { "DEAD" },
            r.held_locks,
            r.max_lag,
            r.since_last_success
                .map_or("never".to_owned(), |d| format!("{d:?} ago")),
            r.locks_lost
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reachable() -> DatabaseHealth {
        DatabaseHealth {
            reachable: true,
            latency: Some(Duration::from_millis(1)),
            server_version: Some("15".into()),
            session_state_kept: Some(true),
            error: None,
            listener_alive: None,
            writable: Some(true),
        }
    }

    fn pool() -> PoolHealth {
        PoolHealth {
            max_size: 10,
            connections: 2,
            idle: 1,
            in_use: 1,
            waiting: 0,
        }
    }

    fn renewal() -> RenewalHealth {
        RenewalHealth {
            thread_alive: true,
            ..RenewalHealth::default()
        }
    }

    const TTL: Duration = Duration::from_secs(30);

    #[test]
    fn thresholds() {
        assert_eq!(
            Health::rate(reachable(), pool(), renewal(), TTL).status,
            HealthStatus::Healthy
        );

        let lagging = RenewalHealth {
            max_lag: Duration::from_secs(11),
            ..renewal()
        };
        let h = Health::rate(reachable(), pool(), lagging, TTL);
        assert_eq!(h.status, HealthStatus::Degraded);
        assert!(h.reasons[0].contains("renewal lag"));

        let full = PoolHealth {
            in_use: 10,
            ..pool()
        };
        assert_eq!(
            Health::rate(reachable(), full, renewal(), TTL).status,
            HealthStatus::Degraded
        );

        let slow = DatabaseHealth {
            latency: Some(Duration::from_secs(2)),
            ..reachable()
        };
        assert_eq!(
            Health::rate(slow, pool(), renewal(), TTL).status,
            HealthStatus::Degraded
        );

        let pooled = DatabaseHealth {
            session_state_kept: Some(false),
            ..reachable()
        };
        assert_eq!(
            Health::rate(pooled, pool(), renewal(), TTL).status,
            HealthStatus::Unhealthy
        );

        let dead = RenewalHealth {
            thread_alive: false,
            ..renewal()
        };
        assert_eq!(
            Health::rate(reachable(), pool(), dead, TTL).status,
            HealthStatus::Unhealthy
        );

        let down = DatabaseHealth::unreachable("refused".into());
        let h = Health::rate(down, pool(), renewal(), TTL);
        assert_eq!(h.status, HealthStatus::Unhealthy);
        assert!(h.to_string().contains("unreachable (refused)"));
    }
}
