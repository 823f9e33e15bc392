//! A throwaway schema for the lease table and another, put on the role's search
//! path through the connection's `options`, holding an exact-match operator that
//! would beat `pg_catalog`'s (for the operator-shadowing reviews).

use std::time::Duration;

use lockbox::LockClient;

use super::{admin, unique, url_with_options};

pub struct Shadow {
    /// Where the lease table lives.
    pub schema: String,
    /// The schema on the search path, holding the operator.
    pub evil: String,
}

impl Shadow {
    /// Creates both schemas; `operator` is SQL creating the operator, with
    /// `{evil}` standing for the evil schema's name.
    pub fn create(operator: &str) -> Shadow {
        let base = unique("shadow").replace('-', "_");
        let schema = format!("{base}_s");
        let evil = format!("{base}_evil");
        admin()
            .batch_execute(&format!(
                "CREATE SCHEMA {schema}; CREATE SCHEMA {evil}; {}",
                operator.replace("{evil}", &evil)
            ))
            .expect("create the shadowing schema");
        Shadow { schema, evil }
    }

    /// A client whose sessions have the evil schema on their search path, with
    /// its lease table in the other schema; and its application name.
    pub fn client(&self, ttl: Duration) -> (LockClient, String) {
        let app = unique("shadowed");
        let url = url_with_options(&app, &format!("-c search_path={},public", self.evil));
        let client = LockClient::builder(&url)
            .table(&format!("{}.leases", self.schema))
            .ttl(ttl)
            .build()
            .expect("build a client");
        (client, app)
    }

    /// What the name's lease has left on the server (ms; negative: expired).
    pub fn server_left_ms(&self, name: &str) -> f64 {
        admin()
            .query_one(
                &format!(
                    "SELECT extract(epoch FROM expires_at - clock_timestamp())::float8 * 1000 \
                     FROM {}.leases WHERE name = $1",
                    self.schema
                ),
                &[&name],
            )
            .unwrap()
            .get(0)
    }
}

impl Drop for Shadow {
    fn drop(&mut self) {
        let _ = admin().batch_execute(&format!(
            "DROP SCHEMA IF EXISTS {} CASCADE; DROP SCHEMA IF EXISTS {} CASCADE",
            self.schema, self.evil
        ));
    }
}
