//! The one place where each op chooses between its fused CPU kernel and the composed path.
//!
//! Every fused kernel (convolution, BatchNorm, LayerNorm, GELU, softmax, max-pool, AdamW, the
//! index scan) runs only on contiguous f32 CPU tensors; everything else — CUDA and Metal tensors,
//! other dtypes — takes the composed candle path, which is differentiable through every op. So that
//! the CPU test suite exercises that path too, a process-wide switch forces it: set the
//! environment variable `CLIPMINE_COMPOSED=1`, or call [`force_composed`] before building a model.

use std::sync::atomic::{AtomicU8, Ordering};

use candle_core::{CpuStorage, DType, Layout, Storage, Tensor};

/// Environment variable that, set to anything but `0` or empty, forces the composed path.
pub const COMPOSED_ENV: &str = "CLIPMINE_COMPOSED";

const UNREAD: u8 = 0;
const FUSED: u8 = 1;
const COMPOSED: u8 = 2;
static MODE: AtomicU8 = AtomicU8::new(UNREAD);

/// Forces (or stops forcing) the composed path for every op, process-wide.
///
/// Ops decide per call, so a switch mid-run takes effect at the next op; the optimiser decides
/// per parameter when it is built.
pub fn force_composed(on: bool) {
    MODE.store(if on { COMPOSED } else { FUSED }, Ordering::Relaxed);
}

/// Whether the composed path is forced (by [`force_composed`] or `CLIPMINE_COMPOSED`).
pub fn composed_forced() -> bool {
    match MODE.load(Ordering::Relaxed) {
        UNREAD => {
            let on = std::env::var(COMPOSED_ENV).is_ok_and(|v| !v.is_empty() && v != "0");
            // A concurrent `force_composed` wins over the environment.
            let _ = MODE.compare_exchange(
                UNREAD,
                if on { COMPOSED } else { FUSED },
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
            MODE.load(Ordering::Relaxed) == COMPOSED
        }
        m => m == COMPOSED,
    }
}

/// Whether an op on `x` runs its fused CPU kernel: f32 on the CPU, and the composed path not forced.
pub fn use_cpu_kernel(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32 && !composed_forced()
}

/// The f32 data of a custom op's operand; the fused CPU kernels are only given contiguous tensors.
pub(crate) fn host_f32<'a>(op: &str, s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    let Some((start, end)) = l.contiguous_offsets() else {
        candle_core::bail!("{op}: operands must be contiguous")
    };
    let data = s.as_slice::<f32>()?;
    match data.get(start..end) {
        Some(d) => Ok(d),
        // The one way a tensor's storage is shorter than its layout: the vendored backward pass
        // freed it (vendor/README.md).
        None => candle_core::bail!(
            "{op}: an operand's values were freed by a backward pass through its graph; a graph can be backpropagated once (compute the forward pass again)"
        ),
    }
}

/// The mutable f32 data of an in-place op's destination (contiguous only).
pub(crate) fn host_f32_mut<'a>(op: &str, s: &'a mut CpuStorage, l: &Layout) -> candle_core::Result<&'a mut [f32]> {
    let Some((start, end)) = l.contiguous_offsets() else {
        candle_core::bail!("{op}: operands must be contiguous")
    };
    match s {
        CpuStorage::F32(v) => match v.get_mut(start..end) {
            Some(d) => Ok(d),
            None => candle_core::bail!("{op}: the destination's values were freed by a backward pass"),
        },
        _ => candle_core::bail!("{op}: expected f32 data"),
    }
}

/// Runs `f` on the data of a contiguous f32 CPU tensor without copying it; `None` when the tensor
/// is elsewhere, of another dtype, strided, or the composed path is forced.
pub(crate) fn with_host_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
    if !use_cpu_kernel(t) {
        return None;
    }
    let (storage, layout) = t.storage_and_layout();
    match (&*storage, layout.contiguous_offsets()) {
        (Storage::Cpu(CpuStorage::F32(v)), Some((start, end))) => v.get(start..end).map(f),
        _ => None,
    }
}
