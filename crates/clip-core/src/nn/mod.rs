//! Trainable building blocks. Each one keeps the PyTorch parameter names and has a backward pass
//! through every op (candle 0.11's fused LayerNorm, `softmax_last_dim` and strided max-pool do not).
//!
//! Ops with a fused CPU kernel (`*_cpu` modules, each with its own backward) choose it or the
//! composed candle path in one place, [`dispatch::use_cpu_kernel`]; each also exposes both paths
//! (`*_cpu` and `*_reference`) so tests can compare them.

mod attention_cpu;
mod batch_norm;
mod batch_norm_cpu;
pub mod bf16;
mod conv;
mod conv_cpu;
pub mod dispatch;
mod dropout;
mod gelu_cpu;
mod layer_norm;
mod layer_norm_cpu;
mod linear;
mod linear_cpu;
mod max_pool;
mod max_pool_cpu;
pub mod normalize;
mod pool;
pub mod precision;
mod relu_cpu;
mod softmax_cpu;
pub mod vmath;

pub use batch_norm::{
    batch_norm_eval_cpu, batch_norm_eval_reference, batch_norm_reference, batch_norm_train_cpu, BatchNorm2d,
};
pub use conv::{conv2d_im2col, Conv2d};
pub use conv_cpu::conv2d_cpu;
pub use dispatch::{force_composed, use_cpu_kernel};
pub use dropout::{Dropout, DropoutRng};
pub use layer_norm::{layer_norm_cpu, layer_norm_reference, LayerNorm};
pub use linear::{linear_cpu, linear_reference, Embedding, Linear};
pub use max_pool::{max_pool_3x3_s2, max_pool_3x3_s2_cpu, max_pool_3x3_s2_reference};
pub use pool::{grad_enabled, no_grad, on_compute_pool, param};
pub use precision::{precision, set_precision, Precision};

use candle_core::{Result, Tensor, D};

/// Exact (erf) GELU, as PyTorch's `nn.GELU()` and DistilBERT use.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    if dispatch::use_cpu_kernel(x) {
        gelu_cpu(x)
    } else {
        gelu_reference(x)
    }
}

/// GELU through candle's `gelu_erf` (differentiable on every device).
pub fn gelu_reference(x: &Tensor) -> Result<Tensor> {
    x.gelu_erf()
}

/// The fused CPU GELU kernel, exposed for tests and benchmarks.
pub fn gelu_cpu(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(gelu_cpu::Activate(gelu_cpu::Gelu))
}

/// The feed-forward activation a config names.
pub fn activation(x: &Tensor, a: crate::config::Activation) -> Result<Tensor> {
    use crate::config::Activation;
    match a {
        Activation::Gelu => gelu(x),
        // candle's `gelu` is the tanh approximation, as Hugging Face's `gelu_new`.
        Activation::GeluNew => x.gelu(),
        Activation::Relu => x.relu(),
        Activation::QuickGelu => quick_gelu(x),
    }
}

/// x·σ(1.702x), OpenAI CLIP's approximation of GELU: a fused kernel on the CPU, composed
/// elsewhere (as x / (1 + e^(−1.702x)), differentiable on every device).
pub fn quick_gelu(x: &Tensor) -> Result<Tensor> {
    if dispatch::use_cpu_kernel(x) {
        quick_gelu_cpu(x)
    } else {
        quick_gelu_reference(x)
    }
}

/// [`quick_gelu`] composed from candle ops (any device).
pub fn quick_gelu_reference(x: &Tensor) -> Result<Tensor> {
    let e = (x * -1.702)?.exp()?;
    x / (e + 1.0)?
}

/// The fused CPU kernel of [`quick_gelu`], exposed for tests and benchmarks.
pub fn quick_gelu_cpu(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(gelu_cpu::Activate(gelu_cpu::QuickGelu))
}

/// Softmax over the last dimension, with a backward pass (candle's `softmax_last_dim` has none).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if dispatch::use_cpu_kernel(x) {
        softmax_cpu(x)
    } else {
        softmax_reference(x)
    }
}

/// Softmax composed from differentiable ops (any device).
pub fn softmax_reference(x: &Tensor) -> Result<Tensor> {
    candle_nn::ops::softmax(x, D::Minus1)
}

/// The fused CPU softmax kernel, exposed for tests and benchmarks.
pub fn softmax_cpu(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(softmax_cpu::SoftmaxLastDim)
}

/// max(0, a + b) for a and b of one shape (a residual block's ending), with a backward pass.
pub fn add_relu(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if dispatch::use_cpu_kernel(a) && b.dtype() == a.dtype() && b.device().is_cpu() && a.dims() == b.dims() {
        add_relu_cpu(a, b)
    } else {
        add_relu_reference(a, b)
    }
}

/// max(0, a + b) composed from candle ops (any device, broadcasting).
pub fn add_relu_reference(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    a.broadcast_add(b)?.relu()
}

/// The fused CPU kernel of [`add_relu`], exposed for tests and benchmarks.
pub fn add_relu_cpu(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    a.contiguous()?.apply_op2(&b.contiguous()?, relu_cpu::AddRelu)
}

