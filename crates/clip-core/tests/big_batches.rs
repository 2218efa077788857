//! Big batches through the gradient cache (`train.micro_batch`, issue #35): a batch run through
//! the towers a few pairs at a time gives the whole batch's loss and gradient.
//!
//! - Towers without BatchNorm (ViT, the CLIP text transformer): 32 pairs as 4 × 8 give the same
//!   losses and, after 3 AdamW steps, the same weights as one batch of 32.
//! - A BatchNorm tower with dropout (the tiny recipe model): each micro-batch is normalised with
//!   its own statistics, so the gradient is that of the micro-batched forward — equal to running
//!   the micro-batches with their graphs and one loss over them all, which only holds when both
//!   passes draw the same dropout masks; the running statistics move once per micro-batch.
//! - In a run: distilling from a teacher (contrastive, affinity and feature terms) with the text
//!   tower frozen and its features cached, `--micro-batch` trains an epoch as the whole batch does.
//! - Data-parallel (ranks as threads, `dist::LocalWorld`): 2 ranks × 8 pairs train as one process
//!   with a batch of 16, and the ranks hold the same weights, with BatchNorm and dropout too.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use clip_core::data::Batch;
use clip_core::dist::{weights_checksum, Collective, LocalWorld};
use clip_core::distill::{self, Teacher};
use clip_core::fit::Trainer;
use clip_core::optim::{AdamW, Grads};
use clip_core::prepare::{prepare, DataSource};
use clip_core::train::{grad_cache, train_step_data_parallel, train_step_objective, Contrastive, Objective};
use clip_core::{ClipConfig, ClipModel};

/// A small ViT CLIP from scratch (ViT image tower, CLIP text transformer), without dropout.
fn vit_clip() -> ClipConfig {
    let mut cfg = ClipConfig::preset("student-vit-s").unwrap();
    let width = 32;
    cfg.projection_dim = 16;
    cfg.image.image_size = 32;
    cfg.image.patch_size = 8;
    cfg.image.width = width;
    cfg.image.layers = 2;
    cfg.image.heads = 2;
    cfg.image.mlp_dim = 2 * width;
    cfg.text.vocab_size = 300;
    cfg.text.dim = width;
    cfg.text.n_layers = 2;
    cfg.text.n_heads = 2;
    cfg.text.hidden_dim = 2 * width;
    cfg.text.max_position_embeddings = 16;
    cfg.data.max_length = 16;
    cfg.text.dropout = 0.0;
    cfg.text.attention_dropout = 0.0;
    cfg.head_dropout = 0.0;
    cfg
}

/// `n` pairs of pseudo-random pixels and distinct token sequences (some padded), in the model's
/// shapes.
fn batch(cfg: &ClipConfig, n: usize, seed: u32) -> Batch {
    let s = cfg.image.image_size;
    let pixels: Vec<f32> = (0..n * 3 * s * s)
        .map(|i| (((i as u32 ^ seed.wrapping_mul(0x9e37_79b9)) as f32 * 0.618_034).fract() - 0.5) * 3.0)
        .collect();
    let l = 12;
    let vocab = cfg.text.vocab_size as u32;
    let ids: Vec<u32> = (0..(n * l) as u32)
        .map(|i| 3 + (i.wrapping_mul(7919) ^ seed.wrapping_mul(104_729)) % (vocab - 4))
        .collect();
    let mask: Vec<u32> = (0..n * l).map(|i| u32::from(i % l < l - (i / l) % 4)).collect();
    let dev = &Device::Cpu;
    Batch {
        images: Tensor::from_vec(pixels, (n, 3, s, s), dev).unwrap(),
        input_ids: Tensor::from_vec(ids, (n, l), dev).unwrap(),
        attention_mask: Tensor::from_vec(mask, (n, l), dev).unwrap(),
        pairs: (0..n).collect(),
        positives: Tensor::eye(n, DType::F32, dev).unwrap(),
        image_features: None,
        text_features: None,
        global: None,
    }
}

