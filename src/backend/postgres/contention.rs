//! Which advisory keys this client lately found held by another session: a
//! blocking acquire of such a key waits with its first statement (a hand-off
//! then costs one round trip), one of any other key tries first (a free lock
//! is then granted by the cheaper statement). Either way is correct; this
//! only picks the faster.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// How long a key counts as contended after it was last found held.
const REMEMBERED: Duration = Duration::from_secs(5);
/// At most this many keys are remembered; past it, the memory starts over
/// (a client cycling through many contended names tries first a while),
/// which costs no scan of the map under its lock.
const CAPACITY: usize = 4096;

#[derive(Debug, Default)]
pub(crate) struct Contention {
    found_held: Mutex<HashMap<(i32, i32), Instant>>,
}

impl Contention {
    /// Notes that an acquire of `key` found it held by another session.
    pub fn found_held(&self, key: (i32, i32)) {
        let mut map = self.found_held.lock();
        if map.len() >= CAPACITY && !map.contains_key(&key) {
            map.clear();
        }
        map.insert(key, Instant::now());
    }

    /// Whether an acquire of `key` found it held within [`REMEMBERED`].
    pub fn is_contended(&self, key: (i32, i32)) -> bool {
        self.found_held
            .lock()
            .get(&key)
            .is_some_and(|at| at.elapsed() < REMEMBERED)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_keys_found_held_and_starts_over_when_full() {
        let c = Contention::default();
        assert!(!c.is_contended((1, 2)));
        c.found_held((1, 2));
        assert!(c.is_contended((1, 2)));
        assert!(!c.is_contended((2, 1)));
        for i in 0..CAPACITY as i32 {
            c.found_held((0, i));
        }
        assert!(c.found_held.lock().len() <= CAPACITY);
        assert!(c.is_contended((0, CAPACITY as i32 - 1)));
    }
}
