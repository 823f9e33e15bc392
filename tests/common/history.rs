//! The history checker: a lease table whose every version is logged by a trigger,
//! a resource written with fenced read-modify-writes, and the checks run on the
//! database's own record after a workload.

#![allow(dead_code)]

use super::{admin, database_url};

/// A small deterministic PRNG (xorshift64*), so a failing run can be replayed
/// from its printed seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// How a transaction-fenced write checks its lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TxFence {
    /// `Lock::fence`.
    Guard,
    /// The lease table's SQL function, `<table>_fence(name, token)`.
    Function,
    /// No check: the negative control.
    None,
}

/// One history run's tables: `{id}_leases` (the lease table, with a version log
/// `{id}_versions`), `{id}_resource` and `{id}_writes` (accepted writes).
#[derive(Clone, Debug)]
pub struct Run {
    pub id: String,
    pub names: Vec<String>,
}

impl Run {
    pub fn create(id: &str, names: usize) -> Run {
        let run = Run {
            id: id.to_owned(),
            names: (0..names).map(|i| format!("{id}-name-{i}")).collect(),
        };
        let t = &run.id;
        admin()
            .batch_execute(&format!(
                "CREATE TABLE {t}_versions (name text, token bigint, acquired_at timestamptz, \
                     expires_at timestamptz, released_at timestamptz, at timestamptz DEFAULT clock_timestamp());
                 CREATE TABLE {t}_resource (name text PRIMARY KEY, value bigint NOT NULL, max_token bigint NOT NULL);
                 CREATE TABLE {t}_writes (id bigserial PRIMARY KEY, name text, token bigint);
                 CREATE TABLE {t}_txwrites (name text, token bigint, value bigint);"
            ))
            .unwrap();
        // The lease table itself is created by lockbox; the trigger is added then.
        let client = lockbox::LockClient::builder(database_url())
            .table(&run.lease_table())
            .build()
            .unwrap();
        drop(client);
        admin()
            .batch_execute(&format!(
                "CREATE FUNCTION {t}_log() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
                     INSERT INTO {t}_versions (name, token, acquired_at, expires_at, released_at) \
                     VALUES (NEW.name, NEW.token, NEW.acquired_at, NEW.expires_at, NEW.released_at); \
                     RETURN NEW; END $$;
                 CREATE TRIGGER {t}_log AFTER INSERT OR UPDATE ON {t}_leases \
                     FOR EACH ROW EXECUTE FUNCTION {t}_log();"
            ))
            .unwrap();
        for name in &run.names {
            admin()
                .execute(
                    &format!("INSERT INTO {t}_resource VALUES ($1, 0, 0)"),
                    &[name],
                )
                .unwrap();
        }
        run
    }

    pub fn lease_table(&self) -> String {
        format!("{}_leases", self.id)
    }

    /// The fenced read-modify-write: accepted only if no higher token has written.
    /// `fenced = false` is the negative control's broken resource.
    pub fn write(&self, db: &mut postgres::Client, name: &str, token: u64, fenced: bool) -> bool {
        let t = &self.id;
        let fence = if fenced { "AND max_token <= $2" } else { "" };
        let n = db
            .execute(
                &format!(
                    "WITH u AS (UPDATE {t}_resource SET value = value + 1, max_token = $2 \
                         WHERE name = $1 {fence} RETURNING 1) \
                     INSERT INTO {t}_writes (name, token) SELECT $1, $2 FROM u"
                ),
                &[&name, &(token as i64)],
            )
            .unwrap();
        n == 1
    }

    /// A read-modify-write in one transaction, fenced by the lease itself
    /// instead of a token column: reads the resource, waits `pause`, runs the
    /// check (`Lock::fence`, or the SQL function when `by_function`; none when
    /// `fenced` is false: the negative control), then writes what it read plus
    /// one and logs it. Returns whether the write was committed.
    pub fn write_in_tx(
        &self,
        db: &mut postgres::Client,
        lock: &lockbox::Lock,
        pause: std::time::Duration,
        fence: TxFence,
    ) -> bool {
        let t = &self.id;
        let name = lock.name();
        let token = lock.fencing_token() as i64;
        let Ok(mut tx) = db.transaction() else {
            return false;
        };
        let read: i64 = tx
            .query_one(
                &format!("SELECT value FROM {t}_resource WHERE name = $1"),
                &[&name],
            )
            .unwrap()
            .get(0);
        std::thread::sleep(pause);
        let checked = match fence {
            TxFence::Guard => lock.fence(&mut tx).is_ok(),
            TxFence::Function => tx
                .execute(
                    &format!("SELECT {t}_leases_fence($1, $2)"),
                    &[&name, &token],
                )
                .is_ok(),
            TxFence::None => true,
        };
        if !checked {
            return false;
        }
        tx.execute(
            &format!("UPDATE {t}_resource SET value = $2 WHERE name = $1"),
            &[&name, &(read + 1)],
        )
        .unwrap();
        tx.execute(
            &format!("INSERT INTO {t}_txwrites VALUES ($1, $2, $3)"),
            &[&name, &token, &(read + 1)],
        )
        .unwrap();
        tx.commit().is_ok()
    }

