//! clip-predict with a pretrained CLIP (`--model`), untrained by clipmine: the answers are the
//! checkpoint's own. The checkpoints are the tiny ones made with transformers and open_clip
//! (clip-core's tests/fixtures/clip), whose Python embeddings of the two fixture images and of
//! the fixture captions are stored beside them: the cosines clip-predict prints must be Python's.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{Device, Tensor};

const REV: &str = "89abcdef0123456789abcdef0123456789abcdef";

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../clip-core/tests/fixtures/clip")
}

fn checkpoint(name: &str) -> PathBuf {
    fixtures().join(format!("hub/models--test--{name}/snapshots/{REV}"))
}

fn image(size: usize, i: usize) -> PathBuf {
    fixtures().join(format!("goldens/image{size}_{i}.png"))
}

fn predict(args: &[&str]) -> (Option<i32>, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_clip-predict"))
        .env("HF_HUB_OFFLINE", "1")
        // Repo ids (test/NAME) resolve in the fixtures' Hugging Face cache.
        .env("HF_HUB_CACHE", fixtures().join("hub"))
        .args(["--device", "cpu"])
        .args(args)
        .output()
        .unwrap();
    clipmine_tests::outcome(&o)
}

/// Python's cosine between fixture image `i` and caption case `j`.
fn python_cosines(name: &str) -> Vec<Vec<f32>> {
    let g: HashMap<String, Tensor> =
        candle_core::safetensors::load(fixtures().join(format!("goldens/{name}.safetensors")), &Device::Cpu).unwrap();
    let n = |t: &Tensor| {
        t.broadcast_div(&t.sqr().unwrap().sum_keepdim(1).unwrap().sqrt().unwrap())
            .unwrap()
    };
    n(&g["image"])
        .matmul(&n(&g["text"]).t().unwrap())
        .unwrap()
        .to_vec2::<f32>()
        .unwrap()
}

fn cases() -> Vec<String> {
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("goldens/tokens.json")).unwrap()).unwrap();
    j["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn image_to_text_gives_the_checkpoints_own_cosines() {
    // Hugging Face CLIPModel and Chinese-CLIP folders, an open_clip one (the built-in BPE), and
    // repo ids from the Hub cache.
    for (name, spec) in [
        ("hf-clip", checkpoint("hf-clip").display().to_string()),
        ("cn-clip", checkpoint("cn-clip").display().to_string()),
        ("oc-vit", checkpoint("oc-vit").display().to_string()),
        ("oc-rn", "test/oc-rn".to_string()),
        ("cn-clip", "test/cn-clip@main".to_string()),
    ] {
        let want = python_cosines(name);
        let texts = cases();
        let size = if name == "oc-rn" { 64 } else { 32 };
        let mut args = vec!["--json", "image-to-text", "--model", spec.as_str(), "--top", "20"];
        let imgs = [image(size, 0), image(size, 1)];
        args.extend(imgs.iter().map(|p| p.to_str().unwrap()));
        args.push("--texts");
        args.extend(texts.iter().map(String::as_str));
        let (code, out, err) = predict(&args);
        assert_eq!(code, Some(0), "{name}: {err}");
        let j: serde_json::Value = serde_json::from_str(&out).unwrap();
        let results = j["results"].as_array().unwrap();
        assert_eq!(results.len(), 2);
        for (i, r) in results.iter().enumerate() {
            let ranked = r["captions"].as_array().unwrap();
            assert_eq!(ranked.len(), texts.len());
            for c in ranked {
                let k = texts.iter().position(|t| t == c["caption"].as_str().unwrap()).unwrap();
                let got = c["score"].as_f64().unwrap() as f32;
                assert!(
                    (got - want[i][k]).abs() < 1e-4,
                    "{name}: image {i}, {:?}: {got} vs Python {}",
                    texts[k],
                    want[i][k]
                );
            }
        }
    }
}

