//! clip-predict on a real (briefly trained) run of the demo set: indexes, evaluation, errors.

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::Device;
use clip_core::fit::Trainer;
use clip_core::prepare::{prepare, DataSource};
use clip_core::ClipConfig;

/// A run folder after one epoch on the demo set (enough for the file formats, not for quality).
fn run_folder(dir: &Path, seed: u64) -> PathBuf {
    let cfg = ClipConfig {
        seed,
        ..ClipConfig::tiny()
    };
    let data = prepare(&cfg, &DataSource::default(), &Device::Cpu, &clip_core::progress::Silent).unwrap();
    let out = dir.join(format!("run-{seed}"));
    let mut t = Trainer::new(&cfg, data, &out).unwrap();
    let (loss, pps) = t.train_epoch(|_, _, _| {}).unwrap();
    let v = t.validate().unwrap();
    t.end_epoch(loss, &v, 0.0, pps).unwrap();
    out
}

fn predict(args: &[&str]) -> (Option<i32>, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_clip-predict"))
        .args(["--device", "cpu"])
        .args(args)
        .output()
        .unwrap();
    clipmine_tests::outcome(&o)
}

fn demo_images() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/demo/images")
}

#[test]
fn the_index_is_incremental_and_tied_to_its_model() {
    let dir = tempfile::tempdir().unwrap();
    let run = run_folder(dir.path(), 42);
    let images = dir.path().join("photos");
    std::fs::create_dir_all(images.join("sub")).unwrap();
    for (i, f) in ["coffee.jpg", "chelsea.webp", "rocket.jpg"].iter().enumerate() {
        let to = if i == 2 {
            images.join("sub").join(f)
        } else {
            images.join(f)
        };
        std::fs::copy(demo_images().join(f), to).unwrap();
    }
    let index = dir.path().join("index");
    let (r, s) = (run.to_str().unwrap(), images.to_str().unwrap());
    let (code, out, err) = predict(&[
        "--json",
        "index",
        "--run",
        r,
        "--images",
        s,
        "--out",
        index.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(0), "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (v["images"].as_u64(), v["stats"]["embedded"].as_u64()),
        (Some(3), Some(3))
    );

    // One new file, one deleted, one broken: only the new one is embedded; the broken one is named.
    std::fs::copy(demo_images().join("horse.png"), images.join("horse.png")).unwrap();
    std::fs::remove_file(images.join("coffee.jpg")).unwrap();
    std::fs::write(images.join("broken.jpg"), b"not a jpeg").unwrap();
    let (code, out, err) = predict(&[
        "--json",
        "index",
        "--run",
        r,
        "--images",
        s,
        "--out",
        index.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(0), "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["stats"]["embedded"], 1, "{v}");
    assert_eq!(v["stats"]["reused"], 2, "{v}");
    assert_eq!(v["stats"]["removed"], 1, "{v}");
    // The new photo went into a segment of its own; the first one was kept as it was.
    assert_eq!(
        (v["segments"].as_u64(), v["format_version"].as_u64()),
        (Some(2), Some(2)),
        "{v}"
    );
    assert!(
        v["stats"]["failed"][0][0].as_str().unwrap().contains("broken.jpg"),
        "{v}"
    );
    assert_eq!(v["images"], 3);

    // Searching works and finds indexed files only.
    let (code, out, err) = predict(&[
        "--json",
        "text-to-image",
        "--run",
        r,
        "--index",
        index.to_str().unwrap(),
        "一杯咖啡",
        "--top",
        "5",
    ]);
    assert_eq!(code, Some(0), "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["results"].as_array().unwrap().len(), 3);
    assert!(!out.contains("coffee.jpg"));

    // An index made by another model is refused, with what to do.
    let other = run_folder(dir.path(), 7);
    let (code, _, err) = predict(&[
        "text-to-image",
        "--run",
        other.to_str().unwrap(),
        "--index",
        index.to_str().unwrap(),
        "a cat",
    ]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("made by another model") && err.contains("clip-predict index"),
        "{err}"
    );
}

#[test]
fn eval_reports_zero_shot_accuracy_on_class_folders_and_recall_on_captions() {
    let dir = tempfile::tempdir().unwrap();
    let run = run_folder(dir.path(), 42);
    let classes = dir.path().join("classes");
    for (label, files) in [
        ("cat", ["chelsea.webp"]),
        ("coffee", ["coffee.jpg"]),
        ("rocket", ["rocket.jpg"]),
    ] {
        std::fs::create_dir_all(classes.join(label)).unwrap();
        for f in files {
            std::fs::copy(demo_images().join(f), classes.join(label).join(f)).unwrap();
        }
    }
    let png = dir.path().join("confusion.png");
    let (code, out, err) = predict(&[
        "--json",
        "eval",
        "--run",
        run.to_str().unwrap(),
        "--data",
        classes.to_str().unwrap(),
        "--templates",
        "a photo of a {label}",
        "一張{label}的照片",
        "--confusion",
        png.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(0), "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["kind"], "zero-shot");
    assert_eq!(v["images"], 3);
    let acc = v["accuracy"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&acc));
    let confusion: Vec<Vec<u64>> = serde_json::from_value(v["confusion"].clone()).unwrap();
    assert_eq!(confusion.iter().flatten().sum::<u64>(), 3);
    assert_eq!(v["templates"].as_array().unwrap().len(), 2);
    assert!(png.is_file());
    // CLIP_benchmark's fields: 3 classes (no top-5), each with one image.
    assert_eq!(
        (v["dataset"].as_str(), v["task"].as_str(), v["model"].as_str()),
        (Some("classes"), Some("zeroshot_classification"), Some("tiny"))
    );
    assert_eq!(v["pretrained"].as_str(), run.to_str());
    assert_eq!(v["metrics"]["acc1"].as_f64(), Some(acc));
    assert_eq!(
        v["metrics"]["mean_per_class_recall"].as_f64(),
        Some(acc),
        "one image per class"
    );
    assert!(v["metrics"]["acc5"].is_null());

    let (code, out, err) = predict(&[
        "--json",
        "eval",
        "--run",
        run.to_str().unwrap(),
        "--data",
        demo_images().parent().unwrap().to_str().unwrap(),
    ]);
    assert_eq!(code, Some(0), "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (v["kind"].as_str(), v["images"].as_u64(), v["captions"].as_u64()),
        (Some("retrieval"), Some(10), Some(30))
    );
    let r10 = v["recall"]["i2t_r10"].as_f64().unwrap();
    assert!(r10 >= v["recall"]["i2t_r1"].as_f64().unwrap());
    assert_eq!(v["task"], "zeroshot_retrieval");
    assert_eq!(v["metrics"]["text_retrieval_recall@10"].as_f64(), Some(r10));
    assert_eq!(v["metrics"]["image_retrieval_recall@1"], v["recall"]["t2i_r1"]);
}

#[test]
fn clear_errors_for_a_missing_or_incomplete_run_and_unreadable_images() {
    let dir = tempfile::tempdir().unwrap();
    let (code, _, err) = predict(&["image-to-text", "--run", "/nonexistent/run", "x.jpg", "--texts", "a"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("does not exist"), "{err}");

    let incomplete = dir.path().join("incomplete");
    std::fs::create_dir_all(&incomplete).unwrap();
    std::fs::write(incomplete.join("config.toml"), "").unwrap();
    let (code, _, err) = predict(&[
        "image-to-text",
        "--run",
        incomplete.to_str().unwrap(),
        "x.jpg",
        "--texts",
        "a",
    ]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("incomplete") && err.contains("model.safetensors") && err.contains("tokenizer.json"),
        "{err}"
    );

    // One unreadable image is named; the others are still captioned.
    let run = run_folder(dir.path(), 42);
    let broken = dir.path().join("broken.png");
    std::fs::write(&broken, b"garbage").unwrap();
    let good = demo_images().join("coffee.jpg");
    let (code, out, err) = predict(&[
        "--json",
        "image-to-text",
        "--run",
        run.to_str().unwrap(),
        broken.to_str().unwrap(),
        good.to_str().unwrap(),
        "--texts",
        "一杯咖啡",
        "一隻貓",
    ]);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(err.contains("broken.png"), "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["results"].as_array().unwrap().len(), 1);
    let probs: f64 = v["results"][0]["captions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["probability"].as_f64().unwrap())
        .sum();
    assert!((probs - 1.0).abs() < 1e-4);
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Issue #32: `index --images victim --out victim` deleted the user's `seg-*` files (a photo it
/// had just indexed among them). An index is written only into a new or empty folder or one
/// holding an index, and its cleanup removes only the segments its manifests recorded.
#[test]
fn index_writes_only_into_a_folder_of_its_own_and_deletes_none_of_the_users_files() {
    let dir = tempfile::tempdir().unwrap();
    let run = run_folder(dir.path(), 42);
    let r = run.to_str().unwrap();
    let victim = dir.path().join("victim");
    std::fs::create_dir_all(&victim).unwrap();
    std::fs::copy(demo_images().join("coffee.jpg"), victim.join("coffee.jpg")).unwrap();
    std::fs::copy(demo_images().join("horse.png"), victim.join("seg-beach-2019.png")).unwrap();
    std::fs::write(victim.join("seg-notes.txt"), "my notes").unwrap();
    let v = victim.to_str().unwrap();
    let (code, out, err) = predict(&["index", "--run", r, "--images", v, "--out", v]);
    assert_eq!(code, Some(2), "{out}{err}");
    assert!(err.contains("not empty") && err.contains("folder of its own"), "{err}");
    assert_eq!(names(&victim), ["coffee.jpg", "seg-beach-2019.png", "seg-notes.txt"]);
    assert_eq!(
        std::fs::read_to_string(victim.join("seg-notes.txt")).unwrap(),
        "my notes"
    );

    // A run folder holds a manifest.json too (its checksums): not an index's, so refused.
    let before = names(&run);
    let (code, _, err) = predict(&["index", "--run", r, "--images", v, "--out", r]);
    assert_eq!(code, Some(2));
    assert!(err.contains("not a readable image index"), "{err}");
    assert_eq!(names(&run), before);

    // A new folder works, and so does re-indexing into it: the user's files put beside the
    // index survive; the segments merged away go.
    let index = dir.path().join("index");
    let i = index.to_str().unwrap();
    let (code, out, err) = predict(&["--json", "index", "--run", r, "--images", v, "--out", i]);
    assert_eq!(code, Some(0), "{out}{err}");
    std::fs::write(index.join("seg-notes.txt"), "mine").unwrap();
    std::fs::copy(demo_images().join("rocket.jpg"), victim.join("rocket.jpg")).unwrap();
    let (code, out, err) = predict(&["--json", "index", "--run", r, "--images", v, "--out", i]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert_eq!(
        names(&index),
        [
            "manifest.json",
            "seg-000001.safetensors",
            "seg-000002.safetensors",
            "seg-notes.txt"
        ]
    );
    std::fs::remove_file(victim.join("coffee.jpg")).unwrap();
    std::fs::remove_file(victim.join("seg-beach-2019.png")).unwrap();
    let (code, out, err) = predict(&["--json", "index", "--run", r, "--images", v, "--out", i]);
    assert_eq!(code, Some(0), "{out}{err}");
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (j["images"].as_u64(), j["segments"].as_u64()),
        (Some(1), Some(1)),
        "{j}"
    );
    assert_eq!(
        names(&index),
        ["manifest.json", "seg-000003.safetensors", "seg-notes.txt"]
    );
    assert_eq!(names(&victim), ["rocket.jpg", "seg-notes.txt"]);
}
