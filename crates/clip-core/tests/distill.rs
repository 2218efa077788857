//! Distillation from a tiny teacher on the demo set: each loss term reaches every student tensor
//! that should learn it, the teacher runs once (a second start reads its cache: no forward), a
//! teacher of another width works through the learned linear maps, and a student distils.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use clip_core::config::DistillConfig;
use clip_core::data::{Augment, CropSeed};
use clip_core::distill::{self, Teacher};
use clip_core::fit::Trainer;
use clip_core::prepare::{prepare, DataSource, Prepared};
use clip_core::{ClipConfig, ClipModel};

fn demo(cfg: &ClipConfig) -> Prepared {
    prepare(cfg, &DataSource::default(), &Device::Cpu, &clip_core::progress::Silent).unwrap()
}

fn oc_vit() -> PathBuf {
    let snaps = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/clip/hub/models--test--oc-vit/snapshots");
    std::fs::read_dir(&snaps).unwrap().next().unwrap().unwrap().path()
}

fn train(t: &mut Trainer, epochs: usize) {
    while t.state().epoch < epochs {
        let (loss, pps) = t.train_epoch(|_, _, _| {}).unwrap();
        let v = t.validate().unwrap();
        t.end_epoch(loss, &v, 0.0, pps).unwrap();
    }
}

/// A student of `tiny` distilling from a teacher of width `teacher_dim`, with only `term` on.
fn student(teacher_dim: usize, term: &str) -> ClipConfig {
    let mut cfg = ClipConfig::tiny();
    cfg.distill = DistillConfig {
        teacher: Some("test".into()),
        contrastive: f64::from(term == "contrastive"),
        affinity: f64::from(term == "affinity"),
        feature: if term == "feature" { 2000.0 } else { 0.0 },
        teacher_dim: Some(teacher_dim),
        teacher_fingerprint: None,
        views: 4,
        inherit: false,
        images_only: false,
    };
    cfg
}

#[test]
fn every_loss_term_reaches_every_student_tensor_that_should_learn_it() {
    for term in ["contrastive", "affinity", "feature"] {
        // A teacher 16 wide: the feature term goes through the linear maps (128 → 16).
        let cfg = student(16, term);
        let model = ClipModel::new(&cfg, &Device::Cpu).unwrap();
        let data = demo(&cfg);
        let b = data.loader.batch(&data.split.train[..8]).unwrap();
        let normal =
            || clip_core::embed::l2_normalize(&Tensor::randn(0f32, 1.0, (8, 16), &Device::Cpu).unwrap()).unwrap();
        let (ti, tt) = (normal(), normal());
        let e = model.forward_batch(&b, true).unwrap();
        let l = distill::loss(&model, &e, Some(&b.positives), (&ti, &tt), 50.0, &cfg.distill).unwrap();
        assert!(l.total.to_scalar::<f32>().unwrap().is_finite(), "{term}");
        let grads = l.total.backward().unwrap();
        let mut checked = 0;
        for (name, entry) in model.params.entries().into_iter().filter(|(_, e)| e.is_trainable()) {
            // The maps serve only the feature term; the logit scale only the scaled similarities.
            let learns = match term {
                "feature" => name != "logit_scale",
                _ => !name.starts_with("distill."),
            };
            let g = grads.get(entry.var.as_tensor());
            if !learns {
                if let Some(g) = g {
                    let s = g
                        .abs()
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .to_dtype(DType::F64)
                        .unwrap()
                        .to_scalar::<f64>()
                        .unwrap();
                    assert_eq!(s, 0.0, "{term}: {name} should not learn from it");
                }
                continue;
            }
            let g = g.unwrap_or_else(|| panic!("{term}: {name} gets no gradient"));
            let v = g
                .flatten_all()
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            assert!(
                v.iter().all(|x| x.is_finite()),
                "{term}: {name} has a non-finite gradient"
            );
            assert!(v.iter().any(|x| *x != 0.0), "{term}: {name} has an all-zero gradient");
            checked += 1;
        }
        assert!(checked > 30, "{term}: only {checked} tensors checked");
        // The maps exist exactly when the feature term needs them.
        assert_eq!(
            model.params.get("distill.image_map.weight").is_some(),
            term == "feature"
        );
    }
}

