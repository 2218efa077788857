//! Fine-tuning a pretrained CLIP from each tiny checkpoint kind on the demo set: the defaults a
//! pretrained start takes, the start measured before epoch 1, locking all but the last block,
//! layer-wise learning-rate decay, `logit_scale`'s clamp, WiSE-FT's exact ends, and the export
//! round trip (open_clip and Hugging Face folders read back by the loader give the run's
//! embeddings).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use clip_core::config::{Schedule, TrainConfig};
use clip_core::export::{export, ExportFormat};
use clip_core::fit::Trainer;
use clip_core::hub::Hub;
use clip_core::prepare::{prepare, DataSource, Prepared};
use clip_core::{pretrained, pretrained_clip, ClipConfig, ClipModel};

fn snapshot(name: &str) -> PathBuf {
    let snaps =
        Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/fixtures/clip/hub/models--test--{name}/snapshots"));
    std::fs::read_dir(&snaps).unwrap().next().unwrap().unwrap().path()
}

/// The config of a fine-tune of the fixture `name`, as a config file naming it would give, with
/// learning rates a tiny random checkpoint moves at.
fn fine_tune_cfg(name: &str) -> ClipConfig {
    let toml = format!(
        "pretrained = {:?}\n[train]\nepochs = 2\nbatch_size = 16\n",
        snapshot(name).display().to_string()
    );
    let mut cfg = ClipConfig::from_toml_str(&toml).unwrap();
    pretrained::apply_configs(&mut cfg, &Hub::from_env()).unwrap();
    cfg.train.lr_image = 1e-3;
    cfg.train.lr_text = 1e-3;
    cfg.train.lr_head = 1e-3;
    cfg
}

fn demo(cfg: &ClipConfig) -> Prepared {
    prepare(cfg, &DataSource::default(), &Device::Cpu, &clip_core::progress::Silent).unwrap()
}

fn train(t: &mut Trainer) {
    while t.state().epoch < t.cfg().train.epochs {
        let (loss, pps) = t.train_epoch(|_, _, _| {}).unwrap();
        let v = t.validate().unwrap();
        t.end_epoch(loss, &v, 0.0, pps).unwrap();
    }
}

/// Copies of every tensor (the store's share storage with the live parameters).
fn snapshot_weights(m: &ClipModel) -> BTreeMap<String, Tensor> {
    m.params
        .tensors()
        .into_iter()
        .map(|(k, t)| (k, t.copy().unwrap()))
        .collect()
}

fn same(a: &Tensor, b: &Tensor) -> bool {
    let (a, b) = (
        a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        b.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
    );
    a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits())
}

/// Image and caption embeddings of a fixed batch, evaluation mode.
fn embeddings(m: &ClipModel, data: &Prepared) -> Emb {
    let b = data.loader.batch(&data.split.val[..6]).unwrap();
    let e = clip_core::nn::no_grad(|| m.forward_batch(&b, false)).unwrap();
    (e.image.to_vec2().unwrap(), e.text.to_vec2().unwrap())
}

type Emb = (Vec<Vec<f32>>, Vec<Vec<f32>>);

/// The largest |Δ| over both towers' embeddings.
fn max_diff(a: &Emb, b: &Emb) -> f32 {
    let rows = |e: &Emb| e.0.iter().chain(&e.1).flatten().copied().collect::<Vec<f32>>();
    rows(a)
        .iter()
        .zip(&rows(b))
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn a_config_naming_a_pretrained_clip_takes_the_fine_tune_defaults() {
    let toml = format!("pretrained = {:?}\n", snapshot("oc-vit").display().to_string());
    let cfg = ClipConfig::from_toml_str(&toml).unwrap();
    let t = &cfg.train;
    assert_eq!((t.lr_image, t.lr_text, t.lr_head), (1e-5, 1e-5, 1e-5));
    assert_eq!(t.weight_decay, 0.1);
    assert!(t.decay_towers);
    assert_eq!(t.schedule, Schedule::Cosine);
    assert_eq!(t.warmup(100), 10);
    // A recipe keeps the tutorial's.
    assert_eq!(ClipConfig::tiny().train.lr_head, 1e-3);
    assert!(!ClipConfig::tiny().train.decay_towers);
    // What the file sets wins over the defaults.
    let cfg = ClipConfig::from_toml_str(&format!("{toml}[train]\nlr_text = 2e-5\n")).unwrap();
    assert_eq!((cfg.train.lr_image, cfg.train.lr_text), (1e-5, 2e-5));
    assert!(TrainConfig::pretrained_start()
        .describe()
        .contains("weight decay 0.1 on every weight matrix"));
}

#[test]
fn a_short_fine_tune_of_each_checkpoint_kind_records_its_start_and_every_epoch() {
    for name in ["oc-vit", "oc-rn", "hf-clip", "cn-clip"] {
        let cfg = fine_tune_cfg(name);
        let out = tempfile::tempdir().unwrap();
        let mut t = Trainer::new(&cfg, demo(&cfg), out.path()).unwrap();
        let start = t.measure_start().unwrap();
        assert!(start.loss.is_finite(), "{name}");
        train(&mut t);
        let metrics: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.path().join("metrics.json")).unwrap()).unwrap();
        assert_eq!(metrics["start"]["loss"].as_f64().unwrap(), start.loss, "{name}");
        assert_eq!(metrics["history"].as_array().unwrap().len(), 2, "{name}");
        // Learning happened from the checkpoint: the validation loss moved off the start's.
        let last = metrics["history"][1]["val_loss"].as_f64().unwrap();
        assert!(
            last.is_finite() && last != start.loss,
            "{name}: {last} vs {}",
            start.loss
        );
    }
}

