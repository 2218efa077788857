use anyhow::Result;
use candle_core::{Module, Tensor};

use crate::params::{Init, ParamBuilder};

/// `nn.Linear`: weight (out, in), bias (out).
///
/// ```
/// use candle_core::{Device, Module, Tensor};
/// use clip_core::nn::Linear;
/// use clip_core::params::{Group, ParamStore};
///
/// let store = ParamStore::new(&Device::Cpu, 0);
/// let layer = Linear::new(&store.root(Group::Heads, true).pp("proj"), 4, 2)?;
/// let x = Tensor::randn(0f32, 1f32, (3, 4), &Device::Cpu)?;
/// let y = layer.forward(&x)?;
/// assert_eq!(y.dims(), [3, 2]);
/// // Every weight gets a finite, non-zero gradient: the layer has a working backward.
/// let grads = y.sqr()?.sum_all()?.backward()?;
/// for (name, e) in store.entries() {
///     let g = grads.get(e.var.as_tensor()).expect(&name);
///     assert!(g.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0, "{name}");
/// }
/// # Ok::<(), anyhow::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct Linear {
    weight: Tensor,
    bias: Tensor,
}

impl Linear {
    /// PyTorch's default initialisation: U(-1/√in, 1/√in) for weight and bias.
    pub fn new(pb: &ParamBuilder, d_in: usize, d_out: usize) -> Result<Self> {
        let bound = 1.0 / (d_in as f64).sqrt();
        Ok(Self {
            weight: pb.param("weight", &[d_out, d_in], Init::Uniform { bound })?,
            bias: pb.param("bias", &[d_out], Init::Uniform { bound })?,
        })
    }

    /// A bias-free projection (CLIP's `visual_projection`, `text_projection`): `weight` (out, in)
    /// and a constant zero bias that is no parameter (so the fused kernels still apply).
    pub fn bias_free(weight: Tensor) -> candle_core::Result<Self> {
        let bias = Tensor::zeros(weight.dim(0)?, weight.dtype(), weight.device())?;
        Ok(Self { weight, bias })
    }

    /// BERT's initialisation: N(0, std) weight, zero bias.
    pub fn new_normal(pb: &ParamBuilder, d_in: usize, d_out: usize, std: f64) -> Result<Self> {
        Ok(Self {
            weight: pb.param("weight", &[d_out, d_in], Init::Normal { std })?,
            bias: pb.param("bias", &[d_out], Init::Const(0.0))?,
        })
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (w, b) = (super::param(&self.weight), super::param(&self.bias));
        if super::dispatch::use_cpu_kernel(x) {
            // Inside `no_grad` the weight is transposed once for the whole scope: read in place
            // it is a column-major GEMM operand, which the `gemm` crate packs slowly.
            if let Some(scope) = super::pool::prepared() {
                let (d_out, d_in) = w.dims2()?;
                let rows = x.elem_count() / d_in.max(1);
                if super::precision::bf16_gemm(rows, d_out, d_in) {
                    // bf16: the weight packed for the AMX GEMM once for the scope, read from W
                    // in place (its rows are Wᵀ's columns): no transposed f32 copy.
                    let packed = scope.packed_or(self.weight.id(), || {
                        super::dispatch::with_host_f32(&w, |data| {
                            // SAFETY: W is (out, in) row-major, so Wᵀ (in, out) is (1, in) strided.
                            unsafe {
                                super::bf16::PackedB::new(super::bf16::MatRef::new(data.as_ptr(), 1, d_in), d_in, d_out)
                            }
                        })
                        .flatten()
                    });
                    if let Some(packed) = packed {
                        let op = super::linear_cpu::LinearOp {
                            transposed: false,
                            packed: Some(packed),
                        };
                        return apply(x, &w, &b, op);
                    }
                }
                let wt = scope.get_or(self.weight.id(), || transposed(&w))?;
                let op = super::linear_cpu::LinearOp {
                    transposed: true,
                    packed: None,
                };
                return apply(x, &wt, &b, op);
            }
            return linear_cpu(x, &w, &b);
        }
        linear_reference(x, &w, &b)
    }
}

/// x (…, in) · Wᵀ + b composed from candle ops (any device).
pub fn linear_reference(x: &Tensor, w: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    // CUDA's matmul rejects some strided operands (e.g. a CLS slice): make them contiguous.
    let x = x.contiguous()?;
    let w = w.t()?;
    let y = match x.dims() {
        [b, l, d] => x.reshape((b * l, *d))?.matmul(&w)?.reshape((*b, *l, ()))?,
        _ => x.matmul(&w)?,
    };
    y.broadcast_add(b)
}

/// Wᵀ (in, out) of a weight W (out, in), as a new tensor.
fn transposed(w: &Tensor) -> candle_core::Result<Tensor> {
    let (d_out, d_in) = w.dims2()?;
    let data = w.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
    Tensor::from_vec(
        super::linear_cpu::transpose(d_out, d_in, &data),
        (d_in, d_out),
        w.device(),
    )
}

/// The fused CPU kernel (see `linear_cpu`), for inputs (N, in) or (B, L, in).
pub fn linear_cpu(x: &Tensor, w: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    let op = super::linear_cpu::LinearOp {
        transposed: false,
        packed: None,
    };
    apply(x, w, b, op)
}

fn apply(x: &Tensor, w: &Tensor, b: &Tensor, op: super::linear_cpu::LinearOp) -> candle_core::Result<Tensor> {
    match x.dims() {
        &[bs, l, d] => x
            .contiguous()?
            .reshape((bs * l, d))?
            .apply_op3(&w.contiguous()?, &b.contiguous()?, op)?
            .reshape((bs, l, ())),
        _ => x.contiguous()?.apply_op3(&w.contiguous()?, &b.contiguous()?, op),
    }
}

/// `nn.Embedding`: a lookup table whose rows get gradients through `index_select`.
///
/// ```
/// use candle_core::{Device, Module, Tensor};
/// use clip_core::nn::Embedding;
/// use clip_core::params::{Group, ParamStore};
///
/// let store = ParamStore::new(&Device::Cpu, 0);
/// let table = Embedding::new(&store.root(Group::TextTower, true).pp("tokens"), 10, 4, 0.02)?;
/// let ids = Tensor::new(&[[1u32, 3, 3], [0, 9, 2]], &Device::Cpu)?;
/// let y = table.forward(&ids)?;
/// assert_eq!(y.dims(), [2, 3, 4]);
/// // Every weight gets a finite, non-zero gradient: the layer has a working backward.
/// let grads = y.sqr()?.sum_all()?.backward()?;
/// for (name, e) in store.entries() {
///     let g = grads.get(e.var.as_tensor()).expect(&name);
///     assert!(g.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0, "{name}");
/// }
/// # Ok::<(), anyhow::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct Embedding {
    weight: Tensor,
    dim: usize,
}

impl Embedding {
    pub fn new(pb: &ParamBuilder, n: usize, dim: usize, std: f64) -> Result<Self> {
        Ok(Self {
            weight: pb.param("weight", &[n, dim], Init::Normal { std })?,
            dim,
        })
    }
}

impl Module for Embedding {
    fn forward(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let mut shape = ids.dims().to_vec();
        shape.push(self.dim);
        super::param(&self.weight)
            .index_select(&ids.flatten_all()?, 0)?
            .reshape(shape)
    }
}
