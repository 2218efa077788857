//! The text tower: a post-LayerNorm BERT-family transformer encoder, trainable (LayerNorm and
//! softmax are written with differentiable ops, and dropout is active in training mode only).
//!
//! DistilBERT and BERT compute the same thing (embeddings → LayerNorm → N × [self-attention →
//! add & norm → feed-forward → add & norm]); they differ in the names of their weights, BERT's
//! token-type embeddings, and where dropout sits. One module with a naming [`Scheme`] per family
//! loads either family's Hugging Face weights under their own names:
//!
//! | | DistilBERT (`DistilBertModel`) | BERT (`BertModel`) |
//! | --- | --- | --- |
//! | layers | `transformer.layer.N` | `encoder.layer.N` |
//! | q, k, v | `attention.{q,k,v}_lin` | `attention.self.{query,key,value}` |
//! | attention out | `attention.out_lin` | `attention.output.dense` |
//! | its LayerNorm | `sa_layer_norm` | `attention.output.LayerNorm` |
//! | feed-forward | `ffn.lin1`, `ffn.lin2` | `intermediate.dense`, `output.dense` |
//! | its LayerNorm | `output_layer_norm` | `output.LayerNorm` |
//!
//! The output is the [CLS] state (the tutorial's) or the mean of the unpadded token states
//! (sentence-transformers'), as `text.pooling` says.

use anyhow::Result;
use candle_core::{DType, Module, ModuleT, Tensor};

use super::position::PositionEmbedding;
use crate::config::{Activation, Pooling, TextConfig, TextKind};
use crate::nn::{activation, attention, attention_reference, Dropout, DropoutRng, Embedding, LayerNorm, Linear};
use crate::params::ParamBuilder;

const INIT_STD: f64 = 0.02;

/// Where a family keeps each weight, relative to the encoder (and to a layer). The ONNX writer
/// (`export::onnx::text`) reads the same names.
pub(crate) struct Scheme {
    pub(crate) layers: &'static str,
    pub(crate) query: &'static str,
    pub(crate) key: &'static str,
    pub(crate) value: &'static str,
    pub(crate) attention_out: &'static str,
    pub(crate) attention_norm: &'static str,
    pub(crate) ffn_in: &'static str,
    pub(crate) ffn_out: &'static str,
    pub(crate) output_norm: &'static str,
    pub(crate) token_types: bool,
    /// BERT applies hidden dropout to the attention output before the residual; DistilBERT not.
    attention_output_dropout: bool,
}

const DISTILBERT: Scheme = Scheme {
    layers: "transformer.layer",
    query: "attention.q_lin",
    key: "attention.k_lin",
    value: "attention.v_lin",
    attention_out: "attention.out_lin",
    attention_norm: "sa_layer_norm",
    ffn_in: "ffn.lin1",
    ffn_out: "ffn.lin2",
    output_norm: "output_layer_norm",
    token_types: false,
    attention_output_dropout: false,
};

const BERT: Scheme = Scheme {
    layers: "encoder.layer",
    query: "attention.self.query",
    key: "attention.self.key",
    value: "attention.self.value",
    attention_out: "attention.output.dense",
    attention_norm: "attention.output.LayerNorm",
    ffn_in: "intermediate.dense",
    ffn_out: "output.dense",
    output_norm: "output.LayerNorm",
    token_types: true,
    attention_output_dropout: true,
};

/// The naming scheme of a BERT-family tower (`Clip` has its own module; it answers BERT's).
pub(crate) fn scheme(kind: TextKind) -> &'static Scheme {
    match kind {
        TextKind::Distilbert => &DISTILBERT,
        // The CLIP text transformer is its own module (`ClipTextTransformer`).
        TextKind::Bert | TextKind::Clip => &BERT,
    }
}

struct Attention {
    query: Linear,
    key: Linear,
    value: Linear,
    out: Linear,
    n_heads: usize,
    dropout: Dropout,
}

