//! The CLIP Vision Transformer (OpenAI, open_clip, Hugging Face `CLIPVisionModel`), trainable.
//!
//! Patch convolution without bias (kernel = stride = patch) → the class token **prepended** →
//! the position table added to all grid² + 1 tokens → `pre_layrnorm` → pre-LN blocks →
//! `post_layernorm` → the class token (`tok`) or the mean of the patch tokens (`avg`; open_clip
//! applies the final LayerNorm to every token before pooling). Names as Hugging Face
//! (`embeddings.patch_embedding`, `pre_layrnorm` with its real typo, `encoder.layers.N`).

use anyhow::Result;
use candle_core::{Module, Tensor};

use super::transformer::{AttentionMask, ResidualAttentionBlock};
use crate::config::{ImageConfig, ImagePool};
use crate::nn::{Conv2d, LayerNorm};
use crate::params::{Init, ParamBuilder};

pub struct VisionTransformer {
    patch_embedding: Conv2d,
    class_embedding: Tensor,
    position_embedding: Tensor,
    pre_layrnorm: LayerNorm,
    layers: Vec<ResidualAttentionBlock>,
    post_layernorm: LayerNorm,
    pool: ImagePool,
}

impl VisionTransformer {
    pub fn new(pb: &ParamBuilder, cfg: &ImageConfig) -> Result<Self> {
        let (w, p) = (cfg.width, cfg.patch_size);
        let grid = cfg.image_size / p;
        let e = pb.pp("embeddings");
        let scale = (w as f64).powf(-0.5);
        let encoder = pb.pp("encoder").pp("layers");
        Ok(Self {
            patch_embedding: Conv2d::new(&e.pp("patch_embedding"), 3, w, p, p, 0)?,
            class_embedding: e.param("class_embedding", &[w], Init::Normal { std: scale })?,
            position_embedding: e.pp("position_embedding").param(
                "weight",
                &[grid * grid + 1, w],
                Init::Normal { std: scale },
            )?,
            pre_layrnorm: LayerNorm::new(&pb.pp("pre_layrnorm"), w, cfg.layer_norm_eps)?,
            layers: (0..cfg.layers)
                .map(|i| {
                    ResidualAttentionBlock::new(
                        &encoder.pp(i),
                        w,
                        cfg.heads,
                        cfg.mlp_dim,
                        cfg.activation,
                        cfg.layer_norm_eps,
                    )
                })
                .collect::<Result<_>>()?,
            post_layernorm: LayerNorm::new(&pb.pp("post_layernorm"), w, cfg.layer_norm_eps)?,
            pool: cfg.pool,
        })
    }

    /// Images (B, 3, S, S) → pooled features (B, width).
    pub fn forward(&self, images: &Tensor) -> candle_core::Result<Tensor> {
        let patches = self.patch_embedding.forward(images)?; // (B, W, g, g)
        let (b, w, _, _) = patches.dims4()?;
        let patches = patches.flatten_from(2)?.transpose(1, 2)?; // (B, g², W)
        let cls = crate::nn::param(&self.class_embedding)
            .reshape((1, 1, w))?
            .broadcast_as((b, 1, w))?;
        let x = Tensor::cat(&[&cls, &patches], 1)?.contiguous()?;
        let pos = crate::nn::param(&self.position_embedding);
        if pos.dim(0)? != x.dim(1)? {
            candle_core::bail!(
                "images give {} tokens but the position table has {} rows: feed images of the tower's image_size",
                x.dim(1)?,
                pos.dim(0)?
            )
        }
        let mut x = self.pre_layrnorm.forward(&x.broadcast_add(&pos.unsqueeze(0)?)?)?;
        // Read at the class token, the last block computes that token alone.
        let tok = self.pool == ImagePool::Tok;
        let n = self.layers.len();
        for (i, layer) in self.layers.iter().enumerate() {
            if tok && i + 1 == n {
                let (b, l, _) = x.dims3()?;
                let keys = Tensor::zeros((b, l), candle_core::DType::F32, x.device())?;
                let cls = x.narrow(1, 0, 1)?.contiguous()?;
                x = layer.forward_rows(&x, &cls, &keys)?;
            } else {
                x = layer.forward(&x, &AttentionMask::None)?;
            }
        }
        match self.pool {
            ImagePool::Tok => self
                .post_layernorm
                .forward(&x.narrow(1, 0, 1)?.squeeze(1)?.contiguous()?),
            ImagePool::Avg => {
                let n = x.dim(1)?;
                self.post_layernorm.forward(&x)?.narrow(1, 1, n - 1)?.mean(1)
            }
        }
    }
}
