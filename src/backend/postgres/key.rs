//! Lock name → PostgreSQL advisory lock key, and lockbox's own internal keys.
//!
//! PostgreSQL has two advisory key spaces that never meet: the single-`bigint`
//! form `pg_advisory_lock(k)` (`objsubid = 1` in `pg_locks`) and the two-`int4`
//! form `pg_advisory_lock(k1, k2)` (`objsubid = 2`). Each holds 64 bits.
//!
//! - **Names** use the whole two-`int4` space: the 64-bit FNV-1a hash of the
//!   name's UTF-8 bytes, high half as `k1`, low half as `k2`. FNV-1a is fixed by
//!   its published definition: the same on every platform and release. Two names
//!   share a key with probability about `n² / 2⁶⁵` for `n` active names (one in
//!   about 10⁹ at 200 000 names), and even then nothing breaks: they only wait for
//!   each other, and waiting and zombie takeover look at whoever holds the *key*,
//!   whatever name it holds it for (the lease row, keyed by the full name, is what
//!   decides who holds a name).
//! - **Internal keys** (serialising table creation, probing whether a connection
//!   keeps its session) use the single-`bigint` form, which no name can reach.
//!
//! # Upgrading from the 32-bit scheme
//!
//! lockbox 0.1 locked `(0x6C6B6278, fnv1a_32(name))` in the two-`int4` form and
//! used `(0x6C6B6278, 0)` and `(0x6C6B6278, 0x7FFFFFFF)` internally. During a
//! rolling upgrade old and new processes lock different keys for one name, so the
//! advisory lock no longer excludes them from each other; the lease row still
//! does. Every grant is a single `INSERT … ON CONFLICT (name) DO UPDATE … WHERE
//! released or expired`, which takes the row lock and judges the *latest* row
//! version, so of two processes granting one name at once, whatever their keys,
//! the second finds the first's live lease and is refused: they never both hold
//! a name. What degrades until every process runs the new scheme: a waiter of one
//! scheme does not block on a holder of the other (it finds the live lease and
//! waits it out by the lease's end instead of being woken by the release), and a
//! zombie of one scheme is not terminated by waiters of the other (its expired
//! lease is simply taken over; its renewals then fail on the lease row).

/// The first key of lockbox 0.1's two-`int4` advisory locks: the bytes `lkbx`.
/// Kept to build the internal keys, which are disjoint from every name key.
pub const NAMESPACE: i32 = 0x6C6B_6278;

/// Internal key (single-`bigint` form): serialises creating or upgrading the
/// lease table.
pub(crate) const DDL_KEY: i64 = (NAMESPACE as i64) << 32;
/// Internal key (single-`bigint` form): probes whether a connection path keeps
/// its server session.
pub(crate) const SESSION_PROBE_KEY: i64 = DDL_KEY | 0x7FFF_FFFF;

/// The 64-bit advisory key of `name`: FNV-1a 64 of its UTF-8 bytes, as `i64`.
pub(crate) fn name_key(name: &str) -> i64 {
    let mut hash: u64 = 0xCBF2_9CE4_8422_2325;
    for byte in name.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01B3);
    }
    hash as i64
}

/// The two `int4` arguments of `pg_advisory_lock(k1, k2)` for a 64-bit key:
/// high half, low half.
pub(crate) fn split(key: i64) -> (i32, i32) {
    ((key >> 32) as i32, key as i32)
}

/// The PostgreSQL advisory lock key lockbox uses for `name`, as the two `int4`
/// arguments of `pg_advisory_lock(key1, key2)`: the high and low halves of the
/// 64-bit FNV-1a hash of the name's UTF-8 bytes.
///
/// In `pg_locks` it shows as `locktype = 'advisory'`, `classid = key1` and
/// `objid = key2` (both as unsigned `oid`s), `objsubid = 2`. Useful to find who
/// holds or waits for a lock from SQL. Another name may (rarely) share the key;
/// lockbox's own internal keys never do (they use the single-`bigint` form).
pub fn advisory_key(name: &str) -> (i32, i32) {
    split(name_key(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_published_fnv1a_64_vectors() {
        // Reference values of 64-bit FNV-1a.
        assert_eq!(name_key("") as u64, 0xCBF2_9CE4_8422_2325);
        assert_eq!(name_key("a") as u64, 0xAF63_DC4C_8601_EC8C);
        assert_eq!(name_key("foobar") as u64, 0x8594_4171_F739_67E8);
    }

    #[test]
    fn splits_into_high_and_low_halves() {
        assert_eq!(
            split(0x0123_4567_89AB_CDEF),
            (0x0123_4567, 0x89AB_CDEFu32 as i32)
        );
        assert_eq!(split(-1), (-1, -1));
        let (hi, lo) = advisory_key("foobar");
        assert_eq!(((hi as i64) << 32) | (lo as u32 as i64), name_key("foobar"));
    }

    #[test]
    fn is_case_sensitive() {
        assert_ne!(name_key("Invoices"), name_key("invoices"));
    }

    /// These names hashed onto lockbox 0.1's internal keys in the shared
    /// two-`int4` space; internal keys now live in the `bigint` space.
    #[test]
    fn the_old_internal_key_collisions_are_gone() {
        for name in ["jobs/f1VCAo", "jobs/dlesMt"] {
            assert_ne!(advisory_key(name), (NAMESPACE, 0));
            assert_ne!(advisory_key(name), (NAMESPACE, 0x7FFF_FFFF));
        }
    }
}
