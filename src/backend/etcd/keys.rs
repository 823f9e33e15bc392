//! Where lockbox keeps its locks in etcd's keyspace, and the requests that
//! read and change them.
//!
//! - `lockbox/lock/<name>/<lease>`: one key per holder or waiter of `<name>`,
//!   attached to its etcd lease (`<lease>`, the lease id in 16 hex digits),
//!   valued with a [`Record`]. The holder is the key with the lowest create
//!   revision under the name; the others wait in create-revision order.
//! - `lockbox/released/<name>`: the last release of `<name>` (a [`Record`]
//!   with its token and time), attached to a client-wide lease of
//!   [`RELEASED_RETENTION`](super::RELEASED_RETENTION) so it goes away by
//!   itself.
//!
//! `<name>` is the lock name with `%` written `%25` and `/` written `%2F`:
//! different names give different keys (the encoding is injective), and no
//! name's keys lie under another's prefix (an encoded name has no `/`), so
//! the keys of `a` never include those of `a/b`.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Value, json};

use super::http::{int, list, text};
use crate::backend::LeaseKind;

pub(crate) const LOCKS: &str = "lockbox/lock/";
pub(crate) const RELEASED: &str = "lockbox/released/";

/// The name as it appears in keys.
pub(crate) fn encode_name(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for c in name.chars() {
        match c {
            '%' => out.push_str("%25"),
            '/' => out.push_str("%2F"),
            c => out.push(c),
        }
    }
    out
}

/// The name a key segment encodes; `None` if it is not one lockbox wrote.
pub(crate) fn decode_name(segment: &str) -> Option<String> {
    let mut out = String::with_capacity(segment.len());
    let mut rest = segment;
    while let Some(at) = rest.find('%') {
        out.push_str(&rest[..at]);
        match rest.get(at..at + 3) {
            Some("%25") => out.push('%'),
            Some("%2F") => out.push('/'),
            _ => return None,
        }
        rest = &rest[at + 3..];
    }
    out.push_str(rest);
    (!segment.contains('/')).then_some(out)
}

/// The prefix of every key of `name`'s holders and waiters.
pub(crate) fn name_prefix(name: &str) -> String {
    format!("{LOCKS}{}/", encode_name(name))
}

/// The key of the holder or waiter of `name` with lease `lease`.
pub(crate) fn lock_key(name: &str, lease: i64) -> String {
    format!("{}{:016x}", name_prefix(name), lease as u64)
}

pub(crate) fn released_key(name: &str) -> String {
    format!("{RELEASED}{}", encode_name(name))
}

/// The end of the range of keys that start with `prefix` (its last byte
/// raised by one: every prefix here ends in `/`).
pub(crate) fn range_end(prefix: &str) -> String {
    let mut bytes = prefix.as_bytes().to_vec();
    if let Some(last) = bytes.last_mut() {
        *last += 1;
    }
    String::from_utf8(bytes).unwrap_or_default()
}

pub(crate) fn b64(s: &str) -> String {
    STANDARD.encode(s.as_bytes())
}

/// A base64 field as text; `None` when missing or not UTF-8.
pub(crate) fn unb64(v: &Value, field: &str) -> Option<String> {
    let raw = v.get(field)?.as_str()?;
    String::from_utf8(STANDARD.decode(raw).ok()?).ok()
}

/// What a lock key (and a release record) holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Record {
    pub owner: String,
    pub metadata: Option<String>,
    /// The client's wall clock at the write, in ms since the Unix epoch.
    pub at_ms: u64,
    /// The fencing token (release records only).
    pub token: u64,
    /// The kind of lease the key stands for. Written only when not
    /// exclusive, so an exclusive key's value is what it always was; a value
    /// without it (an older lockbox's, or one lockbox did not write) reads as
    /// exclusive, the kind that lets nothing else in.
    pub kind: LeaseKind,
}

impl Default for Record {
    fn default() -> Record {
        Record {
            owner: String::new(),
            metadata: None,
            at_ms: 0,
            token: 0,
            kind: LeaseKind::Exclusive,
        }
    }
}

impl Record {
    pub fn to_json(&self) -> String {
        let mut v = json!({
            "owner": self.owner,
            "metadata": self.metadata,
            "at_ms": self.at_ms,
            "token": self.token,
        });
        match self.kind {
            LeaseKind::Shared => v["kind"] = json!("shared"),
            LeaseKind::Permit { permits } => {
                v["kind"] = json!("permit");
                v["permits"] = json!(permits);
            }
            _ => {}
        }
        v.to_string()
    }

