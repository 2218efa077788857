//! Stage 4 fine-tuning a pretrained CLIP as a user runs it: the fine-tune defaults printed, the
//! checkpoint measured before epoch 1, a WiSE-FT sweep at the end, and the report showing all of
//! it beside every epoch.

use std::process::Command;

fn run(args: &[&str]) -> (Option<i32>, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_stage4-train"))
        .args(["--device", "cpu"])
        .args(args)
        .output()
        .unwrap();
    (o.status.code(), clipmine_tests::log(&o))
}

fn fixture(name: &str) -> String {
    let snaps = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(format!(
        "../clip-core/tests/fixtures/clip/hub/models--test--{name}/snapshots"
    ));
    let dir = std::fs::read_dir(&snaps).unwrap().next().unwrap().unwrap().path();
    dir.to_str().unwrap().to_string()
}

#[test]
fn a_fine_tune_reports_its_start_every_epoch_and_a_wise_ft_sweep() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let json = dir.path().join("s4.json");
    let (code, log) = run(&[
        "--pretrained",
        &fixture("oc-vit"),
        "--epochs",
        "3",
        "--batch-size",
        "16",
        "--lr-image",
        "1e-3",
        "--lr-text",
        "1e-3",
        "--lr-head",
        "1e-3",
        "--wise-ft",
        "0:1:0.5",
        "--out",
        out.to_str().unwrap(),
        "--json",
        json.to_str().unwrap(),
    ]);
    // α = 0 is the checkpoint itself, so a sweep from 0 never ends below the start.
    assert_eq!(code, Some(0), "{log}");
    for line in [
        "fine-tuning a pretrained CLIP: lr 1e-3 for both towers and the projections, weight decay 0.1 on every weight matrix",
        "start (the checkpoint, untouched): val",
        "WiSE-FT: (1−α)·checkpoint + α·fine-tuned",
        "α 0.50: val",
        "before and after, on the validation split:",
        "[ok] not below the start",
    ] {
        assert!(log.contains(line), "missing {line:?} in:\n{log}");
    }
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert!(r["metrics"]["start"]["loss"].as_f64().unwrap().is_finite());
    assert!(r["metrics"]["final"]["loss"].as_f64().unwrap().is_finite());
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap();
    assert!(m["start"]["recall"]["i2t_r1"].is_number());
    assert_eq!(m["history"].as_array().unwrap().len(), 3);
    assert_eq!(m["wise_ft"]["points"].as_array().unwrap().len(), 3);
    let page = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(
        page.contains("Before and after, on the validation split"),
        "report lacks the table"
    );
    assert!(page.contains("start (the checkpoint)") && page.contains("WiSE-FT α 0.5"));
    assert!(
        page.contains("WiSE-FT: (1 − α)·checkpoint + α·fine-tuned"),
        "report lacks the curve"
    );
    assert!(out.join("wise_ft.png").is_file());
}

#[test]
fn wise_ft_needs_a_pretrained_start_and_a_valid_alpha() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let (code, log) = run(&["--wise-ft", "0.5", "--epochs", "1", "--out", out.to_str().unwrap()]);
    assert_eq!(code, Some(2), "{log}");
    assert!(
        log.contains("WiSE-FT interpolates with the pretrained CLIP a run starts from"),
        "{log}"
    );
    let (code, log) = run(&[
        "--pretrained",
        &fixture("oc-vit"),
        "--wise-ft",
        "0:2:0.5",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(2), "{log}");
    assert!(log.contains("is outside [0, 1]"), "{log}");
}
