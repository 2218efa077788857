//! Whole pretrained CLIPs against the libraries that made them: tiny random checkpoints built by
//! `xtask/reference/make_clip_fixtures.py` with open_clip (ViT QuickGELU `tok`, ViT GELU `avg`,
//! ModifiedResNet) and transformers (`CLIPModel`, `ChineseCLIPModel`), stored in
//! tests/fixtures/clip/hub as the Hugging Face cache. Each loads through the real code path
//! (config → architecture, weights → every model tensor, tokenizer) from the cache with the
//! network off, and from a plain folder, and its embeddings must match Python's to 1e-5.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use clip_core::config::{ImageArch, ImagePool, TextKind};
use clip_core::data::TextTokenizer;
use clip_core::hub::Hub;
use clip_core::pretrained_clip::{self, Format};
use clip_core::{pretrained, ClipConfig, ClipModel};

const REV: &str = "89abcdef0123456789abcdef0123456789abcdef";
const TOLERANCE: f32 = 1e-5;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/clip")
}

fn hub() -> Hub {
    Hub::new(fixtures().join("hub"), true)
}

fn snapshot(name: &str) -> PathBuf {
    fixtures().join(format!("hub/models--test--{name}/snapshots/{REV}"))
}

fn goldens(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join(format!("goldens/{name}.safetensors")), &Device::Cpu).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// A config naming the checkpoint `spec`, set from its files.
fn config(spec: &str) -> ClipConfig {
    let mut cfg = ClipConfig::tiny();
    cfg.pretrained = Some(spec.to_string());
    pretrained::apply_configs(&mut cfg, &hub()).unwrap();
    cfg
}

fn load(spec: &str) -> (ClipModel, pretrained::LoadReport) {
    let cfg = config(spec);
    let model = ClipModel::new(&cfg, &Device::Cpu).unwrap();
    let report = pretrained::load_pretrained(&model, &hub()).unwrap();
    (model, report)
}

/// The golden ids, and a mask of 1 up to each row's last non-pad token.
fn ids_and_mask(g: &HashMap<String, Tensor>) -> (Tensor, Tensor) {
    let ids = g["ids"].to_dtype(DType::U32).unwrap();
    let mask = match g.get("mask") {
        Some(m) => m.to_dtype(DType::U32).unwrap(),
        // open_clip pads with 0 after the end-of-text token.
        None => ids.ne(0u32).unwrap().to_dtype(DType::U32).unwrap(),
    };
    (ids, mask)
}

/// Image and text embeddings and logit scale equal Python's.
fn assert_parity(name: &str, model: &ClipModel) -> (f32, f32) {
    let g = goldens(name);
    let img = model.embed_images(&g["pixels"]).unwrap();
    let d_img = max_abs_diff(&img, &g["image"]);
    let (ids, mask) = ids_and_mask(&g);
    let txt = model.embed_texts(&ids, &mask).unwrap();
    let d_txt = max_abs_diff(&txt, &g["text"]);
    assert!(d_img <= TOLERANCE, "{name}: image embeddings differ by {d_img}");
    assert!(d_txt <= TOLERANCE, "{name}: text embeddings differ by {d_txt}");
    let scale = model.logit_scale().unwrap().unwrap();
    let want = g["logit_scale"].to_vec1::<f32>().unwrap()[0].exp();
    assert!((scale - want).abs() < 1e-4, "{name}: logit scale {scale} vs {want}");
    println!("{name}: max |Δ| image {d_img:.2e}, text {d_txt:.2e}");
    (d_img, d_txt)
}

#[test]
fn open_clip_vit_quickgelu_matches_open_clip() {
    let (model, report) = load("test/oc-vit");
    let c = &model.config;
    assert_eq!(
        (c.image.arch, c.image.pool, c.text.kind),
        (ImageArch::Vit, ImagePool::Tok, TextKind::Clip)
    );
    assert_eq!(c.image.activation, clip_core::config::Activation::QuickGelu);
    let clip = report.clip.unwrap();
    assert_eq!(clip.format, Format::OpenClip);
    assert_eq!(clip.commit.as_deref(), Some(REV));
    assert!(clip.weights_file.ends_with("open_clip_model.safetensors"));
    assert_parity("oc-vit", &model);
}

#[test]
fn open_clip_vit_gelu_avg_pool_from_a_pytorch_bin_matches_open_clip() {
    let (model, report) = load("test/oc-vit-avg");
    assert_eq!(model.config.image.pool, ImagePool::Avg);
    assert_eq!(model.config.text.activation, clip_core::config::Activation::Gelu);
    assert!(report
        .clip
        .unwrap()
        .weights_file
        .ends_with("open_clip_pytorch_model.bin"));
    assert_parity("oc-vit-avg", &model);
}

