use anyhow::Result;
use candle_core::{Module, Tensor, D};

use crate::params::{Init, ParamBuilder};

/// LayerNorm over the last dimension, with a backward pass.
///
/// `candle_nn::LayerNorm` uses a fused kernel with no backward: gradients stop there silently.
/// On the CPU this runs our own fused kernel (forward and backward, see `layer_norm_cpu`);
/// elsewhere it is composed from differentiable ops.
///
/// ```
/// use candle_core::{Device, Module, Tensor};
/// use clip_core::nn::LayerNorm;
/// use clip_core::params::{Group, ParamStore};
///
/// let store = ParamStore::new(&Device::Cpu, 0);
/// let ln = LayerNorm::new(&store.root(Group::TextTower, true).pp("ln"), 6, 1e-12)?;
/// let x = Tensor::randn(0f32, 3f32, (2, 5, 6), &Device::Cpu)?;
/// let y = ln.forward(&x)?;
/// // Every row has mean 0 (γ = 1, β = 0 at the start).
/// let mean = y.mean_keepdim(2)?.abs()?.max_all()?.to_scalar::<f32>()?;
/// assert!(mean < 1e-5);
/// let y = (y * &x)?;
/// // Every weight gets a finite, non-zero gradient: the layer has a working backward.
/// let grads = y.sqr()?.sum_all()?.backward()?;
/// for (name, e) in store.entries() {
///     let g = grads.get(e.var.as_tensor()).expect(&name);
///     assert!(g.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0, "{name}");
/// }
/// # Ok::<(), anyhow::Error>(())
/// ```
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
        let (w, b) = (super::param(&self.weight), super::param(&self.bias));
        if super::dispatch::use_cpu_kernel(x) {
            let op = super::layer_norm_cpu::LayerNormOp { eps: self.eps as f32 };
            return x.contiguous()?.apply_op3(&w, &b, op);
        }
        layer_norm_reference(x, &w, &b, self.eps)
    }
}

/// LayerNorm composed from differentiable tensor ops (any device).
pub fn layer_norm_reference(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let xn = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
    xn.broadcast_mul(weight)?.broadcast_add(bias)
}

/// The fused CPU kernel, exposed for tests and benchmarks.
pub fn layer_norm_cpu(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    x.contiguous()?
        .apply_op3(weight, bias, super::layer_norm_cpu::LayerNormOp { eps: eps as f32 })
}
