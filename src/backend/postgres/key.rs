//! Lock name → PostgreSQL advisory lock key.
//!
//! lockbox uses the two-`int4` form of the advisory lock functions,
//! `pg_advisory_lock(NAMESPACE, fnv1a_32(name))`. PostgreSQL keeps the two forms
//! apart (`objsubid` 2 versus 1 in `pg_locks`), so no tool that uses the single
//! `bigint` form, with small integers or anything else, can ever meet a lockbox key;
//! the fixed first half keeps lockbox away from other users of the two-key form.
//!
//! The hash is 32-bit FNV-1a over the name's UTF-8 bytes: fixed by its published
//! definition, the same on every platform and release. Two names may share a key;
//! that only makes them wait for each other, because the lease row — the authority
//! on who holds a name — is keyed by the full name.

/// The first key of every lockbox advisory lock: the bytes `lkbx`.
pub const NAMESPACE: i32 = 0x6C6B_6278;

/// The second key for `name`: 32-bit FNV-1a of its UTF-8 bytes, reinterpreted as `i32`.
pub(crate) fn name_key(name: &str) -> i32 {
    let mut hash: u32 = 0x811C_9DC5;
    for byte in name.bytes() {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash as i32
}

/// The PostgreSQL advisory lock key lockbox uses for `name`, as the two `int4`
/// arguments of `pg_advisory_lock(key1, key2)`: `(NAMESPACE, fnv1a_32(name))`.
///
/// In `pg_locks` it shows as `locktype = 'advisory'`, `classid = key1`,
/// `objid = key2` (as an unsigned `oid`), `objsubid = 2`. Useful to find who holds
/// or waits for a lock from SQL.
pub fn advisory_key(name: &str) -> (i32, i32) {
    (NAMESPACE, name_key(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_published_fnv1a_vectors() {
        // Reference values of 32-bit FNV-1a.
        assert_eq!(name_key("") as u32, 0x811C_9DC5);
        assert_eq!(name_key("a") as u32, 0xE40C_292C);
        assert_eq!(name_key("foobar") as u32, 0xBF9C_F968);
    }

    #[test]
    fn is_case_sensitive() {
        assert_ne!(name_key("Invoices"), name_key("invoices"));
    }
}
