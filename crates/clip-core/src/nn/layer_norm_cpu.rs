//! LayerNorm over the last dimension on the CPU as one fused kernel per direction.
//!
//! Composed from tensor ops, a LayerNorm is ~8 ops forward and ~20 backward, each a pass over
//! the activations with its own allocation; the text tower and both heads run several per step.
//! Here each direction is one pass per row.
//!
//! Layout: x (…, D) contiguous f32; weight and bias (D).

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use std::mem::MaybeUninit;

use super::conv_cpu::{assume_init, uninit};
use super::vmath;

/// Rows per parallel work item: small tensors stay on one thread.
const ROWS_PER_TASK: usize = 64;

/// (mean, 1/√(var + eps)) of one row: two passes (the variance of the deviations from the mean,
/// so no cancellation), each in 16 partial sums that vectorise (summed in f64 one at a time, they
/// were 2 % of ViT-B/32 inference).
#[inline(always)]
fn row_stats(x: &[f32], eps: f32) -> (f32, f32) {
    let n = x.len() as f32;
    let mean = vmath::sum(x) / n;
    let var = vmath::sum_sq_dev(x, mean) / n;
    (mean, 1.0 / (var + eps).sqrt())
}

/// y = (x − mean)·rstd·γ + β, row by row (inlined into `vmath::vectorized`).
#[inline(always)]
fn normalize_rows(ys: &mut [MaybeUninit<f32>], xs: &[f32], gamma: &[f32], beta: &[f32], eps: f32) {
    let d = gamma.len();
    for (yr, xr) in ys.chunks_mut(d).zip(xs.chunks(d)) {
        let (mean, rstd) = row_stats(xr, eps);
        for ((o, &v), (&g, &b)) in yr.iter_mut().zip(xr).zip(gamma.iter().zip(beta)) {
            o.write((v - mean) * rstd * g + b);
        }
    }
}

/// One task's share of the backward pass: its rows' dx, and its partial dγ and dβ.
struct RowGrads<'a> {
    gamma: &'a [f32],
    eps: f32,
    dgamma: &'a mut [f32],
    dbeta: &'a mut [f32],
    /// Scratch rows: x̂ and ĝ = dy·γ.
    xhat: &'a mut [f32],
    gh: &'a mut [f32],
}

impl RowGrads<'_> {
    /// dx = rstd · (ĝ − mean(ĝ) − x̂ · mean(ĝ·x̂)) per row; dγ += dy·x̂, dβ += dy.
    #[inline(always)]
    fn rows(self, dxs: &mut [f32], xs: &[f32], gys: &[f32]) {
        let d = self.gamma.len();
        for ((dxr, xr), gr) in dxs.chunks_mut(d).zip(xs.chunks(d)).zip(gys.chunks(d)) {
            let (mean, rstd) = row_stats(xr, self.eps);
            // Every slice d long, visibly to the compiler: no bounds checks in the loops.
            let (xr, gr, dxr, gamma) = (&xr[..d], &gr[..d], &mut dxr[..d], &self.gamma[..d]);
            let (xhat, gh) = (&mut self.xhat[..d], &mut self.gh[..d]);
            let (dgamma, dbeta) = (&mut self.dgamma[..d], &mut self.dbeta[..d]);
            for j in 0..d {
                xhat[j] = (xr[j] - mean) * rstd;
                gh[j] = gr[j] * gamma[j];
                dgamma[j] += gr[j] * xhat[j];
                dbeta[j] += gr[j];
            }
            let (m1, m2) = (vmath::sum(gh) / d as f32, vmath::dot(gh, xhat) / d as f32);
            for j in 0..d {
                dxr[j] = rstd * (gh[j] - m1 - xhat[j] * m2);
            }
        }
    }
}

pub struct LayerNormOp {
    pub eps: f32,
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "clipmine-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, gamma, beta) = (
            super::dispatch::host_f32("layer norm", s1, l1)?,
            super::dispatch::host_f32("layer norm", s2, l2)?,
            super::dispatch::host_f32("layer norm", s3, l3)?,
        );
        let d = gamma.len();
        if d == 0 || x.len() % d != 0 || beta.len() != d {
            candle_core::bail!("layer norm: input {:?} does not fit weight ({d})", l1.dims())
        }
        // Written once, never zero-filled first.
        let mut y = uninit(x.len());
        y.par_chunks_mut(d * ROWS_PER_TASK)
            .zip(x.par_chunks(d * ROWS_PER_TASK))
            .for_each(|(ys, xs)| {
                vmath::vectorized(
                    #[inline(always)]
                    || normalize_rows(ys, xs, gamma, beta, self.eps),
                )
            });
        // SAFETY: the chunks cover y (its length is a multiple of d), and every row was written.
        let y = unsafe { assume_init(y) };
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        _y: &Tensor,
        gy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let packed = x.apply_op3_no_bwd(gamma, &gy.contiguous()?, &LayerNormGrad { eps: self.eps })?;
        let (n, d) = (x.elem_count(), gamma.elem_count());
        let gx = packed.narrow(0, 0, n)?.reshape(x.shape())?;
        Ok((
            Some(gx),
            Some(packed.narrow(0, n, d)?),
            Some(packed.narrow(0, n + d, d)?),
        ))
    }
}

/// The gradients of [`LayerNormOp`], packed as [dx, dweight, dbias].
struct LayerNormGrad {
    eps: f32,
}

impl CustomOp3 for LayerNormGrad {
    fn name(&self) -> &'static str {
        "clipmine-layer-norm-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, gamma, gy) = (
            super::dispatch::host_f32("layer norm", s1, l1)?,
            super::dispatch::host_f32("layer norm", s2, l2)?,
            super::dispatch::host_f32("layer norm", s3, l3)?,
        );
        let d = gamma.len();
        let mut out = vec![0f32; x.len() + 2 * d];
        let (dx, rest) = out.split_at_mut(x.len());
        // dx = rstd · (ĝ − mean(ĝ) − x̂ · mean(ĝ·x̂)), ĝ = dy·γ; per task, partial Σ dy·x̂ and Σ dy.
        let partials: Vec<(Vec<f32>, Vec<f32>)> = dx
            .par_chunks_mut(d * ROWS_PER_TASK)
            .zip(x.par_chunks(d * ROWS_PER_TASK).zip(gy.par_chunks(d * ROWS_PER_TASK)))
            .map(|(dxs, (xs, gys))| {
                let mut dgamma = vec![0f32; d];
                let mut dbeta = vec![0f32; d];
                let mut xhat = vec![0f32; d];
                let mut gh = vec![0f32; d];
                let grads = RowGrads {
                    gamma,
                    eps: self.eps,
                    dgamma: &mut dgamma,
                    dbeta: &mut dbeta,
                    xhat: &mut xhat,
                    gh: &mut gh,
                };
                vmath::vectorized(
                    #[inline(always)]
                    || grads.rows(dxs, xs, gys),
                );
                (dgamma, dbeta)
            })
            .collect();
        for (dg, db) in partials {
            for j in 0..d {
                rest[j] += dg[j];
                rest[d + j] += db[j];
            }
        }
        let len = out.len();
        Ok((CpuStorage::F32(out), Shape::from(len)))
    }
}
