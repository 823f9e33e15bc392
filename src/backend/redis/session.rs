//! [`RedisSession`]: a held Redis lock. Renewals and the release run on the
//! lease lane (never behind acquires or listings), each bounded by the time
//! left before the holder's local deadline.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::backend::{LeaseRef, Release, Renewal, Session};
use crate::error::{Error, LostReason, Result};

use super::conn::out_of_time;
use super::{Shared, channel, lock_key, marker_key, meta_key, millis};

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

impl RedisSession {
    /// Runs one script on a lane connection, all within `limit`: taking or
    /// opening the connection, sending, and reading the answer. Past it, the
    /// call fails rather than act later.
    fn run<T: redis::FromRedisValue>(
        &self,
        limit: Duration,
        script: &redis::Script,
        keys: &[String],
        args: &[String],
    ) -> Result<T> {
        let deadline = Instant::now() + limit;
        let mut invocation = script.prepare_invoke();
        for k in keys {
            invocation.key(k);
        }
        for a in args {
            invocation.arg(a);
        }
        let attempt = || -> (Result<T>, bool) {
            let mut conn = match self.shared.lane.take(deadline) {
                Ok(conn) => conn,
                // Said in words (a TLS check, refused credentials).
                Err(e) => return (Err(Error::database(e)), false),
            };
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                self.shared.lane.put(conn);
                return (Err(Error::database(out_of_time())), false);
            }
            let result = conn.call(left, |c| invocation.invoke::<T>(c));
            // A connection that had served before and now failed was most
            // likely closed by the server while idle (a restart): nothing ran.
            let retry = result.as_ref().is_err_and(|e| conn.closed_while_idle(e));
            self.shared.lane.put(conn);
            (result.map_err(Error::database), retry)
        };
        match attempt() {
            (Err(_), true) => attempt().0,
            (result, _) => result,
        }
    }
}

impl Session for RedisSession {
    fn renew(&mut self, lease: &LeaseRef<'_>, ttl: Duration) -> Result<Renewal> {
        let ttl_ms = millis(ttl);
        self.shared.note_ttl(ttl_ms);
        let renewed: i64 = self.run(
            lease.limit,
            &self.shared.renew,
            &[
                lock_key(lease.name),
                meta_key(lease.name),
                marker_key().to_owned(),
            ],
            &[
                self.value.clone(),
                ttl_ms.to_string(),
                self.shared.retain_ms().to_string(),
            ],
        )?;
        Ok(if renewed == 1 {
            Renewal::Renewed
        } else {
            Renewal::Lost(LostReason::NotOwner)
        })
    }

    fn release(self: Box<Self>, lease: &LeaseRef<'_>) -> Result<Release> {
        let released: i64 = self.run(
            lease.limit,
            &self.shared.release,
            &[lock_key(lease.name), meta_key(lease.name)],
            &[
                self.value.clone(),
                channel(lease.name),
                self.shared.retain_ms().to_string(),
            ],
        )?;
        Ok(if released == 1 {
            Release::Released
        } else {
            Release::NotOwner
        })
    }
}
