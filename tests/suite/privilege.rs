//! Taking over a zombie held by another role needs privileges; without them the
//! acquire fails with an error that names the missing one.

use crate::common;

use common::*;
use lockbox::{Error, LockClient, advisory_key};

struct Roles {
    zombie: String,
    contender: String,
}

impl Roles {
    fn create() -> Roles {
        let roles = Roles {
            zombie: unique("zombie_role").replace('-', "_"),
            contender: unique("contender_role").replace('-', "_"),
        };
        drop(client(ms(1000))); // the lease table exists
        acl_change(&format!(
            "CREATE ROLE {z} LOGIN; CREATE ROLE {c} LOGIN; \
                 GRANT SELECT, INSERT, UPDATE ON lockbox_leases TO {c};",
            z = roles.zombie,
            c = roles.contender
        ))
        .unwrap();
        roles
    }

    fn grant(&self, role: &str) {
        acl_change(&format!("GRANT {role} TO {}", self.contender)).unwrap();
    }
}

impl Drop for Roles {
    fn drop(&mut self) {
        let _ = acl_change(&format!(
            "DROP OWNED BY {c}; DROP ROLE {c}; DROP ROLE {z};",
            z = self.zombie,
            c = self.contender
        ));
    }
}

#[test]
fn zombie_takeover_names_the_missing_privilege() {
    let roles = Roles::create();
    let name = unique("priv");
    let mut zombie =
        postgres::Client::connect(&url_as_user(&roles.zombie), postgres::NoTls).unwrap();
    let (k1, k2) = advisory_key(&name);
    zombie
        .execute("SELECT pg_advisory_lock($1, $2)", &[&k1, &k2])
        .unwrap();
    fake_lease(&name, 5, -10, pid_of(&mut zombie));

    let client = LockClient::builder(&url_as_user(&roles.contender))
        .create_table(false)
        .build()
        .unwrap();
    match client.try_lock(&name) {
        Err(Error::InsufficientPrivilege(msg)) => {
            assert!(msg.contains("pg_read_all_stats"), "{msg}")
        }
        other => panic!("expected InsufficientPrivilege, got {other:?}"),
    }
    roles.grant("pg_read_all_stats");
    match client.try_lock(&name) {
        Err(Error::InsufficientPrivilege(msg)) => {
            assert!(msg.contains("pg_signal_backend"), "{msg}")
        }
        other => panic!("expected InsufficientPrivilege, got {other:?}"),
    }
    zombie
        .simple_query("SELECT 1")
        .expect("the zombie must not have been touched yet");
    roles.grant("pg_signal_backend");
    let lock = client
        .try_lock(&name)
        .unwrap()
        .expect("taken over with the privileges");
    assert_eq!(lock.fencing_token(), 6);
    assert!(
        zombie.simple_query("SELECT 1").is_err(),
        "the zombie session was terminated"
    );
    lock.release().unwrap();
    drop(client);
}
