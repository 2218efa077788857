//! `--precision` on stage 3, as a user runs it: bf16 refused with its reason where it cannot run
//! (here forced with `CLIPMINE_NO_AMX=1`), a passing bf16 step recorded as such where the CPU has
//! AMX, the flag winning over the config's `train.precision`, and only fp32 or bf16 accepted.
//!
//! The refusals come before any data is read or model built, so they cost milliseconds; the
//! passing runs are the tiny preset on the demo set (a fraction of a second each).

use std::path::Path;
use std::process::Command;

use clip_core::nn::bf16::{bf16_hardware, Bf16Support};

/// Stage 3 on the CPU with `args`, with `CLIPMINE_NO_AMX` set to `no_amx` (or removed):
/// (exit code, stdout, stderr).
fn stage3(args: &[&str], no_amx: Option<&str>) -> (Option<i32>, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_stage3-step"));
    cmd.args(["--device", "cpu"]).args(args);
    match no_amx {
        Some(v) => cmd.env("CLIPMINE_NO_AMX", v),
        None => cmd.env_remove("CLIPMINE_NO_AMX"),
    };
    clipmine_tests::outcome(&cmd.output().unwrap())
}

fn report(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn bf16_without_amx_is_refused_with_the_reason() {
    let (code, out, err) = stage3(&["--precision", "bf16"], Some("1"));
    assert_eq!(code, Some(2), "stdout:\n{out}\nstderr:\n{err}");
    assert!(err.contains("refused"), "{err}");
    assert!(err.contains("bf16"), "{err}");
    // The reason itself, not only the word: what the CPU lacks or what turned AMX off.
    assert!(err.contains("AMX") || err.contains("CLIPMINE_NO_AMX"), "{err}");
    // Refused before any step ran: no check was printed.
    assert!(!out.contains("[ok]"), "{out}");
}

#[test]
fn a_config_asking_for_bf16_is_refused_the_same_way_and_the_flag_overrides_it() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bf16.toml");
    std::fs::write(&cfg, "[train]\nprecision = \"bf16\"\n").unwrap();
    let cfg = cfg.to_str().unwrap();

    let (code, out, err) = stage3(&["--config", cfg], Some("1"));
    assert_eq!(code, Some(2), "stdout:\n{out}\nstderr:\n{err}");
    assert!(err.contains("refused") && err.contains("train.precision"), "{err}");
    assert!(err.contains("--precision fp32"), "the way out is named:\n{err}");

    // The flag wins over the config, and the report records what ran.
    let json = dir.path().join("s3.json");
    let (code, out, err) = stage3(
        &["--config", cfg, "--precision", "fp32", "--json", json.to_str().unwrap()],
        Some("1"),
    );
    assert_eq!(code, Some(0), "stdout:\n{out}\nstderr:\n{err}");
    let r = report(&json);
    assert_eq!(r["metrics"]["precision"], "fp32", "{r}");
    assert!(out.contains("precision fp32"), "{out}");
}

#[test]
fn the_default_is_fp32_and_the_report_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("s3.json");
    let (code, out, err) = stage3(&["--json", json.to_str().unwrap()], None);
    assert_eq!(code, Some(0), "stdout:\n{out}\nstderr:\n{err}");
    assert_eq!(report(&json)["metrics"]["precision"], "fp32");
}

#[test]
fn bf16_on_amx_passes_and_is_recorded() {
    if bf16_hardware() != Bf16Support::Amx {
        eprintln!(
            "skipped: no usable AMX here ({:?}; or CLIPMINE_NO_AMX is set): {}",
            bf16_hardware(),
            clip_core::nn::precision::bf16_refusal().unwrap_or_default()
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("s3.json");
    let (code, out, err) = stage3(&["--precision", "bf16", "--json", json.to_str().unwrap()], None);
    assert_eq!(code, Some(0), "stdout:\n{out}\nstderr:\n{err}");
    let r = report(&json);
    assert_eq!(r["passed"], true, "{r}");
    assert_eq!(r["metrics"]["precision"], "bf16", "{r}");
    // Stage 3's own check holds in bf16: every trainable tensor got a finite, non-zero gradient.
    assert_eq!(r["metrics"]["no_gradient"].as_array().unwrap().len(), 0, "{r}");
    assert!(out.contains("precision bf16"), "{out}");
}

#[test]
fn only_fp32_or_bf16_is_accepted() {
    let (code, out, err) = stage3(&["--precision", "fp16"], None);
    assert_eq!(code, Some(2), "stdout:\n{out}\nstderr:\n{err}");
    assert!(err.contains("fp32") && err.contains("bf16"), "{err}");
    assert!(err.contains("--precision"), "{err}");

    let (code, help, _) = stage3(&["--help"], None);
    assert_eq!(code, Some(0));
    assert!(
        help.contains("--precision") && help.contains("fp32 (default) or bf16") && help.contains("AMX"),
        "{help}"
    );
}