#[test]
fn a_teacher_as_wide_as_the_student_needs_no_maps() {
    let cfg = student(128, "feature");
    let model = ClipModel::new(&cfg, &Device::Cpu).unwrap();
    assert!(model.params.get("distill.image_map.weight").is_none());
    let cfg = student(16, "contrastive");
    // No feature term: nothing to map.
    assert!(ClipModel::new(&cfg, &Device::Cpu)
        .unwrap()
        .params
        .get("distill.text_map.weight")
        .is_none());
}

#[test]
fn a_student_taught_by_the_feature_term_alone_answers_in_the_teachers_space() {
    // Feature alone: its two sides met only through their maps, so it answers through them.
    let model = ClipModel::new(&student(24, "feature"), &Device::Cpu).unwrap();
    assert!(model.config.distill.in_teacher_space());
    assert_eq!(model.embed_dim(), 24);
    let images = Tensor::randn(0f32, 1.0, (2, 3, 64, 64), &Device::Cpu).unwrap();
    let ids = Tensor::new(&[[1u32, 5, 9, 2], [1, 7, 2, 0]], &Device::Cpu).unwrap();
    let mask = Tensor::new(&[[1u32, 1, 1, 1], [1, 1, 1, 0]], &Device::Cpu).unwrap();
    let img = model.embed_images(&images).unwrap();
    let txt = model.embed_texts(&ids, &mask).unwrap();
    assert_eq!((img.dims(), txt.dims()), (&[2, 24][..], &[2, 24][..]));
    let mapped = model
        .image_to_teacher_space(&model.encode_image(&images, false).unwrap())
        .unwrap();
    // (The no-grad path reads weights prepared for inference: equal to float rounding.)
    let gap = values(&img)
        .iter()
        .zip(values(&mapped))
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(gap < 1e-4, "the image embedding is not the mapped one: {gap}");
    // With the contrastive term its own space is aligned: it answers there, maps or not.
    let mut cfg = student(24, "feature");
    cfg.distill.contrastive = 1.0;
    let model = ClipModel::new(&cfg, &Device::Cpu).unwrap();
    assert!(model.params.get("distill.image_map.weight").is_some());
    assert!(!model.config.distill.in_teacher_space());
    assert_eq!(model.embed_dim(), 128);
    assert_eq!(model.embed_images(&images).unwrap().dims(), &[2, 128]);
}

#[test]
fn the_teacher_runs_once_and_a_second_start_reads_its_cache() {
    let cfg = ClipConfig::tiny();
    let data = demo(&cfg);
    let cache = tempfile::tempdir().unwrap();
    // A pretrained CLIP of another image size, tokenizer and width than the student.
    let teacher = Teacher::open(oc_vit().to_str().unwrap(), &Device::Cpu).unwrap();
    let first = distill::targets(&teacher, &DataSource::default(), &data.dataset, cache.path(), 0).unwrap();
    assert!(first.forwards > 0);
    assert_eq!(first.dim, 16);
    assert_eq!(first.image.len(), data.dataset.images.len());
    assert_eq!(first.text.len(), data.dataset.pairs.len());
    let again = distill::targets(&teacher, &DataSource::default(), &data.dataset, cache.path(), 0).unwrap();
    assert_eq!(again.forwards, 0, "the second start ran the teacher");
    assert_eq!(
        again.image.reused + again.text.reused,
        first.image.distinct() + first.text.distinct()
    );
    let all: Vec<usize> = (0..data.dataset.pairs.len()).collect();
    let (a, b) = (
        first.batch(&data.dataset, &all, None, &Device::Cpu).unwrap(),
        again.batch(&data.dataset, &all, None, &Device::Cpu).unwrap(),
    );
    assert_eq!(a.0.to_vec2::<f32>().unwrap(), b.0.to_vec2::<f32>().unwrap());
    // Unit rows: the teacher's normalised embeddings.
    let n = a.1.sqr().unwrap().sum(1).unwrap().to_vec1::<f32>().unwrap();
    assert!(n.iter().all(|x| (x - 1.0).abs() < 1e-4), "{n:?}");
}