    /// The checks of the transaction-fenced writes: per name, the values
    /// written are exactly 1..=n, each once (no write read a value another had
    /// already replaced: no lost update), the resource holds n, and ordered by
    /// value their tokens never go down (no stale holder wrote after a newer).
    pub fn check_tx(&self) -> Vec<String> {
        let mut db = admin();
        let t = &self.id;
        let mut violations = Vec::new();
        for name in &self.names {
            let writes: Vec<(i64, i64)> = db
                .query(
                    &format!("SELECT value, token FROM {t}_txwrites WHERE name = $1 ORDER BY value, token"),
                    &[name],
                )
                .unwrap()
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect();
            for (i, (value, _)) in writes.iter().enumerate() {
                if *value != i as i64 + 1 {
                    violations.push(format!(
                        "{name}: write #{} wrote {value}: a lost update (writes {writes:?})",
                        i + 1
                    ));
                    break;
                }
            }
            for w in writes.windows(2) {
                if w[1].1 < w[0].1 {
                    violations.push(format!(
                        "{name}: write of {} with token {} after token {}",
                        w[1].0, w[1].1, w[0].1
                    ));
                }
            }
            let value: i64 = db
                .query_one(
                    &format!("SELECT value FROM {t}_resource WHERE name = $1"),
                    &[name],
                )
                .unwrap()
                .get(0);
            if value != writes.len() as i64 {
                violations.push(format!(
                    "{name}: value {value} but {} committed writes",
                    writes.len()
                ));
            }
        }
        violations
    }

    pub fn tx_writes(&self) -> i64 {
        admin()
            .query_one(&format!("SELECT count(*) FROM {}_txwrites", self.id), &[])
            .unwrap()
            .get(0)
    }

    /// Runs every check on the database's record (grants, and the writes
    /// fenced by a token column); returns the violations found.
    pub fn check(&self) -> Vec<String> {
        let mut violations = self.check_grants();
        violations.extend(self.check_token_writes());
        violations
    }

    /// 1 and 2: per grant (token), its interval by the database clock: from
    /// the grant to the earlier of its release and its last expiry. Ordered by
    /// grant time, tokens must increase and intervals must not overlap.
    pub fn check_grants(&self) -> Vec<String> {
        let mut db = admin();
        let t = &self.id;
        let mut violations = Vec::new();
        for name in &self.names {
            let grants = db
                .query(
                    &format!(
                        "SELECT token, min(acquired_at), \
                                LEAST(max(expires_at), min(released_at)) \
                         FROM {t}_versions WHERE name = $1 GROUP BY token ORDER BY min(acquired_at)"
                    ),
                    &[name],
                )
                .unwrap();
            let mut prev: Option<(i64, std::time::SystemTime)> = None;
            for g in &grants {
                let (token, start, end): (i64, std::time::SystemTime, std::time::SystemTime) =
                    (g.get(0), g.get(1), g.get(2));
                if let Some((prev_token, prev_end)) = prev {
                    if token <= prev_token {
                        violations
                            .push(format!("{name}: token {token} granted after {prev_token}"));
                    }
                    if start < prev_end {
                        violations
                            .push(format!("{name}: grant {token} overlaps grant {prev_token}"));
                    }
                }
                prev = Some((token, end));
            }
        }
        violations
    }

    /// 3: no lost update, no accepted write lowering max_token.
    pub fn check_token_writes(&self) -> Vec<String> {
        let mut db = admin();
        let t = &self.id;
        let mut violations = Vec::new();
        for name in &self.names {
            let value: i64 = db
                .query_one(
                    &format!("SELECT value FROM {t}_resource WHERE name = $1"),
                    &[name],
                )
                .unwrap()
                .get(0);
            let tokens: Vec<i64> = db
                .query(
                    &format!("SELECT token FROM {t}_writes WHERE name = $1 ORDER BY id"),
                    &[name],
                )
                .unwrap()
                .iter()
                .map(|r| r.get(0))
                .collect();
            if value != tokens.len() as i64 {
                violations.push(format!(
                    "{name}: value {value} but {} acknowledged writes",
                    tokens.len()
                ));
            }
            for w in tokens.windows(2) {
                if w[1] < w[0] {
                    violations.push(format!(
                        "{name}: accepted write with token {} after {}",
                        w[1], w[0]
                    ));
                }
            }
        }
        violations
    }

    /// 4: after quiescing, no unexpired unreleased lease.
    pub fn live_leases(&self) -> i64 {
        admin()
            .query_one(
                &format!(
                    "SELECT count(*) FROM {} WHERE released_at IS NULL AND expires_at > clock_timestamp()",
                    self.lease_table()
                ),
                &[],
            )
            .unwrap()
            .get(0)
    }

    pub fn writes(&self) -> i64 {
        admin()
            .query_one(&format!("SELECT count(*) FROM {}_writes", self.id), &[])
            .unwrap()
            .get(0)
    }

    pub fn drop_tables(&self) {
        let t = &self.id;
        let _ = admin().batch_execute(&format!(
            "DROP TABLE IF EXISTS {t}_leases, {t}_versions, {t}_resource, {t}_writes, \
                 {t}_txwrites; \
             DROP FUNCTION IF EXISTS {t}_log(); \
             DROP FUNCTION IF EXISTS {t}_leases_fence(text, bigint); \
             DROP FUNCTION IF EXISTS {t}_leases_wait_grant_v3(integer, integer, text, text, \
                 bigint, text, integer, timestamp with time zone, bigint, bigint, bigint);"
        ));
    }
}

/// The run's seed: `LOCKBOX_SEED` to replay one, else the time.
pub fn seed() -> u64 {
    std::env::var("LOCKBOX_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        })
}

/// The system-wide monotonic clock (the same in every process of the
/// machine), in ns.
pub fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to write into.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