#[test]
fn lock_image_with_one_unlocked_layer_trains_exactly_the_last_block_and_what_follows() {
    let mut cfg = fine_tune_cfg("oc-vit");
    cfg.train.lock_image = true;
    cfg.train.unlocked_layers = 1;
    cfg.train.epochs = 1;
    let last_block = format!("image_encoder.model.encoder.layers.{}.", cfg.image.layers - 1);
    let out = tempfile::tempdir().unwrap();
    let mut t = Trainer::new(&cfg, demo(&cfg), out.path()).unwrap();
    let before = snapshot_weights(t.model());
    train(&mut t);
    let after = snapshot_weights(t.model());
    let (mut changed, mut kept) = (0, 0);
    for (name, b) in &before {
        let is_image = name.starts_with("image_encoder.") || name.starts_with("image_projection.");
        if !is_image {
            continue;
        }
        let trains = name.starts_with(&last_block)
            || name.starts_with("image_encoder.model.post_layernorm.")
            || name.starts_with("image_projection.");
        if trains {
            assert!(!same(b, &after[name]), "{name} should have trained");
            changed += 1;
        } else {
            assert!(same(b, &after[name]), "{name} is locked but changed");
            kept += 1;
        }
    }
    assert!(changed >= 10 && kept >= 10, "{changed} trained, {kept} locked");
    // The text tower trains as usual.
    let tok = "text_encoder.model.embeddings.token_embedding.weight";
    assert!(!same(&before[tok], &after[tok]));
}

#[test]
fn locked_resnet_stages_keep_their_batchnorm_statistics() {
    let mut cfg = fine_tune_cfg("oc-rn");
    cfg.train.lock_image = true;
    cfg.train.unlocked_layers = 1;
    cfg.train.epochs = 1;
    let out = tempfile::tempdir().unwrap();
    let mut t = Trainer::new(&cfg, demo(&cfg), out.path()).unwrap();
    let before = snapshot_weights(t.model());
    train(&mut t);
    let after = snapshot_weights(t.model());
    // Stem and the first stages locked: weights and running statistics as loaded.
    for name in [
        "image_encoder.model.bn1.running_mean",
        "image_encoder.model.layer1.0.bn1.running_var",
        "image_encoder.model.layer1.0.conv1.weight",
    ] {
        assert!(same(&before[name], &after[name]), "{name} changed");
    }
    // The last block trains and its statistics follow the data.
    let last = "image_encoder.model.layer4.0.bn1.running_mean";
    assert!(!same(&before[last], &after[last]), "{last} did not update");
}

#[test]
fn layer_decay_gives_lower_blocks_smaller_first_steps() {
    let mut cfg = fine_tune_cfg("oc-vit");
    cfg.train.layer_decay = 0.5;
    cfg.train.decay_towers = false;
    cfg.train.weight_decay = 0.0;
    cfg.train.schedule = Schedule::Plateau;
    cfg.train.epochs = 1;
    let out = tempfile::tempdir().unwrap();
    let t = Trainer::new(&cfg, demo(&cfg), out.path()).unwrap();
    let data = t.data();
    let batch = data.loader.batch(&data.split.train[..16]).unwrap();
    let before = snapshot_weights(t.model());
    let mut opt = clip_core::optim::AdamW::new(&t.model().params, &cfg.train)
        .unwrap()
        .with_lr_scales(|n| clip_core::model::blocks::lr_scale(&cfg, 0.5, n));
    clip_core::train::train_step(t.model(), &mut opt, std::slice::from_ref(&batch), 0.0).unwrap();
    // Adam's first step moves each entry by about lr × its scale (m̂/√v̂ = ±1).
    let step = |name: &str| -> f32 {
        let a = before[name].flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = t
            .model()
            .params
            .get(name)
            .unwrap()
            .var
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
    };
    let l = cfg.image.layers;
    let top = step("image_encoder.model.post_layernorm.weight");
    let last = step(&format!("image_encoder.model.encoder.layers.{}.mlp.fc1.weight", l - 1));
    let first = step("image_encoder.model.encoder.layers.0.mlp.fc1.weight");
    let lr = cfg.train.lr_image as f32;
    assert!((top - lr).abs() < 0.05 * lr, "top {top}");
    assert!((last - 0.5 * lr).abs() < 0.05 * lr, "last block {last}");
    let want = lr * 0.5f32.powi(l as i32);
    assert!((first - want).abs() < 0.05 * want, "first block {first}, want {want}");
}

