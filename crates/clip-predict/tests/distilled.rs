//! A student distilled on images without captions, used through clip-predict: its captions are
//! answered by its teacher's text tower, its images in the teacher's space; a teacher that is
//! gone or has changed is refused by name, and so is exporting such a student.

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{Device, Tensor};
use clip_core::distill::{self, Teacher};
use clip_core::fit::Trainer;
use clip_core::prepare::{prepare, DataSource};
use clip_core::run_dir::RunDir;
use clip_core::ClipConfig;

fn predict(args: &[&str]) -> (Option<i32>, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_clip-predict"))
        .args(["--device", "cpu"])
        .args(args)
        .output()
        .unwrap();
    clipmine_tests::outcome(&o)
}

fn hub(name: &str) -> PathBuf {
    let snaps = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../clip-core/tests/fixtures/clip/hub")
        .join(format!("models--test--{name}/snapshots"));
    std::fs::read_dir(&snaps).unwrap().next().unwrap().unwrap().path()
}

fn p(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The demo photos alone, with no captions.
fn photos(dir: &Path) -> PathBuf {
    let photos = dir.join("photos");
    std::fs::create_dir(&photos).unwrap();
    for e in std::fs::read_dir(clip_core::data::Dataset::demo_dir().join("images")).unwrap() {
        let f = e.unwrap().path();
        std::fs::copy(&f, photos.join(f.file_name().unwrap())).unwrap();
    }
    photos
}

/// A `tiny` student distilled for a few epochs on `photos` from the teacher folder `teacher`,
/// with the feature term alone (what images without captions allow).
fn distil(teacher_dir: &Path, photos: &Path, out: &Path) {
    let teacher = Teacher::open(p(teacher_dir), &Device::Cpu).unwrap();
    let mut cfg = ClipConfig::tiny();
    cfg.distill.teacher = Some(p(teacher_dir).to_string());
    cfg.distill.teacher_dim = Some(teacher.model.embed_dim());
    cfg.distill.teacher_fingerprint = Some(teacher.fingerprint().unwrap());
    cfg.distill.contrastive = 0.0;
    let source = DataSource {
        path: Some(photos.to_path_buf()),
        ..DataSource::default()
    };
    let data = prepare(&cfg, &source, &Device::Cpu, &clip_core::progress::Silent).unwrap();
    let targets = distill::targets(&teacher, &source, &data.dataset, &out.join("cache"), 0).unwrap();
    let mut t = Trainer::new(&cfg, data, out).unwrap();
    t.set_teacher(targets).unwrap();
    while t.state().epoch < 3 {
        let (loss, pps) = t.train_epoch(|_, _, _| {}).unwrap();
        let v = t.validate().unwrap();
        t.end_epoch(loss, &v, 0.0, pps).unwrap();
    }
}

fn cosines(img: &Tensor, txt: &Tensor) -> Vec<Vec<f32>> {
    let n = |t: &Tensor| clip_core::embed::l2_normalize(t).unwrap();
    n(img).matmul(&n(txt).t().unwrap()).unwrap().to_vec2::<f32>().unwrap()
}

#[test]
fn a_student_distilled_on_images_alone_answers_captions_with_its_teachers_text_tower() {
    let dir = tempfile::tempdir().unwrap();
    let photos = photos(dir.path());
    // The teacher in a folder of its own, so that it can be moved away later.
    let teacher_dir = dir.path().join("teacher");
    clipmine_tests::copy_dir(&hub("oc-vit"), &teacher_dir);
    let student = dir.path().join("student");
    distil(&teacher_dir, &photos, &student);
    let cfg = RunDir::open(&student).unwrap().config().unwrap();
    assert!(
        cfg.distill.images_only,
        "the run does not record that it saw images alone"
    );

    // What the answer should be: the student's images, in the teacher's space, against the
    // teacher's own caption embeddings.
    let texts = ["a photo of a cat", "人蔘", "a red bicycle"];
    let image = photos.join("astronaut.jpg");
    let (model, own_tok) = RunDir::open(&student).unwrap().load(&Device::Cpu).unwrap();
    let teacher = Teacher::open(p(&teacher_dir), &Device::Cpu).unwrap();
    let x = clip_core::data::ImageStore::load_one(&image, &model.config).unwrap();
    let img = model.embed_images(&x.unsqueeze(0).unwrap()).unwrap();
    assert_eq!(img.dim(1).unwrap(), teacher.model.embed_dim());
    let teacher_txt =
        clip_core::embed::embed_texts(&teacher.model, &teacher.tokenizer, &texts, 8, &Device::Cpu).unwrap();
    let want = cosines(&img, &teacher_txt)[0].clone();

    let mut args = vec!["--json", "image-to-text", "--run", p(&student), p(&image), "--texts"];
    args.extend(texts);
    let (code, out, err) = predict(&args);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        err.contains("captions are answered by the teacher's text tower"),
        "{err}"
    );
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    let got: Vec<(String, f32)> = r["results"][0]["captions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["caption"].as_str().unwrap().to_string(),
                c["score"].as_f64().unwrap() as f32,
            )
        })
        .collect();
    assert_eq!(got.len(), texts.len(), "{out}");
    for (caption, score) in &got {
        let k = texts.iter().position(|t| t == caption).unwrap();
        assert!((score - want[k]).abs() < 1e-4, "{caption}: {score} against {}", want[k]);
    }
    // The student's own (untrained) text tower would have answered otherwise.
    if model.embed_dim() == model.config.projection_dim {
        let own = clip_core::embed::embed_texts(&model, &own_tok, &texts, 8, &Device::Cpu).unwrap();
        let own = cosines(&img, &own)[0].clone();
        assert!(
            own.iter().zip(&want).any(|(a, b)| (a - b).abs() > 1e-3),
            "{own:?} {want:?}"
        );
    }

    // Text → image search through an index of the student's image embeddings.
    let index = dir.path().join("index");
    let (code, out, err) = predict(&[
        "index",
        "--run",
        p(&student),
        "--images",
        p(&photos),
        "--out",
        p(&index),
    ]);
    assert_eq!(code, Some(0), "{out}{err}");
    let (code, out, err) = predict(&[
        "--json",
        "text-to-image",
        "--run",
        p(&student),
        "人蔘",
        "--index",
        p(&index),
    ]);
    assert_eq!(code, Some(0), "{out}{err}");
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(!r["results"].as_array().unwrap().is_empty(), "{out}");

    // Export would carry the untrained text tower: refused, saying why.
    let (code, out, err) = predict(&[
        "export",
        "--run",
        p(&student),
        "--format",
        "open_clip",
        p(&dir.path().join("x")),
    ]);
    assert_ne!(code, Some(0), "{out}{err}");
    assert!(err.contains("an exported model would carry the untrained one"), "{err}");
    // ONNX graphs carry the teacher's text encoder and tokenizer instead.
    let onnx = dir.path().join("onnx");
    let (code, out, err) = predict(&["export", "--run", p(&student), "--format", "onnx", p(&onnx)]);
    assert_eq!(code, Some(0), "{out}{err}");
    let meta: serde_json::Value = serde_json::from_slice(&std::fs::read(onnx.join("clip.json")).unwrap()).unwrap();
    assert_eq!(meta["text"]["tower"], "the teacher's", "{meta}");

    // Another checkpoint where the teacher was: refused as changed.
    let moved = dir.path().join("teacher-moved");
    std::fs::rename(&teacher_dir, &moved).unwrap();
    clipmine_tests::copy_dir(&hub("oc-vit-avg"), &teacher_dir);
    let (code, out, err) = predict(&["image-to-text", "--run", p(&student), p(&image), "--texts", "a cat"]);
    assert_ne!(code, Some(0), "{out}{err}");
    assert!(err.contains("has changed since the student learned from it"), "{err}");
    // No teacher there at all: refused, naming it.
    std::fs::remove_dir_all(&teacher_dir).unwrap();
    // Export says why it cannot be, with or without the teacher there.
    let (code, out, err) = predict(&[
        "export",
        "--run",
        p(&student),
        "--format",
        "hf",
        p(&dir.path().join("y")),
    ]);
    assert_ne!(code, Some(0), "{out}{err}");
    assert!(err.contains("an exported model would carry the untrained one"), "{err}");
    let (code, out, err) = predict(&["image-to-text", "--run", p(&student), p(&image), "--texts", "a cat"]);
    assert_ne!(code, Some(0), "{out}{err}");
    assert!(
        err.contains("its captions are answered by its teacher's text tower") && err.contains(p(&teacher_dir)),
        "{err}"
    );

    // An untrusted run folder naming a Hub repo (or a relative path) as its teacher: nothing is
    // downloaded because a run says so. (Its manifest is rewritten too, as anyone could.)
    let config = std::fs::read_to_string(student.join("config.toml")).unwrap();
    let recorded = toml_string(p(&teacher_dir));
    assert!(config.contains(&recorded), "{config}");
    for named in ["attacker-org/some-huge-model", "teacher", "clip-vit-b-32"] {
        let forged = config.replace(&recorded, &toml_string(named));
        clip_core::files::write_checked(&student, &[("config.toml".into(), forged.into_bytes())]).unwrap();
        let o = Command::new(env!("CARGO_BIN_EXE_clip-predict"))
            .current_dir(dir.path())
            // Were anything fetched, it would be from here (nothing listens), not from the Hub.
            .env("HF_ENDPOINT", "http://127.0.0.1:9")
            .env("HF_HOME", dir.path().join("hf-home"))
            .args([
                "--device",
                "cpu",
                "image-to-text",
                "--run",
                p(&student),
                p(&image),
                "--texts",
                "a cat",
            ])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_ne!(o.status.code(), Some(0), "{err}");
        assert!(
            err.contains("is not a local folder")
                && err.contains("never downloads a model because a run folder says so"),
            "{named}: {err}"
        );
        assert!(
            !dir.path().join("hf-home").exists(),
            "{named}: the Hub cache was touched"
        );
    }
}

/// `s` as a TOML basic string, as `config.toml` writes it (these paths need no escapes).
fn toml_string(s: &str) -> String {
    assert!(!s.contains(['"', '\\']), "{s}");
    format!("\"{s}\"")
}
