//! The clock that lease deadlines are kept on.
//!
//! std's `Instant` is `CLOCK_MONOTONIC` on Linux, which stops while the machine
//! (or VM) is suspended: after a resume, a deadline on it would lie in the future
//! although the store's lease ran out long ago. Deadlines are kept on
//! `CLOCK_BOOTTIME` instead, which counts suspended time. Elsewhere (no such
//! clock) it falls back to `CLOCK_MONOTONIC`, and the README says so.

use std::ops::Add;
use std::time::Duration;

/// A point on the boot-time clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct BootInstant(Duration);

#[cfg(any(target_os = "linux", target_os = "android"))]
const CLOCK: libc::clockid_t = libc::CLOCK_BOOTTIME;
#[cfg(not(any(target_os = "linux", target_os = "android")))]
const CLOCK: libc::clockid_t = libc::CLOCK_MONOTONIC;

impl BootInstant {
    pub fn now() -> BootInstant {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid, writable timespec; the clock id is a constant
        // the platform defines. It cannot fail for a valid id and pointer.
        let rc = unsafe { libc::clock_gettime(CLOCK, &mut ts) };
        debug_assert_eq!(rc, 0);
        BootInstant(Duration::new(
            u64::try_from(ts.tv_sec).unwrap_or(0),
            u32::try_from(ts.tv_nsec).unwrap_or(0),
        ))
    }

    /// How long after `earlier` this is; zero if it is not after it.
    pub fn saturating_duration_since(self, earlier: BootInstant) -> Duration {
        self.0.saturating_sub(earlier.0)
    }

    /// `self - d`, or the clock's zero if that would be before it.
    pub fn saturating_sub(self, d: Duration) -> BootInstant {
        BootInstant(self.0.saturating_sub(d))
    }
}

impl Add<Duration> for BootInstant {
    type Output = BootInstant;
    fn add(self, d: Duration) -> BootInstant {
        BootInstant(self.0.saturating_add(d))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_os = "linux")]
    #[test]
    fn is_the_clock_that_counts_suspended_time() {
        // /proc/uptime is CLOCK_BOOTTIME, suspended time included.
        let uptime: f64 = std::fs::read_to_string("/proc/uptime")
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let ours = BootInstant::now().0.as_secs_f64();
        assert!((ours - uptime).abs() < 1.0, "{ours} vs {uptime}");
        assert_eq!(CLOCK, libc::CLOCK_BOOTTIME);
    }

    #[test]
    fn moves_forward() {
        let a = BootInstant::now();
        std::thread::sleep(Duration::from_millis(2));
        let b = BootInstant::now();
        assert!(b > a);
        assert!(b.saturating_duration_since(a) >= Duration::from_millis(2));
        assert_eq!(a.saturating_duration_since(b), Duration::ZERO);
    }
}
