//! The precision of the GEMMs, a training knob (`train.precision`, `--precision`).

use serde::{Deserialize, Serialize};

/// The precision of the GEMMs (`--precision`, config `train.precision`); `nn::precision` applies it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// fp32 operands and accumulation (the default).
    #[default]
    Fp32,
    /// bf16 operands, fp32 accumulation, fp32 everywhere else (mixed precision).
    Bf16,
}

impl Precision {
    pub fn name(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Bf16 => "bf16",
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Precision {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "fp32" | "f32" | "float32" => Ok(Precision::Fp32),
            "bf16" | "bfloat16" => Ok(Precision::Bf16),
            other => anyhow::bail!("unknown precision {other:?}: name fp32 or bf16"),
        }
    }
}
