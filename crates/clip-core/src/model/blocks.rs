//! Where a tensor sits in the depth of its tower: before the first block (embeddings, stem), in
//! block i, or at the top (final norm, attention pool, projection).
//!
//! Fine-tuning a pretrained CLIP treats depth differently: open_clip's `--lock-image` keeps the
//! bottom of a tower fixed and trains its last N blocks, and layer-wise learning-rate decay gives
//! lower blocks smaller steps, since they hold the most general features. Both need each tensor's
//! depth, read here from its name (the towers' names are fixed by the checkpoints they load) and
//! the block counts of the config.

use crate::config::{ClipConfig, TrainConfig};

/// Which tower a tensor belongs to, for locking and layer-wise decay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tower {
    Image,
    Text,
}

/// A tensor's place in its tower's depth.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Depth {
    /// Patch or token embeddings, the ResNet stem, the pre-LayerNorm.
    Bottom,
    /// Residual block `i` (0-based, counted over all stages of a ResNet).
    Block(usize),
    /// What follows the last block: final LayerNorm, attention pool, projection.
    Top,
}

/// The number of blocks of the image and the text tower.
pub fn counts(cfg: &ClipConfig) -> (usize, usize) {
    cfg.block_counts()
}

/// The tower and depth of the parameter `name`; `None` for `logit_scale`, which belongs to neither.
pub fn depth(cfg: &ClipConfig, name: &str) -> Option<(Tower, Depth)> {
    let (tower, rest) = if let Some(r) = name.strip_prefix("image_encoder.model.") {
        (Tower::Image, r)
    } else if let Some(r) = name.strip_prefix("text_encoder.model.") {
        (Tower::Text, r)
    } else if name.starts_with("image_projection.") {
        return Some((Tower::Image, Depth::Top));
    } else if name.starts_with("text_projection.") {
        return Some((Tower::Text, Depth::Top));
    } else {
        return None;
    };
    let parts: Vec<&str> = rest.split('.').collect();
    for (i, w) in parts.iter().enumerate() {
        let index = parts.get(i + 1).and_then(|n| n.parse::<usize>().ok());
        // ViT / CLIP text `encoder.layers.N`, BERT `encoder.layer.N`, DistilBERT `transformer.layer.N`.
        if matches!(*w, "layers" | "layer" | "resblocks") {
            if let Some(n) = index {
                return Some((tower, Depth::Block(n)));
            }
        }
        // ResNet stages `layer1.N` … `layer4.N`: blocks counted over all stages.
        if let Some(stage) = w.strip_prefix("layer").and_then(|s| s.parse::<usize>().ok()) {
            if let (Some(n), true) = (index, (1..=cfg.image.depths.len()).contains(&stage)) {
                let before: usize = cfg.image.depths[..stage - 1].iter().sum();
                return Some((tower, Depth::Block(before + n)));
            }
        }
    }
    let top = [
        "post_layernorm",
        "final_layer_norm",
        "attnpool",
        "ln_post",
        "ln_final",
        "pooler",
    ];
    Some((
        tower,
        if top.contains(&parts[0]) {
            Depth::Top
        } else {
            Depth::Bottom
        },
    ))
}

/// Whether `train`'s `lock_image` / `lock_text` keep the parameter `name` fixed: everything of a
/// locked tower below its last `unlocked_layers` blocks; with none unlocked, the whole tower and
/// its projection.
pub fn is_locked(cfg: &ClipConfig, train: &TrainConfig, name: &str) -> bool {
    let Some((tower, d)) = depth(cfg, name) else {
        return false;
    };
    let (image, text) = counts(cfg);
    let (locked, blocks) = match tower {
        Tower::Image => (train.lock_image, image),
        Tower::Text => (train.lock_text, text),
    };
    if !locked {
        return false;
    }
    let n = train.unlocked_layers;
    match d {
        Depth::Bottom => true,
        Depth::Block(i) => i + n < blocks,
        Depth::Top => n == 0,
    }
}

