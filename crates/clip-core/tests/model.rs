//! The model: shapes, parameter counts, gradient coverage, frozen towers, BatchNorm, max-pool.

use candle_core::{DType, Device, ModuleT, Tensor, Var};
use clip_core::config::{ClipConfig, LossKind};
use clip_core::params::{Group, ParamStore};
use clip_core::ClipModel;

fn random_batch(cfg: &ClipConfig, b: usize, l: usize) -> (Tensor, Tensor, Tensor) {
    let dev = Device::Cpu;
    let s = cfg.image.image_size;
    let n = b * 3 * s * s;
    // Deterministic pseudo-random inputs (candle's CPU RNG cannot be seeded).
    let px: Vec<f32> = (0..n).map(|i| ((i as f32 * 0.618_034).fract() - 0.5) * 3.0).collect();
    let images = Tensor::from_vec(px, (b, 3, s, s), &dev).unwrap();
    let ids: Vec<u32> = (0..b * l)
        .map(|i| (5 + (i * 7919) % (cfg.text.vocab_size - 5)) as u32)
        .collect();
    let ids = Tensor::from_vec(ids, (b, l), &dev).unwrap();
    // Last row padded after 3 tokens, so the attention mask is exercised.
    let mask: Vec<u32> = (0..b * l)
        .map(|i| if i / l == b - 1 && i % l >= 3 { 0 } else { 1 })
        .collect();
    let mask = Tensor::from_vec(mask, (b, l), &dev).unwrap();
    (images, ids, mask)
}

/// Runs forward + backward and returns the names of trainable variables whose gradient is
/// missing, zero everywhere, or not finite.
fn uncovered(model: &ClipModel, b: usize, l: usize) -> Vec<String> {
    let (images, ids, mask) = random_batch(&model.config, b, l);
    let e = model.forward(&images, &ids, &mask, true).unwrap();
    let loss = model.loss(&e, None).unwrap();
    assert!(loss.to_scalar::<f32>().unwrap().is_finite());
    let grads = loss.backward().unwrap();
    let mut bad = vec![];
    for (name, _, var) in model.params.trainable() {
        match grads.get(var.as_tensor()) {
            None => bad.push(format!("{name} (no gradient)")),
            Some(g) => {
                let v = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                if !v.iter().all(|x| x.is_finite()) {
                    bad.push(format!("{name} (not finite)"))
                } else if v.iter().all(|x| *x == 0.0) {
                    bad.push(format!("{name} (zero)"))
                }
            }
        }
    }
    bad
}

#[test]
fn simple_clip_has_the_reference_parameter_count() {
    let model = ClipModel::new(&ClipConfig::simple_clip(), &Device::Cpu).unwrap();
    // timm resnet50 (num_classes=0) + DistilBERT base + both heads, as the PyTorch reference counts.
    assert_eq!(model.params.count(Group::ImageTower), (23_508_032, 0));
    assert_eq!(model.params.count(Group::TextTower), (66_362_880, 0));
    assert_eq!(model.params.count(Group::Heads), (590_848 + 263_168, 0));
    assert_eq!(model.params.total_params(), 90_724_928);
    // Names as timm / Hugging Face / the tutorial have them.
    for name in [
        "image_encoder.model.conv1.weight",
        "image_encoder.model.bn1.running_var",
        "image_encoder.model.layer1.0.downsample.0.weight",
        "image_encoder.model.layer4.2.bn3.bias",
        "text_encoder.model.embeddings.word_embeddings.weight",
        "text_encoder.model.embeddings.LayerNorm.weight",
        "text_encoder.model.transformer.layer.5.attention.q_lin.weight",
        "text_encoder.model.transformer.layer.5.ffn.lin2.bias",
        "text_encoder.model.transformer.layer.5.output_layer_norm.weight",
        "image_projection.projection.weight",
        "text_projection.layer_norm.bias",
    ] {
        assert!(model.params.get(name).is_some(), "missing {name}");
    }
}

#[test]
fn embeddings_have_the_configured_shape() {
    let cfg = ClipConfig::tiny();
    let model = ClipModel::new(&cfg, &Device::Cpu).unwrap();
    let (images, ids, mask) = random_batch(&cfg, 3, 7);
    for train in [false, true] {
        let e = model.forward(&images, &ids, &mask, train).unwrap();
        assert_eq!(e.image.dims(), &[3, cfg.projection_dim]);
        assert_eq!(e.text.dims(), &[3, cfg.projection_dim]);
    }
}

