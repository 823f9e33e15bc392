//! Log levels: losses and zombie terminations at `warn`, acquire and release at
//! `debug`, renewals at `trace`. (Its own process: it installs the global logger.)

mod common;

use std::sync::Mutex;

use common::*;
use lockbox::advisory_key;

static LINES: Mutex<Vec<(log::Level, String)>> = Mutex::new(Vec::new());

struct Capture;

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }
    fn log(&self, record: &log::Record) {
        if record.target().starts_with("lockbox") {
            LINES
                .lock()
                .unwrap()
                .push((record.level(), record.args().to_string()));
        }
    }
    fn flush(&self) {}
}

fn logged(level: log::Level, needle: &str) -> bool {
    LINES
        .lock()
        .unwrap()
        .iter()
        .any(|(l, m)| *l == level && m.contains(needle))
}

#[test]
fn events_are_logged_at_their_levels() {
    log::set_logger(&Capture).unwrap();
    log::set_max_level(log::LevelFilter::Trace);

    let (client, _) = client(ms(30_000));
    let name = unique("logged");
    let lock = client.try_lock(&name).unwrap().unwrap();
    lock.extend(ms(30_000)).unwrap();
    lock.release().unwrap();
    assert!(logged(
        log::Level::Debug,
        &format!("acquired lock {name:?}")
    ));
    assert!(logged(log::Level::Trace, &format!("renewed lock {name:?}")));
    assert!(logged(
        log::Level::Debug,
        &format!("released lock {name:?}")
    ));

    let lost = unique("lost");
    let lock = client.try_lock(&lost).unwrap().unwrap();
    terminate(holder_pid(&lost));
    assert!(lock.extend(ms(30_000)).is_err());
    assert!(logged(log::Level::Warn, &format!("lock {lost:?}")));

    let zombie = unique("zombie");
    let mut db = admin();
    let (k1, k2) = advisory_key(&zombie);
    db.execute("SELECT pg_advisory_lock($1, $2)", &[&k1, &k2])
        .unwrap();
    fake_lease(&zombie, 1, -10, pid_of(&mut db));
    drop(client.try_lock(&zombie).unwrap().unwrap());
    assert!(logged(log::Level::Warn, "zombie holder"));
    assert!(
        !logged(log::Level::Warn, &format!("{name:?}")),
        "a normal release logged a warning"
    );
}
