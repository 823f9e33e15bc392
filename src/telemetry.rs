//! Where every observable fact goes: the metrics, the event handler, the log and
//! (with the `metrics` feature) the `metrics` crate facade. Shared by the client,
//! each lock's state and the backend.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use crate::error::LostReason;
use crate::event::{AcquiredEvent, HandleEvent, LostEvent, ReleasedEvent, RenewedEvent};
use crate::metrics::{Metrics, reason_label};

#[derive(Debug)]
pub(crate) struct Telemetry {
    pub metrics: Metrics,
    handler: Option<Arc<dyn HandleEvent>>,
    /// The reference point for `last_renewal_ok`.
    epoch: Instant,
    /// Nanoseconds after `epoch` of the last successful renewal; 0: none yet.
    last_renewal_ok: AtomicU64,
}

/// How an acquire call ended, for the counters.
pub(crate) enum AcquireEnd {
    Acquired { waited: bool },
    Contended,
    TimedOut,
    Failed,
}

impl Telemetry {
    pub fn new(handler: Option<Arc<dyn HandleEvent>>) -> Telemetry {
        Telemetry {
            metrics: Metrics::default(),
            handler,
            epoch: Instant::now(),
            last_renewal_ok: AtomicU64::new(0),
        }
    }

    pub fn acquire_ended(&self, end: &AcquireEnd, took: Duration) {
        let m = &self.metrics;
        m.acquire_attempts.fetch_add(1, Relaxed);
        facade::counter("lockbox_acquire_attempts_total", None);
        let (counter, name) = match end {
            AcquireEnd::Acquired { .. } => (&m.acquired, "lockbox_acquired_total"),
            AcquireEnd::Contended => (&m.contended, "lockbox_acquire_contended_total"),
            AcquireEnd::TimedOut => (&m.timeouts, "lockbox_acquire_timeouts_total"),
            AcquireEnd::Failed => (&m.acquire_errors, "lockbox_acquire_errors_total"),
        };
        counter.fetch_add(1, Relaxed);
        facade::counter(name, None);
        match end {
            AcquireEnd::Acquired { waited: false } => {
                m.acquire_latency.observe(took);
                facade::histogram("lockbox_acquire_latency_seconds", took);
            }
            AcquireEnd::Acquired { waited: true } | AcquireEnd::TimedOut => {
                m.wait_time.observe(took);
                facade::histogram("lockbox_wait_seconds", took);
            }
            AcquireEnd::Contended | AcquireEnd::Failed => {}
        }
    }

    pub fn acquired(&self, name: &str, token: u64, took: Duration) {
        log::debug!("lockbox: acquired lock {name:?} (token {token}) in {took:?}");
        self.held_delta(1);
        if let Some(h) = &self.handler {
            h.handle_acquired(&AcquiredEvent {
                name: name.to_owned(),
                token,
                took,
            });
        }
    }

    pub fn released(&self, name: &str, token: u64, held_for: Duration, ok: bool) {
        let m = &self.metrics;
        if ok {
            log::debug!("lockbox: released lock {name:?} (token {token}) after {held_for:?}");
            m.releases_ok.fetch_add(1, Relaxed);
            facade::counter("lockbox_releases_total", Some(("result", "ok")));
        } else {
            m.releases_failed.fetch_add(1, Relaxed);
            facade::counter("lockbox_releases_total", Some(("result", "failed")));
        }
        if ok && let Some(h) = &self.handler {
            h.handle_released(&ReleasedEvent {
                name: name.to_owned(),
                token,
                held_for,
            });
        }
    }

    /// The lock stopped being held (released or lost): exactly once per lock.
    pub fn no_longer_held(&self, held_for: Duration) {
        self.held_delta(-1);
        self.metrics.hold_duration.observe(held_for);
        facade::histogram("lockbox_hold_seconds", held_for);
    }

    pub fn lost(&self, name: &str, token: u64, reason: LostReason, held_for: Duration) {
        log::warn!("lockbox: lock {name:?} (token {token}) lost after {held_for:?}: {reason}");
        self.metrics.count_lost(reason);
        facade::counter(
            "lockbox_locks_lost_total",
            Some(("reason", reason_label(reason))),
        );
        if let Some(h) = &self.handler {
            h.handle_lost(&LostEvent {
                name: name.to_owned(),
                token,
                reason,
                held_for,
            });
        }
    }

