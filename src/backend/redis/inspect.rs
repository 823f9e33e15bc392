//! `leases()` for Redis: SCAN the name states in batches and read each batch
//! with one script, on a pooled connection taken per batch — a long listing
//! costs two round trips per batch (not per key) and never holds a connection
//! for its whole length.

use std::collections::HashSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::Value;

use crate::error::Result;
use crate::lease_info::{LeaseInfo, LeaseStatus};

use super::{RedisBackend, group_key, holders_key, lock_key, meta_key, tag_kind, unexpected};

const META_PREFIX: &str = "lockbox:meta:";
/// Keys SCAN looks at per call (and at most this many leases per script).
const BATCH: usize = 500;

pub(super) fn leases(b: &RedisBackend, name: Option<&str>) -> Result<Vec<LeaseInfo>> {
    let mut out = Vec::new();
    match name {
        Some(name) => read(b, &[name.to_owned()], &mut out)?,
        None => {
            // SCAN may return a key more than once: the set keeps one.
            let mut seen = HashSet::new();
            let mut cursor: u64 = 0;
            loop {
                let (next, keys): (u64, Vec<Vec<u8>>) = b.with_conn(None, |conn| {
                    conn.run(|c| {
                        redis::cmd("SCAN")
                            .arg(cursor)
                            .arg("MATCH")
                            .arg(format!("{META_PREFIX}*"))
                            .arg("COUNT")
                            .arg(BATCH)
                            .query(c)
                    })
                })?;
                let names: Vec<String> = keys
                    .into_iter()
                    .filter_map(|k| String::from_utf8(k).ok())
                    .filter_map(|k| k.strip_prefix(META_PREFIX).map(str::to_owned))
                    .filter(|n| seen.insert(n.clone()))
                    .collect();
                for chunk in names.chunks(BATCH) {
                    read(b, chunk, &mut out)?;
                }
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Reads the leases of `names` in one script call.
fn read(b: &RedisBackend, names: &[String], out: &mut Vec<LeaseInfo>) -> Result<()> {
    if names.is_empty() {
        return Ok(());
    }
    let mut invocation = b.list.prepare_invoke();
    for name in names {
        invocation
            .key(meta_key(name))
            .key(lock_key(name))
            .key(holders_key(name))
            .key(group_key(name));
    }
    let reply: Vec<Value> = b.with_conn(None, |conn| conn.run(|c| invocation.invoke(c)))?;
    if reply.len() != names.len() {
        return Err(unexpected("a lease listing", reply.len()));
    }
    let now = SystemTime::now();
    for (name, item) in names.iter().zip(reply) {
        lease(name, item, now, out)?;
    }
    Ok(())
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

/// The value of `key` in a flat `[field, value, …]` reply.
fn field_of(fields: &[Value], key: &str) -> Option<String> {
    fields
        .chunks(2)
        .find(|kv| text(&kv[0]).as_deref() == Some(key))
        .and_then(|kv| kv.get(1))
        .and_then(text)
}

/// A time in ms since the epoch, as stored.
fn at_ms(v: Option<String>) -> Option<SystemTime> {
    v.and_then(|s| s.parse::<u64>().ok())
        .and_then(|m| UNIX_EPOCH.checked_add(Duration::from_millis(m)))
}

/// The leases of one name from `{fields, lock value, lock pttl, holders with
/// scores, group fields, server ms}`: its exclusive lease (if one was ever
/// granted and its state is kept), then one per shared holder. Nothing when
/// the name has no state (reclaimed between the SCAN and the read).
fn lease(name: &str, item: Value, now: SystemTime, out: &mut Vec<LeaseInfo>) -> Result<()> {
    let Value::Array(parts) = item else {
        return Err(unexpected("a lease listing (entry)", item));
    };
    let [
        Value::Array(fields),
        held,
        Value::Int(pttl),
        Value::Array(holders),
        Value::Array(group),
        server_ms,
    ] = &parts[..]
    else {
        return Err(unexpected("a lease listing (entry)", parts));
    };
    if field_of(fields, "owner").is_some() {
        out.push(exclusive(name, fields, held, *pttl, now));
    }
    let server_ms: u64 = text(server_ms).and_then(|t| t.parse().ok()).unwrap_or(0);
    let kind = tag_kind(&field_of(group, "kind").unwrap_or_default());
    for pair in holders.chunks(2) {
        let (Some(member), Some(score)) = (
            pair.first().and_then(text),
            pair.get(1)
                .and_then(text)
                .and_then(|s| s.parse::<f64>().ok()),
        ) else {
            continue;
        };
        let Some((token, owner)) = member.split_once('|') else {
            continue;
        };
        let fencing_token: u64 = token.parse().unwrap_or(0);
        let renewed_at = at_ms(field_of(group, &format!("r:{token}"))).unwrap_or(UNIX_EPOCH);
        // The lease's end by the server's clock, as time left from now.
        let left_ms = score - server_ms as f64;
        let (status, expires_at) = if left_ms > 0.0 {
            let left = Duration::from_millis(left_ms as u64);
            (
                LeaseStatus::Held { expires_in: left },
                now.checked_add(left).unwrap_or(now),
            )
        } else {
            let ago = Duration::from_millis((-left_ms) as u64);
            (
                LeaseStatus::Expired { ago },
                now.checked_sub(ago).unwrap_or(now),
            )
        };
        out.push(LeaseInfo {
            name: name.to_owned(),
            owner: owner.to_owned(),
            metadata: field_of(group, &format!("m:{token}")).filter(|m| !m.is_empty()),
            fencing_token,
            holder_pid: 0,
            acquired_at: at_ms(field_of(group, &format!("a:{token}"))).unwrap_or(UNIX_EPOCH),
            renewed_at,
            expires_at,
            holder_alive: matches!(status, LeaseStatus::Held { .. }),
            status,
            kind,
        });
    }
    Ok(())
}

/// The exclusive lease of a name from its state and lock key.
fn exclusive(name: &str, fields: &[Value], held: &Value, pttl: i64, now: SystemTime) -> LeaseInfo {
    let field = |key: &str| field_of(fields, key);
    let ms = |key: &str| at_ms(field(key));
    let token: u64 = field("token").and_then(|t| t.parse().ok()).unwrap_or(0);
    let ours = text(held).is_some_and(|v| v.starts_with(&format!("{token}|")));
    let released_at = ms("released_ms");
    let renewed_at = ms("renewed_ms").unwrap_or(UNIX_EPOCH);
    let (status, expires_at) = match (released_at, ours && pttl > 0) {
        (Some(at), _) => (LeaseStatus::Released { at }, at),
        (None, true) => {
            let left = Duration::from_millis(u64::try_from(pttl).unwrap_or(0));
            (
                LeaseStatus::Held { expires_in: left },
                now.checked_add(left).unwrap_or(now),
            )
        }
        // The key is gone (or another's) without a release: it expired.
        (None, false) => (
            LeaseStatus::Expired {
                ago: now.duration_since(renewed_at).unwrap_or_default(),
            },
            renewed_at,
        ),
    };
    LeaseInfo {
        name: name.to_owned(),
        owner: field("owner").unwrap_or_default(),
        metadata: field("metadata").filter(|m| !m.is_empty()),
        fencing_token: token,
        holder_pid: 0,
        acquired_at: ms("acquired_ms").unwrap_or(UNIX_EPOCH),
        renewed_at,
        expires_at,
        holder_alive: matches!(status, LeaseStatus::Held { .. }),
        status,
        kind: crate::backend::LeaseKind::Exclusive,
    }
}
