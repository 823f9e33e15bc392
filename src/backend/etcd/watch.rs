//! Waiting for a key to go: an etcd watch on it from a revision, so that a
//! deletion made at any time after that revision is seen, however often the
//! watch is opened again (a failover, a pause to renew the waiter's lease).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use serde_json::{Value, json};

use super::http::{Gateway, int, list, server_error, text};
use crate::backend::Watch;

/// How a wait for a deletion ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Woken {
    /// The key was deleted (or was gone already at the revision).
    Deleted,
    /// `until` came first.
    TimedOut,
    /// The watch could not be kept (the member went away, the revision was
    /// compacted, the server cancelled it): look again.
    Broken(String),
}

/// Waits until `key` (base64, as etcd gave it) is deleted at a revision from `from` on, or until
/// `until`, whichever comes first. Never polls: one watch stream, read until
/// an answer comes or the time runs out.
pub(crate) fn deletion(gateway: &Gateway, key: &str, from: i64, until: Instant) -> Woken {
    let request = json!({
        "create_request": {
            "key": key,
            "start_revision": from.to_string(),
            "filters": ["NOPUT"],
        }
    });
    watch_until(gateway, &request, until, |_| true)
}

/// Waits, from revision `from` on, for deletions of keys under `prefix`
/// until `enough` (given each deleted key, base64 as etcd gives it) says
/// they make a difference, or until `until`. For a shared waiter: the keys
/// ahead of it can only go (a new key is always behind it), so it counts
/// their deletions itself and looks again only once it may be granted — one
/// watch, no read per release of a holder it still waits behind.
pub(crate) fn deletions(
    gateway: &Gateway,
    prefix: &str,
    from: i64,
    until: Instant,
    mut enough: impl FnMut(&str) -> bool,
) -> Woken {
    let request = json!({
        "create_request": {
            "key": super::keys::b64(prefix),
            "range_end": super::keys::b64(&super::keys::range_end(prefix)),
            "start_revision": from.to_string(),
            "filters": ["NOPUT"],
        }
    });
    watch_until(gateway, &request, until, |events| {
        // Every event is seen, even after one that is enough.
        let mut done = false;
        for e in events {
            if text(e, "type").as_deref() == Some("DELETE")
                && let Some(key) = e
                    .get("kv")
                    .and_then(|kv| kv.get("key"))
                    .and_then(Value::as_str)
            {
                done |= enough(key);
            }
        }
        done
    })
}

/// One watch stream for `request`, read until `woken` says the deletions of
/// an answer are enough, or until `until`.
fn watch_until(
    gateway: &Gateway,
    request: &Value,
    until: Instant,
    mut woken: impl FnMut(&[Value]) -> bool,
) -> Woken {
    let limit = until.saturating_duration_since(Instant::now());
    if limit.is_zero() {
        return Woken::TimedOut;
    }
    let first = gateway.first();
    let mut stream = match gateway.watch(request, limit) {
        Ok(stream) => stream,
        Err(_) if Instant::now() >= until => return Woken::TimedOut,
        Err(why) => return Woken::Broken(why),
    };
    loop {
        let answer = match stream.next() {
            Ok(answer) => answer,
            Err(_) if Instant::now() + Duration::from_millis(1) >= until => {
                return Woken::TimedOut;
            }
            Err(why) => {
                gateway.skip(first);
                return Woken::Broken(why);
            }
        };
        let result = answer.get("result").unwrap_or(&answer);
        if let Some((_, message)) = server_error(&answer) {
            gateway.skip(first);
            return Woken::Broken(message);
        }
        match read(result) {
            Some(Woken::Deleted) if woken(list(result, "events")) => return Woken::Deleted,
            Some(Woken::Deleted) => {}
            Some(other) => return other,
            None => {}
        }
    }
}

/// What one watch answer says: `None` for one that changes nothing (the
/// watch's creation, progress).
fn read(result: &Value) -> Option<Woken> {
    if list(result, "events")
        .iter()
        .any(|e| text(e, "type").as_deref() == Some("DELETE"))
    {
        return Some(Woken::Deleted);
    }
    if result.get("canceled").and_then(Value::as_bool) == Some(true) {
        let compacted = int(result, "compact_revision");
        return Some(Woken::Broken(if compacted > 0 {
            format!("the revision watched from was compacted (at {compacted})")
        } else {
            text(result, "cancel_reason").unwrap_or_else(|| "the watch was cancelled".to_owned())
        }));
    }
    None
}

/// How long one stream of a [`NameWatch`] is kept open before it is opened
/// again (from the revision it had reached, so nothing is missed): also how
/// long its thread may outlive the watch when nothing happens, since a
/// blocked read of the stream cannot be interrupted. Short, so dropped
/// watches (an election watched and unwatched in a loop) do not pile up
/// threads and open streams; reopening costs one watch creation, no read of
/// the keys.
const NAME_STREAM: Duration = Duration::from_secs(3);

