//! A lease table in a schema of its own, with its wait-and-grant function, an
//! application role that uses it (not a superuser: privileges apply to it), and
//! other roles a review may add (for the `review_wg_*` reviews).

use std::time::Duration;

use lockbox::LockClient;

use super::{admin, eventually, is_waiting, ms, unique, url_as_user, url_with_app};

/// The function's argument types, as lockbox declares them.
pub const WG_ARGS: &str = "integer, integer, text, text, bigint, text, integer, \
     timestamp with time zone, bigint, bigint, bigint";

/// Its result, as lockbox declares it.
pub const WG_RESULT: &str =
    "TABLE(lockbox_got boolean, lockbox_token bigint, lockbox_waited_us bigint)";

pub struct WgFixture {
    pub schema: String,
    /// The application's role: USAGE on the schema, DML on the table, what
    /// takeovers need; no CREATE on the schema.
    pub app_role: String,
    roles: Vec<String>,
}

impl WgFixture {
    /// The schema and the table, created by a build as the admin (which also
    /// creates the function, owned by the admin, the table's owner), and the
    /// application role.
    pub fn new() -> WgFixture {
        let schema = unique("wgr").replace('-', "_");
        let app_role = unique("wgr_app").replace('-', "_");
        admin()
            .batch_execute(&format!("CREATE SCHEMA {schema}"))
            .unwrap();
        let f = WgFixture {
            schema,
            app_role: app_role.clone(),
            roles: vec![app_role.clone()],
        };
        drop(
            LockClient::builder(super::database_url())
                .table(&f.table())
                .build()
                .expect("build as the admin"),
        );
        admin()
            .batch_execute(&format!(
                "CREATE ROLE {app_role} LOGIN; \
                 GRANT pg_signal_backend, pg_read_all_stats TO {app_role}; \
                 GRANT USAGE ON SCHEMA {s} TO {app_role}; \
                 GRANT SELECT, INSERT, UPDATE, DELETE ON {t} TO {app_role}; \
                 GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA {s} TO {app_role};",
                s = f.schema,
                t = f.table(),
            ))
            .unwrap();
        f
    }

    pub fn table(&self) -> String {
        format!("{}.leases", self.schema)
    }

    /// The function's name, schema-qualified.
    pub fn function(&self) -> String {
        format!("{}.leases_wait_grant_v3", self.schema)
    }

    /// The function's signature, for DROP / CREATE.
    pub fn signature(&self) -> String {
        format!("{}({WG_ARGS})", self.function())
    }

    /// A role of the review's own (dropped with the fixture), created with `grants`
    /// (SQL, `{role}` and `{schema}` replaced).
    pub fn role(&mut self, prefix: &str, grants: &str) -> String {
        let role = unique(prefix).replace('-', "_");
        admin()
            .batch_execute(&format!(
                "CREATE ROLE {role} LOGIN; {}",
                grants
                    .replace("{role}", &role)
                    .replace("{schema}", &self.schema)
            ))
            .unwrap();
        self.roles.push(role.clone());
        role
    }

    /// A plain connection as `role`.
    pub fn connect_as(&self, role: &str) -> postgres::Client {
        postgres::Client::connect(&url_as_user(role), postgres::NoTls).expect("connect as role")
    }

    /// A lockbox client as the application role, with application name `app`.
    pub fn app_client(&self, app: &str, ttl: Duration) -> LockClient {
        LockClient::builder(&url_with_app(&url_as_user(&self.app_role), app))
            .table(&self.table())
            .ttl(ttl)
            .build()
            .expect("build as the application role")
    }

    /// The function's body as it is now (lockbox's, when it created it).
    pub fn body(&self) -> String {
        admin()
            .query_one(
                "SELECT prosrc FROM pg_proc WHERE oid = to_regprocedure($1)",
                &[&self.signature()],
            )
            .expect("the function exists")
            .get(0)
    }

    /// The role owning the function, if it exists.
    pub fn function_owner(&self) -> Option<String> {
        admin()
            .query_one(
                "SELECT (SELECT proowner::regrole::text FROM pg_proc \
                 WHERE oid = to_regprocedure($1))",
                &[&self.signature()],
            )
            .unwrap()
            .get(0)
    }

    /// SQL creating (or replacing) the function with `body` (`create` is
    /// `CREATE` or `CREATE OR REPLACE`).
    pub fn create_sql(&self, create: &str, body: &str) -> String {
        format!(
            "{create} FUNCTION {sig} RETURNS {WG_RESULT} LANGUAGE plpgsql VOLATILE \
             SECURITY INVOKER AS $wgbody${body}$wgbody$",
            sig = self.signature()
        )
    }

    /// SQL for an impostor that grants at once, without the advisory lock and
    /// without writing a lease, with token 999999.
    pub fn impostor_sql(&self, create: &str) -> String {
        self.create_sql(
            create,
            " BEGIN RETURN QUERY SELECT true, 999999::bigint, 0::bigint; END ",
        )
    }
}

/// Waits until a session of `app` waits on an advisory lock; returns the query it
/// runs then.
pub fn waiting_query(app: &str) -> String {
    assert!(
        eventually(Duration::from_secs(10), || is_waiting(app)),
        "the acquire never waited"
    );
    admin()
        .query_one(
            "SELECT a.query FROM pg_stat_activity a JOIN pg_locks k ON k.pid = a.pid \
             WHERE a.application_name = $1 AND k.locktype = 'advisory' AND NOT k.granted",
            &[&app],
        )
        .unwrap()
        .get(0)
}

/// Leaves one idle session in `client`'s pool, configured (its statements
/// prepared) now.
pub fn warm_pool(client: &LockClient) {
    let name = unique("wgr-warm");
    client
        .try_lock(&name)
        .unwrap()
        .expect("a free lock")
        .release()
        .unwrap();
}

impl Drop for WgFixture {
    fn drop(&mut self) {
        let mut db = admin();
        for role in &self.roles {
            let _ = db.execute(
                "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity WHERE usename = $1",
                &[role],
            );
        }
        let _ = db.batch_execute(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.schema));
        for role in &self.roles {
            let _ = db.batch_execute(&format!("DROP OWNED BY {role}; DROP ROLE IF EXISTS {role}"));
        }
    }
}

/// Default TTL for the reviews' clients.
pub fn ttl() -> Duration {
    ms(30_000)
}
