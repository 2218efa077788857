//! GELU-family activations on the CPU as one fused kernel per direction: exact (erf) GELU and
//! OpenAI's QuickGELU.
//!
//! candle's `gelu_erf` forward is one pass, but its backward is built from seven tensor ops (each a
//! pass over the activations with its own allocation), and a composed QuickGELU is four passes
//! each way; the feed-forward layers hold a transformer's largest activations. Here each direction
//! is one pass, parallel over chunks, compiled for the processor's widest vectors; QuickGELU's
//! sigmoid goes through `vmath::exp`, so it vectorises (with libm's `expf` it was 10 % of ViT-B/32
//! inference).

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use std::mem::MaybeUninit;

use super::conv_cpu::{assume_init, uninit};
use super::dispatch::host_f32;

/// Elements per parallel work item: small tensors stay on one thread.
const CHUNK: usize = 1 << 14;
const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;

/// A pointwise activation and its derivative.
pub trait Pointwise: Copy + Send + Sync + 'static {
    /// In messages.
    const NAME: &'static str;
    /// The op's name in candle's graph, as the other fused kernels': `clipmine-…`.
    const OP: &'static str;
    fn value(x: f32) -> f32;
    fn derivative(x: f32) -> f32;
}

/// Exact GELU: x·Φ(x).
#[derive(Clone, Copy)]
pub struct Gelu;

impl Pointwise for Gelu {
    const NAME: &'static str = "gelu";
    const OP: &'static str = "clipmine-gelu";
    fn value(x: f32) -> f32 {
        0.5 * x * (1.0 + candle_core::cpu::erf::erf_f32(x * std::f32::consts::FRAC_1_SQRT_2))
    }
    /// Φ(x) + x·φ(x).
    fn derivative(x: f32) -> f32 {
        0.5 * (1.0 + candle_core::cpu::erf::erf_f32(x * std::f32::consts::FRAC_1_SQRT_2))
            + x * FRAC_1_SQRT_2PI * (-0.5 * x * x).exp()
    }
}

/// OpenAI's QuickGELU: x·σ(1.702x).
#[derive(Clone, Copy)]
pub struct QuickGelu;

#[inline(always)]
fn quick_sigmoid(x: f32) -> f32 {
    super::vmath::sigmoid(1.702 * x)
}

impl Pointwise for QuickGelu {
    const NAME: &'static str = "quick_gelu";
    const OP: &'static str = "clipmine-quick-gelu";
    #[inline(always)]
    fn value(x: f32) -> f32 {
        x * quick_sigmoid(x)
    }
    /// σ + 1.702·x·σ·(1 − σ).
    #[inline(always)]
    fn derivative(x: f32) -> f32 {
        let s = quick_sigmoid(x);
        s + 1.702 * x * s * (1.0 - s)
    }
}

/// y = A(x), element by element (inlined into `vmath::vectorized`).
#[inline(always)]
fn values<A: Pointwise>(ys: &mut [MaybeUninit<f32>], xs: &[f32]) {
    for (o, &v) in ys.iter_mut().zip(xs) {
        o.write(A::value(v));
    }
}

/// dx = dy · A'(x), element by element.
#[inline(always)]
fn derivatives<A: Pointwise>(gxs: &mut [MaybeUninit<f32>], xs: &[f32], gys: &[f32]) {
    for ((o, &v), &g) in gxs.iter_mut().zip(xs).zip(gys) {
        o.write(g * A::derivative(v));
    }
}

/// The forward op of an activation `A`.
pub struct Activate<A>(pub A);

impl<A: Pointwise> CustomOp1 for Activate<A> {
    fn name(&self) -> &'static str {
        A::OP
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = host_f32(A::NAME, s, l)?;
        // Written once, never zero-filled first.
        let mut y = uninit(x.len());
        y.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(ys, xs)| {
            super::vmath::vectorized(
                #[inline(always)]
                || values::<A>(ys, xs),
            )
        });
        // SAFETY: the chunks cover y, and `values` wrote every element.
        let y = unsafe { assume_init(y) };
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, gy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&gy.contiguous()?, &ActivateGrad(self.0))?))
    }
}

/// dx = dy · A'(x).
struct ActivateGrad<A>(A);

impl<A: Pointwise> CustomOp2 for ActivateGrad<A> {
    fn name(&self) -> &'static str {
        A::OP
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, gy) = (host_f32(A::NAME, s1, l1)?, host_f32(A::NAME, s2, l2)?);
        if x.len() != gy.len() {
            candle_core::bail!(
                "{} backward: gradient {:?} does not match input {:?}",
                A::NAME,
                l2.dims(),
                l1.dims()
            )
        }
        let mut gx = uninit(x.len());
        gx.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK).zip(gy.par_chunks(CHUNK)))
            .for_each(|(gxs, (xs, gys))| {
                super::vmath::vectorized(
                    #[inline(always)]
                    || derivatives::<A>(gxs, xs, gys),
                )
            });
        // SAFETY: the chunks cover gx, and `derivatives` wrote every element.
        let gx = unsafe { assume_init(gx) };
        Ok((CpuStorage::F32(gx), l1.shape().clone()))
    }
}
