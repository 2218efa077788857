//! `simple-clip`'s architecture (bottleneck ResNet, DistilBERT, soft loss, the tutorial's learning
//! rates), scaled down, learns a fixed batch from its first steps; and it starts as timm's does.

use candle_core::{DType, Device, Tensor};
use clip_core::data::Batch;
use clip_core::optim::AdamW;
use clip_core::train::train_step;
use clip_core::{ClipConfig, ClipModel};

/// simple-clip with fewer, narrower layers and 32×32 images; everything else is the preset's.
fn small_simple_clip() -> ClipConfig {
    let mut cfg = ClipConfig::simple_clip();
    cfg.image.image_size = 32;
    cfg.image.depths = vec![2, 2, 2, 2];
    cfg.image.stem_width = 16;
    cfg.image.widths = vec![16, 32, 64, 128];
    cfg.text.vocab_size = 1000;
    cfg.text.dim = 128;
    cfg.text.n_layers = 2;
    cfg.text.n_heads = 4;
    cfg.text.hidden_dim = 256;
    cfg.text.max_position_embeddings = 64;
    cfg
}

fn fixed_batch(cfg: &ClipConfig, b: usize, l: usize) -> Batch {
    let dev = Device::Cpu;
    let s = cfg.image.image_size;
    let px: Vec<f32> = (0..b * 3 * s * s)
        .map(|i| (((i as f32 + 1.0) * 0.618_034).fract() - 0.5) * 3.0)
        .collect();
    let ids: Vec<u32> = (0..b * l)
        .map(|i| (5 + (i * 7919 + 1) % (cfg.text.vocab_size - 5)) as u32)
        .collect();
    Batch {
        images: Tensor::from_vec(px, (b, 3, s, s), &dev).unwrap(),
        input_ids: Tensor::from_vec(ids, (b, l), &dev).unwrap(),
        attention_mask: Tensor::ones((b, l), DType::U32, &dev).unwrap(),
        pairs: (0..b).collect(),
        positives: Tensor::eye(b, DType::F32, &dev).unwrap(),
        image_features: None,
        text_features: None,
        global: None,
    }
}

#[test]
fn scaled_down_simple_clip_learns_a_fixed_batch_from_the_first_steps() {
    let cfg = small_simple_clip();
    assert!(cfg.image.zero_init_last, "simple-clip starts its blocks as timm does");
    let model = ClipModel::new(&cfg, &Device::Cpu).unwrap();
    let mut opt = AdamW::new(&model.params, &cfg.train).unwrap();
    let batch = fixed_batch(&cfg, 8, 8);
    let losses: Vec<f64> = (0..6)
        .map(|_| {
            train_step(&model, &mut opt, std::slice::from_ref(&batch), 0.0)
                .unwrap()
                .loss
        })
        .collect();
    // The soft loss is noisy step to step (PyTorch's too), but every early step is below the
    // first, and within six steps it has at least halved.
    for (i, l) in losses.iter().enumerate().take(4).skip(1) {
        assert!(
            *l < losses[0],
            "step {i}: loss {l} not below the first {}: {losses:?}",
            losses[0]
        );
    }
    let best = losses.iter().cloned().fold(f64::INFINITY, f64::min);
    assert!(
        best < 0.5 * losses[0],
        "the loss did not halve in six steps: {losses:?}"
    );
}

#[test]
fn residual_blocks_start_as_the_identity_in_simple_clip_only() {
    let values = |model: &ClipModel, name: &str| -> Vec<f32> {
        let e = model.params.get(name).unwrap_or_else(|| panic!("missing {name}"));
        e.var.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap()
    };
    let mut cfg = small_simple_clip();
    cfg.image.depths = vec![1, 1, 1, 1];
    let model = ClipModel::new(&cfg, &Device::Cpu).unwrap();
    for stage in 1..=4 {
        let last = values(&model, &format!("image_encoder.model.layer{stage}.0.bn3.weight"));
        assert!(last.iter().all(|&g| g == 0.0), "layer{stage}: last γ not zero");
        for other in ["bn1", "bn2"] {
            let g = values(&model, &format!("image_encoder.model.layer{stage}.0.{other}.weight"));
            assert!(g.iter().all(|&g| g == 1.0), "layer{stage}.{other}");
        }
        let ds = values(
            &model,
            &format!("image_encoder.model.layer{stage}.0.downsample.1.weight"),
        );
        assert!(ds.iter().all(|&g| g == 1.0), "layer{stage} downsample");
    }
    // tiny keeps γ = 1 everywhere, so stage 3 sees a gradient for every tensor on its one step.
    let tiny = ClipModel::new(&ClipConfig::tiny(), &Device::Cpu).unwrap();
    assert!(values(&tiny, "image_encoder.model.layer1.0.bn2.weight")
        .iter()
        .all(|&g| g == 1.0));
}
