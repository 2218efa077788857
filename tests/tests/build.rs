//! One build for all programs: every program of the workspace resolves each dependency it shares
//! with the others with the same features, so `cargo build --release --workspace` followed by
//! `cargo build --release -p stage1-build` (or any other program) compiles nothing. A program
//! that asks for another feature set (`clip-core` without `download`, `libc` without what `ctrlc`
//! turns on, …) would build its own clip-core and candle-core; this test names the package and
//! both feature lists.
//!
//! Cheap: `cargo tree` resolves the features without compiling anything.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use clipmine_tests::root;
use serde_json::Value;

fn cargo(args: &[&str]) -> String {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let o = Command::new(cargo)
        .current_dir(root())
        .args(args)
        .output()
        .expect("running cargo");
    assert!(
        o.status.success(),
        "cargo {}:\n{}",
        args.join(" "),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

/// The workspace's programs: its packages with a binary target.
fn programs() -> Vec<String> {
    let meta: Value = serde_json::from_str(&cargo(&["metadata", "--no-deps", "--format-version", "1"])).unwrap();
    meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| {
            p["targets"]
                .as_array()
                .unwrap()
                .iter()
                .any(|t| t["kind"].as_array().unwrap().iter().any(|k| k == "bin"))
        })
        .map(|p| p["name"].as_str().unwrap().to_string())
        .collect()
}

/// Each package a build of `selection` compiles (normal and build dependencies: what
/// `cargo build` compiles, not the tests' dev-dependencies) → its feature lists.
fn features(selection: &[&str]) -> BTreeMap<String, BTreeSet<String>> {
    let mut args = vec![
        "tree",
        "-e",
        "normal,build",
        "--prefix",
        "none",
        "--no-dedupe",
        "-f",
        "{p}|{f}",
    ];
    args.extend(selection);
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in cargo(&args).lines() {
        if let Some((package, features)) = line.split_once('|') {
            // (Marks such as "(*)" or "(proc-macro)" after the features are not features.)
            let features = features.split(' ').next().unwrap_or("").to_string();
            out.entry(package.trim().to_string()).or_default().insert(features);
        }
    }
    out
}

/// Where `program` asks for other features than the workspace build: package → (the program's,
/// the workspace's).
fn differences(
    program: &BTreeMap<String, BTreeSet<String>>,
    workspace: &BTreeMap<String, BTreeSet<String>>,
) -> Vec<String> {
    program
        .iter()
        .filter_map(|(package, f)| {
            let w = workspace.get(package)?;
            (!f.is_subset(w)).then(|| format!("{package}: {f:?}, the workspace build {w:?}"))
        })
        .collect()
}

#[test]
fn every_program_builds_its_dependencies_as_the_workspace_build_does() {
    let workspace = features(&["--workspace"]);
    assert!(workspace.keys().any(|p| p.starts_with("candle-core ")), "{workspace:?}");
    let programs = programs();
    for p in ["stage1-build", "stage4-train", "clip-predict", "xtask"] {
        assert!(programs.iter().any(|q| q == p), "{p} is not among {programs:?}");
    }
    let mut failures = vec![];
    for p in &programs {
        let diff = differences(&features(&["-p", p]), &workspace);
        if !diff.is_empty() {
            failures.push(format!("{p}:\n    {}", diff.join("\n    ")));
        }
    }
    assert!(
        failures.is_empty(),
        "these programs would rebuild shared dependencies after `cargo build --workspace` (give them the same features, in the root Cargo.toml's [workspace.dependencies]):\n  {}",
        failures.join("\n  ")
    );
}

#[test]
fn a_different_feature_set_is_a_difference() {
    let set = |fs: &[&str]| fs.iter().map(|f| f.to_string()).collect::<BTreeSet<String>>();
    let ws = BTreeMap::from([("libc v0.2".to_string(), set(&["default,extra_traits,std"]))]);
    let same = BTreeMap::from([("libc v0.2".to_string(), set(&["default,extra_traits,std"]))]);
    let fewer = BTreeMap::from([("libc v0.2".to_string(), set(&["default,std"]))]);
    assert!(differences(&same, &ws).is_empty());
    assert_eq!(differences(&fewer, &ws).len(), 1);
}
