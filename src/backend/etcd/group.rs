//! Shared leases — readers ([`LeaseKind::Shared`]) and semaphore permits
//! ([`LeaseKind::Permit`]) — in the same queue as exclusive ones.
//!
//! # How they work
//!
//! Every acquire of a name, of any kind, queues one key under the name's
//! prefix, on an etcd lease of its own, with its kind in its value (see
//! [`Record`]); the key's create revision orders the queue and is its
//! fencing token. Whether a key is granted depends only on the keys *ahead*
//! of it (created before it), and those can only go — a new key is always
//! behind — so a decision never has to be taken back:
//!
//! - an **exclusive** key is granted when no key is ahead of it (unchanged:
//!   the holder of a [`Lock`](crate::Lock) is the oldest key);
//! - a **shared** key is granted when every key ahead of it is of its own
//!   kind (readers, or permits of the same count) and, for permits of `n`,
//!   fewer than `n` are ahead. A key ahead that is exclusive — a holder, or a
//!   writer *waiting* — makes it wait: that is writer preference, and readers
//!   arriving after a waiting writer queue behind it. Permits are granted in
//!   arrival order.
//! - A shared key whose oldest key ahead is shared of another kind is
//!   refused ([`LeaseKind::mismatch`]): that key is live (the oldest key is
//!   granted whatever it is). A key of another kind further ahead is one whose
//!   acquirer is being refused in turn: this one waits for it to go.
//!
//! **Why this is safe.** Take any two leases live at once: the newer key's
//! acquirer decided on a read made after its key was written, when the older
//! key — still live now, and a key never comes back — was there, ahead of it.
//! So an exclusive lease is never live with another lease; shared leases live
//! at once are of one kind; and of `n + 1` permits live at once the newest
//! would have seen `n` ahead. Crashes change nothing: a crashed holder's key
//! stays, and counts, until its etcd lease runs out.
//!
//! **Tokens** are create revisions: unique, kept through Raft and restarts.
//! An exclusive lease's token is above that of every lease granted before it
//! (all of them are ahead of it, and gone), and every lease granted after an
//! exclusive one is behind it. Among the shared leases of one group, tokens
//! follow arrival: a waiter that wakes a moment after a newer acquirer was
//! granted at once (both free to go) holds the lower token.
//!
//! **Waiting** never polls: a waiter watches the deletions under the name's
//! prefix from the revision it read, strikes each key ahead as it goes, and
//! reads the queue again only when what is left would grant it (or refuse
//! it), when its own lease needs keeping alive, or when the watch breaks.

use std::time::{Duration, Instant};

use crate::backend::{AcquireRequest, Grant, LeaseKind, Wait};
use crate::error::{Error, Result};

use super::keys::{self, Kv, Record, queue, revision};

use super::watch::{self, Woken};
use super::{Enqueued, EtcdBackend, MIN_REQUEST, Queued, unexpected};

/// What a key of `kind` may do, given the kinds of the keys ahead of it,
/// oldest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decision {
    Granted,
    Wait,
    /// The oldest key ahead is shared of this other kind.
    Mismatch(LeaseKind),
}

pub(crate) fn decide(kind: LeaseKind, ahead: &[LeaseKind]) -> Decision {
    let Some(&oldest) = ahead.first() else {
        return Decision::Granted;
    };
    if kind.is_exclusive() {
        return Decision::Wait;
    }
    if !oldest.is_exclusive() && oldest != kind {
        return Decision::Mismatch(oldest);
    }
    if ahead.iter().any(|&k| k != kind) {
        // An exclusive key (held or waiting), or one of another kind whose
        // acquirer is being refused.
        return Decision::Wait;
    }
    match kind {
        LeaseKind::Permit { permits } if ahead.len() >= permits as usize => Decision::Wait,
        _ => Decision::Granted,
    }
}

