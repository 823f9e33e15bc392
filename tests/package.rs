//! The package's promises about itself: `rust-version` is what the dependency
//! graph needs, and the library alone compiles none of the command's crates.
//! Both read Cargo's own view (`cargo metadata`, `cargo tree`), offline.

use std::process::Command;

fn cargo(args: &[&str]) -> std::process::Output {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    Command::new(cargo)
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo runs")
}

fn version(v: &str) -> Vec<u64> {
    v.split('.').map(|p| p.parse().unwrap()).collect()
}

/// `rust-version` must be the highest `rust-version` any dependency (with
/// every feature on, as `cargo install --features cli` builds it) declares:
/// lower would promise builds that fail; higher would refuse toolchains that
/// work (the crate's own code needs 1.88 for let chains, below the graph's).
/// This machine's toolchain builds the crate, so the claim holds only while
/// the graph's maximum is not above it, which is checked too.
#[test]
fn rust_version_is_the_dependency_graphs_highest() {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".to_owned());
    let rustc_vv = Command::new(&rustc).arg("-vV").output().unwrap();
    let rustc_vv = String::from_utf8_lossy(&rustc_vv.stdout).into_owned();
    let host = rustc_vv
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .expect("rustc -vV names the host");
    let out = cargo(&[
        "metadata",
        "--format-version",
        "1",
        "--all-features",
        "--offline",
        "--filter-platform",
        host,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let packages = meta["packages"].as_array().unwrap();
    let find = |id: &str| packages.iter().find(|p| p["id"] == id).unwrap();
    let root = meta["resolve"]["root"].as_str().unwrap();
    let nodes = meta["resolve"]["nodes"].as_array().unwrap();
    // Every package the crate's normal and build dependencies reach.
    let mut seen = std::collections::HashSet::new();
    let mut stack = vec![root.to_owned()];
    while let Some(id) = stack.pop() {
        if !seen.insert(id.clone()) {
            continue;
        }
        let node = nodes.iter().find(|n| n["id"] == id.as_str()).unwrap();
        for dep in node["deps"].as_array().unwrap() {
            let normal_or_build = dep["dep_kinds"]
                .as_array()
                .unwrap()
                .iter()
                .any(|k| k["kind"].is_null() || k["kind"] == "build");
            if normal_or_build {
                stack.push(dep["pkg"].as_str().unwrap().to_owned());
            }
        }
    }
    let (highest, by) = seen
        .iter()
        .filter(|id| id.as_str() != root)
        .filter_map(|id| {
            let p = find(id);
            p["rust_version"]
                .as_str()
                .map(|v| (version(v), p["name"].as_str().unwrap().to_owned()))
        })
        .max()
        .unwrap();
    let ours = version(
        find(root)["rust_version"]
            .as_str()
            .expect("rust-version is set"),
    );
    assert_eq!(
        ours, highest,
        "Cargo.toml's rust-version must be {highest:?}, which {by} asks for"
    );
    let release = rustc_vv
        .lines()
        .find_map(|l| l.strip_prefix("release: "))
        .expect("rustc -vV names its release");
    let toolchain = version(release.split('-').next().unwrap());
    assert!(
        toolchain[..2] >= ours[..2],
        "rust-version {ours:?} is above this toolchain ({release}): unverified"
    );
}

/// `cargo build` of the library (default features) compiles no argument
/// parser, signal or JSON crate: they belong to the `cli` feature.
#[test]
fn the_library_alone_compiles_none_of_the_commands_crates() {
    for krate in ["clap", "signal-hook", "serde_json"] {
        // `-i` prints the crates that pull `krate` in; nothing when none does.
        let out = cargo(&["tree", "--offline", "-e", "normal", "-i", krate]);
        assert!(
            out.stdout.is_empty(),
            "the library's default build pulls in {krate}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let out = cargo(&[
            "tree",
            "--offline",
            "-e",
            "normal",
            "-i",
            krate,
            "--features",
            "cli",
        ]);
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("lockbox"),
            "{krate} is not part of the cli feature: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
