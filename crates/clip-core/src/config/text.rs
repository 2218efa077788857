//! The text tower's section (`[text]`): its transformer family, shape and pooling.

use serde::{Deserialize, Serialize};

use super::{too_large, too_many_blocks, Activation};

/// Which transformer family the text tower is: the layout and names of its weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TextKind {
    /// Hugging Face `DistilBertModel` (`transformer.layer.N.attention.q_lin`, …).
    Distilbert,
    /// Hugging Face `BertModel` and its family (MiniLM, bert-base-chinese …): token-type
    /// embeddings, `encoder.layer.N.attention.self.query`, …
    Bert,
    /// The CLIP text transformer (OpenAI, open_clip, Hugging Face `CLIPTextModel`): pre-LN
    /// blocks under a causal mask, `final_layer_norm`, pooled at the end-of-text token.
    Clip,
}

/// How the text tower turns token states into one vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    /// The first token ([CLS]), as the tutorial.
    Cls,
    /// The average over real (unpadded) tokens, as sentence-transformers models are trained.
    Mean,
    /// The end-of-text token (CLIP's text transformer): the first `text.eos_token_id`, else the
    /// last real token.
    Eot,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TextConfig {
    /// Start from a pretrained Hugging Face model (`distilbert/distilbert-base-uncased`,
    /// `google-bert/bert-base-chinese`, `org/name@revision`) or a local folder / `.safetensors`
    /// file. Its config.json then sets `kind` and the architecture, and its tokenizer is used.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pretrained: Option<String>,
    /// Branch, tag or commit of `pretrained` (default `main`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    pub kind: TextKind,
    pub pooling: Pooling,
    pub vocab_size: usize,
    pub dim: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    /// Feed-forward width (DistilBERT's `hidden_dim`).
    pub hidden_dim: usize,
    pub max_position_embeddings: usize,
    pub dropout: f64,
    pub attention_dropout: f64,
    pub layer_norm_eps: f64,
    pub activation: Activation,
    /// Rows of BERT's token-type table (only `kind = "bert"` has one).
    pub type_vocab_size: usize,
    /// The end-of-text id `pooling = "eot"` looks for (49407 in OpenAI's vocabulary).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<u32>,
}

impl TextConfig {
    /// The architecture in one line, as stage 1 prints it.
    pub fn describe(&self) -> String {
        let (family, pooled) = match self.kind {
            TextKind::Distilbert => ("DistilBERT (post-LN)", self.pooling),
            TextKind::Bert => ("BERT (post-LN)", self.pooling),
            TextKind::Clip => ("CLIP text transformer (pre-LN, causal)", self.pooling),
        };
        format!(
            "{family}, {} layers × {} wide, {} heads, MLP {}, {}, vocabulary {}, {} positions, pooled at {}",
            self.n_layers,
            self.dim,
            self.n_heads,
            self.hidden_dim,
            self.activation.name(),
            self.vocab_size,
            self.max_position_embeddings,
            match pooled {
                Pooling::Cls => "[CLS]".to_string(),
                Pooling::Mean => "the mean of the tokens".to_string(),
                Pooling::Eot => match self.eos_token_id {
                    Some(e) => format!("the end-of-text token ({e})"),
                    None => "the last token".to_string(),
                },
            }
        )
    }
}

impl Default for TextConfig {
    fn default() -> Self {
        Self {
            pretrained: None,
            revision: None,
            kind: TextKind::Distilbert,
            pooling: Pooling::Cls,
            vocab_size: 2048,
            dim: 128,
            n_layers: 2,
            n_heads: 4,
            hidden_dim: 256,
            max_position_embeddings: 64,
            dropout: 0.1,
            attention_dropout: 0.1,
            layer_norm_eps: 1e-12,
            activation: Activation::Gelu,
            type_vocab_size: 2,
            eos_token_id: None,
        }
    }
}

impl TextConfig {
    /// Sizes beyond any model's: each refused by name, before any arithmetic on them.
    pub(super) fn check_sizes(&self, errs: &mut Vec<String>) {
        too_large(
            errs,
            &[
                ("text.vocab_size", self.vocab_size),
                ("text.dim", self.dim),
                ("text.n_heads", self.n_heads),
                ("text.hidden_dim", self.hidden_dim),
                ("text.max_position_embeddings", self.max_position_embeddings),
                ("text.type_vocab_size", self.type_vocab_size),
            ],
        );
        too_many_blocks(errs, &[("text.n_layers", self.n_layers)]);
    }

    /// The tower's shape checks, with a hint for each problem.
    pub(super) fn validate(&self, errs: &mut Vec<String>) {
        let t = self;
        if t.kind != TextKind::Clip && t.pooling == Pooling::Eot {
            errs.push(
                "text.pooling = \"eot\" is for a clip text tower; a BERT-family tower reads [CLS] or the mean".into(),
            );
        }
        if t.kind == TextKind::Clip && t.pooling != Pooling::Eot {
            errs.push(
                "a clip text tower is causal (a token sees only those before it): use text.pooling = \"eot\"".into(),
            );
        }
        if t.dim == 0 || t.n_heads == 0 || !t.dim.is_multiple_of(t.n_heads) {
            errs.push(format!(
                "text.dim ({}) must be a positive multiple of text.n_heads ({})",
                t.dim, t.n_heads
            ));
        }
        if t.vocab_size < 8 {
            errs.push(format!(
                "text.vocab_size {} is too small (it must hold the special tokens)",
                t.vocab_size
            ));
        }
        if !(t.layer_norm_eps > 0.0 && t.layer_norm_eps < 1.0) {
            errs.push(format!(
                "text.layer_norm_eps must be in (0, 1) (got {})",
                t.layer_norm_eps
            ));
        }
        if t.kind == TextKind::Bert && t.type_vocab_size == 0 {
            errs.push("text.type_vocab_size must be at least 1 for a BERT text tower".into());
        }
        if t.n_layers == 0 || t.hidden_dim == 0 || t.max_position_embeddings < 2 {
            errs.push("text.n_layers, text.hidden_dim must be ≥ 1 and text.max_position_embeddings ≥ 2".into());
        }
        for (name, p) in [
            ("text.dropout", t.dropout),
            ("text.attention_dropout", t.attention_dropout),
        ] {
            if !(0.0..1.0).contains(&p) {
                errs.push(format!("{name} must be in [0, 1) (got {p})"));
            }
        }
    }
}