    /// Never fails: a value lockbox did not write reads as an empty record
    /// (of an exclusive lease).
    pub fn parse(value: Option<&str>) -> Record {
        let Some(v) = value.and_then(|v| serde_json::from_str::<Value>(v).ok()) else {
            return Record::default();
        };
        let kind = match text(&v, "kind").as_deref() {
            Some("shared") => LeaseKind::Shared,
            // A count that is no count (0, negative, too large) is no
            // semaphore lockbox wrote: exclusive, which blocks every grant.
            Some("permit") => match u32::try_from(int(&v, "permits")) {
                Ok(permits) if permits > 0 => LeaseKind::Permit { permits },
                _ => LeaseKind::Exclusive,
            },
            _ => LeaseKind::Exclusive,
        };
        Record {
            owner: text(&v, "owner").unwrap_or_default(),
            metadata: text(&v, "metadata"),
            at_ms: u64::try_from(int(&v, "at_ms")).unwrap_or(0),
            token: u64::try_from(int(&v, "token")).unwrap_or(0),
            kind,
        }
    }
}

/// One key-value from a range answer.
#[derive(Debug, Clone)]
pub(crate) struct Kv {
    /// The key as text (bytes that are not UTF-8 replaced: see `utf8`).
    pub key: String,
    /// The key exactly as etcd gave it, base64: what identifies it.
    pub raw_key: String,
    /// Whether the key is UTF-8 (lockbox writes only such keys).
    pub utf8: bool,
    pub create_revision: i64,
    pub lease: i64,
    pub value: Option<String>,
}

impl Kv {
    /// `None` when the key is missing or not base64 (not an answer etcd
    /// gives).
    pub fn from_json(v: &Value) -> Option<Kv> {
        let bytes = STANDARD.decode(v.get("key")?.as_str()?).ok()?;
        let raw_key = STANDARD.encode(&bytes);
        let (key, utf8) = match String::from_utf8(bytes) {
            Ok(key) => (key, true),
            Err(e) => (String::from_utf8_lossy(e.as_bytes()).into_owned(), false),
        };
        Some(Kv {
            key,
            raw_key,
            utf8,
            create_revision: int(v, "create_revision"),
            lease: int(v, "lease"),
            value: unb64(v, "value"),
        })
    }

    /// Whether this is `key`, byte for byte.
    pub fn is(&self, key: &str) -> bool {
        self.utf8 && self.key == key
    }
}

/// The name whose queue `kv` stands in: the segment after
/// `lockbox/lock/` up to the next `/`, whatever follows it (a key lockbox did
/// not write counts in that name's queue, as an acquire's range read counts
/// it). `None` for a key under no name's prefix.
pub(crate) fn name_of(kv: &Kv) -> Option<String> {
    let bytes = STANDARD.decode(&kv.raw_key).ok()?;
    let rest = bytes.strip_prefix(LOCKS.as_bytes())?;
    let end = rest.iter().position(|&b| b == b'/')?;
    decode_name(std::str::from_utf8(&rest[..end]).ok()?)
}

/// The key-values of a range answer (`kvs`) that lockbox could have written,
/// skipping any whose key is not UTF-8 (for listings only: in a queue every
/// key counts, see [`queue`]).
pub(crate) fn kvs(range: &Value) -> Vec<Kv> {
    list(range, "kvs")
        .iter()
        .filter_map(Kv::from_json)
        .filter(|kv| kv.utf8)
        .collect()
}

/// Every key-value of a range answer, whatever its key's bytes: a name's
/// queue, where a key lockbox did not write still stands in line. `None`
/// when one cannot be read at all (a malformed answer).
pub(crate) fn queue(range: &Value) -> Option<Vec<Kv>> {
    list(range, "kvs").iter().map(Kv::from_json).collect()
}

/// The store revision an answer was read at.
pub(crate) fn revision(answer: &Value) -> i64 {
    answer.get("header").map_or(0, |h| int(h, "revision"))
}