#[test]
fn open_clip_modified_resnet_matches_open_clip() {
    let (model, report) = load("test/oc-rn");
    assert_eq!(model.config.image.arch, ImageArch::ClipResnet);
    // Every model tensor came from the file; BatchNorm's counters were the only leftovers.
    let clip = report.clip.unwrap();
    assert_eq!(clip.loaded, model.params.entries().len());
    assert!(clip.ignored > 0);
    assert_parity("oc-rn", &model);
}

#[test]
fn hugging_face_clip_model_matches_transformers() {
    let (model, report) = load("test/hf-clip");
    assert_eq!(report.clip.unwrap().format, Format::HfClip);
    assert_eq!(model.config.text.eos_token_id, Some(913));
    assert_parity("hf-clip", &model);
}

#[test]
fn hugging_face_chinese_clip_matches_transformers() {
    let (model, report) = load("test/cn-clip");
    assert_eq!(report.clip.unwrap().format, Format::HfChineseClip);
    assert_eq!(model.config.text.kind, TextKind::Bert);
    assert_eq!(model.config.data.max_length, 52);
    // Its processor resizes to the square (size {height, width}); CLIP's crops the centre.
    assert!(!model.config.data.center_crop);
    assert!(config("test/hf-clip").data.center_crop);
    assert_parity("cn-clip", &model);
}

#[test]
fn plain_folders_load_like_the_hub_cache() {
    for name in ["oc-vit", "oc-rn", "hf-clip", "cn-clip"] {
        let dir = tempfile::tempdir().unwrap();
        for f in std::fs::read_dir(snapshot(name)).unwrap() {
            let f = f.unwrap().path();
            std::fs::copy(&f, dir.path().join(f.file_name().unwrap())).unwrap();
        }
        let (model, report) = load(dir.path().to_str().unwrap());
        assert_eq!(report.clip.unwrap().commit, None);
        assert_parity(name, &model);
    }
}

#[derive(serde::Deserialize)]
struct TokenGoldens {
    cases: Vec<String>,
    open_clip: Vec<Vec<u32>>,
    #[serde(rename = "hf-clip")]
    hf_clip: Vec<Vec<u32>>,
    #[serde(rename = "cn-clip")]
    cn_clip: Vec<Vec<u32>>,
}

fn token_goldens() -> TokenGoldens {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("goldens/tokens.json")).unwrap()).unwrap()
}

fn assert_ids(tok: &TextTokenizer, cases: &[String], want: &[Vec<u32>], what: &str) {
    for (case, want) in cases.iter().zip(want) {
        assert_eq!(&tok.encode(case).unwrap(), want, "{what}: {case:?}");
    }
}

#[test]
fn built_in_openai_bpe_gives_open_clips_ids() {
    let g = token_goldens();
    assert_ids(
        &TextTokenizer::openai_bpe(77).unwrap(),
        &g.cases,
        &g.open_clip,
        "OpenAI BPE",
    );
    // The open_clip checkpoint without tokenizer files gets it.
    let (tok, origin) = pretrained_clip::tokenizer(&config("test/oc-vit"), &hub())
        .unwrap()
        .unwrap();
    assert!(matches!(origin, pretrained_clip::TokenizerFile::OpenAiBpe));
    assert_ids(&tok, &g.cases, &g.open_clip, "oc-vit");
}

#[test]
fn checkpoint_tokenizers_give_the_python_tokenizers_ids() {
    let g = token_goldens();
    let (tok, _) = pretrained_clip::tokenizer(&config("test/hf-clip"), &hub())
        .unwrap()
        .unwrap();
    assert_ids(&tok, &g.cases, &g.hf_clip, "hf-clip byte-level BPE");
    let (tok, _) = pretrained_clip::tokenizer(&config("test/cn-clip"), &hub())
        .unwrap()
        .unwrap();
    assert_ids(&tok, &g.cases, &g.cn_clip, "cn-clip WordPiece");
}

/// A copy of a fixture's snapshot in a temporary folder, changed by `edit`.
fn edited(name: &str, edit: impl FnOnce(&Path)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in std::fs::read_dir(snapshot(name)).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, dir.path().join(f.file_name().unwrap())).unwrap();
    }
    edit(dir.path());
    dir
}

/// The error of loading the checkpoint in `dir`, from config to weights and tokenizer.
fn refusal(dir: &Path) -> String {
    let mut cfg = ClipConfig::tiny();
    cfg.pretrained = Some(dir.to_str().unwrap().to_string());
    let result = (|| -> anyhow::Result<()> {
        pretrained::apply_configs(&mut cfg, &hub())?;
        let model = ClipModel::new(&cfg, &Device::Cpu)?;
        pretrained::load_pretrained(&model, &hub())?;
        pretrained::tokenizer(&cfg, &hub())?;
        Ok(())
    })();
    format!("{:#}", result.expect_err("the checkpoint should be refused"))
}

