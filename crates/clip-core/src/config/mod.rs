//! One config for the whole recipe: model shape, loss, data and training knobs.
//!
//! Read from TOML (`assets/configs/*.toml`) or a named preset. Every field has a default so a config
//! file only needs what differs from `tiny`.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

mod activation;
mod data;
mod distill;
mod image;
mod precision;
mod preset;
mod text;
mod train;

pub use activation::Activation;
pub use data::DataConfig;
pub use distill::DistillConfig;
pub use image::{Block, ImageArch, ImageConfig, ImagePool, Interpolation};
pub use precision::Precision;
pub use preset::PRESETS;
pub use text::{Pooling, TextConfig, TextKind};
pub use train::{Schedule, TrainConfig};

/// The largest size one dimension of a model may have (a width, a vocabulary, an image side):
/// far above any real model's, low enough that products of a few never overflow.
pub const MAX_SIZE: usize = 1 << 24;
/// The most blocks (layers, one ResNet stage's depth) a tower may have.
pub const MAX_BLOCKS: usize = 1024;
/// The largest image side a model is prepared at (`image.image_size`, `image.resize`): every
/// photo is resized to it, so it bounds the memory one image takes (CLIPs use 224–448).
pub const MAX_PREPARED_SIDE: usize = 4096;

/// Each size of `sizes` (name, value) past [`MAX_SIZE`], refused by name.
fn too_large(errs: &mut Vec<String>, sizes: &[(&str, usize)]) {
    for &(name, v) in sizes {
        if v > MAX_SIZE {
            errs.push(format!("{name} {v} is larger than any model's (at most {MAX_SIZE})"));
        }
    }
}

/// Each block count of `blocks` (name, value) past [`MAX_BLOCKS`], refused by name.
fn too_many_blocks(errs: &mut Vec<String>, blocks: &[(&str, usize)]) {
    for &(name, v) in blocks {
        if v > MAX_BLOCKS {
            errs.push(format!(
                "{name} {v} is more blocks than any model has (at most {MAX_BLOCKS})"
            ));
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LossKind {
    /// The tutorial's: soft targets from image–image and text–text similarity.
    Soft,
    /// The CLIP paper's: normalised embeddings, learnable temperature, targets on the diagonal.
    Clip,
}

impl std::fmt::Display for LossKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LossKind::Soft => "soft",
            LossKind::Clip => "clip",
        })
    }
}

/// What turns a tower's pooled features into the shared embedding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HeadKind {
    /// The tutorial's projection head: Linear → GELU → Linear, dropout, residual, LayerNorm.
    Mlp,
    /// CLIP's: one bias-free matrix (`visual_projection`, `text_projection`). A `clip_resnet`
    /// image tower has none: its attention pool already ends in the projection.
    Linear,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClipConfig {
    /// Start from this preset and override what the file sets (only read from files).
    #[serde(skip_serializing)]
    pub preset: Option<String>,
    /// Start from a whole pretrained CLIP: a Hugging Face repo (`openai/clip-vit-base-patch32`,
    /// `laion/CLIP-ViT-B-32-laion2B-s34B-b79K`, `OFA-Sys/chinese-clip-vit-base-patch16`,
    /// optionally `@revision`) or a local folder in Hugging Face (`config.json` +
    /// `model.safetensors`) or open_clip (`open_clip_config.json` + weights) layout. Its files
    /// then set both towers, the heads, `logit_scale`, the tokenizer and the preprocessing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pretrained: Option<String>,
    /// Branch, tag or commit of `pretrained` (default `main`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    pub name: String,
    pub image: ImageConfig,
    pub text: TextConfig,
    /// Size of the shared embedding space.
    pub projection_dim: usize,
    /// `mlp` (the tutorial's projection heads) or `linear` (CLIP's bias-free projections).
    pub head: HeadKind,
    /// Dropout inside the projection heads.
    pub head_dropout: f64,
    pub loss: LossKind,
    /// Temperature of the `soft` loss.
    pub temperature: f64,
    pub seed: u64,
    pub train: TrainConfig,
    pub data: DataConfig,
    /// Distillation from a teacher (`stage4-train --teacher`).
    #[serde(skip_serializing_if = "DistillConfig::is_off")]
    pub distill: DistillConfig,
}

