//! Lock metrics: lock-free counters, gauges and fixed-bucket histograms, their
//! [`MetricsSnapshot`], and its Prometheus text rendering.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use crate::error::LostReason;

/// Upper bounds, in seconds, of every histogram's buckets (a final `+Inf` bucket
/// follows). Fixed, so figures from different processes and releases add up.
pub const HISTOGRAM_BUCKETS: [f64; 19] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 300.0, 1800.0, 3600.0,
];

/// The loss reasons in the order the `locks_lost` counters are kept.
const LOST_REASONS: [LostReason; 4] = [
    LostReason::Expired,
    LostReason::SessionLost,
    LostReason::NotOwner,
    LostReason::RenewalStopped,
];

fn reason_index(reason: LostReason) -> usize {
    LOST_REASONS.iter().position(|r| *r == reason).unwrap_or(0)
}

pub(crate) fn reason_label(reason: LostReason) -> &'static str {
    match reason {
        LostReason::Expired => "expired",
        LostReason::SessionLost => "session_lost",
        LostReason::NotOwner => "not_owner",
        LostReason::RenewalStopped => "renewal_stopped",
    }
}

#[derive(Debug, Default)]
pub(crate) struct Histogram {
    counts: [AtomicU64; HISTOGRAM_BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let idx = HISTOGRAM_BUCKETS.partition_point(|bound| *bound < secs);
        self.counts[idx].fetch_add(1, Relaxed);
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Relaxed);
    }

    fn snapshot(&self) -> HistogramSnapshot {
        let mut cumulative = 0;
        let mut buckets = Vec::with_capacity(HISTOGRAM_BUCKETS.len() + 1);
        for (i, count) in self.counts.iter().enumerate() {
            cumulative += count.load(Relaxed);
            let bound = HISTOGRAM_BUCKETS.get(i).copied().unwrap_or(f64::INFINITY);
            buckets.push((bound, cumulative));
        }
        HistogramSnapshot {
            buckets,
            count: cumulative,
            sum: Duration::from_nanos(self.sum_nanos.load(Relaxed)),
        }
    }
}

/// The live figures of one client. Updated with relaxed atomics: cheap on every
/// path, and never a lock.
#[derive(Debug, Default)]
pub(crate) struct Metrics {
    pub acquire_attempts: AtomicU64,
    pub acquired: AtomicU64,
    pub contended: AtomicU64,
    pub timeouts: AtomicU64,
    pub acquire_errors: AtomicU64,
    pub renewals_ok: AtomicU64,
    pub renewals_failed: AtomicU64,
    lost: [AtomicU64; LOST_REASONS.len()],
    pub releases_ok: AtomicU64,
    pub releases_failed: AtomicU64,
    pub zombie_terminations: AtomicU64,
    pub slow_grants: AtomicU64,
    pub slow_renewals: AtomicU64,
    /// Shared with the event thread, which counts the handler's panics.
    pub handler_panics: std::sync::Arc<AtomicU64>,
    pub locks_held: AtomicI64,
    pub acquires_waiting: AtomicI64,
    pub pool_waiting: AtomicI64,
    pub acquire_latency: Histogram,
    pub wait_time: Histogram,
    pub hold_duration: Histogram,
    pub renewal_latency: Histogram,
}

impl Metrics {
    pub fn count_lost(&self, reason: LostReason) {
        self.lost[reason_index(reason)].fetch_add(1, Relaxed);
    }

    pub fn snapshot(&self) -> MetricsSnapshot {
        let lost = LOST_REASONS
            .iter()
            .map(|r| (*r, self.lost[reason_index(*r)].load(Relaxed)))
            .collect();
        MetricsSnapshot {
            acquire_attempts: self.acquire_attempts.load(Relaxed),
            acquired: self.acquired.load(Relaxed),
            contended: self.contended.load(Relaxed),
            timeouts: self.timeouts.load(Relaxed),
            acquire_errors: self.acquire_errors.load(Relaxed),
            renewals_ok: self.renewals_ok.load(Relaxed),
            renewals_failed: self.renewals_failed.load(Relaxed),
            lost,
            releases_ok: self.releases_ok.load(Relaxed),
            releases_failed: self.releases_failed.load(Relaxed),
            zombie_terminations: self.zombie_terminations.load(Relaxed),
            handler_panics: self.handler_panics.load(Relaxed),
            slow_grants: self.slow_grants.load(Relaxed),
            slow_renewals: self.slow_renewals.load(Relaxed),
            locks_held: self.locks_held.load(Relaxed).max(0) as u64,
            acquires_waiting: self.acquires_waiting.load(Relaxed).max(0) as u64,
            acquire_latency: self.acquire_latency.snapshot(),
            wait_time: self.wait_time.snapshot(),
            hold_duration: self.hold_duration.snapshot(),
            renewal_latency: self.renewal_latency.snapshot(),
        }
    }
}