fn values(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

/// ‖a − b‖ / ‖a‖.
fn relative(a: &Tensor, b: &Tensor) -> f64 {
    let (a, b) = (values(a), values(b));
    let d: f64 = a.iter().zip(&b).map(|(x, y)| (x - y).powi(2)).sum();
    let n: f64 = a.iter().map(|x| x * x).sum();
    (d / n.max(1e-300)).sqrt()
}

/// Whether a tensor's gradient is zero in exact arithmetic, so that what it gets is rounding
/// noise (~1e-10), which differs with the order of the sums: the attention's key bias (softmax
/// ignores a shift shared by all keys). Such tensors are compared by absolute differences.
fn shift_invariant(name: &str) -> bool {
    name.ends_with("k_proj.bias") || name.ends_with("k_lin.bias")
}

fn norm(t: &Tensor) -> f64 {
    values(t).iter().map(|x| x * x).sum::<f64>().sqrt()
}

/// The worst relative difference between two sets of gradients, with its name; they must name
/// the same tensors. A shift-invariant tensor's gradient must be noise (norm < 1e-7) in both.
fn worst(a: &Grads, b: &Grads) -> (f64, String) {
    let mut names: Vec<&String> = a.keys().collect();
    names.sort();
    assert_eq!(names.len(), b.len(), "not the same tensors got gradients");
    names
        .into_iter()
        .map(|n| {
            if shift_invariant(n) {
                assert!(
                    norm(&a[n]) < 1e-7 && norm(&b[n]) < 1e-7,
                    "{n}: a gradient that should be 0"
                );
                return (0.0, n.clone());
            }
            (relative(&a[n], &b[n]), n.clone())
        })
        .fold((0.0, String::new()), |w, x| if x.0 > w.0 { x } else { w })
}

/// Asserts two models' weights (parameters, not buffers) are the same within `tolerance`
/// relative. Shift-invariant
/// tensors are left out: AdamW divides their noise by its own root mean square, so they take
/// steps of up to the learning rate in directions that are noise in any framework.
fn same_weights(a: &ClipModel, b: &ClipModel, tolerance: f64, when: &str) {
    let params = |m: &ClipModel| -> std::collections::BTreeMap<String, Tensor> {
        m.params
            .entries()
            .into_iter()
            .filter(|(_, e)| e.is_param())
            .map(|(n, e)| (n, e.var.as_tensor().clone()))
            .collect()
    };
    let (a, b) = (params(a), params(b));
    let mut checked = 0;
    for (name, t) in a.iter().filter(|(n, _)| !shift_invariant(n)) {
        let r = relative(t, &b[name]);
        assert!(r <= tolerance, "{name} differs by {r:.2e} {when}");
        checked += 1;
    }
    assert!(checked > 20, "only {checked} tensors");
}

#[test]
fn a_batch_of_32_as_4_micro_batches_of_8_trains_as_one_batch_without_batch_norm() {
    let cfg = vit_clip();
    let (whole, micro) = (
        ClipModel::new(&cfg, &Device::Cpu).unwrap(),
        ClipModel::new(&cfg, &Device::Cpu).unwrap(),
    );
    let mut opts = (
        AdamW::new(&whole.params, &cfg.train).unwrap(),
        AdamW::new(&micro.params, &cfg.train).unwrap(),
    );
    for step in 0..3 {
        let b = batch(&cfg, 32, step);
        let a = train_step_objective(&whole, &mut opts.0, std::slice::from_ref(&b), 0.0, 0, &Contrastive).unwrap();
        let m = train_step_objective(&micro, &mut opts.1, std::slice::from_ref(&b), 0.0, 8, &Contrastive).unwrap();
        assert!(
            (a.loss - m.loss).abs() <= 1e-5 * a.loss.abs(),
            "step {step}: loss {} against {}",
            a.loss,
            m.loss
        );
        let (w, name) = worst(&a.grads, &m.grads);
        assert!(w <= 1e-4, "step {step}: the gradient of {name} differs by {w:.2e}");
    }
    same_weights(&whole, &micro, 1e-5, "after 3 steps");
}

/// The gradient cache's answer, computed the plain way: each micro-batch embedded with its graph
/// (dropout seeded as the cache seeds it), one loss over all of them, one backward.
fn micro_batched_forward(model: &ClipModel, opt: &AdamW, b: &Batch, size: usize, seed: u64) -> (f64, Grads) {
    let parts = b.split(size).unwrap();
    let mut image = vec![];
    let mut text = vec![];
    for (j, p) in parts.iter().enumerate() {
        model.reseed_dropout(clip_core::rng::mix(seed, j as u64));
        let e = Contrastive.embed(model, p).unwrap();
        image.push(e[0].clone());
        text.push(e[1].clone());
    }
    let e = [Tensor::cat(&image, 0).unwrap(), Tensor::cat(&text, 0).unwrap()];
    let loss = Contrastive.loss(model, &e, b.into()).unwrap();
    let value = loss.to_scalar::<f32>().unwrap() as f64;
    (value, opt.grads_by_name(&loss.backward().unwrap()))
}

#[test]
fn a_batch_norm_tower_with_dropout_gets_the_micro_batched_forwards_gradient() {
    let cfg = ClipConfig::tiny();
    assert!(
        cfg.head_dropout > 0.0 && cfg.text.dropout > 0.0,
        "the test needs dropout"
    );
    let b = batch(&cfg, 16, 1);
    let (cached, plain) = (
        ClipModel::new(&cfg, &Device::Cpu).unwrap(),
        ClipModel::new(&cfg, &Device::Cpu).unwrap(),
    );
    let opt = AdamW::new(&cached.params, &cfg.train).unwrap();
    let opt_plain = AdamW::new(&plain.params, &cfg.train).unwrap();
    let seed = 42;
    let (loss, grads) = grad_cache(&cached, &opt, &b, 4, &Contrastive, seed, 1.0).unwrap();
    let (want, want_grads) = micro_batched_forward(&plain, &opt_plain, &b, 4, seed);
    assert!((loss - want).abs() <= 1e-6 * want.abs(), "loss {loss} against {want}");
    assert_eq!(
        grads.len(),
        opt.names().count(),
        "every trainable tensor gets a gradient"
    );
    let (w, name) = worst(&want_grads, &grads);
    assert!(w <= 1e-4, "the gradient of {name} differs by {w:.2e}");
    // The running statistics moved once per micro-batch, as in the plain micro-batched forward.
    let mut buffers = 0;
    for (name, e) in cached.params.entries().into_iter().filter(|(_, e)| !e.is_param()) {
        let other = plain.params.get(&name).unwrap();
        let r = relative(other.var.as_tensor(), e.var.as_tensor());
        assert!(r <= 1e-6, "{name} differs by {r:.2e}");
        buffers += 1;
    }
    assert!(buffers > 4, "only {buffers} buffers");
    // And it is not the gradient of one forward over the whole batch: BatchNorm sees 4 pairs.
    let whole = ClipModel::new(&cfg, &Device::Cpu).unwrap();
    let opt_whole = AdamW::new(&whole.params, &cfg.train).unwrap();
    let (_, whole_grads) = micro_batched_forward(&whole, &opt_whole, &b, 16, seed);
    let (w, _) = worst(&whole_grads, &grads);
    assert!(w > 1e-3, "micro-batch statistics should change the gradient ({w:.2e})");
}

#[test]
fn a_micro_batch_must_divide_the_batch() {
    let mut cfg = ClipConfig::tiny();
    cfg.train.batch_size = 8;
    cfg.train.micro_batch = 3;
    let err = cfg.validate().unwrap_err().to_string();
    assert!(
        err.contains("train.micro_batch (3) must divide train.batch_size (8)"),
        "{err}"
    );
    cfg.train.micro_batch = 4;
    cfg.validate().unwrap();
}

fn oc_vit() -> PathBuf {
    let snaps = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/clip/hub/models--test--oc-vit/snapshots");
    std::fs::read_dir(&snaps).unwrap().next().unwrap().unwrap().path()
}

/// One epoch of a ViT student distilling from the oc-vit fixture with every loss term on, its
/// text tower frozen (features cached); the mean loss and the weights after it.
fn distil_one_epoch(micro_batch: usize) -> (f64, Trainer) {
    let teacher = Teacher::open(oc_vit().to_str().unwrap(), &Device::Cpu).unwrap();
    let mut cfg = vit_clip();
    cfg.train.batch_size = 8;
    cfg.train.micro_batch = micro_batch;
    cfg.train.freeze_text = true;
    cfg.distill.teacher = Some(oc_vit().display().to_string());
    cfg.distill.teacher_dim = Some(teacher.model.config.projection_dim);
    cfg.distill.contrastive = 1.0;
    cfg.distill.affinity = 1.0;
    cfg.distill.feature = 10.0;
    let data = prepare(&cfg, &DataSource::default(), &Device::Cpu, &clip_core::progress::Silent).unwrap();
    let out = tempfile::tempdir().unwrap();
    let mut t = Trainer::new(&cfg, data, out.path()).unwrap();
    let targets = distill::targets(
        &teacher,
        &DataSource::default(),
        &t.data().dataset,
        &out.path().join("cache"),
        0,
    )
    .unwrap();
    t.set_teacher(targets).unwrap();
    assert_eq!(t.cached_towers(), (false, true));
    let (loss, _) = t.train_epoch(|_, _, _| {}).unwrap();
    (loss, t)
}

#[test]
fn micro_batches_distil_with_a_cached_tower_as_the_whole_batch_does() {
    let (loss, whole) = distil_one_epoch(0);
    let (micro_loss, micro) = distil_one_epoch(2);
    assert!(
        (loss - micro_loss).abs() <= 1e-5 * loss.abs(),
        "mean loss {loss} against {micro_loss}"
    );
    same_weights(whole.model(), micro.model(), 1e-5, "after an epoch");
}

/// A run's losses, step by step, and its model at the end.
type Run = (Vec<f64>, ClipModel);

/// `steps` steps of one process on batches of 16 (micro-batches of 4), and of 2 ranks × 8 as
/// threads (micro-batches of 4): (the process's losses and model, each rank's losses and model).
fn one_process_and_two_ranks(cfg: &ClipConfig, steps: u32) -> (Run, Vec<Run>) {
    one_process_and_two_ranks_with(cfg, steps, (4, 4))
}

/// [`one_process_and_two_ranks`] with the micro-batches (one process's, each rank's; 0: none).
fn one_process_and_two_ranks_with(
    cfg: &ClipConfig,
    steps: u32,
    (micro, rank_micro): (usize, usize),
) -> (Run, Vec<Run>) {
    let one = ClipModel::new(cfg, &Device::Cpu).unwrap();
    let mut opt = AdamW::new(&one.params, &cfg.train).unwrap();
    let losses = (0..steps)
        .map(|step| {
            let b = batch(cfg, 16, step);
            train_step_objective(&one, &mut opt, std::slice::from_ref(&b), 0.0, micro, &Contrastive)
                .unwrap()
                .loss
        })
        .collect();
    let ranks = std::thread::scope(|s| {
        let handles: Vec<_> = LocalWorld::new(2)
            .into_iter()
            .map(|comm| {
                s.spawn(move || {
                    // Each rank its own compute pool: a rank waits in the collectives.
                    let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
                    pool.install(|| {
                        let model = ClipModel::new(cfg, &Device::Cpu).unwrap();
                        let mut opt = AdamW::new(&model.params, &cfg.train).unwrap();
                        let rank = comm.rank();
                        let losses = (0..steps)
                            .map(|step| {
                                let global = batch(cfg, 16, step);
                                let mine = global.split(8).unwrap().swap_remove(rank);
                                let out = train_step_data_parallel(
                                    &model,
                                    &mut opt,
                                    &mine,
                                    (&global).into(),
                                    0.0,
                                    rank_micro,
                                    &Contrastive,
                                    &comm,
                                )
                                .unwrap();
                                out.loss
                            })
                            .collect::<Vec<f64>>();
                        (losses, model)
                    })
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect::<Vec<_>>()
    });
    ((losses, one), ranks)
}

fn same_losses(a: &[f64], b: &[f64], what: &str) {
    for (step, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= 1e-5 * x.abs(),
            "{what}, step {step}: loss {x} against {y}"
        );
    }
}

#[test]
fn two_ranks_of_8_train_as_one_process_with_a_batch_of_16() {
    let cfg = vit_clip();
    let ((losses, one), ranks) = one_process_and_two_ranks(&cfg, 3);
    for (rank, (l, model)) in ranks.iter().enumerate() {
        same_losses(&losses, l, &format!("rank {rank}"));
        same_weights(&one, model, 1e-5, &format!("on rank {rank} after 3 steps"));
    }
    let sums: Vec<_> = ranks.iter().map(|(_, m)| weights_checksum(m).unwrap()).collect();
    assert_eq!(sums[0], sums[1], "the ranks hold different weights");
}

#[test]
fn ranks_with_batch_norm_and_dropout_hold_the_same_weights_as_one_process() {
    // The tiny recipe model: BatchNorm (per micro-batch of 4 in both) and dropout (the masks of
    // the same micro-batches in both). Training mode never reads the running statistics, so the
    // weights still match the one process's; the statistics are rank 0's on every rank.
    let cfg = ClipConfig::tiny();
    let ((losses, one), ranks) = one_process_and_two_ranks(&cfg, 3);
    for (rank, (l, model)) in ranks.iter().enumerate() {
        same_losses(&losses, l, &format!("rank {rank}"));
        same_weights(&one, model, 1e-4, &format!("on rank {rank} after 3 steps"));
    }
    let all = |m: &ClipModel| m.params.tensors();
    let (a, b) = (all(&ranks[0].1), all(&ranks[1].1));
    for (name, t) in &a {
        assert_eq!(values(t), values(&b[name]), "{name} differs between the ranks");
    }
}

#[test]
fn a_share_in_one_piece_is_embedded_once_and_trains_as_micro_batches_of_its_size() {
    // Each rank embeds its 8 pairs once, keeping the graph while the ranks exchange them: the
    // step of one process in micro-batches of 8 (the same dropout masks; BatchNorm per 8).
    let cfg = ClipConfig::tiny();
    let ((losses, one), ranks) = one_process_and_two_ranks_with(&cfg, 3, (8, 0));
    for (rank, (l, model)) in ranks.iter().enumerate() {
        same_losses(&losses, l, &format!("rank {rank}"));
        same_weights(&one, model, 1e-4, &format!("on rank {rank} after 3 steps"));
    }
}
