//! [`Health`]: a client's health report, from
//! [`LockClient::health`](crate::LockClient::health).

use std::fmt;
use std::time::Duration;

/// A database answering slower than this makes the client [`HealthStatus::Degraded`].
pub const SLOW_DATABASE: Duration = Duration::from_secs(1);

/// A lock lost this recently makes the client [`HealthStatus::Degraded`].
pub const RECENT_LOSS: Duration = Duration::from_secs(60);

/// The overall rating. Ordered from best to worst, so `max` of two statuses is
/// the worse one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum HealthStatus {
    /// Everything works within its thresholds.
    Healthy,
    /// Locking works but is at risk: see the reasons.
    Degraded,
    /// Locking does not work, or is not safe.
    Unhealthy,
}

/// A client's health: the store, the pool and the renewals, and an overall
/// [`status`](Health::status) with the [`reasons`](Health::reasons) for it.
///
/// **Unhealthy** when any of these holds:
/// - the store cannot be reached or does not answer within the health timeout;
/// - the store is reachable but reports an error that makes locking unsafe
///   (`DatabaseHealth::error`, for example a Redis eviction policy that was not
///   allowed);
/// - the store refuses writes to the lease table (`writable` is `false`: a
///   standby, a read-only transaction default, a trigger, permissions);
/// - the renewal scheduler is not running (held locks are not renewed);
/// - a held lock is *at risk*: its renewal is overdue or failing and under a
///   third of its TTL is left before its local deadline;
/// - the connection path does not keep session state (a PgBouncer-style
///   transaction pooler changed the backend between two transactions on one
///   connection): session advisory locks cannot work there.
///
/// **Degraded** when any of these holds:
/// - a held lock's last renewal attempt failed (it is being retried);
/// - a held lock's renewal is late by more than half its own renewal interval
///   (each lock is rated against its own TTL);
/// - a lock was lost within [`RECENT_LOSS`];
/// - the pool is saturated: every connection is in use, or callers are waiting
///   for one;
/// - one store round trip took longer than [`SLOW_DATABASE`];
/// - the store's release listener (Redis) is not connected, so waiters wake only
///   when leases expire;
/// - the store reported a warning (`DatabaseHealth::warnings`, for example a
///   Redis eviction policy that was explicitly allowed).
///
/// Otherwise **Healthy**.
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
    /// Why the store is unreachable or, when it is reachable, why locking there
    /// is unsafe (the write check failed, an eviction policy that was not
    /// allowed): either way the client is Unhealthy.
    pub error: Option<String>,
    /// Whether the store's release listener is connected (Redis); `None` where
    /// there is none.
    pub listener_alive: Option<bool>,
    /// Whether the lease table took a write (PostgreSQL: a probe row inserted and
    /// rolled back, in a session set up like the pooled ones). `false` for a
    /// standby, a read-only role or database, a trigger that refuses, a missing
    /// privilege; the reason is in [`error`](Self::error). `None` when not checked.
    pub writable: Option<bool>,
    /// Conditions the store reports that put locking at risk without stopping it
    /// (the client is Degraded).
    pub warnings: Vec<String>,
    /// Where the leases are kept, as resolved at build (PostgreSQL: the
    /// schema-qualified lease table; every process sharing locks must show the
    /// same). `None` where the store has no such name.
    pub lease_table: Option<String>,
    /// The cluster behind the store (etcd): its members, its leader and
    /// whether it has quorum. `None` for a single server.
    pub cluster: Option<ClusterHealth>,
}

/// An etcd cluster as a health check saw it; in [`DatabaseHealth::cluster`].
/// Without quorum ([`quorum`](Self::quorum) false) the store is reported with
/// an [`error`](DatabaseHealth::error) (the client is Unhealthy); a member
/// that does not answer, with a warning (Degraded).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClusterHealth {
    /// Every member the cluster lists.
    pub members: Vec<MemberHealth>,
    /// The name of the member the answering members follow as leader, if any.
    pub leader: Option<String>,
    /// Whether a linearizable read (which needs a majority of the members)
    /// succeeded within the health timeout.
    pub quorum: bool,
}

