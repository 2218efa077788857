//! Stage 4's `--precision`: recorded in the run's config.toml and the JSON report, kept by
//! `--resume` unless the flag is given (the change then recorded like the other training
//! flags'), and a refused bf16 leaving the run as it was. One-epoch runs of the tiny preset on
//! the demo set (their gates fail, which is not what is checked here).

use std::path::Path;
use std::process::Command;

use clip_core::nn::bf16::{bf16_hardware, Bf16Support};
use clip_core::nn::Precision;

/// Stage 4 on the CPU with `args` (and `CLIPMINE_NO_AMX=1` when `no_amx`), its JSON report at
/// `json`: (exit code, output, report).
fn stage4(args: &[&str], json: &Path, no_amx: bool) -> (Option<i32>, String, serde_json::Value) {
    let _ = std::fs::remove_file(json);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_stage4-train"));
    cmd.args(["--device", "cpu", "--json"]).arg(json).args(args);
    if no_amx {
        cmd.env("CLIPMINE_NO_AMX", "1");
    } else {
        cmd.env_remove("CLIPMINE_NO_AMX");
    }
    let o = cmd.output().unwrap();
    let report = std::fs::read_to_string(json)
        .map(|s| serde_json::from_str(&s).unwrap())
        .unwrap_or(serde_json::Value::Null);
    (o.status.code(), clipmine_tests::log(&o), report)
}

/// The precision the run's config.toml records.
fn recorded(run: &Path) -> Precision {
    clip_core::ClipConfig::from_toml_file(&run.join("config.toml"))
        .unwrap()
        .train
        .precision
}

/// A run that trained to the end (its gate may fail after one epoch: exit 0 or 1, not 2).
fn trained(code: Option<i32>, log: &str) {
    assert!(matches!(code, Some(0) | Some(1)), "{log}");
}

#[test]
fn fp32_by_default_and_a_refused_bf16_resume_leaves_the_run_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let (run, json) = (dir.path().join("run"), dir.path().join("s4.json"));
    let r = run.to_str().unwrap();
    let (code, log, report) = stage4(&["--epochs", "1", "--out", r], &json, false);
    trained(code, &log);
    assert_eq!(report["metrics"]["precision"], "fp32", "{report}");
    assert_eq!(recorded(&run), Precision::Fp32);

    let (code, log, _) = stage4(&["--resume", r, "--epochs", "2", "--precision", "bf16"], &json, true);
    assert_eq!(code, Some(2), "{log}");
    assert!(log.contains("refused"), "{log}");
    assert_eq!(recorded(&run), Precision::Fp32, "a refused resume changed the run");
    let epochs = clip_core::ClipConfig::from_toml_file(&run.join("config.toml"))
        .unwrap()
        .train
        .epochs;
    assert_eq!(epochs, 1, "a refused resume changed the run");
}

#[test]
fn a_bf16_run_is_recorded_and_resumed_in_bf16_unless_the_flag_says_otherwise() {
    if bf16_hardware() != Bf16Support::Amx {
        eprintln!(
            "skipped: no usable AMX here ({:?}; or CLIPMINE_NO_AMX is set), so no bf16 run to resume",
            bf16_hardware()
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (run, json) = (dir.path().join("run"), dir.path().join("s4.json"));
    let r = run.to_str().unwrap();
    let (code, log, report) = stage4(&["--epochs", "1", "--out", r, "--precision", "bf16"], &json, false);
    trained(code, &log);
    assert_eq!(report["metrics"]["precision"], "bf16", "{report}");
    assert_eq!(recorded(&run), Precision::Bf16);

    // Resumed without the flag: the run's own precision.
    let (code, log, report) = stage4(&["--resume", r, "--epochs", "2"], &json, false);
    trained(code, &log);
    assert_eq!(report["metrics"]["precision"], "bf16", "{log}");
    assert!(!log.contains("train.precision"), "{log}");
    assert_eq!(recorded(&run), Precision::Bf16);

    // The same run where bf16 cannot run: refused, naming the config and the way out.
    let (code, log, _) = stage4(&["--resume", r, "--epochs", "3"], &json, true);
    assert_eq!(code, Some(2), "{log}");
    assert!(
        log.contains("refused") && log.contains("train.precision") && log.contains("--precision fp32"),
        "{log}"
    );

    // The flag wins, and the change is printed and recorded.
    let (code, log, report) = stage4(&["--resume", r, "--epochs", "3", "--precision", "fp32"], &json, true);
    trained(code, &log);
    assert!(log.contains("resume: train.precision"), "{log}");
    assert_eq!(report["metrics"]["precision"], "fp32", "{log}");
    assert_eq!(recorded(&run), Precision::Fp32);
}
