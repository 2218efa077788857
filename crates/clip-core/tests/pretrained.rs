//! Pretrained towers against PyTorch: tiny random timm ResNets, a tiny Hugging Face DistilBERT and
//! a tiny BERT, made by `xtask/reference/make_pretrained_fixtures.py` and stored in
//! tests/fixtures/pretrained/hub laid out exactly as the Hugging Face cache. Each is loaded
//! through the real code path (config.json → architecture, safetensors → ParamStore, tokenizer)
//! from the cache with the network off, and its outputs must match PyTorch's to 1e-5 (measured: at most 1e-6).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, ModuleT, Tensor};
use clip_core::config::{Block, Interpolation, Pooling, TextKind};
use clip_core::hub::{Hub, ModelSource};
use clip_core::pretrained::{self, TowerKind};
use clip_core::{ClipConfig, ClipModel};

const REV: &str = "0123456789abcdef0123456789abcdef01234567";
/// The sentences the fixture script encodes (its SENTENCES).
const SENTENCES: [&str; 3] = ["a photo of a cat", "a dog on the grass, running", "人蔘 and 枸杞"];

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pretrained/hub")
}

fn hub() -> Hub {
    Hub::new(fixtures(), true)
}

fn outputs(repo: &str) -> HashMap<String, Tensor> {
    let dir = fixtures().join(format!("models--{}", repo.replace('/', "--")));
    candle_core::safetensors::load(dir.join("outputs.safetensors"), &Device::Cpu).unwrap()
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

/// A config naming `image` and `text` repos, with the architecture read from their config.json.
fn config(image: Option<&str>, text: Option<&str>, pooling: Pooling) -> ClipConfig {
    let mut cfg = ClipConfig::tiny();
    cfg.image.pretrained = image.map(str::to_string);
    cfg.text.pretrained = text.map(str::to_string);
    cfg.text.pooling = pooling;
    cfg.data.max_length = 40;
    pretrained::apply_configs(&mut cfg, &hub()).unwrap();
    cfg
}

fn ids_and_mask(out: &HashMap<String, Tensor>) -> (Tensor, Tensor) {
    (
        out["input_ids"].to_dtype(DType::U32).unwrap(),
        out["attention_mask"].to_dtype(DType::U32).unwrap(),
    )
}

#[test]
fn timm_resnets_match_pytorch() {
    for (repo, block, feature_dim) in [
        ("clipmine-test/tiny-resnet-basic", Block::Basic, 32),
        ("clipmine-test/tiny-resnet-bottleneck", Block::Bottleneck, 64),
    ] {
        let cfg = config(Some(repo), None, Pooling::Cls);
        assert_eq!(cfg.image.block, block);
        assert_eq!(cfg.image.feature_dim(), feature_dim);
        let model = ClipModel::new(&cfg, &Device::Cpu).unwrap();
        let report = pretrained::load_pretrained(&model, &hub()).unwrap();
        let t = &report.towers[0];
        assert_eq!(t.tower, TowerKind::Image);
        assert_eq!(t.source, format!("{repo}@main"));
        assert_eq!(t.commit.as_deref(), Some(REV));
        // Every BatchNorm's num_batches_tracked, plus fc.weight and fc.bias.
        let bns = model
            .params
            .entries()
            .iter()
            .filter(|(n, _)| n.ends_with("running_var"))
            .count();
        assert_eq!(t.ignored, bns + 2, "{repo}");
        let out = outputs(repo);
        let got = model.image_tower().forward_t(&out["input"], false).unwrap();
        let d = max_abs_diff(&got, &out["pooled"]);
        eprintln!("{repo}: pooled max abs diff {d:.2e}");
        assert!(d <= 1e-5, "{repo}: max abs diff {d}");
    }
}

#[test]
fn distilbert_and_bert_match_transformers() {
    for (repo, kind, pooling, pooled) in [
        (
            "clipmine-test/tiny-distilbert",
            TextKind::Distilbert,
            Pooling::Cls,
            "cls",
        ),
        ("clipmine-test/tiny-bert", TextKind::Bert, Pooling::Mean, "mean"),
    ] {
        let cfg = config(None, Some(repo), pooling);
        assert_eq!(cfg.text.kind, kind);
        let model = ClipModel::new(&cfg, &Device::Cpu).unwrap();
        let report = pretrained::load_pretrained(&model, &hub()).unwrap();
        let out = outputs(repo);
        let (ids, mask) = ids_and_mask(&out);
        let tower = model.text_tower();
        let h = tower.hidden_states(&ids, &mask, false).unwrap();
        // Padded positions differ by design (they are never read); compare the real tokens.
        let m = out["attention_mask"]
            .to_dtype(DType::F32)
            .unwrap()
            .unsqueeze(2)
            .unwrap();
        let d = max_abs_diff(
            &h.broadcast_mul(&m).unwrap(),
            &out["last_hidden_state"].broadcast_mul(&m).unwrap(),
        );
        eprintln!("{repo}: last_hidden_state max abs diff {d:.2e}");
        assert!(d <= 1e-5, "{repo}: last_hidden_state max abs diff {d}");
        let p = tower.forward(&ids, &mask, false).unwrap();
        let d = max_abs_diff(&p, &out[pooled]);
        eprintln!("{repo}: {pooled} pooling max abs diff {d:.2e}");
        assert!(d <= 1e-5, "{repo}: {pooled} pooling max abs diff {d}");

        // The tokenizer from the same repo gives transformers' ids.
        let (tok, _) = pretrained::tokenizer(&cfg, &hub()).unwrap().unwrap();
        let (ours, our_mask) = tok.encode_batch(&SENTENCES, &Device::Cpu).unwrap();
        assert_eq!(ours.to_vec2::<u32>().unwrap(), ids.to_vec2::<u32>().unwrap(), "{repo}");
        assert_eq!(our_mask.to_vec2::<u32>().unwrap(), mask.to_vec2::<u32>().unwrap());

        let t = &report.towers[0];
        assert_eq!(t.tower, TowerKind::Text);
        let tower_tensors = model
            .params
            .entries()
            .iter()
            .filter(|(n, _)| n.starts_with(pretrained::TEXT_PREFIX))
            .count();
        assert_eq!(t.loaded, tower_tensors);
        let ignored = match kind {
            // vocab_transform, vocab_layer_norm, vocab_projector: weight and bias each.
            TextKind::Distilbert => 6,
            // position_ids, the pooler's 2, and cls.*: predictions.bias, transform (dense + LN: 4),
            // decoder (2), seq_relationship (2).
            TextKind::Bert => 1 + 2 + 9,
            TextKind::Clip => unreachable!("a text tower from a DistilBERT / BERT repo"),
        };
        assert_eq!(t.ignored, ignored, "{repo}");
    }
}

#[test]
fn heads_and_logit_scale_start_fresh_and_the_report_counts_them() {
    let cfg = config(
        Some("clipmine-test/tiny-resnet-basic"),
        Some("clipmine-test/tiny-bert"),
        Pooling::Mean,
    );
    let model = ClipModel::new(&cfg, &Device::Cpu).unwrap();
    let fresh_model = ClipModel::new(&cfg, &Device::Cpu).unwrap();
    let report = pretrained::load_pretrained(&model, &hub()).unwrap();
    let heads: Vec<String> = model
        .params
        .entries()
        .into_iter()
        .map(|(n, _)| n)
        .filter(|n| !n.starts_with(pretrained::IMAGE_PREFIX) && !n.starts_with(pretrained::TEXT_PREFIX))
        .collect();
    assert!(heads.contains(&"logit_scale".to_string()));
    assert_eq!(report.fresh, heads.len());
    assert_eq!(
        report.towers.iter().map(|t| t.loaded).sum::<usize>() + report.fresh,
        model.params.entries().len()
    );
    let a = model.params.tensors();
    let b = fresh_model.params.tensors();
    let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for h in &heads {
        assert_eq!(flat(&a[h]), flat(&b[h]), "{h} should keep its fresh initial value");
    }
    let w = "text_encoder.model.embeddings.word_embeddings.weight";
    assert_ne!(flat(&a[w]), flat(&b[w]));
}

#[test]
fn a_timm_config_sets_the_architecture_and_the_preprocessing() {
    let cfg = config(Some("clipmine-test/tiny-resnet-bottleneck"), None, Pooling::Cls);
    let i = &cfg.image;
    assert_eq!(i.depths, [1, 2, 1, 1]);
    assert_eq!(i.widths, [4, 8, 12, 16]);
    // timm's plain stem is 64 wide whatever the stage widths.
    assert_eq!(i.stem_width, 64);
    assert_eq!(i.image_size, 224);
    assert_eq!(i.crop_pct, 0.95);
    assert_eq!(i.interpolation, Interpolation::Bicubic);
    assert_eq!(i.mean, [0.485, 0.456, 0.406]);
    let t = config(None, Some("clipmine-test/tiny-bert"), Pooling::Mean).text;
    assert_eq!((t.dim, t.n_layers, t.n_heads, t.hidden_dim), (24, 2, 3, 48));
    assert_eq!(
        (t.vocab_size, t.max_position_embeddings, t.type_vocab_size),
        (36, 40, 2)
    );
    assert_eq!(t.layer_norm_eps, 1e-7);
    assert_eq!(t.activation, clip_core::config::Activation::GeluNew);
}

#[test]
fn a_local_folder_and_a_safetensors_file_need_no_hub() {
    let snap = fixtures().join(format!("models--clipmine-test--tiny-bert/snapshots/{REV}"));
    // The cache given here is empty and offline: anything but the local path would fail.
    let empty = tempfile::tempdir().unwrap();
    let nowhere = Hub::new(empty.path(), true);
    let mut cfg = ClipConfig::tiny();
    cfg.text.pretrained = Some(snap.display().to_string());
    cfg.text.pooling = Pooling::Mean;
    cfg.data.max_length = 40;
    pretrained::apply_configs(&mut cfg, &nowhere).unwrap();
    assert_eq!(cfg.text.kind, TextKind::Bert);
    let model = ClipModel::new(&cfg, &Device::Cpu).unwrap();
    let report = pretrained::load_pretrained(&model, &nowhere).unwrap();
    assert_eq!(report.towers[0].commit.as_deref(), Some(REV));
    let (tok, file) = pretrained::tokenizer(&cfg, &nowhere).unwrap().unwrap();
    assert!(file.ends_with("vocab.txt"));
    let r = tok.unknown_report(&[SENTENCES[2].to_string()]).unwrap();
    assert_eq!(
        r.unknown.iter().map(|(t, _)| t.as_str()).collect::<Vec<_>>(),
        ["枸", "杞"]
    );

    // A .safetensors file: the config.json beside it still sets the architecture.
    cfg.text.pretrained = Some(snap.join("model.safetensors").display().to_string());
    pretrained::apply_configs(&mut cfg, &nowhere).unwrap();
    let model = ClipModel::new(&cfg, &Device::Cpu).unwrap();
    let out = outputs("clipmine-test/tiny-bert");
    pretrained::load_pretrained(&model, &nowhere).unwrap();
    let (ids, mask) = ids_and_mask(&out);
    let d = max_abs_diff(&model.text_tower().forward(&ids, &mask, false).unwrap(), &out["mean"]);
    assert!(d <= 1e-5, "{d}");
}

#[test]
fn a_shape_mismatch_names_the_tensor_and_both_shapes() {
    // The architecture not read from config.json: the tiny preset's 128-d tower.
    let mut cfg = ClipConfig::tiny();
    cfg.text.pretrained = Some("clipmine-test/tiny-distilbert".into());
    let model = ClipModel::new(&cfg, &Device::Cpu).unwrap();
    let err = format!("{:#}", pretrained::load_pretrained(&model, &hub()).unwrap_err());
    assert!(
        err.contains("distilbert.embeddings.word_embeddings.weight: file [36, 32], tower [2048, 128]"),
        "{err}"
    );
    assert!(err.contains("text tower"), "{err}");
}

#[test]
fn missing_and_unexpected_tensors_are_errors() {
    // BERT weights in a DistilBERT-shaped tower of the same size: every name differs.
    let mut cfg = config(None, Some("clipmine-test/tiny-bert"), Pooling::Cls);
    cfg.text.kind = TextKind::Distilbert;
    let model = ClipModel::new(&cfg, &Device::Cpu).unwrap();
    let err = format!("{:#}", pretrained::load_pretrained(&model, &hub()).unwrap_err());
    assert!(
        err.contains("missing from the file: transformer.layer.0.attention.k_lin.bias [24]"),
        "{err}"
    );
    assert!(
        err.contains("with no place in the tower: bert.embeddings.token_type_embeddings.weight"),
        "{err}"
    );
}

#[test]
fn an_uncached_model_offline_says_where_it_looked_and_how_to_get_it() {
    let empty = tempfile::tempdir().unwrap();
    let h = Hub::new(empty.path(), true);
    let mut cfg = ClipConfig::tiny();
    cfg.text.pretrained = Some("distilbert/distilbert-base-uncased".into());
    let err = format!("{:#}", pretrained::apply_configs(&mut cfg, &h).unwrap_err());
    assert!(err.contains("distilbert/distilbert-base-uncased"), "{err}");
    assert!(
        err.contains(
            &empty
                .path()
                .join("models--distilbert--distilbert-base-uncased")
                .display()
                .to_string()
        ),
        "{err}"
    );
    assert!(
        err.contains("huggingface-cli download distilbert/distilbert-base-uncased"),
        "{err}"
    );
    assert!(err.contains("HF_HUB_OFFLINE"), "{err}");
}

#[test]
fn the_offline_lookup_follows_refs_and_accepts_a_commit() {
    let h = hub();
    let repo = "clipmine-test/tiny-bert";
    let p = h.cached(repo, "main", "config.json").unwrap();
    assert!(p.ends_with(format!("snapshots/{REV}/config.json")));
    assert_eq!(h.cached(repo, REV, "config.json"), Some(p));
    assert_eq!(h.cached(repo, "v2", "config.json"), None);
    assert_eq!(h.cached(repo, "main", "pytorch_model.bin"), None);
    // A pinned revision that is not cached fails offline, naming it.
    let err = format!("{:#}", h.get(repo, "v2", "config.json").unwrap_err());
    assert!(err.contains("revision v2") && err.contains("--revision v2"), "{err}");
}

#[test]
fn model_sources_parse_repo_ids_revisions_and_paths() {
    let hub = |r: &str, rev: &str| ModelSource::Hub {
        repo: r.into(),
        revision: rev.into(),
    };
    assert_eq!(
        ModelSource::parse("timm/resnet50.a1_in1k", None).unwrap(),
        hub("timm/resnet50.a1_in1k", "main")
    );
    assert_eq!(
        ModelSource::parse("org/name@v1.0", None).unwrap(),
        hub("org/name", "v1.0")
    );
    assert_eq!(
        ModelSource::parse("org/name@v1.0", Some("abc")).unwrap(),
        hub("org/name", "abc")
    );
    assert_eq!(
        ModelSource::parse("bert-base-chinese", None).unwrap(),
        hub("bert-base-chinese", "main")
    );
    assert!(ModelSource::parse("./no/such/folder", None).is_err());
    assert!(ModelSource::parse("a/b/c", None).is_err());
    let dir = fixtures();
    assert!(matches!(
        ModelSource::parse(dir.to_str().unwrap(), None).unwrap(),
        ModelSource::Local { weights: None, .. }
    ));
}

#[test]
fn the_pretrained_presets_name_the_tutorials_models() {
    let c = ClipConfig::preset("simple-clip-pretrained").unwrap();
    assert_eq!(c.image.pretrained.as_deref(), Some("timm/resnet50.a1_in1k"));
    assert_eq!(c.text.pretrained.as_deref(), Some("distilbert/distilbert-base-uncased"));
    assert_eq!((c.train.lr_image, c.train.lr_text, c.train.lr_head), (1e-4, 1e-5, 1e-3));
    let z = ClipConfig::preset("simple-clip-pretrained-zh").unwrap();
    assert!(z.text.pretrained.unwrap().contains("multilingual"));
    // From scratch stays from scratch.
    for p in ["tiny", "simple-clip"] {
        let c = ClipConfig::preset(p).unwrap();
        assert!(c.image.pretrained.is_none() && c.text.pretrained.is_none());
        assert_eq!(c.text.kind, TextKind::Distilbert);
        assert_eq!(c.text.pooling, Pooling::Cls);
    }
    // A config file round-trips the new keys.
    let toml = c.to_toml().unwrap();
    let back = ClipConfig::from_toml_str(&format!("{toml}\n")).unwrap();
    assert_eq!(back.text.kind, c.text.kind);
    let cfg = ClipConfig::from_toml_str(
        "preset = \"tiny\"\n[text]\npretrained = \"org/name\"\nrevision = \"v1\"\nkind = \"bert\"\npooling = \"mean\"\n",
    )
    .unwrap();
    assert_eq!(cfg.text.revision.as_deref(), Some("v1"));
    assert_eq!(cfg.text.pooling, Pooling::Mean);
}

#[test]
fn images_are_prepared_with_the_pretrained_crop_and_statistics() {
    // A white 50×50 square in the middle of a black 100×100 image.
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("square.png");
    image::RgbImage::from_fn(100, 100, |x, y| {
        let inside = (25..75).contains(&x) && (25..75).contains(&y);
        image::Rgb(if inside { [255; 3] } else { [0; 3] })
    })
    .save(&path)
    .unwrap();
    let mut cfg = ClipConfig::tiny();
    cfg.image.image_size = 10;
    cfg.image.mean = [0.5; 3];
    cfg.image.std = [0.25; 3];
    cfg.image.interpolation = Interpolation::Bicubic;
    cfg.data.center_crop = true;
    let values = |cfg: &ClipConfig| {
        clip_core::data::ImageStore::load_one(&path, cfg)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    // crop_pct 0.5 keeps exactly the white square: (1 − 0.5) / 0.25 = 2 everywhere.
    cfg.image.crop_pct = 0.5;
    assert!(
        values(&cfg).iter().all(|v| (v - 2.0).abs() < 1e-3),
        "{:?}",
        values(&cfg)
    );
    // The whole image: black corners, (0 − 0.5) / 0.25 = −2.
    cfg.image.crop_pct = 1.0;
    let v = values(&cfg);
    assert!((v[0] + 2.0).abs() < 1e-3 && (v[55] - 2.0).abs() < 1e-3, "{v:?}");
}

#[test]
fn revisions_that_would_leave_the_cache_are_refused() {
    // A cache laid out as the Hub's, with a file outside the repo's folder that `refs/../..`
    // would reach, and a ref file that points a branch outside `snapshots/`.
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("hub");
    let repo_dir = cache.join("models--org--name");
    std::fs::create_dir_all(repo_dir.join("refs")).unwrap();
    std::fs::create_dir_all(repo_dir.join(format!("snapshots/{REV}"))).unwrap();
    std::fs::write(repo_dir.join(format!("snapshots/{REV}/config.json")), "{}").unwrap();
    std::fs::write(repo_dir.join("refs/main"), REV).unwrap();
    std::fs::write(repo_dir.join("refs/evil"), "../../../outside").unwrap();
    std::fs::create_dir_all(tmp.path().join("outside")).unwrap();
    std::fs::write(tmp.path().join("outside/config.json"), "{\"secret\": 1}").unwrap();
    std::fs::write(cache.join("config.json"), "{\"secret\": 2}").unwrap();
    let h = Hub::new(cache.clone(), true);
    assert!(h.cached("org/name", "main", "config.json").is_some());
    for rev in [
        "../..",
        "refs/../..",
        "../../models--org--name/snapshots/x",
        "/etc",
        "a//b",
        ".hidden",
        "x.lock",
        "a b",
        "a\\b",
        "@{-1}",
        "",
    ] {
        assert_eq!(h.cached("org/name", rev, "config.json"), None, "{rev:?}");
        let err = format!("{:#}", h.get("org/name", rev, "config.json").unwrap_err());
        assert!(
            err.contains("is not a valid branch, tag or commit name"),
            "{rev:?}: {err}"
        );
        let err = format!("{:#}", ModelSource::parse("org/name", Some(rev)).unwrap_err());
        assert!(err.contains("not a valid branch"), "{rev:?}: {err}");
    }
    let err = format!("{:#}", ModelSource::parse("org/name@refs/../../x", None).unwrap_err());
    assert!(err.contains("not a valid branch") && err.contains("`..`"), "{err}");
    // A ref file is trusted to hold a commit hash only.
    assert_eq!(h.cached("org/name", "evil", "config.json"), None);
    // What the Hub accepts still parses.
    for rev in ["main", "v1.0", "refs/pr/12", REV, "feature/x-y_z"] {
        assert!(ModelSource::parse("org/name", Some(rev)).is_ok(), "{rev}");
    }
}
