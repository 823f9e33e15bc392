//! What a client last saw of an unlogged lease table's bounds (the epoch
//! row's token ceiling, lease horizon and longest TTL, see `sql::Unlogged`).
//!
//! A try grants only within them, so that it need not raise them in its own
//! statement: lockbox only ever raises them, so what was seen is at most
//! what they are, and a grant within it is covered. A grant that would pass them
//! is made by the raising statement instead (`sql::grant`), whose answer
//! teaches the session the bounds as they are then.
//!
//! Kept per session, not per client: a session ends with its server (a
//! crash, a restart, a restore from a backup, which can lower the bounds),
//! so what it saw was seen on the server it talks to. A standby's sessions,
//! which survive a promotion, see nothing (their grants fail before they
//! answer). And kept for [`FRESH_FOR`] only: an operator who lowers the
//! epoch row, or drops and re-creates its table, while clients run (which
//! nothing in lockbox does) is followed within that long, plus the wait of
//! a statement sent just before it ends — each session's next try after it
//! raises the row again (or fails, without the table or its row).

use std::time::{Duration, Instant, SystemTime};

use postgres::Row;

/// How long a session grants within the bounds it saw before it reads them
/// again (with a raising grant): one more round trip per session per this
/// long.
pub(crate) const FRESH_FOR: Duration = Duration::from_secs(5);

/// The epoch row's values as this session last saw them, and when. Until
/// the first raising statement has answered, and once [`FRESH_FOR`] has
/// passed, nothing fits, so the session's next grant raises.
#[derive(Debug, Default)]
pub(crate) struct Bounds {
    seen: Option<Seen>,
}

#[derive(Debug)]
struct Seen {
    at: Instant,
    ceiling: i64,
    horizon: SystemTime,
    max_ttl_ms: i64,
}

impl Bounds {
    /// `$10`–`$12` of a checked try: the ceiling, the horizon and the
    /// longest TTL (none that any grant fits, when not seen lately).
    pub fn params(&self) -> (i64, SystemTime, i64) {
        match &self.seen {
            Some(s) if s.at.elapsed() < FRESH_FOR => (s.ceiling, s.horizon, s.max_ttl_ms),
            _ => (0, SystemTime::UNIX_EPOCH, -1),
        }
    }

    /// Learns the bounds from the answer of a raising statement sent at
    /// `sent` (columns 5–7), as they were then (lower ones too: the row is
    /// what counts); an answer without them (no epoch row), or one that
    /// cannot be read, leaves nothing seen. They are trusted for
    /// [`FRESH_FOR`] from `sent`: the statement read them after it was sent,
    /// however long its answer took to come back.
    pub fn learn(&mut self, row: &Row, sent: Instant) {
        if row.len() < 8 {
            return;
        }
        self.seen = match (
            row.try_get::<_, i64>(5),
            row.try_get::<_, SystemTime>(6),
            row.try_get::<_, i64>(7),
        ) {
            (Ok(ceiling), Ok(horizon), Ok(max_ttl_ms)) => Some(Seen {
                at: sent,
                ceiling,
                horizon,
                max_ttl_ms,
            }),
            _ => None,
        };
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
    super::sql::raised(e, super::sql::CEILING_PASSED)
}