/// The keys of one name that are granted, given all its keys: the oldest
/// key, and when it is shared, the keys of its kind that follow it before
/// the first exclusive one (for permits of `n`, the first `n` of them).
/// Sorts `queue` oldest first.
pub(crate) fn holders(queue: &mut [Kv]) -> Vec<(&Kv, LeaseKind)> {
    queue.sort_by_key(|kv| kv.create_revision);
    let mut out: Vec<(&Kv, LeaseKind)> = Vec::new();
    let mut kinds = Vec::with_capacity(queue.len());
    for kv in queue.iter() {
        let kind = Record::parse(kv.value.as_deref()).kind;
        if decide(kind, &kinds) == Decision::Granted {
            out.push((kv, kind));
        } else if kind.is_exclusive() {
            // Nothing behind a waiting exclusive key is granted.
            break;
        }
        kinds.push(kind);
    }
    out
}

impl EtcdBackend {
    /// Acquires a shared lease (see the module's documentation).
    pub(crate) fn acquire_shared(&self, req: &AcquireRequest<'_>) -> Result<Option<Grant>> {
        let shared = &*self.shared;
        let gateway = &shared.gateway;
        let name = req.name();
        let kind = req.kind();
        let prefix = keys::name_prefix(name);
        let renew_every = req.ttl() / 3;
        let mut waited = false;
        let mut _waiting = None;
        let record = Record {
            owner: req.owner().to_owned(),
            metadata: req.metadata().map(str::to_owned),
            at_ms: 0,
            token: 0,
            kind,
        };
        // Each round queues a new key; a waiter whose lease ran out starts
        // again at the back of the queue.
        'queue: loop {
            let Enqueued {
                queued,
                place,
                mut lease_sent,
                answer,
                ranges,
            } = self.enqueue(req, &record, 0)?;
            let (key, mine, lease) = (&place.key, place.mine, place.lease);
            let Some(mut found) = ranges.last().and_then(queue).filter(|_| mine > 0) else {
                return Err(unexpected("the enqueueing transaction", answer));
            };
            let mut read_at = revision(&answer);
            let grant = |queued: Queued<'_>, lease_sent: Instant, waited: bool| {
                place.grant(&self.shared, &record, queued, lease_sent, waited)
            };
            let mut next_keep_alive = lease_sent + renew_every;
            let ttl = req.ttl();
            let bound = |lease_sent: Instant| {
                self.limit(req)
                    .min((lease_sent + ttl).saturating_duration_since(Instant::now()))
            };
            // The first read is the enqueueing transaction's own, made with
            // (or after) its key's creation: without the key it is no answer
            // etcd gives, and queuing again would loop for ever.
            let mut from_txn = true;
            loop {
                // Its own key, as granted; gone when its lease ran out while
                // it could not be kept alive: queue again.
                if !found
                    .iter()
                    .any(|kv| kv.is(key) && kv.create_revision == mine)
                {
                    if from_txn {
                        return Err(unexpected("the enqueueing transaction", answer));
                    }
                    drop(queued);
                    continue 'queue;
                }
                from_txn = false;
                // Every key ahead counts, whatever its bytes or value: one
                // lockbox did not write reads as exclusive and blocks.
                found.retain(|kv| kv.create_revision < mine);
                found.sort_by_key(|kv| kv.create_revision);
                let mut ahead: Vec<(String, LeaseKind)> = found
                    .iter()
                    .map(|kv| (kv.raw_key.clone(), Record::parse(kv.value.as_deref()).kind))
                    .collect();
                let kinds = |ahead: &[(String, LeaseKind)]| -> Vec<LeaseKind> {
                    ahead.iter().map(|(_, k)| *k).collect()
                };
                match decide(kind, &kinds(&ahead)) {
                    Decision::Granted => return Ok(Some(grant(queued, lease_sent, waited))),
                    Decision::Mismatch(live) => {
                        queued.give_up(self.limit(req).min(MIN_REQUEST));
                        return Err(kind.mismatch(live, name));
                    }
                    Decision::Wait => {}
                }
                if req.wait() == Wait::No {
                    queued.give_up(self.limit(req));
                    return Ok(None);
                }
                waited = true;
                _waiting.get_or_insert_with(|| req.waiting());
                let now = Instant::now();
                let give_up_at = match req.wait() {
                    Wait::Until(until) => Some(until),
                    _ => None,
                };
                if give_up_at.is_some_and(|at| at <= now) {
                    queued.give_up(self.limit(req).min(MIN_REQUEST));
                    return Ok(None);
                }
                let until = give_up_at.map_or(next_keep_alive, |at| at.min(next_keep_alive));
                // Watched from the revision after the read: no deletion of a
                // key ahead is missed.
                let Some(watch_from) = read_at.checked_add(1).filter(|_| read_at >= mine) else {
                    return Err(unexpected("a read of the queue", read_at));
                };
                let woken = watch::deletions(gateway, &prefix, watch_from, until, |gone| {
                    let before = ahead.len();
                    ahead.retain(|(k, _)| k != gone);
                    ahead.len() != before && decide(kind, &kinds(&ahead)) != Decision::Wait
                });
                match woken {
                    Woken::Deleted | Woken::TimedOut => {}
                    Woken::Broken(why) => {
                        log::debug!(
                            "lockbox: etcd watch for {name:?} broke ({why}); looking again"
                        );
                        std::thread::sleep(
                            Duration::from_millis(50)
                                .min(until.saturating_duration_since(Instant::now())),
                        );
                    }
                }
                if Instant::now() >= next_keep_alive {
                    let limit = bound(lease_sent);
                    if limit.is_zero() {
                        drop(queued);
                        continue 'queue;
                    }
                    match shared.keep_alive(lease, req.ttl(), limit)? {
                        Some(sent) => {
                            lease_sent = sent;
                            next_keep_alive = sent + renew_every;
                        }
                        None => {
                            drop(queued);
                            continue 'queue;
                        }
                    }
                }
                let limit = bound(lease_sent);
                if limit.is_zero() {
                    drop(queued);
                    continue 'queue;
                }
                // This waiter's key and every key ahead of it.
                let (answer, _) = gateway.call(
                    "/v3/kv/range",
                    &keys::range_of_name(name, false, 0, mine),
                    limit,
                )?;
                read_at = revision(&answer);
                found = match queue(&answer) {
                    Some(found) if read_at >= mine => found,
                    _ => return Err(unexpected("a read of the queue", answer)),
                };
            }
        }
    }
}