#[test]
fn a_student_learns_to_agree_with_a_trained_teacher() {
    // The teacher: tiny trained on the demo set.
    let tcfg = ClipConfig::tiny();
    let tdir = tempfile::tempdir().unwrap();
    let mut t = Trainer::new(&tcfg, demo(&tcfg), tdir.path()).unwrap();
    train(&mut t, 12);
    drop(t);
    let teacher = Teacher::open(tdir.path().to_str().unwrap(), &Device::Cpu).unwrap();
    // The student: another seed, a narrower embedding (64: through the maps).
    let mut cfg = ClipConfig::tiny();
    cfg.seed = 7;
    cfg.projection_dim = 64;
    cfg.distill.teacher = Some(tdir.path().display().to_string());
    cfg.distill.teacher_dim = Some(teacher.model.config.projection_dim);
    let out = tempfile::tempdir().unwrap();
    let mut s = Trainer::new(&cfg, demo(&cfg), out.path()).unwrap();
    let targets = distill::targets(
        &teacher,
        &DataSource::default(),
        &s.data().dataset,
        &out.path().join("cache"),
        0,
    )
    .unwrap();
    drop(teacher);
    s.set_teacher(targets).unwrap();
    let start = s.measure_agreement_start().unwrap().unwrap();
    train(&mut s, 8);
    s.load_best().unwrap();
    let end = s.teacher_agreement().unwrap().unwrap();
    assert!(end > start, "agreement {start} → {end}");
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("metrics.json")).unwrap()).unwrap();
    assert_eq!(m["agreement_start"].as_f64().unwrap(), start);
    assert!(s.teacher_recall(&s.data().split.val.clone()).unwrap().is_some());
}

