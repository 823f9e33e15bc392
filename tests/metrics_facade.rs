//! With the `metrics` feature, the same figures reach the `metrics` crate facade.
//! (Its own process: it installs the global recorder.)

mod common;

use common::*;
use metrics_util::debugging::{DebugValue, DebuggingRecorder};

#[test]
fn figures_reach_the_metrics_facade() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder.install().unwrap();

    let (client, _) = client(ms(30_000));
    let (other, _) = common::client(ms(30_000));
    let name = unique("facade");
    let held = other.try_lock(&name).unwrap().unwrap();
    assert!(client.try_lock(&name).unwrap().is_none());
    drop(held);
    let lock = client.try_lock(&name).unwrap().unwrap();
    lock.extend(ms(30_000)).unwrap();
    lock.release().unwrap();

    let values: Vec<(String, Vec<String>, DebugValue)> = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(key, _, _, value)| {
            let key = key.key();
            let labels = key
                .labels()
                .map(|l| format!("{}={}", l.key(), l.value()))
                .collect();
            (key.name().to_owned(), labels, value)
        })
        .collect();
    let counter = |name: &str, label: Option<&str>| -> u64 {
        values
            .iter()
            .filter(|(n, l, _)| n == name && label.is_none_or(|x| l.iter().any(|y| y == x)))
            .map(|(_, _, v)| match v {
                DebugValue::Counter(c) => *c,
                other => panic!("{name} is not a counter: {other:?}"),
            })
            .sum()
    };
    // Both clients report to the one global recorder.
    assert_eq!(counter("lockbox_acquire_attempts_total", None), 3);
    assert_eq!(counter("lockbox_acquired_total", None), 2);
    assert_eq!(counter("lockbox_acquire_contended_total", None), 1);
    assert_eq!(counter("lockbox_renewals_total", Some("result=ok")), 1);
    assert_eq!(counter("lockbox_releases_total", Some("result=ok")), 2);
    let latencies = values
        .iter()
        .find(|(n, _, _)| n == "lockbox_acquire_latency_seconds")
        .map(|(_, _, v)| match v {
            DebugValue::Histogram(h) => h.len(),
            _ => 0,
        });
    assert_eq!(latencies, Some(2));
    assert_eq!(client.metrics().acquired, 1);

    // Two clients holding 3 + 1 locks: the one unlabelled gauge says 4, and 3
    // once the second client's lock goes (each client adds its own changes
    // rather than setting the gauge to its own count).
    let three: Vec<_> = (0..3)
        .map(|i| client.try_lock(&unique(&format!("g{i}"))).unwrap().unwrap())
        .collect();
    let one = other.try_lock(&unique("g-other")).unwrap().unwrap();
    // The debugging recorder hands out what changed since its last snapshot.
    let mut total = 0.0;
    let mut gauge = || -> f64 {
        total += snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .find(|(key, _, _, _)| key.key().name() == "lockbox_locks_held")
            .map(|(_, _, _, value)| match value {
                DebugValue::Gauge(g) => g.into_inner(),
                other => panic!("lockbox_locks_held is not a gauge: {other:?}"),
            })
            .unwrap_or(0.0);
        total
    };
    assert_eq!(gauge(), 4.0);
    drop(one);
    assert_eq!(gauge(), 3.0);
    drop(three);
    assert_eq!(gauge(), 0.0);
}
