//! The architectures a tower can have, behind one type per tower, and the two kinds of head.

use anyhow::Result;
use candle_core::{ModuleT, Tensor};

use super::{ClipTextTransformer, ModifiedResNet, ProjectionHead, ResNet, TextEncoder, VisionTransformer};
use crate::config::{HeadKind, ImageArch, TextConfig, TextKind};
use crate::nn::{DropoutRng, Linear};
use crate::params::{Init, ParamBuilder};

/// The image tower: images (B, 3, S, S), normalised → pooled features (B, feature_dim).
pub enum ImageTower {
    ResNet(ResNet),
    Vit(VisionTransformer),
    ClipResNet(ModifiedResNet),
}

impl ImageTower {
    pub fn new(pb: &ParamBuilder, cfg: &crate::config::ImageConfig) -> Result<Self> {
        Ok(match cfg.arch {
            ImageArch::Resnet => Self::ResNet(ResNet::new(pb, cfg)?),
            ImageArch::Vit => Self::Vit(VisionTransformer::new(pb, cfg)?),
            ImageArch::ClipResnet => Self::ClipResNet(ModifiedResNet::new(pb, cfg)?),
        })
    }
}

impl ModuleT for ImageTower {
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        match self {
            Self::ResNet(m) => m.forward_t(x, train),
            // A ViT has no dropout nor batch statistics: training and evaluation are one pass.
            Self::Vit(m) => m.forward(x),
            Self::ClipResNet(m) => m.forward_t(x, train),
        }
    }
}

/// The text tower: token ids and attention mask (B, L) → pooled features (B, dim).
pub enum TextTower {
    Bert(TextEncoder),
    Clip(ClipTextTransformer),
}

impl TextTower {
    pub fn new(pb: &ParamBuilder, cfg: &TextConfig, rng: &DropoutRng) -> Result<Self> {
        Ok(match cfg.kind {
            TextKind::Distilbert | TextKind::Bert => Self::Bert(TextEncoder::new(pb, cfg, rng)?),
            TextKind::Clip => Self::Clip(ClipTextTransformer::new(pb, cfg)?),
        })
    }

    /// Every token's last hidden state (B, L, dim), as Hugging Face's `last_hidden_state`.
    pub fn hidden_states(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        train: bool,
    ) -> candle_core::Result<Tensor> {
        match self {
            Self::Bert(m) => m.hidden_states(input_ids, attention_mask, train),
            Self::Clip(m) => m.hidden_states(input_ids, attention_mask),
        }
    }

    pub fn forward(&self, input_ids: &Tensor, attention_mask: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        match self {
            Self::Bert(m) => m.forward(input_ids, attention_mask, train),
            Self::Clip(m) => m.forward(input_ids, attention_mask),
        }
    }
}

/// Pooled features → the shared embedding.
pub enum Head {
    /// The tutorial's projection head.
    Mlp(ProjectionHead),
    /// CLIP's bias-free projection matrix (P, D), as Hugging Face stores it.
    Linear(Linear),
    /// Nothing: the tower already ends in the embedding (a `clip_resnet`'s attention pool).
    Identity,
}

impl Head {
    pub fn new(
        pb: &ParamBuilder,
        kind: HeadKind,
        d_in: usize,
        d_out: usize,
        dropout: f64,
        rng: &DropoutRng,
    ) -> Result<Self> {
        Ok(match kind {
            HeadKind::Mlp => Self::Mlp(ProjectionHead::new(pb, d_in, d_out, dropout, rng)?),
            HeadKind::Linear => Self::Linear(Linear::bias_free(pb.param(
                "weight",
                &[d_out, d_in],
                Init::Normal {
                    std: (d_in as f64).powf(-0.5),
                },
            )?)?),
        })
    }
}

impl ModuleT for Head {
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        match self {
            Self::Mlp(h) => h.forward_t(x, train),
            Self::Linear(l) => candle_core::Module::forward(l, x),
            Self::Identity => Ok(x.clone()),
        }
    }
}