/// A small ViT CLIP from scratch: `layers` blocks `width` wide in both towers.
fn vit_clip(layers: usize, width: usize, patch: usize, seed: u64) -> ClipConfig {
    let mut cfg = ClipConfig::preset("student-vit-s").unwrap();
    cfg.seed = seed;
    cfg.projection_dim = width / 2;
    cfg.image.image_size = 32;
    cfg.image.patch_size = patch;
    cfg.image.width = width;
    cfg.image.layers = layers;
    cfg.image.heads = 2;
    cfg.image.mlp_dim = 2 * width;
    cfg.text.vocab_size = 300;
    cfg.text.dim = width;
    cfg.text.n_layers = layers;
    cfg.text.n_heads = 2;
    cfg.text.hidden_dim = 2 * width;
    cfg.text.max_position_embeddings = 16;
    cfg.data.max_length = 16;
    cfg
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

#[test]
fn weight_inheritance_copies_every_kth_block_as_leading_slices() {
    // Teacher: 4 blocks, 64 wide; student: 2 blocks, 32 wide (k = 2: blocks 0 and 2).
    let teacher = ClipModel::new(&vit_clip(4, 64, 8, 1), &Device::Cpu).unwrap();
    let student = ClipModel::new(&vit_clip(2, 32, 8, 2), &Device::Cpu).unwrap();
    // A trained teacher's temperature (both start at ln(1/0.07)).
    let scale = teacher.params.get("logit_scale").unwrap().var;
    scale
        .set(&Tensor::full(4.2f32, scale.dims(), &Device::Cpu).unwrap())
        .unwrap();
    // Copies: `tensors()` shares the variables' storage, which inheritance overwrites.
    let before: std::collections::BTreeMap<String, Tensor> = student
        .params
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, t.copy().unwrap()))
        .collect();
    let inh = distill::inherit(&student, &teacher, false).unwrap();
    assert_eq!(inh.towers.len(), 2, "{inh:?}");
    assert!(
        inh.towers[0].contains("blocks 0, 2 of the teacher's 4"),
        "{}",
        inh.towers[0]
    );
    let t = teacher.params.tensors();
    let after = student.params.tensors();
    // Tensor by tensor, with the names written out: student block 1 is teacher block 2, cut to
    // the student's width in every dimension.
    let cases = [
        (
            "image_encoder.model.encoder.layers.1.self_attn.q_proj.weight",
            "image_encoder.model.encoder.layers.2.self_attn.q_proj.weight",
        ),
        (
            "image_encoder.model.encoder.layers.0.mlp.fc1.weight",
            "image_encoder.model.encoder.layers.0.mlp.fc1.weight",
        ),
        (
            "text_encoder.model.encoder.layers.1.mlp.fc2.weight",
            "text_encoder.model.encoder.layers.2.mlp.fc2.weight",
        ),
        (
            "image_encoder.model.embeddings.patch_embedding.weight",
            "image_encoder.model.embeddings.patch_embedding.weight",
        ),
        (
            "text_encoder.model.embeddings.position_embedding.weight",
            "text_encoder.model.embeddings.position_embedding.weight",
        ),
        ("logit_scale", "logit_scale"),
    ];
    for (s_name, t_name) in cases {
        let s = after
            .get(s_name)
            .unwrap_or_else(|| panic!("no {s_name} in {:?}", after.keys()));
        let mut want = t[t_name].clone();
        for (d, &n) in s.dims().iter().enumerate() {
            want = want.narrow(d, 0, n).unwrap();
        }
        assert!(
            values(s) == values(&want),
            "{s_name} is not the leading slice of {t_name}"
        );
        assert!(values(s) != values(&before[s_name]), "{s_name} was not changed");
    }
    // Every tensor of both towers is the leading slice of its teacher tensor, but for the ones
    // the report names as kept (the token table: the student's ids are not the teacher's).
    let mut copied = 0;
    for (name, s) in &after {
        if !(name.starts_with("image_") || name.starts_with("text_")) {
            continue;
        }
        if name.contains("token_embedding") {
            assert!(values(s) == values(&before[name]), "{name} should be kept");
            assert!(inh.skipped.iter().any(|k| k.starts_with(name.as_str())), "{inh:?}");
            continue;
        }
        // Two student blocks of four: 0 ← 0, 1 ← 2.
        let from = name.replace("layers.1.", "layers.2.");
        let mut want = t[&from].clone();
        for (d, &n) in s.dims().iter().enumerate() {
            want = want.narrow(d, 0, n).unwrap();
        }
        assert!(values(s) == values(&want), "{name} is not the leading slice of {from}");
        copied += 1;
    }
    // …and logit_scale.
    assert_eq!(copied + 1, inh.tensors, "{inh:?}");
}

#[test]
fn inheritance_skips_what_would_not_mean_the_same() {
    // Another patch size: the patch filters and the position table are other things.
    let teacher = ClipModel::new(&vit_clip(2, 64, 16, 1), &Device::Cpu).unwrap();
    let student = ClipModel::new(&vit_clip(2, 32, 8, 2), &Device::Cpu).unwrap();
    // Copies: `tensors()` shares the variables' storage, which inheritance overwrites.
    let before: std::collections::BTreeMap<String, Tensor> = student
        .params
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, t.copy().unwrap()))
        .collect();
    let inh = distill::inherit(&student, &teacher, false).unwrap();
    let after = student.params.tensors();
    for name in [
        "image_encoder.model.embeddings.patch_embedding.weight",
        "image_encoder.model.embeddings.position_embedding.weight",
    ] {
        assert!(values(&after[name]) == values(&before[name]), "{name} was changed");
        assert!(
            inh.skipped
                .iter()
                .any(|k| k.starts_with(name) && k.contains("patch grid")),
            "{inh:?}"
        );
    }
    // A ResNet student of a ViT teacher: nothing of the image tower, and a teacher narrower
    // than the student gives nothing at all (a slice cannot widen).
    let resnet = ClipModel::new(&ClipConfig::tiny(), &Device::Cpu).unwrap();
    let inh = distill::inherit(&resnet, &teacher, false).unwrap();
    assert!(inh.towers.iter().all(|t| !t.starts_with("image")), "{inh:?}");
    let wide = ClipModel::new(&vit_clip(2, 128, 16, 3), &Device::Cpu).unwrap();
    let inh = distill::inherit(&wide, &teacher, false).unwrap();
    assert!(inh.towers.is_empty() && inh.tensors == 0, "{inh:?}");
    assert!(inh.skipped.iter().any(|k| k.contains("narrower")), "{inh:?}");
}

