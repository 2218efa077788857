//! `clip-predict export`'s folder: never the model's own folder, replaced whole (an earlier export
//! of the other format leaves nothing behind), never a folder of other files, nothing left by a
//! failed export, and a Python snippet that names the folder as a string literal.

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::Device;
use clip_core::fit::Trainer;
use clip_core::hub::Hub;
use clip_core::prepare::{prepare, DataSource};
use clip_core::ClipConfig;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../clip-core/tests/fixtures/clip/hub")
}

/// The tiny open_clip ViT (or another fixture checkpoint) folder.
fn checkpoint(name: &str) -> PathBuf {
    let snaps = fixtures().join(format!("models--test--{name}/snapshots"));
    std::fs::read_dir(&snaps).unwrap().next().unwrap().unwrap().path()
}

fn predict(args: &[&str]) -> (Option<i32>, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_clip-predict"))
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HUB_CACHE", fixtures())
        .args(["--device", "cpu"])
        .args(args)
        .output()
        .unwrap();
    clipmine_tests::outcome(&o)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Sorted names in `dir`.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// A run folder: one epoch of fine-tuning the tiny open_clip ViT on the demo set (a model every
/// format exports). With CLIPMINE_KEEP_RUNS=DIR it is made in DIR and kept.
fn run_folder(dir: &Path) -> PathBuf {
    let toml = format!(
        "pretrained = {:?}\n[train]\nepochs = 1\nbatch_size = 16\n",
        s(&checkpoint("oc-vit"))
    );
    let mut cfg = ClipConfig::from_toml_str(&toml).unwrap();
    clip_core::pretrained::apply_configs(&mut cfg, &Hub::from_env()).unwrap();
    let data = prepare(&cfg, &DataSource::default(), &Device::Cpu, &clip_core::progress::Silent).unwrap();
    let root = std::env::var_os("CLIPMINE_KEEP_RUNS").map_or(dir.to_path_buf(), PathBuf::from);
    let out = root.join("fine-tune-oc-vit");
    let _ = std::fs::remove_dir_all(&out);
    let mut t = Trainer::new(&cfg, data, &out).unwrap();
    let (loss, pps) = t.train_epoch(|_, _, _| {}).unwrap();
    let v = t.validate().unwrap();
    t.end_epoch(loss, &v, 0.0, pps).unwrap();
    out
}

/// A copy of the fixture checkpoint `name` in `dir` (a model folder of the user's).
fn copied(name: &str, dir: &Path) -> PathBuf {
    let to = dir.join(name);
    std::fs::create_dir(&to).unwrap();
    for f in std::fs::read_dir(checkpoint(name)).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, to.join(f.file_name().unwrap())).unwrap();
    }
    to
}

fn answers(flag: &str, model: &Path) -> (Option<i32>, String) {
    let img = fixtures().join("../goldens/image32_0.png");
    let (code, out, err) = predict(&[
        "image-to-text",
        flag,
        s(model),
        s(&img),
        "--texts",
        "a cat",
        "a dog",
        "--json",
    ]);
    (code, if code == Some(0) { out } else { err })
}