/// The learning-rate factor of `name` under layer-wise decay `decay`: block i of L at
/// decay^(L−i), the bottom at decay^(L+1), the top and `logit_scale` at 1 (BEiT's rule, as
/// timm and open_clip-style fine-tuning scripts apply it).
pub fn lr_scale(cfg: &ClipConfig, decay: f64, name: &str) -> f64 {
    if decay == 1.0 {
        return 1.0;
    }
    let Some((tower, d)) = depth(cfg, name) else {
        return 1.0;
    };
    let (image, text) = counts(cfg);
    let blocks = if tower == Tower::Image { image } else { text };
    let above = match d {
        Depth::Bottom => blocks + 1,
        Depth::Block(i) => blocks.saturating_sub(i),
        Depth::Top => 0,
    };
    decay.powi(above as i32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ImageArch;

    fn vit() -> ClipConfig {
        let mut c = ClipConfig::tiny();
        c.image.arch = ImageArch::Vit;
        c.image.layers = 3;
        c.text.n_layers = 2;
        c
    }

    #[test]
    fn names_map_to_their_depth() {
        let c = vit();
        let d = |n: &str| depth(&c, n);
        assert_eq!(
            d("image_encoder.model.embeddings.class_embedding"),
            Some((Tower::Image, Depth::Bottom))
        );
        assert_eq!(
            d("image_encoder.model.pre_layrnorm.weight"),
            Some((Tower::Image, Depth::Bottom))
        );
        assert_eq!(
            d("image_encoder.model.encoder.layers.2.mlp.fc1.weight"),
            Some((Tower::Image, Depth::Block(2)))
        );
        assert_eq!(
            d("image_encoder.model.post_layernorm.bias"),
            Some((Tower::Image, Depth::Top))
        );
        assert_eq!(d("image_projection.weight"), Some((Tower::Image, Depth::Top)));
        assert_eq!(
            d("text_encoder.model.encoder.layer.1.output.dense.weight"),
            Some((Tower::Text, Depth::Block(1)))
        );
        assert_eq!(
            d("text_encoder.model.final_layer_norm.weight"),
            Some((Tower::Text, Depth::Top))
        );
        assert_eq!(d("logit_scale"), None);
        // ResNet stages: blocks counted over all of them.
        let mut r = ClipConfig::tiny();
        r.image.depths = vec![2, 3, 1, 1];
        let d = |n: &str| depth(&r, n);
        assert_eq!(
            d("image_encoder.model.layer2.1.conv1.weight"),
            Some((Tower::Image, Depth::Block(3)))
        );
        assert_eq!(
            d("image_encoder.model.attnpool.c_proj.weight"),
            Some((Tower::Image, Depth::Top))
        );
        assert_eq!(d("image_encoder.model.bn1.weight"), Some((Tower::Image, Depth::Bottom)));
    }

    #[test]
    fn a_locked_tower_trains_only_its_last_blocks_and_top() {
        let c = vit();
        let mut t = TrainConfig {
            lock_image: true,
            unlocked_layers: 1,
            ..TrainConfig::default()
        };
        let locked = |t: &TrainConfig, n: &str| is_locked(&c, t, n);
        assert!(locked(&t, "image_encoder.model.embeddings.patch_embedding.weight"));
        assert!(locked(&t, "image_encoder.model.encoder.layers.1.mlp.fc1.weight"));
        assert!(!locked(&t, "image_encoder.model.encoder.layers.2.mlp.fc1.weight"));
        assert!(!locked(&t, "image_encoder.model.post_layernorm.weight"));
        assert!(!locked(&t, "image_projection.weight"));
        assert!(!locked(&t, "text_encoder.model.encoder.layers.0.mlp.fc1.weight"));
        assert!(!locked(&t, "logit_scale"));
        t.unlocked_layers = 0;
        assert!(locked(&t, "image_encoder.model.encoder.layers.2.mlp.fc1.weight"));
        assert!(locked(&t, "image_projection.weight"));
    }

    #[test]
    fn layer_decay_scales_by_distance_from_the_top() {
        let c = vit();
        let s = |n: &str| lr_scale(&c, 0.5, n);
        assert_eq!(s("image_encoder.model.post_layernorm.weight"), 1.0);
        assert_eq!(s("image_encoder.model.encoder.layers.2.mlp.fc1.weight"), 0.5);
        assert_eq!(s("image_encoder.model.encoder.layers.0.mlp.fc1.weight"), 0.125);
        assert_eq!(s("image_encoder.model.embeddings.class_embedding"), 0.0625);
        assert_eq!(s("text_encoder.model.encoder.layers.0.mlp.fc1.weight"), 0.25);
        assert_eq!(s("logit_scale"), 1.0);
        assert_eq!(lr_scale(&c, 1.0, "image_encoder.model.embeddings.class_embedding"), 1.0);
    }
}