#[test]
fn logit_scale_is_clamped_to_ln_100_after_a_step() {
    let cfg = fine_tune_cfg("oc-vit");
    let out = tempfile::tempdir().unwrap();
    let t = Trainer::new(&cfg, demo(&cfg), out.path()).unwrap();
    let var = t.model().params.get("logit_scale").unwrap().var;
    var.set(&Tensor::new(6.0f32, &Device::Cpu).unwrap()).unwrap();
    let data = t.data();
    let batch = data.loader.batch(&data.split.train[..16]).unwrap();
    let mut opt = clip_core::optim::AdamW::new(&t.model().params, &cfg.train).unwrap();
    clip_core::train::train_step(t.model(), &mut opt, std::slice::from_ref(&batch), 0.0).unwrap();
    let v = var.as_tensor().to_scalar::<f32>().unwrap();
    assert_eq!(v, clip_core::loss::CLIP_MAX_LOGIT_SCALE as f32);
}

#[test]
fn wise_ft_at_0_is_the_checkpoint_and_at_1_the_fine_tuned_model_exactly() {
    let cfg = fine_tune_cfg("oc-vit");
    let out = tempfile::tempdir().unwrap();
    let mut t = Trainer::new(&cfg, demo(&cfg), out.path()).unwrap();
    let data = demo(&cfg);
    let start = embeddings(t.model(), &data);
    train(&mut t);
    t.load_best().unwrap();
    let tuned = embeddings(t.model(), &data);
    assert!(max_diff(&start, &tuned) > 1e-4, "fine-tuning changed nothing");
    let w = t.wise_ft(&[1.0], |_| {}).unwrap();
    assert_eq!(w.chosen, 1.0);
    assert_eq!(embeddings(t.model(), &data), tuned);
    let w = t.wise_ft(&[0.0], |_| {}).unwrap();
    assert_eq!(w.chosen, 0.0);
    assert_eq!(embeddings(t.model(), &data), start);
    // The sweep keeps its best α as the run's model and records every point.
    t.load_best().unwrap();
    let w = t.wise_ft(&[0.0, 0.5, 1.0], |_| {}).unwrap();
    assert_eq!(w.points.len(), 3);
    let best = w.points.iter().map(|p| p.validation.quality()).fold(f64::MIN, f64::max);
    let chosen = w.points.iter().find(|p| p.alpha == w.chosen).unwrap();
    assert_eq!(chosen.validation.quality(), best);
    let saved = ClipModel::new(&cfg, &Device::Cpu).unwrap();
    clip_core::checkpoint::load_weights(&saved.params, &out.path().join("model.safetensors")).unwrap();
    assert!(max_diff(&embeddings(&saved, &data), &embeddings(t.model(), &data)) == 0.0);
}

#[test]
fn an_exported_run_loads_back_with_the_same_embeddings() {
    for (name, formats) in [
        ("oc-vit", &[ExportFormat::OpenClip, ExportFormat::Hf][..]),
        ("oc-vit-avg", &[ExportFormat::OpenClip][..]),
        ("oc-rn", &[ExportFormat::OpenClip][..]),
        ("hf-clip", &[ExportFormat::Hf][..]),
        ("cn-clip", &[ExportFormat::Hf][..]),
    ] {
        let mut cfg = fine_tune_cfg(name);
        cfg.train.epochs = 1;
        let out = tempfile::tempdir().unwrap();
        let mut t = Trainer::new(&cfg, demo(&cfg), out.path()).unwrap();
        train(&mut t);
        t.load_best().unwrap();
        let data = demo(&cfg);
        let want = embeddings(t.model(), &data);
        for &format in formats {
            let dir = tempfile::tempdir().unwrap();
            export(t.model(), &data.tokenizer, format, dir.path(), true).unwrap();
            let back = pretrained_clip::open(dir.path().to_str().unwrap(), &Hub::from_env(), &Device::Cpu).unwrap();
            // The folder gives the same tokenizer ids and the same embeddings.
            let ids = |tok: &clip_core::data::TextTokenizer| tok.encode("人蔘 and 枸杞, a cup of coffee!").unwrap();
            assert_eq!(ids(&back.tokenizer), ids(&data.tokenizer), "{name} {format:?}");
            let got = embeddings(&back.model, &data);
            let d = max_diff(&want, &got);
            assert!(d <= 1e-6, "{name} {format:?}: max |Δ| {d}");
        }
    }
}

