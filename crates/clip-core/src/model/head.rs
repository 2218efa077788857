use anyhow::Result;
use candle_core::{Module, ModuleT, Tensor};

use crate::nn::{gelu, Dropout, DropoutRng, LayerNorm, Linear};
use crate::params::ParamBuilder;

/// The tutorial's projection head: Linear(d→P) → GELU → Linear(P→P) → Dropout → + residual →
/// LayerNorm. Names as the tutorial: `projection`, `fc`, `layer_norm`.
pub struct ProjectionHead {
    projection: Linear,
    fc: Linear,
    dropout: Dropout,
    layer_norm: LayerNorm,
}

impl ProjectionHead {
    pub fn new(pb: &ParamBuilder, d_in: usize, d_out: usize, dropout: f64, rng: &DropoutRng) -> Result<Self> {
        Ok(Self {
            projection: Linear::new(&pb.pp("projection"), d_in, d_out)?,
            fc: Linear::new(&pb.pp("fc"), d_out, d_out)?,
            dropout: Dropout::new(dropout, rng),
            layer_norm: LayerNorm::new(&pb.pp("layer_norm"), d_out, 1e-5)?,
        })
    }
}

impl ModuleT for ProjectionHead {
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let projected = self.projection.forward(x)?;
        let h = self.fc.forward(&gelu(&projected)?)?;
        let h = self.dropout.forward_t(&h, train)?;
        self.layer_norm.forward(&(h + projected)?)
    }
}
