//! Waiting for a key to go: an etcd watch on it from a revision, so that a
//! deletion made at any time after that revision is seen, however often the
//! watch is opened again (a failover, a pause to renew the waiter's lease).

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::http::{Gateway, int, list, server_error, text};

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
    let limit = until.saturating_duration_since(Instant::now());
    if limit.is_zero() {
        return Woken::TimedOut;
    }
    let first = gateway.first();
    let request = json!({
        "create_request": {
            "key": key,
            "start_revision": from.to_string(),
            "filters": ["NOPUT"],
        }
    });
    let mut stream = match gateway.watch(&request, limit) {
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
        if let Some(woken) = read(result) {
            return woken;
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