/// The demo set's photos alone, in a folder of their own: no captions file, no class folders.
fn photos_alone() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(clip_core::data::Dataset::demo_dir().join("images")).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, dir.path().join(p.file_name().unwrap())).unwrap();
    }
    dir
}

#[test]
fn images_without_captions_distil_the_image_tower_and_refuse_a_text_side_loss() {
    let photos = photos_alone();
    let source = DataSource {
        path: Some(photos.path().to_path_buf()),
        ..DataSource::default()
    };
    let mut cfg = ClipConfig::tiny();
    // A student on images alone records its teacher by absolute path (a run folder never
    // names a Hub model it would fetch).
    cfg.distill.teacher = Some(oc_vit().display().to_string());
    cfg.distill.teacher_dim = Some(16);
    let data = prepare(&cfg, &source, &Device::Cpu, &clip_core::progress::Silent).unwrap();
    assert!(data.dataset.captionless());
    assert_eq!(data.dataset.images.len(), 10);
    let teacher = Teacher::open(oc_vit().to_str().unwrap(), &Device::Cpu).unwrap();
    let out = tempfile::tempdir().unwrap();
    let targets = distill::targets(&teacher, &source, &data.dataset, &out.path().join("cache"), 0).unwrap();

    // The defaults weigh the contrastive term: refused, naming it and the fix.
    let mut t = Trainer::new(&cfg, data, out.path()).unwrap();
    let err = t.set_teacher(targets.clone()).unwrap_err().to_string();
    assert!(
        err.contains("images without captions") && err.contains("contrastive = 1") && err.contains("contrastive = 0.0"),
        "{err}"
    );
    // The affinity term alone is refused too; so is no feature term.
    let mut only = cfg.distill.clone();
    only.contrastive = 0.0;
    only.affinity = 1.0;
    assert!(distill::images_only_refusal(&only).unwrap().contains("affinity = 1"));
    only.affinity = 0.0;
    only.feature = 0.0;
    assert!(distill::images_only_refusal(&only).unwrap().contains("feature"));

    // The feature term alone: the image tower learns, the text tower is left as it is.
    cfg.distill.contrastive = 0.0;
    drop(t);
    let out = tempfile::tempdir().unwrap();
    let data = prepare(&cfg, &source, &Device::Cpu, &clip_core::progress::Silent).unwrap();
    let mut t = Trainer::new(&cfg, data, out.path()).unwrap();
    t.set_teacher(targets).unwrap();
    let before: std::collections::BTreeMap<String, Tensor> = t
        .model()
        .params
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, t.copy().unwrap()))
        .collect();
    let mut losses = vec![];
    while t.state().epoch < 6 {
        let (loss, pps) = t.train_epoch(|_, _, _| {}).unwrap();
        losses.push(loss);
        let v = t.validate().unwrap();
        assert!(v.loss.is_finite() && v.zero_shot.is_none(), "{v:?}");
        t.end_epoch(loss, &v, 0.0, pps).unwrap();
    }
    assert!(losses[5] < losses[0], "the feature loss did not fall: {losses:?}");
    let after = t.model().params.tensors();
    let changed = |prefix: &str| {
        after
            .iter()
            .filter(|(n, _)| n.starts_with(prefix))
            .filter(|(n, v)| values(v) != values(&before[n.as_str()]))
            .count()
    };
    assert!(changed("image_encoder.") > 10, "the image tower did not learn");
    assert!(changed("image_projection.") > 0, "the image head did not learn");
    assert_eq!(changed("text_encoder."), 0, "the text tower moved without captions");
    assert_eq!(changed("text_projection."), 0, "the text head moved without captions");
    assert!(t.teacher_agreement().unwrap().is_some());
}

