//! `stage4-train --teacher` as a user runs it: a trained run teaches a fresh student, the
//! teacher's embeddings are computed once and read back by the next run, and the gate checks
//! that the student came to agree with the teacher.

use std::path::Path;
use std::process::Command;

fn run(args: &[&str]) -> (Option<i32>, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_stage4-train"))
        .args(["--device", "cpu"])
        .args(args)
        .output()
        .unwrap();
    (o.status.code(), clipmine_tests::log(&o))
}

fn check<'a>(report: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no check {name:?} in {report}"))
}

fn p(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn a_trained_run_teaches_a_student_and_its_embeddings_are_computed_once() {
    let dir = tempfile::tempdir().unwrap();
    let (teacher, cache) = (dir.path().join("teacher"), dir.path().join("cache"));
    let (_, log) = run(&["--epochs", "12", "--out", p(&teacher)]);
    assert!(teacher.join("model.safetensors").is_file(), "{log}");
    let student = |name: &str| {
        let (out, json) = (dir.path().join(name), dir.path().join(format!("{name}.json")));
        let (_, log) = run(&[
            "--teacher",
            p(&teacher),
            "--seed",
            "7",
            "--epochs",
            "8",
            "--feature-cache",
            p(&cache),
            "--out",
            p(&out),
            "--json",
            p(&json),
        ]);
        let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        (log, r)
    };
    let (log, r) = student("a");
    assert!(
        log.contains("distillation loss: 1 × contrastive + 2000 × feature MSE"),
        "{log}"
    );
    assert!(log.contains("teacher and student, on the validation split"), "{log}");
    // A run of the same family on the same captions: the text tower starts from the teacher's,
    // its token table included (the same tokenizer).
    assert!(
        log.contains("weights inherited from the teacher") && log.contains("text tower: blocks 0, 1"),
        "{log}"
    );
    assert!(!log.contains("kept as initialised"), "{log}");
    let d = &r["metrics"]["distillation"];
    let page = std::fs::read_to_string(dir.path().join("a/report.html")).unwrap();
    assert!(
        page.contains("Teacher and student, on the validation split"),
        "no teacher table in report.html"
    );
    let metrics: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("a/metrics.json")).unwrap()).unwrap();
    assert_eq!(metrics["distillation"]["agreement"], d["agreement"]);
    for who in ["teacher_footprint", "student_footprint"] {
        assert!(d[who]["images_per_second"].as_f64().unwrap() > 0.0, "{d}");
        assert!(d[who]["weight_bytes"].as_u64().unwrap() > 0, "{d}");
    }
    assert!(
        !log.contains("(0 teacher forward passes"),
        "the first run must run the teacher:\n{log}"
    );
    assert_eq!(check(&r, "agreement with the teacher")["passed"], true, "{log}");
    let d = &r["metrics"]["distillation"];
    assert!(d["agreement"].as_f64().unwrap() > d["agreement_start"].as_f64().unwrap());
    assert!(d["teacher_params"].as_u64().unwrap() > 0);
    // The same teacher and data again: every embedding comes from the cache.
    let (log, _) = student("b");
    assert!(log.contains("(0 teacher forward passes, 40 rows reused"), "{log}");
    // A distillation resumes with its recorded teacher (and its cache) for more epochs.
    let (_, log) = run(&[
        "--resume",
        p(&dir.path().join("a")),
        "--epochs",
        "9",
        "--feature-cache",
        p(&cache),
    ]);
    assert!(log.contains("resume: train.epochs: 8 → 9"), "{log}");
    assert!(log.contains("(0 teacher forward passes"), "{log}");
    assert!(log.contains("epoch   9:"), "{log}");
    // The affinity term has a floor (the teacher's own entropy): its gate asks for a fall, not a
    // halving.
    let config = dir.path().join("affinity.toml");
    std::fs::write(&config, "preset = \"tiny\"\n[distill]\naffinity = 1.0\nfeature = 0.0\n").unwrap();
    let json = dir.path().join("c.json");
    let (_, log) = run(&[
        "--config",
        p(&config),
        "--teacher",
        p(&teacher),
        "--epochs",
        "6",
        "--feature-cache",
        p(&cache),
        "--out",
        p(&dir.path().join("c")),
        "--json",
        p(&json),
    ]);
    assert!(log.contains("1 × contrastive + 1 × affinity"), "{log}");
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let fell = check(&r, "loss fell");
    assert!(fell["detail"].as_str().unwrap().contains("below the first"), "{fell}");
    assert_eq!(
        fell["passed"],
        r["metrics"]["last_epoch_loss"].as_f64() < r["metrics"]["first_epoch_loss"].as_f64(),
        "{fell}"
    );
}

