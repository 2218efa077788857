//! Stage 2's config line is information when the config loads (it is not a check that cannot
//! fail), and a failed check naming the file when it does not.

use std::process::Command;

fn run(args: &[&str]) -> (Option<i32>, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_stage2-batch"))
        .args(["--device", "cpu"])
        .args(args)
        .output()
        .unwrap();
    (o.status.code(), clipmine_tests::log(&o))
}

#[test]
fn the_config_is_information_not_a_check() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("s2.json");
    let (code, log) = run(&["--json", json.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains("[info] config: tiny"), "{log}");
    assert!(!log.contains("[ok] config"), "{log}");
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap();
    let checks = r["checks"].as_array().unwrap();
    assert!(checks.iter().all(|c| c["name"] != "config"), "{checks:?}");
    assert!(
        r["info"].as_array().unwrap().iter().any(|i| i["name"] == "config"),
        "{r}"
    );
}

#[test]
fn a_broken_config_fails_the_config_check_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("broken.toml");
    std::fs::write(&cfg, "[image]\nimage_size = \"big\"\n").unwrap();
    let (code, log) = run(&["--config", cfg.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{log}");
    assert!(log.contains("[FAIL] config:") && log.contains("broken.toml"), "{log}");
}
