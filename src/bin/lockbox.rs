//! `lockbox`: run a program under a lock, and inspect and manage locks.
//!
//! Built with the `cli` feature: `cargo install lockbox --features cli`.
//! See `lockbox --help` and the README's "Command line" section.

mod cli;

fn main() {
    std::process::exit(cli::main());
}
