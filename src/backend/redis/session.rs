//! [`RedisSession`]: a held Redis lock; and the renewal of all the locks of a
//! client together ([`SharedSession`] for [`Shared`]). Renewals and releases
//! run on the lease lane (never behind acquires or listings), each request
//! bounded by the time left before the holder's local deadline — for a request
//! carrying several leases, the least time any of them has left.
//!
//! A round of renewals is one pipeline of the `RENEW` script's `EVALSHA`, one
//! per lease, written at once and answered in order: one round trip however
//! many locks are held. Each renewal runs, checks and fails on its own, exactly
//! as it would alone: a lease taken over, or a key of the wrong type, ends
//! that one lease's renewal and no other's.

use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::{RedisError, ServerErrorKind, Value};

use crate::backend::{LeaseRef, Release, Renewal, Session, SharedSession};
use crate::error::{Error, LostReason, Result};

use super::conn::out_of_time;
use super::{
    Shared, channel, group_key, holders_key, lock_key, marker_key, meta_key, millis, unexpected,
};

/// A script the lease lane runs: its text, for `SCRIPT LOAD`, and its SHA1,
/// for `EVALSHA`.
pub(crate) struct LaneScript {
    code: &'static str,
    hash: String,
}

impl LaneScript {
    pub fn new(code: &'static str) -> LaneScript {
        LaneScript {
            code,
            hash: redis::Script::new(code).get_hash().to_owned(),
        }
    }

    /// Appends `EVALSHA` of this script with `call`'s keys and arguments.
    fn evalsha(&self, call: &Call, out: &mut Vec<u8>) {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(&self.hash).arg(call.keys.len());
        for key in &call.keys {
            cmd.arg(key);
        }
        for arg in &call.args {
            cmd.arg(arg);
        }
        cmd.write_packed_command(out);
    }

    /// Appends `SCRIPT LOAD` of this script.
    fn load(&self, out: &mut Vec<u8>) {
        redis::cmd("SCRIPT")
            .arg("LOAD")
            .arg(self.code)
            .write_packed_command(out);
    }
}

/// One run of a lane script: its keys and arguments.
struct Call {
    keys: Vec<String>,
    args: Vec<String>,
}

/// Whether the server answered that it does not know the script: the call
/// did not run.
fn is_noscript(reply: &std::result::Result<Value, RedisError>) -> bool {
    matches!(reply, Ok(Value::ServerError(e)) if e.kind() == Some(ServerErrorKind::NoScript))
}

impl Shared {
    /// Runs `script` once for each of `calls`, in one round trip on a lane
    /// connection, all within `limit` — taking or opening the connection
    /// included: past it, it fails rather than act later. One result per call,
    /// in order: the script's reply, or (an error reply from the server, or no
    /// reply by the deadline or before the connection failed) an error, the
    /// call's outcome then being unknown. `Err` as a whole: no reply came.
    ///
    /// A connection that had served before and fails before any reply came was
    /// most likely closed by the server while idle (a restart): nothing ran,
    /// and all of it is sent once more on a new one (the lane's other idle
    /// connections are most likely dead too, and are closed). Calls answered
    /// `NOSCRIPT` (the server's script cache was flushed, or it restarted) did
    /// not run: they are sent once more, behind a `SCRIPT LOAD`, in one more
    /// round trip on the same connection.
    fn run_all(
        &self,
        limit: Duration,
        script: &LaneScript,
        calls: &[Call],
    ) -> Result<Vec<Result<Value>>> {
        if calls.is_empty() {
            return Ok(Vec::new());
        }
        let deadline = Instant::now() + limit;
        let mut packed = Vec::new();
        for call in calls {
            script.evalsha(call, &mut packed);
        }
        let mut conn = self.lane.take(deadline).map_err(Error::database)?;
        let (mut replies, mut failed) = conn.pipeline(deadline, &packed, calls.len());
        if replies.is_empty() && failed.as_ref().is_some_and(|e| conn.closed_while_idle(e)) {
            self.lane.discard_idle();
            conn = self.lane.take(deadline).map_err(Error::database)?;
            (replies, failed) = conn.pipeline(deadline, &packed, calls.len());
        }
        if replies.is_empty()
            && let Some(e) = failed
        {
            self.lane.put(conn);
            return Err(Error::database(e));
        }
        // One answer per call: its reply, or why none came.
        let mut answers: Vec<std::result::Result<Value, RedisError>> =
            replies.into_iter().map(Ok).collect();
        answers.resize_with(calls.len(), || {
            Err(failed.clone().unwrap_or_else(out_of_time))
        });
        let missing: Vec<usize> = (0..calls.len())
            .filter(|&i| is_noscript(&answers[i]))
            .collect();
        // On a connection still in step only (every reply read).
        if !missing.is_empty() && failed.is_none() {
            let mut again = Vec::new();
            script.load(&mut again);
            for &i in &missing {
                script.evalsha(&calls[i], &mut again);
            }
            let (replies, failed) = conn.pipeline(deadline, &again, missing.len() + 1);
            // The load's own reply is skipped: a refused load shows in the
            // calls' replies (`NOSCRIPT` again), which then fail with it.
            let mut replies = replies.into_iter().skip(1);
            for &i in &missing {
                answers[i] = match replies.next() {
                    Some(reply) => Ok(reply),
                    None => Err(failed.clone().unwrap_or_else(out_of_time)),
                };
            }
        }
        self.lane.put(conn);
        Ok(answers
            .into_iter()
            .map(|answer| match answer {
                Ok(Value::ServerError(e)) => Err(Error::database(RedisError::from(e))),
                Ok(reply) => Ok(reply),
                Err(e) => Err(Error::database(e)),
            })
            .collect())
    }

