use anyhow::Result;
use candle_core::{Module, Tensor};

use crate::params::{Init, ParamBuilder};

/// `nn.Conv2d` without bias (ResNet convolutions are always followed by BatchNorm).
///
/// ```
/// use candle_core::{Device, Module, Tensor};
/// use clip_core::nn::Conv2d;
/// use clip_core::params::{Group, ParamStore};
///
/// let store = ParamStore::new(&Device::Cpu, 0);
/// // 3 → 8 channels, 3×3 kernel, stride 2, padding 1: 16×16 becomes 8×8.
/// let conv = Conv2d::new(&store.root(Group::ImageTower, true).pp("conv1"), 3, 8, 3, 2, 1)?;
/// let x = Tensor::randn(0f32, 1f32, (2, 3, 16, 16), &Device::Cpu)?;
/// let y = conv.forward(&x)?;
/// assert_eq!(y.dims(), [2, 8, 8, 8]);
/// // Every weight gets a finite, non-zero gradient: the layer has a working backward.
/// let grads = y.sqr()?.sum_all()?.backward()?;
/// for (name, e) in store.entries() {
///     let g = grads.get(e.var.as_tensor()).expect(&name);
///     assert!(g.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0, "{name}");
/// }
/// # Ok::<(), anyhow::Error>(())
/// ```
///
/// On the CPU it runs [`conv2d_cpu`](super::conv_cpu::conv2d_cpu), whose three products are all
/// im2col + GEMM. Elsewhere, when gradients are needed, the convolution is computed as im2col +
/// matrix product built from differentiable tensor ops. candle's own `conv2d` backward computes the input gradient with a
/// naive transposed-convolution kernel (on CPU and CUDA alike) that made a training step ~10×
/// slower than its forward; through im2col, both gradients are matrix products (BLAS / cuBLAS)
/// plus cheap shifted adds. Inference keeps candle's native (im2col or cuDNN) forward.
#[derive(Clone, Debug)]
pub struct Conv2d {
    weight: Tensor,
    stride: usize,
    padding: usize,
}

impl Conv2d {
    /// Kaiming-normal (fan_out, ReLU) initialisation, as torchvision and timm do.
    pub fn new(pb: &ParamBuilder, c_in: usize, c_out: usize, k: usize, stride: usize, padding: usize) -> Result<Self> {
        // In floats: the sizes come from files, and a product of them may overflow an integer.
        let std = (2.0 / (c_out as f64 * k as f64 * k as f64)).sqrt();
        Ok(Self {
            weight: pb.param("weight", &[c_out, c_in, k, k], Init::Normal { std })?,
            stride,
            padding,
        })
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let w = super::param(&self.weight);
        if super::dispatch::use_cpu_kernel(x) {
            super::conv_cpu::conv2d_cpu(x, &w, self.stride, self.padding)
        } else if x.track_op() || w.track_op() {
            conv2d_im2col(x, &w, self.stride, self.padding)
        } else {
            x.conv2d(&w, self.padding, self.stride, 1, 1)
        }
    }
}

/// Convolution as im2col + matmul, differentiable through every op.
pub fn conv2d_im2col(x: &Tensor, w: &Tensor, stride: usize, padding: usize) -> candle_core::Result<Tensor> {
    let (b, c, h, wd) = x.dims4()?;
    let (o, c_w, kh, kw) = w.dims4()?;
    if c != c_w {
        candle_core::bail!("conv2d: input has {c} channels, the kernel expects {c_w}")
    }
    let ho = (h + 2 * padding - kh) / stride + 1;
    let wo = (wd + 2 * padding - kw) / stride + 1;
    let xp = if padding > 0 {
        x.pad_with_zeros(2, padding, padding)?
            .pad_with_zeros(3, padding, padding)?
    } else {
        x.clone()
    };
    let cols = if kh == 1 && kw == 1 {
        shifted(&xp, 0, 0, stride, ho, wo)?.reshape((b, c, ho * wo))?
    } else {
        let mut taps = Vec::with_capacity(kh * kw);
        for di in 0..kh {
            for dj in 0..kw {
                taps.push(shifted(&xp, di, dj, stride, ho, wo)?);
            }
        }
        // (b, c, kh·kw, ho, wo) → (b, c·kh·kw, ho·wo), matching the kernel's (c, kh, kw) layout.
        Tensor::stack(&taps, 2)?.reshape((b, c * kh * kw, ho * wo))?
    };
    let w2 = w.reshape((o, c * kh * kw))?;
    w2.broadcast_matmul(&cols)?.reshape((b, o, ho, wo))
}

/// The (ho, wo) grid of `x` starting at (di, dj) with step `stride`.
fn shifted(x: &Tensor, di: usize, dj: usize, stride: usize, ho: usize, wo: usize) -> candle_core::Result<Tensor> {
    let x = step_axis(x, 2, di, stride, ho)?;
    step_axis(&x, 3, dj, stride, wo)
}

/// Elements start, start+s, …, start+s·(n−1) along `axis`, via a reshape into s phases.
fn step_axis(x: &Tensor, axis: usize, start: usize, s: usize, n: usize) -> candle_core::Result<Tensor> {
    if s == 1 {
        return x.narrow(axis, start, n);
    }
    let len = x.dim(axis)?;
    let need = (start / s + n) * s;
    let x = if need > len {
        x.pad_with_zeros(axis, 0, need - len)?
    } else {
        x.narrow(axis, 0, need)?
    };
    let mut shape = x.dims().to_vec();
    shape[axis] = need / s;
    shape.insert(axis + 1, s);
    x.reshape(shape)?
        .narrow(axis + 1, start % s, 1)?
        .squeeze(axis + 1)?
        .narrow(axis, start / s, n)
}