/// Multi-head attention of queries `q` (B, Lq, H·Dh) over keys `k` and values `v` (B, L, H·Dh),
/// scores scaled by 1/√Dh plus `mask` (B, L): 0 where attended, −1e9 where padded. Returns the
/// context (B, Lq, H·Dh). Fused on the CPU (see `attention_cpu`), composed elsewhere; without
/// attention dropout (the composed path applies it between the softmax and the values).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, heads: usize) -> Result<Tensor> {
    if dispatch::use_cpu_kernel(q) && dispatch::use_cpu_kernel(k) && dispatch::use_cpu_kernel(v) {
        attention_cpu(q, k, v, mask, heads)
    } else {
        attention_reference(q, k, v, mask, heads, |w| Ok(w.clone()))
    }
}

/// [`attention`] composed from candle ops (any device); `dropout` is applied to the attention
/// weights.
pub fn attention_reference(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    heads: usize,
    dropout: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let (b, lq, d) = q.dims3()?;
    let l = k.dim(1)?;
    let dh = d / heads;
    let split = |t: &Tensor, n: usize| t.reshape((b, n, heads, dh))?.transpose(1, 2)?.contiguous();
    let q = (split(q, lq)? / (dh as f64).sqrt())?;
    let (k, v) = (split(k, l)?, split(v, l)?);
    let scores = q
        .matmul(&k.t()?.contiguous()?)?
        .broadcast_add(&mask.reshape((b, 1, 1, l))?)?;
    let weights = dropout(&softmax_last_dim(&scores)?)?;
    weights.matmul(&v)?.transpose(1, 2)?.reshape((b, lq, d))
}

/// Multi-head attention with an additive `bias` broadcastable to (B, H, Lq, L): a causal mask
/// (1, 1, L, L) plus padding, say. Composed from candle ops (any device), with a backward.
pub fn attention_with_bias(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, lq, d) = q.dims3()?;
    let l = k.dim(1)?;
    if heads == 0 || d % heads != 0 {
        candle_core::bail!("attention: {d} features do not split into {heads} heads")
    }
    let dh = d / heads;
    let split = |t: &Tensor, n: usize| t.reshape((b, n, heads, dh))?.transpose(1, 2)?.contiguous();
    let q = (split(q, lq)? / (dh as f64).sqrt())?;
    let (k, v) = (split(k, l)?, split(v, l)?);
    let scores = q.matmul(&k.t()?.contiguous()?)?.broadcast_add(bias)?;
    softmax_last_dim(&scores)?
        .matmul(&v)?
        .transpose(1, 2)?
        .reshape((b, lq, d))
}

/// The fused CPU kernel of [`attention`], exposed for tests and benchmarks.
pub fn attention_cpu(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, heads: usize) -> Result<Tensor> {
    let d = q.dim(2)?;
    if heads == 0 || d % heads != 0 {
        candle_core::bail!("attention: {d} features do not split into {heads} heads")
    }
    attention_cpu_op(q, k, v, mask, heads, false)
}

fn attention_cpu_op(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, heads: usize, causal: bool) -> Result<Tensor> {
    let d = q.dim(2)?;
    if heads == 0 || d % heads != 0 {
        candle_core::bail!("attention: {d} features do not split into {heads} heads")
    }
    let op = attention_cpu::Attention {
        heads,
        scale: 1.0 / ((d / heads) as f32).sqrt(),
        mask: mask.flatten_all()?.to_vec1::<f32>()?,
        probs: (q.track_op() || k.track_op() || v.track_op()).then(|| std::sync::Mutex::new(vec![])),
        causal,
    };
    q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}

/// Causal multi-head attention (a token sees itself and the tokens before it) with padded keys
/// masked by `mask` (B, L) as in [`attention`]: the CLIP text transformer's. Fused on the CPU,
/// composed elsewhere.
pub fn attention_causal(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, heads: usize) -> Result<Tensor> {
    if dispatch::use_cpu_kernel(q) && dispatch::use_cpu_kernel(k) && dispatch::use_cpu_kernel(v) {
        attention_causal_cpu(q, k, v, mask, heads)
    } else {
        attention_causal_reference(q, k, v, mask, heads)
    }
}

/// [`attention_causal`] composed from candle ops: the causal bias plus the key mask.
pub fn attention_causal_reference(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, lq, _) = q.dims3()?;
    let l = k.dim(1)?;
    let causal: Vec<f32> = (0..lq)
        .flat_map(|i| (0..l).map(move |j| if j > i + (l - lq) { -1e9 } else { 0.0 }))
        .collect();
    let causal = Tensor::from_vec(causal, (1, 1, lq, l), q.device())?;
    let bias = causal.broadcast_add(&mask.reshape((b, 1, 1, l))?)?;
    attention_with_bias(q, k, v, &bias, heads)
}

/// The fused CPU kernel of [`attention_causal`], exposed for tests and benchmarks.
pub fn attention_causal_cpu(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, heads: usize) -> Result<Tensor> {
    attention_cpu_op(q, k, v, mask, heads, true)
}