#[test]
fn neighbour_agreement_counts_images_whose_nearest_image_is_the_teachers() {
    let dev = Device::Cpu;
    // Teacher: 0↔1 close, 2↔3 close. Student A agrees; student B pairs 0 with 2 and 1 with 3.
    let t = Tensor::new(&[[1f32, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]], &dev).unwrap();
    let b = Tensor::new(&[[1f32, 0.0], [0.0, 1.0], [0.9, 0.1], [0.1, 0.9]], &dev).unwrap();
    assert_eq!(distill::neighbour_agreement(&t, &t).unwrap(), 1.0);
    assert_eq!(distill::neighbour_agreement(&b, &t).unwrap(), 0.0);
}

#[test]
fn every_preset_parses_and_the_student_presets_are_small() {
    for name in clip_core::config::PRESETS {
        let cfg = ClipConfig::preset(name).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        assert_eq!(cfg.name, name, "the preset file names itself");
    }
    // ViT-B/32 CLIP has 151 M parameters; the students a tenth of that or less.
    for name in ["student-vit-s", "student-resnet-s"] {
        let model = ClipModel::new(&ClipConfig::preset(name).unwrap(), &Device::Cpu).unwrap();
        let n = model.params.total_params();
        assert!((5_000_000..12_000_000).contains(&n), "{name}: {n} parameters");
    }
    let minilm = ClipConfig::preset("student-minilm").unwrap();
    assert_eq!(
        minilm.text.pretrained.as_deref(),
        Some("sentence-transformers/all-MiniLM-L6-v2")
    );
    assert_eq!(
        minilm.image.widths,
        ClipConfig::preset("student-resnet-s").unwrap().image.widths
    );
}

#[test]
fn a_distilled_student_exports_without_its_maps() {
    // A ViT student (16-dimensional embeddings) with maps into a 24-wide teacher's space.
    let mut cfg = vit_clip(2, 32, 8, 2);
    cfg.distill.teacher = Some("test".into());
    cfg.distill.teacher_dim = Some(24);
    let model = ClipModel::new(&cfg, &Device::Cpu).unwrap();
    assert!(model.params.get("distill.image_map.weight").is_some());
    let tok = clip_core::data::TextTokenizer::train(&["a photo of a cat".to_string()], 300, 16).unwrap();
    let out = tempfile::tempdir().unwrap();
    clip_core::export::export(&model, &tok, clip_core::export::ExportFormat::Hf, out.path(), false).unwrap();
    let bytes = std::fs::read(out.path().join("model.safetensors")).unwrap();
    let names: Vec<String> = safetensors::SafeTensors::deserialize(&bytes)
        .unwrap()
        .names()
        .into_iter()
        .map(str::to_string)
        .collect();
    assert!(names.iter().any(|n| n.starts_with("vision_model.")), "{names:?}");
    assert!(!names.iter().any(|n| n.contains("distill")), "{names:?}");
}

