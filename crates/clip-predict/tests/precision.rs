//! `clip-predict --precision`: refused before anything is loaded where bf16 cannot run (forced
//! here with `CLIPMINE_NO_AMX=1`), and recorded in `eval --json` where it ran.

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::Device;
use clip_core::fit::Trainer;
use clip_core::nn::bf16::{bf16_hardware, Bf16Support};
use clip_core::prepare::{prepare, DataSource};
use clip_core::ClipConfig;

fn predict(args: &[&str], no_amx: bool) -> (Option<i32>, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_clip-predict"));
    cmd.args(["--device", "cpu"]).args(args);
    if no_amx {
        cmd.env("CLIPMINE_NO_AMX", "1");
    } else {
        cmd.env_remove("CLIPMINE_NO_AMX");
    }
    clipmine_tests::outcome(&cmd.output().unwrap())
}

fn demo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/demo")
}

#[test]
fn bf16_without_amx_is_refused_before_the_model_is_opened() {
    let missing = tempfile::tempdir().unwrap().path().join("no-such-run");
    let missing = missing.to_str().unwrap();
    for args in [
        &["--precision", "bf16", "eval", "--run", missing, "--data", "d"][..],
        &["index", "--run", missing, "--images", "i", "--precision", "bf16"],
        &["serve", "--run", missing, "--precision", "bf16"],
    ] {
        let (code, out, err) = predict(args, true);
        assert_eq!(code, Some(2), "{args:?}\nstdout:\n{out}\nstderr:\n{err}");
        assert!(err.contains("refused"), "{args:?}: {err}");
        assert!(!err.contains("no-such-run"), "the model was opened first: {err}");
    }
    // fp32 is never refused: the same command gets as far as the missing run.
    let (code, _, err) = predict(&["--precision", "fp32", "eval", "--run", missing, "--data", "d"], true);
    assert_eq!(code, Some(2));
    assert!(!err.contains("refused") && err.contains("no-such-run"), "{err}");
}

#[test]
fn eval_records_the_precision_it_ran_in() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = ClipConfig::tiny();
    let data = prepare(&cfg, &DataSource::default(), &Device::Cpu, &clip_core::progress::Silent).unwrap();
    let run = dir.path().join("run");
    let mut t = Trainer::new(&cfg, data, &run).unwrap();
    let (loss, pps) = t.train_epoch(|_, _, _| {}).unwrap();
    let v = t.validate().unwrap();
    t.end_epoch(loss, &v, 0.0, pps).unwrap();
    drop(t);
    let (run, data) = (run.to_str().unwrap().to_string(), demo().display().to_string());
    let eval = |precision: &[&str]| {
        let mut args = vec!["--json", "eval", "--run", &run, "--data", &data];
        args.extend(precision);
        let (code, out, err) = predict(&args, false);
        assert_eq!(code, Some(0), "{args:?}\nstdout:\n{out}\nstderr:\n{err}");
        serde_json::from_str::<serde_json::Value>(&out).unwrap()
    };
    let fp32 = eval(&[]);
    assert_eq!(fp32["precision"], "fp32", "{fp32}");
    if bf16_hardware() != Bf16Support::Amx {
        eprintln!(
            "bf16 part skipped: no usable AMX here ({:?}; or CLIPMINE_NO_AMX is set)",
            bf16_hardware()
        );
        return;
    }
    let bf16 = eval(&["--precision", "bf16"]);
    assert_eq!(bf16["precision"], "bf16", "{bf16}");
    assert_eq!(bf16["images"], fp32["images"]);
    assert!(bf16["recall"]["i2t_r1"].as_f64().unwrap().is_finite(), "{bf16}");
}