/// One histogram's figures: cumulative bucket counts (as Prometheus has them), the
/// number of observations and their sum.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    /// `(upper bound in seconds, observations ≤ bound)`, in the order of
    /// [`HISTOGRAM_BUCKETS`], then `(f64::INFINITY, count)`.
    pub buckets: Vec<(f64, u64)>,
    /// How many observations were made.
    pub count: u64,
    /// Their sum.
    pub sum: Duration,
}

/// A point-in-time copy of a client's metrics, from
/// [`LockClient::metrics`](crate::LockClient::metrics).
///
/// Every acquire call counts once in `acquire_attempts` and once in exactly one of
/// `acquired`, `contended` (a no-wait acquire found the lock held), `timeouts` (a
/// waiting acquire ran out of time) or `acquire_errors`.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct MetricsSnapshot {
    /// Acquire calls (`try_lock`, `lock`, `lock_timeout`, `with_lock`, `acquire`).
    pub acquire_attempts: u64,
    /// Acquires that returned a lock.
    pub acquired: u64,
    /// No-wait acquires that found the lock held.
    pub contended: u64,
    /// Waiting acquires whose wait ran out.
    pub timeouts: u64,
    /// Acquires that failed with an error (invalid input included).
    pub acquire_errors: u64,
    /// Renewals (including [`Lock::extend`](crate::Lock::extend)) that extended a lease.
    pub renewals_ok: u64,
    /// Renewals that did not: a failed statement (retried) or a lease found lost.
    pub renewals_failed: u64,
    /// Locks lost, by reason (every reason listed, zeros included).
    pub lost: Vec<(LostReason, u64)>,
    /// Releases (explicit or on drop) that released a held lock.
    pub releases_ok: u64,
    /// Releases that reported an error (the lock had been lost, or the database
    /// could not confirm).
    pub releases_failed: u64,
    /// Zombie holder sessions terminated to take over their expired leases.
    pub zombie_terminations: u64,
    /// Panics of the event handler, contained and logged (the handler keeps
    /// receiving later events).
    pub handler_panics: u64,
    /// Grants whose statement took more than a quarter of the lease to answer
    /// (not counting a wait for a holder): most of the time a stalled WAL flush
    /// on the server. Each is logged at `warn`.
    pub slow_grants: u64,
    /// Renewals that took more than a quarter of the lease to answer. Each is
    /// logged at `warn`; enough of them in a row lose the lock.
    pub slow_renewals: u64,
    /// Locks held right now.
    pub locks_held: u64,
    /// Acquires blocked waiting for a holder right now. On PostgreSQL a
    /// blocking acquire of a name its client lately found held waits with its
    /// first statement, and counts here once that statement's first wait
    /// slice (at most 100 ms) ended without the lock: one granted within it
    /// is not counted. An acquire held up by another transaction's lock on
    /// its lease row counts once a wait for it (up to a quarter of the TTL,
    /// at most 1 s) ran out.
    pub acquires_waiting: u64,
    /// Time to acquire a lock that was free (no waiting on a holder).
    pub acquire_latency: HistogramSnapshot,
    /// Time acquires spent waiting on a holder, granted or timed out.
    pub wait_time: HistogramSnapshot,
    /// How long locks were held, from grant to release or loss.
    pub hold_duration: HistogramSnapshot,
    /// Round-trip time of renewal statements.
    pub renewal_latency: HistogramSnapshot,
}

impl MetricsSnapshot {
    /// Locks lost for `reason`.
    pub fn lost(&self, reason: LostReason) -> u64 {
        self.lost
            .iter()
            .find(|(r, _)| *r == reason)
            .map_or(0, |(_, n)| *n)
    }

    /// Locks lost for any reason.
    pub fn lost_total(&self) -> u64 {
        self.lost.iter().map(|(_, n)| n).sum()
    }

