//! What a client last saw of an unlogged lease table's bounds (the epoch
//! row's token ceiling, lease horizon and longest TTL, see `sql::Unlogged`).
//!
//! A try grants only within them, so that it need not raise them in its own
//! statement: the bounds only ever rise, so what was seen is at most what
//! they are, and a grant within it is covered. A grant that would pass them
//! is made by the raising statement instead (`sql::grant`), whose answer
//! teaches the session the bounds as they are then.
//!
//! Kept per session, not per client: a session ends with its server (a
//! crash, a restart, a restore from a backup, which can lower the bounds),
//! so what it saw was seen on the server it talks to. A standby's sessions,
//! which survive a promotion, see nothing (their grants fail before they
//! answer).

use std::time::SystemTime;

use postgres::Row;

/// Lower bounds of the epoch row's values, as this session last saw them.
/// Until the first raising statement has answered, nothing fits (no
/// horizon), so a session's first grant raises.
#[derive(Debug, Default)]
pub(crate) struct Bounds {
    ceiling: i64,
    horizon: Option<SystemTime>,
    max_ttl_ms: i64,
}

impl Bounds {
    /// `$10`–`$12` of a checked try: the ceiling, the horizon and the
    /// longest TTL.
    pub fn params(&self) -> (i64, SystemTime, i64) {
        (
            self.ceiling,
            self.horizon.unwrap_or(SystemTime::UNIX_EPOCH),
            self.max_ttl_ms,
        )
    }

    /// Learns the bounds from a raising statement's answer (columns 5–7).
    /// Each only ever goes up; an answer without them, or one that cannot be
    /// read, teaches nothing: the next grant then raises again.
    pub fn learn(&mut self, row: &Row) {
        if row.len() < 8 {
            return;
        }
        if let (Ok(ceiling), Ok(horizon), Ok(max_ttl_ms)) = (
            row.try_get::<_, i64>(5),
            row.try_get::<_, SystemTime>(6),
            row.try_get::<_, i64>(7),
        ) {
            self.ceiling = self.ceiling.max(ceiling);
            self.horizon = self.horizon.max(Some(horizon));
            self.max_ttl_ms = self.max_ttl_ms.max(max_ttl_ms);
        }
    }
}

/// Whether a checked try's answer says its grant would have passed the
/// bounds seen (column 5): the key is held, and the raising statement
/// grants next.
pub(crate) fn passed(row: &Row) -> bool {
    row.len() > 4 && matches!(row.try_get::<_, Option<bool>>(4), Ok(Some(true)))
}

/// Whether a checked try failed because the token it wrote is above the
/// ceiling seen (its write undone, the key held).
pub(crate) fn ceiling_passed(e: &postgres::Error) -> bool {
    e.as_db_error().is_some_and(|db| {
        *db.code() == postgres::error::SqlState::INVALID_TEXT_REPRESENTATION
            && db.message().contains(super::sql::CEILING_PASSED)
    })
}
