use candle_core::Tensor;

/// Max-pool with a 3×3 window, stride 2, padding 1 — the ResNet stem — with a working backward.
///
/// candle's `max_pool2d` only differentiates when kernel == stride. This one is built from
/// `maximum` of shifted views: pad with −∞ to an even size, split each spatial axis into
/// (even, odd) phases, and a window starting at row 2i covers even[i], odd[i], even[i+1].
/// Output size is ⌊(n − 1) / 2⌋ + 1, as PyTorch's.
///
/// On contiguous f32 CPU tensors it runs the fused kernel of `max_pool_cpu` instead.
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// use clip_core::nn::max_pool_3x3_s2;
///
/// let x = Var::from_tensor(&Tensor::randn(0f32, 1f32, (1, 2, 7, 7), &Device::Cpu)?)?;
/// let y = max_pool_3x3_s2(x.as_tensor())?;
/// assert_eq!(y.dims(), [1, 2, 4, 4]); // ⌊(7 − 1) / 2⌋ + 1
/// // The gradient reaches the input: each window's maximum gets it.
/// let g = y.sum_all()?.backward()?.get(x.as_tensor()).unwrap().sum_all()?.to_scalar::<f32>()?;
/// assert_eq!(g, 32.0); // one per output value
/// # Ok::<(), anyhow::Error>(())
/// ```
pub fn max_pool_3x3_s2(x: &Tensor) -> candle_core::Result<Tensor> {
    if super::dispatch::use_cpu_kernel(x) {
        max_pool_3x3_s2_cpu(x)
    } else {
        max_pool_3x3_s2_reference(x)
    }
}

/// The fused CPU kernel, exposed for tests and benchmarks.
pub fn max_pool_3x3_s2_cpu(x: &Tensor) -> candle_core::Result<Tensor> {
    // The arg-maxes are noted only when a backward pass can follow.
    let argmax = x.track_op().then(|| std::sync::Mutex::new(vec![]));
    x.contiguous()?.apply_op1(super::max_pool_cpu::MaxPool3x3S2 { argmax })
}

/// The composed (device-agnostic) max-pool.
pub fn max_pool_3x3_s2_reference(x: &Tensor) -> candle_core::Result<Tensor> {
    let x = pool_axis(x, 2)?;
    pool_axis(&x, 3)
}

fn pool_axis(x: &Tensor, axis: usize) -> candle_core::Result<Tensor> {
    let n = x.dim(axis)?;
    let out = (n - 1) / 2 + 1;
    // Padded length 2·(out+1): one −∞ in front (padding 1), the rest behind.
    let back = 2 * (out + 1) - 1 - n;
    let x = pad_neg_inf(x, axis, 1, back)?;
    let mut shape = x.dims().to_vec();
    shape[axis] = out + 1;
    shape.insert(axis + 1, 2);
    let x = x.reshape(shape)?;
    let even = x.narrow(axis + 1, 0, 1)?.squeeze(axis + 1)?;
    let odd = x.narrow(axis + 1, 1, 1)?.squeeze(axis + 1)?;
    let a = even.narrow(axis, 0, out)?;
    let b = odd.narrow(axis, 0, out)?;
    let c = even.narrow(axis, 1, out)?;
    a.maximum(&b)?.maximum(&c)
}

fn pad_neg_inf(x: &Tensor, axis: usize, front: usize, back: usize) -> candle_core::Result<Tensor> {
    let mut parts = Vec::with_capacity(3);
    let filler = |len: usize| -> candle_core::Result<Tensor> {
        let mut shape = x.dims().to_vec();
        shape[axis] = len;
        Tensor::full(f32::NEG_INFINITY, shape, x.device())?.to_dtype(x.dtype())
    };
    if front > 0 {
        parts.push(filler(front)?);
    }
    parts.push(x.clone());
    if back > 0 {
        parts.push(filler(back)?);
    }
    Tensor::cat(&parts, axis)
}