    pub fn renewal(&self, name: &str, token: u64, latency: Duration, ok: bool) {
        let m = &self.metrics;
        m.renewal_latency.observe(latency);
        facade::histogram("lockbox_renewal_latency_seconds", latency);
        if ok {
            log::trace!("lockbox: renewed lock {name:?} (token {token}) in {latency:?}");
            m.renewals_ok.fetch_add(1, Relaxed);
            facade::counter("lockbox_renewals_total", Some(("result", "ok")));
            let since = u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
            self.last_renewal_ok.store(since.max(1), Relaxed);
            if let Some(h) = &self.handler {
                h.handle_renewed(&RenewedEvent {
                    name: name.to_owned(),
                    token,
                    latency,
                });
            }
        } else {
            m.renewals_failed.fetch_add(1, Relaxed);
            facade::counter("lockbox_renewals_total", Some(("result", "failed")));
        }
    }

    pub fn zombie_terminated(&self) {
        self.metrics.zombie_terminations.fetch_add(1, Relaxed);
        facade::counter("lockbox_zombie_terminations_total", None);
    }

    /// Time since the last successful renewal, if there was one.
    pub fn since_last_renewal(&self) -> Option<Duration> {
        match self.last_renewal_ok.load(Relaxed) {
            0 => None,
            at => Some(
                self.epoch
                    .elapsed()
                    .saturating_sub(Duration::from_nanos(at)),
            ),
        }
    }

    /// Counts an acquire as waiting on a holder until the guard drops.
    pub fn waiting(&self) -> Gauge<'_> {
        Gauge::up(&self.metrics.acquires_waiting, "lockbox_acquires_waiting")
    }

    /// Counts a caller as waiting for a pooled connection until the guard drops.
    pub fn pool_waiting(&self) -> Gauge<'_> {
        Gauge::up(&self.metrics.pool_waiting, "")
    }

    fn held_delta(&self, delta: i64) {
        let now = self.metrics.locks_held.fetch_add(delta, Relaxed) + delta;
        facade::gauge("lockbox_locks_held", now);
    }
}

/// A gauge raised for as long as this guard lives.
#[derive(Debug)]
pub(crate) struct Gauge<'a> {
    value: &'a std::sync::atomic::AtomicI64,
    name: &'static str,
}

impl<'a> Gauge<'a> {
    fn up(value: &'a std::sync::atomic::AtomicI64, name: &'static str) -> Gauge<'a> {
        let now = value.fetch_add(1, Relaxed) + 1;
        if !name.is_empty() {
            facade::gauge(name, now);
        }
        Gauge { value, name }
    }
}

impl Drop for Gauge<'_> {
    fn drop(&mut self) {
        let now = self.value.fetch_sub(1, Relaxed) - 1;
        if !self.name.is_empty() {
            facade::gauge(self.name, now);
        }
    }
}

/// The same figures through the `metrics` crate facade, so any exporter plugged
/// into it (Prometheus, StatsD, …) sees them.
#[cfg(feature = "metrics")]
mod facade {
    use std::time::Duration;

    pub fn counter(name: &'static str, label: Option<(&'static str, &'static str)>) {
        match label {
            Some((k, v)) => metrics::counter!(name, k => v).increment(1),
            None => metrics::counter!(name).increment(1),
        }
    }

    pub fn gauge(name: &'static str, value: i64) {
        metrics::gauge!(name).set(value as f64);
    }

    pub fn histogram(name: &'static str, d: Duration) {
        metrics::histogram!(name).record(d.as_secs_f64());
    }
}

#[cfg(not(feature = "metrics"))]
mod facade {
    use std::time::Duration;

    pub fn counter(_: &'static str, _: Option<(&'static str, &'static str)>) {}
    pub fn gauge(_: &'static str, _: i64) {}
    pub fn histogram(_: &'static str, _: Duration) {}
}
