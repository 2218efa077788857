//! Stage 1 says what this CPU offers for bf16 and what `--precision bf16` would do here, in its
//! output and in its JSON report (`metrics.cpu_bf16`), as clip-core's detection finds it.

use std::process::Command;

use clip_core::nn::bf16::{bf16_hardware, Bf16Support};

/// Stage 1 (tiny preset, CPU) with `CLIPMINE_NO_AMX` set to `no_amx` (or as this process has it):
/// its exit code, output and JSON report.
fn stage1(no_amx: Option<&str>) -> (Option<i32>, String, serde_json::Value) {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("s1.json");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_stage1-build"));
    cmd.args(["--device", "cpu", "--json"]).arg(&json);
    if let Some(v) = no_amx {
        cmd.env("CLIPMINE_NO_AMX", v);
    }
    let out = cmd.output().unwrap();
    let report = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    (out.status.code(), clipmine_tests::log(&out), report)
}

#[test]
fn the_report_says_what_the_cpu_offers_for_bf16() {
    let (code, log, r) = stage1(None);
    assert_eq!(code, Some(0), "{log}");
    let cpu = &r["metrics"]["cpu_bf16"];
    // This test process sees the same CPU (and environment) as the stage it ran.
    let want = match bf16_hardware() {
        Bf16Support::Amx => "amx",
        Bf16Support::Avx512Bf16 => "avx512_bf16",
        Bf16Support::None => "none",
    };
    assert_eq!(cpu["hardware"], want, "{r}");
    let bf16 = cpu["precision_bf16"].as_str().unwrap();
    match clip_core::nn::precision::bf16_refusal() {
        None => assert_eq!(bf16, "available"),
        Some(why) => assert_eq!(bf16, why),
    }
    // Printed as well, in the words of clip-core's description.
    let line = clip_core::nn::precision::describe_hardware();
    assert!(log.contains(&line), "{line:?} not in\n{log}");
    assert_eq!(cpu["detail"], line.as_str());
    // Stage 1 itself runs in fp32.
    assert_eq!(r["metrics"]["precision"], "fp32", "{r}");
}

#[test]
fn with_amx_turned_off_bf16_is_reported_unavailable_with_the_reason() {
    let (code, log, r) = stage1(Some("1"));
    // Not a failure of stage 1: the model builds either way.
    assert_eq!(code, Some(0), "{log}");
    let cpu = &r["metrics"]["cpu_bf16"];
    assert_ne!(cpu["hardware"], "amx", "{r}");
    let bf16 = cpu["precision_bf16"].as_str().unwrap();
    assert_ne!(bf16, "available", "{r}");
    assert!(!bf16.is_empty());
    assert!(log.contains("--precision bf16 is refused"), "{log}");
}
