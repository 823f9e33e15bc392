//! Health probes and lease listings for the PostgreSQL backend.

use std::collections::HashSet;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use postgres::NoTls;

use super::key::split;
use super::sql::Sql;
use super::{db_error, keeps_session};
use crate::error::Result;
use crate::health::DatabaseHealth;
use crate::lease_info::{LeaseInfo, LeaseStatus};

/// Probes the database on a connection of its own, on a helper thread, so a hung
/// server cannot hold the caller past `timeout`. A probe still running then is
/// abandoned; it ends by itself within the connect and TCP timeouts.
pub(crate) fn probe(config: &postgres::Config, timeout: Duration) -> DatabaseHealth {
    let (tx, rx) = crossbeam_channel::bounded(1);
    let config = config.clone();
    let spawned = thread::Builder::new()
        .name("lockbox-health".to_owned())
        .spawn(move || {
            let _ = tx.send(probe_now(&config));
        });
    if let Err(e) = spawned {
        return DatabaseHealth::unreachable(format!("could not start the probe thread: {e}"));
    }
    rx.recv_timeout(timeout)
        .unwrap_or_else(|_| DatabaseHealth::unreachable(format!("no answer within {timeout:?}")))
}

fn probe_now(config: &postgres::Config) -> DatabaseHealth {
    let mut client = match config.connect(NoTls) {
        Ok(client) => client,
        Err(e) => return DatabaseHealth::unreachable(e.to_string()),
    };
    let start = Instant::now();
    let version: String = match client.query_one("SELECT current_setting('server_version')", &[]) {
        Ok(row) => row.get(0),
        Err(e) => return DatabaseHealth::unreachable(e.to_string()),
    };
    let latency = start.elapsed();
    DatabaseHealth {
        reachable: true,
        latency: Some(latency),
        server_version: Some(version),
        session_state_kept: keeps_session(&mut client, config).ok(),
        error: None,
        listener_alive: None,
        writable: None,
        warnings: Vec::new(),
    }
}

/// Lists leases, with whether each holder's session still holds its advisory lock.
pub(crate) fn leases(
    client: &mut postgres::Client,
    sql: &Sql,
    name: Option<&str>,
    key_fn: fn(&str) -> i64,
) -> Result<Vec<LeaseInfo>> {
    let rows = client.query(&sql.leases, &[&name]).map_err(db_error)?;
    // (pid, key1, key2) of every two-int4 advisory lock held in this database.
    let held: HashSet<(i32, i32, i32)> = client
        .query(
            "SELECT pid, classid::text::int8::bit(32)::int4, objid::text::int8::bit(32)::int4 \
             FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 2 \
               AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            &[],
        )
        .map_err(db_error)?
        .iter()
        .filter_map(|r| Some((r.try_get(0).ok()?, r.try_get(1).ok()?, r.try_get(2).ok()?)))
        .collect();
    Ok(rows
        .iter()
        .map(|r| {
            let name: String = r.get(0);
            let holder_pid: i32 = r.get(4);
            let released_at: Option<f64> = r.get(8);
            let expires_in_ms: i64 = r.get(9);
            let status = match released_at {
                Some(at) => LeaseStatus::Released { at: epoch(at) },
                None if expires_in_ms > 0 => LeaseStatus::Held {
                    expires_in: Duration::from_millis(expires_in_ms as u64),
                },
                None => LeaseStatus::Expired {
                    ago: Duration::from_millis(expires_in_ms.unsigned_abs()),
                },
            };
            LeaseInfo {
                holder_alive: {
                    let (k1, k2) = split(key_fn(&name));
                    held.contains(&(holder_pid, k1, k2))
                },
                owner: r.get(1),
                metadata: r.get(2),
                fencing_token: r.get::<_, i64>(3) as u64,
                holder_pid,
                acquired_at: epoch(r.get(5)),
                renewed_at: epoch(r.get(6)),
                expires_at: epoch(r.get(7)),
                status,
                name,
            }
        })
        .collect())
}

fn epoch(secs: f64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs_f64(secs.max(0.0))
}
