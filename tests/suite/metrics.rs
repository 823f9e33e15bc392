//! Exact metrics and events after a scripted sequence of operations, and valid
//! Prometheus text.

use crate::common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use common::*;
use lockbox::{
    AcquiredEvent, HandleEvent, LockClient, LostEvent, LostReason, MetricsSnapshot, ReleasedEvent,
    RenewedEvent, advisory_key,
};

#[derive(Debug, Default, Clone)]
struct Recorder(Arc<Mutex<Vec<String>>>);

impl Recorder {
    fn push(&self, e: String) {
        self.0.lock().unwrap().push(e);
    }
    fn count(&self, prefix: &str) -> usize {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e.starts_with(prefix))
            .count()
    }
}

impl HandleEvent for Recorder {
    fn handle_acquired(&self, e: &AcquiredEvent) {
        self.push(format!("acquired {} {}", e.name(), e.fencing_token()));
    }
    fn handle_released(&self, e: &ReleasedEvent) {
        self.push(format!("released {} {}", e.name(), e.fencing_token()));
    }
    fn handle_renewed(&self, e: &RenewedEvent) {
        self.push(format!("renewed {} {}", e.name(), e.fencing_token()));
    }
    fn handle_lost(&self, e: &LostEvent) {
        self.push(format!("lost {} {:?}", e.name(), e.reason()));
    }
}

/// Runs the script; returns the client's metrics. A 30 s TTL keeps background
/// renewals (every 10 s) out of the picture: renewals here are `extend` calls.
fn scripted(events: Recorder) -> (LockClient, MetricsSnapshot) {
    let app = unique("metrics");
    let client = builder_for(&app)
        .ttl(ms(30_000))
        .event_handler(events)
        .build()
        .unwrap();
    let (other, _) = common::client(ms(30_000));
    let (a, b, c, z) = (unique("m-a"), unique("m-b"), unique("m-c"), unique("m-z"));

    let lock_a = client.try_lock(&a).unwrap().unwrap(); // acquired 1
    let held_b = other.try_lock(&b).unwrap().unwrap();
    assert!(client.try_lock(&b).unwrap().is_none()); // contended 1
    assert!(client.lock_timeout(&b, ms(150)).unwrap_err().is_timeout()); // timeout 1
    assert!(client.try_lock("").is_err()); // error 1
    lock_a.extend(ms(30_000)).unwrap(); // renewal ok 1
    lock_a.extend(ms(30_000)).unwrap(); // renewal ok 2
    lock_a.release().unwrap(); // release ok 1
    drop(held_b);

    let lock_c = client.try_lock(&c).unwrap().unwrap(); // acquired 2
    terminate(holder_pid(&c));
    assert!(lock_c.extend(ms(30_000)).unwrap_err().is_lock_lost()); // renewal failed 1, lost 1
    assert_eq!(lock_c.lost().try_recv(), Ok(LostReason::SessionLost));
    assert!(lock_c.release().is_err()); // release failed 1

    let mut zombie = admin();
    let (k1, k2) = advisory_key(&z);
    zombie
        .execute("SELECT pg_advisory_lock($1, $2)", &[&k1, &k2])
        .unwrap();
    fake_lease(&z, 9, -10, pid_of(&mut zombie));
    let lock_z = client.try_lock(&z).unwrap().unwrap(); // acquired 3, zombie 1
    drop(lock_z); // release ok 2
    (client.clone(), client.metrics())
}

#[test]
fn counters_histograms_and_events_match_the_operations() {
    let events = Recorder::default();
    let (_client, m) = scripted(events.clone());
    assert_eq!(m.acquire_attempts, 6);
    assert_eq!(m.acquired, 3);
    assert_eq!(m.contended, 1);
    assert_eq!(m.timeouts, 1);
    assert_eq!(m.acquire_errors, 1);
    assert_eq!(
        m.acquire_attempts,
        m.acquired + m.contended + m.timeouts + m.acquire_errors
    );
    assert_eq!(m.renewals_ok, 2);
    assert_eq!(m.renewals_failed, 1);
    assert_eq!(m.lost(LostReason::SessionLost), 1);
    assert_eq!(m.lost_total(), 1);
    assert_eq!(m.releases_ok, 2);
    assert_eq!(m.releases_failed, 1);
    assert_eq!(m.zombie_terminations, 1);
    assert_eq!(m.locks_held, 0);
    assert_eq!(m.acquires_waiting, 0);
    // Histograms count exactly the operations that fall under them.
    assert_eq!(m.acquire_latency.count, 3, "three free acquires");
    assert_eq!(m.wait_time.count, 1, "one wait, which timed out");
    assert!(m.wait_time.sum >= ms(150));
    assert_eq!(m.hold_duration.count, 3, "two released, one lost");
    assert_eq!(
        m.renewal_latency.count, 3,
        "two extends and the one that found the session gone"
    );
    for h in [
        &m.acquire_latency,
        &m.wait_time,
        &m.hold_duration,
        &m.renewal_latency,
    ] {
        assert_eq!(h.buckets.last().unwrap().1, h.count);
        assert!(
            h.buckets
                .windows(2)
                .all(|w| w[0].1 <= w[1].1 && w[0].0 < w[1].0)
        );
    }
    // Events reach the handler on the client's event thread, shortly after the
    // fact: wait for the last one, then check them all.
    assert!(eventually(ms(5000), || events.count("released") == 2));
    assert_eq!(events.count("acquired"), 3);
    assert_eq!(events.count("released"), 2);
    assert_eq!(events.count("renewed"), 2);
    assert_eq!(events.count("lost"), 1);
}

