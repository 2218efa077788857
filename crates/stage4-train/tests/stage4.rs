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

#[test]
fn a_run_from_pretrained_towers_starts_from_their_weights_and_keeps_their_tokenizer() {
    // The tiny fixture models from a Hugging Face cache, offline. With the towers' learning rates
    // at 0 their weights must come out exactly as the files hold them.
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../clip-core/tests/fixtures/pretrained/hub");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("clip.toml");
    std::fs::write(
        &config,
        "preset = \"tiny\"\n[image]\npretrained = \"clipmine-test/tiny-resnet-basic\"\n[text]\npretrained = \"clipmine-test/tiny-bert\"\npooling = \"mean\"\n[data]\nmax_length = 32\n[train]\nepochs = 1\nbatch_size = 15\nlr_image = 0.0\nlr_text = 0.0\n",
    )
    .unwrap();
    let out = dir.path().join("run");
    let o = Command::new(env!("CARGO_BIN_EXE_stage4-train"))
        .args(["--device", "cpu", "--config"])
        .arg(&config)
        .arg("--out")
        .arg(&out)
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HUB_CACHE", &fixtures)
        .output()
        .unwrap();
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(out.join("model.safetensors").is_file(), "{log}");

    let snap = fixtures.join("models--clipmine-test--tiny-bert/snapshots/0123456789abcdef0123456789abcdef01234567");
    let file = candle_core::safetensors::load(snap.join("model.safetensors"), &candle_core::Device::Cpu).unwrap();
    let run = candle_core::safetensors::load(out.join("model.safetensors"), &candle_core::Device::Cpu).unwrap();
    let flat = |t: &candle_core::Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(
        flat(&run["text_encoder.model.encoder.layer.1.output.dense.weight"]),
        flat(&file["bert.encoder.layer.1.output.dense.weight"])
    );
    // The run keeps the model's own tokenizer (its 36-entry vocabulary) and the resolved config.
    let tok = clip_core::data::TextTokenizer::from_file(&out.join("tokenizer.json"), 32).unwrap();
    assert_eq!(tok.vocab_size(), 36);
    assert_eq!(tok.encode("a photo of a cat").unwrap(), [2, 5, 6, 7, 5, 9, 3]);
    let cfg = clip_core::ClipConfig::from_toml_file(&out.join("config.toml")).unwrap();
    assert_eq!((cfg.text.kind, cfg.text.dim), (clip_core::config::TextKind::Bert, 24));
    assert_eq!(cfg.text.pretrained.as_deref(), Some("clipmine-test/tiny-bert"));
}
