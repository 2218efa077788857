//! Stage 3 as a user runs it: it passes on the demo set, and names the tensors whose gradient a
//! deliberately detached tower cuts off.

use std::process::Command;

fn run(args: &[&str]) -> (bool, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_stage3-step"))
        .args(["--device", "cpu"])
        .args(args)
        .output()
        .unwrap();
    (o.status.success(), clipmine_tests::log(&o))
}

#[test]
fn passes_on_the_demo_set() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("s3.json");
    let (ok, log) = run(&["--json", json.to_str().unwrap()]);
    assert!(ok, "{log}");
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap();
    assert_eq!(r["passed"], true);
    assert_eq!(r["metrics"]["no_gradient"].as_array().unwrap().len(), 0);
    let (loss, chance) = (
        r["metrics"]["loss"].as_f64().unwrap(),
        r["metrics"]["chance_loss"].as_f64().unwrap(),
    );
    assert!((loss - chance).abs() < 0.5 * chance, "{loss} vs {chance}");
}

#[test]
fn names_every_tensor_behind_a_cut_gradient() {
    let (ok, log) = run(&["--cut-gradient", "image"]);
    assert!(!ok, "{log}");
    assert!(log.contains("[FAIL] gradients"), "{log}");
    assert!(log.contains("image_encoder.model.conv1.weight"), "{log}");
    assert!(
        !log.contains("text_encoder.model.embeddings.word_embeddings.weight"),
        "the text tower still learns:\n{log}"
    );

    let (ok, log) = run(&["--cut-gradient", "text", "--preset", "tiny"]);
    assert!(!ok);
    assert!(
        log.contains("text_encoder.model.embeddings.word_embeddings.weight"),
        "{log}"
    );
}

#[test]
fn frozen_towers_pass_and_stay_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("frozen.toml");
    std::fs::write(&cfg, "[train]\nfreeze_text = true\n").unwrap();
    let (ok, log) = run(&["--config", cfg.to_str().unwrap()]);
    assert!(ok, "{log}");
    assert!(log.contains("frozen tensors unchanged"), "{log}");
}

#[test]
fn freeze_both_keeps_the_towers_and_their_batch_norm_statistics_still() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("s3.json");
    let (ok, log) = run(&["--freeze", "both", "--json", json.to_str().unwrap()]);
    assert!(ok, "{log}");
    assert!(log.contains("frozen tensors unchanged"), "{log}");
    assert!(
        log.contains("BatchNorm layers of the frozen image tower kept their running statistics"),
        "{log}"
    );
    // Only the heads (and the temperature) train.
    assert!(log.contains("[ok] gradients"), "{log}");
    let (ok, log) = run(&["--freeze", "all"]);
    assert!(!ok && log.contains("--freeze"), "{log}");
}

/// A fixture checkpoint folder (tiny random CLIPs made by open_clip and transformers).
fn fixture(name: &str) -> String {
    let snaps = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(format!(
        "../clip-core/tests/fixtures/clip/hub/models--test--{name}/snapshots"
    ));
    let dir = std::fs::read_dir(&snaps).unwrap().next().unwrap().unwrap().path();
    dir.to_str().unwrap().to_string()
}

#[test]
fn passes_from_each_pretrained_clip_kind_with_a_gradient_for_both_towers_and_logit_scale() {
    for name in ["oc-vit", "oc-rn", "hf-clip", "cn-clip"] {
        let dir = tempfile::tempdir().unwrap();
        let json = dir.path().join("s3.json");
        let (ok, log) = run(&["--pretrained", &fixture(name), "--json", json.to_str().unwrap()]);
        assert!(ok, "{name}: {log}");
        let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap();
        assert_eq!(r["metrics"]["no_gradient"].as_array().unwrap().len(), 0, "{name}");
        assert!(log.contains("[ok] gradients: all"), "{name}: {log}");
        // With --lock-image, the locked tensors are reported frozen and unchanged.
        let (ok, log) = run(&["--pretrained", &fixture(name), "--lock-image", "--unlocked-layers", "1"]);
        assert!(ok, "{name} --lock-image: {log}");
        assert!(
            log.contains("[ok] frozen:") && !log.contains("no frozen tensors"),
            "{name}: {log}"
        );
    }
}

/// With --micro-batch, the cached gradient is compared with the whole batch's where the two are
/// equal (no BatchNorm, no dropout), and the stage says why not elsewhere.
#[test]
fn the_gradient_cache_is_checked_against_the_whole_batch() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("vit.toml");
    std::fs::write(
        &cfg,
        "name = \"vit-exact\"\nprojection_dim = 16\nhead = \"linear\"\n\
         [image]\narch = \"vit\"\nimage_size = 32\npatch_size = 8\nwidth = 32\nlayers = 2\nheads = 2\nmlp_dim = 64\n\
         [text]\nkind = \"clip\"\npooling = \"eot\"\nvocab_size = 2048\ndim = 32\nn_layers = 2\nn_heads = 2\n\
         hidden_dim = 64\nmax_position_embeddings = 64\ndropout = 0.0\nattention_dropout = 0.0\n",
    )
    .unwrap();
    let args = [
        "--config",
        cfg.to_str().unwrap(),
        "--batch-size",
        "16",
        "--micro-batch",
        "4",
    ];
    let (ok, log) = run(&args);
    assert!(ok, "{log}");
    let line = log
        .lines()
        .find(|l| l.contains("[ok] gradient cache: on the first 8 pairs, in micro-batches of 4"))
        .unwrap_or_else(|| panic!("{log}"));
    let within: f64 = line
        .split("within ")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(within < 1e-5, "{line}");
    // The tiny preset's ResNet has BatchNorm: not compared, and the stage says why.
    let (ok, log) = run(&["--micro-batch", "4"]);
    assert!(ok, "{log}");
    assert!(
        log.contains("not compared with the whole batch's gradient: the image tower's BatchNorm"),
        "{log}"
    );
}