/// Rewrites the open_clip weights of `dir` through `change`.
fn rewrite_weights(dir: &Path, change: impl FnOnce(&mut HashMap<String, Tensor>)) {
    let file = dir.join("open_clip_model.safetensors");
    let mut t = candle_core::safetensors::load(&file, &Device::Cpu).unwrap();
    change(&mut t);
    candle_core::safetensors::save(&t, &file).unwrap();
}

fn rewrite_json(file: &Path, change: impl FnOnce(&mut serde_json::Value)) {
    let mut j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(file).unwrap()).unwrap();
    change(&mut j);
    std::fs::write(file, j.to_string()).unwrap();
}

#[test]
fn unknown_architectures_are_refused_naming_the_file() {
    let dir = edited("hf-clip", |d| {
        rewrite_json(&d.join("config.json"), |j| j["model_type"] = "siglip".into())
    });
    let err = refusal(dir.path());
    assert!(
        err.contains("config.json: model_type \"siglip\" is not an architecture clipmine loads"),
        "{err}"
    );
    let dir = edited("oc-vit", |d| {
        rewrite_json(&d.join("open_clip_config.json"), |j| {
            j["model_cfg"]["vision_cfg"]["timm_model_name"] = "convnext_base".into()
        })
    });
    let err = refusal(dir.path());
    assert!(err.contains("open_clip_config.json"), "{err}");
    assert!(
        err.contains("timm_model_name = \"convnext_base\" is an architecture clipmine does not reproduce"),
        "{err}"
    );
    let empty = tempfile::tempdir().unwrap();
    let err = refusal(empty.path());
    assert!(err.contains("is not a CLIP checkpoint clipmine knows"), "{err}");
}

#[test]
fn missing_unexpected_and_misshapen_tensors_are_refused_by_name() {
    let dir = edited("oc-vit", |d| {
        rewrite_weights(d, |t| {
            t.remove("visual.ln_post.weight");
        })
    });
    let err = refusal(dir.path());
    assert!(err.contains("open_clip_model.safetensors"), "{err}");
    assert!(
        err.contains("1 model tensors missing from the file: image_encoder.model.post_layernorm.weight [16]"),
        "{err}"
    );
    let dir = edited("oc-vit", |d| {
        rewrite_weights(d, |t| {
            t.insert(
                "visual.extra".into(),
                Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
            );
        })
    });
    let err = refusal(dir.path());
    assert!(
        err.contains("1 file tensors with no place in the model: visual.extra [3]"),
        "{err}"
    );
    // The config says 8 wide text, the weights are 4 wide.
    let dir = edited("oc-vit", |d| {
        rewrite_json(&d.join("open_clip_config.json"), |j| {
            j["model_cfg"]["text_cfg"]["width"] = 8.into()
        })
    });
    let err = refusal(dir.path());
    assert!(
        err.contains("positional_embedding: file [77, 4], model [77, 8] (text_encoder.model.embeddings.position_embedding.weight)"),
        "{err}"
    );
}

#[test]
fn a_tokenizer_whose_ids_exceed_the_embedding_table_is_refused() {
    // Without its tokenizer.json, the 914-token hf-clip would get OpenAI's full vocabulary.
    let dir = edited("hf-clip", |d| std::fs::remove_file(d.join("tokenizer.json")).unwrap());
    let err = refusal(dir.path());
    assert!(
        err.contains("gives ids up to 49407 but the text tower's embedding table has 914 rows"),
        "{err}"
    );
}

#[test]
fn a_hugging_face_checkpoint_with_only_a_pytorch_bin_loads() {
    // Older Hub repos of openai/clip-* hold pytorch_model.bin: the same tensors, pickled.
    let (model, report) = load("test/hf-clip-bin");
    assert!(report.clip.unwrap().weights_file.ends_with("pytorch_model.bin"));
    assert_parity("hf-clip", &model);
}

#[test]
fn old_configs_with_text_and_vision_config_dicts_load() {
    // As openai/clip-vit-large-patch14's config.json: stale defaults in text_config /
    // vision_config, the real sizes in text_config_dict / vision_config_dict (which win).
    let dir = edited("hf-clip", |d| {
        rewrite_json(&d.join("config.json"), |j| {
            for part in ["text_config", "vision_config"] {
                j[format!("{part}_dict")] = j[part].clone();
                j[part]["hidden_size"] = 512.into();
                j[part]["num_hidden_layers"] = 12.into();
            }
        })
    });
    let (model, _) = load(dir.path().to_str().unwrap());
    assert_eq!((model.config.text.dim, model.config.image.width), (16, 16));
    assert_parity("hf-clip", &model);
}