#[test]
fn same_seed_gives_the_same_weights() {
    let cfg = ClipConfig::tiny();
    let a = ClipModel::new(&cfg, &Device::Cpu).unwrap().params.tensors();
    let b = ClipModel::new(&cfg, &Device::Cpu).unwrap().params.tensors();
    let c = ClipModel::new(&ClipConfig { seed: 7, ..cfg }, &Device::Cpu)
        .unwrap()
        .params
        .tensors();
    let w = "image_encoder.model.conv1.weight";
    let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(flat(&a[w]), flat(&b[w]));
    assert_ne!(flat(&a[w]), flat(&c[w]));
}

#[test]
fn every_trainable_variable_gets_a_gradient_tiny_both_losses() {
    for loss in [LossKind::Clip, LossKind::Soft] {
        let cfg = ClipConfig {
            loss,
            ..ClipConfig::tiny()
        };
        let model = ClipModel::new(&cfg, &Device::Cpu).unwrap();
        let bad = uncovered(&model, 4, 6);
        assert!(bad.is_empty(), "{loss} loss: {bad:?}");
        if loss == LossKind::Clip {
            assert!(model.params.get("logit_scale").is_some());
        }
    }
}

#[test]
fn every_trainable_variable_gets_a_gradient_bert_text_towers() {
    // The BERT naming scheme (token-type embeddings, hidden dropout after attention) with each
    // pooling and activation a pretrained config can ask for.
    use clip_core::config::{Activation, Pooling, TextKind};
    for (pooling, activation) in [(Pooling::Mean, Activation::GeluNew), (Pooling::Cls, Activation::Relu)] {
        let mut cfg = ClipConfig::tiny();
        cfg.text.kind = TextKind::Bert;
        cfg.text.pooling = pooling;
        cfg.text.activation = activation;
        let model = ClipModel::new(&cfg, &Device::Cpu).unwrap();
        assert!(model
            .params
            .get("text_encoder.model.encoder.layer.0.attention.self.query.weight")
            .is_some());
        assert!(model
            .params
            .get("text_encoder.model.embeddings.token_type_embeddings.weight")
            .is_some());
        let bad = uncovered(&model, 4, 6);
        assert!(bad.is_empty(), "{pooling:?} {activation:?}: {bad:?}");
    }
}

#[test]
fn every_trainable_variable_gets_a_gradient_simple_clip_both_losses() {
    // The full ResNet50 + DistilBERT-base graph, at 64×64 so it runs in seconds on a CPU: the set of
    // parameters and ops is the same as at 224×224.
    for loss in [LossKind::Soft, LossKind::Clip] {
        let mut cfg = ClipConfig {
            loss,
            ..ClipConfig::simple_clip()
        };
        cfg.image.image_size = 64;
        // With the preset's zero-initialised last γ of each block, the blocks' other weights get
        // an exactly-zero gradient on the first step (as in PyTorch): that is arithmetic, not a
        // cut graph, so this check of the graph starts from γ = 1.
        cfg.image.zero_init_last = false;
        let model = ClipModel::new(&cfg, &Device::Cpu).unwrap();
        let bad = uncovered(&model, 2, 5);
        assert!(bad.is_empty(), "{loss} loss: {bad:?}");
    }
}

#[test]
fn the_coverage_check_catches_a_fused_layer_norm() {
    // candle 0.11's fused `ops::layer_norm` has no backward: a weight before it silently gets no
    // gradient. The check used above must flag exactly that.
    let w = Var::from_tensor(&Tensor::new(&[[1f32, 2.], [3., 4.]], &Device::Cpu).unwrap()).unwrap();
    let x = Tensor::new(&[[0.5f32, -1.0], [2.0, 0.1]], &Device::Cpu).unwrap();
    let gamma = Tensor::ones(2, DType::F32, &Device::Cpu).unwrap();
    let beta = Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap();
    let h = x.matmul(w.as_tensor()).unwrap();
    let fused = candle_nn::ops::layer_norm(&h, &gamma, &beta, 1e-5).unwrap();
    let g = (fused.sqr().unwrap().sum_all().unwrap()).backward().unwrap();
    let fused_grad = g
        .get(w.as_tensor())
        .map(|t| t.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap());
    assert!(
        fused_grad.is_none() || fused_grad == Some(0.0),
        "fused layer_norm now has a backward: {fused_grad:?}"
    );

    // Ours passes the gradient through.
    let store = ParamStore::new(&Device::Cpu, 0);
    let ln = clip_core::nn::LayerNorm::new(&store.root(Group::Heads, true), 2, 1e-5).unwrap();
    let h = x.matmul(w.as_tensor()).unwrap();
    let scaled = h
        .broadcast_mul(&Tensor::new(&[1f32, 3.], &Device::Cpu).unwrap())
        .unwrap();
    let ours = candle_core::Module::forward(&ln, &scaled).unwrap();
    let g = ours.narrow(1, 0, 1).unwrap().sum_all().unwrap().backward().unwrap();
    let ours_grad = g
        .get(w.as_tensor())
        .unwrap()
        .abs()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(ours_grad > 0.0);
}

