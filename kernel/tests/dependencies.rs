//! The kernel's architecture invariant, checked on its dependency list: no runtime, no disk
//! engine, no simulator, no threads, no OS randomness.

use std::process::Command;

/// Crates whose presence would let the kernel do I/O, spawn threads or read entropy.
const FORBIDDEN: &[&str] = &[
    "tokio",
    "mio",
    "async-std",
    "smol",
    "futures",
    "madsim",
    "madsim-tokio",
    "rocksdb",
    "librocksdb-sys",
    "rand",
    "rand_core",
    "rayon",
    "crossbeam",
    "crossbeam-channel",
    "threadpool",
    "num_cpus",
    "parking_lot",
    "socket2",
    "libloading",
    "loom",
];

fn cargo_tree(args: &[&str]) -> String {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let output = Command::new(cargo)
        .args(["tree", "-p", "sabot-kernel", "-e", "normal", "--format", "{p}"])
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("running cargo tree");
    assert!(output.status.success(), "cargo tree failed: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).expect("utf-8")
}

fn crate_names(tree: &str) -> Vec<String> {
    let mut names: Vec<String> = tree
        .lines()
        .filter_map(|line| line.trim_start_matches(|c: char| !c.is_alphanumeric()).split_whitespace().next())
        .map(str::to_string)
        .collect();
    names.sort();
    names.dedup();
    names
}

// Goal: nothing that does I/O, spawns threads or reads OS entropy is in the kernel's build.
// Method: the normal (non-dev) dependency tree of sabot-kernel, with every feature, by name.
#[test]
fn kernel_has_no_runtime_io_or_entropy_dependencies() {
    let names = crate_names(&cargo_tree(&["--all-features", "--prefix", "none"]));
    assert!(names.iter().any(|n| n == "arrow-array"), "the tree was read: {names:?}");
    let found: Vec<&String> =
        names.iter().filter(|name| FORBIDDEN.contains(&name.as_str()) || name.starts_with("madsim")).collect();
    assert!(found.is_empty(), "the kernel must not depend on {found:?}");
}

// Goal: OS randomness reaches the kernel's build only through `ahash` inside arrow (which seeds
// arrow's own hash maps; no kernel path lets their order reach output). Method: the inverted tree
// of `getrandom` names no other direct dependent.
#[test]
fn getrandom_only_through_arrows_ahash() {
    let tree = cargo_tree(&["--all-features", "--prefix", "none"]);
    let versions: Vec<&str> = tree
        .lines()
        .filter_map(|line| line.strip_prefix("getrandom v"))
        .map(|rest| rest.split_whitespace().next().expect("a version"))
        .collect();
    for version in versions {
        let inverted =
            cargo_tree(&["--all-features", "--invert", &format!("getrandom@{version}"), "--prefix", "depth"]);
        let dependents: Vec<&str> = inverted
            .lines()
            .filter_map(|line| line.strip_prefix('1'))
            .filter_map(|rest| rest.split_whitespace().next())
            .collect();
        assert!(!dependents.is_empty(), "inverted tree of getrandom {version} was read: {inverted}");
        assert!(dependents.iter().all(|d| *d == "ahash"), "getrandom {version} is used by {dependents:?}");
    }
}
