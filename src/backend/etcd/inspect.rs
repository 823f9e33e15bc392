//! Listing the held locks, and the health check: the members, the leader,
//! and whether the cluster has quorum.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime};

use serde_json::json;

use crate::error::Result;
use crate::health::{ClusterHealth, DatabaseHealth, MemberHealth};
use crate::lease_info::{LeaseInfo, LeaseStatus};

use super::http::{Gateway, int, list, text, uint};
use super::keys::{self, Kv, Record, b64};
use super::{Shared, group};

/// The holders of every name under lockbox's prefix (or of `name`), with the
/// time left on their leases — one entry per holder of a shared name — and
/// names released recently that nobody holds.
pub(crate) fn leases(shared: &Shared, name: Option<&str>) -> Result<Vec<LeaseInfo>> {
    let deadline = Instant::now() + shared.request_timeout;
    let left = || deadline.saturating_duration_since(Instant::now());
    let (locks, released) = match name {
        Some(name) => (keys::name_prefix(name), keys::released_key(name)),
        None => (keys::LOCKS.to_owned(), keys::RELEASED.to_owned()),
    };
    let range = |prefix: &str, whole: bool| {
        let mut r = json!({"key": b64(prefix)});
        if whole {
            r["range_end"] = json!(b64(&keys::range_end(prefix)));
        }
        r
    };
    let (answer, _) = shared
        .gateway
        .call("/v3/kv/range", &range(&locks, true), left())?;
    // Each name's keys, then its holders: the oldest key, and the shared
    // keys granted with it. Every key under a name's prefix counts, as it
    // does for an acquire (one lockbox did not write — bytes that are not
    // UTF-8, a `/` after the name — stands in line): a listing that skipped
    // it would show the readers waiting behind it as holders.
    let Some(all) = keys::queue(&answer) else {
        return Err(super::unexpected("a read of the locks", answer));
    };
    let mut names: BTreeMap<String, Vec<Kv>> = BTreeMap::new();
    for kv in all {
        let Some(decoded) = keys::name_of(&kv) else {
            continue;
        };
        if name.is_some_and(|n| n != decoded) {
            continue;
        }
        names.entry(decoded).or_default().push(kv);
    }
    let now = SystemTime::now();
    let mut out = Vec::new();
    for (lock_name, queue) in &mut names {
        for (kv, kind) in group::holders(queue) {
            let (answer, _) = shared.gateway.call(
                "/v3/lease/timetolive",
                &json!({"ID": kv.lease.to_string()}),
                left(),
            )?;
            let ttl = int(&answer, "TTL");
            if ttl < 0 {
                // The lease ended between the two reads.
                continue;
            }
            let granted = int(&answer, "grantedTTL");
            let expires_in = Duration::from_secs(u64::try_from(ttl).unwrap_or(0));
            let since_renewal =
                Duration::from_secs(u64::try_from(granted.saturating_sub(ttl)).unwrap_or(0));
            let record = Record::parse(kv.value.as_deref());
            out.push(LeaseInfo {
                name: lock_name.clone(),
                owner: record.owner,
                metadata: record.metadata,
                fencing_token: u64::try_from(kv.create_revision).unwrap_or(0),
                holder_pid: 0,
                acquired_at: at(record.at_ms),
                // Numbers no etcd sends (a TTL of centuries) must not panic.
                renewed_at: now.checked_sub(since_renewal).unwrap_or(now),
                expires_at: now.checked_add(expires_in).unwrap_or(now),
                status: LeaseStatus::Held { expires_in },
                holder_alive: true,
                kind,
            });
        }
    }
    let whole = name.is_none();
    let (answer, _) = shared
        .gateway
        .call("/v3/kv/range", &range(&released, whole), left())?;
    for kv in keys::kvs(&answer) {
        let Some(segment) = kv.key.strip_prefix(keys::RELEASED) else {
            continue;
        };
        let Some(decoded) = keys::decode_name(segment) else {
            continue;
        };
        if out.iter().any(|l| l.name == decoded) || name.is_some_and(|n| n != decoded) {
            continue;
        }
        let record = Record::parse(kv.value.as_deref());
        let released_at = at(record.at_ms);
        out.push(LeaseInfo {
            name: decoded,
            owner: record.owner,
            metadata: record.metadata,
            fencing_token: record.token,
            holder_pid: 0,
            acquired_at: released_at,
            renewed_at: released_at,
            expires_at: released_at,
            status: LeaseStatus::Released { at: released_at },
            holder_alive: false,
            kind: record.kind,
        });
    }
    // Stable: a name's holders stay oldest first.
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// [`Backend::force_release`](crate::backend::Backend::force_release): ends
/// every granted lease of `name` and returns the highest token ended.
pub(crate) fn force_release(shared: &Shared, name: &str) -> Result<Option<u64>> {
    let deadline = Instant::now() + shared.request_timeout;
    let left = || deadline.saturating_duration_since(Instant::now());
    let (answer, _) = shared.gateway.call(
        "/v3/kv/range",
        &keys::range_of_name(name, false, 0, 0),
        left(),
    )?;
    let Some(mut queue) = keys::queue(&answer) else {
        return Err(super::unexpected("a read of the queue", answer));
    };
    let mut ended = None;
    for (kv, _) in group::holders(&mut queue) {
        let gone = if kv.lease != 0 && kv.is(&keys::lock_key(name, kv.lease)) {
            // Revoking the lease deletes the key and fails the holder's next
            // keep-alive: it learns of the loss at its next renewal.
            shared.revoke(kv.lease, left())?
        } else {
            // A key lockbox did not write: deleted if it is still the same.
            let txn = json!({
                "compare": [{"key": kv.raw_key, "target": "CREATE", "result": "EQUAL",
                    "create_revision": kv.create_revision.to_string()}],
                "success": [{"request_delete_range": {"key": kv.raw_key}}],
            });
            let (answer, _) = shared.gateway.call("/v3/kv/txn", &txn, left())?;
            keys::txn_answers(&answer).0
        };
        if gone {
            let token = u64::try_from(kv.create_revision).unwrap_or(0);
            ended = ended.max(Some(token));
        }
    }
    Ok(ended)
}

fn at(ms: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(ms)
}

/// The health check, within `timeout` in all: the member list, a
/// linearizable read (quorum), and each member's status (its leader).
pub(crate) fn probe(gateway: &Gateway, timeout: Duration) -> DatabaseHealth {
    let deadline = Instant::now() + timeout;
    let left = || deadline.saturating_duration_since(Instant::now());
    let members = match gateway.call("/v3/cluster/member/list", &json!({}), left() / 3) {
        Ok((answer, _)) => list(&answer, "members").to_vec(),
        Err(e) => return DatabaseHealth::unreachable(e.to_string()),
    };
    let start = Instant::now();
    let quorum = gateway.call(
        "/v3/kv/range",
        &json!({"key": b64("lockbox/health"), "count_only": true}),
        left() / 2,
    );
    let latency = start.elapsed();
    let mut cluster = ClusterHealth {
        quorum: quorum.is_ok(),
        ..ClusterHealth::default()
    };
    let mut version = None;
    let mut leader_ids = Vec::new();
    let count = members.len();
    for (i, m) in members.iter().enumerate() {
        let id = uint(m, "ID");
        // The first of its URLs in the endpoints' scheme: a member
        // advertising both (a TLS rollout) is reached over the one in use.
        let urls: Vec<&str> = list(m, "clientURLs")
            .iter()
            .filter_map(|u| u.as_str())
            .collect();
        let url = urls
            .iter()
            .find(|u| u.to_ascii_lowercase().starts_with("https://") == gateway.over_tls())
            .or(urls.first())
            .map(|u| (*u).to_owned());
        let mut member = MemberHealth {
            name: text(m, "name").unwrap_or_else(|| format!("{id:x}")),
            client_url: url.clone(),
            ..MemberHealth::default()
        };
        let share = left() / u32::try_from(count - i).unwrap_or(1).max(1);
        match url {
            None => member.error = Some("no client URL (not started yet)".to_owned()),
            Some(url) => match gateway.call_at(&url, "/v3/maintenance/status", &json!({}), share) {
                Ok(status) => {
                    member.reachable = true;
                    let leader = uint(&status, "leader");
                    member.is_leader = leader != 0 && leader == id;
                    if leader != 0 {
                        leader_ids.push(leader);
                    }
                    version = version.or_else(|| text(&status, "version"));
                }
                Err(why) => member.error = Some(why),
            },
        }
        cluster.members.push(member);
    }
    let leader_id = leader_ids.first().copied();
    cluster.leader = leader_id.and_then(|l| {
        members
            .iter()
            .position(|m| uint(m, "ID") == l)
            .map(|i| cluster.members[i].name.clone())
    });
    let mut warnings = Vec::new();
    for m in &cluster.members {
        if !m.reachable {
            warnings.push(format!(
                "etcd member {} does not answer: {}",
                m.name,
                m.error.as_deref().unwrap_or("no answer")
            ));
        }
    }
    if leader_ids.iter().any(|l| Some(*l) != leader_id) {
        warnings.push("etcd members disagree on the leader (an election is under way)".to_owned());
    }
    let error = match &quorum {
        Ok(_) => None,
        Err(e) => Some(format!(
            "the etcd cluster has no quorum (a linearizable read failed): nothing can be \
             granted, renewed or released: {e}"
        )),
    };
    DatabaseHealth {
        reachable: true,
        latency: quorum.is_ok().then_some(latency),
        server_version: version.map(|v| format!("etcd {v}")),
        error,
        warnings,
        cluster: Some(cluster),
        ..DatabaseHealth::default()
    }
}