#[test]
fn frozen_towers_are_not_trainable() {
    let mut cfg = ClipConfig::tiny();
    cfg.train.freeze_image = true;
    let model = ClipModel::new(&cfg, &Device::Cpu).unwrap();
    let (t, f) = model.params.count(Group::ImageTower);
    assert_eq!(t, 0);
    assert!(f > 0);
    assert!(model.params.trainable().iter().all(|(_, g, _)| *g != Group::ImageTower));
    // Gradients still reach every other trainable variable.
    assert!(uncovered(&model, 3, 4).is_empty());

    let mut cfg = ClipConfig::tiny();
    cfg.train.freeze_text = true;
    let model = ClipModel::new(&cfg, &Device::Cpu).unwrap();
    assert_eq!(model.params.count(Group::TextTower).0, 0);
    assert!(uncovered(&model, 3, 4).is_empty());
}

#[test]
fn batch_norm_uses_batch_statistics_in_training_and_running_ones_in_eval() {
    let store = ParamStore::new(&Device::Cpu, 0);
    let bn = clip_core::nn::BatchNorm2d::new(&store.root(Group::ImageTower, true), 2).unwrap();
    let data: Vec<f32> = (0..2 * 2 * 3 * 3)
        .map(|i| (i as f32 * 1.7).sin() * 4.0 + if (i / 9) % 2 == 0 { 10.0 } else { -3.0 })
        .collect();
    let x = Tensor::from_vec(data, (2, 2, 3, 3), &Device::Cpu).unwrap();

    // Train mode: each channel normalised to mean 0, variance 1 over (N, H, W).
    let y = bn.forward_t(&x, true).unwrap();
    let mean = y.mean((0, 2, 3)).unwrap().to_vec1::<f32>().unwrap();
    let var = y.sqr().unwrap().mean((0, 2, 3)).unwrap().to_vec1::<f32>().unwrap();
    for c in 0..2 {
        assert!(mean[c].abs() < 1e-4, "{mean:?}");
        assert!((var[c] - 1.0).abs() < 1e-3, "{var:?}");
    }
    // Running statistics moved by momentum 0.1 towards the batch mean and unbiased variance.
    let batch_mean = x.mean((0, 2, 3)).unwrap().to_vec1::<f32>().unwrap();
    let rm = bn.running_mean().as_tensor().to_vec1::<f32>().unwrap();
    for c in 0..2 {
        assert!((rm[c] - 0.1 * batch_mean[c]).abs() < 1e-4);
    }
    let rv = store
        .get("running_var")
        .unwrap()
        .var
        .as_tensor()
        .to_vec1::<f32>()
        .unwrap();
    let xc = x.broadcast_sub(&x.mean_keepdim((0, 2, 3)).unwrap()).unwrap();
    let biased = xc.sqr().unwrap().mean((0, 2, 3)).unwrap().to_vec1::<f32>().unwrap();
    for c in 0..2 {
        let unbiased = biased[c] * 18.0 / 17.0;
        assert!((rv[c] - (0.9 + 0.1 * unbiased)).abs() < 1e-3, "{rv:?}");
    }

    // Eval mode: running statistics, and no update.
    let y = bn
        .forward_t(&x, false)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for (i, (&yi, &xi)) in y.iter().zip(&xs).enumerate() {
        let c = (i / 9) % 2;
        let expect = (xi - rm[c]) / (rv[c] + 1e-5).sqrt();
        assert!((yi - expect).abs() < 1e-3);
    }
    assert_eq!(bn.running_mean().as_tensor().to_vec1::<f32>().unwrap(), rm);
}

/// Naive 3×3 / stride 2 / padding 1 max-pool, the reference for ours.
fn reference_pool(x: &[f32], h: usize, w: usize) -> Vec<f32> {
    let (oh, ow) = ((h - 1) / 2 + 1, (w - 1) / 2 + 1);
    let mut out = vec![f32::NEG_INFINITY; oh * ow];
    for i in 0..oh {
        for j in 0..ow {
            for di in 0..3 {
                for dj in 0..3 {
                    let (r, c) = ((2 * i + di) as isize - 1, (2 * j + dj) as isize - 1);
                    if r >= 0 && c >= 0 && (r as usize) < h && (c as usize) < w {
                        out[i * ow + j] = out[i * ow + j].max(x[r as usize * w + c as usize]);
                    }
                }
            }
        }
    }
    out
}

