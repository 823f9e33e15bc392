//! The coordination examples run as the README shows them, against the same
//! PostgreSQL the tests use: each must succeed and say what it demonstrates.
//! Each is built (a no-op when `cargo test` has built it already) and run
//! from beside the test binaries' directory.

mod common;

use std::path::PathBuf;
use std::process::Command;

/// Runs `examples/<name>.rs`'s binary; its standard output.
fn run_example(name: &str) -> String {
    // Built (or found up to date) first: a run that built only some test
    // targets would otherwise find an old binary.
    let built = Command::new(env!("CARGO"))
        .args(["build", "--quiet", "--example", name])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .unwrap();
    assert!(built.success(), "cargo build --example {name} failed");
    let deps = std::env::current_exe().unwrap();
    let bin: PathBuf = deps
        .parent()
        .and_then(|d| d.parent())
        .map(|d| d.join("examples").join(name))
        .unwrap();
    assert!(
        bin.exists(),
        "{} is missing: run the suite with `cargo test`, which builds the examples",
        bin.display()
    );
    let out = Command::new(&bin)
        .env("DATABASE_URL", common::database_url())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{name} failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn semaphore_example_never_exceeds_its_permits() {
    let out = run_example("semaphore");
    assert_eq!(out.matches("permit token").count(), 12, "{out}");
    assert!(!out.contains("4 of 3"), "{out}");
    assert!(out.contains("done: at most"), "{out}");
}

#[test]
fn rwlock_example_queues_readers_behind_a_waiting_writer() {
    let out = run_example("rwlock");
    assert!(out.contains("two readers at once"), "{out}");
    assert!(
        out.contains("a new reader queues behind the waiting writer"),
        "{out}"
    );
    assert!(!out.contains("unexpected"), "{out}");
    assert!(out.contains("and a reader again"), "{out}");
}

#[test]
fn leader_example_hands_over_to_a_higher_term() {
    let out = run_example("leader");
    let took_over = out
        .lines()
        .find(|l| l.contains("took over in term"))
        .unwrap_or_else(|| panic!("no takeover: {out}"));
    assert!(out.contains("killed"), "{out}");
    // "follower: X took over in term T (> S)"
    let terms: Vec<u64> = took_over
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|t| t.parse().ok())
        .collect();
    assert!(terms.len() >= 2 && terms[0] > terms[1], "{took_over}");
}