#[test]
fn an_augmented_view_is_the_same_crop_wherever_it_is_asked_for() {
    let cfg = ClipConfig::tiny();
    let data = demo(&cfg);
    let store = &data.store;
    let per = 3 * 64 * 64;
    let view = |v: u64, images: &[usize]| store.crop_pixels(images, Some(CropSeed::View(v))).unwrap();
    // Image 3, view 1: the same pixels first in a batch or second, alone or not.
    let (a, b) = (view(1, &[3, 5]), view(1, &[5, 3]));
    assert_eq!(a[..per], b[per..]);
    assert_eq!(view(1, &[3])[..], a[..per]);
    // Another view, another crop; and unlike a plain augmented batch, whose crops follow the
    // position in the batch.
    assert_ne!(view(2, &[3])[..], a[..per]);
    let batch = |images: &[usize]| store.crop_pixels(images, Some(CropSeed::Batch(9))).unwrap();
    assert_ne!(batch(&[3, 5])[..per], batch(&[5, 3])[per..]);
    // The loader's View batches are those crops.
    let pairs: Vec<usize> = (0..data.dataset.pairs.len()).collect();
    let b = data
        .loader
        .batches(&pairs[..4], 4, None, Augment::View(1))
        .next()
        .unwrap()
        .unwrap();
    let images: Vec<usize> = b.pairs.iter().map(|&p| data.dataset.pairs[p].image).collect();
    assert_eq!(
        b.images.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        view(1, &images)
    );
}

#[test]
fn with_augmentation_the_teacher_embeds_each_view_once_and_the_student_trains_on_them() {
    let mut cfg = ClipConfig::tiny();
    cfg.data.augment = true;
    cfg.distill.teacher = Some("oc-vit".into());
    cfg.distill.teacher_dim = Some(16);
    let teacher = Teacher::open(oc_vit().to_str().unwrap(), &Device::Cpu).unwrap();
    let data = demo(&cfg);
    let n = data.dataset.images.len();
    let cache = tempfile::tempdir().unwrap();
    let source = DataSource::default();
    let targets = distill::targets(&teacher, &source, &data.dataset, cache.path(), 2).unwrap();
    assert_eq!(targets.views.len(), 2);
    let all: Vec<usize> = (0..n).collect();
    let rows = |r: &clip_core::data::FeatureRows| r.tensor(&all, &Device::Cpu).unwrap().to_vec2::<f32>().unwrap();
    let (plain, v0, v1) = (rows(&targets.image), rows(&targets.views[0]), rows(&targets.views[1]));
    assert_ne!(plain, v0);
    assert_ne!(v0, v1);
    // Each view's row is the teacher's embedding of exactly that crop, as the teacher reads it.
    let tcfg = teacher.model.config.clone();
    let tdata = prepare(&tcfg, &source, &Device::Cpu, &clip_core::progress::Silent).unwrap();
    let x = tdata
        .store
        .crop_tensor(&all, Some(CropSeed::View(1)), &Device::Cpu)
        .unwrap();
    let direct = clip_core::embed::l2_normalize(&teacher.model.embed_images(&x).unwrap())
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    for (a, b) in direct.iter().zip(&v1) {
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-5, "{x} against {y}");
        }
    }
    // A third view later: only it is computed.
    let more = distill::targets(&teacher, &source, &data.dataset, cache.path(), 3).unwrap();
    assert_eq!(more.forwards, 1, "only the new view should run the teacher");
    assert_eq!(rows(&more.views[1]), v1);
    assert_eq!(more.view_of_epoch(4), Some(1));

    // The student: refused without views, trains with them.
    let out = tempfile::tempdir().unwrap();
    let mut t = Trainer::new(&cfg, demo(&cfg), out.path()).unwrap();
    let none = distill::targets(&teacher, &source, &t.data().dataset, cache.path(), 0).unwrap();
    let err = t.set_teacher(none).unwrap_err().to_string();
    assert!(err.contains("no augmented views"), "{err}");
    t.set_teacher(targets).unwrap();
    train(&mut t, 2);
    assert!(t.state().history.iter().all(|h| h.train_loss.is_finite()));
}

