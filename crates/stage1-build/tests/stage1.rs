//! Stage 1 on pretrained towers, as a user runs it offline: the tiny fixture models in a Hugging
//! Face cache (HF_HUB_OFFLINE=1, HF_HUB_CACHE), the report saying what came from where, and the
//! probe matching PyTorch's output for the same caption.

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::Device;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../clip-core/tests/fixtures/pretrained/hub")
}

fn stage1(config: &Path, json: &Path, cache: &Path) -> (Option<i32>, String, serde_json::Value) {
    let out = Command::new(env!("CARGO_BIN_EXE_stage1-build"))
        .args(["--device", "cpu", "--config"])
        .arg(config)
        .arg("--json")
        .arg(json)
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HUB_CACHE", cache)
        .output()
        .unwrap();
    let text = clipmine_tests::log(&out);
    let report = std::fs::read_to_string(json)
        .map(|s| serde_json::from_str(&s).unwrap())
        .unwrap_or(serde_json::Value::Null);
    (out.status.code(), text, report)
}

#[test]
fn loads_pretrained_towers_offline_and_records_the_probe() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("clip.toml");
    std::fs::write(
        &config,
        "preset = \"tiny\"\n[image]\npretrained = \"clipmine-test/tiny-resnet-basic\"\n[text]\npretrained = \"clipmine-test/tiny-distilbert\"\n[data]\nmax_length = 32\n",
    )
    .unwrap();
    let json = tmp.path().join("s1.json");
    let (code, text, report) = stage1(&config, &json, &fixtures());
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains("clipmine-test/tiny-distilbert@main (commit 0123456789abcdef"),
        "{text}"
    );
    assert!(text.contains("tensors loaded"), "{text}");
    let towers = report["metrics"]["pretrained"]["towers"].as_array().unwrap();
    assert_eq!(towers.len(), 2);
    assert_eq!(towers[1]["ignored"], 6);

    // The probe's text values are PyTorch's [CLS] output for the same caption.
    let probe = &report["metrics"]["probe"];
    assert_eq!(probe["caption"], "a photo of a cat");
    assert_eq!(probe["image_size"], 224);
    let ours: Vec<f32> = serde_json::from_value(probe["text"].clone()).unwrap();
    let out = candle_core::safetensors::load(
        fixtures().join("models--clipmine-test--tiny-distilbert/outputs.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let torch: Vec<f32> = out["cls"].get(0).unwrap().to_vec1().unwrap();
    assert_eq!(ours.len(), 8);
    for (a, b) in ours.iter().zip(&torch) {
        assert!((a - b).abs() < 1e-4, "probe {ours:?} vs PyTorch {:?}", &torch[..8]);
    }
    assert_eq!(probe["image"].as_array().unwrap().len(), 8);
}

#[test]
fn an_uncached_model_offline_fails_naming_the_cache_and_the_fix() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("clip.toml");
    std::fs::write(&config, "[text]\npretrained = \"distilbert/distilbert-base-uncased\"\n").unwrap();
    let (code, text, _) = stage1(&config, &tmp.path().join("s1.json"), tmp.path());
    assert_ne!(code, Some(0), "{text}");
    assert!(text.contains("models--distilbert--distilbert-base-uncased"), "{text}");
    assert!(
        text.contains("huggingface-cli download distilbert/distilbert-base-uncased"),
        "{text}"
    );
}

#[test]
fn a_teacher_is_sized_beside_the_student_and_what_it_passes_on_is_listed() {
    let tmp = tempfile::tempdir().unwrap();
    // A ViT student of the tiny open_clip fixture's family, at half its image width and one of
    // its two blocks.
    let config = tmp.path().join("student.toml");
    std::fs::write(
        &config,
        "preset = \"student-vit-s\"\nprojection_dim = 8\n[image]\nimage_size = 32\npatch_size = 16\nwidth = 8\nlayers = 1\nheads = 2\nmlp_dim = 16\n[text]\ndim = 4\nn_layers = 1\nn_heads = 2\nhidden_dim = 8\n",
    )
    .unwrap();
    let teacher = std::fs::read_dir(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../clip-core/tests/fixtures/clip/hub/models--test--oc-vit/snapshots"),
    )
    .unwrap()
    .next()
    .unwrap()
    .unwrap()
    .path();
    let json = tmp.path().join("s1.json");
    let out = Command::new(env!("CARGO_BIN_EXE_stage1-build"))
        .args(["--device", "cpu", "--config"])
        .arg(&config)
        .arg("--teacher")
        .arg(&teacher)
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    let log = clipmine_tests::log(&out);
    assert_eq!(out.status.code(), Some(0), "{log}");
    assert!(
        log.contains("student vs teacher: 40,433 against 217,765 parameters (5.4× fewer)"),
        "{log}"
    );
    assert!(
        log.contains("image tower (ViT): blocks 0 of the teacher's 2 → the student's 1, width 16 → 8"),
        "{log}"
    );
    assert!(
        log.contains("kept as initialised: text_encoder.model.embeddings.token_embedding.weight"),
        "{log}"
    );
    assert!(log.contains("stage 4 inherits the token table too"), "{log}");
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(r["metrics"]["teacher_parameters"], 217_765, "{r}");
    assert_eq!(r["metrics"]["inherited"]["tensors"], 45, "{r}");
}