    /// Renders the figures in the Prometheus text exposition format (version
    /// 0.0.4), every name prefixed `lockbox_`, ready to serve from any HTTP
    /// endpoint.
    pub fn to_prometheus(&self) -> String {
        let mut out = String::with_capacity(4096);
        let counters: [(&str, &str, u64); 10] = [
            (
                "acquire_attempts_total",
                "Acquire calls.",
                self.acquire_attempts,
            ),
            (
                "acquired_total",
                "Acquires that returned a lock.",
                self.acquired,
            ),
            (
                "acquire_contended_total",
                "No-wait acquires that found the lock held.",
                self.contended,
            ),
            (
                "acquire_timeouts_total",
                "Waiting acquires whose wait ran out.",
                self.timeouts,
            ),
            (
                "acquire_errors_total",
                "Acquires that failed with an error.",
                self.acquire_errors,
            ),
            (
                "zombie_terminations_total",
                "Zombie holder sessions terminated to take over expired leases.",
                self.zombie_terminations,
            ),
            (
                "handler_panics_total",
                "Panics of the event handler, contained and logged.",
                self.handler_panics,
            ),
            (
                "slow_grants_total",
                "Grants whose statement took over a quarter of the lease.",
                self.slow_grants,
            ),
            (
                "slow_renewals_total",
                "Renewals that took over a quarter of the lease.",
                self.slow_renewals,
            ),
            ("locks_held", "Locks held right now.", self.locks_held),
        ];
        for (name, help, value) in counters {
            let kind = if name.ends_with("_total") {
                "counter"
            } else {
                "gauge"
            };
            header(&mut out, name, help, kind);
            let _ = writeln!(out, "lockbox_{name} {value}");
        }
        header(
            &mut out,
            "acquires_waiting",
            "Acquires blocked waiting for a holder right now.",
            "gauge",
        );
        let _ = writeln!(out, "lockbox_acquires_waiting {}", self.acquires_waiting);

        header(
            &mut out,
            "renewals_total",
            "Lease renewals, by result.",
            "counter",
        );
        let _ = writeln!(
            out,
            "lockbox_renewals_total{{result=\"ok\"}} {}",
            self.renewals_ok
        );
        let _ = writeln!(
            out,
            "lockbox_renewals_total{{result=\"failed\"}} {}",
            self.renewals_failed
        );
        header(
            &mut out,
            "releases_total",
            "Lock releases, by result.",
            "counter",
        );
        let _ = writeln!(
            out,
            "lockbox_releases_total{{result=\"ok\"}} {}",
            self.releases_ok
        );
        let _ = writeln!(
            out,
            "lockbox_releases_total{{result=\"failed\"}} {}",
            self.releases_failed
        );
        header(
            &mut out,
            "locks_lost_total",
            "Locks lost, by reason.",
            "counter",
        );
        for (reason, n) in &self.lost {
            let _ = writeln!(
                out,
                "lockbox_locks_lost_total{{reason=\"{}\"}} {n}",
                reason_label(*reason)
            );
        }

        let histograms = [
            (
                "acquire_latency_seconds",
                "Time to acquire a free lock.",
                &self.acquire_latency,
            ),
            (
                "wait_seconds",
                "Time acquires spent waiting on a holder.",
                &self.wait_time,
            ),
            (
                "hold_seconds",
                "How long locks were held.",
                &self.hold_duration,
            ),
            (
                "renewal_latency_seconds",
                "Round-trip time of renewal statements.",
                &self.renewal_latency,
            ),
        ];
        for (name, help, h) in histograms {
            header(&mut out, name, help, "histogram");
            for (bound, count) in &h.buckets {
                let le = if bound.is_infinite() {
                    "+Inf".to_owned()
                } else {
                    bound.to_string()
                };
                let _ = writeln!(out, "lockbox_{name}_bucket{{le=\"{le}\"}} {count}");
            }
            let _ = writeln!(out, "lockbox_{name}_sum {}", h.sum.as_secs_f64());
            let _ = writeln!(out, "lockbox_{name}_count {}", h.count);
        }
        out
    }
}

fn header(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP lockbox_{name} {help}");
    let _ = writeln!(out, "# TYPE lockbox_{name} {kind}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_bounded_inclusively() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(500)); // exactly the first bound
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(7200)); // beyond the last bound
        let s = h.snapshot();
        assert_eq!(s.count, 3);
        assert_eq!(s.buckets[0], (0.0005, 1));
        assert_eq!(s.buckets[3], (0.005, 2));
        assert_eq!(s.buckets[HISTOGRAM_BUCKETS.len() - 1].1, 2);
        assert_eq!(s.buckets.last().copied(), Some((f64::INFINITY, 3)));
        assert_eq!(
            s.sum,
            Duration::from_micros(500) + Duration::from_millis(3) + Duration::from_secs(7200)
        );
    }
}
