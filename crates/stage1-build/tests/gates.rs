//! Stage 1's device check can fail: it computes on the device and compares with the exact answer,
//! and a device that cannot be opened is a failed check, not a crash.

use std::process::Command;

fn run(args: &[&str]) -> (Option<i32>, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_stage1-build"))
        .args(args)
        .output()
        .unwrap();
    (o.status.code(), clipmine_tests::log(&o))
}

#[test]
fn the_device_check_computes_on_the_device() {
    let (code, log) = run(&["--device", "cpu"]);
    assert_eq!(code, Some(0), "{log}");
    assert!(
        log.contains("[ok] device: cpu") && log.contains("exact result"),
        "{log}"
    );
}

#[test]
fn a_device_that_cannot_be_used_fails_the_device_check() {
    // No machine has 100 GPUs; a build without CUDA says so instead.
    let (code, log) = run(&["--device", "cuda:99"]);
    assert_eq!(code, Some(1), "{log}");
    assert!(log.contains("[FAIL] device:"), "{log}");
    assert!(log.contains("CUDA"), "{log}");
    assert!(!log.contains("[ok] build"), "stops before building: {log}");
}