/// One member of a cluster; in [`ClusterHealth::members`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct MemberHealth {
    /// The member's name.
    pub name: String,
    /// The URL its clients reach it at (the first it advertises).
    pub client_url: Option<String>,
    /// Whether it answered a status request in time.
    pub reachable: bool,
    /// Whether it is the leader.
    pub is_leader: bool,
    /// Why it did not answer.
    pub error: Option<String>,
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
    /// Of those, in use: sessions holding locks (shared by up to
    /// `locks_per_session` each) and acquires in flight.
    pub in_use: u32,
    /// Callers waiting for a connection right now.
    pub waiting: u64,
}

/// The renewal part of a [`Health`] report.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct RenewalHealth {
    /// Whether the renewal scheduler thread is running.
    pub thread_alive: bool,
    /// Locks held (and renewed) right now.
    pub held_locks: usize,
    /// How late the most overdue renewal is, counted from when it first became
    /// due (retries of a failed renewal do not reset it); zero when none is late.
    pub max_lag: Duration,
    /// Held locks whose renewal is late by more than half their own renewal
    /// interval.
    pub lagging_locks: usize,
    /// Held locks whose last renewal attempt failed.
    pub failing_locks: usize,
    /// Held locks whose renewal is overdue or failing with under a third of their
    /// TTL left before the local deadline.
    pub at_risk_locks: usize,
    /// Time since the last successful renewal, if there was one.
    pub since_last_success: Option<Duration>,
    /// Time since the last lock was lost, if one was.
    pub since_last_loss: Option<Duration>,
    /// Locks lost since the client started.
    pub locks_lost: u64,
    /// Renewal I/O workers running now.
    pub workers: usize,
}

