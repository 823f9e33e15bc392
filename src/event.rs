//! Observation hooks: a [`HandleEvent`] receives lock events as they happen.

use std::fmt;
use std::panic::{self, AssertUnwindSafe};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::Duration;

use crossbeam_channel::Sender;

use crate::error::LostReason;

/// Receives lock events. Every method does nothing by default; implement those you
/// need. Set one with
/// [`LockClientBuilder::event_handler`](crate::LockClientBuilder::event_handler).
///
/// Handlers run on one thread of the client's own, `lockbox-events-N`, one event
/// at a time in the order the events happened, and never under an internal lock
/// or inside a query of a lock's state. So a handler may do anything with any
/// lock or client, including the lock it is told about (release, extend, drop it)
/// or acquire others; and a slow or blocked handler delays only later events,
/// never a renewal, a loss signal or the caller that caused the event. Events
/// are therefore delivered shortly *after* the fact: to act at the moment of a
/// loss, select on [`Lock::lost`](crate::Lock::lost).
///
/// A handler that panics is contained: the panic is logged and counted
/// ([`MetricsSnapshot::handler_panics`](crate::MetricsSnapshot::handler_panics)),
/// and later events are still delivered. No lock is lost or leaked because of it.
pub trait HandleEvent: fmt::Debug + Send + Sync + 'static {
    /// A lock was acquired.
    fn handle_acquired(&self, event: &AcquiredEvent) {
        let _ = event;
    }

    /// A held lock was released.
    fn handle_released(&self, event: &ReleasedEvent) {
        let _ = event;
    }

    /// A lease was renewed.
    fn handle_renewed(&self, event: &RenewedEvent) {
        let _ = event;
    }

    /// A held lock was lost.
    fn handle_lost(&self, event: &LostEvent) {
        let _ = event;
    }

    /// A renewal failed without the lock being lost yet (the store did not
    /// answer, or answered with an error); it is retried until the deadline.
    fn handle_renewal_failed(&self, event: &RenewalFailedEvent) {
        let _ = event;
    }
}

macro_rules! lock_event {
    ($(#[$doc:meta])* $name:ident { $($(#[$fdoc:meta])* $field:ident: $ty:ty),* $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone)]
        pub struct $name {
            pub(crate) name: String,
            pub(crate) token: u64,
            $(pub(crate) $field: $ty,)*
        }

        impl $name {
            /// The lock's name.
            pub fn name(&self) -> &str {
                &self.name
            }

            /// The grant's fencing token.
            pub fn fencing_token(&self) -> u64 {
                self.token
            }

            $($(#[$fdoc])* pub fn $field(&self) -> $ty {
                self.$field
            })*
        }
    };
}

lock_event!(
    /// A lock was acquired.
    AcquiredEvent {
        /// How long the acquire call took, waiting included.
        took: Duration,
    }
);

lock_event!(
    /// A held lock was released.
    ReleasedEvent {
        /// How long it was held.
        held_for: Duration,
    }
);

lock_event!(
    /// A lease was renewed.
    RenewedEvent {
        /// The renewal statement's round-trip time.
        latency: Duration,
    }
);

/// A renewal that failed and will be retried: what went wrong and how long the
/// lock has left.
#[derive(Debug, Clone)]
pub struct RenewalFailedEvent {
    pub(crate) name: String,
    pub(crate) token: u64,
    pub(crate) error: crate::Error,
    pub(crate) deadline_in: Duration,
}

impl RenewalFailedEvent {
    /// The lock's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The grant's fencing token.
    pub fn fencing_token(&self) -> u64 {
        self.token
    }

    /// Why the renewal failed.
    pub fn error(&self) -> &crate::Error {
        &self.error
    }

    /// What is left before the lock's local deadline, when it is lost unless a
    /// renewal succeeds first.
    pub fn deadline_in(&self) -> Duration {
        self.deadline_in
    }
}

lock_event!(
    /// A held lock was lost.
    LostEvent {
        /// Why.
        reason: LostReason,
        /// How long it had been held.
        held_for: Duration,
    }
);

/// One event on its way to the handler.
#[derive(Debug)]
pub(crate) enum Event {
    Acquired(AcquiredEvent),
    Released(ReleasedEvent),
    Renewed(RenewedEvent),
    RenewalFailed(RenewalFailedEvent),
    Lost(LostEvent),
}

impl Event {
    fn deliver(&self, handler: &dyn HandleEvent) {
        match self {
            Event::Acquired(e) => handler.handle_acquired(e),
            Event::Released(e) => handler.handle_released(e),
            Event::Renewed(e) => handler.handle_renewed(e),
            Event::RenewalFailed(e) => handler.handle_renewal_failed(e),
            Event::Lost(e) => handler.handle_lost(e),
        }
    }
}

/// The client's event thread: delivers events to the handler in order, contains
/// its panics, and ends by itself once every sender (the client and its locks)
/// is gone. It is never joined: a handler may drop the last handle on its client.
pub(crate) fn spawn_dispatcher(
    name: String,
    handler: Arc<dyn HandleEvent>,
    panics: Arc<AtomicU64>,
) -> std::io::Result<Sender<Event>> {
    let (tx, rx) = crossbeam_channel::unbounded::<Event>();
    thread::Builder::new().name(name).spawn(move || {
        for event in rx {
            let delivered =
                panic::catch_unwind(AssertUnwindSafe(|| event.deliver(handler.as_ref())));
            if let Err(payload) = delivered {
                panics.fetch_add(1, Ordering::Relaxed);
                let what = payload
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a non-string payload".to_owned());
                log::error!("lockbox: the event handler panicked on {event:?}: {what}");
                // Not dropped: a payload whose own Drop panics would end the thread.
                std::mem::forget(payload);
            }
        }
    })?;
    Ok(tx)
}
