//! CLIP's pre-LayerNorm residual attention block, shared by the Vision Transformer and the CLIP
//! text transformer. Hugging Face's names (`layer_norm1`, `self_attn.{q,k,v,out}_proj`,
//! `layer_norm2`, `mlp.fc1`, `mlp.fc2`); open_clip's fused `attn.in_proj_weight` is split into
//! q, k, v (in that order) when a checkpoint is read.

use anyhow::Result;
use candle_core::{Module, Tensor};

use crate::config::Activation;
use crate::nn::{activation, attention, attention_causal, LayerNorm, Linear};
use crate::params::ParamBuilder;

const INIT_STD: f64 = 0.02;

/// What a block's attention may not look at.
pub enum AttentionMask {
    /// Every token sees every token (a ViT).
    None,
    /// A token sees itself and those before it, except padded keys: the key mask (B, L), 0 where
    /// attended and −1e9 where padded (the text transformer).
    Causal(Tensor),
}

/// `x + out(attn(ln1 x))`, then `x + fc2(act(fc1(ln2 x)))`.
pub struct ResidualAttentionBlock {
    layer_norm1: LayerNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    heads: usize,
    activation: Activation,
}

impl ResidualAttentionBlock {
    pub fn new(pb: &ParamBuilder, width: usize, heads: usize, mlp: usize, act: Activation, eps: f64) -> Result<Self> {
        let a = pb.pp("self_attn");
        let lin = |name: &str, i, o| Linear::new_normal(&a.pp(name), i, o, INIT_STD);
        Ok(Self {
            layer_norm1: LayerNorm::new(&pb.pp("layer_norm1"), width, eps)?,
            q_proj: lin("q_proj", width, width)?,
            k_proj: lin("k_proj", width, width)?,
            v_proj: lin("v_proj", width, width)?,
            out_proj: lin("out_proj", width, width)?,
            layer_norm2: LayerNorm::new(&pb.pp("layer_norm2"), width, eps)?,
            fc1: Linear::new_normal(&pb.pp("mlp").pp("fc1"), width, mlp, INIT_STD)?,
            fc2: Linear::new_normal(&pb.pp("mlp").pp("fc2"), mlp, width, INIT_STD)?,
            heads,
            activation: act,
        })
    }

    /// The block's output at one token per item only, `rows` (B, 1, W), attending over all of `x`
    /// (B, L, W) through `keys` (B, L): 0 where seen, −1e9 where not. A tower read at one token
    /// (the class token, the end-of-text token) needs no more of its last block: the other
    /// tokens' queries, attention outputs and feed-forward passes are skipped (a twelfth of a
    /// 12-block tower's work).
    pub fn forward_rows(&self, x: &Tensor, rows: &Tensor, keys: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.layer_norm1.forward(x)?;
        let q = self.q_proj.forward(&self.layer_norm1.forward(rows)?)?;
        let (k, v) = (self.k_proj.forward(&h)?, self.v_proj.forward(&h)?);
        let ctx = attention(&q, &k, &v, keys, self.heads)?;
        let x = (rows + self.out_proj.forward(&ctx)?)?;
        let h = self.layer_norm2.forward(&x)?;
        let ff = self
            .fc2
            .forward(&activation(&self.fc1.forward(&h)?, self.activation)?)?;
        x + ff
    }

    /// x (B, L, W) → (B, L, W).
    pub fn forward(&self, x: &Tensor, mask: &AttentionMask) -> candle_core::Result<Tensor> {
        let h = self.layer_norm1.forward(x)?;
        let (q, k, v) = (
            self.q_proj.forward(&h)?,
            self.k_proj.forward(&h)?,
            self.v_proj.forward(&h)?,
        );
        let ctx = match mask {
            AttentionMask::None => {
                let (b, l, _) = x.dims3()?;
                let keys = Tensor::zeros((b, l), candle_core::DType::F32, x.device())?;
                attention(&q, &k, &v, &keys, self.heads)?
            }
            AttentionMask::Causal(keys) => attention_causal(&q, &k, &v, keys, self.heads)?,
        };
        let x = (x + self.out_proj.forward(&ctx)?)?;
        let h = self.layer_norm2.forward(&x)?;
        let ff = self
            .fc2
            .forward(&activation(&self.fc1.forward(&h)?, self.activation)?)?;
        x + ff
    }
}
