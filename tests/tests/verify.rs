//! `cargo xtask verify`, the README's main command, end to end — and the trained model in use.

use clipmine_tests::{bin, copy_dir, root, text, xtask};
use serde_json::Value;

#[test]
fn verify_passes_on_the_demo_set_and_the_model_finds_images_and_captions() {
    let out = tempfile::tempdir().unwrap();
    let o = xtask(&["verify", "--out", out.path().to_str().unwrap()]);
    let log = text(&o);
    assert!(o.status.success(), "verify failed:\n{log}");
    for n in 1..=4 {
        assert!(log.contains(&format!("stage {n}")), "{log}");
    }
    assert!(log.contains("summary") && log.contains("all stages passed"), "{log}");
    let summary_rows = log
        .lines()
        .filter(|l| l.starts_with(|c: char| c.is_ascii_digit()) && l.contains(" PASS "))
        .count();
    assert_eq!(summary_rows, 4, "{log}");
    for (n, name) in [(1, "build"), (2, "batch"), (3, "step"), (4, "train")] {
        let report: Value =
            serde_json::from_str(&std::fs::read_to_string(out.path().join(format!("stage{n}-{name}.json"))).unwrap())
                .unwrap();
        assert_eq!(report["passed"], Value::Bool(true), "stage {n}: {report}");
    }
    let run = out.path().join("run");
    for f in [
        "model.safetensors",
        "config.toml",
        "tokenizer.json",
        "metrics.json",
        "loss.csv",
        "loss.png",
        "similarity_before.png",
        "similarity_after.png",
        "lr.png",
        "quality.png",
        "report.html",
    ] {
        assert!(run.join(f).is_file(), "missing {f}");
    }
    assert!(log.contains(&run.join("report.html").display().to_string()), "{log}");

    // image → text: every demo image gets one of its own captions first, among all captions.
    let demo = root().join("assets/demo");
    let captions = std::fs::read_to_string(demo.join("captions.csv")).unwrap();
    let rows: Vec<(String, String)> = captions
        .lines()
        .skip(1)
        .map(|l| {
            let (img, cap) = l.split_once(',').unwrap();
            (img.to_string(), cap.trim_matches('"').to_string())
        })
        .collect();
    let images: Vec<String> = rows
        .iter()
        .map(|r| r.0.clone())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut args = vec![
        "--json".to_string(),
        "--device".into(),
        "cpu".into(),
        "image-to-text".into(),
        "--run".into(),
        run.display().to_string(),
    ];
    args.extend(images.iter().map(|i| demo.join("images").join(i).display().to_string()));
    args.push("--captions".into());
    args.push(demo.join("captions.csv").display().to_string());
    let o = std::process::Command::new(bin("clip-predict"))
        .args(&args)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    for r in v["results"].as_array().unwrap() {
        let img = std::path::Path::new(r["image"].as_str().unwrap())
            .file_name()
            .unwrap()
            .to_string_lossy()
            .to_string();
        let best = r["captions"][0]["caption"].as_str().unwrap();
        assert!(
            rows.iter().any(|(i, c)| *i == img && c == best),
            "{img}: best caption {best:?} is not one of its own"
        );
    }
    assert_eq!(v["results"].as_array().unwrap().len(), images.len());

    // text → image, with an index: a Chinese and an English caption of each image find it first.
    let index = out.path().join("index");
    let o = std::process::Command::new(bin("clip-predict"))
        .args(["--device", "cpu", "index", "--run"])
        .arg(&run)
        .arg("--images")
        .arg(demo.join("images"))
        .arg("--out")
        .arg(&index)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    for img in &images {
        let own: Vec<&String> = rows.iter().filter(|r| &r.0 == img).map(|r| &r.1).collect();
        let chinese = own
            .iter()
            .find(|c| c.chars().any(|ch| ('\u{4e00}'..='\u{9fff}').contains(&ch)))
            .unwrap();
        let english = own.iter().find(|c| c.is_ascii()).unwrap();
        for q in [chinese, english] {
            let o = std::process::Command::new(bin("clip-predict"))
                .args(["--json", "--device", "cpu", "text-to-image", "--run"])
                .arg(&run)
                .arg("--index")
                .arg(&index)
                .arg(q.as_str())
                .args(["--top", "3"])
                .output()
                .unwrap();
            assert!(o.status.success(), "{}", text(&o));
            let v: Value = serde_json::from_slice(&o.stdout).unwrap();
            let top = v["results"][0]["image"].as_str().unwrap();
            assert!(top.ends_with(img.as_str()), "{q:?} found {top}, expected {img}");
        }
    }
}

#[test]
fn a_corrupt_image_stops_the_pipeline_at_stage_2() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("demo");
    copy_dir(&root().join("assets/demo"), &data);
    std::fs::write(
        data.join("images/coffee.jpg"),
        b"\xff\xd8\xff\xe0 this is not really a jpeg",
    )
    .unwrap();
    let out = dir.path().join("out");
    let o = xtask(&[
        "verify",
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    let log = text(&o);
    assert!(!o.status.success(), "{log}");
    assert!(log.contains("stopped: stage 2 (batch) failed"), "{log}");
    assert!(log.contains("coffee.jpg"), "the failure should name the file:\n{log}");
    assert!(!out.join("stage3-step.json").exists());
}

#[test]
fn an_impossible_config_stops_the_pipeline_at_stage_1() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.toml");
    std::fs::write(&cfg, "name = \"bad\"\n[text]\ndim = 100\nn_heads = 3\n").unwrap();
    let out = dir.path().join("out");
    let o = xtask(&[
        "verify",
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    let log = text(&o);
    assert!(!o.status.success(), "{log}");
    assert!(log.contains("stopped: stage 1 (build) failed"), "{log}");
    assert!(
        log.contains("text.dim (100) must be a positive multiple of text.n_heads (3)"),
        "{log}"
    );
    assert!(!out.join("stage2-batch.json").exists());
}
