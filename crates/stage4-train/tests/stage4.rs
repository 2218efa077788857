//! Stage 4's gate as a user meets it: too short a run fails with advice; a bad dataset path is
//! a clear error.

use std::process::Command;

fn run(args: &[&str]) -> (Option<i32>, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_stage4-train"))
        .args(["--device", "cpu"])
        .args(args)
        .output()
        .unwrap();
    (
        o.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

#[test]
fn too_short_a_run_fails_the_gate_with_advice_and_still_writes_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let json = dir.path().join("s4.json");
    let (code, log) = run(&[
        "--epochs",
        "2",
        "--out",
        out.to_str().unwrap(),
        "--json",
        json.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(1), "{log}");
    assert!(
        log.contains("[FAIL] loss fell") && log.contains("try more epochs"),
        "{log}"
    );
    assert!(log.contains("epoch   2:"), "{log}");
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap();
    assert_eq!(r["passed"], false);
    for f in [
        "model.safetensors",
        "config.toml",
        "tokenizer.json",
        "loss.csv",
        "last/state.json",
        "similarity_before.png",
    ] {
        assert!(out.join(f).is_file(), "missing {f}");
    }
}

#[test]
fn a_missing_dataset_is_a_clear_error() {
    let (code, log) = run(&["--data", "/nonexistent/photos", "--out", "/tmp/never-written"]);
    assert_eq!(code, Some(2), "{log}");
    assert!(
        log.contains("/nonexistent/photos") && log.contains("not found"),
        "{log}"
    );
    assert!(!std::path::Path::new("/tmp/never-written").exists());
}

#[test]
fn frozen_towers_train_from_cached_features() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let cache = dir.path().join("cache");
    let args = |o: &str| {
        vec![
            "--freeze".to_string(),
            "both".into(),
            "--epochs".into(),
            "2".into(),
            "--out".into(),
            dir.path().join(o).to_str().unwrap().to_string(),
            "--feature-cache".into(),
            cache.to_str().unwrap().to_string(),
        ]
    };
    let a = args("run");
    let (_, log) = run(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(log.contains("epoch   2:"), "{log}");
    assert!(
        log.contains("frozen image tower: features of 10 images cached") && log.contains("0 reused, 10 computed"),
        "{log}"
    );
    assert!(log.contains("frozen text tower: features of"), "{log}");
    assert!(out.join("model.safetensors").is_file());
    // A second run on the same cache folder computes nothing.
    let b = args("run2");
    let (_, log) = run(&b.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(log.contains("10 reused, 0 computed"), "{log}");
    let files: Vec<_> = std::fs::read_dir(&cache).unwrap().collect();
    assert_eq!(files.len(), 2, "one file per tower: {files:?}");
}