#[test]
fn text_to_image_and_an_index_work_from_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let photos = dir.path().join("photos");
    std::fs::create_dir_all(&photos).unwrap();
    for i in 0..2 {
        std::fs::copy(image(32, i), photos.join(format!("p{i}.png"))).unwrap();
    }
    let model = checkpoint("hf-clip");
    let (m, p) = (model.to_str().unwrap(), photos.to_str().unwrap());
    // The caption's best image is the one Python scores higher.
    let want = python_cosines("hf-clip");
    let best = if want[0][0] >= want[1][0] { "p0.png" } else { "p1.png" };
    let caption = &cases()[0];
    let (code, out, err) = predict(&["--json", "text-to-image", "--model", m, caption, "--images", p]);
    assert_eq!(code, Some(0), "{err}");
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(j["results"][0]["image"].as_str().unwrap().ends_with(best), "{out}");
    // An index needs a folder of its own with --model.
    let (code, _, err) = predict(&["index", "--model", m, "--images", p]);
    assert_eq!(code, Some(2));
    assert!(err.contains("with --model, name the index folder"), "{err}");
    let index = dir.path().join("index");
    let (code, _, err) = predict(&["index", "--model", m, "--images", p, "--out", index.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}");
    let (code, out, err) = predict(&[
        "--json",
        "text-to-image",
        "--model",
        m,
        caption,
        "--index",
        index.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(0), "{err}");
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(j["results"][0]["image"].as_str().unwrap().ends_with(best), "{out}");
    // Another checkpoint may not search it.
    let other = checkpoint("cn-clip");
    let (code, _, err) = predict(&[
        "text-to-image",
        "--model",
        other.to_str().unwrap(),
        caption,
        "--index",
        index.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(2));
    assert!(err.contains("was made by another model"), "{err}");
    assert!(err.contains(&format!("--model {}", other.display())), "{err}");

    // The same weights whose processor now prepares images otherwise (shortest edge 40 before
    // the 32-pixel crop): the index holds embeddings of other pixels, so it is another model's.
    let copy = dir.path().join("hf-clip-40");
    clipmine_tests::copy_dir(&model, &copy);
    let pre = copy.join("preprocessor_config.json");
    let mut p: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&pre).unwrap()).unwrap();
    p["size"] = serde_json::json!({"shortest_edge": 40});
    std::fs::write(&pre, p.to_string()).unwrap();
    let (code, _, err) = predict(&[
        "text-to-image",
        "--model",
        copy.to_str().unwrap(),
        caption,
        "--index",
        index.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("was made by another model"), "{err}");
}

#[test]
fn zero_shot_eval_uses_a_prompt_ensemble_and_reports_each_class() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("herbs");
    for (label, i) in [("人蔘", 0), ("枸杞", 1)] {
        std::fs::create_dir_all(data.join(label)).unwrap();
        std::fs::copy(image(32, i), data.join(label).join("a.png")).unwrap();
    }
    let model = checkpoint("cn-clip");
    let (m, d) = (model.to_str().unwrap(), data.to_str().unwrap());
    let (code, out, err) = predict(&["--json", "eval", "--model", m, "--data", d]);
    assert_eq!(code, Some(0), "{err}");
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(j["kind"], "zero-shot");
    // Chinese labels: the Chinese ensemble.
    let templates: Vec<&str> = j["templates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(templates, clip_core::data::ENSEMBLE_ZH.to_vec());
    let per_class = j["per_class"].as_array().unwrap();
    assert_eq!(per_class.len(), 2);
    let correct: u64 = per_class.iter().map(|c| c["correct"].as_u64().unwrap()).sum();
    assert_eq!(correct as f64 / 2.0, j["accuracy"].as_f64().unwrap());
    // A templates file; a line without {label} is refused by file and line.
    let file = dir.path().join("templates.txt");
    std::fs::write(&file, "# herbs\n{label}的照片\n一张{label}\n").unwrap();
    let (code, out, err) = predict(&["eval", "--model", m, "--data", d, "--templates", file.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("(2 templates)"), "{out}");
    assert!(out.contains("class") && out.contains("人蔘"), "{out}");
    std::fs::write(&file, "{label}的照片\n照片\n").unwrap();
    let (code, _, err) = predict(&["eval", "--model", m, "--data", d, "--templates", file.to_str().unwrap()]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("templates.txt:2: template \"照片\" has no {label}"),
        "{err}"
    );
}

#[test]
fn a_model_that_is_not_a_pretrained_clip_is_named_as_such() {
    let img = image(32, 0);
    let img = img.to_str().unwrap();
    let (code, _, err) = predict(&["image-to-text", "--model", "clip-vit-b32", img, "--texts", "a", "b"]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains(
            "\"clip-vit-b32\" is not a pretrained-CLIP preset (clip-vit-b-32, clip-rn50, chinese-clip-vit-b-16)"
        ),
        "{err}"
    );
    let (code, _, err) = predict(&["image-to-text", "--model", "tiny", img, "--texts", "a", "b"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("preset tiny names no pretrained CLIP"), "{err}");
    let (code, _, err) = predict(&["image-to-text", "--model", "nobody/nothing", img, "--texts", "a", "b"]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("nobody/nothing@main is not a CLIP checkpoint clipmine knows"),
        "{err}"
    );
    // --run and --model are one choice.
    let (code, _, err) = predict(&["image-to-text", "--model", "x/y", "--run", "r", img, "--texts", "a"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("cannot be used with"), "{err}");
}

/// The scores `image-to-text` prints for the fixture images and captions, in caption order.
fn scores(model: &str, size: usize) -> Vec<Vec<f64>> {
    let texts = cases();
    let imgs = [image(size, 0), image(size, 1)];
    let mut args = vec!["--json", "image-to-text", "--model", model, "--top", "20"];
    args.extend(imgs.iter().map(|p| p.to_str().unwrap()));
    args.push("--texts");
    args.extend(texts.iter().map(String::as_str));
    let (code, out, err) = predict(&args);
    assert_eq!(code, Some(0), "{model}: {err}");
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    j["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let mut row = vec![0.0; texts.len()];
            for c in r["captions"].as_array().unwrap() {
                let k = texts.iter().position(|t| t == c["caption"].as_str().unwrap()).unwrap();
                row[k] = c["score"].as_f64().unwrap();
            }
            row
        })
        .collect()
}

#[test]
fn export_writes_folders_that_answer_as_the_model_does() {
    for (name, format, files) in [
        (
            "oc-vit",
            "open_clip",
            &["open_clip_config.json", "open_clip_model.safetensors"][..],
        ),
        (
            "oc-vit",
            "hf",
            &[
                "config.json",
                "model.safetensors",
                "tokenizer.json",
                "tokenizer_config.json",
                "preprocessor_config.json",
            ][..],
        ),
        (
            "oc-rn",
            "open_clip",
            &["open_clip_config.json", "open_clip_model.safetensors"][..],
        ),
        (
            "cn-clip",
            "hf",
            &[
                "config.json",
                "model.safetensors",
                "vocab.txt",
                "preprocessor_config.json",
            ][..],
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("export");
        let src = checkpoint(name).display().to_string();
        let (code, stdout, err) = predict(&["export", "--model", &src, "--format", format, out.to_str().unwrap()]);
        assert_eq!(code, Some(0), "{name} {format}: {err}");
        assert!(stdout.contains("load it in Python:"), "{stdout}");
        for f in files {
            assert!(out.join(f).is_file(), "{name} {format}: no {f}");
        }
        let size = if name == "oc-rn" { 64 } else { 32 };
        let (want, got) = (scores(&src, size), scores(out.to_str().unwrap(), size));
        let d = want
            .iter()
            .flatten()
            .zip(got.iter().flatten())
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(d <= 1e-6, "{name} {format}: max |Δ| {d}");
    }
    // What a format cannot carry is refused, naming the one that can.
    let dir = tempfile::tempdir().unwrap();
    let (code, _, err) = predict(&[
        "export",
        "--model",
        checkpoint("oc-rn").to_str().unwrap(),
        "--format",
        "hf",
        dir.path().join("x").to_str().unwrap(),
    ]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("no ResNet CLIP") && err.contains("--format open_clip"),
        "{err}"
    );
}
