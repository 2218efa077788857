//! Frozen towers: evaluation mode, no gradient, no movement, and their features cached on disk —
//! hit on later epochs and runs, invalidated when an image or the weights change, and giving the
//! same losses as running the towers.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use clip_core::feature_cache::{CachedTower, FeatureCache};
use clip_core::fit::Trainer;
use clip_core::optim::AdamW;
use clip_core::params::Group;
use clip_core::prepare::{prepare, DataSource, Prepared};
use clip_core::train::train_step;
use clip_core::{ClipConfig, ClipModel};

fn data(cfg: &ClipConfig, path: Option<PathBuf>) -> Prepared {
    let source = DataSource {
        path,
        ..DataSource::default()
    };
    prepare(cfg, &source, &Device::Cpu, &clip_core::progress::Silent).unwrap()
}

fn frozen(image: bool, text: bool) -> ClipConfig {
    let mut cfg = ClipConfig::tiny();
    cfg.train.freeze_image = image;
    cfg.train.freeze_text = text;
    cfg
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn frozen_towers_get_no_gradient_and_do_not_move() {
    let cfg = frozen(true, true);
    let d = data(&cfg, None);
    let model = ClipModel::new(&cfg, &Device::Cpu).unwrap();
    let mut opt = AdamW::new(&model.params, &cfg.train).unwrap();
    // No optimiser state for a frozen tower.
    assert!(opt
        .names()
        .all(|n| n.starts_with("image_projection.") || n.starts_with("text_projection.") || n == "logit_scale"));
    let batch = d.loader.batch(&d.split.train[..8]).unwrap();
    let before = snapshot(&model).unwrap();
    let out = train_step(&model, &mut opt, std::slice::from_ref(&batch), 0.0).unwrap();
    assert!(
        out.grads.keys().all(|n| !n.contains("_encoder.")),
        "{:?}",
        out.grads.keys()
    );
    assert!(out.grads.keys().any(|n| n.starts_with("image_projection.")));
    let after = snapshot(&model).unwrap();
    let mut stats = 0;
    for (name, e) in model.params.entries() {
        let moved = changed(&before[&name], &after[&name]).unwrap();
        if name.contains("_encoder.") {
            // Weights and BatchNorm running statistics alike.
            assert!(!moved, "{name} of a frozen tower moved");
            stats += usize::from(name.ends_with("running_mean"));
        } else if e.is_trainable() {
            assert!(moved, "{name} did not move");
        }
    }
    assert!(stats > 0, "the image tower has BatchNorm layers");
}

#[test]
fn a_trainable_image_tower_still_updates_its_batch_norm_statistics() {
    // The counterpart of the test above: the same step with the image tower trainable moves them,
    // so "did not move" above means "frozen", not "never moves".
    let cfg = frozen(false, true);
    let d = data(&cfg, None);
    let model = ClipModel::new(&cfg, &Device::Cpu).unwrap();
    let mut opt = AdamW::new(&model.params, &cfg.train).unwrap();
    let batch = d.loader.batch(&d.split.train[..8]).unwrap();
    let before = snapshot(&model).unwrap();
    train_step(&model, &mut opt, std::slice::from_ref(&batch), 0.0).unwrap();
    let after = snapshot(&model).unwrap();
    let name = "image_encoder.model.bn1.running_mean";
    assert!(changed(&before[name], &after[name]).unwrap());
    assert_eq!(model.params.count(Group::TextTower).0, 0);
}

#[test]
fn frozen_towers_run_in_evaluation_mode() {
    let mut cfg = frozen(true, true);
    cfg.text.dropout = 0.5;
    cfg.text.attention_dropout = 0.5;
    let d = data(&cfg, None);
    let b = d.loader.batch(&d.split.train[..8]).unwrap();
    let model = ClipModel::new(&cfg, &Device::Cpu).unwrap();
    // Training mode asked, evaluation mode given: running statistics, no dropout.
    let img_eval = model.image_features(&b.images, false).unwrap();
    let img_train = model.image_features(&b.images, true).unwrap();
    assert_eq!(max_diff(&img_eval, &img_train), 0.0);
    let txt_eval = model.text_features(&b.input_ids, &b.attention_mask, false).unwrap();
    model.reseed_dropout(1);
    let txt_train = model.text_features(&b.input_ids, &b.attention_mask, true).unwrap();
    assert_eq!(max_diff(&txt_eval, &txt_train), 0.0);

    // The same towers, trainable, do change in training mode (so the comparison above can fail).
    let cfg = ClipConfig {
        train: ClipConfig::tiny().train,
        ..cfg
    };
    let model = ClipModel::new(&cfg, &Device::Cpu).unwrap();
    let img_eval = model.image_features(&b.images, false).unwrap();
    assert!(max_diff(&img_eval, &model.image_features(&b.images, true).unwrap()) > 1e-3);
    let txt_eval = model.text_features(&b.input_ids, &b.attention_mask, false).unwrap();
    model.reseed_dropout(1);
    let txt_train = model.text_features(&b.input_ids, &b.attention_mask, true).unwrap();
    assert!(max_diff(&txt_eval, &txt_train) > 1e-3);
}

fn train(t: &mut Trainer, epochs: usize) -> Vec<(f64, f64)> {
    let mut losses = vec![];
    while t.state().epoch < epochs {
        let (loss, pps) = t.train_epoch(|_, _, _| {}).unwrap();
        let v = t.validate().unwrap();
        t.end_epoch(loss, &v, 0.0, pps).unwrap();
        losses.push((loss, v.loss));
    }
    losses
}

#[test]
fn the_cache_is_computed_once_and_hit_afterwards() {
    let cfg = frozen(true, true);
    let run = tempfile::tempdir().unwrap();
    let mut t = Trainer::new(&cfg, data(&cfg, None), run.path()).unwrap();
    assert_eq!(t.cached_towers(), (true, true));
    let f = t.frozen_features().unwrap().unwrap();
    let (img, txt) = (f.image.as_ref().unwrap(), f.text.as_ref().unwrap());
    let images = t.data().dataset.images.len();
    assert_eq!((img.computed, img.reused, img.distinct()), (images, 0, images));
    assert_eq!(txt.len(), t.data().dataset.pairs.len());
    assert!(txt.computed > 0 && txt.reused == 0);
    assert!(img.file.starts_with(run.path().join("feature-cache")) && img.file.is_file());
    let calls = t.model().tower_calls();
    assert!(calls.0 > 0 && calls.1 > 0);

    // Two epochs with validation and recall: neither tower runs again.
    train(&mut t, 2);
    t.recall(&t.data().split.train).unwrap();
    t.fixed_similarity().unwrap();
    assert_eq!(t.model().tower_calls(), calls);

    // Resuming the run reads its own cache (once the first trainer has let go of the folder).
    drop(t);
    let mut resumed = Trainer::resume(&cfg, data(&cfg, None), run.path()).unwrap();
    train(&mut resumed, 3);
    let f = resumed.frozen_features().unwrap().unwrap();
    assert_eq!(f.image.as_ref().unwrap().computed, 0);
    assert_eq!(resumed.model().tower_calls(), (0, 0));

    // A new run on the same cache folder reads every feature and runs no tower at all.
    let other = tempfile::tempdir().unwrap();
    let mut t2 = Trainer::new(&cfg, data(&cfg, None), other.path()).unwrap();
    t2.set_feature_cache(Some(run.path().join("feature-cache")));
    let f2 = t2.frozen_features().unwrap().unwrap();
    let (img2, txt2) = (f2.image.as_ref().unwrap(), f2.text.as_ref().unwrap());
    assert_eq!((img2.computed, img2.reused), (0, images));
    assert_eq!((txt2.computed, txt2.reused), (0, txt.distinct()));
    train(&mut t2, 1);
    assert_eq!(t2.model().tower_calls(), (0, 0));
}

#[test]
fn augmentation_keeps_the_frozen_image_tower_running() {
    let mut cfg = frozen(true, true);
    cfg.data.augment = true;
    let run = tempfile::tempdir().unwrap();
    let mut t = Trainer::new(&cfg, data(&cfg, None), run.path()).unwrap();
    assert_eq!(t.cached_towers(), (false, true));
    let f = t.frozen_features().unwrap().unwrap();
    assert!(f.image.is_none() && f.text.is_some());
    let before = t.model().tower_calls();
    train(&mut t, 1);
    let after = t.model().tower_calls();
    assert!(after.0 > before.0, "augmented images go through the tower");
    assert_eq!(after.1, before.1, "captions still come from the cache");
}

/// The demo set copied into `dir` (so a test may change its images).
fn copy_demo(dir: &Path) -> PathBuf {
    let src = clip_core::data::Dataset::demo_dir();
    let dst = dir.join("demo");
    std::fs::create_dir_all(dst.join("images")).unwrap();
    std::fs::copy(src.join("captions.csv"), dst.join("captions.csv")).unwrap();
    for e in std::fs::read_dir(src.join("images")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join("images").join(e.file_name())).unwrap();
    }
    dst
}

