//! Exact (erf) GELU on the CPU as one fused kernel per direction.
//!
//! candle's `gelu_erf` forward is one pass, but its backward is built from seven tensor ops (each a
//! pass over the activations with its own allocation); the text tower's feed-forward layers are
//! its largest activations. Here the backward is one pass, parallel over chunks.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::dispatch::host_f32;

/// Elements per parallel work item: small tensors stay on one thread.
const CHUNK: usize = 1 << 14;
const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;

fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + candle_core::cpu::erf::erf_f32(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// d gelu / dx = Φ(x) + x·φ(x).
fn gelu_grad(x: f32) -> f32 {
    0.5 * (1.0 + candle_core::cpu::erf::erf_f32(x * std::f32::consts::FRAC_1_SQRT_2))
        + x * FRAC_1_SQRT_2PI * (-0.5 * x * x).exp()
}

pub struct Gelu;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "clipmine-gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = host_f32("gelu", s, l)?;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(ys, xs)| {
            for (o, &v) in ys.iter_mut().zip(xs) {
                *o = gelu(v);
            }
        });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, gy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&gy.contiguous()?, &GeluGrad)?))
    }
}

/// dx = dy · gelu'(x).
struct GeluGrad;

impl CustomOp2 for GeluGrad {
    fn name(&self) -> &'static str {
        "clipmine-gelu-grad"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, gy) = (host_f32("gelu", s1, l1)?, host_f32("gelu", s2, l2)?);
        if x.len() != gy.len() {
            candle_core::bail!(
                "gelu backward: gradient {:?} does not match input {:?}",
                l2.dims(),
                l1.dims()
            )
        }
        let mut gx = vec![0f32; x.len()];
        gx.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK).zip(gy.par_chunks(CHUNK)))
            .for_each(|(gxs, (xs, gys))| {
                for ((o, &v), &g) in gxs.iter_mut().zip(xs).zip(gys) {
                    *o = g * gelu_grad(v);
                }
            });
        Ok((CpuStorage::F32(gx), l1.shape().clone()))
    }
}

/// σ(1.702x).
fn quick_sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-1.702 * x).exp())
}

/// OpenAI's QuickGELU, x·σ(1.702x), in one pass per direction (composed, it is four passes with
/// four allocations over a ViT's largest activations).
pub struct QuickGelu;

impl CustomOp1 for QuickGelu {
    fn name(&self) -> &'static str {
        "clipmine-quick-gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = host_f32("quick_gelu", s, l)?;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(ys, xs)| {
            for (o, &v) in ys.iter_mut().zip(xs) {
                *o = v * quick_sigmoid(v);
            }
        });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, gy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&gy.contiguous()?, &QuickGeluGrad)?))
    }
}

/// dx = dy · (σ + 1.702·x·σ·(1 − σ)), σ = σ(1.702x).
struct QuickGeluGrad;

impl CustomOp2 for QuickGeluGrad {
    fn name(&self) -> &'static str {
        "clipmine-quick-gelu-grad"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, gy) = (host_f32("quick_gelu", s1, l1)?, host_f32("quick_gelu", s2, l2)?);
        if x.len() != gy.len() {
            candle_core::bail!(
                "quick_gelu backward: gradient {:?} does not match input {:?}",
                l2.dims(),
                l1.dims()
            )
        }
        let mut gx = vec![0f32; x.len()];
        gx.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK).zip(gy.par_chunks(CHUNK)))
            .for_each(|(gxs, (xs, gys))| {
                for ((o, &v), &g) in gxs.iter_mut().zip(xs).zip(gys) {
                    let s = quick_sigmoid(v);
                    *o = g * (s + 1.702 * v * s * (1.0 - s));
                }
            });
        Ok((CpuStorage::F32(gx), l1.shape().clone()))
    }
}