#[test]
fn a_feature_only_student_is_validated_by_its_own_objective() {
    // Contrastive and affinity off: the student's own contrastive loss means nothing, so the
    // validation loss (which picks the best model) is the distillation loss.
    let mut cfg = student(16, "feature");
    cfg.distill.teacher = Some("oc-vit".into());
    let teacher = Teacher::open(oc_vit().to_str().unwrap(), &Device::Cpu).unwrap();
    let out = tempfile::tempdir().unwrap();
    let mut t = Trainer::new(&cfg, demo(&cfg), out.path()).unwrap();
    let targets = distill::targets(
        &teacher,
        &DataSource::default(),
        &t.data().dataset,
        &out.path().join("c"),
        0,
    )
    .unwrap();
    t.set_teacher(targets).unwrap();
    let start = t.validate().unwrap().loss;
    // The distillation loss of the validation pairs, computed by hand, in evaluation mode.
    let val = t.data().split.val.clone();
    let b = t.data().loader.batch(&val).unwrap();
    let by_hand = clip_core::nn::no_grad(|| {
        let (ti, tt) = t
            .teacher()
            .unwrap()
            .batch(&t.data().dataset, &b.pairs, None, &Device::Cpu)?;
        let e = t.model().forward_batch(&b, false)?;
        let l = distill::loss(
            t.model(),
            &e,
            Some(&b.positives),
            (&ti, &tt),
            t.teacher().unwrap().logit_scale,
            &cfg.distill,
        )?;
        Ok::<f32, anyhow::Error>(l.total.to_scalar::<f32>()?)
    })
    .unwrap();
    // (A mean over rows: the same in one batch as in the validation's batches.)
    assert!(
        (start - by_hand as f64).abs() < 1e-4 * start.abs().max(1.0),
        "validation loss {start}, distillation loss {by_hand}"
    );
    train(&mut t, 6);
    let end = t.validate().unwrap().loss;
    assert!(
        end < start,
        "the distillation loss did not fall on validation: {start} → {end}"
    );
}

/// Wide photos (3:1) in a folder of their own, without captions: the centre crop the image key
/// sees is the middle third of each.
fn wide_photos(dir: &Path) -> PathBuf {
    let photos = dir.join("wide");
    std::fs::create_dir(&photos).unwrap();
    for k in 0..4u32 {
        let img = image::RgbImage::from_fn(96, 32, |x, y| {
            image::Rgb([(x * 2 + k * 40) as u8, (y * 7) as u8, (k * 60) as u8])
        });
        img.save(photos.join(format!("wide-{k}.png"))).unwrap();
    }
    photos
}

#[test]
fn an_edit_outside_the_centre_crop_is_a_new_augmented_view_for_the_teacher_cache() {
    let mut cfg = ClipConfig::tiny();
    cfg.data.augment = true;
    let teacher = Teacher::open(oc_vit().to_str().unwrap(), &Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let photos = wide_photos(dir.path());
    let source = DataSource {
        path: Some(photos.clone()),
        ..DataSource::default()
    };
    let cache = dir.path().join("cache");
    let targets_of = |cfg: &ClipConfig| {
        let data = prepare(cfg, &source, &Device::Cpu, &clip_core::progress::Silent).unwrap();
        distill::targets(&teacher, &source, &data.dataset, &cache, 1).unwrap()
    };
    let first = targets_of(&cfg);
    assert!(first.forwards > 0);
    assert_eq!(
        targets_of(&cfg).forwards,
        0,
        "a second start reads every row from the cache"
    );
    // Paint over the left third of one photo: its centre crop (what the image key hashes) is
    // unchanged, but a random crop of the original can see the edit.
    let file = photos.join("wide-2.png");
    let mut img = image::open(&file).unwrap().to_rgb8();
    for x in 0..20 {
        for y in 0..32 {
            img.put_pixel(x, y, image::Rgb([255, 0, 255]));
        }
    }
    img.save(&file).unwrap();
    let again = targets_of(&cfg);
    // The centre-crop key still matches, so the plain image row comes from the cache; the view
    // of the edited photo must be embedded anew (before, its key was the centre crop's: stale).
    assert_eq!(
        again.forwards, 1,
        "the edited photo's view was served from a stale cache entry"
    );
}