#[test]
fn a_changed_image_or_changed_weights_invalidate_the_cache() {
    let cfg = frozen(true, true);
    let tmp = tempfile::tempdir().unwrap();
    let demo = copy_demo(tmp.path());
    let cache_dir = tmp.path().join("cache");
    let run = |seed_cfg: &ClipConfig| {
        let out = tempfile::tempdir().unwrap();
        let mut t = Trainer::new(seed_cfg, data(seed_cfg, Some(demo.clone())), out.path()).unwrap();
        t.set_feature_cache(Some(cache_dir.clone()));
        let f = t.frozen_features().unwrap().unwrap();
        let (i, x) = (f.image.clone().unwrap(), f.text.clone().unwrap());
        (i, x)
    };
    let (img, _) = run(&cfg);
    let n = img.len();
    assert_eq!(img.computed, n);
    let (img, txt) = run(&cfg);
    assert_eq!((img.computed, img.reused, txt.computed), (0, n, 0));

    // One image file changes: only its features are computed again.
    let path = demo.join("images/astronaut.jpg");
    let mut picture = image::open(&path).unwrap().to_rgb8();
    image::imageops::flip_horizontal_in_place(&mut picture);
    picture.save(&path).unwrap();
    let (img, txt) = run(&cfg);
    assert_eq!((img.computed, img.reused, txt.computed), (1, n - 1, 0));

    // Other weights (another seed): another fingerprint, everything computed anew.
    let mut other = cfg.clone();
    other.seed += 1;
    let (img2, txt2) = run(&other);
    assert_eq!((img2.computed, txt2.reused), (n, 0));
    assert_ne!(img2.file, img.file);
}