#[test]
fn export_refuses_the_models_own_folder_and_folders_inside_it() {
    let dir = tempfile::tempdir().unwrap();
    let run = run_folder(dir.path());
    let before = answers("--run", &run);
    assert_eq!(before.0, Some(0), "{}", before.1);
    for (out, how) in [
        (run.clone(), "is the run folder"),
        (run.join("exported"), "lies inside the run folder"),
    ] {
        for format in ["hf", "open_clip"] {
            let (code, _, err) = predict(&["export", "--run", s(&run), "--format", format, s(&out), "--overwrite"]);
            assert_eq!(code, Some(2), "{format} into {}: {err}", out.display());
            assert!(err.contains(how) && err.contains("choose a folder outside it"), "{err}");
        }
    }
    // The same folder reached through `..`.
    let (code, _, err) = predict(&[
        "export",
        "--run",
        s(&run),
        "--format",
        "hf",
        s(&run.join("nothing/..")),
        "--overwrite",
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("the run folder"), "{err}");
    assert!(!run.join("exported").exists() && !run.join("config.json").exists());
    // The run answers as before.
    assert_eq!(answers("--run", &run), before);

    // A checkpoint folder given to --model, and one inside it.
    let model = copied("oc-vit", dir.path());
    let before = answers("--model", &model);
    assert_eq!(before.0, Some(0), "{}", before.1);
    for out in [model.clone(), model.join("hf")] {
        let (code, _, err) = predict(&["export", "--model", s(&model), "--format", "hf", s(&out), "--overwrite"]);
        assert_eq!(code, Some(2), "{err}");
        assert!(err.contains("the folder the model is read from"), "{err}");
    }
    assert_eq!(names(&model), ["open_clip_config.json", "open_clip_model.safetensors"]);
    assert_eq!(answers("--model", &model), before);
}

#[test]
fn overwrite_replaces_an_export_of_the_other_format_whole() {
    let dir = tempfile::tempdir().unwrap();
    let src = checkpoint("oc-vit");
    let out = dir.path().join("exp");
    let (code, _, err) = predict(&["export", "--model", s(&src), "--format", "open_clip", s(&out)]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(
        names(&out),
        ["open_clip_config.json", "open_clip_model.safetensors", "tokenizer.json"]
    );
    // Without --overwrite the export stays as it is.
    let (code, _, err) = predict(&["export", "--model", s(&src), "--format", "hf", s(&out)]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("already holds") && err.contains("--overwrite"), "{err}");
    let (code, _, err) = predict(&["export", "--model", s(&src), "--format", "hf", s(&out), "--overwrite"]);
    assert_eq!(code, Some(0), "{err}");
    // Only the new export's files: nothing of open_clip's is left for a loader to prefer.
    assert_eq!(
        names(&out),
        [
            "config.json",
            "model.safetensors",
            "preprocessor_config.json",
            "tokenizer.json",
            "tokenizer_config.json"
        ]
    );
    // And nothing beside it: no temporary or replaced folder.
    assert_eq!(names(dir.path()), ["exp"]);
    let (code, text) = answers("--model", &out);
    assert_eq!(code, Some(0), "{text}");
    // An empty folder is written into without --overwrite.
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let (code, _, err) = predict(&["export", "--model", s(&src), "--format", "open_clip", s(&empty)]);
    assert_eq!(code, Some(0), "{err}");
    assert!(empty.join("open_clip_model.safetensors").is_file());
}

#[test]
fn overwrite_refuses_a_folder_holding_other_files_and_leaves_them() {
    let dir = tempfile::tempdir().unwrap();
    let src = checkpoint("oc-vit");
    let out = dir.path().join("mine");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("notes.txt"), "mine").unwrap();
    std::fs::write(out.join("config.json"), "{\"mine\": true}").unwrap();
    for overwrite in [false, true] {
        let mut args = vec!["export", "--model", s(&src), "--format", "hf", s(&out)];
        if overwrite {
            args.push("--overwrite");
        }
        let (code, _, err) = predict(&args);
        assert_eq!(code, Some(2), "{err}");
        assert!(
            err.contains("holds files an export does not write (notes.txt)"),
            "{err}"
        );
        assert_eq!(names(&out), ["config.json", "notes.txt"]);
        assert_eq!(std::fs::read_to_string(out.join("notes.txt")).unwrap(), "mine");
        assert_eq!(
            std::fs::read_to_string(out.join("config.json")).unwrap(),
            "{\"mine\": true}"
        );
        assert_eq!(names(dir.path()), ["mine"]);
    }
}

#[test]
fn a_failed_export_leaves_no_partial_folder_and_no_temporary_one() {
    let dir = tempfile::tempdir().unwrap();
    // A folder in the way of the weights file: the old export wrote the config and tokenizer
    // files, then failed on the weights, leaving an export that looked almost whole.
    let out = dir.path().join("exp");
    std::fs::create_dir_all(out.join("model.safetensors")).unwrap();
    let (code, _, err) = predict(&[
        "export",
        "--model",
        s(&checkpoint("oc-vit")),
        "--format",
        "hf",
        s(&out),
        "--overwrite",
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert_eq!(names(&out), ["model.safetensors"]);
    assert_eq!(names(dir.path()), ["exp"]);
    // A model the format cannot carry: no folder at all.
    let out = dir.path().join("rn");
    let (code, _, err) = predict(&["export", "--model", s(&checkpoint("oc-rn")), "--format", "hf", s(&out)]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("no ResNet CLIP"), "{err}");
    assert_eq!(names(dir.path()), ["exp"]);
}

#[test]
fn the_python_snippet_quotes_the_export_folder() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("my \"best\" model's export\\1");
    for (format, call) in [
        ("hf", "from_pretrained("),
        ("open_clip", "create_model_and_transforms("),
    ] {
        let (code, stdout, err) = predict(&[
            "export",
            "--model",
            s(&checkpoint("oc-vit")),
            "--format",
            format,
            s(&out),
            "--overwrite",
        ]);
        assert_eq!(code, Some(0), "{err}");
        let line = stdout.lines().find(|l| l.contains(call)).unwrap();
        let arg = &line[line.find(call).unwrap() + call.len()..line.rfind(')').unwrap()];
        // A JSON string is a Python string literal with the same escapes.
        let lit: String = serde_json::from_str(arg).unwrap_or_else(|e| panic!("{arg}: {e}"));
        let want = if format == "hf" {
            s(&out).to_string()
        } else {
            format!("local-dir:{}", s(&out))
        };
        assert_eq!(lit, want);
    }
}

/// A student trained from scratch: a small ViT at 32 px and a text tower of `kind` (`clip`, or
/// `bert` read at `pooling`), both with the activation `act`, over a WordPiece tokenizer trained on the demo captions; one epoch.
/// With CLIPMINE_KEEP_RUNS=DIR the run is made in DIR and kept, for
/// `xtask/reference/check_export.py DIR/*`.
fn scratch_run(dir: &Path, kind: &str, pooling: &str, act: &str) -> PathBuf {
    let name = format!("scratch-{kind}-{pooling}-{act}");
    let toml = format!(
        r#"name = "{name}"
projection_dim = 32
head = "linear"
loss = "clip"
[image]
arch = "vit"
image_size = 32
patch_size = 8
width = 32
layers = 2
heads = 2
mlp_dim = 64
pool = "tok"
activation = "{act}"
[text]
kind = "{kind}"
pooling = "{pooling}"
vocab_size = 2048
dim = 32
n_layers = 2
n_heads = 2
hidden_dim = 64
max_position_embeddings = 64
dropout = 0.0
attention_dropout = 0.0
activation = "{act}"
[train]
epochs = 1
batch_size = 16
"#
    );
    let cfg = ClipConfig::from_toml_str(&toml).unwrap();
    let data = prepare(&cfg, &DataSource::default(), &Device::Cpu, &clip_core::progress::Silent).unwrap();
    let root = std::env::var_os("CLIPMINE_KEEP_RUNS").map_or(dir.to_path_buf(), PathBuf::from);
    let out = root.join(name);
    let _ = std::fs::remove_dir_all(&out);
    let mut t = Trainer::new(&cfg, data, &out).unwrap();
    let (loss, pps) = t.train_epoch(|_, _, _| {}).unwrap();
    let v = t.validate().unwrap();
    t.end_epoch(loss, &v, 0.0, pps).unwrap();
    out
}

fn json_file(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn from_scratch_students_export_with_their_own_tokenizer_and_pooling_or_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    // A CLIP text transformer over its own WordPiece: read at [SEP], not at the largest id.
    let run = scratch_run(dir.path(), "clip", "eot", "gelu");
    let (code, want) = answers("--run", &run);
    assert_eq!(code, Some(0), "{want}");
    let score = |json: &str| -> Vec<f64> {
        let j: serde_json::Value = serde_json::from_str(json).unwrap();
        j["results"][0]["captions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["score"].as_f64().unwrap())
            .collect()
    };
    // The largest difference between two answers' caption scores.
    let max_diff = |a: &str, b: &str| -> f64 {
        score(a)
            .iter()
            .zip(score(b))
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max)
    };
    for format in ["open_clip", "hf"] {
        let out = dir.path().join(format);
        let (code, _, err) = predict(&["export", "--run", s(&run), "--format", format, s(&out)]);
        assert_eq!(code, Some(0), "{format}: {err}");
        // Its own tokenizer, with its own special tokens, for transformers' AutoTokenizer
        // (open_clip's HFTokenizer, CLIPProcessor).
        let tc = json_file(&out.join("tokenizer_config.json"));
        assert_eq!(tc["tokenizer_class"], "PreTrainedTokenizerFast", "{format}");
        assert_eq!(tc["eos_token"], "[SEP]", "{format}");
        assert_eq!(tc["pad_token"], "[PAD]", "{format}");
        if format == "open_clip" {
            let t = &json_file(&out.join("open_clip_config.json"))["model_cfg"]["text_cfg"];
            assert_eq!(t["pool_type"], "eos");
            assert_eq!(t["eos_id"], 3);
            assert_eq!(t["pad_id"], 0);
            assert!(t["hf_tokenizer_name"].is_string(), "{t}");
            // BERT's LayerNorm epsilon, which a from-scratch tower keeps (open_clip's is 1e-5).
            assert_eq!(t["norm_kwargs"]["eps"], 1e-12);
        } else {
            assert_eq!(json_file(&out.join("config.json"))["text_config"]["eos_token_id"], 3);
        }
        // clipmine reads its export back as it was (the open_clip reader takes `norm_kwargs`).
        let (code, got) = answers("--model", &out);
        assert_eq!(code, Some(0), "{got}");
        let d = max_diff(&want, &got);
        assert!(d <= 1e-6, "{format}: max |Δ| {d}");
    }
    // A BERT read at [CLS]: ChineseCLIPModel; open_clip has no BERT text tower.
    let run = scratch_run(dir.path(), "bert", "cls", "gelu");
    let (code, _, err) = predict(&[
        "export",
        "--run",
        s(&run),
        "--format",
        "hf",
        s(&dir.path().join("bert-hf")),
    ]);
    assert_eq!(code, Some(0), "{err}");
    let out = dir.path().join("bert-oc");
    let (code, _, err) = predict(&["export", "--run", s(&run), "--format", "open_clip", s(&out)]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("open_clip has no Chinese-CLIP text tower"), "{err}");
    assert!(!out.exists());
    // A BERT read at the mean of its tokens: neither library pools so.
    let run = scratch_run(dir.path(), "bert", "mean", "gelu");
    for format in ["hf", "open_clip"] {
        let out = dir.path().join(format!("mean-{format}"));
        let (code, _, err) = predict(&["export", "--run", s(&run), "--format", format, s(&out)]);
        assert_eq!(code, Some(2), "{err}");
        assert!(
            err.contains("averages its tokens") && err.contains("ChineseCLIPModel reads the [CLS] token only"),
            "{err}"
        );
        assert!(!out.exists());
    }
    // GELU's tanh form: open_clip's act_kwargs. ReLU: no open_clip transformer has it.
    let run = scratch_run(dir.path(), "clip", "eot", "gelu_new");
    let out = dir.path().join("tanh");
    let (code, _, err) = predict(&["export", "--run", s(&run), "--format", "open_clip", s(&out)]);
    assert_eq!(code, Some(0), "{err}");
    let m = &json_file(&out.join("open_clip_config.json"))["model_cfg"];
    for tower in ["vision_cfg", "text_cfg"] {
        assert_eq!(m[tower]["act_kwargs"]["approximate"], "tanh", "{m}");
    }
    let want = answers("--run", &run).1;
    let (code, got) = answers("--model", &out);
    assert_eq!(code, Some(0), "{got}");
    let d = max_diff(&want, &got);
    assert!(d <= 1e-6, "tanh GELU read back from open_clip: max |Δ| {d}");
    let run = scratch_run(dir.path(), "clip", "eot", "relu");
    let out = dir.path().join("relu");
    let (code, _, err) = predict(&["export", "--run", s(&run), "--format", "open_clip", s(&out)]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("open_clip's transformers have no ReLU") && err.contains("--format hf"),
        "{err}"
    );
    assert!(!out.exists());
    let (code, _, err) = predict(&["export", "--run", s(&run), "--format", "hf", s(&out)]);
    assert_eq!(code, Some(0), "{err}");
}

#[test]
fn an_export_keeps_the_processors_shortest_edge_and_resample_filter() {
    // A Hugging Face CLIP whose processor resizes the shorter side to 40 (bilinear) before the
    // 32-pixel crop: its export must prepare images the same way (it wrote 32 and bicubic).
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    clipmine_tests::copy_dir(&checkpoint("hf-clip"), &model);
    let pre = model.join("preprocessor_config.json");
    let mut p = json_file(&pre);
    p["size"] = serde_json::json!({"shortest_edge": 40});
    p["resample"] = serde_json::json!(2);
    std::fs::write(&pre, p.to_string()).unwrap();
    let out = dir.path().join("out");
    let (code, _, err) = predict(&["export", "--model", s(&model), "--format", "hf", s(&out)]);
    assert_eq!(code, Some(0), "{err}");
    let e = json_file(&out.join("preprocessor_config.json"));
    assert_eq!(e["size"]["shortest_edge"], 40, "{e}");
    assert_eq!(e["crop_size"]["height"], 32, "{e}");
    assert_eq!(e["resample"], 2, "{e}");
}
