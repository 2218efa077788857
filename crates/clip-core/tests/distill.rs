//! Distillation from a tiny teacher on the demo set: each loss term reaches every student tensor
//! that should learn it, the teacher runs once (a second start reads its cache: no forward), a
//! teacher of another width works through the learned linear maps, and a student distils.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use clip_core::config::DistillConfig;
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
            || clip_core::loss::l2_normalize(&Tensor::randn(0f32, 1.0, (8, 16), &Device::Cpu).unwrap()).unwrap();
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
fn the_teacher_runs_once_and_a_second_start_reads_its_cache() {
    let cfg = ClipConfig::tiny();
    let data = demo(&cfg);
    let cache = tempfile::tempdir().unwrap();
    // A pretrained CLIP of another image size, tokenizer and width than the student.
    let teacher = Teacher::open(oc_vit().to_str().unwrap(), &Device::Cpu).unwrap();
    let first = distill::targets(&teacher, &DataSource::default(), &data.dataset, cache.path()).unwrap();
    assert!(first.forwards > 0);
    assert_eq!(first.dim, 16);
    assert_eq!(first.image.len(), data.dataset.images.len());
    assert_eq!(first.text.len(), data.dataset.pairs.len());
    let again = distill::targets(&teacher, &DataSource::default(), &data.dataset, cache.path()).unwrap();
    assert_eq!(again.forwards, 0, "the second start ran the teacher");
    assert_eq!(
        again.image.reused + again.text.reused,
        first.image.distinct() + first.text.distinct()
    );
    let all: Vec<usize> = (0..data.dataset.pairs.len()).collect();
    let (a, b) = (
        first.batch(&data.dataset, &all, &Device::Cpu).unwrap(),
        again.batch(&data.dataset, &all, &Device::Cpu).unwrap(),
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
    )
    .unwrap();
    drop(teacher);
    s.set_teacher(targets);
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
