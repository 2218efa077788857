use anyhow::Result;
use candle_core::{DType, Module, Tensor, D};

use crate::params::{Init, ParamBuilder};

/// LayerNorm over the last dimension, written with differentiable ops.
///
/// `candle_nn::LayerNorm` uses a fused kernel with no backward: gradients stop there silently.
#[derive(Clone, Debug)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn new(pb: &ParamBuilder, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: pb.param("weight", &[dim], Init::Const(1.0))?,
            bias: pb.param("bias", &[dim], Init::Const(0.0))?,
            eps,
        })
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        debug_assert_eq!(x.dtype(), DType::F32);
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        let xn = xc.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        xn.broadcast_mul(&self.weight)?.broadcast_add(&self.bias)
    }
}
