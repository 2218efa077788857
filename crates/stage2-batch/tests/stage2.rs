//! Stage 2 end to end: it passes on the demo set and fails, naming the cause, on bad data.

use std::path::Path;
use std::process::{Command, Output};

use clip_core::data::{Dataset, TextTokenizer};

fn stage2(args: &[&str], json: &Path) -> (Output, String, serde_json::Value) {
    let out = Command::new(env!("CARGO_BIN_EXE_stage2-batch"))
        .args(args)
        .arg("--device")
        .arg("cpu")
        .arg("--json")
        .arg(json)
        .output()
        .unwrap();
    let text = clipmine_tests::log(&out);
    let report =
        serde_json::from_str(&std::fs::read_to_string(json).unwrap_or_else(|_| panic!("no report; output:\n{text}")))
            .unwrap();
    (out, text, report)
}

/// A copy of the demo set to spoil.
fn demo_copy() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let src = Dataset::demo_dir();
    std::fs::create_dir(dir.path().join("images")).unwrap();
    std::fs::copy(src.join("captions.csv"), dir.path().join("captions.csv")).unwrap();
    for e in std::fs::read_dir(src.join("images")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.path().join("images").join(e.file_name())).unwrap();
    }
    dir
}

fn failed_checks(report: &serde_json::Value) -> Vec<String> {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["passed"] == false)
        .map(|c| c["name"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn passes_on_the_demo_set() {
    let tmp = tempfile::tempdir().unwrap();
    let (out, text, report) = stage2(&[], &tmp.path().join("report.json"));
    assert!(out.status.success(), "{text}");
    assert_eq!(report["passed"], true, "{text}");
    assert_eq!(report["stage"], 2);
    let m = &report["metrics"];
    assert_eq!((m["pairs"].as_u64(), m["images"].as_u64()), (Some(30), Some(10)));
    // 10 images are too few to hold any out: the split says so and validates on the training pairs.
    assert_eq!(
        (m["split"]["train"].as_u64(), m["split"]["val"].as_u64()),
        (Some(30), Some(30))
    );
    assert!(m["split"]["note"].as_str().unwrap().contains("only 10 images"));
    assert_eq!(m["unknown_share"], 0.0);
    let sim = m["similarity"].as_array().unwrap();
    let b = clip_core::ClipConfig::tiny().train.batch_size;
    assert_eq!(sim.len(), b);
    assert!(sim.iter().all(|r| r.as_array().unwrap().len() == b));
    assert!(
        text.contains("穿橙色太空衣的…"),
        "captions label the similarity rows:\n{text}"
    );
    assert!(text.contains("PASSED"));
}

#[test]
fn a_corrupt_image_fails_naming_the_file_and_line() {
    let dir = demo_copy();
    std::fs::write(dir.path().join("images/rocket.jpg"), b"not a jpeg").unwrap();
    let data = dir.path().to_str().unwrap();
    let json = dir.path().join("report.json");
    let (out, text, report) = stage2(&["--data", data], &json);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert_eq!(report["passed"], false);
    assert_eq!(failed_checks(&report), ["images"]);
    assert!(
        text.contains("captions.csv:11: cannot decode image rocket.jpg"),
        "{text}"
    );

    // Leaving the image's captions out lets the rest through.
    let (out, text, report) = stage2(&["--data", data, "--skip-bad"], &json);
    assert!(out.status.success(), "{text}");
    assert_eq!(report["metrics"]["pairs"], 27);
    assert_eq!(report["metrics"]["bad_rows"].as_array().unwrap().len(), 1);
}

#[test]
fn a_bad_row_fails_unless_skipped() {
    let dir = demo_copy();
    let csv = dir.path().join("captions.csv");
    let mut text = std::fs::read_to_string(&csv).unwrap();
    text.push_str("missing.jpg,一張不見的照片\n");
    std::fs::write(&csv, text).unwrap();
    let data = dir.path().to_str().unwrap();
    let json = dir.path().join("report.json");
    let (out, text, report) = stage2(&["--data", data], &json);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert_eq!(failed_checks(&report), ["rows"]);
    assert!(text.contains("captions.csv:32: image not found: missing.jpg"), "{text}");
    let (out, text, _) = stage2(&["--data", data, "--skip-bad"], &json);
    assert!(out.status.success(), "{text}");
}

#[test]
fn a_tokenizer_that_cannot_read_the_captions_fails() {
    // An English-only tokenizer turns every Chinese character of the demo set into [UNK].
    let tmp = tempfile::tempdir().unwrap();
    let english: Vec<String> = Dataset::load(&Dataset::demo_dir(), &Default::default())
        .unwrap()
        .captions()
        .into_iter()
        .filter(|c| c.is_ascii())
        .collect();
    let tok_path = tmp.path().join("tokenizer.json");
    TextTokenizer::train(&english, 2048, 64)
        .unwrap()
        .save(&tok_path)
        .unwrap();
    let (out, text, report) = stage2(
        &["--tokenizer", tok_path.to_str().unwrap()],
        &tmp.path().join("report.json"),
    );
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert_eq!(failed_checks(&report), ["unknown tokens"]);
    assert!(
        text.contains("this tokenizer has no entry for 的, 空"),
        "the most frequent unknown characters come first:\n{text}"
    );
    assert!(text.contains("train one on your captions"), "{text}");
}

#[test]
fn a_missing_dataset_fails_with_a_message() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("no-such-data");
    let (out, text, report) = stage2(&["--data", missing.to_str().unwrap()], &tmp.path().join("report.json"));
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert_eq!(failed_checks(&report), ["rows"]);
    assert!(text.contains("no-such-data not found"), "{text}");
}

#[test]
fn passes_on_a_flickr8k_style_captions_txt() {
    // Kaggle's Flickr8k layout: captions.txt (5 captions per image, quoted commas) beside Images/.
    let dir = tempfile::tempdir().unwrap();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/data/flickr8k/captions.txt");
    std::fs::copy(&fixture, dir.path().join("captions.txt")).unwrap();
    std::fs::create_dir(dir.path().join("Images")).unwrap();
    for (i, name) in ["1000_aa.jpg", "1001_bb.jpg", "1002_cc.jpg"].iter().enumerate() {
        let img = image::RgbImage::from_fn(120, 90, |x, y| {
            image::Rgb([(x * 2) as u8, (y * 2 + i as u32 * 60) as u8, (i * 90) as u8])
        });
        img.save(dir.path().join("Images").join(name)).unwrap();
    }
    let json = dir.path().join("s2.json");
    let (out, text, report) = stage2(&["--data", dir.path().to_str().unwrap()], &json);
    assert!(out.status.success(), "{text}");
    assert_eq!(report["passed"], true);
    assert_eq!(
        (
            report["metrics"]["pairs"].as_u64(),
            report["metrics"]["images"].as_u64()
        ),
        (Some(15), Some(3))
    );
    assert!(text.contains("captions per image: min 5, mean 5.0, max 5"), "{text}");
}

#[test]
fn a_pretrained_english_tokenizer_fails_on_chinese_captions_and_suggests_a_model_that_reads_them() {
    // The tiny DistilBERT fixture, in a Hugging Face cache read offline: its vocabulary is a few
    // English words, as distilbert-base-uncased has no entry for most of the demo set's 人蔘 / 枸杞.
    let tmp = tempfile::tempdir().unwrap();
    let cache = Path::new(env!("CARGO_MANIFEST_DIR")).join("../clip-core/tests/fixtures/pretrained/hub");
    let config = tmp.path().join("clip.toml");
    std::fs::write(
        &config,
        "preset = \"tiny\"\n[text]\npretrained = \"clipmine-test/tiny-distilbert\"\n[data]\nmax_length = 40\n",
    )
    .unwrap();
    let json = tmp.path().join("report.json");
    let out = Command::new(env!("CARGO_BIN_EXE_stage2-batch"))
        .args(["--device", "cpu", "--config"])
        .arg(&config)
        .arg("--json")
        .arg(&json)
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HUB_CACHE", &cache)
        .output()
        .unwrap();
    let text = clipmine_tests::log(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(failed_checks(&report), ["unknown tokens"], "{text}");
    assert!(text.contains("clipmine-test/tiny-distilbert's own tokenizer"), "{text}");
    assert!(text.contains("distilbert/distilbert-base-multilingual-cased"), "{text}");
    assert!(text.contains("bert-base-chinese"), "{text}");
}
