//! Stage 4's gate as a user meets it: too short a run fails with advice; a bad dataset path is
//! a clear error.

use std::process::Command;

fn run(args: &[&str]) -> (Option<i32>, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_stage4-train"))
        .args(["--device", "cpu"])
        .args(args)
        .output()
        .unwrap();
    (o.status.code(), clipmine_tests::log(&o))
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
    let log = clipmine_tests::log(&o);
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

/// The demo's captions and image names, from its captions file.
fn demo_pairs() -> Vec<(String, String)> {
    let demo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/demo/captions.csv");
    let mut r = csv::Reader::from_path(&demo).unwrap();
    r.records()
        .map(|row| {
            let row = row.unwrap();
            (row[0].to_string(), row[1].to_string())
        })
        .collect()
}

#[test]
fn the_run_folder_has_a_self_contained_report_and_labelled_plots() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let (_, log) = run(&["--epochs", "3", "--out", out.to_str().unwrap()]);
    let page = out.join("report.html");
    assert!(log.contains(&format!("report: {}", page.display())), "{log}");
    let html = std::fs::read_to_string(&page).unwrap();
    // Every caption and image name of the demo, escaped as HTML text (captions hold commas and
    // Chinese characters, none of & < > " ').
    let pairs = demo_pairs();
    assert_eq!(pairs.len(), 30);
    for (image, caption) in &pairs {
        assert!(html.contains(caption.as_str()), "caption {caption} missing");
        assert!(html.contains(&format!(">{image}<")), "image {image} missing");
    }
    assert!(html.contains("穿橙色太空衣的太空人"), "the Chinese captions as text");
    // Curves as inline SVG, three of them; thumbnails as data URIs; nothing fetched from anywhere.
    assert_eq!(html.matches("<svg").count(), 3, "loss, learning rate, recall");
    assert!(html.contains("Loss per epoch") && html.contains("Validation recall@1 per epoch"));
    assert!(html.contains("data:image/jpeg;base64,"));
    for external in ["http://", "https://", "//cdn", "src=\"//"] {
        assert!(!html.contains(external), "report.html refers to {external}");
    }
    assert!(html.contains("Before training") && html.contains("After training"));
    // The similarity matrices and their labels, as JSON.
    let sim: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("similarity.json")).unwrap()).unwrap();
    assert_eq!(sim["images"].as_array().unwrap().len(), 10);
    assert_eq!(sim["before"].as_array().unwrap().len(), 10);
    assert_eq!(sim["after"].as_array().unwrap().len(), 10);
    // The PNG plots: the expected size and not blank.
    for (f, size) in [
        ("loss.png", Some((720, 440))),
        ("lr.png", Some((720, 440))),
        ("quality.png", Some((720, 440))),
        ("similarity_before.png", None),
        ("similarity_after.png", None),
    ] {
        let img = image::open(out.join(f))
            .unwrap_or_else(|e| panic!("{f}: {e}"))
            .to_rgb8();
        if let Some(s) = size {
            assert_eq!((img.width(), img.height()), s, "{f}");
        }
        let colours: std::collections::BTreeSet<[u8; 3]> = img.pixels().map(|p| p.0).collect();
        assert!(colours.len() > 20, "{f} looks blank: {} colours", colours.len());
    }
}

#[test]
fn a_resumed_run_keeps_the_similarity_before_training_in_its_report() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let o = out.to_str().unwrap();
    run(&["--epochs", "1", "--out", o]);
    let first: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("similarity.json")).unwrap()).unwrap();
    assert!(first["before"].is_array() && first["after"].is_array());
    let (_, log) = run(&["--resume", o, "--epochs", "2"]);
    assert!(log.contains("resuming after epoch 1"), "{log}");
    let again: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("similarity.json")).unwrap()).unwrap();
    assert_eq!(again["before"], first["before"], "the untrained model's matrix is kept");
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(
        html.contains("Before training") && html.contains("Finished: 2 epochs"),
        "report after resume"
    );
}

#[test]
fn batches_in_micro_batches_train_the_demo_set_through_the_gate() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let json = dir.path().join("s4.json");
    // Batches of 16 through the gradient cache, 4 pairs at a time.
    let (code, log) = run(&[
        "--micro-batch",
        "4",
        "--out",
        out.to_str().unwrap(),
        "--json",
        json.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains("through the towers 4 at a time (gradient cache)"), "{log}");
    let cfg = std::fs::read_to_string(out.join("config.toml")).unwrap();
    assert!(cfg.contains("micro_batch = 4"), "the run records it: {cfg}");
    // A micro-batch that does not divide the batch is refused before anything is written.
    let bad = dir.path().join("bad");
    let (code, log) = run(&["--micro-batch", "3", "--out", bad.to_str().unwrap()]);
    assert_eq!(code, Some(2), "{log}");
    assert!(
        log.contains("train.micro_batch (3) must divide train.batch_size (16)"),
        "{log}"
    );
    assert!(!bad.exists());
}

/// Stage 4 started with a launcher's environment `env`: its log, after checking that it exited 2
/// and wrote nothing.
fn refused_as_a_rank(env: &[(&str, &str)]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let o = Command::new(env!("CARGO_BIN_EXE_stage4-train"))
        .args(["--device", "cpu", "--out", out.to_str().unwrap()])
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let log = clipmine_tests::log(&o);
    assert_eq!(o.status.code(), Some(2), "{log}");
    assert!(!out.exists(), "nothing written");
    log
}

/// A build without MPI started by mpirun as a rank of two says how to build one, and writes
/// nothing. (With feature `mpi`, `tests/mpi.rs` trains as ranks.)
#[cfg(not(feature = "mpi"))]
#[test]
fn started_as_ranks_without_mpi_it_says_how_to_build_with_it() {
    let log = refused_as_a_rank(&[("OMPI_COMM_WORLD_RANK", "1"), ("OMPI_COMM_WORLD_SIZE", "2")]);
    assert!(
        log.contains("mpirun started this program as rank 1 of 2") && log.contains("--features mpi"),
        "{log}"
    );
}

/// Started by torchrun as a rank of two (its ranks expect NCCL, which clipmine does not have):
/// refused with what to do instead, nothing written, with or without MPI.
#[test]
fn started_by_torchrun_it_refuses_rather_than_train_twice() {
    let log = refused_as_a_rank(&[
        ("RANK", "0"),
        ("WORLD_SIZE", "2"),
        ("LOCAL_RANK", "0"),
        ("LOCAL_WORLD_SIZE", "2"),
        ("MASTER_ADDR", "127.0.0.1"),
        ("MASTER_PORT", "29500"),
    ]);
    assert!(
        log.contains("torchrun started this program as rank 0 of 2") && log.contains("mpirun -np 2"),
        "{log}"
    );
}
