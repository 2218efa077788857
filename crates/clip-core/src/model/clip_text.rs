//! The CLIP text transformer (OpenAI, open_clip, Hugging Face `CLIPTextModel`), trainable.
//!
//! Token + position embeddings → pre-LN blocks under an additive **causal** mask (a token sees
//! itself and those before it) → `final_layer_norm` → the state at the end-of-text token. Since
//! no token sees a later one, the pads after the end-of-text token change nothing, so captions
//! need not be padded to the checkpoint's 77 positions. Names as Hugging Face
//! (`embeddings.token_embedding`, `encoder.layers.N`, `final_layer_norm`).

use anyhow::Result;
use candle_core::{DType, Module, Tensor};

use super::position::PositionEmbedding;
use super::transformer::{AttentionMask, ResidualAttentionBlock};
use crate::config::TextConfig;
use crate::nn::{Embedding, LayerNorm};
use crate::params::ParamBuilder;

pub struct ClipTextTransformer {
    token_embedding: Embedding,
    position_embedding: PositionEmbedding,
    layers: Vec<ResidualAttentionBlock>,
    final_layer_norm: LayerNorm,
    eos_token_id: Option<u32>,
}

/// Where each caption is read out: its first end-of-text token (`eos`), else its last real
/// token (a caption cut without one). Hugging Face's rule, which equals OpenAI's `argmax(ids)`
/// whenever the end-of-text id is the largest id.
pub fn eot_positions(ids: &[Vec<u32>], mask: &[Vec<u32>], eos: Option<u32>) -> Vec<usize> {
    ids.iter()
        .zip(mask)
        .map(|(row, m)| {
            let last_real = m.iter().rposition(|&v| v != 0).unwrap_or(0);
            let first_eos = eos.and_then(|e| row.iter().zip(m).position(|(&t, &v)| t == e && v != 0));
            first_eos.unwrap_or(last_real)
        })
        .collect()
}

impl ClipTextTransformer {
    pub fn new(pb: &ParamBuilder, cfg: &TextConfig) -> Result<Self> {
        let e = pb.pp("embeddings");
        let encoder = pb.pp("encoder").pp("layers");
        Ok(Self {
            token_embedding: Embedding::new(&e.pp("token_embedding"), cfg.vocab_size, cfg.dim, 0.02)?,
            position_embedding: PositionEmbedding::new(
                &e.pp("position_embedding"),
                cfg.max_position_embeddings,
                cfg.dim,
                0.01,
            )?,
            layers: (0..cfg.n_layers)
                .map(|i| {
                    ResidualAttentionBlock::new(
                        &encoder.pp(i),
                        cfg.dim,
                        cfg.n_heads,
                        cfg.hidden_dim,
                        cfg.activation,
                        cfg.layer_norm_eps,
                    )
                })
                .collect::<Result<_>>()?,
            final_layer_norm: LayerNorm::new(&pb.pp("final_layer_norm"), cfg.dim, cfg.layer_norm_eps)?,
            eos_token_id: cfg.eos_token_id,
        })
    }

    /// Every token's final state (B, L, dim), after `final_layer_norm`.
    pub fn hidden_states(&self, input_ids: &Tensor, attention_mask: &Tensor) -> candle_core::Result<Tensor> {
        let (mut x, mask) = self.embed(input_ids, attention_mask)?;
        for layer in &self.layers {
            x = layer.forward(&x, &mask)?;
        }
        self.final_layer_norm.forward(&x)
    }

    /// Token plus position embeddings (B, L, dim), and the causal mask with padded keys masked.
    fn embed(&self, input_ids: &Tensor, attention_mask: &Tensor) -> candle_core::Result<(Tensor, AttentionMask)> {
        // Positions first: a caption longer than the table is refused before anything else.
        let pos = self.position_embedding.forward(input_ids)?;
        let x = (self.token_embedding.forward(input_ids)? + pos)?;
        // 0 where attended, −1e9 where padded.
        let keys = ((attention_mask.to_dtype(DType::F32)? - 1.0)? * 1e9)?;
        Ok((x, AttentionMask::Causal(keys)))
    }

    /// Token ids and mask (B, L) → the state at each caption's end-of-text token (B, dim). Only
    /// that token is read, so the last block computes it alone: its query attends over the
    /// tokens up to it (the causal mask, as a key mask for that one row).
    pub fn forward(&self, input_ids: &Tensor, attention_mask: &Tensor) -> candle_core::Result<Tensor> {
        let (b, l) = input_ids.dims2()?;
        let ids = input_ids.to_vec2::<u32>()?;
        let mask = attention_mask.to_dtype(DType::U32)?.to_vec2::<u32>()?;
        let at = eot_positions(&ids, &mask, self.eos_token_id);
        let (mut x, causal) = self.embed(input_ids, attention_mask)?;
        let n = self.layers.len();
        for layer in &self.layers[..n.saturating_sub(1)] {
            x = layer.forward(&x, &causal)?;
        }
        let rows = Tensor::from_vec(
            at.iter()
                .enumerate()
                .map(|(i, &p)| (i * l + p) as u32)
                .collect::<Vec<_>>(),
            b,
            x.device(),
        )?;
        let d = x.dim(2)?;
        let pooled = x.reshape((b * l, d))?.index_select(&rows, 0)?;
        let Some(last) = self.layers.last() else {
            return self.final_layer_norm.forward(&pooled);
        };
        // The pooled row sees the real tokens up to its own position.
        let seen: Vec<f32> = at
            .iter()
            .zip(&mask)
            .flat_map(|(&p, m)| (0..l).map(move |j| if j <= p && m[j] != 0 { 0.0 } else { -1e9 }))
            .collect();
        let seen = Tensor::from_vec(seen, (b, l), x.device())?;
        let out = last.forward_rows(&x, &pooled.unsqueeze(1)?, &seen)?;
        self.final_layer_norm.forward(&out.squeeze(1)?)
    }
}