#[test]
fn max_pool_matches_pytorch_semantics_and_its_gradient_matches_finite_differences() {
    for (h, w) in [(7, 7), (8, 6), (5, 9)] {
        let data: Vec<f32> = (0..h * w)
            .map(|i| ((i * 37 % 101) as f32 * 0.731).sin() * 2.0)
            .collect();
        let x = Var::from_tensor(&Tensor::from_vec(data.clone(), (1, 1, h, w), &Device::Cpu).unwrap()).unwrap();
        let y = clip_core::nn::max_pool_3x3_s2(x.as_tensor()).unwrap();
        assert_eq!(y.dims(), &[1, 1, (h - 1) / 2 + 1, (w - 1) / 2 + 1]);
        let got = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(got, reference_pool(&data, h, w));

        // d/dx of Σ y·c, c a fixed weighting, against central differences.
        let n_out = got.len();
        let cw: Vec<f32> = (0..n_out).map(|i| 1.0 + i as f32 * 0.1).collect();
        let c = Tensor::from_vec(cw.clone(), y.dims(), &Device::Cpu).unwrap();
        let grad = (y * &c).unwrap().sum_all().unwrap().backward().unwrap();
        let analytic = grad
            .get(x.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let f = |d: &[f32]| -> f64 {
            reference_pool(d, h, w)
                .iter()
                .zip(&cw)
                .map(|(a, b)| (*a as f64) * (*b as f64))
                .sum()
        };
        let eps = 1e-2f32;
        for i in 0..h * w {
            let mut p = data.clone();
            p[i] += eps;
            let mut m = data.clone();
            m[i] -= eps;
            let numeric = (f(&p) - f(&m)) / (2.0 * eps as f64);
            assert!(
                (numeric - analytic[i] as f64).abs() < 1e-2,
                "{h}×{w} at {i}: numeric {numeric}, analytic {}",
                analytic[i]
            );
        }
    }
}

#[test]
fn invalid_shapes_are_rejected_with_a_reason() {
    let mut cfg = ClipConfig::tiny();
    cfg.text.dim = 130; // not a multiple of 4 heads
    cfg.image.widths = vec![16, 32];
    let err = format!("{:#}", ClipModel::new(&cfg, &Device::Cpu).err().unwrap());
    assert!(
        err.contains("text.dim (130) must be a positive multiple of text.n_heads (4)"),
        "{err}"
    );
    assert!(err.contains("image.depths"), "{err}");
}

#[test]
fn configs_read_from_toml_name_the_bad_line() {
    let cfg = ClipConfig::from_toml_str("name = \"mine\"\nprojection_dim = 64\n[image]\nimage_size = 32\n").unwrap();
    assert_eq!(cfg.projection_dim, 64);
    assert_eq!(cfg.image.image_size, 32);
    assert_eq!(cfg.text.dim, ClipConfig::tiny().text.dim);
    let cfg = ClipConfig::from_toml_str("preset = \"simple-clip\"\n[train]\nbatch_size = 16\n").unwrap();
    assert_eq!(cfg.image.depths, vec![3, 4, 6, 3]);
    assert_eq!(cfg.train.batch_size, 16);
    let err = format!(
        "{:#}",
        ClipConfig::from_toml_str("name = \"x\"\n\n[image]\nimage_sise = 32\n").unwrap_err()
    );
    assert!(err.contains("line 4"), "{err}");
    assert!(err.contains("image_sise"), "{err}");
}

#[test]
fn the_shipped_configs_parse_and_tiny_toml_is_the_preset() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/configs");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "toml") {
            let cfg = ClipConfig::from_toml_file(&p).unwrap_or_else(|e| panic!("{}: {e:#}", p.display()));
            ClipModel::new(
                &ClipConfig {
                    image: clip_core::config::ImageConfig {
                        image_size: cfg.image.image_size.min(64),
                        ..cfg.image.clone()
                    },
                    ..cfg.clone()
                },
                &Device::Cpu,
            )
            .map(|_| ())
            .unwrap_or_else(|e| panic!("{}: {e:#}", p.display()));
            n += 1;
        }
    }
    assert!(n >= 3);
    let tiny = ClipConfig::from_toml_file(&dir.join("tiny.toml")).unwrap();
    // tiny.toml spells out the defaults every config starts from (written in code, since reading
    // a file starts from them).
    assert_eq!(tiny.to_toml().unwrap(), ClipConfig::default().to_toml().unwrap());
}