impl Health {
    pub(crate) fn rate(
        database: DatabaseHealth,
        pool: PoolHealth,
        renewal: RenewalHealth,
    ) -> Health {
        let mut unhealthy = Vec::new();
        let mut degraded = Vec::new();
        if !database.reachable {
            unhealthy.push(format!(
                "store unreachable: {}",
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
        if database.reachable
            && database.writable != Some(false)
            && let Some(error) = &database.error
        {
            unhealthy.push(format!("the store reports: {error}"));
        }
        if database.writable == Some(false) {
            unhealthy.push(format!(
                "the store refuses writes to the lease table: {}",
                database.error.as_deref().unwrap_or("write refused")
            ));
        }
        if !renewal.thread_alive {
            unhealthy.push("the renewal thread is not running".to_owned());
        }
        if renewal.at_risk_locks > 0 {
            unhealthy.push(format!(
                "{} held lock(s) at risk: renewal overdue or failing with under a third of \
                 the TTL left before the local deadline",
                renewal.at_risk_locks
            ));
        }
        if renewal.failing_locks > 0 {
            degraded.push(format!(
                "{} held lock(s) failing to renew (retrying)",
                renewal.failing_locks
            ));
        }
        if renewal.lagging_locks > 0 {
            degraded.push(format!(
                "{} held lock(s) late to renew by over half their renewal interval \
                 (max lag {:?})",
                renewal.lagging_locks, renewal.max_lag
            ));
        }
        if let Some(ago) = renewal.since_last_loss.filter(|ago| *ago < RECENT_LOSS) {
            degraded.push(format!("a lock was lost {ago:?} ago"));
        }
        for warning in &database.warnings {
            degraded.push(warning.clone());
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
        let yes_no = |v: Option<bool>| v.map_or("unknown", |k| if k { "yes" } else { "NO" });
        if db.reachable {
            write!(
                f,
                "store: reachable, {}, round trip {}",
                db.server_version.as_deref().unwrap_or("version unknown"),
                db.latency
                    .map_or("unknown".to_owned(), |l| format!("{l:?}"))
            )?;
            if db.session_state_kept.is_some() {
                write!(f, ", session state kept: {}", yes_no(db.session_state_kept))?;
            }
            if db.writable.is_some() {
                write!(f, ", writable: {}", yes_no(db.writable))?;
            }
            if db.listener_alive.is_some() {
                write!(f, ", listener: {}", yes_no(db.listener_alive))?;
            }
            if let Some(table) = &db.lease_table {
                write!(f, ", lease table {table}")?;
            }
            writeln!(f)?;
        } else {
            writeln!(
                f,
                "store: unreachable ({})",
                db.error.as_deref().unwrap_or("no answer")
            )?;
        }
        let p = &self.pool;
        if p.max_size == u32::MAX {
            // A store without a connection pool (in-memory).
            writeln!(f, "pool: none")?;
        } else {
            writeln!(
                f,
                "pool: {} of {} open, {} in use, {} idle, {} waiting",
                p.connections, p.max_size, p.in_use, p.idle, p.waiting
            )?;
        }
        let r = &self.renewal;
        write!(
            f,
            "renewal: thread {}, {} held ({} failing, {} late, {} at risk), max lag {:?}, \
             last success {}, {} lost since start",
            if r.thread_alive { "alive" } else { "DEAD" },
            r.held_locks,
            r.failing_locks,
            r.lagging_locks,
            r.at_risk_locks,
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
            warnings: Vec::new(),
            lease_table: None,
            cluster: None,
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

    #[test]
    fn thresholds() {
        assert_eq!(
            Health::rate(reachable(), pool(), renewal()).status,
            HealthStatus::Healthy
        );

        let lagging = RenewalHealth {
            max_lag: Duration::from_secs(11),
            lagging_locks: 1,
            ..renewal()
        };
        let h = Health::rate(reachable(), pool(), lagging);
        assert_eq!(h.status, HealthStatus::Degraded);
        assert!(h.reasons[0].contains("late to renew"), "{:?}", h.reasons);

        let failing = RenewalHealth {
            failing_locks: 1,
            ..renewal()
        };
        assert_eq!(
            Health::rate(reachable(), pool(), failing).status,
            HealthStatus::Degraded
        );
        let at_risk = RenewalHealth {
            failing_locks: 1,
            at_risk_locks: 1,
            ..renewal()
        };
        assert_eq!(
            Health::rate(reachable(), pool(), at_risk).status,
            HealthStatus::Unhealthy
        );
        let lost = RenewalHealth {
            since_last_loss: Some(Duration::from_secs(1)),
            ..renewal()
        };
        assert_eq!(
            Health::rate(reachable(), pool(), lost).status,
            HealthStatus::Degraded
        );
        let long_ago = RenewalHealth {
            since_last_loss: Some(RECENT_LOSS * 2),
            ..renewal()
        };
        assert_eq!(
            Health::rate(reachable(), pool(), long_ago).status,
            HealthStatus::Healthy
        );
        let read_only = DatabaseHealth {
            writable: Some(false),
            ..reachable()
        };
        assert_eq!(
            Health::rate(read_only, pool(), renewal()).status,
            HealthStatus::Unhealthy
        );
        assert!(HealthStatus::Unhealthy > HealthStatus::Healthy);

        let full = PoolHealth {
            in_use: 10,
            ..pool()
        };
        assert_eq!(
            Health::rate(reachable(), full, renewal()).status,
            HealthStatus::Degraded
        );

        let slow = DatabaseHealth {
            latency: Some(Duration::from_secs(2)),
            ..reachable()
        };
        assert_eq!(
            Health::rate(slow, pool(), renewal()).status,
            HealthStatus::Degraded
        );

        let pooled = DatabaseHealth {
            session_state_kept: Some(false),
            ..reachable()
        };
        assert_eq!(
            Health::rate(pooled, pool(), renewal()).status,
            HealthStatus::Unhealthy
        );

        let dead = RenewalHealth {
            thread_alive: false,
            ..renewal()
        };
        assert_eq!(
            Health::rate(reachable(), pool(), dead).status,
            HealthStatus::Unhealthy
        );

        let down = DatabaseHealth::unreachable("refused".into());
        let h = Health::rate(down, pool(), renewal());
        assert_eq!(h.status, HealthStatus::Unhealthy);
        assert!(h.to_string().contains("unreachable (refused)"));
    }

    #[test]
    fn display_names_the_store_once_and_no_pool_where_there_is_none() {
        let db = DatabaseHealth {
            server_version: Some("Redis 7.0.15".into()),
            session_state_kept: None,
            ..reachable()
        };
        let none = PoolHealth {
            max_size: u32::MAX,
            ..pool()
        };
        let shown = Health::rate(db, none, renewal()).to_string();
        assert!(shown.contains("store: reachable, Redis 7.0.15,"), "{shown}");
        assert!(!shown.contains("PostgreSQL"), "{shown}");
        assert!(shown.contains("pool: none"), "{shown}");
        assert!(!shown.contains("4294967295"), "{shown}");
    }
}