#[test]
fn gauges_follow_held_and_waiting_locks() {
    let (client, _) = client(ms(30_000));
    let (other, _) = common::client(ms(30_000));
    let name = unique("gauges");
    let a = client.try_lock(&unique("g1")).unwrap().unwrap();
    let held = other.try_lock(&name).unwrap().unwrap();
    assert_eq!(client.metrics().locks_held, 1);
    std::thread::scope(|s| {
        let waiter = s.spawn(|| client.lock(&name).unwrap());
        assert!(eventually(ms(5000), || client.metrics().acquires_waiting == 1));
        drop(held);
        let got = waiter.join().unwrap();
        assert_eq!(client.metrics().acquires_waiting, 0);
        assert_eq!(client.metrics().locks_held, 2);
        drop(got);
    });
    drop(a);
    let m = client.metrics();
    assert_eq!(m.locks_held, 0);
    assert_eq!(m.wait_time.count, 1, "the blocking acquire waited");
}

/// Parses Prometheus text exposition: `# HELP`/`# TYPE` before each family,
/// samples `name{labels} value` with valid names and values.
fn parse_prometheus(text: &str) -> HashMap<String, f64> {
    let mut types: HashMap<String, String> = HashMap::new();
    let mut samples = HashMap::new();
    let name_ok = |n: &str| {
        n.chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    };
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let (kind, name, value) = (
                parts.next().unwrap(),
                parts.next().unwrap(),
                parts.next().unwrap(),
            );
            assert!(name_ok(name), "bad name {name}");
            match kind {
                "HELP" => assert!(!value.is_empty()),
                "TYPE" => {
                    assert!(["counter", "gauge", "histogram"].contains(&value), "{line}");
                    assert!(
                        types.insert(name.to_owned(), value.to_owned()).is_none(),
                        "TYPE twice: {name}"
                    );
                }
                other => panic!("unknown comment {other}"),
            }
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect(line);
        let value: f64 = if value == "+Inf" {
            f64::INFINITY
        } else {
            value.parse().expect(line)
        };
        let name = series.split('{').next().unwrap();
        assert!(name_ok(name), "bad sample name in {line}");
        let labels = &series[name.len()..];
        if !labels.is_empty() {
            assert!(labels.starts_with('{') && labels.ends_with('}'), "{line}");
            for pair in labels[1..labels.len() - 1].split(',') {
                let (k, v) = pair.split_once('=').expect(line);
                assert!(
                    name_ok(k) && v.starts_with('"') && v.ends_with('"'),
                    "{line}"
                );
            }
        }
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|f| types.get(*f).is_some_and(|t| t == "histogram"))
            })
            .unwrap_or(name);
        assert!(types.contains_key(family), "sample before its TYPE: {line}");
        assert!(
            samples.insert(series.to_owned(), value).is_none(),
            "duplicate {series}"
        );
    }
    samples
}

#[test]
fn prometheus_text_parses_back_to_the_snapshot() {
    let (_client, m) = scripted(Recorder::default());
    let text = m.to_prometheus();
    let samples = parse_prometheus(&text);
    assert_eq!(samples["lockbox_acquire_attempts_total"], 6.0);
    assert_eq!(samples["lockbox_acquired_total"], 3.0);
    assert_eq!(samples["lockbox_acquire_contended_total"], 1.0);
    assert_eq!(samples["lockbox_acquire_timeouts_total"], 1.0);
    assert_eq!(samples["lockbox_renewals_total{result=\"ok\"}"], 2.0);
    assert_eq!(
        samples["lockbox_locks_lost_total{reason=\"session_lost\"}"],
        1.0
    );
    assert_eq!(samples["lockbox_locks_lost_total{reason=\"expired\"}"], 0.0);
    assert_eq!(samples["lockbox_releases_total{result=\"failed\"}"], 1.0);
    assert_eq!(samples["lockbox_zombie_terminations_total"], 1.0);
    assert_eq!(samples["lockbox_locks_held"], 0.0);
    for h in [
        "acquire_latency_seconds",
        "wait_seconds",
        "hold_seconds",
        "renewal_latency_seconds",
    ] {
        let count = samples[&format!("lockbox_{h}_count")];
        assert_eq!(
            samples[&format!("lockbox_{h}_bucket{{le=\"+Inf\"}}")],
            count
        );
        let mut last = 0.0;
        for bound in lockbox::HISTOGRAM_BUCKETS {
            let v = samples[&format!("lockbox_{h}_bucket{{le=\"{bound}\"}}")];
            assert!(v >= last, "{h} buckets not cumulative");
            last = v;
        }
        assert!(samples[&format!("lockbox_{h}_sum")] >= 0.0);
    }
    assert_eq!(samples["lockbox_hold_seconds_count"], 3.0);
}
