//! Stage 3's step time has no threshold that fits every machine: it is shown as information and
//! not counted as a check.

use std::process::Command;

#[test]
fn step_time_is_information_not_a_check() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("s3.json");
    let o = Command::new(env!("CARGO_BIN_EXE_stage3-step"))
        .args(["--device", "cpu", "--json", json.to_str().unwrap()])
        .output()
        .unwrap();
    let log = clipmine_tests::log(&o);
    assert!(o.status.success(), "{log}");
    assert!(
        log.contains("[info] step time:") && !log.contains("[ok] step time"),
        "{log}"
    );
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap();
    assert!(
        r["checks"].as_array().unwrap().iter().all(|c| c["name"] != "step time"),
        "{r}"
    );
    assert!(
        r["info"].as_array().unwrap().iter().any(|c| c["name"] == "step time"),
        "{r}"
    );
}
