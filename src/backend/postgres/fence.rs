//! Fencing a caller's own transaction with a held lock: the database side of
//! [`Lock::fence`](crate::Lock::fence).

use std::time::Duration;

use postgres::GenericClient;
use postgres::error::SqlState;

use super::{col, sql};
use crate::error::{Error, Result};

/// What the fence found in the caller's transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fenced {
    /// The grant's lease row is locked `FOR KEY SHARE` until the transaction
    /// ends and was live. `fresh`: judged on the row's latest version (`READ
    /// COMMITTED`); otherwise on the transaction's snapshot, which cannot
    /// predate a grant (that fails) but may predate a release or a renewal.
    Live { fresh: bool },
    /// The lease was released.
    Released,
    /// The lease had expired by the database clock. `fresh`: judged on the
    /// row's latest version; otherwise on the transaction's snapshot, whose
    /// `expires_at` may predate renewals since (the lease may be live).
    Expired { fresh: bool },
    /// No row of that grant (and owner) that the transaction can see: the
    /// name was granted since; or, while the lease is held, a snapshot taken
    /// before this grant, or a transaction on another database.
    Gone,
    /// The name was granted since the transaction's snapshot (40001).
    GrantedSince,
    /// The wait for the lease table's or row's lock ran past `limit`.
    TimedOut,
}

/// Runs the fence `statement` (see [`sql::Sql::fence`]) for grant `token`
/// of `name` to `owner` in the caller's transaction `tx`, its waits bounded
/// by `limit`.
///
/// # Errors
/// [`Error::InvalidConfig`] when `tx` is not in a transaction block (a fence
/// there would end with its own statement); any other database error.
pub(crate) fn run<C: GenericClient>(
    tx: &mut C,
    statement: &str,
    name: &str,
    owner: &str,
    token: u64,
    limit: Duration,
) -> Result<Fenced> {
    let Ok(token) = i64::try_from(token) else {
        return Ok(Fenced::Gone);
    };
    let ms = i64::try_from(limit.as_millis())
        .unwrap_or(i64::MAX)
        .clamp(1, sql::MAX_LOCK_TIMEOUT_MS);
    let classify = |e: postgres::Error| match e.code() {
        Some(c) if *c == SqlState::LOCK_NOT_AVAILABLE => Ok(Fenced::TimedOut),
        Some(c) if *c == SqlState::T_R_SERIALIZATION_FAILURE => Ok(Fenced::GrantedSince),
        _ => Err(Error::database(e)),
    };
    if let Err(e) = tx.batch_execute(&sql::fence_prepare(ms)) {
        if e.code() == Some(&SqlState::NO_ACTIVE_SQL_TRANSACTION) {
            return Err(Error::InvalidConfig(
                "Lock::fence needs the connection to be in a transaction (BEGIN, or a \
                 postgres::Transaction): outside one, the fence would end with its own \
                 statement"
                    .to_owned(),
            ));
        }
        return classify(e);
    }
    let row = match tx.query_one(statement, &[&name, &token, &owner]) {
        Ok(row) => row,
        Err(e) => return classify(e),
    };
    let state: String = col(&row, 0)?;
    let isolation: String = col(&row, 1)?;
    let fresh = isolation == "read committed";
    Ok(match state.as_str() {
        "live" => Fenced::Live { fresh },
        "released" => Fenced::Released,
        "expired" => Fenced::Expired { fresh },
        _ => Fenced::Gone,
    })
}
