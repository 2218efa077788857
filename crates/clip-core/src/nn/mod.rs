//! Trainable building blocks. Each one keeps the PyTorch parameter names and has a backward pass
//! through every op (candle 0.11's fused LayerNorm, `softmax_last_dim` and strided max-pool do not).
//!
//! Ops with a fused CPU kernel (`*_cpu` modules, each with its own backward) choose it or the
//! composed candle path in one place, [`dispatch::use_cpu_kernel`]; each also exposes both paths
//! (`*_cpu` and `*_reference`) so tests can compare them.

mod batch_norm;
mod batch_norm_cpu;
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
mod pool;
mod relu_cpu;
mod softmax_cpu;

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
    x.contiguous()?.apply_op1(gelu_cpu::Gelu)
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
