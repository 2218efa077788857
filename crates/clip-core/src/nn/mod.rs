//! Trainable building blocks. Each one keeps the PyTorch parameter names and has a backward pass
//! through every op (candle 0.11's fused LayerNorm, `softmax_last_dim` and strided max-pool do not).

mod batch_norm;
mod batch_norm_cpu;
mod conv;
mod conv_cpu;
mod dropout;
mod layer_norm;
mod layer_norm_cpu;
mod linear;
mod max_pool;

pub use batch_norm::{batch_norm_reference, batch_norm_train_cpu, BatchNorm2d};
pub use conv::{conv2d_im2col, Conv2d};
pub use conv_cpu::conv2d_cpu;
pub use dropout::{Dropout, DropoutRng};
pub use layer_norm::{layer_norm_cpu, layer_norm_reference, LayerNorm};
pub use linear::{Embedding, Linear};
pub use max_pool::max_pool_3x3_s2;

/// The f32 data of a custom op's operand; the fused CPU kernels are only given contiguous tensors.
pub(crate) fn host_f32<'a>(
    op: &str,
    s: &'a candle_core::CpuStorage,
    l: &candle_core::Layout,
) -> candle_core::Result<&'a [f32]> {
    let Some((start, end)) = l.contiguous_offsets() else {
        candle_core::bail!("{op}: operands must be contiguous")
    };
    Ok(&s.as_slice::<f32>()?[start..end])
}

/// Exact (erf) GELU, as PyTorch's `nn.GELU()` and DistilBERT use.
pub fn gelu(x: &candle_core::Tensor) -> candle_core::Result<candle_core::Tensor> {
    x.gelu_erf()
}