#[test]
fn a_changed_buffer_changes_the_fingerprint_and_a_broken_file_is_rebuilt() {
    let cfg = frozen(true, true);
    let d = data(&cfg, None);
    let model = ClipModel::new(&cfg, &Device::Cpu).unwrap();
    let fp = |m: &ClipModel| clip_core::feature_cache::tower_fingerprint(&m.params, &cfg, CachedTower::Image).unwrap();
    let before = fp(&model);
    assert_eq!(before.len(), 32);
    assert_eq!(
        clip_core::feature_cache::tower_fingerprint(&model.params, &cfg, CachedTower::Text).unwrap(),
        clip_core::feature_cache::tower_fingerprint(&model.params, &cfg, CachedTower::Text).unwrap()
    );
    let rv = model.params.get("image_encoder.model.bn1.running_var").unwrap().var;
    rv.set(&(rv.as_tensor() * 2.0).unwrap()).unwrap();
    assert_ne!(fp(&model), before, "running statistics decide a frozen tower's output");

    let dir = tempfile::tempdir().unwrap();
    let cache = FeatureCache::new(dir.path());
    let first = cache.image_features(&model, &d.store, 4).unwrap();
    std::fs::write(&first.file, b"not a safetensors file").unwrap();
    let again = cache.image_features(&model, &d.store, 4).unwrap();
    assert_eq!(again.computed, first.computed);
    let third = cache.image_features(&model, &d.store, 4).unwrap();
    assert_eq!(third.computed, 0);
    let all: Vec<usize> = (0..d.store.len()).collect();
    assert_eq!(
        max_diff(
            &first.tensor(&all, &Device::Cpu).unwrap(),
            &third.tensor(&all, &Device::Cpu).unwrap()
        ),
        0.0
    );
    // The stored features are the tower's, in evaluation mode.
    let direct = model
        .image_features(&d.store.batch_tensor(&all, None, &Device::Cpu).unwrap(), false)
        .unwrap();
    assert!(
        max_diff(
            &direct,
            &third.tensor(&all, &Device::Cpu).unwrap().to_dtype(DType::F32).unwrap()
        ) < 1e-5
    );
}

