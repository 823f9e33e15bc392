//! Where every observable fact goes: the metrics, the event handler, the log and
//! (with the `metrics` feature) the `metrics` crate facade. Shared by the client,
//! each lock's state and the backend.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;

use crate::error::{Error, LostReason};
use crate::event::{
    AcquiredEvent, Event, HandleEvent, LostEvent, ReleasedEvent, RenewalFailedEvent, RenewedEvent,
};
use crate::metrics::{Metrics, reason_label};

#[derive(Debug)]
pub(crate) struct Telemetry {
    pub metrics: Metrics,
    /// To the event thread, when there is a handler.
    events: Option<Sender<Event>>,
    /// The reference point for `last_renewal_ok` and `last_loss`.
    epoch: Instant,
    /// Nanoseconds after `epoch` of the last successful renewal; 0: none yet.
    last_renewal_ok: AtomicU64,
    /// Nanoseconds after `epoch` of the last loss; 0: none yet.
    last_loss: AtomicU64,
}

/// Which statement was slow.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Slow {
    Grant,
    Renewal,
}

/// How an acquire call ended, for the counters.
pub(crate) enum AcquireEnd {
    Acquired { waited: bool },
    Contended,
    TimedOut,
    Failed,
}

impl Telemetry {
    /// Starts the event thread `thread_name` when there is a handler.
    pub fn new(
        handler: Option<Arc<dyn HandleEvent>>,
        thread_name: String,
    ) -> std::io::Result<Telemetry> {
        let metrics = Metrics::default();
        let events = match handler {
            Some(handler) => Some(crate::event::spawn_dispatcher(
                thread_name,
                handler,
                metrics.handler_panics.clone(),
            )?),
            None => None,
        };
        Ok(Telemetry {
            metrics,
            events,
            epoch: Instant::now(),
            last_renewal_ok: AtomicU64::new(0),
            last_loss: AtomicU64::new(0),
        })
    }

    /// Queues an event for the handler; never blocks, never runs user code here.
    fn emit(&self, event: impl FnOnce() -> Event) {
        if let Some(tx) = &self.events {
            // Fails only once the event thread is gone (the process is exiting).
            let _ = tx.send(event());
        }
    }

    fn stamp(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    fn since(&self, stamp: &AtomicU64) -> Option<Duration> {
        match stamp.load(Relaxed) {
            0 => None,
            at => Some(
                self.epoch
                    .elapsed()
                    .saturating_sub(Duration::from_nanos(at)),
            ),
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
        self.emit(|| {
            Event::Acquired(AcquiredEvent {
                name: name.to_owned(),
                token,
                took,
            })
        });
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
        if ok {
            self.emit(|| {
                Event::Released(ReleasedEvent {
                    name: name.to_owned(),
                    token,
                    held_for,
                })
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
        self.last_loss.store(self.stamp(), Relaxed);
        facade::counter(
            "lockbox_locks_lost_total",
            Some(("reason", reason_label(reason))),
        );
        self.emit(|| {
            Event::Lost(LostEvent {
                name: name.to_owned(),
                token,
                reason,
                held_for,
            })
        });
    }

    pub fn renewal(&self, name: &str, token: u64, latency: Duration, ok: bool) {
        let m = &self.metrics;
        m.renewal_latency.observe(latency);
        facade::histogram("lockbox_renewal_latency_seconds", latency);
        if ok {
            log::trace!("lockbox: renewed lock {name:?} (token {token}) in {latency:?}");
            m.renewals_ok.fetch_add(1, Relaxed);
            facade::counter("lockbox_renewals_total", Some(("result", "ok")));
            self.last_renewal_ok.store(self.stamp(), Relaxed);
            self.emit(|| {
                Event::Renewed(RenewedEvent {
                    name: name.to_owned(),
                    token,
                    latency,
                })
            });
        } else {
            m.renewals_failed.fetch_add(1, Relaxed);
            facade::counter("lockbox_renewals_total", Some(("result", "failed")));
        }
    }

    /// A grant or renewal whose statement took more than a quarter of the
    /// lease: reported, so that a loss it causes is no mystery.
    pub fn slow(&self, what: Slow, name: &str, took: Duration, ttl: Duration) -> bool {
        if took <= ttl / 4 {
            return false;
        }
        let (counter, metric, label) = match what {
            Slow::Grant => (
                &self.metrics.slow_grants,
                "lockbox_slow_grants_total",
                "grant",
            ),
            Slow::Renewal => (
                &self.metrics.slow_renewals,
                "lockbox_slow_renewals_total",
                "renewal",
            ),
        };
        counter.fetch_add(1, Relaxed);
        facade::counter(metric, None);
        log::warn!(
            "lockbox: the {label} of lock {name:?} took {took:?} to answer, {}% of its {ttl:?} \
             lease (a stalled commit or WAL flush on the server?)",
            took.as_millis() * 100 / ttl.as_millis().max(1)
        );
        true
    }

    pub fn zombie_terminated(&self) {
        self.metrics.zombie_terminations.fetch_add(1, Relaxed);
        facade::counter("lockbox_zombie_terminations_total", None);
    }

    /// A renewal failed and will be retried until `deadline_in` runs out.
    pub fn renewal_failed(&self, name: &str, token: u64, error: &Error, deadline_in: Duration) {
        log::warn!(
            "lockbox: renewing lock {name:?} (token {token}) failed, retrying (deadline in \
             {deadline_in:?}): {error}"
        );
        self.emit(|| {
            Event::RenewalFailed(RenewalFailedEvent {
                name: name.to_owned(),
                token,
                error: error.clone(),
                deadline_in,
            })
        });
    }

    /// Time since the last successful renewal, if there was one.
    pub fn since_last_renewal(&self) -> Option<Duration> {
        self.since(&self.last_renewal_ok)
    }

    /// Time since the last loss, if there was one.
    pub fn since_last_loss(&self) -> Option<Duration> {
        self.since(&self.last_loss)
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
        self.metrics.locks_held.fetch_add(delta, Relaxed);
        facade::gauge_add("lockbox_locks_held", delta);
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
        value.fetch_add(1, Relaxed);
        if !name.is_empty() {
            facade::gauge_add(name, 1);
        }
        Gauge { value, name }
    }
}

impl Drop for Gauge<'_> {
    fn drop(&mut self) {
        self.value.fetch_sub(1, Relaxed);
        if !self.name.is_empty() {
            facade::gauge_add(self.name, -1);
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

    /// Gauges move by deltas, never `set`: every client in the process reports
    /// through the same unlabelled gauge, so each adds only its own changes.
    pub fn gauge_add(name: &'static str, delta: i64) {
        metrics::gauge!(name).increment(delta as f64);
    }

    pub fn histogram(name: &'static str, d: Duration) {
        metrics::histogram!(name).record(d.as_secs_f64());
    }
}

#[cfg(not(feature = "metrics"))]
mod facade {
    use std::time::Duration;

    pub fn counter(_: &'static str, _: Option<(&'static str, &'static str)>) {}
    pub fn gauge_add(_: &'static str, _: i64) {}
    pub fn histogram(_: &'static str, _: Duration) {}
}
