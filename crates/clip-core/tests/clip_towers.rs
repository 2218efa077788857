//! The pretrained-CLIP towers train: in every checkpoint kind (open_clip ViT with `tok` and `avg`
//! pooling, the ModifiedResNet, Hugging Face CLIP and Chinese-CLIP), each trainable tensor —
//! both towers, both projections, `logit_scale` — gets a finite, non-zero gradient from the
//! contrastive loss, and one optimiser step lowers that loss on its batch.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use clip_core::hub::Hub;
use clip_core::{pretrained, ClipConfig, ClipModel};

fn hub() -> Hub {
    Hub::new(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/clip/hub"),
        true,
    )
}

fn loaded(name: &str) -> ClipModel {
    let mut cfg = ClipConfig::tiny();
    cfg.pretrained = Some(format!("test/{name}"));
    pretrained::apply_configs(&mut cfg, &hub()).unwrap();
    let model = ClipModel::new(&cfg, &Device::Cpu).unwrap();
    pretrained::load_pretrained(&model, &hub()).unwrap();
    model
}

/// Three fixed images of the tower's size and three captions of different lengths (padded).
fn batch(model: &ClipModel) -> (Tensor, Tensor, Tensor) {
    let s = model.config.image.image_size;
    let n = 3 * 3 * s * s;
    let pixels: Vec<f32> = (0..n).map(|i| ((i as f32 * 0.618_034).fract() - 0.5) * 3.0).collect();
    let images = Tensor::from_vec(pixels, (3, 3, s, s), &Device::Cpu).unwrap();
    let (tok, _) = pretrained::tokenizer(&model.config, &hub()).unwrap().unwrap();
    let (ids, mask) = tok
        .encode_batch(
            &["a photo of a cat", "人蔘", "a dog on the grass, running fast"],
            &Device::Cpu,
        )
        .unwrap();
    (images, ids, mask)
}

#[test]
fn every_tensor_of_every_pretrained_clip_kind_gets_a_gradient() {
    for name in ["oc-vit", "oc-vit-avg", "oc-rn", "hf-clip", "cn-clip"] {
        let model = loaded(name);
        let (images, ids, mask) = batch(&model);
        let e = model.forward(&images, &ids, &mask, true).unwrap();
        let loss = model.loss(&e, None).unwrap();
        let grads = loss.backward().unwrap();
        let mut checked = 0;
        for (param, entry) in model.params.entries().into_iter().filter(|(_, e)| e.is_trainable()) {
            let g = grads
                .get(entry.var.as_tensor())
                .unwrap_or_else(|| panic!("{name}: {param} gets no gradient"));
            let v = g
                .flatten_all()
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            assert!(
                v.iter().all(|x| x.is_finite()),
                "{name}: {param} has a non-finite gradient"
            );
            assert!(v.iter().any(|x| *x != 0.0), "{name}: {param} has an all-zero gradient");
            checked += 1;
        }
        assert!(checked > 20, "{name}: only {checked} trainable tensors");
        assert!(grads
            .get(model.params.get("logit_scale").unwrap().var.as_tensor())
            .is_some());
    }
}

#[test]
fn a_gradient_step_lowers_the_loss_of_a_pretrained_clip() {
    for name in ["oc-vit", "oc-rn", "hf-clip", "cn-clip"] {
        let model = loaded(name);
        let (images, ids, mask) = batch(&model);
        // Evaluation mode (no dropout, BatchNorm's running statistics): the gradient is that of
        // the very function measured before and after.
        let loss_of = |m: &ClipModel| {
            let e = m.forward(&images, &ids, &mask, false).unwrap();
            m.loss(&e, None).unwrap()
        };
        let before = loss_of(&model);
        let grads = before.backward().unwrap();
        let before = before.to_scalar::<f32>().unwrap();
        for (_, entry) in model.params.entries().into_iter().filter(|(_, e)| e.is_trainable()) {
            let g = grads.get(entry.var.as_tensor()).unwrap();
            entry
                .var
                .set(&(entry.var.as_tensor() - (g * 1e-2).unwrap()).unwrap())
                .unwrap();
        }
        let loss_of = |m: &ClipModel| loss_of(m).to_scalar::<f32>().unwrap();
        let after = loss_of(&model);
        assert!(after < before, "{name}: loss {before} → {after} after a gradient step");
    }
}