/// What a config file's missing keys take: the `tiny` preset's values, which `tiny.toml` spells
/// out (a test keeps the two equal). Written here, not read from the file, because reading any
/// TOML config starts from these defaults.
impl Default for ClipConfig {
    fn default() -> Self {
        Self {
            preset: None,
            pretrained: None,
            revision: None,
            head: HeadKind::Mlp,
            name: "tiny".into(),
            image: ImageConfig::default(),
            text: TextConfig::default(),
            projection_dim: 128,
            head_dropout: 0.1,
            loss: LossKind::Clip,
            temperature: 1.0,
            seed: 42,
            // From scratch, both towers need the heads' learning rate (the tutorial's 1e-4 / 1e-5
            // are for pretrained towers). 16 pairs per batch give enough negatives per step.
            train: TrainConfig {
                batch_size: 16,
                epochs: 40,
                lr_image: 1e-3,
                lr_text: 1e-3,
                lr_head: 1e-3,
                ..TrainConfig::default()
            },
            data: DataConfig {
                max_length: 64,
                ..DataConfig::default()
            },
            distill: DistillConfig::default(),
        }
    }
}

impl ClipConfig {
    /// The number of residual blocks of the image and the text tower (what `--unlocked-layers`
    /// and layer-wise decay count).
    pub fn block_counts(&self) -> (usize, usize) {
        let image = match self.image.arch {
            ImageArch::Vit => self.image.layers,
            ImageArch::Resnet | ImageArch::ClipResnet => self.image.depths.iter().sum(),
        };
        (image, self.text.n_layers)
    }

    /// This config with [`TrainConfig::pretrained_start`]'s training defaults.
    pub fn with_pretrained_start(mut self) -> Self {
        self.train = TrainConfig::pretrained_start();
        self
    }

    /// Checks the shapes fit together before anything is allocated, with a hint for each problem.
    /// Sizes beyond any model's are refused first, before any arithmetic on them (the sizes come
    /// from files, and products of such sizes overflow); then each section checks its own
    /// fields, and then come the checks across sections.
    pub fn validate(&self) -> Result<()> {
        let mut errs = vec![];
        self.image.check_sizes(&mut errs);
        self.text.check_sizes(&mut errs);
        too_large(&mut errs, &[("projection_dim", self.projection_dim)]);
        if let Some(d) = self.distill.teacher_dim {
            too_large(&mut errs, &[("distill.teacher_dim", d)]);
        }
        if !errs.is_empty() {
            bail!("invalid config:\n  - {}", errs.join("\n  - "));
        }
        self.image.validate(&mut errs);
        self.text.validate(&mut errs);
        self.validate_heads(&mut errs);
        self.train.validate(&mut errs);
        self.distill.validate(&mut errs);
        self.data.validate(&mut errs);
        self.cross_errors(&mut errs);
        if !errs.is_empty() {
            bail!("invalid config:\n  - {}", errs.join("\n  - "));
        }
        Ok(())
    }

    /// The checks of this level's own fields: the heads and the loss.
    fn validate_heads(&self, errs: &mut Vec<String>) {
        if self.projection_dim == 0 {
            errs.push("projection_dim must be at least 1".into());
        }
        if !(0.0..1.0).contains(&self.head_dropout) {
            errs.push(format!("head_dropout must be in [0, 1) (got {})", self.head_dropout));
        }
        if self.temperature <= 0.0 {
            errs.push("temperature must be positive".into());
        }
    }

    /// The checks across sections: a clip_resnet tower's pool is its projection, a locked tower
    /// keeps blocks it has, and a teacher embeds a bounded number of augmented views.
    fn cross_errors(&self, errs: &mut Vec<String>) {
        let (i, tr, d) = (&self.image, &self.train, &self.distill);
        if self.head == HeadKind::Linear && i.arch == ImageArch::ClipResnet && i.output_dim != self.projection_dim {
            errs.push(format!(
                "a clip_resnet tower's attention pool gives {} values, but projection_dim is {}",
                i.output_dim, self.projection_dim
            ));
        }
        let blocks = self.block_counts();
        for (lock, n, tower) in [(tr.lock_image, blocks.0, "image"), (tr.lock_text, blocks.1, "text")] {
            if lock && tr.unlocked_layers > n {
                errs.push(format!(
                    "train.unlocked_layers is {} but the {tower} tower has {n} blocks",
                    tr.unlocked_layers
                ));
            }
        }
        if d.teacher.is_some() && self.data.augment && !(1..=64).contains(&d.views) {
            errs.push(format!(
                "distill.views must be from 1 to 64 with augmentation (got {}): the teacher embeds that many crops of every image",
                d.views
            ));
        }
    }

    /// Longest tokenised caption the model accepts.
    pub fn max_tokens(&self) -> usize {
        self.data.max_length.min(self.text.max_position_embeddings)
    }
}