/// A watch on every key of a name ([`Backend::watch`](crate::backend::Backend::watch)):
/// a thread reads an etcd watch stream on the name's prefix, from the
/// revision read when the watch began, and wakes [`Watch::wait`] on every
/// change of a key of the name (a grant, a release, a lease's end, a waiter
/// queuing or giving up: spurious wakes are allowed, missed ones are not).
/// A stream that ends or breaks is opened again from the revision after the
/// last event seen; a revision compacted meanwhile wakes the watcher (a change
/// may have been missed). When no stream can be opened for the request
/// timeout, `wait` reports the error and the watch ends.
pub(crate) struct NameWatch {
    rx: Receiver<std::result::Result<(), String>>,
    stop: Arc<AtomicBool>,
}

impl std::fmt::Debug for NameWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NameWatch").finish_non_exhaustive()
    }
}

impl NameWatch {
    /// Watches `prefix` from revision `from` on.
    pub fn start(
        gateway: Gateway,
        prefix: String,
        from: i64,
        give_up_after: Duration,
    ) -> crate::Result<NameWatch> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        std::thread::Builder::new()
            .name("lockbox-etcd-watch".to_owned())
            .spawn(move || follow(&gateway, &prefix, from, give_up_after, &stopped, &tx))
            .map_err(crate::Error::database)?;
        Ok(NameWatch { rx, stop })
    }
}

impl Drop for NameWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl Watch for NameWatch {
    fn wait(&mut self, until: Instant) -> crate::Result<bool> {
        let woken = match self.rx.recv_deadline(until) {
            Ok(woken) => woken,
            Err(RecvTimeoutError::Timeout) => return Ok(false),
            Err(RecvTimeoutError::Disconnected) => Err("the watch thread ended".to_owned()),
        };
        // Wakes queued meanwhile are one wake: the caller reads afresh.
        let mut broken = woken.err();
        while let Ok(next) = self.rx.try_recv() {
            if let Err(why) = next {
                broken = Some(why);
            }
        }
        match broken {
            None => Ok(true),
            Some(why) => Err(crate::Error::database(std::io::Error::other(format!(
                "the etcd watch broke: {why}"
            )))),
        }
    }
}

/// The thread of a [`NameWatch`]: until the watch is dropped or no stream
/// can be had for `give_up_after`.
fn follow(
    gateway: &Gateway,
    prefix: &str,
    mut from: i64,
    give_up_after: Duration,
    stop: &AtomicBool,
    tx: &Sender<std::result::Result<(), String>>,
) {
    let mut failing_since: Option<Instant> = None;
    while !stop.load(Ordering::Relaxed) {
        let request = json!({
            "create_request": {
                "key": super::keys::b64(prefix),
                "range_end": super::keys::b64(&super::keys::range_end(prefix)),
                "start_revision": from.to_string(),
            }
        });
        let first = gateway.first();
        let mut stream = match gateway.watch(&request, NAME_STREAM) {
            Ok(stream) => stream,
            Err(why) => {
                let since = *failing_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= give_up_after {
                    let _ = tx.send(Err(why));
                    return;
                }
                // Not a hot loop against a member that refuses at once.
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        // Until the stream ends, breaks or runs its time: then it is opened
        // again from `from`.
        while let Ok(answer) = stream.next() {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            if server_error(&answer).is_some() {
                gateway.skip(first);
                break;
            }
            let result = answer.get("result").unwrap_or(&answer);
            failing_since = None;
            let events = list(result, "events");
            for e in events {
                let at = e.get("kv").map_or(0, |kv| int(kv, "mod_revision"));
                from = from.max(at.saturating_add(1));
            }
            let compacted = int(result, "compact_revision");
            if compacted > 0 {
                // Changes up to the compaction cannot be read: one may have
                // been missed, so wake; go on from what is left.
                from = from.max(compacted);
            }
            if (!events.is_empty() || compacted > 0) && tx.send(Ok(())).is_err() {
                return;
            }
            if result.get("canceled").and_then(Value::as_bool) == Some(true) {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers() {
        let created: Value = serde_json::from_str(r#"{"header":{},"created":true}"#).unwrap();
        assert_eq!(read(&created), None);
        let deleted: Value = serde_json::from_str(
            r#"{"header":{},"events":[{"type":"DELETE","kv":{"key":"eA=="}}]}"#,
        )
        .unwrap();
        assert_eq!(read(&deleted), Some(Woken::Deleted));
        let compacted: Value =
            serde_json::from_str(r#"{"canceled":true,"compact_revision":"7"}"#).unwrap();
        assert!(matches!(read(&compacted), Some(Woken::Broken(_))));
    }
}