impl Attention {
    fn new(pb: &ParamBuilder, s: &Scheme, cfg: &TextConfig, rng: &DropoutRng) -> Result<Self> {
        let d = cfg.dim;
        Ok(Self {
            query: Linear::new_normal(&pb.pp(s.query), d, d, INIT_STD)?,
            key: Linear::new_normal(&pb.pp(s.key), d, d, INIT_STD)?,
            value: Linear::new_normal(&pb.pp(s.value), d, d, INIT_STD)?,
            out: Linear::new_normal(&pb.pp(s.attention_out), d, d, INIT_STD)?,
            n_heads: cfg.n_heads,
            dropout: Dropout::new(cfg.attention_dropout, rng),
        })
    }

    /// `mask_bias`: (B, 1, 1, L), 0 for real tokens and a large negative number for padding.
    /// Self-attention of the tokens `rows` (B, Lq, D) over all tokens `x` (B, L, D): `rows` is
    /// `x` itself, or only its first token when only [CLS] is read out.
    fn forward(&self, x: &Tensor, rows: &Tensor, mask_bias: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let (q, k, v) = (self.query.forward(rows)?, self.key.forward(x)?, self.value.forward(x)?);
        let ctx = if train && self.dropout.active() {
            // Dropout on the attention weights sits inside the op: only the composed path has it.
            attention_reference(&q, &k, &v, mask_bias, self.n_heads, |w| {
                self.dropout.forward_t(w, train)
            })?
        } else {
            attention(&q, &k, &v, mask_bias, self.n_heads)?
        };
        self.out.forward(&ctx)
    }
}

struct TransformerBlock {
    attention: Attention,
    attention_norm: LayerNorm,
    ffn_in: Linear,
    ffn_out: Linear,
    output_norm: LayerNorm,
    dropout: Dropout,
    attention_output_dropout: bool,
    activation: Activation,
}

impl TransformerBlock {
    fn new(pb: &ParamBuilder, s: &Scheme, cfg: &TextConfig, rng: &DropoutRng) -> Result<Self> {
        let eps = cfg.layer_norm_eps;
        Ok(Self {
            attention: Attention::new(pb, s, cfg, rng)?,
            attention_norm: LayerNorm::new(&pb.pp(s.attention_norm), cfg.dim, eps)?,
            ffn_in: Linear::new_normal(&pb.pp(s.ffn_in), cfg.dim, cfg.hidden_dim, INIT_STD)?,
            ffn_out: Linear::new_normal(&pb.pp(s.ffn_out), cfg.hidden_dim, cfg.dim, INIT_STD)?,
            output_norm: LayerNorm::new(&pb.pp(s.output_norm), cfg.dim, eps)?,
            dropout: Dropout::new(cfg.dropout, rng),
            attention_output_dropout: s.attention_output_dropout,
            activation: cfg.activation,
        })
    }

    /// The block's output at the tokens `rows` of `x` (all of `x`, or its first token).
    fn forward(&self, x: &Tensor, rows: &Tensor, mask_bias: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let mut sa = self.attention.forward(x, rows, mask_bias, train)?;
        if self.attention_output_dropout {
            sa = self.dropout.forward_t(&sa, train)?;
        }
        let x = self.attention_norm.forward(&(sa + rows)?)?;
        let ff = self
            .ffn_out
            .forward(&activation(&self.ffn_in.forward(&x)?, self.activation)?)?;
        let ff = self.dropout.forward_t(&ff, train)?;
        self.output_norm.forward(&(ff + x)?)
    }
}

/// The text tower: token ids (B, L) + attention mask (B, L) → pooled state (B, dim).
pub struct TextEncoder {
    word_embeddings: Embedding,
    position_embeddings: PositionEmbedding,
    token_type_embeddings: Option<Embedding>,
    layer_norm: LayerNorm,
    dropout: Dropout,
    layers: Vec<TransformerBlock>,
    pooling: Pooling,
}