/// The revision of the store now, and whether the read worked: where a
/// [`NameWatch`](super::watch::NameWatch) starts.
pub(crate) fn current_revision(backend: &EtcdBackend, prefix: &str) -> Result<i64> {
    let shared = &*backend.shared;
    let (answer, _) = shared.gateway.call(
        "/v3/kv/range",
        &serde_json::json!({
            "key": keys::b64(prefix),
            "range_end": keys::b64(&keys::range_end(prefix)),
            "count_only": true,
        }),
        shared.request_timeout,
    )?;
    match revision(&answer) {
        r if r > 0 => Ok(r),
        _ => Err(Error::database(std::io::Error::other(
            "etcd answered a read without a revision",
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const X: LeaseKind = LeaseKind::Exclusive;
    const R: LeaseKind = LeaseKind::Shared;
    const P2: LeaseKind = LeaseKind::Permit { permits: 2 };
    const P3: LeaseKind = LeaseKind::Permit { permits: 3 };

    #[test]
    fn decisions() {
        use Decision::*;
        for k in [X, R, P2] {
            assert_eq!(decide(k, &[]), Granted);
        }
        assert_eq!(decide(X, &[R]), Wait);
        assert_eq!(decide(R, &[R, R]), Granted);
        // Writer preference: a waiting writer ahead holds new readers back.
        assert_eq!(decide(R, &[R, X]), Wait);
        assert_eq!(decide(R, &[X]), Wait);
        assert_eq!(decide(P2, &[P2]), Granted);
        assert_eq!(decide(P2, &[P2, P2]), Wait);
        assert_eq!(decide(P2, &[P3]), Mismatch(P3));
        assert_eq!(decide(R, &[P2]), Mismatch(P2));
        assert_eq!(decide(P2, &[R, X]), Mismatch(R));
        // Behind an exclusive key, nothing is decided yet.
        assert_eq!(decide(P2, &[X, R]), Wait);
        // A key of another kind that is not the oldest is being refused.
        assert_eq!(decide(P2, &[P2, P3]), Wait);
    }
}
