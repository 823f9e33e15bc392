//! Observation hooks: a [`HandleEvent`] receives lock events as they happen.

use std::fmt;
use std::time::Duration;

use crate::error::LostReason;

/// Receives lock events. Every method does nothing by default; implement those you
/// need. Set one with
/// [`LockClientBuilder::event_handler`](crate::LockClientBuilder::event_handler).
///
/// Handlers run on the thread where the event happens (the caller's, or the
/// renewal thread's for renewals and most losses) and never under an internal lock.
/// Keep them short: a slow handler delays renewals of other locks.
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

lock_event!(
    /// A held lock was lost.
    LostEvent {
        /// Why.
        reason: LostReason,
        /// How long it had been held.
        held_for: Duration,
    }
);
