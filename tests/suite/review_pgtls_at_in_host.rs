//! Review (PostgreSQL connection strings): a URL password holding an
//! unencoded `@` leaks into the host that lockbox shows.
//!
//! The driver (like libpq) takes the credentials up to the *first* `@`, so in
//! `postgres://user:Sekret@Part2@127.0.0.1:port/db` the password is `Sekret`
//! and the host is `Part2@127.0.0.1`. lockbox refuses an `@` after a `/` or
//! `?` (commit 629b290) for exactly this reason, but not a second `@` before
//! them: the host part, with the tail of the password in it, is then shown by
//! the builder's `Debug` and by the `Error::Connect` of `build()` (its
//! target). No host name holds an `@` in a URL (an abstract socket would be
//! `%40`-encoded in `?host=`), so a second `@` can be refused like the first.

use crate::common;

use common::{database_url, ms};
use lockbox::LockClient;

/// The part of the password after its `@`: it must show nowhere.
const TAIL: &str = "Part2Sekret";

#[test]
fn a_second_at_sign_in_the_authority_never_shows_the_password() {
    let config: postgres::Config = database_url().parse().unwrap();
    let host = match config.get_hosts().first() {
        Some(postgres::config::Host::Tcp(h)) => h.clone(),
        _ => "127.0.0.1".to_owned(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let user = config.get_user().unwrap_or("postgres").to_owned();
    let mut leaks = Vec::new();
    for url in [
        format!("postgres://{user}:hunter2@{TAIL}@{host}:{port}/postgres?sslmode=disable"),
        format!("postgresql://{user}:hunter2@{TAIL}@{host}:{port}/postgres"),
        // Several hosts: the tail lands in the first.
        format!("postgres://{user}:pw@{TAIL}@{host}:{port},{host}:{port}/postgres?sslmode=disable"),
    ] {
        let builder = LockClient::builder(&url).connect_timeout(ms(3000));
        let shown = format!("{builder:?}");
        if shown.contains(TAIL) {
            leaks.push(format!("the builder's Debug: {shown}"));
        }
        match builder.build() {
            Ok(client) => {
                let shown = format!("{client:?}");
                if shown.contains(TAIL) {
                    leaks.push(format!("the client's Debug: {shown}"));
                }
            }
            Err(e) => {
                let shown = format!("{e} {e:?}");
                if shown.contains(TAIL) {
                    leaks.push(format!("build()'s error: {shown}"));
                }
            }
        }
    }
    assert!(
        leaks.is_empty(),
        "part of the password shows in:\n{}",
        leaks.join("\n")
    );
}