/// A range request for the keys of `name`, oldest first or newest first, at
/// most `limit`, created at or before `max_create_revision` (0: any).
pub(crate) fn range_of_name(name: &str, newest_first: bool, limit: i64, max_create: i64) -> Value {
    let prefix = name_prefix(name);
    let mut r = json!({
        "key": b64(&prefix),
        "range_end": b64(&range_end(&prefix)),
        "sort_order": if newest_first { "DESCEND" } else { "ASCEND" },
        "sort_target": "CREATE",
        "limit": limit.to_string(),
    });
    if max_create > 0 {
        r["max_create_revision"] = json!(max_create.to_string());
    }
    r
}

/// The transaction that queues `key` (with `value`, on `lease`) unless it is
/// there already, and reads the `oldest` oldest keys of `name` (0: all of
/// them): its own first in the answer when it took the lock. Sent twice (a
/// failover after an answer was lost), the second finds the key there and
/// reads it (and the name's keys, newer ones included).
pub(crate) fn enqueue(name: &str, key: &str, value: &str, lease: i64, oldest: i64) -> Value {
    let k = b64(key);
    json!({
        "compare": [{"key": k, "target": "CREATE", "result": "EQUAL", "create_revision": "0"}],
        "success": [
            {"request_put": {"key": k, "value": b64(value), "lease": lease.to_string()}},
            {"request_range": range_of_name(name, false, oldest, 0)},
        ],
        "failure": [
            {"request_range": {"key": k}},
            {"request_range": range_of_name(name, false, oldest, 0)},
        ],
    })
}

/// The transaction that ends the hold of `key` if it is still the one created
/// at `token`: deletes it and writes the release record on `record_lease`
/// (none without one). Otherwise reads the release record (a resent release
/// finds its own there).
pub(crate) fn release(
    name: &str,
    key: &str,
    token: u64,
    record: &str,
    record_lease: Option<i64>,
) -> Value {
    let k = b64(key);
    let mut success = vec![json!({"request_delete_range": {"key": k}})];
    if let Some(lease) = record_lease {
        success.push(json!({"request_put": {
            "key": b64(&released_key(name)),
            "value": b64(record),
            "lease": lease.to_string(),
        }}));
    }
    json!({
        "compare": [{"key": k, "target": "CREATE", "result": "EQUAL", "create_revision": token.to_string()}],
        "success": success,
        "failure": [
            {"request_range": {"key": b64(&released_key(name))}},
        ],
    })
}

/// The answers of a transaction: whether it took its success branch, and the
/// range answers of its branch in order (other answers as `Null`).
pub(crate) fn txn_answers(answer: &Value) -> (bool, Vec<Value>) {
    let succeeded = answer.get("succeeded").and_then(Value::as_bool) == Some(true);
    let ranges = list(answer, "responses")
        .iter()
        .map(|r| r.get("response_range").cloned().unwrap_or(Value::Null))
        .collect();
    (succeeded, ranges)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_encode_injectively_and_prefix_free() {
        let names = ["a", "a/b", "a%2Fb", "a%b", "%", "/", "a/", "é/%/x"];
        let encoded: Vec<String> = names.iter().map(|n| name_prefix(n)).collect();
        for (i, a) in encoded.iter().enumerate() {
            for (j, b) in encoded.iter().enumerate() {
                if i != j {
                    assert!(!b.starts_with(a.as_str()), "{a} is a prefix of {b}");
                }
            }
        }
        for n in names {
            assert_eq!(decode_name(&encode_name(n)).as_deref(), Some(n));
        }
        assert_eq!(range_end("lockbox/lock/a/"), "lockbox/lock/a0");
    }

    #[test]
    fn records_round_trip_and_never_fail() {
        let r = Record {
            owner: "o".into(),
            metadata: Some("m".into()),
            at_ms: 5,
            token: 9,
            kind: LeaseKind::Exclusive,
        };
        assert_eq!(Record::parse(Some(&r.to_json())), r);
        // An exclusive key's value is what it always was: no kind in it.
        assert!(!r.to_json().contains("kind"));
        for kind in [LeaseKind::Shared, LeaseKind::Permit { permits: 7 }] {
            let r = Record { kind, ..r.clone() };
            assert_eq!(Record::parse(Some(&r.to_json())), r);
        }
        // A count no lockbox writes reads as exclusive: it blocks.
        let bad = r#"{"owner":"o","kind":"permit","permits":0}"#;
        assert_eq!(Record::parse(Some(bad)).kind, LeaseKind::Exclusive);
        assert_eq!(Record::parse(Some("not json")), Record::default());
        assert_eq!(Record::parse(None), Record::default());
    }
}
