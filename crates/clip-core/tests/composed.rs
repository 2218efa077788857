//! The composed path — what CUDA and Metal tensors run — on the CPU: the whole model gives the same
//! loss and gradients as with the fused CPU kernels, and every trainable variable gets a gradient.
//!
//! The switch is process-wide, so this file holds one test (its own process) that flips it.

use candle_core::{Device, Tensor};
use clip_core::config::{ClipConfig, LossKind};
use clip_core::nn::{force_composed, use_cpu_kernel};
use clip_core::ClipModel;

fn batch(cfg: &ClipConfig, b: usize, l: usize) -> (Tensor, Tensor, Tensor) {
    let s = cfg.image.image_size;
    let px: Vec<f32> = (0..b * 3 * s * s)
        .map(|i| ((i as f32 * 0.618_034).fract() - 0.5) * 3.0)
        .collect();
    let ids: Vec<u32> = (0..b * l)
        .map(|i| (5 + (i * 7919) % (cfg.text.vocab_size - 5)) as u32)
        .collect();
    let mask: Vec<u32> = (0..b * l)
        .map(|i| if i / l == b - 1 && i % l >= 3 { 0 } else { 1 })
        .collect();
    (
        Tensor::from_vec(px, (b, 3, s, s), &Device::Cpu).unwrap(),
        Tensor::from_vec(ids, (b, l), &Device::Cpu).unwrap(),
        Tensor::from_vec(mask, (b, l), &Device::Cpu).unwrap(),
    )
}

/// Loss and gradients by name of one forward/backward in training mode (dropout off, so both
/// paths see the same function), then the image embeddings in evaluation mode (BatchNorm on the
/// running statistics that step updated).
fn loss_and_grads(cfg: &ClipConfig) -> (f32, Vec<(String, Tensor)>, Vec<f32>) {
    let model = ClipModel::new(cfg, &Device::Cpu).unwrap();
    let (images, ids, mask) = batch(cfg, 4, 6);
    let e = model.forward(&images, &ids, &mask, true).unwrap();
    let loss = model.loss(&e, None).unwrap();
    let grads = loss.backward().unwrap();
    let named = model
        .params
        .trainable()
        .into_iter()
        .map(|(n, _, v)| {
            let g = grads
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("{n}: no gradient"))
                .clone();
            (n, g)
        })
        .collect();
    let eval = model.encode_image(&images, false).unwrap();
    let eval = eval.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    (loss.to_scalar::<f32>().unwrap(), named, eval)
}

#[test]
fn the_composed_path_matches_the_fused_kernels_and_covers_every_variable() {
    let probe = Tensor::zeros(2, candle_core::DType::F32, &Device::Cpu).unwrap();
    for loss in [LossKind::Clip, LossKind::Soft] {
        let mut cfg = ClipConfig {
            loss,
            ..ClipConfig::tiny()
        };
        cfg.text.dropout = 0.0;
        cfg.text.attention_dropout = 0.0;
        cfg.head_dropout = 0.0;
        force_composed(false);
        assert!(use_cpu_kernel(&probe));
        let (fused_loss, fused, fused_eval) = loss_and_grads(&cfg);
        force_composed(true);
        assert!(!use_cpu_kernel(&probe));
        let (composed_loss, composed, composed_eval) = loss_and_grads(&cfg);
        let d = fused_eval
            .iter()
            .zip(&composed_eval)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(d <= 1e-4, "{loss}: evaluation-mode image embeddings differ by {d}");
        assert!(
            (fused_loss - composed_loss).abs() <= 1e-4 * fused_loss.abs().max(1.0),
            "{loss}: loss {fused_loss} fused, {composed_loss} composed"
        );
        for ((n, a), (_, b)) in fused.iter().zip(&composed) {
            let scale = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            let d = (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(
                d <= 2e-3 * scale.max(1e-3),
                "{loss}: {n}: gradients differ by {d} (scale {scale})"
            );
            let v = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(
                v.iter().all(|x| x.is_finite()) && v.iter().any(|x| *x != 0.0),
                "{loss}: {n}: composed gradient zero or not finite"
            );
        }
    }
    force_composed(false);
}