#[test]
fn exports_a_format_cannot_carry_are_refused_with_the_reason() {
    let dev = &Device::Cpu;
    let hub = &Hub::from_env();
    let refuse = |name: &str, format: ExportFormat, want: &str| {
        let o = pretrained_clip::open(snapshot(name).to_str().unwrap(), hub, dev).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let e = format!(
            "{:#}",
            export(&o.model, &o.tokenizer, format, dir.path(), false).unwrap_err()
        );
        assert!(e.contains(want), "{name}: {e}");
        assert!(
            std::fs::read_dir(dir.path()).unwrap().next().is_none(),
            "{name}: a refused export wrote files"
        );
    };
    refuse(
        "oc-rn",
        ExportFormat::Hf,
        "Hugging Face transformers has no ResNet CLIP",
    );
    refuse(
        "cn-clip",
        ExportFormat::OpenClip,
        "open_clip has no Chinese-CLIP text tower",
    );
    refuse("oc-vit-avg", ExportFormat::Hf, "reads the class token only");
    // A recipe model (ResNet + DistilBERT, MLP heads) is no CLIP.
    let tiny = ClipModel::new(&ClipConfig::tiny(), dev).unwrap();
    let tok = demo(&ClipConfig::tiny()).tokenizer;
    let dir = tempfile::tempdir().unwrap();
    let e = format!(
        "{:#}",
        export(&tiny, &tok, ExportFormat::OpenClip, dir.path(), false).unwrap_err()
    );
    assert!(e.contains("only a CLIP exports"), "{e}");
    // An earlier export is not overwritten without asking.
    let o = pretrained_clip::open(snapshot("oc-vit").to_str().unwrap(), hub, dev).unwrap();
    export(&o.model, &o.tokenizer, ExportFormat::OpenClip, dir.path(), false).unwrap();
    let e = format!(
        "{:#}",
        export(&o.model, &o.tokenizer, ExportFormat::OpenClip, dir.path(), false).unwrap_err()
    );
    assert!(e.contains("already holds") && e.contains("--overwrite"), "{e}");
    // The weights carry PyTorch's metadata, which some transformers releases require.
    let bytes = std::fs::read(dir.path().join("open_clip_model.safetensors")).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(
        meta.metadata()
            .as_ref()
            .and_then(|m| m.get("format"))
            .map(String::as_str),
        Some("pt")
    );
}

#[test]
fn wise_ft_refuses_a_pretrained_checkpoint_that_changed_since_the_run_started() {
    // The checkpoint in a folder of its own, replaced in place during training (as a Hub branch
    // that moved, or a folder overwritten, would be).
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt");
    std::fs::create_dir(&ckpt).unwrap();
    for e in std::fs::read_dir(snapshot("oc-vit")).unwrap() {
        let f = e.unwrap().path();
        std::fs::copy(&f, ckpt.join(f.file_name().unwrap())).unwrap();
    }
    let toml = format!(
        "pretrained = {:?}\n[train]\nepochs = 1\nbatch_size = 16\n",
        ckpt.display().to_string()
    );
    let mut cfg = ClipConfig::from_toml_str(&toml).unwrap();
    pretrained::apply_configs(&mut cfg, &Hub::from_env()).unwrap();
    let out = dir.path().join("run");
    let mut t = Trainer::new(&cfg, demo(&cfg), &out).unwrap();
    let pin = t.state().pretrained.clone().expect("the start is pinned");
    assert_eq!(pin.source, ckpt.display().to_string());
    train(&mut t);
    t.load_best().unwrap();
    // Unchanged: the sweep runs.
    t.wise_ft(&[0.5], |_| {}).unwrap();

    let weights = std::fs::read_dir(&ckpt)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .unwrap();
    let mut tensors = candle_core::safetensors::load(&weights, &Device::Cpu).unwrap();
    let (name, first) = tensors
        .iter()
        .find(|(_, t)| t.dtype() == candle_core::DType::F32)
        .unwrap();
    let (name, changed) = (name.clone(), (first * 1.5).unwrap());
    tensors.insert(name, changed);
    candle_core::safetensors::save(&tensors, &weights).unwrap();
    t.load_best().unwrap();
    let err = format!("{:#}", t.wise_ft(&[0.5], |_| {}).unwrap_err());
    assert!(
        err.contains("is not the one this run started from") && err.contains(&pin.fingerprint),
        "{err}"
    );
}