#[test]
fn inference_embeddings_equal_evaluation_mode_without_a_graph() {
    let cfg = ClipConfig::tiny();
    let model = ClipModel::new(&cfg, &Device::Cpu).unwrap();
    let (images, ids, mask) = random_batch(&cfg, 3, 7);
    // Evaluation mode still records a graph: the weights are variables.
    let eval_i = model.encode_image(&images, false).unwrap();
    let eval_t = model.encode_text(&ids, &mask, false).unwrap();
    assert!(eval_i.track_op() && eval_t.track_op());
    let (emb_i, emb_t) = (
        model.embed_images(&images).unwrap(),
        model.embed_texts(&ids, &mask).unwrap(),
    );
    assert!(!emb_i.track_op() && !emb_t.track_op());
    for (a, b) in [(&eval_i, &emb_i), (&eval_t, &emb_t)] {
        let d = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(d, 0.0, "no_grad changed the embeddings");
    }
    // Inside no_grad nothing is recorded, also on the compute pool's threads; outside again it is.
    use clip_core::nn::{grad_enabled, no_grad, on_compute_pool};
    let inner = no_grad(|| {
        let on_pool = on_compute_pool(grad_enabled);
        let e = model.encode_image(&images, false).unwrap();
        (grad_enabled(), on_pool, e.track_op())
    });
    assert_eq!(inner, (false, false, false));
    assert!(grad_enabled() && on_compute_pool(grad_enabled));
    assert!(model.encode_image(&images, false).unwrap().track_op());
}

#[test]
fn a_no_grad_scope_reuses_prepared_weights_and_the_next_scope_sees_new_ones() {
    use clip_core::nn::no_grad;
    let max_diff = |a: &Tensor, b: &Tensor| -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    let cfg = ClipConfig::tiny();
    let model = ClipModel::new(&cfg, &Device::Cpu).unwrap();
    let (_, ids, mask) = random_batch(&cfg, 3, 7);
    let eval = model.encode_text(&ids, &mask, false).unwrap();
    // Several batches in one scope: the linear layers' prepared (transposed) weights are made
    // once and reused; every batch equals evaluation mode.
    let (first, again) = no_grad(|| {
        (
            model.embed_texts(&ids, &mask).unwrap(),
            model.embed_texts(&ids, &mask).unwrap(),
        )
    });
    assert!(max_diff(&eval, &first) < 1e-5 && max_diff(&first, &again) == 0.0);
    // Weights changed between scopes (a training step) are seen by the next scope: nothing
    // prepared outlives its scope. Changed inside a scope they are not (weights must not change
    // within one), which shows the scope's first batch prepared them and later ones reused them.
    let scale_text_weights = || {
        for (name, _, var) in model.params.trainable() {
            if name.starts_with("text_encoder") && var.as_tensor().rank() == 2 {
                var.set(&(var.as_tensor() * 1.5).unwrap()).unwrap();
            }
        }
    };
    let in_scope = no_grad(|| {
        model.embed_texts(&ids, &mask).unwrap();
        scale_text_weights();
        model.embed_texts(&ids, &mask).unwrap()
    });
    // (The embedding tables are scaled too and read directly, but the LayerNorm after them
    // takes the common factor out up to its epsilon.)
    assert!(
        max_diff(&first, &in_scope) < 1e-5,
        "the scope did not reuse its prepared weights"
    );
    let eval2 = model.encode_text(&ids, &mask, false).unwrap();
    let after = no_grad(|| model.embed_texts(&ids, &mask).unwrap());
    assert!(
        max_diff(&eval2, &first) > 1e-3,
        "scaling the text weights did not change the embeddings"
    );
    assert!(
        max_diff(&eval2, &after) < 1e-5,
        "a new scope used weights prepared before they changed"
    );
}

#[test]
fn cls_pooling_computes_only_cls_in_the_last_layer_and_equals_the_full_pass() {
    let cfg = ClipConfig::tiny();
    assert_eq!(cfg.text.pooling, clip_core::config::Pooling::Cls);
    let model = ClipModel::new(&cfg, &Device::Cpu).unwrap();
    let (_, ids, mask) = random_batch(&cfg, 3, 7);
    let tower = model.text_tower();
    let full = tower.hidden_states(&ids, &mask, false).unwrap();
    let cls = tower.forward(&ids, &mask, false).unwrap();
    let expected = full.narrow(1, 0, 1).unwrap().squeeze(1).unwrap();
    assert_eq!(cls.dims(), expected.dims());
    let d = (cls - expected)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(d <= 1e-5, "CLS-only last layer differs from the full pass by {d}");
}