#[test]
fn cached_features_give_the_same_losses_as_running_the_towers() {
    for (image, text) in [(true, true), (false, true), (true, false)] {
        let cfg = frozen(image, text);
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let mut cached = Trainer::new(&cfg, data(&cfg, None), a.path()).unwrap();
        let mut direct = Trainer::new(&cfg, data(&cfg, None), b.path()).unwrap();
        direct.set_feature_cache(None);
        assert_eq!(direct.cached_towers(), (false, false));
        let la = train(&mut cached, 3);
        let lb = train(&mut direct, 3);
        for (x, y) in la.iter().zip(&lb) {
            assert!(
                (x.0 - y.0).abs() < 1e-5 && (x.1 - y.1).abs() < 1e-5,
                "freeze image {image} text {text}: cached {la:?} vs direct {lb:?}"
            );
        }
        let (ra, rb) = (
            cached.recall(&cached.data().split.train).unwrap(),
            direct.recall(&direct.data().split.train).unwrap(),
        );
        assert_eq!((ra.i2t_r1, ra.t2i_r1), (rb.i2t_r1, rb.t2i_r1));
    }
}

#[test]
fn cached_features_of_a_trainable_tower_are_refused() {
    let cfg = frozen(true, false);
    let d = data(&cfg, None);
    let model = ClipModel::new(&cfg, &Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cache = FeatureCache::new(dir.path());
    let f = clip_core::feature_cache::FrozenFeatures {
        image: Some(cache.image_features(&model, &d.store, 8).unwrap()),
        text: Some(
            cache
                .text_features(&model, &d.loader, d.dataset.pairs.len(), 8)
                .unwrap(),
        ),
    };
    let b = d.loader.batch_with(&d.split.train[..4], Some(&f)).unwrap();
    let err = model.forward_batch(&b, true).err().unwrap();
    assert!(format!("{err:#}").contains("not frozen"), "{err:#}");
    let f = clip_core::feature_cache::FrozenFeatures { text: None, ..f };
    let b = d.loader.batch_with(&d.split.train[..4], Some(&f)).unwrap();
    assert_eq!(b.images.dims(), [4, 0]);
    model.forward_batch(&b, true).unwrap();
}

/// Every tensor of the model, copied, by name.
fn snapshot(model: &ClipModel) -> anyhow::Result<std::collections::HashMap<String, candle_core::Tensor>> {
    model
        .params
        .entries()
        .into_iter()
        .map(|(n, e)| Ok((n, e.var.as_tensor().detach().copy()?)))
        .collect()
}

/// Whether two copies of a tensor differ anywhere.
fn changed(a: &candle_core::Tensor, b: &candle_core::Tensor) -> anyhow::Result<bool> {
    Ok(a.ne(b)?
        .to_dtype(candle_core::DType::F32)?
        .sum_all()?
        .to_scalar::<f32>()?
        > 0.0)
}

#[test]
fn a_flipped_bit_in_the_feature_cache_is_detected_and_only_that_row_recomputed() {
    let cfg = frozen(true, true);
    let d = data(&cfg, None);
    let model = ClipModel::new(&cfg, &Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cache = FeatureCache::new(dir.path());
    let first = cache.image_features(&model, &d.store, 4).unwrap();
    let all: Vec<usize> = (0..d.store.len()).collect();
    let want = first.tensor(&all, &Device::Cpu).unwrap();
    // Flip one bit of the first stored feature value: the data follow the JSON header.
    let mut bytes = std::fs::read(&first.file).unwrap();
    let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let meta: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header]).unwrap();
    let start = meta["features"]["data_offsets"][0].as_u64().unwrap() as usize;
    bytes[8 + header + start + 1] ^= 0x10;
    std::fs::write(&first.file, &bytes).unwrap();
    let again = cache.image_features(&model, &d.store, 4).unwrap();
    assert_eq!(
        (again.damaged, again.computed),
        (1, 1),
        "one row detected and recomputed"
    );
    assert_eq!(max_diff(&want, &again.tensor(&all, &Device::Cpu).unwrap()), 0.0);
    // The file was rewritten whole: the next read finds nothing damaged.
    let third = cache.image_features(&model, &d.store, 4).unwrap();
    assert_eq!((third.damaged, third.computed), (0, 0));

    // An error other than "not there" surfaces, naming the file (a folder where the file goes
    // cannot be read as one).
    std::fs::remove_file(&first.file).unwrap();
    std::fs::create_dir(&first.file).unwrap();
    let err = format!("{:#}", cache.image_features(&model, &d.store, 4).unwrap_err());
    assert!(
        err.contains("reading the feature cache") && err.contains(&first.file.display().to_string()),
        "{err}"
    );
}