    /// Renews each of `leases` — (name, `token|owner`, TTL) — in one round
    /// trip within `limit`; see [`run_all`](Self::run_all).
    fn renew_each(
        &self,
        leases: impl Iterator<Item = (String, String, Duration)>,
        limit: Duration,
    ) -> Result<Vec<Result<Renewal>>> {
        let retain = self.retain_ms().to_string();
        let calls: Vec<Call> = leases
            .map(|(name, value, ttl)| {
                let ttl_ms = millis(ttl);
                self.note_ttl(ttl_ms);
                Call {
                    keys: vec![
                        lock_key(&name),
                        meta_key(&name),
                        marker_key().to_owned(),
                        holders_key(&name),
                        group_key(&name),
                    ],
                    args: vec![value, ttl_ms.to_string(), retain.clone()],
                }
            })
            .collect();
        let replies = self.run_all(limit, &self.renew, &calls)?;
        Ok(replies
            .into_iter()
            .map(|reply| match reply? {
                Value::Int(1) => Ok(Renewal::Renewed),
                Value::Int(0) => Ok(Renewal::Lost(LostReason::NotOwner)),
                other => Err(unexpected("a renewal", other)),
            })
            .collect())
    }
}

/// Every lock of a client shares its [`Shared`], so the client renews them
/// all in one request per round.
impl SharedSession for Shared {
    fn renew_all(
        &self,
        leases: &[(LeaseRef<'_>, Duration)],
        limit: Duration,
    ) -> Result<Vec<Result<Renewal>>> {
        let limit = leases
            .iter()
            .map(|(l, _)| l.limit)
            .fold(limit, Duration::min);
        self.renew_each(
            leases.iter().map(|(lease, ttl)| {
                (
                    lease.name.to_owned(),
                    format!("{}|{}", lease.token, lease.owner),
                    *ttl,
                )
            }),
            limit,
        )
    }
}

pub(crate) struct RedisSession {
    pub shared: Arc<Shared>,
    /// What the lock key holds while it is ours: `token|owner`.
    pub value: String,
}

impl std::fmt::Debug for RedisSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSession")
            .field("value", &self.value)
            .finish()
    }
}

/// The only answer to a request of one call.
fn only<T>(mut answers: Vec<Result<T>>) -> Result<T> {
    match (answers.pop(), answers.is_empty()) {
        (Some(answer), true) => answer,
        _ => Err(unexpected(
            "a request of one call",
            format!("{} answers", answers.len() + 1),
        )),
    }
}

impl Session for RedisSession {
    /// A round of renewals of this one lease.
    fn renew(&mut self, lease: &LeaseRef<'_>, ttl: Duration) -> Result<Renewal> {
        only(self.shared.renew_each(
            std::iter::once((lease.name.to_owned(), self.value.clone(), ttl)),
            lease.limit,
        )?)
    }

    fn release(self: Box<Self>, lease: &LeaseRef<'_>) -> Result<Release> {
        let call = Call {
            keys: vec![
                lock_key(lease.name),
                meta_key(lease.name),
                holders_key(lease.name),
                group_key(lease.name),
            ],
            args: vec![
                self.value.clone(),
                channel(lease.name),
                self.shared.retain_ms().to_string(),
            ],
        };
        let reply = only(
            self.shared
                .run_all(lease.limit, &self.shared.release, &[call])?,
        )?;
        match reply {
            Value::Int(1) => Ok(Release::Released),
            Value::Int(0) => Ok(Release::NotOwner),
            Value::Int(2) => Ok(Release::WasExpired),
            other => Err(unexpected("a release", other)),
        }
    }

    /// The client's [`Shared`]: the same for every lock of the client.
    fn shared(&self) -> Option<Arc<dyn SharedSession>> {
        Some(self.shared.clone())
    }
}