impl TextEncoder {
    pub fn new(pb: &ParamBuilder, cfg: &TextConfig, rng: &DropoutRng) -> Result<Self> {
        let s = scheme(cfg.kind);
        let e = pb.pp("embeddings");
        let t = pb.pp(s.layers);
        Ok(Self {
            word_embeddings: Embedding::new(&e.pp("word_embeddings"), cfg.vocab_size, cfg.dim, INIT_STD)?,
            position_embeddings: PositionEmbedding::new(
                &e.pp("position_embeddings"),
                cfg.max_position_embeddings,
                cfg.dim,
                INIT_STD,
            )?,
            token_type_embeddings: if s.token_types {
                Some(Embedding::new(
                    &e.pp("token_type_embeddings"),
                    cfg.type_vocab_size,
                    cfg.dim,
                    INIT_STD,
                )?)
            } else {
                None
            },
            layer_norm: LayerNorm::new(&e.pp("LayerNorm"), cfg.dim, cfg.layer_norm_eps)?,
            dropout: Dropout::new(cfg.dropout, rng),
            layers: (0..cfg.n_layers)
                .map(|i| TransformerBlock::new(&t.pp(i), s, cfg, rng))
                .collect::<Result<_>>()?,
            pooling: cfg.pooling,
        })
    }

    /// The last layer's token states (B, L, dim), as Hugging Face's `last_hidden_state`.
    pub fn hidden_states(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        train: bool,
    ) -> candle_core::Result<Tensor> {
        self.run(input_ids, attention_mask, train, false)
    }

    /// Every token's last hidden state, or with `cls_only` just the first token's (B, 1, D): the
    /// last layer then computes its queries, attention output and feed-forward for [CLS] alone,
    /// since nothing reads the other tokens' outputs (a sixth of DistilBERT's work).
    fn run(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        train: bool,
        cls_only: bool,
    ) -> candle_core::Result<Tensor> {
        let (b, l) = input_ids.dims2()?;
        // Positions first: a caption longer than the table is refused before anything else.
        let pos = self.position_embeddings.forward(input_ids)?;
        let dev = input_ids.device();
        let mut x = (self.word_embeddings.forward(input_ids)? + pos)?;
        if let Some(tt) = &self.token_type_embeddings {
            // One segment: every token has type 0.
            x = (x + tt.forward(&Tensor::zeros((b, l), DType::U32, dev)?)?)?;
        }
        let mut x = self.dropout.forward_t(&self.layer_norm.forward(&x)?, train)?;
        // 0 where attended, −1e9 where padded.
        let mask_bias = ((attention_mask.to_dtype(DType::F32)? - 1.0)? * 1e9)?;
        let last = self.layers.len().saturating_sub(1);
        for (i, layer) in self.layers.iter().enumerate() {
            let rows = if cls_only && i == last {
                x.narrow(1, 0, 1)?.contiguous()?
            } else {
                x.clone()
            };
            x = layer.forward(&x, &rows, &mask_bias, train)?;
        }
        if cls_only {
            x = x.narrow(1, 0, 1)?;
        }
        Ok(x)
    }

    pub fn forward(&self, input_ids: &Tensor, attention_mask: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        match self.pooling {
            // [CLS]; contiguous because CUDA's matmul rejects this strided slice.
            // The config refuses `eot` for a BERT tower, which has no end-of-text token.
            Pooling::Cls | Pooling::Eot => self
                .run(input_ids, attention_mask, train, true)?
                .squeeze(1)?
                .contiguous(),
            Pooling::Mean => {
                let x = self.hidden_states(input_ids, attention_mask, train)?;
                let m = attention_mask.to_dtype(DType::F32)?.unsqueeze(2)?;
                let sum = x.broadcast_mul(&m)?.sum(1)?;
                let count = m.sum(1)?.clamp(1e-9f64, f64::MAX)?;
                sum.broadcast_div(&count)
            }
        }
    }
}
