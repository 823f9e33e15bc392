//! Lock-name validation, shared by every backend.

use crate::error::{Error, Result};

/// The longest accepted lock name, in bytes of UTF-8.
///
/// Names are stored whole in the lease table's primary key, so they are kept well
/// under PostgreSQL's index-entry size limit.
pub const MAX_NAME_LEN: usize = 512;

/// Checks a lock name: non-empty UTF-8, no NUL character, at most [`MAX_NAME_LEN`]
/// bytes. Names are compared exactly (case-sensitively, byte for byte).
pub(crate) fn validate(name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(Error::InvalidName("the name is empty".into()));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(Error::InvalidName(format!(
            "the name is {} bytes long; the limit is {MAX_NAME_LEN}",
            name.len()
        )));
    }
    if name.contains('\0') {
        return Err(Error::InvalidName(
            "the name contains a NUL character".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_limit_and_rejects_beyond_it() {
        assert!(validate(&"a".repeat(MAX_NAME_LEN)).is_ok());
        assert!(matches!(
            validate(&"a".repeat(MAX_NAME_LEN + 1)),
            Err(Error::InvalidName(_))
        ));
        // The limit counts bytes, not characters.
        assert!(validate(&"é".repeat(MAX_NAME_LEN / 2)).is_ok());
        assert!(validate(&"é".repeat(MAX_NAME_LEN / 2 + 1)).is_err());
    }

    #[test]
    fn rejects_empty_and_nul() {
        assert!(matches!(validate(""), Err(Error::InvalidName(_))));
        assert!(matches!(validate("a\0b"), Err(Error::InvalidName(_))));
        assert!(validate("x").is_ok());
    }
}
