//! DistilBERT with Hugging Face `DistilBertModel` parameter names (`embeddings.word_embeddings`,
//! `transformer.layer.0.attention.q_lin`, …), trainable: LayerNorm and softmax are written with
//! differentiable ops, and dropout is active in training mode only. The tower's output is the
//! hidden state of token 0 ([CLS]), as the tutorial's text encoder takes it.

use anyhow::Result;
use candle_core::{DType, Module, ModuleT, Tensor};

use crate::config::TextConfig;
use crate::nn::{gelu, softmax_last_dim, Dropout, DropoutRng, Embedding, LayerNorm, Linear};
use crate::params::ParamBuilder;

const INIT_STD: f64 = 0.02;

struct Attention {
    q_lin: Linear,
    k_lin: Linear,
    v_lin: Linear,
    out_lin: Linear,
    n_heads: usize,
    dropout: Dropout,
}

impl Attention {
    fn new(pb: &ParamBuilder, cfg: &TextConfig, rng: &DropoutRng) -> Result<Self> {
        let d = cfg.dim;
        Ok(Self {
            q_lin: Linear::new_normal(&pb.pp("q_lin"), d, d, INIT_STD)?,
            k_lin: Linear::new_normal(&pb.pp("k_lin"), d, d, INIT_STD)?,
            v_lin: Linear::new_normal(&pb.pp("v_lin"), d, d, INIT_STD)?,
            out_lin: Linear::new_normal(&pb.pp("out_lin"), d, d, INIT_STD)?,
            n_heads: cfg.n_heads,
            dropout: Dropout::new(cfg.attention_dropout, rng),
        })
    }

    /// `mask_bias`: (B, 1, 1, L), 0 for real tokens and a large negative number for padding.
    fn forward(&self, x: &Tensor, mask_bias: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let (b, l, d) = x.dims3()?;
        let dh = d / self.n_heads;
        let heads = |t: Tensor| t.reshape((b, l, self.n_heads, dh))?.transpose(1, 2)?.contiguous();
        let q = (heads(self.q_lin.forward(x)?)? / (dh as f64).sqrt())?;
        let k = heads(self.k_lin.forward(x)?)?;
        let v = heads(self.v_lin.forward(x)?)?;
        let scores = q.matmul(&k.t()?.contiguous()?)?.broadcast_add(mask_bias)?;
        // Ours, not candle's `softmax_last_dim`: that kernel has no backward.
        let weights = softmax_last_dim(&scores)?;
        let weights = self.dropout.forward_t(&weights, train)?;
        let ctx = weights.matmul(&v)?.transpose(1, 2)?.reshape((b, l, d))?;
        self.out_lin.forward(&ctx)
    }
}

struct TransformerBlock {
    attention: Attention,
    sa_layer_norm: LayerNorm,
    lin1: Linear,
    lin2: Linear,
    output_layer_norm: LayerNorm,
    dropout: Dropout,
}

impl TransformerBlock {
    fn new(pb: &ParamBuilder, cfg: &TextConfig, rng: &DropoutRng) -> Result<Self> {
        Ok(Self {
            attention: Attention::new(&pb.pp("attention"), cfg, rng)?,
            sa_layer_norm: LayerNorm::new(&pb.pp("sa_layer_norm"), cfg.dim, 1e-12)?,
            lin1: Linear::new_normal(&pb.pp("ffn").pp("lin1"), cfg.dim, cfg.hidden_dim, INIT_STD)?,
            lin2: Linear::new_normal(&pb.pp("ffn").pp("lin2"), cfg.hidden_dim, cfg.dim, INIT_STD)?,
            output_layer_norm: LayerNorm::new(&pb.pp("output_layer_norm"), cfg.dim, 1e-12)?,
            dropout: Dropout::new(cfg.dropout, rng),
        })
    }

    fn forward(&self, x: &Tensor, mask_bias: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let sa = self.attention.forward(x, mask_bias, train)?;
        let x = self.sa_layer_norm.forward(&(sa + x)?)?;
        let ff = self.lin2.forward(&gelu(&self.lin1.forward(&x)?)?)?;
        let ff = self.dropout.forward_t(&ff, train)?;
        self.output_layer_norm.forward(&(ff + x)?)
    }
}

/// The text tower: token ids (B, L) + attention mask (B, L) → [CLS] hidden state (B, dim).
pub struct DistilBert {
    word_embeddings: Embedding,
    position_embeddings: Embedding,
    layer_norm: LayerNorm,
    dropout: Dropout,
    layers: Vec<TransformerBlock>,
    max_positions: usize,
}

impl DistilBert {
    pub fn new(pb: &ParamBuilder, cfg: &TextConfig, rng: &DropoutRng) -> Result<Self> {
        let e = pb.pp("embeddings");
        let t = pb.pp("transformer").pp("layer");
        Ok(Self {
            word_embeddings: Embedding::new(&e.pp("word_embeddings"), cfg.vocab_size, cfg.dim, INIT_STD)?,
            position_embeddings: Embedding::new(
                &e.pp("position_embeddings"),
                cfg.max_position_embeddings,
                cfg.dim,
                INIT_STD,
            )?,
            layer_norm: LayerNorm::new(&e.pp("LayerNorm"), cfg.dim, 1e-12)?,
            dropout: Dropout::new(cfg.dropout, rng),
            layers: (0..cfg.n_layers)
                .map(|i| TransformerBlock::new(&t.pp(i), cfg, rng))
                .collect::<Result<_>>()?,
            max_positions: cfg.max_position_embeddings,
        })
    }

    pub fn forward(&self, input_ids: &Tensor, attention_mask: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let (b, l) = input_ids.dims2()?;
        if l > self.max_positions {
            candle_core::bail!(
                "captions of {l} tokens exceed the text tower's {} positions: lower data.max_length",
                self.max_positions
            )
        }
        let dev = input_ids.device();
        let pos = Tensor::arange(0u32, l as u32, dev)?
            .unsqueeze(0)?
            .broadcast_as((b, l))?
            .contiguous()?;
        let x = (self.word_embeddings.forward(input_ids)? + self.position_embeddings.forward(&pos)?)?;
        let mut x = self.dropout.forward_t(&self.layer_norm.forward(&x)?, train)?;
        // 0 where attended, −1e9 where padded.
        let mask_bias = ((attention_mask.to_dtype(DType::F32)? - 1.0)? * 1e9)?.reshape((b, 1, 1, l))?;
        for layer in &self.layers {
            x = layer.forward(&x, &mask_bias, train)?;
        }
        // [CLS]; contiguous because CUDA's matmul rejects this strided slice.
        x.narrow(1, 0, 1)?.squeeze(1)?.contiguous()
    }
}
