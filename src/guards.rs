//! What the guards of the coordination primitives share: each is a [`Lock`]
//! of its own kind of lease (held, renewed, fenced, lost and released exactly
//! like a `Lock`), under a name that says what it is.

use std::time::{Duration, Instant};

use crate::backend::LeaseKind;
use crate::client::LockClient;
use crate::error::{Error, Result};
use crate::lock::Lock;
use crate::options::AcquireOptions;

/// Defines a guard type wrapping a [`Lock`]: `Deref`s to it (name, fencing
/// token, `lost()`, `extend`, `fence`, …), releases on `Drop` and by
/// `release(self)`.
macro_rules! lock_guard {
    ($(#[$doc:meta])* $ty:ident, $what:literal) => {
        $(#[$doc])*
        #[must_use = concat!("if unused the ", $what, " is released immediately")]
        #[clippy::has_significant_drop]
        pub struct $ty {
            lock: $crate::lock::Lock,
        }

        impl $ty {
            pub(crate) fn from_lock(lock: $crate::lock::Lock) -> $ty {
                $ty { lock }
            }

            #[doc = concat!("Releases the ", $what, " now; as [`Lock::release`](crate::Lock::release).")]
            ///
            /// # Errors
            /// As [`Lock::release`](crate::Lock::release): [`Error::LockLost`](crate::Error::LockLost)
            /// if it had been lost before the release.
            pub fn release(self) -> $crate::error::Result<()> {
                self.lock.release()
            }
        }

        impl std::ops::Deref for $ty {
            type Target = $crate::lock::Lock;

            /// The lease underneath, a [`Lock`](crate::Lock) in every respect but
            /// its kind.
            fn deref(&self) -> &$crate::lock::Lock {
                &self.lock
            }
        }

        impl std::fmt::Debug for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_struct(stringify!($ty))
                    .field("name", &self.lock.name())
                    .field("fencing_token", &self.lock.fencing_token())
                    .field("held", &self.lock.is_held())
                    .finish()
            }
        }
    };
}
pub(crate) use lock_guard;

/// Acquires a lease of `kind` on `name`, waiting up to `timeout` (zero: not
/// at all): [`Error::Timeout`] when none came.
pub(crate) fn acquire_within(
    client: &LockClient,
    name: &str,
    kind: LeaseKind,
    timeout: Duration,
) -> Result<Lock> {
    let start = Instant::now();
    let opts = if timeout.is_zero() {
        AcquireOptions::new()
    } else {
        AcquireOptions::new().wait(timeout)
    };
    client
        .acquire_kind(name, &opts, kind, false)?
        .ok_or_else(|| Error::Timeout {
            name: name.to_owned(),
            waited: start.elapsed(),
        })
}
