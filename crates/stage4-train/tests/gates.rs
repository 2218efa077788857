//! Stage 4's final gate fails on a model that learned nothing: with every learning rate at 0
//! the weights stay as initialised, and neither zero-shot accuracy on class folders nor
//! retrieval on a dataset larger than the "learn it perfectly" size may pass.

use std::path::Path;
use std::process::Command;

use image::{Rgb, RgbImage};

fn untrained(data: &Path, out: &Path) -> (Option<i32>, String, serde_json::Value) {
    let json = out.with_extension("json");
    let o = Command::new(env!("CARGO_BIN_EXE_stage4-train"))
        .args([
            "--device",
            "cpu",
            "--epochs",
            "1",
            "--lr-image",
            "0",
            "--lr-text",
            "0",
            "--lr-head",
            "0",
        ])
        .arg("--data")
        .arg(data)
        .arg("--out")
        .arg(out)
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    let log = clipmine_tests::log(&o);
    let report = std::fs::read_to_string(&json)
        .map(|s| serde_json::from_str(&s).unwrap())
        .unwrap_or(serde_json::Value::Null);
    (o.status.code(), log, report)
}

/// A 16×16 picture whose colours depend on `i`.
fn picture(i: usize, path: &Path) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let c = |k: usize| ((i * 37 + k * 91) % 256) as u8;
    RgbImage::from_fn(16, 16, |x, y| Rgb([c(0) ^ (x as u8 * 8), c(1), c(2) ^ (y as u8 * 8)]))
        .save(path)
        .unwrap();
}

#[test]
fn zero_shot_fails_on_an_untrained_model() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("classes");
    let labels = [
        "apple", "boat", "cat", "door", "egg", "fish", "goat", "hat", "ink", "jar",
    ];
    for (c, label) in labels.iter().enumerate() {
        for k in 0..3 {
            picture(c * 3 + k, &data.join(label).join(format!("{k}.png")));
        }
    }
    let (code, log, r) = untrained(&data, &dir.path().join("run"));
    assert_eq!(code, Some(1), "{log}");
    assert!(
        log.contains("[FAIL] zero-shot:") && log.contains("halfway from chance"),
        "{log}"
    );
    let gate = &r["metrics"]["gate"];
    assert_eq!(gate["name"], "zero-shot", "{r}");
    assert!(
        (gate["chance"].as_f64().unwrap() - 0.1).abs() < 0.05,
        "10 balanced classes: {gate}"
    );
    assert!(
        gate["value"].as_f64().unwrap() < gate["threshold"].as_f64().unwrap(),
        "{gate}"
    );
}

#[test]
fn retrieval_above_64_images_fails_on_an_untrained_model() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("captions");
    let mut csv = String::from("image,caption\n");
    let words = [
        "red", "green", "blue", "small", "large", "round", "square", "old", "new",
    ];
    for i in 0..100 {
        picture(i, &data.join(format!("images/{i}.png")));
        csv += &format!(
            "{i}.png,a {} {} thing number {i}\n",
            words[i % words.len()],
            words[(i / words.len()) % words.len()]
        );
    }
    std::fs::write(data.join("captions.csv"), csv).unwrap();
    let (code, log, r) = untrained(&data, &dir.path().join("run"));
    assert_eq!(code, Some(1), "{log}");
    assert!(log.contains("[FAIL] retrieval:") && log.contains("R@10"), "{log}");
    let gate = &r["metrics"]["gate"];
    assert_eq!(gate["name"], "retrieval", "{r}");
    assert!(
        gate["value"].as_f64().unwrap() < gate["threshold"].as_f64().unwrap(),
        "{gate}"
    );
}