#[test]
fn with_augmentation_the_teacher_embeds_fixed_views_once_and_the_student_trains_on_them() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let teacher = oc_vit();
    let student = |name: &str, views: &str| {
        let config = dir.path().join(format!("{name}.toml"));
        std::fs::write(&config, format!("preset = \"tiny\"\n[distill]\nviews = {views}\n")).unwrap();
        run(&[
            "--config",
            p(&config),
            "--teacher",
            p(&teacher),
            "--augment",
            "--epochs",
            "2",
            "--feature-cache",
            p(&cache),
            "--out",
            p(&dir.path().join(name)),
        ])
    };
    let (code, log) = student("a", "2");
    assert!(matches!(code, Some(0 | 1)), "{log}");
    assert!(log.contains("and 2 augmented views of each"), "{log}");
    assert!(log.contains("epoch e trains on view e mod 2 of every image"), "{log}");
    assert!(log.contains("epoch   2:"), "{log}");
    // The 10 demo images as they are, each of their 2 views, their 30 captions: a batch each.
    assert!(log.contains("(4 teacher forward passes, 0 rows reused"), "{log}");
    // One view more: only that one is computed; the rest comes from the cache.
    let (_, log) = student("b", "3");
    // (10 images + 2 × 10 views + 30 captions reused.)
    assert!(log.contains("(1 teacher forward passes, 60 rows reused"), "{log}");
    // Refused up front, with the range.
    let (code, log) = student("c", "0");
    assert_eq!(code, Some(2), "{log}");
    assert!(log.contains("distill.views must be from 1 to 64"), "{log}");
}

/// The tiny open_clip checkpoint the pretrained-CLIP tests load (a folder in the Hub cache's
/// layout).
fn oc_vit() -> std::path::PathBuf {
    let snaps = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../clip-core/tests/fixtures/clip/hub/models--test--oc-vit/snapshots");
    std::fs::read_dir(&snaps).unwrap().next().unwrap().unwrap().path()
}

#[test]
fn images_without_captions_distil_the_image_tower_only() {
    let dir = tempfile::tempdir().unwrap();
    let photos = dir.path().join("photos");
    std::fs::create_dir(&photos).unwrap();
    let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/demo/images");
    for e in std::fs::read_dir(demo).unwrap() {
        let f = e.unwrap().path();
        std::fs::copy(&f, photos.join(f.file_name().unwrap())).unwrap();
    }
    // No teacher: nothing to learn from, and the message says what would be.
    let (code, log) = run(&["--data", p(&photos), "--out", p(&dir.path().join("a"))]);
    assert_eq!(code, Some(2), "{log}");
    assert!(
        log.contains("images without captions") && log.contains("--teacher"),
        "{log}"
    );
    // Refused before a run folder is made: the corrected command can use the same --out.
    assert!(!dir.path().join("a").exists(), "a refused run left a folder");
    // A teacher with the default terms: the contrastive one needs captions.
    let teacher = oc_vit();
    let (code, log) = run(&[
        "--data",
        p(&photos),
        "--teacher",
        p(&teacher),
        "--out",
        p(&dir.path().join("b")),
    ]);
    assert_eq!(code, Some(2), "{log}");
    assert!(
        log.contains("contrastive = 1") && log.contains("contrastive = 0.0"),
        "{log}"
    );
    assert!(!dir.path().join("b").exists(), "a refused run left a folder");
    // The feature term alone trains the image tower.
    let config = dir.path().join("images-only.toml");
    std::fs::write(&config, "preset = \"tiny\"\n[distill]\ncontrastive = 0.0\n").unwrap();
    let json = dir.path().join("c.json");
    let (code, log) = run(&[
        "--config",
        p(&config),
        "--data",
        p(&photos),
        "--teacher",
        p(&teacher),
        "--epochs",
        "4",
        "--out",
        p(&dir.path().join("c")),
        "--json",
        p(&json),
    ]);
    assert!(matches!(code, Some(0 | 1)), "{log}");
    assert!(log.contains("images without captions: the image tower learns"), "{log}");
    assert!(dir.path().join("c/model.safetensors").is_file(), "{log}");
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(r["metrics"]["distillation"]["images_only"], true, "{r}");
    assert_eq!(check(&r, "loss fell")["passed"], true, "{log}");
}

/// A resumed run's teacher comes from its folder, which may come from anyone: nothing it names
/// is downloaded (issue #32, item 9). Were it fetched, it would be from a closed port.
#[test]
fn a_resumed_run_never_downloads_the_teacher_its_folder_names() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let (_, log) = run(&["--epochs", "1", "--out", p(&out)]);
    assert!(out.join("model.safetensors").is_file(), "{log}");
    // Forge the run's config to name a Hub teacher (its manifest rewritten too, as anyone could).
    let config = std::fs::read_to_string(out.join("config.toml")).unwrap();
    let line = "teacher = \"attacker-org/some-huge-model\"\n";
    let forged = if config.contains("[distill]\n") {
        config.replacen("[distill]\n", &format!("[distill]\n{line}"), 1)
    } else {
        format!("{config}\n[distill]\n{line}")
    };
    clip_core::files::write_checked(&out, &[("config.toml".into(), forged.into_bytes())]).unwrap();
    let hf_home = dir.path().join("hf-home");
    let o = Command::new(env!("CARGO_BIN_EXE_stage4-train"))
        .env("HF_HOME", &hf_home)
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .args(["--device", "cpu", "--resume", p(&out), "--epochs", "2"])
        .output()
        .unwrap();
    let log = clipmine_tests::log(&o);
    assert_ne!(o.status.code(), Some(0), "{log}");
    assert!(
        log.contains("read from this machine only") && log.contains("pass --teacher"),
        "{log}"
    );
    assert!(!hf_home.exists(), "the Hub cache was touched:\n{log}");
}
