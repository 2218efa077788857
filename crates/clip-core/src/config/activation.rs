//! The feed-forward activation both towers name.

use serde::{Deserialize, Serialize};

/// The feed-forward activation (Hugging Face's `hidden_act` / `activation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// Exact (erf) GELU.
    Gelu,
    /// The tanh approximation (`gelu_new`, `gelu_pytorch_tanh`).
    #[serde(alias = "gelu_pytorch_tanh")]
    GeluNew,
    Relu,
    /// x·σ(1.702x), OpenAI CLIP's approximation (open_clip's `quick_gelu`).
    QuickGelu,
}

impl Activation {
    pub fn name(self) -> &'static str {
        match self {
            Activation::Gelu => "GELU (erf)",
            Activation::GeluNew => "GELU (tanh)",
            Activation::Relu => "ReLU",
            Activation::QuickGelu => "QuickGELU",
        }
    }
}
